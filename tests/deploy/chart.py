"""Offline rendering of the falco-api Helm chart, shared by the tests of deploy/.

helm-python-sdk binds Helm's Go SDK, so rendering, linting and values.schema.json validation run
without a helm binary or a cluster. ``lookup`` returns nothing offline, so Helm-generated
certificates are always fresh in these renders.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip(
    "helm_python",
    reason="helm-python-sdk is not installed (pip install helm-python-sdk): the chart cannot be rendered",
)

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "deploy" / "helm" / "falco-api"
CRDS_DIR = REPO_ROOT / "deploy" / "crds"
CHART_CRDS_DIR = CHART_DIR / "crds"
# shared/ sits beside the checkout, both here and in CI.
CORPUS_DIR = REPO_ROOT.parent / "shared" / "corpus"

RELEASE = "fa"
NAMESPACE = "falco"
KUBE_VERSION = "1.33"

# The value sets every test family covers: the defaults and each switch the brief names.
SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "no-falco": {"falco": {"enabled": False}},
    "no-cert-manager": {"certManager": {"enabled": False}},
    "no-relay": {"relay": {"enabled": False}},
    "two-operators": {"operator": {"replicas": 2}},
    "everything-off": {
        "falco": {"enabled": False},
        "certManager": {"enabled": False},
        "relay": {"enabled": False},
        "networkPolicy": {"enabled": False},
    },
    "kmod-k8saudit": {"falco": {"driver": {"kind": "kmod"}, "k8saudit": {"enabled": True}}},
    "modern-least-privileged": {"falco": {"driver": {"leastPrivileged": True}}},
}


@dataclass(frozen=True)
class Rendered:
    """One render of the chart: the manifests by template, parsed, and NOTES.txt."""

    files: dict[str, str]

    @property
    def notes(self) -> str:
        return self.files.get("falco-api/templates/NOTES.txt", "")

    def documents(self) -> Iterator[dict[str, Any]]:
        for name, text in sorted(self.files.items()):
            if not name.endswith((".yaml", ".yml")):
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    assert isinstance(doc, dict), f"{name} rendered a non-object document: {doc!r}"
                    yield doc

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [doc for doc in self.documents() if doc["kind"] == kind]

    def one(self, kind: str, name_suffix: str = "") -> dict[str, Any]:
        found = [doc for doc in self.kinds(kind) if doc["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, (
            f"expected one {kind} named *{name_suffix}, found {[d['metadata']['name'] for d in found]}"
        )
        return found[0]

    def has(self, kind: str, name_suffix: str = "") -> bool:
        return any(doc["metadata"]["name"].endswith(name_suffix) for doc in self.kinds(kind))


@lru_cache(maxsize=1)
def _chart() -> Any:
    return helm.Chart.load(CHART_DIR)


@lru_cache(maxsize=32)
def _render_cached(values_json: str) -> Rendered:
    values = json.loads(values_json)
    files = _chart().render(values or None, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return Rendered(files=dict(files))


def render(values: dict[str, Any] | None = None) -> Rendered:
    """Render the chart offline; identical values share one render (certificate generation is slow)."""
    return _render_cached(json.dumps(values or {}, sort_keys=True))


def falco_yaml(rendered: Rendered) -> dict[str, Any]:
    configmap = rendered.one("ConfigMap", "-falco")
    parsed = yaml.safe_load(configmap["data"]["falco.yaml"])
    assert isinstance(parsed, dict)
    return parsed


def container(pod_spec: dict[str, Any], name: str, *, init: bool = False) -> dict[str, Any]:
    containers = pod_spec.get("initContainers" if init else "containers") or []
    found = [c for c in containers if c["name"] == name]
    assert len(found) == 1, f"expected one container {name!r}, found {[c['name'] for c in containers]}"
    result: dict[str, Any] = found[0]
    return result


def flag(args: list[str], name: str) -> str:
    """The value given to ``--name`` in a container's args (flags and values are separate items)."""
    assert args.count(name) == 1, f"{name} given {args.count(name)} times in {args}"
    return args[args.index(name) + 1]
