"""Admission checks for FalcoRule and FalcoConfig (pure).

A FalcoRule is validated together with the set it would join: every other enabled
FalcoRule plus this one, in load order (order, then file name), because that is
how Falco loads them; an override or append of a rule that no FalcoRule defines is only visible
in the set. The project's validators (``falco_api.rules``, ``falco_api.configs``)
are used when importable; until then a structural fallback keeps admission useful.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from .desired import FalcoConfigSpec, FalcoRuleSpec, LabelSelector, SelectorError, load_order_key

RULE_ITEM_KINDS = ("rule", "macro", "list", "required_engine_version", "required_plugin_versions")


@dataclass(frozen=True)
class Finding:
    file: str
    message: str
    item: str = ""

    def __str__(self) -> str:
        where = f"{self.file}: {self.item}: " if self.item else f"{self.file}: "
        return where + self.message


def rules_join_order(others: Iterable[FalcoRuleSpec], candidate: FalcoRuleSpec) -> list[FalcoRuleSpec]:
    """The enabled set the candidate would be loaded in, candidate replacing its own old version."""
    members = [r for r in others if r.enabled and r.name != candidate.name]
    members.append(candidate)
    return sorted(members, key=lambda r: load_order_key(r.order, r.name))


def _project_rules_validator() -> Any | None:
    try:
        module = importlib.import_module("falco_api.rules")
    except ImportError:
        return None
    if hasattr(module, "RulesFile") and hasattr(module, "validate_rules"):
        return module
    return None


def _project_configs_validator() -> Any | None:
    try:
        module = importlib.import_module("falco_api.configs")
    except ImportError:
        return None
    return module if hasattr(module, "validate_config") else None


def _findings_from(result: Any, default_file: str) -> list[Finding]:
    """Adapt the project validator's result: an object with ``errors`` or an iterable of findings."""
    items = getattr(result, "errors", result)
    findings = []
    for item in items or ():
        if str(getattr(item, "severity", "error") or "error").lower() == "warning":
            continue
        kind, name = getattr(item, "item_kind", ""), getattr(item, "item_name", "")
        line = getattr(item, "line", 0)
        where = f"{kind} {name!r}" if kind or name else ""
        if line:
            where = f"{where} (line {line})".strip()
        findings.append(
            Finding(
                str(getattr(item, "file", "") or default_file), str(getattr(item, "message", item)), where
            )
        )
    return findings


def _structural_rules_check(members: Sequence[FalcoRuleSpec], only: str) -> list[Finding]:
    """Fallback: YAML shape, required keys, and append/override targets defined earlier in the set."""
    defined: dict[str, set[str]] = {"rule": set(), "macro": set(), "list": set()}
    findings: list[Finding] = []
    for member in members:
        try:
            items = yaml.safe_load(member.rules)
        except yaml.YAMLError as error:
            findings.append(Finding(member.name, f"not valid YAML: {error}"))
            continue
        if items is None:
            continue
        if not isinstance(items, list):
            findings.append(Finding(member.name, "a rules file must be a YAML sequence of items"))
            continue
        for index, item in enumerate(items, start=1):
            kinds = [k for k in RULE_ITEM_KINDS if isinstance(item, dict) and k in item]
            if len(kinds) != 1:
                findings.append(
                    Finding(
                        member.name, f"item {index} must have exactly one of {', '.join(RULE_ITEM_KINDS)}"
                    )
                )
                continue
            kind = kinds[0]
            if kind not in defined:
                continue
            name = str(item[kind])
            label = f"{kind} {name!r}"
            extends = bool(item.get("append")) or "override" in item
            if extends and name not in defined[kind]:
                findings.append(
                    Finding(
                        member.name,
                        f"overrides or appends to {kind} {name!r}, which no FalcoRule defines before it",
                        label,
                    )
                )
            if kind == "rule" and not extends and not set(item) <= {"rule", "enabled"}:
                missing = [k for k in ("condition", "output", "desc", "priority") if k not in item]
                if missing:
                    findings.append(
                        Finding(member.name, f"missing required key(s): {', '.join(missing)}", label)
                    )
            if (
                kind in ("macro", "list")
                and not extends
                and ("condition" if kind == "macro" else "items") not in item
            ):
                findings.append(
                    Finding(member.name, f"missing {'condition' if kind == 'macro' else 'items'}", label)
                )
            defined[kind].add(name)
    return [f for f in findings if f.file == only]


def validate_rule_in_set(candidate: FalcoRuleSpec, others: Iterable[FalcoRuleSpec]) -> list[Finding]:
    """Findings about ``candidate`` when loaded with the rest of the set (empty: acceptable)."""
    if not candidate.rules.strip():
        return [Finding(candidate.name, "spec.rules is empty")]
    members = rules_join_order(others, candidate)
    validator = _project_rules_validator()
    if validator is None:
        return _structural_rules_check(members, candidate.name)

    def run(subset: Sequence[FalcoRuleSpec]) -> list[Finding]:
        files = [validator.RulesFile(name=m.name, content=m.rules) for m in subset]
        return _findings_from(validator.validate_rules(files), candidate.name)

    # Blame the candidate for what its arrival adds: findings of the set with it that the set
    # without it does not have (the others were admitted already, possibly by an older validator).
    before = set(run([m for m in members if m.name != candidate.name]))
    return [f for f in run(members) if f not in before]


def validate_config(candidate: FalcoConfigSpec) -> list[Finding]:
    if not candidate.config:
        return [Finding(candidate.name, "spec.config is empty")]
    try:
        json.dumps(candidate.config)
    except (TypeError, ValueError) as error:
        return [Finding(candidate.name, f"spec.config is not plain JSON data: {error}")]
    validator = _project_configs_validator()
    if validator is None:
        bad_keys = [k for k in candidate.config if not isinstance(k, str) or not k]
        return [Finding(candidate.name, f"invalid top-level key {k!r}") for k in bad_keys]
    return _findings_from(validator.validate_config(dict(candidate.config)), candidate.name)


def validate_selector(raw: Mapping[str, Any] | None, file: str) -> list[Finding]:
    try:
        LabelSelector.from_dict(raw)
    except SelectorError as error:
        return [Finding(file, str(error))]
    return []


def admission_message(findings: Sequence[Finding], limit: int = 10) -> str:
    lines = [str(f) for f in findings[:limit]]
    if len(findings) > limit:
        lines.append(f"(+{len(findings) - limit} more)")
    return "; ".join(lines)
