"""Every rendered manifest is valid Kubernetes, and the chart lints clean, in every scenario."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from .chart import CHART_DIR, KUBE_VERSION, NAMESPACE, SCENARIOS, Rendered, helm

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate",
    reason="kubernetes-validate is not installed (pip install kubernetes-validate)",
)

# Kinds that are not part of Kubernetes: no schema ships with kubernetes-validate, so each one is
# checked by hand below instead.
CUSTOM_KINDS = {
    ("cert-manager.io/v1", "Issuer"),
    ("cert-manager.io/v1", "Certificate"),
    ("kopf.dev/v1", "ClusterKopfPeering"),
}
SEVERITY_WARNING = 2


def _validate(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_every_manifest_validates_against_kubernetes_schemas(scenario: tuple[str, Rendered]) -> None:
    name, rendered = scenario
    checked = 0
    for doc in rendered.documents():
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        try:
            _validate(doc)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(
                f"[{name}] {doc['kind']}/{doc['metadata']['name']}: {error.message} at {list(error.path)}"
            )
        checked += 1
    assert checked >= 8, f"[{name}] only {checked} manifests validated"


def test_the_validator_is_not_vacuous(render_chart: Any) -> None:
    """A misspelt field in a rendered DaemonSet must fail strict validation."""
    daemonset = copy.deepcopy(render_chart(None).one("DaemonSet"))
    daemonset["spec"]["template"]["spec"]["containers"][0]["imagePullPolicee"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(daemonset)


def test_custom_kinds_are_well_formed(scenario: tuple[str, Rendered]) -> None:
    _, rendered = scenario
    for cert in rendered.kinds("Certificate"):
        spec = cert["spec"]
        assert spec["secretName"] and spec["issuerRef"]["name"], cert["metadata"]["name"]
        assert spec["issuerRef"]["kind"] in {"Issuer", "ClusterIssuer"}
        assert spec.get("isCA") or spec["dnsNames"], f"{cert['metadata']['name']} has no dnsNames"
        assert cert["metadata"]["namespace"] == NAMESPACE
    for issuer in rendered.kinds("Issuer"):
        assert set(issuer["spec"]) <= {"selfSigned", "ca"}, issuer["spec"]
    for peering in rendered.kinds("ClusterKopfPeering"):
        assert "namespace" not in peering["metadata"], "ClusterKopfPeering is cluster-scoped"


def test_no_rendered_object_is_namespaced_elsewhere(scenario: tuple[str, Rendered]) -> None:
    _, rendered = scenario
    for doc in rendered.documents():
        namespace = doc["metadata"].get("namespace")
        assert namespace in (None, NAMESPACE), f"{doc['kind']}/{doc['metadata']['name']} in {namespace}"


@pytest.mark.parametrize("scenario_name", sorted(SCENARIOS))
def test_chart_lints_clean(scenario_name: str) -> None:
    report = helm.lint(
        CHART_DIR,
        SCENARIOS[scenario_name] or None,
        strict=True,
        namespace=NAMESPACE,
        kube_version=f"v{KUBE_VERSION}.0",
    )
    problems = [m for m in report["messages"] if m["severity"] >= SEVERITY_WARNING]
    assert not problems and not report["errors"], (problems, report["errors"])
    assert report["total_charts_linted"] == 1


def test_lint_reports_a_broken_chart(tmp_path: Any) -> None:
    """The lint call does find problems: a chart whose template does not parse is reported."""
    broken = tmp_path / "broken"
    helm.Chart.create("broken", tmp_path).close()
    (broken / "templates" / "oops.yaml").write_text("{{ if }}\n")
    report = helm.lint(broken, strict=True)
    assert report["errors"] or any(m["severity"] >= SEVERITY_WARNING for m in report["messages"])
