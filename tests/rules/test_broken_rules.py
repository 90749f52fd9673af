"""Broken rules are rejected with messages naming the file, the item and the problem, at the right place."""

from __future__ import annotations

import pytest

from falco_api.rules import Finding, RulesFile, validate_rules

from .helpers import RULE_HEAD, check, errors, only_error


def test_condition_syntax_error_in_block_scalar_points_at_file_line_and_column() -> None:
    content = RULE_HEAD + (
        "  condition: >\n"  # line 5
        "    evt.type = open and\n"  # line 6
        "    proc.name in (a, b\n"  # line 7
    )
    finding = only_error(check(content, name="rules/custom.yaml"))
    assert (finding.file, finding.item_kind, finding.item_name) == ("rules/custom.yaml", "rule", "R")
    assert (finding.line, finding.column) == (7, 23)
    assert "condition syntax error: expected ',' or a ')' token in the list" in finding.message
    assert str(finding) == (
        "rules/custom.yaml:7:23: rule 'R': condition syntax error: expected ',' or a ')' token in the list"
    )


def test_condition_syntax_error_in_literal_block() -> None:
    content = RULE_HEAD + "  condition: |\n    evt.type = open\n    and proc.name bogus x\n"
    finding = only_error(check(content))
    assert (finding.line, finding.column) == (7, 19)
    assert "expected a valid check operator" in finding.message


def test_condition_syntax_error_in_plain_and_quoted_scalars() -> None:
    plain = only_error(check(RULE_HEAD + "  condition: evt.type = open and and\n"))
    assert (plain.line, plain.column) == (5, 34)
    quoted = only_error(check(RULE_HEAD + "  condition: 'evt.type = open or (a'\n"))
    assert (quoted.line, quoted.column) == (5, 36)
    assert quoted.message == "condition syntax error: expected a ')' token"


def test_macro_syntax_error_names_the_macro() -> None:
    finding = only_error(check("- macro: m\n  condition: proc.name in\n"))
    assert (finding.item_kind, finding.item_name) == ("macro", "m")
    assert "expected a list '(...)' or a list name" in finding.message


def test_undefined_macro() -> None:
    content = RULE_HEAD + "  condition: >\n    spawned_process and not\n    my_allowed_procs\n"
    content += "- macro: spawned_process\n  condition: evt.type in (execve, execveat)\n"
    finding = only_error(check(content))
    assert finding.message == "undefined macro 'my_allowed_procs'"
    assert (finding.item_kind, finding.item_name, finding.line, finding.column) == ("rule", "R", 7, 5)


def test_list_name_used_as_macro_gets_a_hint() -> None:
    content = "- list: shells\n  items: [bash]\n" + RULE_HEAD + "  condition: shells\n"
    finding = only_error(check(content))
    assert finding.message == "undefined macro 'shells' ('shells' is a list; use it as 'field in (shells)')"


def test_undefined_list() -> None:
    content = RULE_HEAD + "  condition: proc.name in trusted_binaries\n"
    finding = only_error(check(content))
    assert finding.message == "undefined list 'trusted_binaries'"
    assert (finding.line, finding.column) == (5, 27)


def test_macro_cycle_is_reported() -> None:
    content = "- macro: a\n  condition: b\n- macro: b\n  condition: evt.num=1 or a\n"
    finding = only_error(check(content))
    assert "refers to itself" in finding.message and "a -> b -> a" in finding.message


def test_override_of_missing_rule() -> None:
    finding = only_error(check("- rule: Nope\n  priority: DEBUG\n  override:\n    priority: replace\n"))
    assert (finding.item_kind, finding.item_name) == ("rule", "Nope")
    assert "'override' of rule 'Nope', but no rule of that name is defined before it" in finding.message


def test_append_to_missing_macro() -> None:
    finding = only_error(check("- macro: user_known_x\n  condition: or proc.name=a\n  append: true\n"))
    assert (finding.item_kind, finding.item_name, finding.line) == ("macro", "user_known_x", 1)
    assert "'append: true' to macro 'user_known_x', but no macro of that name is defined" in finding.message


@pytest.mark.parametrize("priority", ["warn", "SEVERE", "0"])
def test_bad_priority(priority: str) -> None:
    content = "- rule: R\n  desc: d\n  condition: evt.num=1\n  output: o\n  priority: " + priority + "\n"
    finding = only_error(check(content))
    assert f"invalid priority '{priority}'" in finding.message
    assert (finding.line, finding.column) == (5, 13)


@pytest.mark.parametrize("priority", ["info", "INFO", "Informational", "debug", "Emergency", "notice"])
def test_priorities_are_case_insensitive_and_info_is_an_alias(priority: str) -> None:
    content = "- rule: R\n  desc: d\n  condition: evt.num=1\n  output: o\n  priority: " + priority + "\n"
    assert check(content) == []


def test_unknown_key() -> None:
    content = RULE_HEAD + "  condition: evt.num=1\n  severity: high\n"
    finding = only_error(check(content))
    assert finding.message.startswith("unknown key 'severity' (a rule item takes: append, capture")
    assert (finding.line, finding.column) == (6, 3)


def test_key_of_another_kind_is_a_warning() -> None:
    findings = check("- macro: m\n  condition: evt.num=1\n  output: hello\n")
    assert len(findings) == 1 and findings[0].severity == "warning"
    assert "key 'output' does not apply to a macro item" in findings[0].message


@pytest.mark.parametrize(
    ("key_line", "message"),
    [
        ("  enabled: sometimes\n", "key 'enabled' must be a boolean (true or false), not a string"),
        ("  tags: network\n", "key 'tags' must be a sequence of strings, not a string"),
        ("  capture_duration: long\n", "key 'capture_duration' must be a non-negative integer"),
        ("  exceptions: {name: x}\n", "key 'exceptions' must be a sequence, not a mapping"),
        ("  source: [a, b]\n", "key 'source' must be a string, not a sequence"),
    ],
)
def test_wrong_type_of_a_key(key_line: str, message: str) -> None:
    finding = only_error(check(RULE_HEAD + "  condition: evt.num=1\n" + key_line))
    assert message in finding.message
    assert finding.line == 6 and finding.item_name == "R"


def test_wrongly_typed_condition_does_not_cascade() -> None:
    finding = only_error(check(RULE_HEAD + "  condition: [evt.num=1]\n"))
    assert finding.message == "key 'condition' must be a string, not a sequence"


def test_missing_required_keys() -> None:
    finding = only_error(check("- rule: R\n  condition: evt.num=1\n"))
    assert finding.message == "rule is missing required key(s): output, desc, priority"
    assert "missing required key 'items'" in only_error(check("- list: l\n")).message
    assert "missing required key 'condition'" in only_error(check("- macro: m\n")).message


def test_unknown_item_kind() -> None:
    findings = errors(check("- rules: R\n  condition: x\n"))
    assert "unknown item: expected one of the keys rule, macro, list" in findings[0].message
    assert "found: condition, rules" in findings[0].message
    assert findings[1].message == "unknown key 'rules'" and len(findings) == 2


def test_empty_name() -> None:
    assert "'rule' must be a non-empty name" in only_error(check("- rule: ''\n")).message


EXCEPTION_CASES = [
    (
        "    - name: e\n      fields: [proc.name, fd.name]\n      comps: [=]\n",
        "exception 'e': 'comps' must be a sequence with one operator per field (2)",
    ),
    (
        "    - name: e\n      fields: [proc.name, fd.name]\n      values: [[a]]\n",
        "exception 'e': value #1 has 1 element(s) but 'fields' lists 2",
    ),
    (
        "    - name: e\n      fields: [proc.name, fd.name]\n      values: [a]\n",
        "exception 'e': value #1 must be a sequence of 2 element(s), one per field",
    ),
    (
        "    - name: e\n      fields: [proc.name, fd.name]\n      comps: [=, =]\n"
        "      values: [[a, [b, c]]]\n",
        "value #1 gives a sequence for comparison '='",
    ),
    ("    - name: e\n      fields: proc.name\n      comps: [in]\n", "'comps' must be a single operator"),
    ("    - name: e\n      values: [a]\n", "exception 'e' has no 'fields'"),
    ("    - fields: proc.name\n", "an exception needs a non-empty string 'name'"),
    ("    - name: e\n      fields: proc.name\n      comps: like\n", "'like' is not a comparison operator"),
    ("    - name: e\n      fields: [proc name]\n", "'proc name' is not a valid field name"),
    ("    - name: e\n      fields: proc.name\n      value: [a]\n", "unknown key 'value' in an exception"),
    ("    - name: e\n      fields: nope.name\n", "field 'nope.name' has an unknown field class"),
    ("    - just-a-string\n", "each exception must be a mapping, not a string"),
    (
        "    - name: e\n      fields: proc.name\n    - name: e\n      fields: fd.name\n",
        "exception 'e' is defined twice",
    ),
]


@pytest.mark.parametrize(("exceptions", "message"), EXCEPTION_CASES)
def test_malformed_exceptions(exceptions: str, message: str) -> None:
    content = RULE_HEAD + "  condition: evt.num=1\n  exceptions:\n" + exceptions
    finding = only_error(check(content))
    assert message in finding.message
    assert (finding.item_kind, finding.item_name) == ("rule", "R")
    assert finding.line >= 7


def test_well_formed_exceptions() -> None:
    content = RULE_HEAD + (
        "  condition: evt.num=1\n"
        "  exceptions:\n"
        "    - name: pairs\n"
        "      fields: [proc.name, fd.name]\n"
        "      comps: [=, in]\n"
        "      values:\n"
        "        - [bash, [/etc/passwd, /etc/shadow]]\n"
        "        - [sh, shell_files]\n"
        "    - name: single\n"
        "      fields: proc.pname\n"
        "      values: [sshd, cron]\n"
        "    - name: defaults\n"
        "      fields: [proc.name]\n"
    )
    assert check(content) == []


def test_output_with_bad_field() -> None:
    content = "- rule: R\n  desc: d\n  condition: evt.num=1\n  priority: INFO\n"
    content += '  output: "user=%user.name file=%fdx.name bad=% x"\n'
    findings = errors(check(content))
    messages = [f.message for f in findings]
    assert messages == [
        "output: unknown field '%fdx.name': no field class 'fdx' for source 'syscall'",
        "output: '%' is not a field reference (expected %class.field, e.g. %proc.name)",
    ]
    assert (findings[0].line, findings[0].column) == (5, 33)


def test_output_field_argument_syntax() -> None:
    base = "- rule: R\n  desc: d\n  condition: evt.num=1\n  priority: INFO\n  output: "
    assert check(base + "'%proc.aname[2] %evt.arg[0] 100%% %tolower(proc.name)'\n") == []
    assert "no closing ']'" in only_error(check(base + "'%proc.aname[2'\n")).message
    assert "is not a field reference" in only_error(check(base + "'%name'\n")).message


def test_plugin_sources_accept_any_field_class() -> None:
    content = (
        "- rule: R\n  desc: d\n  source: aws_cloudtrail\n  priority: INFO\n"
        "  condition: ct.name = CreateUser and json.value[/x] = y\n  output: '%ct.user %json.value[/a]'\n"
    )
    assert check(content) == []


def test_k8s_audit_source_field_classes() -> None:
    ok = (
        "- rule: R\n  desc: d\n  source: k8s_audit\n  priority: INFO\n"
        "  condition: ka.verb = create and jevt.value[/x] exists\n  output: '%ka.user.name %evt.time'\n"
    )
    assert check(ok) == []
    bad = ok.replace("ka.verb", "proc.name")
    finding = only_error(check(bad))
    assert "no field class 'proc' for source 'k8s_audit'" in finding.message


def test_unknown_condition_field_class_and_skip_if_unknown_filter() -> None:
    content = RULE_HEAD + "  condition: procx.name = a\n"
    finding = only_error(check(content))
    assert "unknown field 'procx.name': no field class 'procx' for source 'syscall'" in finding.message
    lenient = check(content + "  skip-if-unknown-filter: true\n")
    assert [f.severity for f in lenient] == ["warning"]


def test_unknown_field_class_in_macro_is_reported_on_the_macro() -> None:
    content = "- macro: m\n  condition: bogus.field = 1\n" + RULE_HEAD + "  condition: m\n"
    finding = only_error(check(content))
    assert (finding.item_kind, finding.item_name, finding.line) == ("macro", "m", 2)
    assert "used by rule 'R'" in finding.message


def test_required_engine_version_too_new() -> None:
    finding = only_error(check("- required_engine_version: 0.60.1\n", engine_version="0.57.0"))
    assert finding.item_kind == "required_engine_version"
    assert "requires engine version 0.60.1" in finding.message and "0.57.0" in finding.message
    assert (finding.line, finding.column) == (1, 28)


@pytest.mark.parametrize(
    ("required", "engine", "ok"),
    [
        ("0.57.0", "0.57.0", True),
        ("0.26.0", "0.57.0", True),
        ("17", "0.57.0", True),
        ("30", "26", False),
        ("0.31.0", "30", False),
        ("1.0.0", "0.99.9", False),
    ],
)
def test_required_engine_version_comparison(required: str, engine: str, ok: bool) -> None:
    findings = check(f"- required_engine_version: {required}\n", engine_version=engine)
    assert (findings == []) is ok, findings


def test_invalid_required_engine_version_and_engine_argument() -> None:
    assert (
        "invalid required_engine_version 'latest'"
        in only_error(check("- required_engine_version: latest\n")).message
    )
    finding = only_error(check("- list: l\n  items: [a]\n", engine_version="new"))
    assert finding.file == "<arguments>" and "engine version 'new'" in finding.message


def test_required_plugin_versions_structure() -> None:
    good = (
        "- required_plugin_versions:\n  - name: k8saudit\n    version: 0.7.0\n"
        "    alternatives:\n      - name: k8saudit-eks\n        version: 0.4.0\n"
    )
    assert check(good) == []
    bad = "- required_plugin_versions:\n  - name: k8saudit\n    versions: 1\n"
    messages = [f.message for f in errors(check(bad))]
    assert "unknown key 'versions' in a required plugin (expected: alternatives, name, version)" in messages
    assert "a required plugin needs a string 'version'" in messages


def test_messages_name_the_right_file_in_a_set() -> None:
    first = RulesFile("00-base.yaml", "- macro: m\n  condition: evt.num=1\n")
    second = RulesFile("10-custom.yaml", RULE_HEAD + "  condition: m and nope\n")
    finding = only_error(validate_rules([first, second]))
    assert finding.file == "10-custom.yaml" and finding.message == "undefined macro 'nope'"


def test_finding_str_formats() -> None:
    assert str(Finding("f.yaml", "rule", "X", 3, 4, "bad")) == "f.yaml:3:4: rule 'X': bad"
    assert str(Finding("f.yaml", "file", "", 0, 0, "gone")) == "f.yaml: gone"
    assert (
        str(Finding("f.yaml", "macro", "m", 1, 2, "meh", "warning")) == "f.yaml:1:2: warning: macro 'm': meh"
    )


def test_unknown_field_classes_are_warnings_when_a_plugin_may_provide_them() -> None:
    from falco_api.rules import RulesFile, validate_rules

    rule = (
        "- rule: Anomaly\n  desc: d\n  condition: evt.type = execve and anomaly.count_min_sketch > 5\n"
        "  output: odd (%anomaly.count_min_sketch)\n  priority: WARNING\n"
    )
    alone = validate_rules([RulesFile("a.yaml", rule)])
    assert [f.severity for f in alone] == ["error", "error"]
    with_plugin = validate_rules(
        [
            RulesFile(
                "a.yaml",
                "- required_plugin_versions:\n  - name: anomalydetection\n    version: 0.1.0\n" + rule,
            )
        ]
    )
    assert [f.severity for f in with_plugin] == ["warning", "warning"]
    with_container_only = validate_rules(
        [RulesFile("a.yaml", "- required_plugin_versions:\n  - name: container\n    version: 0.2.0\n" + rule)]
    )
    assert [f.severity for f in with_container_only] == ["error", "error"]
