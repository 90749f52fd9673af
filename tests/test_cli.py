"""The falco-api CLI against a real sidecar, and its errors when things are wrong."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from falco_api.testing.falco_double import rule_alert, syscall_drop_alert
from tests.certs import Pki
from tests.conftest import RunningSidecar


async def run_cli(*argv: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "falco_api.cli",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_version_and_events_snapshot(sidecar: RunningSidecar) -> None:
    for index in range(3):
        await sidecar.post(rule_alert("node-a", index=index))
    await sidecar.post(syscall_drop_alert("node-a", n_drops=1))
    code, out, err = await run_cli("--server", sidecar.grpc_target, "version")
    assert code == 0, err
    assert "Falco 0.43.0" in out and "engine 0.52.0" in out

    code, out, err = await run_cli(
        "--server", sidecar.grpc_target, "events", "-o", "json", "--min-priority", "warning"
    )
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["priority"] for line in lines] == ["Warning", "Critical"]
    assert lines[0]["output_fields"] == rule_alert("node-a", index=1)["output_fields"] | {
        "evt.time": lines[0]["output_fields"]["evt.time"]
    }
    assert [line["seq"] for line in lines] == [2, 3]

    code, out, err = await run_cli("--server", sidecar.grpc_target, "events", "--source", "internal")
    assert code == 0 and "Falco internal: syscall event drop" in out and len(out.splitlines()) == 1

    code, out, err = await run_cli("--server", sidecar.grpc_target, "drops", "-o", "json")
    assert code == 0 and json.loads(out)["syscall_event"]["n_drops"] == "1"


async def test_events_follow_streams_live(sidecar: RunningSidecar) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "falco_api.cli",
        "--server",
        sidecar.grpc_target,
        "events",
        "--follow",
        "--no-internal",
        stdout=asyncio.subprocess.PIPE,
    )
    for _ in range(500):
        if sidecar.sidecar.streams.alerts.subscriptions:
            break
        await asyncio.sleep(0.01)
    await sidecar.post(syscall_drop_alert("node-a", n_drops=1))
    await sidecar.post(rule_alert("node-a", index=0))
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 10)
    assert b"[Terminal shell in container]" in line
    process.terminate()
    await process.wait()


def test_readable_errors() -> None:
    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "falco_api.cli", *argv], capture_output=True, text=True, timeout=30
        )

    down = run("--server", "unix:///nonexistent/falco-api.sock", "version")
    assert down.returncode == 1 and "cannot reach unix:///nonexistent/falco-api.sock" in down.stderr
    assert "Traceback" not in down.stderr
    plain = run("--server", "127.0.0.1:1", "version")
    assert plain.returncode == 2 and "refusing plain TCP" in plain.stderr
    bad = run("--server", "unix:///x", "events", "--min-priority", "severe")
    assert bad.returncode == 2 and "unknown priority 'severe'" in bad.stderr
    resume = run("--server", "unix:///x", "events", "--resume", "nope")
    assert resume.returncode == 2 and "ORIGIN=SEQ" in resume.stderr


async def test_wrong_certificate_is_explained(pki: Pki, falco_double: object) -> None:
    from falco_api_sidecar.main import Sidecar, SidecarConfig

    sidecar = Sidecar(
        SidecarConfig(
            grpc_listen="127.0.0.1:0",
            ingest_listen="127.0.0.1:0",
            metrics_listen=None,
            falco_url="http://127.0.0.1:1",
            tls=pki.server,
            grace=0.2,
        )
    )
    await sidecar.start()
    try:
        code, _out, err = await run_cli(
            "--server",
            f"127.0.0.1:{sidecar.grpc_port}",
            "--tls-cert",
            pki.client.cert,
            "--tls-key",
            pki.client.key,
            "--tls-ca",
            str(pki.stranger_ca.path),
            "--tls-server-name",
            "localhost",
            "version",
        )
        assert code == 1 and "cannot reach" in err and "Traceback" not in err
    finally:
        await sidecar.stop()


def test_rules_validate(tmp_path: object) -> None:
    from pathlib import Path

    folder = Path(str(tmp_path))
    good = folder / "good.yaml"
    good.write_text("- macro: spawned\n  condition: evt.type = execve\n")
    bad = folder / "bad.yaml"
    bad.write_text(
        "- rule: Broken\n  desc: d\n  condition: spawned and not nowhere_macro\n"
        "  output: x\n  priority: WARNING\n"
    )

    def run(*paths: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "falco_api.cli", "rules", "validate", *map(str, paths)],
            capture_output=True,
            text=True,
            timeout=30,
        )

    ok = run(good)
    assert ok.returncode == 0 and ok.stdout == "" and "0 error(s)" in ok.stderr
    broken = run(good, bad)
    assert broken.returncode == 1
    assert (
        f"{bad}:3:" in broken.stdout and "rule 'Broken'" in broken.stdout and "nowhere_macro" in broken.stdout
    )
    missing = run(folder / "missing.yaml")
    assert missing.returncode == 1 and "missing.yaml" in missing.stdout


async def test_events_from_a_server_without_the_batched_stream() -> None:
    """An older sidecar or relay answers UNIMPLEMENTED for outputs_batched: the CLI reads alert by alert."""
    import grpc

    from falco_api.alerts import parse_alert
    from falco_api.contract.falco import outputs_pb2
    from falco_api.servicers import STREAMING_SERVICE, OutputsServicer
    from falco_api.streams import EventStreams

    streams = EventStreams(origin="old/1", hostname="old")
    for index in range(3):
        streams.ingest(parse_alert(json.dumps(rule_alert("old", index=index))))
    servicer = OutputsServicer(streams.alerts)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                STREAMING_SERVICE,
                {
                    "outputs": grpc.unary_stream_rpc_method_handler(
                        servicer.outputs,
                        request_deserializer=outputs_pb2.request.FromString,
                        response_serializer=bytes,
                    )
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        code, out, err = await run_cli("--server", f"127.0.0.1:{port}", "--insecure", "events", "-o", "json")
        assert code == 0, err
        assert [json.loads(line)["seq"] for line in out.splitlines()] == [1, 2, 3]
    finally:
        await server.stop(0.5)
