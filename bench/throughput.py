"""Scenario 1: alert throughput, POSTs (and lines) in, every alert delivered to 1/16/64 follow subscribers.

Baselines, measured in the same run and interleaved with ours so machine noise hits both:
a bare aiohttp server taking the same POSTs from the same wrk and doing nothing (the HTTP ceiling),
and a bare grpc.aio server streaming one pre-serialised alert to the same number of clients (the
gRPC fan-out ceiling). Subscribers run in their own process and count what they receive.

    python -m bench.throughput [--subscribers 1,16,64] [--seconds 5] [--rounds 1]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench.harness import (
    BATCHED_METHOD,
    LineWriter,
    ServerProcess,
    SubscriberReport,
    Subscribers,
    SubscriberSpec,
    have_wrk,
    load_average,
    machine,
    median,
    print_table,
    run_wrk,
    save,
    wait_subscribed,
)


def _delivery_rate(report: SubscriberReport) -> float:
    """Alerts per second the slowest subscriber got, first receipt to the last subscriber's last one.

    Counted from what was received, so a run with losses shows what was delivered, not sent.
    """
    alerts = min(report.alerts)
    start = min(t for t in report.first_ns if t) if any(report.first_ns) else 0
    end = max(report.last_ns)
    return alerts / ((end - start) / 1e9) if end > start else 0.0


def bare_http(seconds: float, connections: int) -> dict[str, Any]:
    with ServerProcess("bare-http") as server:
        result = run_wrk(server.info["http_port"], seconds=seconds, connections=connections)
    return {"rate": result.rate, "requests": result.requests, "errors": result.errors + result.non_2xx}


def our_subscribers(target: str, count: int, batched: bool) -> SubscriberSpec:
    if batched:
        return SubscriberSpec(target, count, method=BATCHED_METHOD, batched=True)
    return SubscriberSpec(target, count)


def ours_http(subscribers: int, seconds: float, connections: int, batched: bool = False) -> dict[str, Any]:
    with ServerProcess("sidecar") as server:
        subs = Subscribers(our_subscribers(server.info["grpc"], subscribers, batched))
        try:
            wait_subscribed(server, subscribers)
            result = run_wrk(server.info["http_port"], seconds=seconds, connections=connections)
            ingested = int(server.metrics().get("falco_api_alerts_ingested_total", 0))
            subs.wait_for(ingested)
            metrics = server.metrics()
        finally:
            report = subs.stop()
    return {
        "post_rate": result.rate,
        "ingested": ingested,
        "delivered_min": min(report.alerts),
        "all_delivered": min(report.alerts) == ingested and result.non_2xx == 0,
        "dropped": int(metrics.get("falco_api_alerts_dropped_total", 0)),
        "rate": _delivery_rate(report),
    }


def bare_grpc(subscribers: int, messages: int) -> dict[str, Any]:
    with ServerProcess("bare-grpc") as server:
        spec = SubscriberSpec(
            server.info["grpc"], subscribers, method="/bench.Bare/stream", request=str(messages).encode()
        )
        subs = Subscribers(spec)
        try:
            subs.wait_for(messages, idle_timeout=5)
        finally:
            report = subs.stop()
    return {"rate": _delivery_rate(report), "delivered_min": min(report.alerts)}


def ours_line(subscribers: int, alerts: int, batched: bool = False) -> dict[str, Any]:
    with ServerProcess("sidecar") as server:
        subs = Subscribers(our_subscribers(server.info["grpc"], subscribers, batched))
        try:
            wait_subscribed(server, subscribers)
            writer = LineWriter(server.info["line"].removeprefix("unix://"), alerts)
            sent, write_seconds = writer.join()
            subs.wait_for(sent)
            metrics = server.metrics()
        finally:
            report = subs.stop()
    return {
        "sent": sent,
        "write_rate": sent / write_seconds if write_seconds else 0.0,
        "delivered_min": min(report.alerts),
        "all_delivered": min(report.alerts) == sent,
        "dropped": int(metrics.get("falco_api_alerts_dropped_total", 0)),
        "rate": _delivery_rate(report),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__)
    parser.add_argument("--subscribers", default="1,16,64", help="comma-separated (default: %(default)s)")
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="wrk duration per run (default: %(default)s)"
    )
    parser.add_argument("--connections", type=int, default=4, help="wrk connections (default: %(default)s)")
    parser.add_argument(
        "--line-alerts", type=int, default=60_000, help="alerts per line-ingest run, divided by subscribers"
    )
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions; medians reported")
    parser.add_argument(
        "--batched",
        action="store_true",
        help="our subscribers read falco.api.streaming/outputs_batched (results: throughput-batched.json)",
    )
    args = parser.parse_args(argv)
    if not have_wrk():
        parser.error("wrk is not installed: apt-get install -y wrk")
    counts = [int(n) for n in args.subscribers.split(",")]
    info = machine()
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {
        n: {"bare_http": [], "ours_http": [], "bare_grpc": [], "ours_line": []} for n in counts
    }
    for round_index in range(args.rounds):
        for n in counts:
            print(
                f"round {round_index + 1}/{args.rounds}, {n} subscriber(s), load {load_average():.2f}",
                flush=True,
            )
            runs[n]["bare_http"].append(bare_http(args.seconds, args.connections))
            ours = ours_http(n, args.seconds, args.connections, args.batched)
            runs[n]["ours_http"].append(ours)
            runs[n]["bare_grpc"].append(bare_grpc(n, max(ours["ingested"], 5000)))
            # Every subscriber gets every alert: keep the messages delivered per run bounded.
            runs[n]["ours_line"].append(ours_line(n, max(5000, args.line_alerts // n), args.batched))
            time.sleep(0.5)
    rows = []
    summary: dict[str, Any] = {}
    one_sub_rate = median([r["rate"] for r in runs[counts[0]]["ours_http"]]) if counts else 0.0
    for n in counts:
        bare_h = median([r["rate"] for r in runs[n]["bare_http"]])
        bare_g = median([r["rate"] for r in runs[n]["bare_grpc"]])
        http = median([r["rate"] for r in runs[n]["ours_http"]])
        line = median([r["rate"] for r in runs[n]["ours_line"]])
        delivered = all(r["all_delivered"] for r in runs[n]["ours_http"] + runs[n]["ours_line"])
        summary[str(n)] = {
            "bare_http": bare_h,
            "bare_grpc": bare_g,
            "ours_http": http,
            "ours_line": line,
            "http_vs_bare_http": http / bare_h if bare_h else 0.0,
            "http_vs_bare_grpc": http / bare_g if bare_g else 0.0,
            "line_vs_bare_grpc": line / bare_g if bare_g else 0.0,
            "http_vs_one_subscriber": http / one_sub_rate if one_sub_rate else 0.0,
            "all_delivered": delivered,
        }
        rows.append(
            [
                n,
                bare_h,
                bare_g,
                http,
                f"{http / bare_h:.2f}" if bare_h else "-",
                f"{http / bare_g:.2f}" if bare_g else "-",
                line,
                f"{line / bare_g:.2f}" if bare_g else "-",
                "yes" if delivered else "NO",
            ]
        )
    print_table(
        f"alert throughput{' (batched stream)' if args.batched else ''}, alerts/s delivered to each "
        f"subscriber (median of {args.rounds} round(s), "
        f"wrk -c{args.connections} {args.seconds:g}s; {info['nproc']} cores, load at start "
        f"{info['load_at_start']}, now {load_average():.2f})",
        [
            "subs",
            "bare HTTP",
            "bare gRPC",
            "ours HTTP",
            "/bare HTTP",
            "/bare gRPC",
            "ours line",
            "/bare gRPC",
            "all delivered",
        ],
        rows,
    )
    path = save(
        "throughput-batched" if args.batched else "throughput",
        {
            "machine": info,
            "args": vars(args),
            "summary": summary,
            "runs": {str(k): v for k, v in runs.items()},
        },
    )
    print(f"\nwritten: {path.relative_to(path.parents[2])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
