"""The push loop: one asyncio task per sidecar, so a slow or dead sidecar never delays another.

Each task holds the latest desired state of its node and pushes it with one
``apply`` call. A push is skipped when the sidecar already acknowledged that exact
state (content hash); failures are retried with exponential backoff and full
jitter; a periodic resync pushes again so that drift on the node gets repaired
(the sidecar answers ``changed=false`` without a reload when nothing drifted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import grpc

from falco_api.backoff import backoff_delay
from falco_api.contract.falco.api import apply_pb2, rules_pb2
from falco_api.discovery import Sidecar

from .desired import DesiredState, apply_request
from .status import NodeOutcome, NodeState

log = logging.getLogger(__name__)


class SidecarClient(Protocol):
    async def apply(
        self, request: apply_pb2.ApplyRequest, deadline_seconds: float
    ) -> apply_pb2.ApplyResponse: ...

    async def close(self) -> None: ...


ClientFactory = Callable[[Sidecar], SidecarClient]
OutcomeCallback = Callable[[str, DesiredState, NodeOutcome], None]


@dataclass(frozen=True)
class PushSettings:
    call_timeout: float = 20.0
    # Changes that arrive together (`kubectl apply -f dir/`) go out as one apply: one Falco reload.
    coalesce_seconds: float = 0.2
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    # After PENDING/UNKNOWN, ask again (an idempotent apply) to read Falco's verdict.
    verdict_poll: float = 2.0
    resync_seconds: float = 300.0


def push_backoff(attempt: int, settings: PushSettings, rng: random.Random | None = None) -> float:
    """The delay before retry number ``attempt`` (1 is the first retry)."""
    return backoff_delay(
        attempt - 1,
        initial=settings.backoff_initial,
        maximum=settings.backoff_max,
        rng=(rng or random).random,
    )


def outcome_from_response(node: str, response: apply_pb2.ApplyResponse) -> NodeOutcome:
    result = response.result
    if result.errors:
        details = "; ".join(
            f"{e.file}: {e.item_kind} {e.item_name}: {e.message}".replace(":  :", ":")
            for e in result.errors[:3]
        )
        return NodeOutcome(node, NodeState.FAILED, f"refused by the sidecar: {details}")
    state = result.status.state
    if state == rules_pb2.LoadStatus.STATE_LOADED:
        return NodeOutcome(node, NodeState.LOADED)
    if state == rules_pb2.LoadStatus.STATE_FAILED:
        suffix = " (previous rules restored)" if result.rolled_back else ""
        return NodeOutcome(
            node, NodeState.FAILED, (result.status.message or "Falco refused the rules") + suffix
        )
    if state == rules_pb2.LoadStatus.STATE_UNKNOWN:
        return NodeOutcome(node, NodeState.PENDING, result.status.message or "no verdict from Falco yet")
    return NodeOutcome(node, NodeState.PENDING, result.status.message)


class GrpcSidecarClient:
    """The real client: one channel per sidecar, mTLS unless the operator runs --insecure."""

    def __init__(self, sidecar: Sidecar, channel: grpc.aio.Channel) -> None:
        from falco_api.contract.falco.api import unary_pb2_grpc

        self.sidecar = sidecar
        self._channel = channel
        self._stub = unary_pb2_grpc.unaryStub(channel)

    async def apply(
        self, request: apply_pb2.ApplyRequest, deadline_seconds: float
    ) -> apply_pb2.ApplyResponse:
        response: apply_pb2.ApplyResponse = await self._stub.apply(request, timeout=deadline_seconds)
        return response

    async def close(self) -> None:
        await self._channel.close(grace=None)


class NodePusher:
    def __init__(
        self,
        sidecar: Sidecar,
        client: SidecarClient,
        on_outcome: OutcomeCallback,
        settings: PushSettings,
    ) -> None:
        self.sidecar = sidecar
        self._client = client
        self._on_outcome = on_outcome
        self._settings = settings
        self._desired: DesiredState | None = None
        self._acked_sha: str | None = None
        self._force = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def acked_sha(self) -> str | None:
        return self._acked_sha

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"falco-api-push:{self.sidecar.node}")

    def set_desired(self, state: DesiredState, *, force: bool = False) -> None:
        changed = self._desired is None or self._desired.sha256 != state.sha256
        self._desired = state
        if changed or force:
            self._force = self._force or force
            self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self._client.close()

    async def _run(self) -> None:
        attempt = 0
        while True:
            await self._wake.wait()
            await asyncio.sleep(self._settings.coalesce_seconds)
            self._wake.clear()
            desired = self._desired
            if desired is None:
                continue
            if desired.sha256 == self._acked_sha and not self._force:
                attempt = 0
                continue
            self._force = False
            outcome = await self._push(desired)
            self._on_outcome(self.sidecar.node, desired, outcome)
            if outcome.state is NodeState.LOADED:
                self._acked_sha = desired.sha256
                attempt = 0
                continue
            self._acked_sha = None
            attempt += 1
            delay = (
                self._settings.verdict_poll
                if outcome.state is NodeState.PENDING
                else push_backoff(attempt, self._settings)
            )
            # A new desired state cuts the wait short: it may be the fix for the failure.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            self._wake.set()

    async def _push(self, desired: DesiredState) -> NodeOutcome:
        node = self.sidecar.node
        try:
            response = await self._client.apply(
                apply_request(desired), deadline_seconds=self._settings.call_timeout
            )
        except grpc.aio.AioRpcError as error:
            log.warning("push to %s (%s) failed: %s", node, self.sidecar.address, error.details())
            code = error.code().name
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                return NodeOutcome(node, NodeState.FAILED, f"refused by the sidecar: {error.details()}")
            return NodeOutcome(node, NodeState.FAILED, f"sidecar unreachable ({code}): {error.details()}")
        except (OSError, ValueError) as error:
            log.warning("push to %s (%s) failed: %s", node, self.sidecar.address, error)
            return NodeOutcome(node, NodeState.FAILED, f"sidecar unreachable: {error}")
        except Exception as error:  # a bug must show in status and be retried, not end this pusher
            log.exception("push to %s (%s) failed unexpectedly", node, self.sidecar.address)
            return NodeOutcome(node, NodeState.FAILED, f"push failed: {type(error).__name__}: {error}")
        outcome = outcome_from_response(node, response)
        reported = response.result.state_sha256
        if outcome.state is NodeState.LOADED and reported and reported != desired.sha256:
            log.warning("sidecar on %s reports state %s, expected %s", node, reported, desired.sha256)
        return outcome


class PushManager:
    """Keeps one :class:`NodePusher` per sidecar in step with discovery and the desired states."""

    def __init__(
        self, client_factory: ClientFactory, on_outcome: OutcomeCallback, settings: PushSettings
    ) -> None:
        self._client_factory = client_factory
        self._on_outcome = on_outcome
        self.settings = settings
        self._pushers: dict[str, NodePusher] = {}
        self._resync_task: asyncio.Task[None] | None = None

    @property
    def pushers(self) -> Mapping[str, NodePusher]:
        return dict(self._pushers)

    def start(self) -> None:
        if self.settings.resync_seconds > 0:
            self._resync_task = asyncio.create_task(self._resync_forever(), name="falco-api-resync")

    async def update(self, sidecars: Mapping[str, Sidecar], desired: Mapping[str, DesiredState]) -> None:
        stale = [
            node
            for node, pusher in self._pushers.items()
            if node not in sidecars or pusher.sidecar.identity != sidecars[node].identity
        ]
        for node in stale:
            await self._pushers.pop(node).stop()
        for node, sidecar in sidecars.items():
            pusher = self._pushers.get(node)
            if pusher is None:
                # New or restarted sidecar: a fresh pusher, nothing acknowledged, pushes the full state now.
                pusher = NodePusher(sidecar, self._client_factory(sidecar), self._on_outcome, self.settings)
                self._pushers[node] = pusher
                pusher.start()
            pusher.set_desired(desired.get(node, DesiredState()))

    def resync(self) -> None:
        for pusher in self._pushers.values():
            if pusher._desired is not None:
                pusher.set_desired(pusher._desired, force=True)

    async def _resync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            self.resync()

    async def close(self) -> None:
        if self._resync_task is not None:
            self._resync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resync_task
        await asyncio.gather(*(p.stop() for p in self._pushers.values()))
        self._pushers.clear()


def make_grpc_client_factory(
    open_channel: Callable[[str], grpc.aio.Channel],
) -> ClientFactory:
    def factory(sidecar: Sidecar) -> SidecarClient:
        return GrpcSidecarClient(sidecar, open_channel(sidecar.address))

    return factory
