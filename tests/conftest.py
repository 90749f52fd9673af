"""Shared fixtures: PKI, the Falco double, and an in-process sidecar fed by it."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from falco_api.testing.falco_double import FalcoDouble
from falco_api_sidecar.main import Sidecar, SidecarConfig
from tests.certs import Pki

# kopf logs in through the kubernetes client, which reads KUBECONFIG at import
# time: no test but tests/e2e may depend on a developer's cluster by accident.
# The e2e tests read the cluster from FALCO_API_E2E_KUBECONFIG instead.
if "KUBECONFIG" in os.environ:
    os.environ.setdefault("FALCO_API_E2E_KUBECONFIG", os.environ.pop("KUBECONFIG"))

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def falco_double() -> AsyncIterator[FalcoDouble]:
    double = FalcoDouble(hostname="node-a")
    await double.start()
    yield double
    await double.stop()


class RunningSidecar:
    def __init__(self, sidecar: Sidecar, socket_path: Path) -> None:
        self.sidecar = sidecar
        self.socket_path = socket_path
        self._session = aiohttp.ClientSession()

    @property
    def grpc_target(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def ingest_url(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.ingest_port}/"

    async def post(
        self, alert: Any, *, raw: bytes | None = None, content_type: str = "application/json"
    ) -> int:
        import json

        body = raw if raw is not None else json.dumps(alert).encode()
        async with self._session.post(
            self.ingest_url, data=body, headers={"Content-Type": content_type}
        ) as reply:
            await reply.read()
            return reply.status

    async def close(self) -> None:
        await self._session.close()
        await self.sidecar.stop()


@pytest.fixture
async def sidecar(tmp_path: Path, falco_double: FalcoDouble) -> AsyncIterator[RunningSidecar]:
    # AF_UNIX paths are limited to ~107 bytes; pytest's tmp_path can be longer.
    import tempfile

    socket_dir = Path(tempfile.mkdtemp(prefix="fapi-"))
    socket_path = socket_dir / "api.sock"
    config = SidecarConfig(
        grpc_listen=f"unix://{socket_path}",
        ingest_listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
        falco_url=falco_double.url,
        node_name="node-a",
        replay_size=1000,
        queue_size=100,
        grace=1.0,
    )
    running = Sidecar(config)
    await running.start()
    handle = RunningSidecar(running, socket_path)
    yield handle
    await handle.close()
    import shutil

    shutil.rmtree(socket_dir, ignore_errors=True)
