"""falco.api.unary: version now; rules, configs and apply are added by the managed-files layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from falco_api.contract.falco import version_pb2
from falco_api.contract.falco.api import unary_pb2_grpc
from falco_api.servicers import VersionServicer


class UnaryServicer(unary_pb2_grpc.unaryServicer):
    def __init__(self, version: VersionServicer) -> None:
        self._version = version

    async def version(  # type: ignore[override]
        self, request: version_pb2.request, context: grpc.aio.ServicerContext[Any, Any]
    ) -> version_pb2.response:
        return await self._version.version(request, context)


def register_unary(servicer: UnaryServicer) -> Callable[[grpc.aio.Server], None]:
    def register(server: grpc.aio.Server) -> None:
        unary_pb2_grpc.add_unaryServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]

    return register
