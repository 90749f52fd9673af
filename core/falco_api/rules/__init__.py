"""The Falco rules validator shared by the sidecar, the admission webhook and the CLI.

    findings = validate_rules([RulesFile("custom.yaml", text)], engine_version="0.50.0")
    errors = [f for f in findings if f.severity == "error"]

Files are given in load order. Nothing here raises on bad input: every problem, including unreadable or
oversized files, comes back as a Finding.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .falcocheck import parse_falco_verdict, run_falco_validation
from .model import DefinedItems, Finding, RulesFile, Severity, has_errors
from .validate import defined_items, validate_rules_locally
from .yamlload import RulesLimits, load_rules_yaml

__all__ = [
    "DefinedItems",
    "Finding",
    "RulesFile",
    "RulesLimits",
    "Severity",
    "defined_items",
    "has_errors",
    "load_rules_yaml",
    "parse_falco_verdict",
    "read_rules_paths",
    "validate_paths",
    "validate_rules",
]

RULES_EXTENSIONS = (".yaml", ".yml")


def validate_rules(
    files: Sequence[RulesFile],
    *,
    engine_version: str | None = None,
    falco_binary: str | None = None,
    limits: RulesLimits = RulesLimits(),  # noqa: B008 - frozen dataclass, safe as a default
) -> list[Finding]:
    """Validate an ordered set of rules files; returns errors and warnings, never raises on bad input.

    With falco_binary, Falco's own verdict (`falco -V`) replaces this validator's, except for files this
    validator refuses for exceeding the limits, which are never handed to Falco.
    """
    try:
        findings, refused = validate_rules_locally(files, engine_version, limits)
    except Exception as exc:  # a bug here must surface as a finding, not take down the caller
        name = files[0].name if files else "<none>"
        return [Finding(name, "file", "", 0, 0, f"internal validator error: {type(exc).__name__}: {exc}")]
    if falco_binary is None or refused:
        return findings
    return run_falco_validation(files, falco_binary)


def read_rules_paths(
    paths: Sequence[str],
    *,
    limits: RulesLimits = RulesLimits(),  # noqa: B008
) -> tuple[list[RulesFile], list[Finding]]:
    """Read files (a folder contributes its .yaml/.yml files in alphabetical order, like Falco)."""
    files: list[RulesFile] = []
    findings: list[Finding] = []
    for path in paths:
        if os.path.isdir(path):
            try:
                entries = sorted(os.listdir(path))
            except OSError as exc:
                findings.append(Finding(path, "file", "", 0, 0, f"cannot list folder: {exc.strerror or exc}"))
                continue
            candidates = [
                os.path.join(path, e)
                for e in entries
                if e.endswith(RULES_EXTENSIONS) and os.path.isfile(os.path.join(path, e))
            ]
        else:
            candidates = [path]
        for candidate in candidates:
            try:
                size = os.path.getsize(candidate)
                if size > limits.max_bytes:
                    findings.append(
                        Finding(
                            candidate,
                            "file",
                            "",
                            0,
                            0,
                            f"refused: file is {size} bytes, larger than the limit of "
                            f"{limits.max_bytes} bytes",
                        )
                    )
                    continue
                with open(candidate, encoding="utf-8") as handle:
                    files.append(RulesFile(candidate, handle.read()))
            except UnicodeDecodeError as exc:
                findings.append(Finding(candidate, "file", "", 0, 0, f"not UTF-8 text: {exc.reason}"))
            except OSError as exc:
                findings.append(
                    Finding(candidate, "file", "", 0, 0, f"cannot read file: {exc.strerror or exc}")
                )
    return files, findings


def validate_paths(
    paths: Sequence[str],
    *,
    engine_version: str | None = None,
    falco_binary: str | None = None,
    limits: RulesLimits = RulesLimits(),  # noqa: B008
) -> list[Finding]:
    """validate_rules for files on disk; unreadable files are reported as findings."""
    files, findings = read_rules_paths(paths, limits=limits)
    if not files:
        return findings
    return findings + validate_rules(
        files, engine_version=engine_version, falco_binary=falco_binary, limits=limits
    )
