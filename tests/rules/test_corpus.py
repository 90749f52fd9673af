"""The public Falco rulesets must validate cleanly."""

from __future__ import annotations

import pytest

from falco_api.rules import RulesFile, defined_items, validate_paths, validate_rules

from .helpers import FIXTURES, SHARED_CORPUS


def test_fixture_falco_rules_has_no_findings() -> None:
    findings = validate_paths([str(FIXTURES / "falco_rules.yaml")], engine_version="0.57.0")
    assert findings == [], "\n".join(map(str, findings))


def test_shared_corpus_falco_rules_has_no_findings() -> None:
    path = SHARED_CORPUS / "falco_rules.yaml"
    if not path.exists():
        pytest.skip(f"{path} not present (shared/ is not beside this checkout)")
    findings = validate_paths([str(path)], engine_version="0.57.0")
    assert findings == [], "\n".join(map(str, findings))


def test_fixture_matches_shared_corpus_when_present() -> None:
    path = SHARED_CORPUS / "falco_rules.yaml"
    if not path.exists():
        pytest.skip("shared corpus not present")
    assert path.read_text() == (FIXTURES / "falco_rules.yaml").read_text()


def test_corpus_plus_user_overrides_validates() -> None:
    """A typical user file layered on the stock rules, loaded after it."""
    stock = RulesFile("falco_rules.yaml", (FIXTURES / "falco_rules.yaml").read_text())
    custom = RulesFile(
        "zz-custom.yaml",
        """
- list: shell_binaries
  items: [fish]
  override:
    items: append
- macro: never_true
  condition: or evt.num=1
  override:
    condition: append
- rule: Terminal shell in container
  priority: ERROR
  override:
    priority: replace
- rule: Terminal shell in container
  exceptions:
    - name: allowed_images
      fields: [container.image.repository, proc.name]
      comps: [=, in]
      values:
        - [docker.io/library/debug, [bash, sh]]
  override:
    exceptions: append
""",
    )
    findings = validate_rules([stock, custom], engine_version="0.57.0")
    assert findings == [], "\n".join(map(str, findings))


def test_corpus_is_too_new_for_an_old_engine() -> None:
    findings = validate_paths([str(FIXTURES / "falco_rules.yaml")], engine_version="0.50.0")
    assert len(findings) == 1
    assert "0.57.0" in findings[0].message and "0.50.0" in findings[0].message


def test_defined_items_lists_names_in_definition_order() -> None:
    items = defined_items([RulesFile("falco_rules.yaml", (FIXTURES / "falco_rules.yaml").read_text())])
    assert items.macros[:2] == ("open_write", "open_read")
    assert "shell_binaries" in items.lists
    assert "Terminal shell in container" in items.rules
    assert len(items.rules) == 25


def test_fixture_deprecated_rules_validate_alone_and_after_the_stable_rules() -> None:
    deprecated = str(FIXTURES / "falco-deprecated_rules.yaml")
    assert validate_paths([deprecated], engine_version="0.57.0") == []
    stable = str(FIXTURES / "falco_rules.yaml")
    findings = validate_paths([stable, deprecated], engine_version="0.57.0")
    assert findings == [], "\n".join(map(str, findings))
