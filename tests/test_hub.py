from __future__ import annotations

import asyncio

from falco_api.hub import GAP_EVICTED, GAP_OVERFLOW, GAP_UNKNOWN_ORIGIN, Delivery, Entry, Hub, Subscription


def entry(seq: int, origin: str = "a", item: int | None = None) -> Entry[int]:
    value = seq if item is None else item
    return Entry(seq, origin, value, str(value).encode())


async def drain(subscription: Subscription[int]) -> list[Delivery[int]]:
    out = []
    while (delivery := await asyncio.wait_for(subscription.next(), 1)) is not None:
        out.append(delivery)
    return out


def seqs(deliveries: list[Delivery[int]]) -> list[int]:
    return [d.entry.seq for d in deliveries if d.entry is not None]


async def test_every_subscriber_gets_every_matching_entry() -> None:
    hub: Hub[int] = Hub(replay_size=10, queue_size=100)
    evens = hub.subscribe(lambda n: n % 2 == 0, follow=True)
    everything = hub.subscribe(lambda n: True, follow=True)
    for seq in range(1, 11):
        hub.publish(entry(seq))
    hub.close()
    assert seqs(await drain(evens)) == [2, 4, 6, 8, 10]
    assert seqs(await drain(everything)) == list(range(1, 11))
    assert hub.stats.published == 10 and hub.stats.delivered == 15


async def test_overflow_drops_for_that_subscriber_only_and_reports_the_gap_in_place() -> None:
    reported = []
    hub: Hub[int] = Hub(replay_size=0, queue_size=3, on_gap_delivered=lambda s, gap: reported.append(gap))
    slow = hub.subscribe(lambda n: True, follow=True, report_idle_gaps=False)
    fast = hub.subscribe(lambda n: True, follow=True, max_queue=1000)
    for seq in range(1, 7):  # 1-3 queued, 4-6 lost for `slow`
        hub.publish(entry(seq))
    first = await slow.next()
    assert first is not None and first.entry is not None and first.entry.seq == 1
    hub.publish(entry(7))  # room again: 7 carries the gap of 4-6
    hub.close()
    rest = await drain(slow)
    assert seqs(rest) == [2, 3, 7]
    gap = rest[-1].gap
    assert gap is not None and (gap.missed, gap.reason, gap.first_seq, gap.last_seq) == (
        3,
        GAP_OVERFLOW,
        4,
        6,
    )
    assert seqs(await drain(fast)) == list(range(1, 8))
    assert slow.total_missed == 3 and hub.stats.dropped_overflow == 3
    assert [g.missed for g in reported] == [3]


async def test_idle_gap_notice_when_nothing_follows_the_loss() -> None:
    hub: Hub[int] = Hub(replay_size=0, queue_size=2)
    slow = hub.subscribe(lambda n: True, follow=True)
    for seq in range(1, 6):
        hub.publish(entry(seq))
    got = [await slow.next() for _ in range(3)]
    assert [d.entry.seq if d and d.entry else None for d in got] == [1, 2, None]
    assert got[2] is not None and got[2].gap is not None and got[2].gap.missed == 3


async def test_queue_never_exceeds_its_bound() -> None:
    hub: Hub[int] = Hub(replay_size=50, queue_size=10)
    stalled = hub.subscribe(lambda n: True, follow=True)
    for seq in range(1, 100_001):
        hub.publish(entry(seq))
    assert stalled.depth == 10 and stalled.total_missed == 100_000 - 10
    assert len(hub._ring) == 50


async def test_snapshot_replays_the_ring_and_ends() -> None:
    hub: Hub[int] = Hub(replay_size=5, queue_size=10)
    for seq in range(1, 9):
        hub.publish(entry(seq))
    snapshot = hub.subscribe(lambda n: n != 6, follow=False, replay_all=True)
    assert seqs(await drain(snapshot)) == [4, 5, 7, 8]


async def test_resume_replays_after_the_cursor_then_follows() -> None:
    hub: Hub[int] = Hub(replay_size=5, queue_size=10)
    for seq in range(1, 6):
        hub.publish(entry(seq))
    resumed = hub.subscribe(lambda n: True, follow=True, resume_after={"a": 3})
    hub.publish(entry(6))
    hub.close()
    assert seqs(await drain(resumed)) == [4, 5, 6]


async def test_resume_past_the_ring_reports_evicted_entries() -> None:
    hub: Hub[int] = Hub(replay_size=3, queue_size=10)
    for seq in range(1, 11):  # ring keeps 8-10; 1-7 evicted
        hub.publish(entry(seq))
    resumed = hub.subscribe(lambda n: True, follow=False, resume_after={"a": 2})
    deliveries = await drain(resumed)
    assert deliveries[0].gap is not None
    assert (deliveries[0].gap.missed, deliveries[0].gap.reason) == (5, GAP_EVICTED)
    assert (deliveries[0].gap.first_seq, deliveries[0].gap.last_seq) == (3, 7)
    assert seqs(deliveries) == [8, 9, 10]


async def test_resume_from_an_unknown_origin_says_so_and_replays_other_origins() -> None:
    hub: Hub[int] = Hub(replay_size=10, queue_size=10)
    hub.publish(entry(1, origin="node/new"))
    resumed = hub.subscribe(lambda n: True, follow=False, resume_after={"node/old": 40})
    deliveries = await drain(resumed)
    assert deliveries[0].gap is not None and deliveries[0].gap.reason == GAP_UNKNOWN_ORIGIN
    assert [(d.entry.origin, d.entry.seq) for d in deliveries if d.entry] == [("node/new", 1)]


async def test_close_lets_subscribers_drain_then_end() -> None:
    hub: Hub[int] = Hub(replay_size=0, queue_size=10)
    subscription = hub.subscribe(lambda n: True, follow=True)
    waiter = asyncio.create_task(drain(subscription))
    await asyncio.sleep(0)
    hub.publish(entry(1))
    hub.close()
    assert seqs(await waiter) == [1]
    late = hub.subscribe(lambda n: True, follow=True)
    assert await late.next() is None


async def test_cancel_removes_the_subscription() -> None:
    hub: Hub[int] = Hub(replay_size=0, queue_size=10)
    subscription = hub.subscribe(lambda n: True, follow=True)
    subscription.cancel()
    hub.publish(entry(1))
    assert hub.subscriptions == frozenset() and subscription.depth == 0


async def test_a_loss_before_publication_reaches_live_subscribers_in_place() -> None:
    from falco_api.hub import Gap

    hub: Hub[int] = Hub(replay_size=0, queue_size=10)
    legacy = hub.subscribe(lambda n: True, follow=True, report_idle_gaps=False)
    api = hub.subscribe(lambda n: True, follow=True)
    hub.publish(entry(1))
    assert hub.publish_gap(Gap(4, "evicted_before_resume", "a", 2, 5)) == 2
    hub.publish(entry(6))
    hub.close()
    legacy_view = await drain(legacy)
    assert seqs(legacy_view) == [1, 6]
    assert legacy_view[1].gap is not None and legacy_view[1].gap.missed == 4
    api_view = await drain(api)
    assert seqs(api_view) == [1, 6] and api_view[1].gap is not None
    assert (api_view[1].gap.first_seq, api_view[1].gap.last_seq) == (2, 5)
    assert legacy.total_missed == 4
