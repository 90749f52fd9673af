"""Shared helpers for the rules validator tests."""

from __future__ import annotations

from pathlib import Path

from falco_api.rules import Finding, RulesFile, validate_rules

FIXTURES = Path(__file__).parent / "fixtures"
# CI checks the project out with shared/ beside it.
SHARED_CORPUS = Path(__file__).parents[2] / ".." / "shared" / "corpus"


def check(content: str, name: str = "custom.yaml", **kwargs: object) -> list[Finding]:
    return validate_rules([RulesFile(name, content)], **kwargs)  # type: ignore[arg-type]


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]


def only_error(findings: list[Finding]) -> Finding:
    errs = errors(findings)
    assert len(errs) == 1, "\n".join(str(f) for f in findings)
    return errs[0]


RULE_HEAD = """- rule: R
  desc: test rule
  priority: WARNING
  output: "x %proc.name"
"""
