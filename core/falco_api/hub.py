"""Fan-out with bounded memory: every subscriber gets every entry it wants, or is told what it lost.

One :class:`Hub` holds a replay ring of recent entries and the live
subscriptions. :meth:`Hub.publish` never blocks and never waits for a
subscriber: each subscription has its own bounded queue, and when a slow
subscriber's queue is full the new entry is dropped *for that subscriber only*
and counted. The count travels with the next entry that does reach it (or, when
it is idle, as a loss notice of its own), so no loss is ever silent.

Entries carry their payload already serialised: it is computed once per entry
and shared by every subscriber. Everything here runs on one asyncio loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

T = TypeVar("T")

GAP_OVERFLOW = "subscriber_overflow"
GAP_EVICTED = "evicted_before_resume"
GAP_UNKNOWN_ORIGIN = "unknown_origin"


@dataclass(frozen=True, slots=True)
class Entry(Generic[T]):
    """One published item: its position in its origin's stream and its wire bytes."""

    seq: int
    origin: str
    item: T
    payload: bytes


@dataclass(slots=True)
class Gap:
    """Entries lost for one subscriber, contiguous in its view of the stream."""

    missed: int
    reason: str
    origin: str = ""
    first_seq: int = 0
    last_seq: int = 0
    first_time: float = 0.0
    last_time: float = 0.0


@dataclass(frozen=True, slots=True)
class Delivery(Generic[T]):
    """What a subscriber reads next: an entry, a gap just before it, or a gap alone."""

    entry: Entry[T] | None
    gap: Gap | None = None


@dataclass(slots=True)
class HubStats:
    published: int = 0
    delivered: int = 0
    dropped_overflow: int = 0
    subscriptions_opened: int = 0


class Subscription(Generic[T]):
    """One subscriber's view of a hub. Read it with :meth:`next` until it returns None."""

    def __init__(
        self,
        hub: Hub[T],
        predicate: Callable[[T], bool],
        *,
        max_queue: int,
        follow: bool,
        replay: Iterable[Delivery[T]],
        report_idle_gaps: bool,
        peer: str,
        method: str,
    ) -> None:
        self._hub = hub
        self.predicate = predicate
        self.max_queue = max_queue
        self.peer = peer
        self.method = method
        self.report_idle_gaps = report_idle_gaps
        self._replay: deque[Delivery[T]] = deque(replay)
        self._queue: deque[Delivery[T]] = deque()
        self._pending_gap: Gap | None = None
        self._wake = asyncio.Event()
        self.closed = not follow
        self.total_missed = 0

    @property
    def depth(self) -> int:
        return len(self._queue)

    def offer(self, entry: Entry[T], shared: Delivery[T] | None = None) -> None:
        """Queue ``entry`` if it matches; called by the hub for every published entry.

        ``shared`` is the hub's one ``Delivery(entry)`` for every subscriber without a loss
        to report (deliveries are immutable), so fan-out allocates nothing per subscriber.
        """
        if self.closed or not self.predicate(entry.item):
            return
        if len(self._queue) >= self.max_queue:
            self._record_loss(entry)
            return
        if self._pending_gap is None:
            self._queue.append(shared if shared is not None else Delivery(entry))
        else:
            self._queue.append(Delivery(entry, self._pending_gap))
            self._pending_gap = None
        self._wake.set()

    def _record_loss(self, entry: Entry[T]) -> None:
        now = time.time()
        self._merge_gap(Gap(1, GAP_OVERFLOW, entry.origin, entry.seq, entry.seq, now, now))
        self._hub._on_loss()

    def note_loss(self, gap: Gap) -> None:
        """Entries lost before they reached the hub (e.g. upstream of a relay): report them in place,
        like an overflow of this subscriber's own queue."""
        if self.closed:
            return
        self._merge_gap(replace(gap))
        self._wake.set()

    def _merge_gap(self, gap: Gap) -> None:
        pending = self._pending_gap
        if pending is None:
            self._pending_gap = gap
        else:
            pending.missed += gap.missed
            pending.last_time = gap.last_time
            if pending.origin != gap.origin:
                pending.origin = ""  # spans several origins (relay): seq bounds mean nothing then
                pending.first_seq = pending.last_seq = 0
            else:
                pending.last_seq = gap.last_seq
        self.total_missed += gap.missed

    async def next(self) -> Delivery[T] | None:
        """The next delivery, waiting for one; None once the subscription is over and drained."""
        while True:
            if self._replay:
                return self._replay.popleft()
            if self._queue:
                delivery = self._queue.popleft()
                self._hub._delivered(self, delivery)
                return delivery
            if self._pending_gap is not None and self.report_idle_gaps:
                gap, self._pending_gap = self._pending_gap, None
                self._hub._delivered(self, Delivery(None, gap))
                return Delivery(None, gap)
            if self.closed:
                return None
            self._wake.clear()
            await self._wake.wait()

    def ready(self, limit: int) -> list[Delivery[T]]:
        """Up to ``limit`` further deliveries that are available now, without waiting (for batching)."""
        out: list[Delivery[T]] = []
        while len(out) < limit:
            if self._replay:
                out.append(self._replay.popleft())
            elif self._queue:
                delivery = self._queue.popleft()
                self._hub._delivered(self, delivery)
                out.append(delivery)
            elif self._pending_gap is not None and self.report_idle_gaps:
                gap, self._pending_gap = self._pending_gap, None
                self._hub._delivered(self, Delivery(None, gap))
                out.append(Delivery(None, gap))
            else:
                break
        return out

    def close(self) -> None:
        """End the subscription once what is queued has been read."""
        self.closed = True
        self._wake.set()

    def cancel(self) -> None:
        """The subscriber went away: forget it now."""
        self.close()
        self._hub._unsubscribe(self)


class Hub(Generic[T]):
    """A replay ring plus live fan-out to bounded per-subscriber queues."""

    def __init__(
        self,
        *,
        replay_size: int,
        queue_size: int,
        on_gap_delivered: Callable[[Subscription[T], Gap], None] | None = None,
    ) -> None:
        if replay_size < 0 or queue_size < 1:
            raise ValueError("replay_size must be >= 0 and queue_size >= 1")
        self.queue_size = queue_size
        self._ring: deque[Entry[T]] = deque(maxlen=replay_size)
        self._evicted_upto: dict[str, int] = {}
        self._subscriptions: set[Subscription[T]] = set()
        self._on_gap_delivered = on_gap_delivered
        self._closed = False
        self.stats = HubStats()

    @property
    def subscriptions(self) -> frozenset[Subscription[T]]:
        return frozenset(self._subscriptions)

    def publish(self, entry: Entry[T]) -> None:
        """Add ``entry`` to the ring and offer it to every subscriber. Never blocks."""
        ring = self._ring
        if ring.maxlen and len(ring) == ring.maxlen:
            evicted = ring[0]
            self._evicted_upto[evicted.origin] = evicted.seq
        ring.append(entry)
        self.stats.published += 1
        if self._subscriptions:
            shared = Delivery(entry)
            for subscription in self._subscriptions:
                subscription.offer(entry, shared)

    def subscribe(
        self,
        predicate: Callable[[T], bool],
        *,
        follow: bool,
        resume_after: Mapping[str, int] | None = None,
        replay_all: bool = False,
        report_idle_gaps: bool = True,
        max_queue: int | None = None,
        peer: str = "",
        method: str = "",
    ) -> Subscription[T]:
        """Open a subscription.

        - ``replay_all``: start with every buffered entry (legacy ``get``, or a snapshot).
        - ``resume_after`` (origin -> last seq seen): start with the buffered entries after
          those positions, all buffered entries of other origins, and a gap for each
          position that was already evicted.
        - neither: live entries only.
        - ``follow``: stay open for live entries after the buffered ones.
        """
        replay: list[Delivery[T]] = []
        if resume_after:
            for origin, last_seen in sorted(resume_after.items()):
                evicted_upto = self._evicted_upto.get(origin)
                if evicted_upto is not None and evicted_upto > last_seen:
                    replay.append(
                        Delivery(
                            None,
                            Gap(evicted_upto - last_seen, GAP_EVICTED, origin, last_seen + 1, evicted_upto),
                        )
                    )
                elif evicted_upto is None and not any(e.origin == origin for e in self._ring):
                    replay.append(Delivery(None, Gap(0, GAP_UNKNOWN_ORIGIN, origin)))
        if resume_after or replay_all:
            cursor = resume_after or {}
            replay.extend(
                Delivery(entry)
                for entry in self._ring
                if entry.seq > cursor.get(entry.origin, 0) and predicate(entry.item)
            )
        subscription = Subscription(
            self,
            predicate,
            max_queue=max_queue or self.queue_size,
            follow=follow and not self._closed,
            replay=replay,
            report_idle_gaps=report_idle_gaps,
            peer=peer,
            method=method,
        )
        if follow and not self._closed:
            self._subscriptions.add(subscription)
        self.stats.subscriptions_opened += 1
        return subscription

    def publish_gap(self, gap: Gap) -> int:
        """Tell every live subscriber about entries lost before publication; returns how many."""
        told = 0
        for subscription in self._subscriptions:
            if not subscription.closed:
                subscription.note_loss(gap)
                told += 1
        return told

    def close(self) -> None:
        """Shutting down: every subscription ends after draining what it has queued."""
        self._closed = True
        for subscription in list(self._subscriptions):
            subscription.close()

    def queue_depths(self) -> list[int]:
        return [subscription.depth for subscription in self._subscriptions]

    def _unsubscribe(self, subscription: Subscription[T]) -> None:
        self._subscriptions.discard(subscription)

    def _on_loss(self) -> None:
        self.stats.dropped_overflow += 1

    def _delivered(self, subscription: Subscription[T], delivery: Delivery[T]) -> None:
        if delivery.entry is not None:
            self.stats.delivered += 1
        if delivery.gap is not None and delivery.gap.reason == GAP_OVERFLOW and self._on_gap_delivered:
            self._on_gap_delivered(subscription, delivery.gap)


@dataclass(slots=True)
class Sequencer:
    """Hands out the per-origin sequence numbers: 1, 2, 3, ... for this process's lifetime."""

    origin: str
    last: int = field(default=0)

    def next(self) -> int:
        self.last += 1
        return self.last
