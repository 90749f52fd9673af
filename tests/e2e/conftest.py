"""Fixtures for tests against a real cluster: skipped, with the reason, when none is reachable.

Expects the CRDs, the RBAC, the operator (with its webhook) and Falco with the falco-api sidecar
installed, e.g. by the Helm chart. Set FALCO_API_NAMESPACE (default falco) if Falco runs elsewhere.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import kopf
import pytest

NAMESPACE = os.environ.get("FALCO_API_NAMESPACE", "falco")
SELECTOR = os.environ.get("FALCO_API_SELECTOR", "app.kubernetes.io/name=falco")


def _ssl(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    from falco_api_operator.kube import _ssl_context

    return _ssl_context(info)


class Cluster:
    def __init__(self, info: kopf.ConnectionInfo, session: aiohttp.ClientSession) -> None:
        self.info = info
        self.session = session

    async def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> tuple[int, Any]:
        async with self.session.request(
            method, self.info.server.rstrip("/") + path, json=body, headers={"Content-Type": content_type}
        ) as response:
            return response.status, await response.json(content_type=None)

    async def ok(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        status, data = await self.request(method, path, body, content_type)
        assert status < 400, f"{method} {path}: {status} {data}"
        return data

    async def watch(self, path: str, resource_version: str, seconds: float) -> list[dict[str, Any]]:
        """The watch events of ``path`` after ``resource_version``, for ``seconds``."""
        events: list[dict[str, Any]] = []
        url = f"{self.info.server.rstrip('/')}{path}"
        params = {"watch": "1", "resourceVersion": resource_version, "timeoutSeconds": str(int(seconds))}
        timeout = aiohttp.ClientTimeout(total=seconds + 10)
        async with self.session.get(url, params=params, timeout=timeout) as response:
            assert response.status == 200, await response.text()
            async for line in response.content:
                if line.strip():
                    events.append(json.loads(line))
        return events


# tests/conftest.py removes KUBECONFIG from the environment at import (so that unit tests never
# reach a real cluster); it is captured here before that when this file is imported first, and
# FALCO_API_E2E_KUBECONFIG always works.
_KUBECONFIG_AT_IMPORT = os.environ.get("KUBECONFIG")


@pytest.fixture
async def cluster(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    path = os.environ.get("FALCO_API_E2E_KUBECONFIG") or os.environ.get("KUBECONFIG") or _KUBECONFIG_AT_IMPORT
    if not path:
        pytest.skip("neither FALCO_API_E2E_KUBECONFIG nor KUBECONFIG is set: no real cluster to test against")
    monkeypatch.setenv("KUBECONFIG", path)
    try:
        info = kopf.login_with_kubeconfig(logger=logging.getLogger("e2e"), settings=kopf.OperatorSettings())
    except Exception as error:  # any unreadable kubeconfig is a reason to skip, not to fail
        pytest.skip(f"KUBECONFIG is not usable: {error}")
    if info is None:
        pytest.skip("KUBECONFIG has no usable context")
    headers = {"Authorization": f"{info.scheme or 'Bearer'} {info.token}"} if info.token else {}
    auth = aiohttp.BasicAuth(info.username, info.password or "") if info.username else None
    connector = aiohttp.TCPConnector(ssl=_ssl(info))
    async with aiohttp.ClientSession(
        headers=headers, auth=auth, connector=connector, timeout=aiohttp.ClientTimeout(total=15)
    ) as session:
        cluster = Cluster(info, session)
        try:
            status, _ = await cluster.request("GET", "/version")
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            pytest.skip(f"the cluster in KUBECONFIG is not reachable: {error}")
        if status >= 400:
            pytest.skip(f"the cluster in KUBECONFIG answers /version with HTTP {status}")
        status, _ = await cluster.request("GET", "/apis/falcoapi.io/v1alpha1/falcorules")
        if status == 404:
            pytest.skip(
                "the falcoapi.io CRDs are not installed in this cluster (kubectl apply -f deploy/crds/)"
            )
        yield cluster
