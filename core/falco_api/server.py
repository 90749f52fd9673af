"""A grpc.aio server with what every falco-api server has: health, reflection, the
transport rule, and a graceful stop."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from falco_api.tls import UNIX_PREFIX, TlsFiles, add_listener, is_unix

log = logging.getLogger(__name__)

# Streams are long-lived: keepalives find dead peers (a node that vanished) so
# their subscriptions are released instead of lingering.
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
]


@dataclass
class RunningServer:
    server: grpc.aio.Server
    health: Any  # grpc_health's asyncio HealthServicer (untyped)
    address: str
    port: int
    service_names: tuple[str, ...]

    async def stop(self, grace: float) -> None:
        """Say NOT_SERVING, then give in-flight calls ``grace`` seconds before cancelling them."""
        for name in ("", *self.service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)


async def start_server(
    address: str,
    *,
    tls: TlsFiles | None,
    insecure: bool,
    handlers: Sequence[grpc.GenericRpcHandler[Any, Any]],
    service_names: Sequence[str],
    register: Sequence[Callable[[grpc.aio.Server], None]] = (),
    interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
) -> RunningServer:
    """``handlers`` are generic handlers; ``register`` takes generated ``add_*_to_server`` helpers."""
    server = grpc.aio.server(interceptors=list(interceptors), options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers(tuple(handlers))
    for add_to_server in register:
        add_to_server(server)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = add_listener(server, address, tls=tls, insecure=insecure)
    await server.start()
    if is_unix(address):
        # Local admin access: only the owner and its group may connect.
        os.chmod(address[len(UNIX_PREFIX) :], 0o660)
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("gRPC listening on %s (%s)", address, "mTLS" if tls and not is_unix(address) else "local/plain")
    return RunningServer(server, health_servicer, address, port, tuple(service_names))
