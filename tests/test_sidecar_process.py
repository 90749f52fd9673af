"""falco-api-sidecar as a process: starts, serves, and drains streams on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
import tempfile
from pathlib import Path

import grpc

from falco_api.contract.falco import outputs_pb2
from falco_api.contract.falco.api import streaming_pb2_grpc
from falco_api.testing.falco_double import AlertPoster, FalcoDouble, rule_alert


async def test_sigterm_ends_streams_and_exits_cleanly(falco_double: FalcoDouble) -> None:
    socket_path = Path(tempfile.mkdtemp(prefix="fapi-")) / "api.sock"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "falco_api_sidecar.main",
        "--grpc-listen",
        f"unix://{socket_path}",
        "--ingest-listen",
        "127.0.0.1:28801",
        "--metrics-listen",
        "off",
        "--falco-url",
        falco_double.url,
        "--grace",
        "3",
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        for _ in range(500):
            if socket_path.exists():
                break
            await asyncio.sleep(0.02)
        assert socket_path.exists()
        assert oct(socket_path.stat().st_mode & 0o777) == oct(0o660)
        async with grpc.aio.insecure_channel(f"unix://{socket_path}") as channel:
            stream = streaming_pb2_grpc.streamingStub(channel).outputs(outputs_pb2.request(follow=True))
            await asyncio.sleep(0.2)
            poster = AlertPoster("http://127.0.0.1:28801/")
            assert await poster.post(rule_alert("n", index=0)) == 204
            await poster.close()
            first = await asyncio.wait_for(stream.read(), 5)
            assert first.rule == "Terminal shell in container"
            process.send_signal(signal.SIGTERM)
            # The follow stream ends cleanly (OK), well within the grace period.
            end = await asyncio.wait_for(stream.read(), 5)
            assert end is grpc.aio.EOF
            assert await stream.code() == grpc.StatusCode.OK
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.stderr is not None
    log = (await process.stderr.read()).decode()
    assert "stopping: draining streams" in log
