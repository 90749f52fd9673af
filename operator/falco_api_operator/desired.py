"""What each node should run: FalcoRule/FalcoConfig objects -> per-node desired state (pure)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import struct_pb2

from falco_api.configs import canonical_dropin_yaml, compute_state_sha256, content_sha256
from falco_api.contract.falco.api import apply_pb2, configs_pb2, rules_pb2

GROUP = "falcoapi.io"
VERSION = "v1alpha1"
RULES_PLURAL = "falcorules"
CONFIGS_PLURAL = "falcoconfigs"


class SelectorError(ValueError):
    """A nodeSelector that cannot be evaluated (the CRD schema should have refused it)."""


@dataclass(frozen=True)
class LabelSelector:
    """A metav1.LabelSelector. Empty selects everything, as in Kubernetes."""

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> LabelSelector:
        raw = raw or {}
        labels = raw.get("matchLabels") or {}
        if not isinstance(labels, Mapping):
            raise SelectorError("nodeSelector.matchLabels must be a map of strings")
        expressions = []
        for expr in raw.get("matchExpressions") or []:
            key, operator, values = expr.get("key"), expr.get("operator"), tuple(expr.get("values") or ())
            if not key or operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
                raise SelectorError(
                    f"nodeSelector on {key!r}: operator {operator!r} is not In, NotIn, Exists or DoesNotExist"
                )
            if operator in ("In", "NotIn") and not values:
                raise SelectorError(
                    f"nodeSelector expression on {key!r}: {operator} needs at least one value"
                )
            if operator in ("Exists", "DoesNotExist") and values:
                raise SelectorError(f"nodeSelector expression on {key!r}: {operator} takes no values")
            expressions.append((str(key), str(operator), tuple(str(v) for v in values)))
        return cls(tuple(sorted((str(k), str(v)) for k, v in labels.items())), tuple(expressions))

    def matches(self, labels: Mapping[str, str]) -> bool:
        if any(labels.get(key) != value for key, value in self.match_labels):
            return False
        for key, operator, values in self.match_expressions:
            present = key in labels
            if operator == "In" and not (present and labels[key] in values):
                return False
            if operator == "NotIn" and present and labels[key] in values:
                return False
            if operator == "Exists" and not present:
                return False
            if operator == "DoesNotExist" and present:
                return False
        return True


@dataclass(frozen=True)
class FalcoRuleSpec:
    name: str
    rules: str
    order: int
    selector: LabelSelector
    enabled: bool = True
    generation: int = 0

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> FalcoRuleSpec:
        spec = obj.get("spec") or {}
        meta = obj.get("metadata") or {}
        return cls(
            name=str(meta.get("name") or ""),
            rules=str(spec.get("rules") or ""),
            order=int(spec.get("order", 50)),
            selector=LabelSelector.from_dict(spec.get("nodeSelector")),
            enabled=bool(spec.get("enabled", True)),
            generation=int(meta.get("generation") or 0),
        )


@dataclass(frozen=True)
class FalcoConfigSpec:
    name: str
    config: Mapping[str, Any]
    order: int
    selector: LabelSelector
    enabled: bool = True
    generation: int = 0

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> FalcoConfigSpec:
        spec = obj.get("spec") or {}
        meta = obj.get("metadata") or {}
        return cls(
            name=str(meta.get("name") or ""),
            config=dict(spec.get("config") or {}),
            order=int(spec.get("order", 50)),
            selector=LabelSelector.from_dict(spec.get("nodeSelector")),
            enabled=bool(spec.get("enabled", True)),
            generation=int(meta.get("generation") or 0),
        )


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class DesiredState:
    """One node's complete managed state, already in load order."""

    rulesets: tuple[FalcoRuleSpec, ...] = ()
    configs: tuple[FalcoConfigSpec, ...] = ()
    sha256: str = field(default="", compare=False)

    @property
    def rule_names(self) -> frozenset[str]:
        return frozenset(r.name for r in self.rulesets)

    @property
    def config_names(self) -> frozenset[str]:
        return frozenset(c.name for c in self.configs)


def state_sha256(rulesets: Iterable[FalcoRuleSpec], configs: Iterable[FalcoConfigSpec]) -> str:
    """The sidecar's ``WriteResult.state_sha256`` for this state, by the same functions it uses.

    Rules files are hashed as given; config drop-ins as the canonical YAML the sidecar writes.
    """
    return compute_state_sha256(
        ((r.name, r.order, content_sha256(r.rules)) for r in rulesets),
        ((c.name, c.order, content_sha256(canonical_dropin_yaml(c.config))) for c in configs),
    )


def load_order_key(order: int, name: str) -> str:
    """Where a ruleset or drop-in loads: the sidecar writes ``NN-name.yaml`` and Falco loads a folder
    alphabetically, so ties of ``order`` go by that file name ("a-b" before "a"), not by plain name."""
    return f"{order:02d}-{name}.yaml"


def desired_state(
    rules: Iterable[FalcoRuleSpec], configs: Iterable[FalcoConfigSpec], node_labels: Mapping[str, str]
) -> DesiredState:
    """Every enabled rule and config whose selector matches the node, in Falco's load order."""
    chosen_rules = tuple(
        sorted(
            (r for r in rules if r.enabled and r.selector.matches(node_labels)),
            key=lambda r: load_order_key(r.order, r.name),
        )
    )
    chosen_configs = tuple(
        sorted(
            (c for c in configs if c.enabled and c.selector.matches(node_labels)),
            key=lambda c: load_order_key(c.order, c.name),
        )
    )
    return DesiredState(chosen_rules, chosen_configs, state_sha256(chosen_rules, chosen_configs))


def apply_request(state: DesiredState) -> apply_pb2.ApplyRequest:
    request = apply_pb2.ApplyRequest()
    for rule in state.rulesets:
        request.rulesets.append(rules_pb2.Ruleset(name=rule.name, content=rule.rules, order=rule.order))
    for config in state.configs:
        settings = struct_pb2.Struct()
        settings.update(dict(config.config))
        request.configs.append(
            configs_pb2.ConfigDropIn(name=config.name, settings=settings, order=config.order)
        )
    return request


def state_from_request(request: apply_pb2.ApplyRequest) -> tuple[list[FalcoRuleSpec], list[FalcoConfigSpec]]:
    """The inverse of :func:`apply_request`, for the receiving side (and its test double)."""
    from google.protobuf import json_format

    rules = [FalcoRuleSpec(r.name, r.content, r.order, LabelSelector()) for r in request.rulesets]
    configs = [
        FalcoConfigSpec(c.name, json_format.MessageToDict(c.settings), c.order, LabelSelector())
        for c in request.configs
    ]
    return rules, configs
