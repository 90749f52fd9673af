"""The falco-api-relay command as a process: SIGTERM, and discovery without credentials."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.relay.conftest import wait_until

RELAY = [sys.executable, "-m", "falco_api_relay.main"]


def clean_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("KUBECONFIG", "HOME")}
    env["HOME"] = "/nonexistent"  # no ~/.kube/config either
    return env


async def test_sigterm_stops_the_relay_gracefully() -> None:
    directory = Path(tempfile.mkdtemp(prefix="frelay-"))
    socket_path = directory / "relay.sock"
    process = await asyncio.create_subprocess_exec(
        *RELAY,
        "--grpc-listen",
        f"unix://{socket_path}",
        "--upstream",
        f"unix://{directory}/absent-sidecar.sock",
        "--grace",
        "0.5",
        env=clean_env(),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_until(socket_path.exists, "the relay's socket", seconds=20)
        async with grpc.aio.insecure_channel(f"unix://{socket_path}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="falco.api.streaming"), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
        assert process.stderr is not None
        log = (await process.stderr.read()).decode()
        assert "stopping: draining streams" in log
        assert "reconnecting in" in log  # the absent sidecar is retried, not fatal
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_discovery_without_credentials_exits_with_a_clear_error() -> None:
    directory = Path(tempfile.mkdtemp(prefix="frelay-"))
    process = await asyncio.create_subprocess_exec(
        *RELAY,
        "--grpc-listen",
        f"unix://{directory}/relay.sock",
        "--insecure",
        env=clean_env(),
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    assert "falco-api-relay: no Kubernetes credentials" in stderr.decode()
