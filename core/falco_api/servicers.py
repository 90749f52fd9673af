"""The streaming and version calls, shared by the sidecar and the relay.

Streams send the bytes each entry was serialised to once (see
:mod:`falco_api.hub`), so these handlers are registered with an identity
response serialiser instead of the generated ``add_*Servicer_to_server``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from falco_api.alerts import Alert
from falco_api.batching import frame
from falco_api.contract.falco import outputs_pb2, version_pb2
from falco_api.contract.falco.api import drops_pb2
from falco_api.filters import AlertFilter, FilterError
from falco_api.hub import Delivery, Gap, Hub, Subscription

LEGACY_OUTPUTS_SERVICE = "falco.outputs.service"
LEGACY_VERSION_SERVICE = "falco.version.service"
STREAMING_SERVICE = "falco.api.streaming"
UNARY_SERVICE = "falco.api.unary"

_MAX_RESUME_ORIGINS = 10_000


class Unavailable(Exception):
    """What a call needs (Falco's webserver, an upstream) cannot be reached right now."""


VersionProvider = Callable[[], Awaitable[version_pb2.response]]


def _identity(payload: bytes) -> bytes:
    return payload


MAX_BATCH = 1000


def _gap_message(gap: Gap) -> bytes:
    return outputs_pb2.response(
        origin=gap.origin,
        gap=outputs_pb2.Gap(
            missed=gap.missed,
            reason=gap.reason,
            origin=gap.origin,
            first_seq=gap.first_seq,
            last_seq=gap.last_seq,
        ),
    ).SerializeToString()


def _missed_before(missed: int) -> bytes:
    # Protobuf merges concatenated messages, so appending this field to the shared
    # bytes of an alert sets missed_before for this subscriber only.
    return outputs_pb2.response(missed_before=missed).SerializeToString()


def _legacy_payload(delivery: Delivery[Alert]) -> bytes | None:
    """Legacy clients never see a loss notice; the count rides on the next alert."""
    if delivery.entry is None:
        return None
    if delivery.gap is not None and delivery.gap.missed:
        return delivery.entry.payload + _missed_before(delivery.gap.missed)
    return delivery.entry.payload


def _api_payloads(delivery: Delivery[Alert]) -> list[bytes]:
    """The streaming API announces a loss once, with a gap notice before the next alert."""
    payloads = []
    if delivery.gap is not None:
        payloads.append(_gap_message(delivery.gap))
    if delivery.entry is not None:
        payloads.append(delivery.entry.payload)
    return payloads


PeerIdentity = Callable[[grpc.aio.ServicerContext[Any, Any]], str]


def peer_of(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    return context.peer() or "unknown"


class OutputsServicer:
    """falco.outputs.service (sub, get) and falco.api.streaming/outputs over one alerts hub."""

    def __init__(self, hub: Hub[Alert], *, peer_identity: PeerIdentity = peer_of) -> None:
        self.hub = hub
        self._peer_identity = peer_identity

    async def _filter(
        self, request: outputs_pb2.request, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AlertFilter:
        if len(request.resume_after) > _MAX_RESUME_ORIGINS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "resume_after names too many origins")
        try:
            return AlertFilter.from_request(request)
        except FilterError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad filter: {error}")
            raise  # abort raises; this keeps type checkers sure we never fall through

    async def get(
        self, request: outputs_pb2.request, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """Legacy: every buffered alert matching the request, then the end."""
        alert_filter = await self._filter(request, context)
        subscription = self.hub.subscribe(
            alert_filter.matches,
            follow=False,
            replay_all=True,
            report_idle_gaps=False,
            peer=self._peer_identity(context),
            method="falco.outputs.service/get",
        )
        while (delivery := await subscription.next()) is not None:
            payload = _legacy_payload(delivery)
            if payload is not None:
                yield payload

    async def sub(
        self,
        request_iterator: AsyncIterator[outputs_pb2.request],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[bytes]:
        """Legacy: live alerts for as long as the client keeps its request stream open."""
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            return
        subscription = self.hub.subscribe(
            (await self._filter(first, context)).matches,
            follow=True,
            report_idle_gaps=False,
            peer=self._peer_identity(context),
            method="falco.outputs.service/sub",
        )
        reader = asyncio.create_task(self._follow_requests(request_iterator, subscription, context))
        try:
            while (delivery := await subscription.next()) is not None:
                payload = _legacy_payload(delivery)
                if payload is not None:
                    yield payload
        finally:
            subscription.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader

    async def _follow_requests(
        self,
        request_iterator: AsyncIterator[outputs_pb2.request],
        subscription: Subscription[Alert],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        # Each further request replaces the filters; the client's half-close ends the stream.
        async for request in request_iterator:
            try:
                subscription.predicate = AlertFilter.from_request(request).matches
            except FilterError as error:
                context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                context.set_details(f"bad filter: {error}")
                break
        subscription.close()

    async def _api_subscription(
        self, request: outputs_pb2.request, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> Subscription[Alert]:
        """The falco.api.streaming view: buffered alerts (per cursor), then live ones if ``follow``."""
        alert_filter = await self._filter(request, context)
        return self.hub.subscribe(
            alert_filter.matches,
            follow=request.follow,
            resume_after=dict(request.resume_after),
            replay_all=not request.follow,
            report_idle_gaps=True,
            peer=self._peer_identity(context),
            method=method,
        )

    async def outputs(
        self, request: outputs_pb2.request, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """falco.api.streaming/outputs: one alert (or loss notice) per message."""
        subscription = await self._api_subscription(request, context, "falco.api.streaming/outputs")
        try:
            while (delivery := await subscription.next()) is not None:
                for payload in _api_payloads(delivery):
                    yield payload
        finally:
            subscription.cancel()

    async def outputs_batched(
        self, request: outputs_pb2.request, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """falco.api.streaming/outputs_batched: the same stream, every ready alert in one message."""
        subscription = await self._api_subscription(request, context, "falco.api.streaming/outputs_batched")
        try:
            while (first := await subscription.next()) is not None:
                deliveries = (first, *subscription.ready(MAX_BATCH - 1))
                yield frame(payload for delivery in deliveries for payload in _api_payloads(delivery))
        finally:
            subscription.cancel()


class DropsServicer:
    """falco.api.streaming/drops over one drops hub."""

    def __init__(self, hub: Hub[drops_pb2.DropReport], *, peer_identity: PeerIdentity = peer_of) -> None:
        self.hub = hub
        self._peer_identity = peer_identity

    async def drops(
        self, request: drops_pb2.DropsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        kinds = frozenset(request.kinds)
        subscription = self.hub.subscribe(
            (lambda report: report.kind in kinds) if kinds else (lambda _report: True),
            follow=request.follow,
            replay_all=True,
            peer=self._peer_identity(context),
            method="falco.api.streaming/drops",
        )
        try:
            while (delivery := await subscription.next()) is not None:
                if delivery.gap is not None:
                    yield drops_pb2.DropReport(
                        kind=drops_pb2.DROP_KIND_SUBSCRIBER_OVERFLOW,
                        dropped=delivery.gap.missed,
                        subscriber_overflow=drops_pb2.SubscriberOverflow(
                            peer=subscription.peer, method=subscription.method, missed=delivery.gap.missed
                        ),
                    ).SerializeToString()
                if delivery.entry is not None:
                    yield delivery.entry.payload
        finally:
            subscription.cancel()


class VersionServicer:
    """falco.version.service/version and falco.api.unary/version."""

    def __init__(self, provider: VersionProvider) -> None:
        self._provider = provider

    async def version(
        self, request: version_pb2.request, context: grpc.aio.ServicerContext[Any, Any]
    ) -> version_pb2.response:
        try:
            return await self._provider()
        except Unavailable as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
            raise


def outputs_handlers(servicer: OutputsServicer) -> list[grpc.GenericRpcHandler[Any, Any]]:
    request = outputs_pb2.request.FromString
    return [
        grpc.method_handlers_generic_handler(
            LEGACY_OUTPUTS_SERVICE,
            {
                "sub": grpc.stream_stream_rpc_method_handler(
                    servicer.sub, request_deserializer=request, response_serializer=_identity
                ),
                "get": grpc.unary_stream_rpc_method_handler(
                    servicer.get, request_deserializer=request, response_serializer=_identity
                ),
            },
        )
    ]


def streaming_handlers(
    outputs: OutputsServicer, drops: DropsServicer
) -> list[grpc.GenericRpcHandler[Any, Any]]:
    return [
        grpc.method_handlers_generic_handler(
            STREAMING_SERVICE,
            {
                "outputs": grpc.unary_stream_rpc_method_handler(
                    outputs.outputs,
                    request_deserializer=outputs_pb2.request.FromString,
                    response_serializer=_identity,
                ),
                "outputs_batched": grpc.unary_stream_rpc_method_handler(
                    outputs.outputs_batched,
                    request_deserializer=outputs_pb2.request.FromString,
                    response_serializer=_identity,
                ),
                "drops": grpc.unary_stream_rpc_method_handler(
                    drops.drops,
                    request_deserializer=drops_pb2.DropsRequest.FromString,
                    response_serializer=_identity,
                ),
            },
        )
    ]


def version_handlers(
    servicer: VersionServicer, service: str = LEGACY_VERSION_SERVICE
) -> list[grpc.GenericRpcHandler[Any, Any]]:
    """The `version` call under ``service``: falco.version.service, or falco.api.unary alone (a server
    without rules and configs, such as the relay, whose other unary calls answer UNIMPLEMENTED)."""
    return [
        grpc.method_handlers_generic_handler(
            service,
            {
                "version": grpc.unary_unary_rpc_method_handler(
                    servicer.version,
                    request_deserializer=version_pb2.request.FromString,
                    response_serializer=version_pb2.response.SerializeToString,
                )
            },
        )
    ]
