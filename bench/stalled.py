"""Scenario 3: one subscriber stops reading for a while at a fixed rate; the others must not notice.

Two runs in one invocation, same rate and subscribers: a reference run where every subscriber
reads, and a run where the last subscriber stops reading for ``--stall-seconds`` right after its
first alert. Reported: the sidecar's peak RSS in both runs (bounded by --queue-size), the other
subscribers' delivery rate and latency against the reference (target: within 10%), and the
stalled subscriber's loss as observed (sent - received) against the loss the sidecar reported to
it in-band (missed_before / gap): they must be equal.

    python -m bench.stalled [--stall-seconds 60] [--rate 5000] [--subscribers 4] [--line]
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

from bench.harness import (
    BATCHED_METHOD,
    OUTPUTS_METHOD,
    PacedGenerator,
    PacedSpec,
    ServerProcess,
    Subscribers,
    SubscriberSpec,
    delivery_latencies,
    latency_stats,
    load_average,
    machine,
    print_table,
    save,
    wait_subscribed,
)


def run(
    rate: float,
    seconds: float,
    subscribers: int,
    stall: float,
    queue_size: int,
    line: bool,
    drain: float,
    batched: bool = False,
) -> dict[str, Any]:
    with ServerProcess("sidecar", queue_size=queue_size) as server:
        spec = SubscriberSpec(
            server.info["grpc"],
            subscribers,
            method=BATCHED_METHOD if batched else OUTPUTS_METHOD,
            batched=batched,
            record_ids=True,
            stall_index=subscribers - 1 if stall else -1,
            stall_seconds=stall,
        )
        subs = Subscribers(spec)
        rss: list[int] = []
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                rss.append(server.rss_bytes())
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        try:
            wait_subscribed(server, subscribers)
            rss_before = server.rss_bytes()
            sampler.start()
            paced_spec = (
                PacedSpec(rate, seconds, line_path=server.info["line"].removeprefix("unix://"))
                if line
                else PacedSpec(rate, seconds, http_port=server.info["http_port"])
            )
            paced = PacedGenerator(paced_spec).join()
            # The stalled one resumes after `stall` seconds and then drains what it still has queued.
            ingested = int(server.metrics().get("falco_api_alerts_ingested_total", 0))
            subs.wait_for(ingested, idle_timeout=max(drain, stall - seconds + drain))
            metrics = server.metrics()
        finally:
            sampling.set()
            report = subs.stop()
    others = range(subscribers - 1) if stall else range(subscribers)
    rates = []
    for i in others:
        took = (report.last_ns[i] - report.first_ns[i]) / 1e9
        rates.append(report.alerts[i] / took if took > 0 else 0.0)
    result: dict[str, Any] = {
        "sent": paced.sent,
        "rss_before_mb": rss_before / 2**20,
        "rss_peak_mb": max(rss, default=0) / 2**20,
        "others_delivered_min": min(report.alerts[i] for i in others),
        "others_rate_min": min(rates),
        "latency_subscriber_0": latency_stats(delivery_latencies(paced, report.receipts)),
        "generator_lag": latency_stats(paced.lag_ns),
        "dropped_total_metric": int(metrics.get("falco_api_alerts_dropped_total", 0)),
        "ingested": int(metrics.get("falco_api_alerts_ingested_total", 0)),
    }
    if stall:
        stalled = subscribers - 1
        result["stalled_received"] = report.alerts[stalled]
        # Against what the sidecar took in (a POST it never answered is not a subscriber's loss).
        result["stalled_lost_observed"] = result["ingested"] - report.alerts[stalled]
        result["stalled_lost_reported"] = report.missed_reported[stalled]
        result["loss_reported_exactly"] = result["stalled_lost_observed"] == result["stalled_lost_reported"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stalled", description=__doc__)
    parser.add_argument("--stall-seconds", type=float, default=60.0, help="(default: %(default)s)")
    parser.add_argument("--rate", type=float, default=5000.0, help="alerts/s (default: %(default)s)")
    parser.add_argument(
        "--drain-seconds", type=float, default=10.0, help="after sending, for queues to drain"
    )
    parser.add_argument("--subscribers", type=int, default=4, help="including the stalled one (default: 4)")
    parser.add_argument("--queue-size", type=int, default=10_000, help="sidecar --queue-size")
    parser.add_argument("--line", action="store_true", help="feed through line ingest instead of HTTP")
    parser.add_argument(
        "--batched",
        action="store_true",
        help="subscribers read outputs_batched (results: stalled-batched.json)",
    )
    args = parser.parse_args(argv)
    info = machine()
    # The generator keeps sending for the whole stall, plus a little after it.
    seconds = args.stall_seconds + 2.0
    print(f"reference run (nobody stalls), load {load_average():.2f}", flush=True)
    reference = run(
        args.rate,
        seconds,
        args.subscribers,
        0.0,
        args.queue_size,
        args.line,
        args.drain_seconds,
        args.batched,
    )
    print(f"stalled run, load {load_average():.2f}", flush=True)
    stalled = run(
        args.rate,
        seconds,
        args.subscribers,
        args.stall_seconds,
        args.queue_size,
        args.line,
        args.drain_seconds,
        args.batched,
    )
    ref_p99 = reference["latency_subscriber_0"]["p99_ms"]
    rate_ratio = (
        stalled["others_rate_min"] / reference["others_rate_min"] if reference["others_rate_min"] else 0
    )
    p99_ratio = stalled["latency_subscriber_0"]["p99_ms"] / ref_p99 if ref_p99 else 0
    rows = [
        [
            name,
            r["sent"],
            r["rss_before_mb"],
            r["rss_peak_mb"],
            r["others_rate_min"],
            r["latency_subscriber_0"]["p50_ms"],
            r["latency_subscriber_0"]["p99_ms"],
            r.get("stalled_lost_observed", "-"),
            r.get("stalled_lost_reported", "-"),
        ]
        for name, r in (("reference", reference), ("one stalled", stalled))
    ]
    print_table(
        f"stalled subscriber: {args.rate:g} alerts/s via {'line' if args.line else 'HTTP'}, "
        f"{args.subscribers} subscribers, stall {args.stall_seconds:g} s, queue {args.queue_size} "
        f"({info['nproc']} cores, load at start {info['load_at_start']}, now {load_average():.2f})",
        [
            "run",
            "sent",
            "RSS before MB",
            "RSS peak MB",
            "others min/s",
            "p50 ms",
            "p99 ms",
            "lost",
            "reported",
        ],
        rows,
    )
    print(
        f"\nothers' rate with a stalled subscriber: {rate_ratio:.2f}x the reference (target >= 0.90); "
        f"p99 {p99_ratio:.2f}x; loss reported exactly: {stalled.get('loss_reported_exactly')}"
    )
    path = save(
        "stalled-batched" if args.batched else "stalled",
        {
            "machine": info,
            "args": vars(args),
            "reference": reference,
            "stalled": stalled,
            "others_rate_ratio": rate_ratio,
            "others_p99_ratio": p99_ratio,
        },
    )
    print(f"written: {path.relative_to(path.parents[2])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
