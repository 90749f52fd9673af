"""Validation of an ordered set of Falco rules files, the way Falco's rule loader reads them.

Loading happens in two phases, like Falco's: first every file is read in order, item by item, building the
final state of each rule, macro and list (appends and overrides must target something already defined
earlier in the order); then macros and lists are resolved against that final state (so a macro may be
used before its definition) and every condition is parsed exactly once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .condition import (
    LIST_OPERATORS,
    NUMERIC_OPERATORS,
    STRING_OPERATORS,
    ConditionRefs,
    ConditionSyntaxError,
    collect_refs,
    parse_condition,
)
from .fields import KNOWN_FIELD_PLUGINS, known_classes, parse_output
from .model import DefinedItems, Finding, RulesFile, Severity
from .yamlload import (
    RulesLimits,
    SourceText,
    YamlLimitError,
    YamlSyntaxError,
    load_rules_yaml,
    mark_position,
)

ITEM_KINDS = ("rule", "macro", "list", "required_engine_version", "required_plugin_versions")

RULE_KEYS = frozenset(
    {
        "rule",
        "condition",
        "output",
        "desc",
        "priority",
        "source",
        "tags",
        "enabled",
        "exceptions",
        "override",
        "append",
        "warn_evttypes",
        "skip-if-unknown-filter",
        "capture",
        "capture_duration",
    }
)
MACRO_KEYS = frozenset({"macro", "condition", "append", "override"})
LIST_KEYS = frozenset({"list", "items", "append", "override"})
KIND_KEYS: dict[str, frozenset[str]] = {
    "rule": RULE_KEYS,
    "macro": MACRO_KEYS,
    "list": LIST_KEYS,
    "required_engine_version": frozenset({"required_engine_version"}),
    "required_plugin_versions": frozenset({"required_plugin_versions"}),
}
# Every key falco-rules.schema.json allows on an item; anything else is refused.
SCHEMA_KEYS = frozenset().union(*KIND_KEYS.values()) | {"items"}

PRIORITIES = {
    "emergency": "Emergency",
    "alert": "Alert",
    "critical": "Critical",
    "error": "Error",
    "warning": "Warning",
    "notice": "Notice",
    "informational": "Informational",
    "info": "Informational",
    "debug": "Debug",
}

STRING_KEYS = frozenset({"condition", "output", "desc", "source", "priority"})
BOOL_KEYS = frozenset({"enabled", "append", "warn_evttypes", "skip-if-unknown-filter", "capture"})

OVERRIDE_APPEND = {
    "rule": frozenset({"condition", "output", "desc", "tags", "exceptions"}),
    "macro": frozenset({"condition"}),
    "list": frozenset({"items"}),
}
OVERRIDE_REPLACE = {
    "rule": frozenset(
        {
            "condition",
            "output",
            "desc",
            "priority",
            "tags",
            "exceptions",
            "enabled",
            "warn_evttypes",
            "skip-if-unknown-filter",
            "capture",
            "capture_duration",
        }
    ),
    "macro": frozenset({"condition"}),
    "list": frozenset({"items"}),
}
# What the deprecated `append: true` can extend on a rule.
LEGACY_APPEND_RULE_KEYS = frozenset({"condition", "output", "desc", "tags", "exceptions"})

EXCEPTION_KEYS = frozenset({"name", "fields", "comps", "values"})
EXCEPTION_OPERATORS = frozenset(NUMERIC_OPERATORS + STRING_OPERATORS + LIST_OPERATORS)
_EXCEPTION_FIELD = re.compile(r"[a-zA-Z]+[a-zA-Z0-9_]*(?:\.[a-zA-Z]+[a-zA-Z0-9_]*)+(?:\[[^\]]+\])?")
_SEMVER = re.compile(r"(\d+)\.(\d+)\.(\d+)(?:[-+].*)?")


# --- internal state --------------------------------------------------------------------------------


@dataclass
class Origin:
    """Where an item came from, so that every message can name file, item and position."""

    file: str
    source: SourceText
    kind: str
    name: str
    line: int
    column: int


@dataclass
class TextPart:
    """A piece of a condition or output; appends join pieces from different items with a space."""

    text: str
    origin: Origin
    node: ScalarNode | None


@dataclass
class ExceptionState:
    name: str
    fields: str | list[str]
    comps: str | list[str]


@dataclass
class RuleState:
    origin: Origin
    condition: list[TextPart]
    output: list[TextPart]
    source: str
    skip_unknown: bool
    exceptions: dict[str, ExceptionState] = field(default_factory=dict)


@dataclass
class MacroState:
    origin: Origin
    condition: list[TextPart]


@dataclass
class ListState:
    origin: Origin
    items: list[str]


@dataclass
class ParsedCondition:
    refs: ConditionRefs | None
    text: str
    parts: list[TextPart]


# Stands in for the value of a key whose type was wrong, so later checks neither use it nor call it missing.
_MISTYPED = object()


def parse_version(text: str) -> tuple[int, int, int] | None:
    """Semver 'X.Y.Z', or the legacy single integer N that Falco reads as 0.N.0."""
    text = text.strip()
    if text.isdigit():
        return (0, int(text), 0)
    match = _SEMVER.fullmatch(text)
    if match is None:
        return None
    return (int(match.group(1)), int(match.group(2)), int(match.group(3)))


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "sequence"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


class _Loader:
    def __init__(self, engine_version: str | None, limits: RulesLimits) -> None:
        self.findings: list[Finding] = []
        self.limits = limits
        self.engine: tuple[int, int, int] | None = None
        self.engine_text = engine_version
        if engine_version is not None:
            self.engine = parse_version(str(engine_version))
            if self.engine is None:
                self.findings.append(
                    Finding(
                        "<arguments>",
                        "engine_version",
                        "",
                        0,
                        0,
                        f"engine version '{engine_version}' is neither semver (e.g. 0.50.0) nor an integer",
                    )
                )
        self.rules: dict[str, RuleState] = {}
        self.macros: dict[str, MacroState] = {}
        self.lists: dict[str, ListState] = {}
        self.refused_by_limits = False
        self._reported_macro_fields: set[tuple[str, int, str]] = set()
        # Plugins the set requires: one that is not among those whose fields are known here may add
        # field classes to the built-in sources, so unknown classes are only warned about then.
        self.required_plugins: set[str] = set()

    # --- reporting ---------------------------------------------------------------------------------

    def report(
        self,
        origin: Origin,
        message: str,
        node: Node | None = None,
        severity: Severity = "error",
        position: tuple[int, int] | None = None,
    ) -> None:
        if position is None:
            position = mark_position(node) if node is not None else (origin.line, origin.column)
        self.findings.append(
            Finding(origin.file, origin.kind, origin.name, position[0], position[1], message, severity)
        )

    def report_in_text(
        self, parts: list[TextPart], offset: int, message: str, what: str, severity: Severity = "error"
    ) -> None:
        """Report at a character offset of text assembled from parts (joined by single spaces)."""
        start = 0
        for index, part in enumerate(parts):
            end = start + len(part.text)
            last = index == len(parts) - 1
            if offset <= end or last:
                local = max(0, min(offset - start, len(part.text)))
                position = (part.origin.line, part.origin.column)
                if part.node is not None:
                    mapping = part.origin.source.scalar_offset_map(part.node)
                    if mapping:
                        index_in_file = mapping[min(local, len(mapping) - 1)]
                        if local >= len(mapping):
                            index_in_file += 1
                        position = part.origin.source.position(index_in_file)
                    else:
                        position = mark_position(part.node)
                suffix = ""
                if part.origin is not parts[0].origin:
                    suffix = f" (in the {what} appended at {part.origin.file}:{part.origin.line})"
                self.report(parts[0].origin, message + suffix, position=position, severity=severity)
                return
            start = end + 1

    # --- phase 1: reading items --------------------------------------------------------------------

    def load_file(self, rules_file: RulesFile) -> None:
        source = SourceText(rules_file.content)
        file_origin = Origin(rules_file.name, source, "file", "", 0, 0)
        try:
            document = load_rules_yaml(rules_file.content, self.limits)
        except YamlLimitError as exc:
            self.refused_by_limits = True
            self.report(file_origin, f"refused: {exc.message}", position=(exc.line, exc.column))
            return
        except YamlSyntaxError as exc:
            self.report(file_origin, exc.message, position=(exc.line, exc.column))
            return
        root = document.root
        if root is None:
            return
        if not isinstance(root, SequenceNode) or not isinstance(document.data, list):
            self.report(
                file_origin,
                "a rules file must be a YAML sequence of items (- rule: ..., - macro: ..., - list: ...), "
                f"not a {_type_name(document.data)}",
                node=root,
            )
            return
        for item_node, item in zip(root.value, document.data, strict=True):
            self.load_item(rules_file.name, source, item_node, item)

    def load_item(self, file_name: str, source: SourceText, node: Node, item: Any) -> None:
        line, col = mark_position(node)
        origin = Origin(file_name, source, "item", "", line, col)
        if not isinstance(node, MappingNode) or not isinstance(item, dict):
            self.report(origin, f"an item must be a mapping, not a {_type_name(item)}")
            return
        entries: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self.report(origin, "item keys must be plain strings", node=key_node)
                continue
            key = str(key_node.value)
            if key in entries:
                self.report(
                    origin,
                    f"duplicate key '{key}' in the item; only its last value is used",
                    node=key_node,
                    severity="warning",
                )
            entries[key] = (key_node, value_node)

        kinds = [k for k in ITEM_KINDS if k in entries]
        if not kinds:
            unknown = sorted(entries)
            self.report(
                origin,
                "unknown item: expected one of the keys rule, macro, list, required_engine_version, "
                f"required_plugin_versions (found: {', '.join(unknown) or 'none'})",
            )
            for key in unknown:
                if key not in SCHEMA_KEYS:
                    self.report(origin, f"unknown key '{key}'", node=entries[key][0])
            return
        kind = kinds[0]
        origin.kind = kind
        if len(kinds) > 1:
            self.report(
                origin, f"an item cannot be both a {kind} and a {kinds[1]}", node=entries[kinds[1]][0]
            )
            return
        if kind in ("rule", "macro", "list"):
            name_value = item.get(kind)
            name_node = entries[kind][1]
            if not isinstance(name_node, ScalarNode) or name_value is None or str(name_node.value) == "":
                self.report(origin, f"'{kind}' must be a non-empty name", node=name_node)
                return
            origin.name = str(name_node.value)

        allowed = KIND_KEYS[kind]
        valid: dict[str, tuple[Node, Node]] = {}
        for key, (key_node, value_node) in entries.items():
            if key not in SCHEMA_KEYS:
                expected = ", ".join(sorted(allowed))
                self.report(origin, f"unknown key '{key}' (a {kind} item takes: {expected})", node=key_node)
            elif key not in allowed:
                self.report(
                    origin,
                    f"key '{key}' does not apply to a {kind} item; Falco ignores it",
                    node=key_node,
                    severity="warning",
                )
            else:
                valid[key] = (key_node, value_node)

        values = {key: item.get(key) for key in valid}
        bad_keys = self.check_types(origin, valid, values)
        if any(k in bad_keys for k in (kind, "override", "append")):
            return
        for bad_key in bad_keys:
            # Keep validating the rest of the item; the key's own error is already reported.
            del valid[bad_key]
            values[bad_key] = _MISTYPED
        if kind == "rule":
            self.load_rule(origin, valid, values)
        elif kind == "macro":
            self.load_macro(origin, valid, values)
        elif kind == "list":
            self.load_list(origin, valid, values)
        elif kind == "required_engine_version":
            self.load_engine_version(origin, valid, values)
        else:
            self.load_plugin_versions(origin, valid, values)

    def check_types(
        self, origin: Origin, entries: dict[str, tuple[Node, Node]], values: dict[str, Any]
    ) -> list[str]:
        """Report keys whose value has the wrong type; returns those keys."""
        bad: list[str] = []
        for key, (_, value_node) in entries.items():
            value = values[key]
            problem: str | None = None
            if key in STRING_KEYS or (key == origin.kind and key in ("rule", "macro", "list")):
                if not isinstance(value_node, ScalarNode) or value is None:
                    problem = "a string"
            elif key in BOOL_KEYS:
                if not isinstance(value, bool):
                    problem = "a boolean (true or false)"
            elif key == "capture_duration":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    problem = "a non-negative integer (milliseconds)"
            elif key in ("tags", "items"):
                # Scalars are taken as written (yaml-cpp does not turn `yes` or `1.10` into other types).
                if not isinstance(value_node, SequenceNode) or not all(
                    isinstance(v, ScalarNode) for v in value_node.value
                ):
                    problem = "a sequence of strings"
                else:
                    values[key] = [str(v.value) for v in value_node.value]
            elif key == "exceptions" or key == "required_plugin_versions":
                if not isinstance(value, list):
                    problem = "a sequence"
            elif key == "override":
                if not isinstance(value, dict) or not value:
                    problem = "a non-empty mapping of key: append|replace"
            elif key == "required_engine_version" and (
                not isinstance(value_node, ScalarNode) or value is None or isinstance(value, bool)
            ):
                problem = "a version string (e.g. 0.50.0)"
            if problem is not None:
                self.report(
                    origin, f"key '{key}' must be {problem}, not a {_type_name(value)}", node=value_node
                )
                bad.append(key)
        return bad

    def text_part(self, origin: Origin, entries: dict[str, tuple[Node, Node]], key: str) -> TextPart:
        node = entries[key][1]
        assert isinstance(node, ScalarNode)
        return TextPart(str(node.value), origin, node)

    def text_parts(self, origin: Origin, entries: dict[str, tuple[Node, Node]], key: str) -> list[TextPart]:
        """The key's text as a one-part list, or no parts when the key was mistyped (already reported)."""
        return [self.text_part(origin, entries, key)] if key in entries else []

    def override_modes(
        self, origin: Origin, entries: dict[str, tuple[Node, Node]], values: dict[str, Any]
    ) -> dict[str, str] | None:
        """Validate `override` against the item's keys; the mode per key, or None if unusable."""
        kind = origin.kind
        override_node = entries["override"][1]
        raw = values["override"]
        if values.get("append") is True:
            self.report(origin, "'override' and 'append: true' cannot be used together", node=override_node)
            return None
        modes: dict[str, str] = {}
        override_entries = {}
        if isinstance(override_node, MappingNode):
            override_entries = {str(k.value): (k, v) for k, v in override_node.value}
        ok = True
        for key, mode in raw.items():
            key_text = str(key)
            key_node = override_entries.get(key_text, (override_node, override_node))[0]
            if mode not in ("append", "replace"):
                self.report(
                    origin,
                    f"override of '{key_text}' must be 'append' or 'replace', not '{mode}'",
                    node=override_entries.get(key_text, (override_node, override_node))[1],
                )
                ok = False
                continue
            allowed = OVERRIDE_APPEND[kind] if mode == "append" else OVERRIDE_REPLACE[kind]
            if key_text not in allowed:
                self.report(
                    origin,
                    f"key '{key_text}' cannot be overridden with '{mode}' on a {kind} "
                    f"(allowed: {', '.join(sorted(allowed))})",
                    node=key_node,
                )
                ok = False
                continue
            if key_text not in entries:
                self.report(
                    origin,
                    f"'override' names '{key_text}' but the item has no '{key_text}' key",
                    node=key_node,
                )
                ok = False
                continue
            modes[key_text] = mode
        for key, (key_node, _) in entries.items():
            if key not in (kind, "override") and key not in raw:
                self.report(
                    origin,
                    f"key '{key}' needs an entry in 'override' (append or replace) to change the existing "
                    f"{kind}",
                    node=key_node,
                )
                ok = False
        return modes if ok else None

    def missing_target(self, origin: Origin, how: str) -> None:
        self.report(
            origin,
            f"{how} {origin.kind} '{origin.name}', but no {origin.kind} of that name is defined before it "
            "(it must come earlier in this file or in an earlier file)",
        )

    # rules

    def load_rule(
        self, origin: Origin, entries: dict[str, tuple[Node, Node]], values: dict[str, Any]
    ) -> None:
        name = origin.name
        priority = values.get("priority")
        if "priority" in entries and str(priority).lower() not in PRIORITIES:
            self.report(
                origin,
                f"invalid priority '{priority}' (expected one of: Emergency, Alert, Critical, Error, "
                "Warning, Notice, Informational (or Info), Debug; case-insensitive)",
                node=entries["priority"][1],
            )
        if "override" in entries:
            modes = self.override_modes(origin, entries, values)
            target = self.rules.get(name)
            if target is None:
                self.missing_target(origin, "'override' of")
                return
            if modes is None:
                return
            self.apply_rule_changes(origin, target, entries, values, modes)
            return
        if values.get("append") is True:
            target = self.rules.get(name)
            if target is None:
                self.missing_target(origin, "'append: true' to")
                return
            modes = {}
            for key, (key_node, _) in entries.items():
                if key in ("rule", "append"):
                    continue
                if key not in LEGACY_APPEND_RULE_KEYS:
                    self.report(
                        origin,
                        f"key '{key}' cannot be appended to a rule (appendable: "
                        f"{', '.join(sorted(LEGACY_APPEND_RULE_KEYS))}); use 'override' with 'replace'",
                        node=key_node,
                    )
                    continue
                modes[key] = "append"
            self.apply_rule_changes(origin, target, entries, values, modes)
            return
        if set(entries) <= {"rule", "enabled", "append"} and "enabled" in entries:
            # The legacy short form that only switches an existing rule on or off.
            if name not in self.rules:
                self.missing_target(origin, "'enabled' change of")
            return
        missing = [k for k in ("condition", "output", "desc", "priority") if k not in values]
        if missing:
            self.report(origin, f"rule is missing required key(s): {', '.join(missing)}")
            return
        source = str(values.get("source") or "syscall") if "source" in entries else "syscall"
        state = RuleState(
            origin=origin,
            condition=self.text_parts(origin, entries, "condition"),
            output=self.text_parts(origin, entries, "output"),
            source=source,
            skip_unknown=bool(values.get("skip-if-unknown-filter", False)),
        )
        if "exceptions" in entries:
            self.load_exceptions(
                origin, state, entries["exceptions"][1], values["exceptions"], appending=False
            )
        self.rules[name] = state

    def apply_rule_changes(
        self,
        origin: Origin,
        target: RuleState,
        entries: dict[str, tuple[Node, Node]],
        values: dict[str, Any],
        modes: dict[str, str],
    ) -> None:
        for key, mode in modes.items():
            if key in ("condition", "output"):
                part = self.text_part(origin, entries, key)
                parts = target.condition if key == "condition" else target.output
                if mode == "append":
                    parts.append(part)
                else:
                    parts[:] = [part]
            elif key == "exceptions":
                if mode == "replace":
                    target.exceptions = {}
                self.load_exceptions(
                    origin, target, entries[key][1], values[key], appending=(mode == "append")
                )
            elif key == "skip-if-unknown-filter":
                target.skip_unknown = bool(values[key])

    def load_exceptions(
        self, origin: Origin, rule: RuleState, node: Node, value: list[Any], *, appending: bool
    ) -> None:
        assert isinstance(node, SequenceNode)
        seen: set[str] = set()
        for exc_node, exc in zip(node.value, value, strict=True):
            if not isinstance(exc_node, MappingNode) or not isinstance(exc, dict):
                self.report(
                    origin, f"each exception must be a mapping, not a {_type_name(exc)}", node=exc_node
                )
                continue
            exc_entries: dict[str, tuple[Node, Node]] = {
                str(k.value): (k, v) for k, v in exc_node.value if isinstance(k, ScalarNode)
            }
            for key, (key_node, _) in exc_entries.items():
                if key not in EXCEPTION_KEYS:
                    self.report(
                        origin,
                        f"unknown key '{key}' in an exception (expected: name, fields, comps, values)",
                        node=key_node,
                    )
            exc_name = exc.get("name")
            if not isinstance(exc_name, str) or not exc_name:
                self.report(origin, "an exception needs a non-empty string 'name'", node=exc_node)
                continue
            label = f"exception '{exc_name}'"
            if exc_name in seen:
                self.report(origin, f"{label} is defined twice in the same item", node=exc_node)
                continue
            seen.add(exc_name)
            existing = rule.exceptions.get(exc_name) if appending else None
            if existing is not None:
                fields_value: Any = exc.get("fields", existing.fields)
                comps_value: Any = exc.get("comps", existing.comps)
                if "fields" in exc and exc["fields"] != existing.fields:
                    self.report(
                        origin,
                        f"{label} already exists; an append may only add 'values', not change 'fields'",
                        node=exc_entries["fields"][1],
                    )
                    continue
            else:
                if "fields" not in exc:
                    self.report(origin, f"{label} has no 'fields'", node=exc_node)
                    continue
                fields_value = exc["fields"]
                comps_value = exc.get("comps")
            state = self.check_exception_shape(origin, rule, label, exc_entries, fields_value, comps_value)
            if state is None:
                continue
            if "values" in exc:
                self.check_exception_values(origin, label, exc_entries["values"][1], exc["values"], state)
            rule.exceptions[exc_name] = state

    def check_exception_shape(
        self,
        origin: Origin,
        rule: RuleState,
        label: str,
        entries: dict[str, tuple[Node, Node]],
        fields_value: Any,
        comps_value: Any,
    ) -> ExceptionState | None:
        fields_node = entries["fields"][1] if "fields" in entries else None
        comps_node = entries["comps"][1] if "comps" in entries else fields_node
        names: list[str]
        if isinstance(fields_value, str):
            names = [fields_value]
        elif (
            isinstance(fields_value, list) and fields_value and all(isinstance(f, str) for f in fields_value)
        ):
            names = list(fields_value)
        else:
            self.report(
                origin,
                f"{label}: 'fields' must be a field name or a non-empty sequence of field names",
                node=fields_node,
            )
            return None
        ok = True
        classes = known_classes(rule.source)
        for name in names:
            if _EXCEPTION_FIELD.fullmatch(name) is None:
                self.report(origin, f"{label}: '{name}' is not a valid field name", node=fields_node)
                ok = False
            elif classes is not None and name.split(".", 1)[0] not in classes:
                severity = self.unknown_class_severity(rule)
                self.report(
                    origin,
                    f"{label}: field '{name}' has an unknown field class for source '{rule.source}'",
                    node=fields_node,
                    severity=severity,
                )
                ok = ok and severity == "warning"
        comps: str | list[str]
        if isinstance(fields_value, str):
            comps = "in" if comps_value is None else comps_value
            if not isinstance(comps, str):
                self.report(
                    origin,
                    f"{label}: 'fields' is a single field, so 'comps' must be a single operator",
                    node=comps_node,
                )
                return None
            comp_list = [comps]
        else:
            comps = ["="] * len(names) if comps_value is None else comps_value
            if not isinstance(comps, list) or len(comps) != len(names):
                self.report(
                    origin,
                    f"{label}: 'comps' must be a sequence with one operator per field ({len(names)})",
                    node=comps_node,
                )
                return None
            comp_list = [str(c) for c in comps]
        for comp in comp_list:
            if comp not in EXCEPTION_OPERATORS:
                self.report(
                    origin,
                    f"{label}: '{comp}' is not a comparison operator "
                    f"(one of: {', '.join(sorted(EXCEPTION_OPERATORS))})",
                    node=comps_node,
                )
                ok = False
        if not ok:
            return None
        return ExceptionState(label, fields_value, comps)

    def check_exception_values(
        self, origin: Origin, label: str, node: Node, values: Any, state: ExceptionState
    ) -> None:
        if not isinstance(values, list) or not isinstance(node, SequenceNode):
            self.report(origin, f"{label}: 'values' must be a sequence", node=node)
            return
        if isinstance(state.fields, str):
            for value_node, value in zip(node.value, values, strict=True):
                if isinstance(value, dict) or value is None:
                    self.report(
                        origin,
                        f"{label}: each value must be a string (or a sequence for 'in')",
                        node=value_node,
                    )
            return
        assert isinstance(state.comps, list)
        width = len(state.fields)
        for index, (value_node, value) in enumerate(zip(node.value, values, strict=True), start=1):
            if not isinstance(value, list) or not isinstance(value_node, SequenceNode):
                self.report(
                    origin,
                    f"{label}: value #{index} must be a sequence of {width} element(s), one per field",
                    node=value_node,
                )
                continue
            if len(value) != width:
                self.report(
                    origin,
                    f"{label}: value #{index} has {len(value)} element(s) but 'fields' lists {width}",
                    node=value_node,
                )
                continue
            for element_node, element, comp in zip(value_node.value, value, state.comps, strict=True):
                if isinstance(element, list):
                    if comp not in LIST_OPERATORS:
                        self.report(
                            origin,
                            f"{label}: value #{index} gives a sequence for comparison '{comp}', which takes "
                            "a single value (only in, intersects, pmatch take sequences)",
                            node=element_node,
                        )
                elif isinstance(element, dict) or element is None:
                    self.report(
                        origin,
                        f"{label}: value #{index} has an element that is not a string",
                        node=element_node,
                    )

    # macros and lists

    def load_macro(
        self, origin: Origin, entries: dict[str, tuple[Node, Node]], values: dict[str, Any]
    ) -> None:
        name = origin.name
        if "override" in entries or values.get("append") is True:
            how = "'override' of" if "override" in entries else "'append: true' to"
            modes = self.override_modes(origin, entries, values) if "override" in entries else None
            target = self.macros.get(name)
            if target is None:
                self.missing_target(origin, how)
                return
            if "override" not in entries:
                modes = {"condition": "append"} if "condition" in entries else {}
                if "condition" not in entries:
                    self.report(origin, "'append: true' on a macro needs a 'condition' to append")
            if modes is None:
                return
            if "condition" in modes:
                part = self.text_part(origin, entries, "condition")
                if modes["condition"] == "append":
                    target.condition.append(part)
                else:
                    target.condition = [part]
            return
        if "condition" not in values:
            self.report(origin, "macro is missing required key 'condition'")
            return
        self.macros[name] = MacroState(origin, self.text_parts(origin, entries, "condition"))

    def load_list(
        self, origin: Origin, entries: dict[str, tuple[Node, Node]], values: dict[str, Any]
    ) -> None:
        name = origin.name
        if "items" not in values:
            self.report(origin, "list is missing required key 'items'")
            return
        if "items" not in entries:
            self.lists.setdefault(name, ListState(origin, []))
            return
        items = [str(v) for v in values["items"]]
        if "override" in entries or values.get("append") is True:
            how = "'override' of" if "override" in entries else "'append: true' to"
            modes = (
                self.override_modes(origin, entries, values) if "override" in entries else {"items": "append"}
            )
            target = self.lists.get(name)
            if target is None:
                self.missing_target(origin, how)
                return
            if modes is None:
                return
            if modes.get("items") == "replace":
                target.items = items
            else:
                target.items.extend(items)
            return
        self.lists[name] = ListState(origin, items)

    # versions

    def load_engine_version(
        self, origin: Origin, entries: dict[str, tuple[Node, Node]], values: dict[str, Any]
    ) -> None:
        node = entries["required_engine_version"][1]
        assert isinstance(node, ScalarNode)
        text = str(node.value)
        origin.name = text
        required = parse_version(text)
        if required is None:
            self.report(
                origin,
                f"invalid required_engine_version '{text}' (expected semver like 0.50.0 or an integer)",
                node=node,
            )
            return
        if self.engine is not None and required > self.engine:
            self.report(
                origin,
                f"the file requires engine version {'.'.join(map(str, required))} (written '{text}'), newer "
                f"than this Falco's engine version {'.'.join(map(str, self.engine))} "
                f"(given as '{self.engine_text}')",
                node=node,
            )

    def load_plugin_versions(
        self, origin: Origin, entries: dict[str, tuple[Node, Node]], values: dict[str, Any]
    ) -> None:
        node = entries["required_plugin_versions"][1]
        assert isinstance(node, SequenceNode)
        for entry_node, entry in zip(node.value, values["required_plugin_versions"], strict=True):
            self.check_plugin_requirement(origin, entry_node, entry, allow_alternatives=True)
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                self.required_plugins.add(entry["name"])

    def unknown_class_severity(self, rule: RuleState) -> Severity:
        if rule.skip_unknown or self.required_plugins - KNOWN_FIELD_PLUGINS:
            return "warning"
        return "error"

    def check_plugin_requirement(
        self, origin: Origin, node: Node, entry: Any, *, allow_alternatives: bool
    ) -> None:
        what = "a required plugin" if allow_alternatives else "an alternative plugin"
        if not isinstance(entry, dict) or not isinstance(node, MappingNode):
            self.report(origin, f"{what} must be a mapping with 'name' and 'version'", node=node)
            return
        allowed = {"name", "version", "alternatives"} if allow_alternatives else {"name", "version"}
        for key_node, _ in node.value:
            if str(key_node.value) not in allowed:
                self.report(
                    origin,
                    f"unknown key '{key_node.value}' in {what} (expected: {', '.join(sorted(allowed))})",
                    node=key_node,
                )
        for key in ("name", "version"):
            if not isinstance(entry.get(key), str) or not entry.get(key):
                self.report(origin, f"{what} needs a string '{key}'", node=node)
        if isinstance(entry.get("version"), str) and parse_version(entry["version"]) is None:
            self.report(origin, f"plugin version '{entry['version']}' is not semver (e.g. 0.4.0)", node=node)
        alternatives = entry.get("alternatives")
        if allow_alternatives and alternatives is not None:
            alt_node = next(v for k, v in node.value if str(k.value) == "alternatives")
            if not isinstance(alternatives, list) or not isinstance(alt_node, SequenceNode):
                self.report(origin, "'alternatives' must be a sequence", node=alt_node)
                return
            for child_node, child in zip(alt_node.value, alternatives, strict=True):
                self.check_plugin_requirement(origin, child_node, child, allow_alternatives=False)

    # --- phase 2: resolution -----------------------------------------------------------------------

    def parse_parts(self, parts: list[TextPart]) -> ParsedCondition:
        text = " ".join(p.text for p in parts)
        if not parts:
            return ParsedCondition(None, text, parts)
        try:
            expr = parse_condition(text)
        except ConditionSyntaxError as exc:
            self.report_in_text(parts, exc.offset, f"condition syntax error: {exc.message}", "condition")
            return ParsedCondition(None, text, parts)
        return ParsedCondition(collect_refs(expr), text, parts)

    def resolve(self) -> None:
        macro_conditions = {name: self.parse_parts(m.condition) for name, m in self.macros.items()}
        for name, parsed in macro_conditions.items():
            self.check_references(parsed)
            del name
        self.check_macro_cycles(macro_conditions)
        self.check_list_cycles()
        for rule in self.rules.values():
            parsed = self.parse_parts(rule.condition)
            self.check_references(parsed)
            self.check_rule_fields(rule, parsed, macro_conditions)
            self.check_output(rule)

    def check_references(self, parsed: ParsedCondition) -> None:
        if parsed.refs is None:
            return
        for ref in parsed.refs.macros:
            if ref.name not in self.macros:
                hint = ""
                if ref.name in self.lists:
                    hint = f" ('{ref.name}' is a list; use it as 'field in ({ref.name})')"
                self.report_in_text(
                    parsed.parts, ref.offset, f"undefined macro '{ref.name}'{hint}", "condition"
                )
        for list_ref in parsed.refs.list_refs:
            if list_ref.name not in self.lists:
                self.report_in_text(
                    parsed.parts, list_ref.offset, f"undefined list '{list_ref.name}'", "condition"
                )

    def check_macro_cycles(self, conditions: dict[str, ParsedCondition]) -> None:
        graph = {
            name: [r.name for r in parsed.refs.macros if r.name in self.macros] if parsed.refs else []
            for name, parsed in conditions.items()
        }
        state: dict[str, int] = {}
        for start in graph:
            if start in state:
                continue
            path: list[str] = []
            stack: list[tuple[str, int]] = [(start, 0)]
            while stack:
                node, index = stack.pop()
                if index == 0:
                    state[node] = 1
                    path.append(node)
                children = graph[node]
                if index < len(children):
                    stack.append((node, index + 1))
                    child = children[index]
                    if state.get(child) == 1:
                        cycle = [*path[path.index(child) :], child]
                        self.report(
                            self.macros[child].origin,
                            f"macro '{child}' refers to itself: {' -> '.join(cycle)}",
                        )
                    elif child not in state:
                        stack.append((child, 0))
                else:
                    state[node] = 2
                    path.pop()

    def check_list_cycles(self) -> None:
        for name, lst in self.lists.items():
            seen = {name}
            frontier = [i for i in lst.items if i in self.lists]
            while frontier:
                current = frontier.pop()
                if current == name:
                    self.report(lst.origin, f"list '{name}' includes itself (through its items)")
                    break
                if current in seen:
                    continue
                seen.add(current)
                frontier.extend(i for i in self.lists[current].items if i in self.lists)

    def check_rule_fields(
        self, rule: RuleState, parsed: ParsedCondition, macros: dict[str, ParsedCondition]
    ) -> None:
        classes = known_classes(rule.source)
        if classes is None or parsed.refs is None:
            return
        severity = self.unknown_class_severity(rule)
        for field_ref in parsed.refs.fields:
            if field_ref.field_class not in classes:
                self.report_in_text(
                    parsed.parts,
                    field_ref.offset,
                    f"unknown field '{field_ref.name}': no field class '{field_ref.field_class}' for source "
                    f"'{rule.source}'",
                    "condition",
                    severity,
                )
        # Macros are compiled in the context of the rules that use them, so their fields are checked
        # against each using rule's source; each problem is reported once, on the macro.
        seen: set[str] = set()
        pending = [r.name for r in parsed.refs.macros]
        while pending:
            name = pending.pop()
            if name in seen or name not in macros:
                continue
            seen.add(name)
            macro_parsed = macros[name]
            if macro_parsed.refs is None:
                continue
            pending.extend(r.name for r in macro_parsed.refs.macros)
            for field_ref in macro_parsed.refs.fields:
                if field_ref.field_class in classes:
                    continue
                key = (name, field_ref.offset, rule.source)
                if key in self._reported_macro_fields:
                    continue
                self._reported_macro_fields.add(key)
                self.report_in_text(
                    macro_parsed.parts,
                    field_ref.offset,
                    f"unknown field '{field_ref.name}': no field class '{field_ref.field_class}' for source "
                    f"'{rule.source}' (the macro is used by rule '{rule.origin.name}')",
                    "condition",
                    severity,
                )

    def check_output(self, rule: RuleState) -> None:
        if not rule.output:
            return
        text = " ".join(p.text for p in rule.output)
        if not text.strip():
            self.report(rule.origin, "output is empty")
            return
        found, problems = parse_output(text)
        for problem in problems:
            self.report_in_text(rule.output, problem.offset, f"output: {problem.message}", "output")
        classes = known_classes(rule.source)
        if classes is None:
            return
        for output_field in found:
            if output_field.field_class not in classes:
                self.report_in_text(
                    rule.output,
                    output_field.offset,
                    f"output: unknown field '%{output_field.name}': no field class "
                    f"'{output_field.field_class}' for source '{rule.source}'",
                    "output",
                    self.unknown_class_severity(rule),
                )


def _load(files: Sequence[RulesFile], engine_version: str | None, limits: RulesLimits) -> _Loader:
    loader = _Loader(engine_version, limits)
    if len(files) > limits.max_files:
        loader.findings.append(
            Finding(
                "<arguments>", "file", "", 0, 0, f"{len(files)} files given, more than {limits.max_files}"
            )
        )
        return loader
    for rules_file in files:
        loader.load_file(rules_file)
    return loader


def validate_rules_locally(
    files: Sequence[RulesFile], engine_version: str | None, limits: RulesLimits
) -> tuple[list[Finding], bool]:
    """Findings of this validator alone, and whether a file was refused by the resource limits."""
    loader = _load(files, engine_version, limits)
    loader.resolve()
    order = {f.name: index for index, f in enumerate(files)}
    findings = sorted(loader.findings, key=lambda f: (order.get(f.file, -1), f.line, f.column))
    return findings, loader.refused_by_limits


def defined_items(files: Sequence[RulesFile], *, limits: RulesLimits | None = None) -> DefinedItems:
    """Names of the rules, macros and lists that the ordered files define once fully loaded.

    Items whose definition has errors may be missing; call validate_rules for the problems themselves.
    """
    loader = _load(files, None, limits or RulesLimits())
    return DefinedItems(tuple(loader.rules), tuple(loader.macros), tuple(loader.lists))
