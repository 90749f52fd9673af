"""override / append semantics across an ordered set of files."""

from __future__ import annotations

from falco_api.rules import RulesFile, defined_items, validate_rules

from .helpers import errors, only_error

BASE = RulesFile(
    "00-base.yaml",
    """
- list: shells
  items: [bash, sh]
- list: all_shells
  items: [shells, zsh]
- macro: interactive
  condition: proc.tty != 0
- rule: Shell spawned
  desc: a shell
  condition: evt.type = execve and proc.name in (all_shells) and interactive
  output: "shell %proc.name"
  priority: NOTICE
  exceptions:
    - name: known
      fields: [proc.pname, proc.name]
      values: [[cron, sh]]
""",
)


def run(custom: str) -> list:  # type: ignore[type-arg]
    return validate_rules([BASE, RulesFile("10-custom.yaml", custom)])


def test_valid_overrides_and_appends() -> None:
    custom = """
- list: shells
  items: [fish]
  override: {items: append}
- list: all_shells
  items: [shells]
  override: {items: replace}
- macro: interactive
  condition: and user.name != root
  override: {condition: append}
- rule: Shell spawned
  condition: and not proc.pname = sshd
  output: "%user.name"
  desc: more
  tags: [shell]
  priority: info
  enabled: false
  override:
    condition: append
    output: append
    desc: append
    tags: replace
    priority: replace
    enabled: replace
- rule: Shell spawned
  exceptions:
    - name: known
      values: [[systemd, bash]]
    - name: more
      fields: proc.exepath
      values: [/bin/x]
  override: {exceptions: append}
- rule: Shell spawned
  enabled: true
- macro: interactive
  condition: or proc.name = x
  append: true
- rule: Shell spawned
  condition: and proc.name != y
  append: true
"""
    findings = run(custom)
    assert findings == [], "\n".join(map(str, findings))


def test_later_file_may_use_earlier_macros_and_definition_order_does_not_matter() -> None:
    custom = RulesFile(
        "10-custom.yaml",
        """
- rule: Uses later macro
  desc: d
  condition: interactive and defined_later and proc.name in (all_shells)
  output: "%proc.name"
  priority: INFO
- macro: defined_later
  condition: proc.name in (late_list)
- list: late_list
  items: [a]
""",
    )
    assert validate_rules([BASE, custom]) == []
    # The same custom file alone lacks the base macro.
    finding = only_error(validate_rules([custom]))
    assert finding.message == "undefined macro 'interactive'"


def test_override_before_definition_in_the_same_file_is_an_error() -> None:
    content = """
- macro: m
  condition: or evt.num=2
  override: {condition: append}
- macro: m
  condition: evt.num=1
"""
    finding = only_error(validate_rules([RulesFile("f.yaml", content)]))
    assert (finding.item_kind, finding.item_name, finding.line) == ("macro", "m", 2)
    assert "no macro of that name is defined before it" in finding.message


def test_override_in_an_earlier_file_than_the_definition_is_an_error() -> None:
    early = RulesFile("00-early.yaml", "- list: shells\n  items: [fish]\n  override: {items: append}\n")
    finding = only_error(validate_rules([early, BASE]))
    assert finding.file == "00-early.yaml"
    assert "'override' of list 'shells', but no list of that name is defined before it" in finding.message


def test_override_key_rules() -> None:
    cases = {
        "- rule: Shell spawned\n  priority: INFO\n  override: {priority: append}\n": (
            "key 'priority' cannot be overridden with 'append' on a rule"
        ),
        "- rule: Shell spawned\n  priority: INFO\n  override: {priority: change}\n": (
            "override of 'priority' must be 'append' or 'replace', not 'change'"
        ),
        "- rule: Shell spawned\n  override: {output: replace}\n": (
            "'override' names 'output' but the item has no 'output' key"
        ),
        "- rule: Shell spawned\n  output: x\n  desc: y\n  override: {output: replace}\n": (
            "key 'desc' needs an entry in 'override' (append or replace)"
        ),
        "- rule: Shell spawned\n  output: x\n  append: true\n  override: {output: replace}\n": (
            "'override' and 'append: true' cannot be used together"
        ),
        "- rule: Shell spawned\n  source: k8s_audit\n  override: {source: replace}\n": (
            "key 'source' cannot be overridden with 'replace' on a rule"
        ),
        "- macro: interactive\n  condition: x\n  override: {items: append}\n": (
            "key 'items' cannot be overridden with 'append' on a macro"
        ),
        "- rule: Shell spawned\n  override: {}\n": "key 'override' must be a non-empty mapping",
        "- rule: Shell spawned\n  priority: INFO\n  append: true\n": (
            "key 'priority' cannot be appended to a rule"
        ),
        "- rule: Missing\n  enabled: false\n": "'enabled' change of rule 'Missing', but no rule of that name",
        "- list: nope\n  items: [a]\n  append: true\n": "'append: true' to list 'nope', but no list",
    }
    for custom, message in cases.items():
        found = errors(run(custom))
        assert any(message in f.message for f in found), (custom, [str(f) for f in found])
        assert all(f.file == "10-custom.yaml" for f in found)


def test_appended_condition_errors_point_into_the_appending_item() -> None:
    custom = "- macro: interactive\n  condition: and (proc.name = \n  override: {condition: append}\n"
    finding = only_error(run(custom))
    assert finding.item_name == "interactive"
    assert finding.file == "00-base.yaml"  # the macro is defined there ...
    assert "(in the condition appended at 10-custom.yaml:1)" in finding.message  # ... the bad text is here
    assert finding.line == 2


def test_appended_exception_must_match_existing_fields() -> None:
    custom = """
- rule: Shell spawned
  exceptions:
    - name: known
      fields: [proc.name]
      values: [[x]]
  override: {exceptions: append}
"""
    assert "may only add 'values'" in only_error(run(custom)).message
    custom = """
- rule: Shell spawned
  exceptions:
    - name: known
      values: [[just-one]]
  override: {exceptions: append}
"""
    assert "value #1 has 1 element(s) but 'fields' lists 2" in only_error(run(custom)).message


def test_replaced_condition_is_validated() -> None:
    custom = (
        "- rule: Shell spawned\n  condition: evt.type = execve and nope\n  override: {condition: replace}\n"
    )
    finding = only_error(run(custom))
    assert finding.message == "undefined macro 'nope'" and finding.line == 2


def test_list_cycle_is_reported() -> None:
    content = "- list: a\n  items: [b]\n- list: b\n  items: [a]\n"
    messages = [f.message for f in validate_rules([RulesFile("f.yaml", content)])]
    assert "list 'a' includes itself (through its items)" in messages


def test_defined_items_reflect_the_whole_set() -> None:
    custom = RulesFile("10.yaml", "- macro: extra\n  condition: evt.num=1\n- list: shells\n  items: [x]\n")
    items = defined_items([BASE, custom])
    assert items.rules == ("Shell spawned",)
    assert items.macros == ("interactive", "extra")
    assert items.lists == ("shells", "all_shells")
