"""A client generated only from Falco 0.43's protos talks to the sidecar unchanged."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from grpc_tools import protoc

from falco_api.testing.falco_double import rule_alert, syscall_drop_alert
from tests.conftest import RunningSidecar

LEGACY = Path(__file__).parent / "legacy_proto"


def generate_legacy_client(out: Path) -> None:
    include = Path(protoc.__file__).parent / "_proto"
    code = protoc.main(
        [
            "protoc",
            f"-I{LEGACY}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "schema.proto",
            "outputs.proto",
            "version.proto",
        ]
    )
    assert code == 0


async def test_falco_043_client_calls_version_get_and_sub(sidecar: RunningSidecar, tmp_path: Path) -> None:
    generate_legacy_client(tmp_path)
    for index in range(3):
        assert await sidecar.post(rule_alert("node-a", index=index)) == 204
    assert await sidecar.post(syscall_drop_alert("node-a", n_drops=2)) == 204
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        str(LEGACY / "legacy_client.py"),
        str(tmp_path),
        sidecar.grpc_target,
        "2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    for _ in range(1000):
        if sidecar.sidecar.streams.alerts.subscriptions:
            break
        await asyncio.sleep(0.01)
    assert sidecar.sidecar.streams.alerts.subscriptions, "the legacy client never subscribed"
    await sidecar.post(rule_alert("node-a", index=2))
    await sidecar.post(rule_alert("node-a", index=1))
    stdout, stderr = await asyncio.wait_for(client.communicate(), 30)
    assert client.returncode == 0, stderr.decode()
    result = json.loads(stdout)

    assert result["version"] == ["0.43.0", 0, 43, 0, 0, 52, 0, "0.52.0"]
    got = result["get"]
    assert [alert["rule"] for alert in got] == [
        "Terminal shell in container",
        "Read sensitive file untrusted",
        "Drop and execute new binary in container",
        "Falco internal: syscall event drop",
    ]
    first = got[0]
    raw = rule_alert("node-a", index=0)
    assert first["priority"] == 5 and first["source"] == "syscall" and first["deprecated_source"] == 0
    assert first["hostname"] == "node-a" and first["tags"] == raw["tags"]
    assert first["fields"]["proc.name"] == "bash" and first["fields"]["user.uid"] == "0"
    assert got[3]["source"] == "internal" and got[3]["deprecated_source"] == 2 and got[3]["priority"] == 7
    assert result["sub"] == ["Drop and execute new binary in container", "Read sensitive file untrusted"]
    assert result["sub_error"] == ""
