"""Upstream connections: one task per sidecar, following its outputs and drops streams.

Each :class:`Upstream` keeps a :class:`~falco_api_relay.merge.Cursor` (the last
origin and seq it received) and subscribes with ``resume_after`` set to it, so a
reconnect (sidecar restart, network blip) continues exactly where it stopped,
within the sidecar's replay buffer; beyond it, the sidecar's gap is passed on.
Between attempts it waits with exponential backoff and jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import cast

import grpc

from falco_api import __version__
from falco_api.backoff import backoff_delay
from falco_api.batching import BatchError, unframe
from falco_api.contract.falco import outputs_pb2, version_pb2
from falco_api.contract.falco.api import drops_pb2
from falco_api.servicers import STREAMING_SERVICE, UNARY_SERVICE, Unavailable
from falco_api.tls import TlsFiles, open_channel
from falco_api_relay.merge import Cursor, MalformedResponse, RelayStreams, UpstreamStatus, describe
from falco_api_relay.targets import Plan, UpstreamTarget, plan_changes

log = logging.getLogger("falco_api_relay.upstream")

# Batched: under load one message carries every alert the sidecar had ready for us. Sidecars of a
# version without it (a relay upgraded first) answer UNIMPLEMENTED: then the per-alert stream.
BATCHED_OUTPUTS_METHOD = f"/{STREAMING_SERVICE}/outputs_batched"
OUTPUTS_METHOD = f"/{STREAMING_SERVICE}/outputs"
DROPS_METHOD = f"/{STREAMING_SERVICE}/drops"
VERSION_METHOD = f"/{UNARY_SERVICE}/version"

# Keepalives find a sidecar whose node vanished without closing the connection.
CHANNEL_OPTIONS: list[tuple[str, str | int]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
]

ChannelFactory = Callable[[str], grpc.aio.Channel]


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0
    # A session that lasted this long (or delivered anything) was a real one: start over.
    stable_after: float = 10.0
    connect_timeout: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum or self.multiplier < 1 or self.connect_timeout <= 0:
            raise ValueError("backoff needs 0 < initial <= maximum, multiplier >= 1, connect_timeout > 0")


class Backoff:
    """The reconnect delays of one upstream (see falco_api.backoff); reset after a real session."""

    def __init__(self, policy: BackoffPolicy, rng: Callable[[], float] = random.random) -> None:
        self.policy = policy
        self._rng = rng
        self.attempt = 0

    def next_delay(self) -> float:
        policy = self.policy
        delay = backoff_delay(
            self.attempt,
            initial=policy.initial,
            maximum=policy.maximum,
            multiplier=policy.multiplier,
            rng=self._rng,
        )
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


def _describe_error(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details() or ''}".rstrip(": ")
    if isinstance(error, TimeoutError):
        return "connect timeout"
    return f"{type(error).__name__}: {error}"


async def _until_ready(channel: grpc.aio.Channel, connect_timeout: float) -> None:
    """Connected, or an error as soon as the first attempt fails (our backoff decides the next one)."""
    async with asyncio.timeout(connect_timeout):
        state = channel.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.READY:
            if state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN):
                raise ConnectionError("cannot connect")
            await channel.wait_for_state_change(state)
            state = channel.get_state(try_to_connect=True)


class Upstream:
    """One sidecar followed by the relay, reconnecting until stopped."""

    def __init__(
        self,
        target: UpstreamTarget,
        streams: RelayStreams,
        channel_factory: ChannelFactory,
        policy: BackoffPolicy,
    ) -> None:
        self.target = target
        self.streams = streams
        self.cursor = Cursor()
        self.policy = policy
        self._channel_factory = channel_factory
        self.channel: grpc.aio.Channel | None = None
        self.connected_since = 0.0
        self.reconnects = 0
        self.sessions = 0
        self.last_error = ""
        self._task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self.channel is not None

    def status(self) -> UpstreamStatus:
        return UpstreamStatus(
            name=self.target.name,
            address=self.target.address,
            connected=self.connected,
            origin=self.cursor.origin,
            last_seq=self.cursor.seq,
            reconnects=self.reconnects,
            last_error=self.last_error,
            since=self.connected_since,
        )

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"upstream {self.target.key}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        backoff = Backoff(self.policy)
        while True:
            started = time.monotonic()
            received = await self._session()
            if received or time.monotonic() - started >= self.policy.stable_after:
                backoff.reset()
            delay = backoff.next_delay()
            log.info(
                "upstream %s (%s): %s; reconnecting in %.2f s (origin %s, last seq %d)",
                self.target.name,
                self.target.address,
                self.last_error,
                delay,
                self.cursor.origin or "-",
                self.cursor.seq,
            )
            await asyncio.sleep(delay)
            self.reconnects += 1

    async def _session(self) -> int:
        """One connection: both streams until either fails. Returns how many messages arrived."""
        self.sessions += 1
        received = [0]
        try:
            channel = self._channel_factory(self.target.address)
        except Exception as error:  # bad TLS files: keep trying, they may be remounted
            self.last_error = _describe_error(error)
            return 0
        try:
            await _until_ready(channel, self.policy.connect_timeout)
            self.channel = channel
            self.connected_since = time.time()
            log.info(
                "upstream %s (%s) connected; resuming after %s",
                self.target.name,
                self.target.address,
                self.cursor.resume_after(),
            )
            outputs = asyncio.create_task(self._follow_outputs(channel, received))
            drops = asyncio.create_task(self._follow_drops(channel, received))
            try:
                done, _ = await asyncio.wait({outputs, drops}, return_when=asyncio.FIRST_COMPLETED)
                if outputs in done or drops.exception() is not None:
                    for task in done:
                        task.result()
                else:
                    await outputs  # drops ended first, cleanly: the sidecar is stopping, outputs follows
                self.last_error = "stream ended by the sidecar"
            finally:
                for task in (outputs, drops):
                    task.cancel()
                for task in (outputs, drops):
                    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                        await task
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self.last_error = _describe_error(error)
        finally:
            self.channel = None
            await channel.close(None)
        return received[0]

    async def _follow_outputs(self, channel: grpc.aio.Channel, received: list[int]) -> None:
        try:
            await self._follow_outputs_with(channel, received, batched=True)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            log.info("upstream %s has no batched stream; following alert by alert", self.target.name)
            await self._follow_outputs_with(channel, received, batched=False)

    async def _follow_outputs_with(
        self, channel: grpc.aio.Channel, received: list[int], *, batched: bool
    ) -> None:
        request = outputs_pb2.request(follow=True, resume_after=self.cursor.resume_after())
        call = channel.unary_stream(
            BATCHED_OUTPUTS_METHOD if batched else OUTPUTS_METHOD,
            request_serializer=outputs_pb2.request.SerializeToString,
            response_deserializer=None,  # the bytes as they arrived: re-published unchanged
        )(request)
        async for message in cast(AsyncIterator[bytes], call):
            try:
                payloads = unframe(message) if batched else [message]
            except BatchError as error:
                log.warning("upstream %s: skipped a malformed batch: %s", self.target.name, error)
                continue
            for payload in payloads:
                received[0] += 1
                try:
                    self.streams.accept_alert(payload, self.cursor)
                except MalformedResponse as error:
                    log.warning("upstream %s: skipped a response: %s", self.target.name, error)

    async def _follow_drops(self, channel: grpc.aio.Channel, received: list[int]) -> None:
        call = channel.unary_stream(
            DROPS_METHOD,
            request_serializer=drops_pb2.DropsRequest.SerializeToString,
            response_deserializer=None,
        )(drops_pb2.DropsRequest(follow=True))
        try:
            async for payload in cast(AsyncIterator[bytes], call):
                received[0] += 1
                try:
                    self.streams.accept_drop(payload)
                except MalformedResponse as error:
                    log.warning("upstream %s: skipped a drop report: %s", self.target.name, error)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            log.warning("upstream %s has no drops stream; following its alerts only", self.target.name)
            await asyncio.Event().wait()  # outputs decides when the session ends

    async def version(self, deadline: float) -> version_pb2.response:
        channel = self.channel
        if channel is None:
            raise Unavailable(f"{self.target.name}: not connected")
        call = channel.unary_unary(
            VERSION_METHOD,
            request_serializer=version_pb2.request.SerializeToString,
            response_deserializer=version_pb2.response.FromString,
        )
        return cast(version_pb2.response, await call(version_pb2.request(), timeout=deadline))


class UpstreamManager:
    """Keeps one :class:`Upstream` per target, as the static list and discovery say."""

    def __init__(
        self,
        streams: RelayStreams,
        channel_factory: ChannelFactory,
        policy: BackoffPolicy | None = None,
        *,
        version_timeout: float = 3.0,
    ) -> None:
        self.streams = streams
        self.policy = policy or BackoffPolicy()
        self.version_timeout = version_timeout
        self._channel_factory = channel_factory
        self.upstreams: dict[str, Upstream] = {}
        self._static: dict[str, UpstreamTarget] = {}
        self._discovered: dict[str, UpstreamTarget] = {}
        self._lock = asyncio.Lock()
        self._closed = False

    async def set_static(self, targets: Mapping[str, UpstreamTarget]) -> Plan:
        self._static = dict(targets)
        return await self._apply()

    async def set_discovered(self, targets: Mapping[str, UpstreamTarget]) -> Plan:
        self._discovered = dict(targets)
        return await self._apply()

    async def _apply(self) -> Plan:
        async with self._lock:
            if self._closed:
                return Plan((), ())
            desired = {**self._discovered, **self._static}
            plan = plan_changes({key: up.target for key, up in self.upstreams.items()}, desired)
            for key in plan.stop:
                upstream = self.upstreams.pop(key)
                log.info("upstream %s (%s) removed", upstream.target.name, upstream.target.address)
                await upstream.stop()
            for target in plan.start:
                upstream = Upstream(target, self.streams, self._channel_factory, self.policy)
                self.upstreams[target.key] = upstream
                log.info("upstream %s (%s) added", target.name, target.address)
                upstream.start()
            return plan

    def statuses(self) -> dict[str, UpstreamStatus]:
        return {upstream.target.name: upstream.status() for upstream in self.upstreams.values()}

    def describe(self) -> str:
        return describe(self.statuses())

    async def version(self) -> version_pb2.response:
        """Falco's version from one reachable sidecar, with the relay's own ``api_version``."""
        candidates = sorted(
            (up for up in self.upstreams.values() if up.connected),
            key=lambda up: up.connected_since,
        )
        errors = []
        for upstream in candidates:
            try:
                response = await upstream.version(self.version_timeout)
            except (grpc.aio.AioRpcError, Unavailable) as error:
                errors.append(f"{upstream.target.name}: {_describe_error(error)}")
                continue
            response.api_version = __version__
            return response
        if not errors:
            raise Unavailable("no sidecar is connected to the relay")
        raise Unavailable("no sidecar could answer: " + "; ".join(errors))

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
            upstreams, self.upstreams = list(self.upstreams.values()), {}
        await asyncio.gather(*(upstream.stop() for upstream in upstreams))


def channel_factory(*, tls: TlsFiles | None, insecure: bool, server_name: str | None) -> ChannelFactory:
    """Channels to sidecars under the transport rule: mutual TLS unless ``insecure`` or unix://."""

    def open_upstream(address: str) -> grpc.aio.Channel:
        return open_channel(
            address, tls=tls, insecure=insecure, server_name=server_name, options=list(CHANNEL_OPTIONS)
        )

    return open_upstream
