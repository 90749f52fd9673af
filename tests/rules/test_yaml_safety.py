"""Hostile or malformed YAML is refused with a clear finding, never a crash or a hang."""

from __future__ import annotations

import pytest

from falco_api.rules import RulesLimits, load_rules_yaml
from falco_api.rules.yamlload import YamlLimitError, YamlSyntaxError

from .helpers import check, only_error

BILLION_LAUGHS = """
- list: lol
  items: &a1 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]
- list: a2
  items: &a2 [*a1, *a1, *a1, *a1, *a1, *a1, *a1, *a1, *a1, *a1]
- list: a3
  items: &a3 [*a2, *a2, *a2, *a2, *a2, *a2, *a2, *a2, *a2, *a2]
- list: a4
  items: &a4 [*a3, *a3, *a3, *a3, *a3, *a3, *a3, *a3, *a3, *a3]
- list: a5
  items: &a5 [*a4, *a4, *a4, *a4, *a4, *a4, *a4, *a4, *a4, *a4]
- list: a6
  items: &a6 [*a5, *a5, *a5, *a5, *a5, *a5, *a5, *a5, *a5, *a5]
- list: a7
  items: [*a6, *a6, *a6, *a6, *a6, *a6, *a6, *a6, *a6, *a6]
"""


def test_alias_expansion_bomb_is_refused() -> None:
    finding = only_error(check(BILLION_LAUGHS, name="bomb.yaml"))
    assert finding.file == "bomb.yaml"
    assert "alias expansion bomb" in finding.message and finding.message.startswith("refused:")
    assert finding.line > 1


def test_small_alias_use_is_fine() -> None:
    findings = check(
        """
- list: base
  items: &names [bash, sh]
- rule: R
  desc: d
  condition: proc.name in (base)
  output: "%proc.name"
  priority: INFO
  tags: *names
"""
    )
    assert findings == []


def test_recursive_alias_is_refused() -> None:
    with pytest.raises(YamlLimitError, match="recursive YAML alias"):
        load_rules_yaml("- &a [*a]\n")
    finding = only_error(check("- list: x\n  items: &a [*a]\n"))
    assert "recursive YAML alias" in finding.message


def test_deep_nesting_is_refused_with_position() -> None:
    deep = "- list: x\n  items: " + "[" * 100 + "]" * 100 + "\n"
    finding = only_error(check(deep))
    assert "nesting deeper than 64 levels" in finding.message
    assert finding.line == 2


def test_nesting_limit_is_configurable() -> None:
    text = "- list: x\n  items: [[[a]]]\n"
    with pytest.raises(YamlLimitError):
        load_rules_yaml(text, RulesLimits(max_depth=3))
    assert load_rules_yaml(text, RulesLimits(max_depth=10)).data == [{"list": "x", "items": [[["a"]]]}]


def test_huge_file_is_refused_before_parsing() -> None:
    huge = "- list: x\n  items: [" + "a, " * 2_000_000 + "b]\n"
    finding = only_error(check(huge, name="huge.yaml"))
    assert finding.file == "huge.yaml"
    assert "larger than the limit of 4194304 bytes" in finding.message


def test_size_limit_is_configurable() -> None:
    finding = only_error(check("- list: x\n  items: [a]\n", limits=RulesLimits(max_bytes=10)))
    assert "limit of 10 bytes" in finding.message


def test_non_sequence_document() -> None:
    finding = only_error(check("rule: x\ncondition: y\n", name="map.yaml"))
    assert str(finding).startswith("map.yaml:1:1: a rules file must be a YAML sequence of items")
    assert "not a mapping" in finding.message
    assert "not a string" in only_error(check("just text\n")).message


def test_yaml_syntax_error_has_position() -> None:
    finding = only_error(check("- rule: a\n  desc: [unclosed\n- macro: b\n", name="bad.yaml"))
    assert finding.file == "bad.yaml"
    assert finding.message.startswith("invalid YAML")
    assert finding.line == 3


def test_multiple_documents_are_refused() -> None:
    with pytest.raises(YamlSyntaxError):
        load_rules_yaml("- list: a\n  items: [x]\n---\n- list: b\n  items: [y]\n")


def test_python_tags_are_refused() -> None:
    finding = only_error(check("- list: x\n  items: !!python/object/apply:os.system [echo hi]\n"))
    assert "invalid YAML" in finding.message and "python/object/apply" in finding.message


def test_empty_and_comment_only_files_are_valid() -> None:
    assert check("") == []
    assert check("# nothing here\n") == []


def test_non_mapping_item() -> None:
    finding = only_error(check("- just a string\n- list: x\n  items: [a]\n"))
    assert finding.message == "an item must be a mapping, not a string" and finding.line == 1


def test_loader_keeps_positions() -> None:
    doc = load_rules_yaml("- list: x\n  items: [a]\n")
    assert doc.data == [{"list": "x", "items": ["a"]}]
    assert doc.root is not None and doc.root.value[0].start_mark.line == 0


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b", "\ufffe"])
def test_a_control_character_is_a_syntax_error_at_its_position(char: str) -> None:
    """PyYAML refuses these while reading; that must be a finding with a position, not a crash."""
    text = f"- macro: a\n  condition: evt.num=0{char}\n"
    with pytest.raises(YamlSyntaxError) as caught:
        load_rules_yaml(text)
    assert (caught.value.line, caught.value.column) == (2, 23)
    assert "not allowed" in caught.value.message
