"""The CRDs, their examples and the RBAC manifests (static checks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def crd_schema(kind: str) -> dict[str, Any]:
    for path in (DEPLOY / "crds").glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            (version,) = crd["spec"]["versions"]
            return dict(version["schema"]["openAPIV3Schema"])
    raise AssertionError(f"no CRD for {kind}")


def to_json_schema(node: Any) -> Any:
    """OpenAPI v3 structural schema -> JSON Schema: drop the x-kubernetes-* extensions."""
    if isinstance(node, dict):
        return {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if isinstance(node, list):
        return [to_json_schema(v) for v in node]
    return node


EXAMPLES = sorted((DEPLOY / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_validate_against_the_crd_schemas(path: Path) -> None:
    obj = yaml.safe_load(path.read_text())
    jsonschema.validate(obj, to_json_schema(crd_schema(obj["kind"])))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_pass_admission(path: Path) -> None:
    """Every example would get past the webhook: the project's rules or config validator accepts it."""
    from falco_api_operator.desired import FalcoConfigSpec, FalcoRuleSpec
    from falco_api_operator.validation import validate_config, validate_rule_in_set

    obj = yaml.safe_load(path.read_text())
    if obj["kind"] == "FalcoRule":
        findings = validate_rule_in_set(FalcoRuleSpec.from_object(obj), [])
    else:
        findings = validate_config(FalcoConfigSpec.from_object(obj))
    assert findings == []


@pytest.mark.parametrize(
    "spec_change",
    [
        {"order": 100},
        {"order": -1},
        {"rules": ""},
        {"nodeSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}},
    ],
)
def test_schema_refuses_out_of_range_values(spec_change: dict[str, Any]) -> None:
    obj = yaml.safe_load((DEPLOY / "examples" / "falcorule-shell-in-container.yaml").read_text())
    obj["spec"].update(spec_change)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(obj, to_json_schema(crd_schema("FalcoRule")))


@pytest.mark.parametrize("kind,short", [("FalcoRule", "frule"), ("FalcoConfig", "fconfig")])
def test_crds_are_cluster_scoped_with_status_short_names_and_columns(kind: str, short: str) -> None:
    for path in (DEPLOY / "crds").glob("*.falcoapi.io.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] != kind:
            continue
        assert crd["spec"]["scope"] == "Cluster"
        assert crd["spec"]["names"]["shortNames"] == [short]
        (version,) = crd["spec"]["versions"]
        assert version["subresources"] == {"status": {}}
        columns = [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority", 0) == 0]
        assert columns == ["Ready", "Loaded", "Order", "Age"]
        return
    raise AssertionError(kind)


def test_rbac_grants_no_wildcards_and_no_writes_to_nodes_or_pods() -> None:
    for doc in yaml.safe_load_all((DEPLOY / "rbac" / "operator-rbac.yaml").read_text()):
        for rule in doc.get("rules") or []:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"]
            if set(rule["resources"]) & {"nodes", "pods"}:
                assert set(rule["verbs"]) <= {"get", "list", "watch"}


@pytest.mark.parametrize("kind", ["FalcoRule", "FalcoConfig"])
def test_every_name_the_crd_admits_is_a_name_the_sidecar_accepts(kind: str) -> None:
    # The object's name becomes the sidecar's ruleset/drop-in name (a file name part, at most
    # 63 of [A-Za-z0-9._-]); Kubernetes alone would allow 253-character DNS subdomains.
    from falco_api_sidecar.managed import InvalidRequestError, check_name

    schema = to_json_schema(crd_schema(kind))
    spec = {"rules": "- list: l\n  items: []\n"} if kind == "FalcoRule" else {"config": {"a": 1}}

    def admitted(name: str) -> bool:
        obj = {"apiVersion": "falcoapi.io/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}
        return not list(jsonschema.Draft7Validator(schema).iter_errors(obj))

    for name in ("a", "0", "a-b", "x" * 63, "a" + "-9" * 31):
        assert admitted(name), name
        assert check_name(name) == name
    for name in ("x" * 64, "a" * 100, "a" * 253, "a.b", "-a", "a-", "A", "a_b", ""):
        assert not admitted(name), name
    with pytest.raises(InvalidRequestError):
        check_name("a" * 64)
