"""Delegating to a (fake) Falco binary, and reading rules from disk."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from falco_api.rules import RulesFile, RulesLimits, parse_falco_verdict, validate_paths, validate_rules

from .helpers import RULE_HEAD

GOOD = RULE_HEAD + "  condition: evt.num=1\n"


def fake_falco(tmp_path: Path, stdout: str, exit_code: int = 0) -> str:
    """An executable that records its arguments and prints a canned verdict."""
    (tmp_path / "verdict.json").write_text(stdout)
    script = tmp_path / "falco"
    script.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" > "{tmp_path}/args.txt"\n'
        f'for a in "$@"; do case "$a" in *.yaml) cat "$a" >> "{tmp_path}/seen.txt";; esac; done\n'
        f'cat "{tmp_path}/verdict.json"\n'
        f"exit {exit_code}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def verdict(name_fragment: str, errors: list[dict[str, object]], warnings: list[dict[str, object]]) -> str:
    return json.dumps(
        {
            "falco_load_results": [
                {"name": name_fragment, "successful": not errors, "errors": errors, "warnings": warnings}
            ]
        }
    )


def test_falco_verdict_replaces_local_findings(tmp_path: Path) -> None:
    falco_error = {
        "code": "LOAD_ERR_COMPILE_CONDITION",
        "codedesc": "Error compiling condition",
        "message": "filter_check called with nonexistent field proc.nme",
        "context": {
            "locations": [
                {
                    "item_type": "rules content",
                    "item_name": "",
                    "position": {"name": "X", "line": 1, "column": 1},
                },
                {"item_type": "rule", "item_name": "R", "position": {"name": "X", "line": 5, "column": 14}},
            ]
        },
    }
    binary = fake_falco(
        tmp_path, "Falco version: 0.41\n" + verdict("X", [falco_error], []) + "\n", exit_code=1
    )
    findings = validate_rules([RulesFile("custom.yaml", GOOD)], falco_binary=binary)
    assert len(findings) == 1
    finding = findings[0]
    assert (finding.item_kind, finding.item_name, finding.line, finding.column) == ("rule", "R", 5, 14)
    assert finding.message == (
        "falco: filter_check called with nonexistent field proc.nme [LOAD_ERR_COMPILE_CONDITION]"
    )
    args = (tmp_path / "args.txt").read_text().splitlines()
    assert args[0] == "-V" and args[1].endswith("0000-custom.yaml")
    assert args[-2:] == ["-o", "json_output=true"]
    assert (tmp_path / "seen.txt").read_text() == GOOD


def test_falco_paths_map_back_to_caller_names(tmp_path: Path) -> None:
    binary = fake_falco(tmp_path, "{}")
    files = [RulesFile("a/base.yaml", GOOD), RulesFile("b/base.yaml", GOOD.replace("R", "S"))]
    assert validate_rules(files, falco_binary=binary) == []
    args = (tmp_path / "args.txt").read_text().splitlines()
    paths = [args[1], args[3]]
    names = {paths[0]: "a/base.yaml", paths[1]: "b/base.yaml"}
    warning = {
        "message": "unused macro",
        "context": {
            "locations": [
                {
                    "item_type": "macro",
                    "item_name": "m",
                    "position": {"name": paths[1], "line": 2, "column": 3},
                }
            ]
        },
    }
    findings = parse_falco_verdict(verdict(paths[1], [], [warning]), names, 0)
    assert [(f.file, f.severity, f.item_kind, f.item_name) for f in findings] == [
        ("b/base.yaml", "warning", "macro", "m")
    ]


def test_falco_clean_verdict(tmp_path: Path) -> None:
    binary = fake_falco(tmp_path, verdict("x", [], []))
    assert validate_rules([RulesFile("custom.yaml", GOOD)], falco_binary=binary) == []


def test_falco_failure_without_json(tmp_path: Path) -> None:
    binary = fake_falco(tmp_path, "Error: something broke\n", exit_code=1)
    findings = validate_rules([RulesFile("custom.yaml", GOOD)], falco_binary=binary)
    assert len(findings) == 1
    assert "falco exited with status 1 without a JSON verdict" in findings[0].message
    assert "something broke" in findings[0].message


def test_falco_unsuccessful_without_details(tmp_path: Path) -> None:
    binary = fake_falco(tmp_path, json.dumps({"falco_load_results": [{"name": "x", "successful": False}]}), 1)
    findings = validate_rules([RulesFile("custom.yaml", GOOD)], falco_binary=binary)
    assert [f.message for f in findings] == ["falco: rules file failed to load"]


def test_missing_falco_binary_is_a_finding(tmp_path: Path) -> None:
    findings = validate_rules([RulesFile("custom.yaml", GOOD)], falco_binary=str(tmp_path / "no-falco"))
    assert len(findings) == 1 and "cannot run falco" in findings[0].message


def test_files_refused_by_limits_never_reach_falco(tmp_path: Path) -> None:
    binary = fake_falco(tmp_path, verdict("x", [], []))
    findings = validate_rules(
        [RulesFile("big.yaml", GOOD)], falco_binary=binary, limits=RulesLimits(max_bytes=10)
    )
    assert len(findings) == 1 and "refused" in findings[0].message
    assert not (tmp_path / "args.txt").exists()


def test_validate_paths_reads_folders_alphabetically(tmp_path: Path) -> None:
    rules = tmp_path / "rules.d"
    rules.mkdir()
    (rules / "20-use.yml").write_text(RULE_HEAD + "  condition: base_macro\n")
    (rules / "10-base.yaml").write_text("- macro: base_macro\n  condition: evt.num=1\n")
    (rules / "00-override.yaml").write_text("- macro: base_macro\n  condition: or x\n  append: true\n")
    (rules / "notes.txt").write_text("not rules")
    findings = validate_paths([str(rules)])
    # 00-override loads first, before the macro exists.
    assert len(findings) == 1
    assert findings[0].file == str(rules / "00-override.yaml")
    assert "no macro of that name is defined before it" in findings[0].message
    os.remove(rules / "00-override.yaml")
    assert validate_paths([str(rules)]) == []


def test_validate_paths_reports_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    binary_file = tmp_path / "binary.yaml"
    binary_file.write_bytes(b"\xff\xfe\x00bad")
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    findings = validate_paths([str(missing), str(binary_file), str(good)])
    assert [f.file for f in findings] == [str(missing), str(binary_file)]
    assert "cannot read file" in findings[0].message
    assert "not UTF-8" in findings[1].message


def test_validate_paths_refuses_huge_files_without_reading(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with open(big, "wb") as handle:
        handle.truncate(5 * 1024 * 1024)
    findings = validate_paths([str(big)])
    assert len(findings) == 1 and "larger than the limit" in findings[0].message


@pytest.mark.parametrize(
    "content", ["- rule: [\n", "\x00\x01", "- - - -\n", "{a: [b, {c: d}]}\n", "- list: x\n  items:\n"]
)
def test_garbage_never_raises(content: str) -> None:
    findings = validate_rules([RulesFile("g.yaml", content)])
    assert findings and all(f.severity == "error" for f in findings)
