"""The merge: every sidecar's responses re-published on one alerts hub and one drops hub.

No sockets here. The upstream connections (:mod:`falco_api_relay.upstream`) hand
over each response as the bytes that arrived; :class:`RelayStreams` parses them
once, keeps the sidecar's own ``origin`` and ``seq`` (so that a client resuming
from the relay names the same positions it would name to the sidecar), and
publishes the upstream bytes unchanged. Losses reported upstream become gaps in
the relay's own stream.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

from falco_api.alerts import Alert
from falco_api.contract.falco import outputs_pb2
from falco_api.contract.falco.api import drops_pb2
from falco_api.drops import subscriber_overflow_report
from falco_api.hub import GAP_UNKNOWN_ORIGIN, Entry, Gap, Hub, Subscription

DEFAULT_REPLAY_SIZE = 50_000
DEFAULT_QUEUE_SIZE = 10_000
DEFAULT_DROPS_REPLAY_SIZE = 5_000
# A sidecar replays its whole drops ring (1,000 reports) on every reconnect: remember
# more than that per origin so that a replayed report is recognised as already seen.
DROPS_DEDUP_WINDOW = 4_096

# Asking a sidecar to resume after an origin it cannot know makes it replay its whole
# buffer first (outputs.proto, resume_after): how a first connection gets the alerts the
# sidecar buffered before the relay came. The unknown-origin notice it answers with is ours.
REPLAY_ALL_ORIGIN = "falco-api-relay/replay-all"


class MalformedResponse(ValueError):
    """An upstream sent bytes that are not a usable falco.outputs.response or DropReport."""


@dataclass(slots=True)
class UpstreamGap(Gap):
    """A loss that happened between a sidecar and the relay (or before the sidecar's own subscribers).

    The sidecar that lost the alerts already publishes its own drop report, which
    the relay merges, so these gaps never produce a second one here.
    """


def alert_from_response(response: outputs_pb2.response) -> Alert:
    """What the relay's filters read from an upstream alert; the payload stays the upstream bytes.

    Only the fields :class:`falco_api.filters.AlertFilter` looks at (and the time) are
    kept, so the replay ring holds one small object per alert next to its bytes.
    """
    return Alert(
        seconds=response.time.seconds,
        nanos=response.time.nanos,
        rule=response.rule,
        priority=int(response.priority),
        source=response.source,
        hostname=response.hostname,
        tags=tuple(response.tags),
    )


class RecentDigests:
    """The last ``size`` distinct items seen, by digest: recognises replayed drop reports."""

    def __init__(self, size: int = DROPS_DEDUP_WINDOW) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        self.size = size
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def add(self, payload: bytes) -> bool:
        """Remember ``payload``; False if it was already among the recent ones."""
        digest = hashlib.blake2b(payload, digest_size=16).digest()
        if digest in self._seen:
            self._seen.move_to_end(digest)
            return False
        self._seen[digest] = None
        if len(self._seen) > self.size:
            self._seen.popitem(last=False)
        return True


@dataclass(slots=True)
class AcceptStats:
    alerts: int = 0
    duplicates: int = 0
    gaps: int = 0
    missed: int = 0
    drops: int = 0
    duplicate_drops: int = 0


@dataclass(slots=True)
class Cursor:
    """Where one upstream's stream stands: the origin it serves and the last seq received from it."""

    origin: str = ""
    seq: int = 0

    def resume_after(self) -> dict[str, int]:
        return {self.origin: self.seq} if self.origin else {REPLAY_ALL_ORIGIN: 0}


@dataclass(slots=True)
class AcceptResult:
    """What one upstream response became: an alert entry, a gap passed on, or nothing."""

    entry: Entry[Alert] | None = None
    gap: Gap | None = None


class RelayStreams:
    """The relay's alerts and drops hubs, fed by every upstream."""

    def __init__(
        self,
        *,
        hostname: str,
        replay_size: int = DEFAULT_REPLAY_SIZE,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        drops_replay_size: int = DEFAULT_DROPS_REPLAY_SIZE,
    ) -> None:
        self.hostname = hostname
        # The relay's own origin only appears in the drop reports of its own subscribers.
        self.origin = f"relay-{hostname}/{int(time.time())}-{secrets.token_hex(3)}"
        self.alerts: Hub[Alert] = Hub(
            replay_size=replay_size, queue_size=queue_size, on_gap_delivered=self._report_overflow
        )
        self.drops: Hub[drops_pb2.DropReport] = Hub(
            replay_size=drops_replay_size, queue_size=queue_size, on_gap_delivered=self._report_overflow
        )
        # Last seq published per origin, whichever upstream brought it: the same sidecar
        # reached twice (two addresses, a re-discovered pod) never yields a duplicate.
        self._last_seq: dict[str, int] = {}
        self._drop_seq: dict[str, int] = {}
        self._drop_digests: dict[str, RecentDigests] = {}
        self._own_drop_seq = 0
        self.stats = AcceptStats()

    def last_seq(self, origin: str) -> int:
        return self._last_seq.get(origin, 0)

    def accept_alert(self, payload: bytes, cursor: Cursor) -> AcceptResult:
        """Publish one upstream ``falco.outputs.response``; advances ``cursor`` past it."""
        try:
            response = outputs_pb2.response.FromString(payload)
        except Exception as error:  # protobuf raises DecodeError, a plain Exception subclass
            raise MalformedResponse(f"undecodable outputs response ({len(payload)} bytes): {error}") from None
        if response.HasField("gap"):
            return AcceptResult(gap=self._accept_gap(response.gap, cursor))
        if not response.origin or response.seq < 1:
            raise MalformedResponse("an alert without origin and seq cannot be resumed; is this a sidecar?")
        if response.origin != cursor.origin or response.seq > cursor.seq:
            cursor.origin, cursor.seq = response.origin, response.seq
        if response.seq <= self._last_seq.get(response.origin, 0):
            self.stats.duplicates += 1
            return AcceptResult()
        self._last_seq[response.origin] = response.seq
        if response.missed_before:
            # Sidecars of an older version also copied a loss already announced by a gap
            # response onto the next alert; each of our subscribers would count it twice.
            response.ClearField("missed_before")
            payload = response.SerializeToString()
        entry = Entry(response.seq, response.origin, alert_from_response(response), payload)
        self.alerts.publish(entry)
        self.stats.alerts += 1
        return AcceptResult(entry=entry)

    def _accept_gap(self, wire: outputs_pb2.Gap, cursor: Cursor) -> Gap | None:
        if wire.reason == GAP_UNKNOWN_ORIGIN and wire.origin == REPLAY_ALL_ORIGIN:
            return None  # the answer to our own first-connection request
        if wire.reason == GAP_UNKNOWN_ORIGIN and wire.origin == cursor.origin:
            # The sidecar restarted: what the old process had not sent us is gone, and its
            # new buffer comes next in full. Ask for everything again until an alert arrives.
            cursor.origin, cursor.seq = "", 0
        elif wire.origin == cursor.origin and wire.last_seq > cursor.seq:
            # Those positions are gone for good: never ask for them again.
            cursor.seq = wire.last_seq
        now = time.time()
        gap = UpstreamGap(wire.missed, wire.reason, wire.origin, wire.first_seq, wire.last_seq, now, now)
        self.alerts.publish_gap(gap)
        self.stats.gaps += 1
        self.stats.missed += wire.missed
        return gap

    def accept_drop(self, payload: bytes) -> Entry[drops_pb2.DropReport] | None:
        """Publish one upstream DropReport unless it is a replay of one already published."""
        try:
            report = drops_pb2.DropReport.FromString(payload)
        except Exception as error:
            raise MalformedResponse(f"undecodable drop report ({len(payload)} bytes): {error}") from None
        digests = self._drop_digests.setdefault(report.origin, RecentDigests())
        if not digests.add(payload):
            self.stats.duplicate_drops += 1
            return None
        seq = self._drop_seq.get(report.origin, 0) + 1
        self._drop_seq[report.origin] = seq
        entry = Entry(seq, report.origin, report, payload)
        self.drops.publish(entry)
        self.stats.drops += 1
        return entry

    def close(self) -> None:
        self.alerts.close()
        self.drops.close()

    def _report_overflow(
        self, subscription: Subscription[Alert] | Subscription[drops_pb2.DropReport], gap: Gap
    ) -> None:
        if isinstance(gap, UpstreamGap):
            return
        report = subscriber_overflow_report(
            gap,
            peer=subscription.peer,
            method=subscription.method,
            hostname=self.hostname,
            origin=self.origin,
        )
        self._own_drop_seq += 1
        self.drops.publish(Entry(self._own_drop_seq, self.origin, report, report.SerializeToString()))


@dataclass(frozen=True, slots=True)
class UpstreamStatus:
    """One upstream as the logs and the version call see it."""

    name: str
    address: str
    connected: bool
    origin: str
    last_seq: int
    reconnects: int
    last_error: str = ""
    since: float = field(default=0.0)


def describe(statuses: Mapping[str, UpstreamStatus]) -> str:
    """One log line for all upstreams."""
    if not statuses:
        return "no upstreams"
    parts = []
    for name in sorted(statuses):
        status = statuses[name]
        state = "connected" if status.connected else f"down ({status.last_error or 'connecting'})"
        parts.append(
            f"{name} [{status.address}] {state} origin={status.origin or '-'} "
            f"seq={status.last_seq} reconnects={status.reconnects}"
        )
    return "; ".join(parts)
