"""The per-alert CPU cost of the ingest hot path, in one process, no sockets (profile companion).

Interleaved in one run, on the Falco double's alert mix (Falco-shaped bodies, ~800 bytes):
- ``json.loads`` alone: the floor for anything that reads Falco's JSON;
- ``parse_alert``: JSON plus the contract checks;
- ``+ to_response().SerializeToString()``: the protobuf runtime building both maps (before);
- ``+ to_payload()``: the cached hand-encoded maps (what EventStreams.ingest does now);
- ``EventStreams.ingest`` end to end with 1 and 64 subscribers (numbering, ring, fan-out, drop check).

    python -m bench.hotpath [--alerts 2000] [--rounds 5] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from collections.abc import Callable

from bench.harness import load_average, machine, median, print_table, save
from falco_api.alerts import parse_alert
from falco_api.streams import EventStreams
from falco_api.testing.falco_double import alert_mix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__)
    parser.add_argument("--alerts", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="also print cProfile's top functions")
    args = parser.parse_args(argv)
    mix = alert_mix("bench-node")
    bodies = [json.dumps(next(mix)).encode() for _ in range(args.alerts)]
    streams = EventStreams(origin="bench/1", hostname="bench-node", replay_size=10_000, queue_size=10**9)
    subscriptions = [streams.alerts.subscribe(lambda _a: True, follow=True)]

    def ingest_all() -> None:
        for body in bodies:
            streams.ingest(parse_alert(body))
        for subscription in subscriptions:
            subscription._queue.clear()  # the subscribers "read" everything

    def ingest_to_64() -> None:
        subscriptions.extend(streams.alerts.subscribe(lambda _a: True, follow=True) for _ in range(63))
        try:
            ingest_all()
        finally:
            for subscription in subscriptions[1:]:
                subscription.cancel()
            del subscriptions[1:]

    cases: dict[str, Callable[[], object]] = {
        "json.loads": lambda: [json.loads(b) for b in bodies],
        "parse_alert": lambda: [parse_alert(b) for b in bodies],
        "parse + to_response (before)": lambda: [
            parse_alert(b).to_response(seq=1, origin="bench/1").SerializeToString() for b in bodies
        ],
        "parse + to_payload (now)": lambda: [
            parse_alert(b).to_payload(seq=1, origin="bench/1") for b in bodies
        ],
        "EventStreams.ingest, 1 subscriber": ingest_all,
        "EventStreams.ingest, 64 subscribers": ingest_to_64,
    }
    timings: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, case in cases.items():
            start = time.perf_counter()
            case()
            timings[name].append((time.perf_counter() - start) / len(bodies))
    info = machine()
    before = median(timings["parse + to_response (before)"])
    rows = [
        [name, median(values) * 1e6, 1 / median(values), f"{before / median(values):.2f}"]
        for name, values in timings.items()
    ]
    print_table(
        f"ingest hot path, per alert (median of {args.rounds} interleaved rounds of {len(bodies)}; "
        f"{info['nproc']} cores, load {info['load_at_start']}, now {load_average():.2f})",
        ["step", "us/alert", "alerts/s (one core)", "speed-up vs before"],
        rows,
    )
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(ingest_all)
        pstats.Stats(profile).sort_stats("tottime").print_stats(12)
    path = save("hotpath", {"machine": info, "args": vars(args), "seconds_per_alert": timings})
    print(f"\nwritten: {path.relative_to(path.parents[2])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
