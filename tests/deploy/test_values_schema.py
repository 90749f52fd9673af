"""values.schema.json: Helm refuses bad values before rendering anything."""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import pytest
import yaml

from .chart import CHART_DIR, helm, render

BAD_VALUES: dict[str, tuple[dict[str, Any], str]] = {
    "failure-policy-maybe": ({"operator": {"webhook": {"failurePolicy": "Maybe"}}}, "failurePolicy"),
    "negative-replicas": ({"operator": {"replicas": -1}}, "replicas"),
    "negative-relay-replicas": ({"relay": {"replicas": -3}}, "replicas"),
    "unknown-top-level-key": ({"falcoo": {"enabled": False}}, "falcoo"),
    "unknown-nested-key": ({"sidecar": {"grpcPortt": 5060}}, "grpcPortt"),
    "legacy-ebpf-driver": ({"falco": {"driver": {"kind": "ebpf"}}}, "kind"),
    "port-out-of-range": ({"sidecar": {"metricsPort": 70000}}, "metricsPort"),
    "webhook-timeout-over-30s": ({"operator": {"webhook": {"timeoutSeconds": 31}}}, "timeoutSeconds"),
    "relative-managed-path": ({"managed": {"root": "falco-api"}}, "root"),
    "removed-managed-rules-dir": (
        {"managed": {"rulesDir": "/etc/falco/falco-api/current/rules.d"}},
        "rulesDir",
    ),
    "unknown-authz-role": ({"authz": {"extraIdentities": [{"commonName": "x", "role": "admin"}]}}, "role"),
    "empty-discovery-selector": (
        {"discovery": {"sidecarSelector": {"app.kubernetes.io/component": None}}},
        "sidecarSelector",
    ),
    "enabled-as-string": ({"relay": {"enabled": "yes"}}, "enabled"),
    "bad-duration": ({"certManager": {"duration": "90 days"}}, "duration"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_are_refused_at_render(case: str) -> None:
    values, mentioned = BAD_VALUES[case]
    with pytest.raises(helm.HelmValuesError) as refused:
        render(values)
    assert "schema" in str(refused.value)
    assert mentioned in str(refused.value)


def test_defaults_and_every_documented_switch_pass_the_schema() -> None:
    with helm.Chart.load(CHART_DIR) as chart:
        chart.validate_schema(None)
        chart.validate_schema(
            {
                "falco": {"enabled": False, "driver": {"kind": "kmod"}},
                "certManager": {"enabled": False, "issuerRef": {"name": "corp", "kind": "ClusterIssuer"}},
                "operator": {"replicas": 0, "webhook": {"failurePolicy": "Ignore"}},
                "relay": {"enabled": False},
                "global": {"imageRegistry": "mirror.local"},
            }
        )


def test_schema_is_strict_about_unknown_keys_everywhere_it_can_be() -> None:
    """Every object of our own making refuses unknown keys; open ones are Kubernetes shapes."""
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    # Objects taken verbatim into Kubernetes manifests, or merged into falco.yaml.
    open_objects = {
        "global",
        "falco.config",
        "falco.containerSecurityContext",
        "falco.updateStrategy",
        "operator.podSecurityContext",
        "operator.securityContext",
        "relay.podSecurityContext",
        "relay.securityContext",
        "sidecar.securityContext",
        "networkPolicy.metricsNamespaceSelector",
    }
    open_leaf_names = {"affinity", "requests", "limits"}

    def walk(node: dict[str, Any], path: str) -> None:
        if node.get("type") != "object" or "properties" not in node:
            return
        assert node.get("additionalProperties") is False, f"{path or '<root>'} accepts unknown keys"
        for key, child in node["properties"].items():
            child_path = f"{path}.{key}" if path else key
            if child_path in open_objects or key in open_leaf_names:
                continue
            walk(child, child_path)

    walk(schema, "")


def test_schema_knows_every_default_value() -> None:
    """Each key of values.yaml is declared in the schema (else additionalProperties would reject it)."""
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())

    def walk(node: Any, schema_node: dict[str, Any], path: str) -> None:
        if not isinstance(node, dict) or "properties" not in schema_node:
            return
        for key, value in node.items():
            assert key in schema_node["properties"], f"{path}{key} is not in values.schema.json"
            walk(value, schema_node["properties"][key], f"{path}{key}.")

    walk(values, schema, "")


def test_committed_schema_is_the_generators_output() -> None:
    generator = CHART_DIR.parent / "tools" / "gen_values_schema.py"
    spec = importlib.util.spec_from_file_location("gen_values_schema", generator)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (CHART_DIR / "values.schema.json").read_text(encoding="utf-8")
    assert committed == module.render_schema(), (
        f"values.schema.json is stale: run .venv/bin/python {generator}"
    )
