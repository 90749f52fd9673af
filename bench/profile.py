"""Profile the sidecar process under load with py-spy, and print where its time goes.

The sidecar runs as in the throughput scenario (its own process, one follow subscriber in
another), fed by wrk (``http``) or the line writer (``line``); py-spy samples the sidecar only.
Needs py-spy (``.venv/bin/pip install py-spy``; attaching needs ptrace permission).

    python -m bench.profile http|line [--seconds 6]

Writes the raw stacks to bench/results/profile-<mode>.raw.txt (not committed) and prints the
functions with the most samples, by self time and including callees.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import (
    RESULTS,
    LineWriter,
    ServerProcess,
    Subscribers,
    SubscriberSpec,
    print_table,
    run_wrk,
    wait_subscribed,
)


def summarise(raw: Path, top: int) -> None:
    self_samples: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        self_samples[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        print("no samples")
        return
    print_table(
        f"self time ({total} samples)",
        ["share", "function"],
        [[f"{n / total:.1%}", f] for f, n in self_samples.most_common(top)],
    )
    print_table(
        "including callees",
        ["share", "function"],
        [[f"{n / total:.1%}", f] for f, n in inclusive.most_common(top * 2)],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("mode", choices=["http", "line"])
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        parser.error("py-spy is not installed: .venv/bin/pip install py-spy")
    RESULTS.mkdir(parents=True, exist_ok=True)
    raw = RESULTS / f"profile-{args.mode}.raw.txt"
    with ServerProcess("sidecar") as server:
        subs = Subscribers(SubscriberSpec(server.info["grpc"], 1))
        try:
            wait_subscribed(server, 1)
            sampler = subprocess.Popen(
                [
                    spy,
                    "record",
                    "-p",
                    str(server.pid),
                    "-d",
                    str(args.seconds),
                    *["-r", "200", "-f", "raw", "-o", str(raw)],
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)
            if args.mode == "http":
                run_wrk(server.info["http_port"], seconds=args.seconds, connections=4)
            else:
                LineWriter(server.info["line"].removeprefix("unix://"), 20_000 * args.seconds).join()
            sampler.wait()
        finally:
            subs.stop()
    summarise(raw, args.top)
    print(f"\nraw stacks: {raw.relative_to(raw.parents[2])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
