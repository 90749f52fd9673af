"""Admission checks for FalcoRule and FalcoConfig (pure).

A FalcoRule is validated together with the set it would join: every other enabled
FalcoRule plus this one, in load order (order, then file name), because that is
how Falco loads them; an override or append of a rule that no FalcoRule defines is only visible
in the set. The project's validators (``falco_api.rules``, ``falco_api.configs``) decide, the same ones
the sidecar runs before it writes anything.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from falco_api.configs import validate_dropin
from falco_api.rules import RulesFile, validate_rules

from .desired import FalcoConfigSpec, FalcoRuleSpec, LabelSelector, SelectorError, load_order_key


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


def validate_rule_in_set(candidate: FalcoRuleSpec, others: Iterable[FalcoRuleSpec]) -> list[Finding]:
    """Findings about ``candidate`` when loaded with the rest of the set (empty: acceptable)."""
    if not candidate.rules.strip():
        return [Finding(candidate.name, "spec.rules is empty")]
    members = rules_join_order(others, candidate)

    def run(subset: Sequence[FalcoRuleSpec]) -> list[Finding]:
        files = [RulesFile(name=m.name, content=m.rules) for m in subset]
        return _findings_from(validate_rules(files), candidate.name)

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
    # The sidecar's own check: Falco's config schema, and the keys the sidecar depends on.
    return _findings_from(validate_dropin(dict(candidate.config), file=candidate.name), candidate.name)


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
