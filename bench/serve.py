"""The servers the benchmarks measure, each in its own process (started by the scenarios).

- ``sidecar``: the real :class:`Sidecar` (HTTP ingest, gRPC, metrics) plus line ingest on a unix socket;
- ``bare-http``: an aiohttp server that reads each POST body and answers 204, nothing else;
- ``bare-grpc``: a grpc.aio server streaming one pre-serialised alert response N times per call.

Prints one JSON line with its addresses on stdout once it is serving; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from bench.workload import alert_body
from falco_api.alerts import parse_alert
from falco_api_sidecar.line_ingest import start_line_ingest
from falco_api_sidecar.main import Sidecar, SidecarConfig

BARE_METHOD = "/bench.Bare/stream"


def _identity(payload: bytes) -> bytes:
    return payload


async def _wait_for_sigterm() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


def _announce(info: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(info) + "\n")
    sys.stdout.flush()


async def serve_sidecar(socket_dir: Path, queue_size: int) -> None:
    config = SidecarConfig(
        grpc_listen=f"unix://{socket_dir}/api.sock",
        ingest_listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
        falco_url="http://127.0.0.1:9",  # version calls are not benchmarked
        node_name="bench-node",
        queue_size=queue_size,
        grace=0.5,
    )
    sidecar = Sidecar(config)
    await sidecar.start()
    lines = await start_line_ingest(sidecar.streams, f"unix://{socket_dir}/alerts.sock")
    _announce(
        {
            "grpc": sidecar.config.grpc_listen,
            "http_port": sidecar.ingest_port,
            "metrics_port": sidecar.metrics_port,
            "line": lines.address,
        }
    )
    await _wait_for_sigterm()
    await lines.stop()
    await sidecar.stop()


async def serve_bare_http() -> None:
    async def accept(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)

    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post("/{tail:.*}", accept)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    sockets = getattr(site._server, "sockets", None) or []
    _announce({"http_port": int(sockets[0].getsockname()[1])})
    await _wait_for_sigterm()
    await runner.cleanup()


async def serve_bare_grpc(socket_dir: Path) -> None:
    payload = parse_alert(alert_body(1)).to_response(seq=1, origin="bench/1").SerializeToString()

    async def stream(request: bytes, _context: Any) -> AsyncIterator[bytes]:
        for _ in range(int(request or b"0")):
            yield payload

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "bench.Bare",
                {
                    "stream": grpc.unary_stream_rpc_method_handler(
                        stream, request_deserializer=_identity, response_serializer=_identity
                    )
                },
            ),
        )
    )
    address = f"unix://{socket_dir}/bare.sock"
    server.add_insecure_port(address)
    await server.start()
    _announce({"grpc": address})
    await _wait_for_sigterm()
    await server.stop(0.2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["sidecar", "bare-http", "bare-grpc"])
    parser.add_argument("--socket-dir", type=Path, required=True)
    parser.add_argument("--queue-size", type=int, default=10_000)
    args = parser.parse_args()
    if args.mode == "sidecar":
        asyncio.run(serve_sidecar(args.socket_dir, args.queue_size))
    elif args.mode == "bare-http":
        asyncio.run(serve_bare_http())
    else:
        asyncio.run(serve_bare_grpc(args.socket_dir))


if __name__ == "__main__":
    main()
