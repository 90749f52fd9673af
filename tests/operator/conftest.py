"""Fixtures for the operator tests: the API server emulator, real sidecars, the operator in-loop."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import kopf
import pytest
import yaml

from falco_api.tls import TlsFiles
from falco_api_operator.handlers import OperatorConfig, Runtime
from falco_api_operator.main import run
from falco_api_operator.pusher import PushSettings
from tests.certs import Authority
from tests.real_sidecar import RealSidecar

from .k8s_emulator import FalcoApiServerEmulator

NAMESPACE = "falco"
FALCO_LABELS = {"app.kubernetes.io/name": "falco"}
RULES = "falcoapi.io/v1alpha1/falcorules"
CONFIGS = "falcoapi.io/v1alpha1/falcoconfigs"


# --- the sidecar ------------------------------------------------------------------------------
# `sidecar_factory` gives real nodes (tests/real_sidecar.py): the sidecar in-process on
# 127.0.0.1:<port>, reached by pod IP and port over mutual TLS as in the chart (plaintext TCP
# may only read), beside a Falco double that loads the managed files like Falco and reports
# refusals through http_output.

OPERATOR_IDENTITY = "falco-api-operator"
SIDECAR_SERVER_NAME = "falco-api-sidecar"


@dataclass(frozen=True)
class SidecarPki:
    sidecar: TlsFiles  # every sidecar's certificate, named like the chart's (checked by name)
    operator: TlsFiles  # the operator's client certificate
    authz_config: Path  # the sidecars' roles file: the operator may write


@pytest.fixture(scope="session")
def sidecar_pki(tmp_path_factory: pytest.TempPathFactory) -> SidecarPki:
    directory = tmp_path_factory.mktemp("sidecar-pki")
    ca = Authority.create(directory, "falco-api-ca")
    authz_config = directory / "authz.yaml"
    authz_config.write_text(yaml.safe_dump({"roles": {"writer": [OPERATOR_IDENTITY]}}))
    return SidecarPki(
        sidecar=ca.issue(directory, "sidecar", dns_names=(SIDECAR_SERVER_NAME,)),
        operator=ca.issue(directory, OPERATOR_IDENTITY, dns_names=()),
        authz_config=authz_config,
    )


SidecarFactory = Callable[[str], Awaitable[RealSidecar]]


@pytest.fixture
async def sidecar_factory(sidecar_pki: SidecarPki) -> AsyncIterator[SidecarFactory]:
    started: list[RealSidecar] = []

    async def make(node: str) -> RealSidecar:
        sidecar = RealSidecar(node, tls=sidecar_pki.sidecar, authz_config=sidecar_pki.authz_config)
        started.append(sidecar)
        await sidecar.start()
        return sidecar

    yield make
    await asyncio.gather(*(s.close() for s in started))


# --- the API server ---------------------------------------------------------------------------


@pytest.fixture
async def api() -> AsyncIterator[FalcoApiServerEmulator]:
    emulator = FalcoApiServerEmulator()
    for path, kind, namespaced, subresources in (
        (RULES, "FalcoRule", False, {"status"}),
        (CONFIGS, "FalcoConfig", False, {"status"}),
        ("v1/pods", "Pod", True, {"status"}),
        ("v1/nodes", "Node", False, {"status"}),
        ("v1/events", "Event", True, set()),
        ("v1/namespaces", "Namespace", False, set()),
        (
            "admissionregistration.k8s.io/v1/validatingwebhookconfigurations",
            "ValidatingWebhookConfiguration",
            False,
            set(),
        ),
    ):
        emulator.resources[path] = kmock.ResourceInfo(
            kind=kind,
            namespaced=namespaced,
            subresources=subresources,
            verbs={"list", "watch", "get", "create", "patch", "delete"},
        )
    async with emulator, kmock.Server(emulator) as server:
        emulator.base_url = str(server.url).rstrip("/")
        yield emulator


class Kube:
    """What kubectl would do against the emulator."""

    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self.session = session

    async def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        async with self.session.request(
            method, self.url + path, json=body, headers={"Content-Type": content_type}
        ) as response:
            data = await response.json(content_type=None)
            if response.status >= 400:
                raise AssertionError(f"{method} {path}: {response.status} {data}")
            return data

    async def create(self, path: str, body: dict[str, Any]) -> Any:
        return await self.request("POST", path, body)

    async def patch(self, path: str, body: dict[str, Any]) -> Any:
        return await self.request("PATCH", path, body, "application/merge-patch+json")

    async def get(self, path: str) -> Any:
        return await self.request("GET", path)

    async def delete(self, path: str) -> Any:
        return await self.request("DELETE", path)

    async def add_node(self, name: str, labels: dict[str, str] | None = None) -> None:
        await self.create(
            "/api/v1/nodes",
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels or {}}},
        )

    async def add_falco_pod(
        self, node: str, port: int, *, ready: bool = True, name: str | None = None
    ) -> str:
        pod_name = name or f"falco-{node}"
        await self.create(f"/api/v1/namespaces/{NAMESPACE}/pods", falco_pod(pod_name, node, port, ready))
        return pod_name

    async def set_pod(self, name: str, node: str, port: int, *, ready: bool) -> None:
        pod = falco_pod(name, node, port, ready)
        await self.patch(f"/api/v1/namespaces/{NAMESPACE}/pods/{name}", {"status": pod["status"]})

    async def apply_rule(self, name: str, rules: str, *, order: int = 50, **spec: Any) -> Any:
        body = {
            "apiVersion": "falcoapi.io/v1alpha1",
            "kind": "FalcoRule",
            "metadata": {"name": name},
            "spec": {"rules": rules, "order": order, "enabled": True, **spec},
        }
        return await self.create("/apis/falcoapi.io/v1alpha1/falcorules", body)

    async def rule(self, name: str) -> Any:
        return await self.get(f"/apis/falcoapi.io/v1alpha1/falcorules/{name}")


def falco_pod(name: str, node: str, port: int, ready: bool) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": dict(FALCO_LABELS)},
        "spec": {
            "nodeName": node,
            "containers": [
                {"name": "falco"},
                {"name": "falco-api", "ports": [{"name": "falco-api", "containerPort": port}]},
            ],
        },
        "status": {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


@pytest.fixture
async def kube(api: FalcoApiServerEmulator) -> AsyncIterator[Kube]:
    async with aiohttp.ClientSession() as session:
        yield Kube(api.base_url, session)


# --- the operator -----------------------------------------------------------------------------


@dataclass
class RunningOperator:
    runtime: Runtime
    config: OperatorConfig
    stop_flag: threading.Event
    thread: threading.Thread

    async def stop(self) -> None:
        """Stop this operator as its process would stop (a restart starts another one)."""
        self.stop_flag.set()
        await asyncio.to_thread(self.thread.join, 10)


OperatorStarter = Callable[..., Awaitable[RunningOperator]]


@pytest.fixture
async def start_operator(
    api: FalcoApiServerEmulator, sidecar_pki: SidecarPki
) -> AsyncIterator[OperatorStarter]:
    """Run the real operator (kopf) in its own thread and event loop, as its own process would.

    A thread, not a task: when kopf.operator() exits it cancels every task created in its
    loop since it started, which would include the test sidecars' gRPC server tasks.
    """
    running: list[tuple[threading.Event, threading.Thread]] = []

    async def start(**overrides: Any) -> RunningOperator:
        config = OperatorConfig(
            namespace=NAMESPACE,
            tls=sidecar_pki.operator,
            sidecar_server_name=SIDECAR_SERVER_NAME,
            resync_seconds=overrides.pop("resync_seconds", 0),
            status_debounce_seconds=overrides.pop("status_debounce_seconds", 0.2),
            # A real apply returns once Falco reloaded (debounce, dry run, /metrics polls).
            push=PushSettings(call_timeout=10.0, backoff_initial=0.1, backoff_max=0.5, verdict_poll=0.2),
            # Explicit connection: never the environment's KUBECONFIG or the in-cluster account.
            connection=kopf.ConnectionInfo(server=api.base_url, insecure=True),
            **overrides,
        )
        runtime = Runtime(config)
        settings = kopf.OperatorSettings()
        settings.watching.reconnect_backoff = 0.05
        stop, ready = threading.Event(), threading.Event()

        def serve() -> None:
            # The same entry point as the process: what it passes to kopf is under test too.
            asyncio.run(run(config, runtime=runtime, settings=settings, stop_flag=stop, ready_flag=ready))

        thread = threading.Thread(target=serve, name="operator", daemon=True)
        thread.start()
        running.append((stop, thread))
        await asyncio.to_thread(ready.wait, 10)
        assert ready.is_set(), "the operator did not start within 10 s"
        return RunningOperator(runtime, config, stop, thread)

    yield start
    for stop, _ in running:
        stop.set()
    for _, thread in running:
        await asyncio.to_thread(thread.join, 10)


async def eventually(check: Callable[[], Awaitable[bool]] | Callable[[], bool], within: float = 10.0) -> None:
    """Poll until ``check`` holds; the operator is asynchronous by design."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within}s: {getattr(check, '__name__', check)}")
        await asyncio.sleep(0.05)


logging.getLogger("kopf").setLevel(logging.INFO)
