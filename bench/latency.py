"""Scenario 2: latency from an alert's send to a follow subscriber's receipt, at fixed rates.

For each rate, interleaved in one run:
- baseline: the same generator POSTing to a bare do-nothing aiohttp server: the POST round trip
  is the floor any HTTP receiver has on this machine, and the generator's lag behind its own
  schedule is its overhead (shown for every run);
- ours over HTTP: POST written -> the alert read by a gRPC subscriber in another process;
- ours over line ingest: line written -> the alert read by the subscriber.

    python -m bench.latency [--rates 1000,5000,20000] [--seconds 5] [--subscribers 1]
"""

from __future__ import annotations

import argparse
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


def bare(rate: float, seconds: float) -> dict[str, Any]:
    with ServerProcess("bare-http") as server:
        paced = PacedGenerator(PacedSpec(rate, seconds, http_port=server.info["http_port"])).join()
    return {
        "sent": paced.sent,
        "rtt": latency_stats(paced.rtt_ns),
        "generator_lag": latency_stats(paced.lag_ns),
        "non_204": paced.non_204,
    }


def ours(
    rate: float, seconds: float, subscribers: int, *, line: bool, batched: bool = False
) -> dict[str, Any]:
    with ServerProcess("sidecar") as server:
        method = BATCHED_METHOD if batched else OUTPUTS_METHOD
        spec_ = SubscriberSpec(
            server.info["grpc"], subscribers, method=method, record_ids=True, batched=batched
        )
        subs = Subscribers(spec_)
        try:
            wait_subscribed(server, subscribers)
            spec = (
                PacedSpec(rate, seconds, line_path=server.info["line"].removeprefix("unix://"))
                if line
                else PacedSpec(rate, seconds, http_port=server.info["http_port"])
            )
            paced = PacedGenerator(spec).join()
            report = subs.wait_for(paced.sent)
            dropped = int(server.metrics().get("falco_api_alerts_dropped_total", 0))
        finally:
            report = subs.stop()
    return {
        "sent": paced.sent,
        "delivered_min": min(report.alerts),
        "dropped": dropped,
        "latency": latency_stats(delivery_latencies(paced, report.receipts)),
        "generator_lag": latency_stats(paced.lag_ns),
        "post_rtt": latency_stats(paced.rtt_ns),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__)
    parser.add_argument("--rates", default="1000,5000,20000", help="alerts/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=5.0, help="per run (default: %(default)s)")
    parser.add_argument("--subscribers", type=int, default=1, help="follow subscribers (default: 1)")
    parser.add_argument(
        "--batched",
        action="store_true",
        help="subscribers read falco.api.streaming/outputs_batched (results: latency-batched.json)",
    )
    args = parser.parse_args(argv)
    info = machine()
    results: dict[str, Any] = {}
    rows = []
    for rate in [float(r) for r in args.rates.split(",")]:
        print(f"{rate:g} alerts/s, load {load_average():.2f}", flush=True)
        base = bare(rate, args.seconds)
        http = ours(rate, args.seconds, args.subscribers, line=False, batched=args.batched)
        line = ours(rate, args.seconds, args.subscribers, line=True, batched=args.batched)
        results[f"{rate:g}"] = {"bare_http": base, "ours_http": http, "ours_line": line}
        floor = base["rtt"]["p99_ms"]
        for name, run, stats in (
            ("bare HTTP (POST RTT)", base, base["rtt"]),
            ("ours HTTP -> gRPC", http, http["latency"]),
            ("ours line -> gRPC", line, line["latency"]),
        ):
            rows.append(
                [
                    f"{rate:g}",
                    name,
                    stats["p50_ms"],
                    stats["p99_ms"],
                    stats["max_ms"],
                    f"{stats['p99_ms'] / floor:.1f}x" if floor else "-",
                    run["generator_lag"]["p99_ms"],
                    f"{run.get('delivered_min', run['sent'])}/{run['sent']}",
                ]
            )
    print_table(
        f"latency, ms ({args.subscribers} subscriber(s), {args.seconds:g} s per run; {info['nproc']} cores, "
        f"load at start {info['load_at_start']}, now {load_average():.2f})",
        ["rate/s", "path", "p50", "p99", "max", "p99 / bare", "generator lag p99", "delivered"],
        rows,
    )
    path = save(
        "latency-batched" if args.batched else "latency",
        {"machine": info, "args": vars(args), "results": results},
    )
    print(f"\nwritten: {path.relative_to(path.parents[2])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
