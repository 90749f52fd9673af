"""The chart ships deploy/crds/ in its crds/ folder, byte for byte.

Helm installs a chart's crds/ folder before its templates (first install only). The folder holds
copies, not links, so that a packaged chart is self-contained; these tests fail as soon as a copy
drifts from deploy/crds/, the source of truth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from .chart import CHART_CRDS_DIR, CHART_DIR, CRDS_DIR, KUBE_VERSION, helm

SYNC_COMMAND = "cp deploy/crds/*.yaml deploy/helm/falco-api/crds/"
OUR_CRDS = {"falcorules.falcoapi.io", "falcoconfigs.falcoapi.io"}


def _manifests(folder: Path) -> dict[str, Path]:
    return {path.name: path for path in sorted(folder.glob("*.y*ml")) if path.suffix in (".yaml", ".yml")}


@pytest.fixture
def source_crds() -> dict[str, Path]:
    found = _manifests(CRDS_DIR)
    if not found:
        pytest.skip(
            "deploy/crds/ is still empty: the FalcoRule/FalcoConfig CRDs are written by another change; "
            f"once they land, copy them into the chart ({SYNC_COMMAND})"
        )
    return found


def test_chart_crds_are_identical_to_deploy_crds(source_crds: dict[str, Path]) -> None:
    shipped = _manifests(CHART_CRDS_DIR)
    missing = sorted(set(source_crds) - set(shipped))
    stale = sorted(set(shipped) - set(source_crds))
    differing = sorted(
        name
        for name in set(source_crds) & set(shipped)
        if source_crds[name].read_bytes() != shipped[name].read_bytes()
    )
    assert not (missing or stale or differing), (
        f"chart CRDs out of sync with deploy/crds/: missing {missing}, not in deploy/crds {stale}, "
        f"different {differing}; run: {SYNC_COMMAND} (and delete the stale ones)"
    )


def test_helm_loads_the_crds(source_crds: dict[str, Path]) -> None:
    with helm.Chart.load(CHART_DIR) as chart:
        names = {yaml.safe_load(crd["data"])["metadata"]["name"] for crd in chart.crds}
    assert names >= OUR_CRDS


def _crd_documents(source_crds: dict[str, Path]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in source_crds.values():
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def test_crds_are_valid_kubernetes(source_crds: dict[str, Path]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in _crd_documents(source_crds):
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_crds_match_what_the_chart_expects(source_crds: dict[str, Path]) -> None:
    """The webhook rules and the RBAC of the chart name this group, version, scope and status subresource."""
    by_name = {doc["metadata"]["name"]: doc for doc in _crd_documents(source_crds)}
    assert set(by_name) >= OUR_CRDS
    for name in OUR_CRDS:
        spec = by_name[name]["spec"]
        assert spec["group"] == "falcoapi.io"
        assert spec["scope"] == "Cluster", "the webhook rules use scope: Cluster"
        served = {version["name"]: version for version in spec["versions"] if version["served"]}
        assert "v1alpha1" in served, "the webhook rules match v1alpha1"
        assert "status" in served["v1alpha1"].get("subresources", {}), "the operator RBAC patches */status"
    peering = by_name.get("clusterkopfpeerings.kopf.dev")
    assert peering is not None, "operator.replicas > 1 creates a ClusterKopfPeering: its CRD must ship too"
    assert peering["spec"]["scope"] == "Cluster"
