"""falco.api.bidirectional/inputs: Kubernetes audit events from clients to Falco's k8saudit plugin.

Falco's k8saudit webhook answers 200 before it parses a payload and then only *logs* the
payloads and events it cannot use, so a client would never learn that its event was lost.
Every message is therefore validated here the way the plugin reads it (an ``Event`` or an
``EventList`` whose events each carry an RFC 3339 ``stageTimestamp`` and fit the plugin's
per-event size) before it is forwarded, and every message gets exactly one acknowledgement,
in request order.

Flow control: at most ``window`` messages are between "read from the client" and
"acknowledged"; when the window is full the server stops reading, so HTTP/2 flow control
pushes back on the client instead of anything being buffered without bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import enum
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from falco_api.contract.falco.api import inputs_pb2

log = logging.getLogger(__name__)

BIDIRECTIONAL_SERVICE = "falco.api.bidirectional"
DEFAULT_K8SAUDIT_URL = "http://127.0.0.1:9765/k8s-audit"
AUDIT_API_VERSION = "audit.k8s.io/v1"
# The k8saudit plugin's default maxEventSize: a bigger event is dropped by the plugin.
PLUGIN_MAX_EVENT_BYTES = 262_144

_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")


@dataclass(frozen=True)
class InputsLimits:
    max_message_bytes: int = 1024 * 1024
    max_events: int = 1000
    max_event_bytes: int = PLUGIN_MAX_EVENT_BYTES
    window: int = 64
    forward_timeout: float = 5.0
    # Consecutive forwards in one call that could not connect before the call ends UNAVAILABLE.
    unreachable_limit: int = 16

    def __post_init__(self) -> None:
        if self.max_message_bytes < 1 or self.max_events < 1 or self.max_event_bytes < 1:
            raise ValueError("inputs limits must be positive")
        if self.window < 1 or self.unreachable_limit < 1:
            raise ValueError("inputs window and unreachable limit must be at least 1")
        if self.forward_timeout <= 0:
            raise ValueError("inputs forward timeout must be positive")


class RejectKind(enum.StrEnum):
    EMPTY = "empty"
    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    NOT_AUDIT = "not_audit"
    TOO_MANY_EVENTS = "too_many_events"
    BAD_EVENT = "bad_event"
    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"
    HTTP_ERROR = "http_error"


@dataclass(frozen=True)
class Validated:
    body: bytes
    events: int


@dataclass(frozen=True)
class Rejected:
    kind: RejectKind
    reason: str
    events: int = 0


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _event_problem(event: Any, limits: InputsLimits) -> str | None:
    if not isinstance(event, dict):
        return "is not a JSON object"
    kind = event.get("kind")
    if kind is not None and kind != "Event":
        return f"has kind {kind!r}, expected 'Event'"
    stamp = event.get("stageTimestamp")
    if stamp is None:
        return "has no stageTimestamp (Falco's k8saudit plugin drops such events)"
    if not isinstance(stamp, str) or not _RFC3339.match(stamp):
        return f"has stageTimestamp {str(stamp)[:40]!r}, which is not RFC 3339"
    try:
        datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return f"has stageTimestamp {stamp!r}, which is not a real time"
    size = len(json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode())
    if size > limits.max_event_bytes:
        return f"is {size} bytes, over the plugin's per-event limit of {limits.max_event_bytes}"
    return None


def validate_audit_json(text: str, limits: InputsLimits) -> Validated | Rejected:
    """Check one message the way the k8saudit plugin will read it; the body is forwarded unchanged."""
    body = text.encode("utf-8")
    if not body.strip():
        return Rejected(RejectKind.EMPTY, "no k8s_audit_json in the request")
    if len(body) > limits.max_message_bytes:
        return Rejected(
            RejectKind.TOO_LARGE,
            f"message is {len(body)} bytes, over the limit of {limits.max_message_bytes}",
        )
    try:
        document = json.loads(body, parse_constant=_reject_constant)
    except json.JSONDecodeError as error:
        return Rejected(
            RejectKind.MALFORMED, f"malformed JSON at line {error.lineno} column {error.colno}: {error.msg}"
        )
    except (ValueError, RecursionError) as error:
        message = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        return Rejected(RejectKind.MALFORMED, f"malformed JSON: {message}")
    if not isinstance(document, dict):
        return Rejected(RejectKind.NOT_AUDIT, f"expected a JSON object, got {type(document).__name__}")
    kind = document.get("kind")
    api_version = document.get("apiVersion")
    if kind not in ("Event", "EventList"):
        return Rejected(RejectKind.NOT_AUDIT, f"kind is {kind!r}, expected 'Event' or 'EventList'")
    if api_version != AUDIT_API_VERSION:
        return Rejected(
            RejectKind.NOT_AUDIT, f"apiVersion is {api_version!r}, expected {AUDIT_API_VERSION!r}"
        )
    if kind == "Event":
        problem = _event_problem(document, limits)
        if problem:
            return Rejected(RejectKind.BAD_EVENT, f"event {problem}", events=1)
        return Validated(body, 1)
    items = document.get("items")
    if not isinstance(items, list):
        return Rejected(RejectKind.NOT_AUDIT, "EventList has no 'items' list")
    if not items:
        return Rejected(RejectKind.NOT_AUDIT, "EventList has no items")
    if len(items) > limits.max_events:
        return Rejected(
            RejectKind.TOO_MANY_EVENTS,
            f"EventList has {len(items)} events, over the limit of {limits.max_events}",
            events=len(items),
        )
    for index, item in enumerate(items):
        problem = _event_problem(item, limits)
        if problem:
            return Rejected(RejectKind.BAD_EVENT, f"items[{index}] {problem}", events=len(items))
    return Validated(body, len(items))


class K8sAuditForwarder:
    """POSTs validated payloads to the k8saudit webhook; turns every failure into a reason."""

    def __init__(
        self, url: str = DEFAULT_K8SAUDIT_URL, *, timeout: float = 5.0, max_connections: int = 64
    ) -> None:
        self.url = url
        self.timeout = timeout
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
        return self._session

    async def forward(self, body: bytes, events: int) -> Rejected | None:
        """None when the webhook took the payload."""
        try:
            async with self._client().post(
                self.url, data=body, headers={"Content-Type": "application/json"}
            ) as reply:
                if 200 <= reply.status < 300:
                    return None
                detail = (await reply.text(errors="replace")).strip()[:200]
                return Rejected(
                    RejectKind.HTTP_ERROR,
                    f"k8saudit webhook {self.url} answered HTTP {reply.status}"
                    + (f": {detail}" if detail else ""),
                    events,
                )
        except TimeoutError:
            return Rejected(
                RejectKind.TIMEOUT,
                f"k8saudit webhook {self.url} did not answer within {self.timeout:g} s",
                events,
            )
        except (aiohttp.ClientConnectionError, OSError) as error:
            return Rejected(
                RejectKind.UNREACHABLE, f"k8saudit webhook {self.url} unreachable: {error}", events
            )
        except aiohttp.ClientError as error:
            return Rejected(RejectKind.HTTP_ERROR, f"k8saudit webhook {self.url} failed: {error}", events)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


@dataclass
class InputsStats:
    """Counters for metrics; plain ints so any exporter can read them."""

    calls: int = 0
    messages_accepted: int = 0
    events_accepted: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: {kind.value: 0 for kind in RejectKind})
    forwards_in_flight: int = 0
    max_forwards_in_flight: int = 0
    calls_ended_unavailable: int = 0

    def count(self, outcome: Validated | Rejected) -> None:
        if isinstance(outcome, Rejected):
            self.rejected[outcome.kind.value] = self.rejected.get(outcome.kind.value, 0) + 1
        else:
            self.messages_accepted += 1
            self.events_accepted += outcome.events


class InputsCollector(Collector):
    """Prometheus view of :class:`InputsStats`, read at scrape time."""

    def __init__(self, stats: InputsStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self._stats
        yield CounterMetricFamily("falco_api_inputs_calls", "Inputs streams opened", value=stats.calls)
        yield CounterMetricFamily(
            "falco_api_inputs_accepted",
            "Inputs messages taken by the k8saudit webhook",
            value=stats.messages_accepted,
        )
        yield CounterMetricFamily(
            "falco_api_inputs_events_accepted",
            "Audit events in accepted messages",
            value=stats.events_accepted,
        )
        rejected = CounterMetricFamily(
            "falco_api_inputs_rejected", "Inputs messages rejected, by reason", labels=["reason"]
        )
        for reason, count in sorted(stats.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield GaugeMetricFamily(
            "falco_api_inputs_forwards_in_flight",
            "Forwards to the webhook in progress",
            value=stats.forwards_in_flight,
        )
        yield CounterMetricFamily(
            "falco_api_inputs_calls_unavailable",
            "Inputs streams ended UNAVAILABLE because the webhook stayed unreachable",
            value=stats.calls_ended_unavailable,
        )


@dataclass
class _CallState:
    consecutive_unreachable: int = 0
    last_unreachable: str = ""
    gave_up: bool = False


Pending = tuple[int, "asyncio.Future[Validated | Rejected]"]


class InputsServicer:
    def __init__(
        self,
        forwarder: K8sAuditForwarder,
        limits: InputsLimits | None = None,
        stats: InputsStats | None = None,
    ) -> None:
        self.forwarder = forwarder
        self.limits = limits or InputsLimits()
        self.stats = stats or InputsStats()

    async def close(self) -> None:
        await self.forwarder.close()

    async def _forward(
        self, validated: Validated, call: _CallState, reader: asyncio.Task[Any]
    ) -> Validated | Rejected:
        self.stats.forwards_in_flight += 1
        self.stats.max_forwards_in_flight = max(
            self.stats.max_forwards_in_flight, self.stats.forwards_in_flight
        )
        try:
            rejected = await self.forwarder.forward(validated.body, validated.events)
        finally:
            self.stats.forwards_in_flight -= 1
        if rejected is None:
            call.consecutive_unreachable = 0
            return validated
        if rejected.kind is RejectKind.UNREACHABLE:
            call.consecutive_unreachable += 1
            call.last_unreachable = rejected.reason
            if call.consecutive_unreachable >= self.limits.unreachable_limit and not call.gave_up:
                # Stop taking more messages; what was read is still acknowledged below.
                call.gave_up = True
                reader.cancel()
        return rejected

    def _start(
        self, request: inputs_pb2.InputsRequest, call: _CallState, reader: asyncio.Task[Any]
    ) -> Pending:
        outcome = validate_audit_json(request.k8s_audit_json, self.limits)
        if isinstance(outcome, Rejected):
            done: asyncio.Future[Validated | Rejected] = asyncio.get_running_loop().create_future()
            done.set_result(outcome)
            return request.id, done
        return request.id, asyncio.ensure_future(self._forward(outcome, call, reader))

    async def _read(
        self,
        request_iterator: AsyncIterator[inputs_pb2.InputsRequest],
        pending: asyncio.Queue[Pending | None],
        slots: asyncio.Semaphore,
        call: _CallState,
    ) -> None:
        this_task = asyncio.current_task()
        assert this_task is not None
        iterator = aiter(request_iterator)
        try:
            while True:
                await slots.acquire()
                try:
                    request = await anext(iterator)
                except StopAsyncIteration:
                    return
                pending.put_nowait(self._start(request, call, this_task))
        finally:
            pending.put_nowait(None)

    async def inputs(
        self,
        request_iterator: AsyncIterator[inputs_pb2.InputsRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[inputs_pb2.InputsResponse]:
        self.stats.calls += 1
        call = _CallState()
        slots = asyncio.Semaphore(self.limits.window)
        # Bounded by ``slots``: the reader takes a slot before reading each message.
        pending: asyncio.Queue[Pending | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read(request_iterator, pending, slots, call))
        outstanding: list[asyncio.Future[Validated | Rejected]] = []
        try:
            while (item := await pending.get()) is not None:
                request_id, future = item
                outstanding.append(future)
                outcome = await future
                outstanding.remove(future)
                self.stats.count(outcome)
                if isinstance(outcome, Rejected):
                    yield inputs_pb2.InputsResponse(
                        id=request_id, accepted=False, reason=outcome.reason, events=outcome.events
                    )
                else:
                    yield inputs_pb2.InputsResponse(id=request_id, accepted=True, events=outcome.events)
                slots.release()
            if call.gave_up:
                self.stats.calls_ended_unavailable += 1
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"{call.last_unreachable} ({call.consecutive_unreachable} forwards in a row failed); "
                    "every message read was acknowledged, the rest were not read",
                )
            # Re-raise a failure of the request stream itself (e.g. a message that would not decode).
            await reader
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader
            while not pending.empty():
                item = pending.get_nowait()
                if item is not None:
                    outstanding.append(item[1])
            for future in outstanding:
                future.cancel()


def inputs_handlers(servicer: InputsServicer) -> list[grpc.GenericRpcHandler[Any, Any]]:
    return [
        grpc.method_handlers_generic_handler(
            BIDIRECTIONAL_SERVICE,
            {
                "inputs": grpc.stream_stream_rpc_method_handler(
                    servicer.inputs,
                    request_deserializer=inputs_pb2.InputsRequest.FromString,
                    response_serializer=inputs_pb2.InputsResponse.SerializeToString,
                )
            },
        )
    ]


def add_inputs_arguments(parser: argparse.ArgumentParser) -> None:
    """The sidecar's flags for the inputs service."""
    defaults = InputsLimits()
    group = parser.add_argument_group("inputs (falco.api.bidirectional/inputs)")
    group.add_argument(
        "--k8saudit-url",
        default=DEFAULT_K8SAUDIT_URL,
        help="Falco's k8saudit plugin webhook (default: %(default)s)",
    )
    group.add_argument(
        "--inputs-max-message-bytes",
        type=int,
        default=defaults.max_message_bytes,
        help="largest k8s_audit_json accepted, bytes (default: %(default)s)",
    )
    group.add_argument(
        "--inputs-max-events",
        type=int,
        default=defaults.max_events,
        help="most audit events in one message (default: %(default)s)",
    )
    group.add_argument(
        "--inputs-window",
        type=int,
        default=defaults.window,
        help="messages in flight per call before reading pauses (default: %(default)s)",
    )
    group.add_argument(
        "--inputs-timeout",
        type=float,
        default=defaults.forward_timeout,
        help="seconds the webhook gets per message (default: %(default)s)",
    )


def inputs_limits_from_args(args: argparse.Namespace) -> InputsLimits:
    """Raises ValueError with a clear message for out-of-range flags."""
    return InputsLimits(
        max_message_bytes=args.inputs_max_message_bytes,
        max_events=args.inputs_max_events,
        window=args.inputs_window,
        forward_timeout=args.inputs_timeout,
    )


def create_inputs_servicer(k8saudit_url: str, limits: InputsLimits) -> InputsServicer:
    """The servicer the sidecar serves; raises ValueError for a URL that is not http(s)."""
    if not k8saudit_url.startswith(("http://", "https://")):
        raise ValueError(f"--k8saudit-url must be an http(s) URL, got {k8saudit_url!r}")
    forwarder = K8sAuditForwarder(k8saudit_url, timeout=limits.forward_timeout, max_connections=limits.window)
    return InputsServicer(forwarder, limits)


def inputs_servicer_from_args(args: argparse.Namespace) -> InputsServicer:
    return create_inputs_servicer(str(args.k8saudit_url), inputs_limits_from_args(args))
