"""What every scenario shares: server processes, subscriber processes, load generators, results."""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.workload import ID_PATTERN, alert_body
from falco_api.batching import unframe
from falco_api.contract.falco import outputs_pb2

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
OUTPUTS_METHOD = "/falco.api.streaming/outputs"
BATCHED_METHOD = "/falco.api.streaming/outputs_batched"
FOLLOW_REQUEST = b"\x08\x01"  # outputs_pb2.request(follow=True)
ALERT_FIRST_BYTE = 0x0A  # an alert response starts with its time (field 1); a gap response does not


# --- the machine and the results ----------------------------------------------------------------


def load_average() -> float:
    return os.getloadavg()[0]


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model or platform.processor(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "load_at_start": round(load_average(), 2),
    }


def save(scenario: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"scenario": scenario, "when": time.strftime("%Y-%m-%dT%H:%M:%S"), **data}
    data.setdefault("machine", machine())
    data["machine"]["load_at_end"] = round(load_average(), 2)
    path = RESULTS / f"{scenario}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) + " |")


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# --- server processes ---------------------------------------------------------------------------


class ServerProcess:
    """``python -m bench.serve <mode>`` in its own process, its addresses read from its first line."""

    def __init__(self, mode: str, *, queue_size: int = 10_000) -> None:
        self.mode = mode
        self.socket_dir = Path(tempfile.mkdtemp(prefix="fapi-bench-"))
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.serve",
                mode,
                "--socket-dir",
                str(self.socket_dir),
                "--queue-size",
                str(queue_size),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        first = self.process.stdout.readline()
        if not first:
            raise RuntimeError(f"bench.serve {mode} did not start")
        self.info: dict[str, Any] = json.loads(first)

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def metrics(self) -> dict[str, float]:
        """The sidecar's Prometheus counters, summed over labels."""
        port = self.info["metrics_port"]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        totals: dict[str, float] = {}
        for line in data.decode().split("\r\n\r\n", 1)[-1].splitlines():
            if not line or line.startswith("#"):
                continue
            name, _, value = line.rpartition(" ")
            base = name.split("{", 1)[0]
            totals[base] = totals.get(base, 0.0) + float(value)
        return totals

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


# --- subscriber processes -----------------------------------------------------------------------


@dataclass
class SubscriberSpec:
    target: str
    count: int
    method: str = OUTPUTS_METHOD
    request: bytes = FOLLOW_REQUEST
    record_ids: bool = False  # subscriber 0 records (bench id, receipt time) for latency
    stall_index: int = -1  # this subscriber stops reading for stall_seconds after its first alert
    stall_seconds: float = 0.0
    batched: bool = False  # messages are OutputsBatch: responses framed as field 1


@dataclass
class SubscriberReport:
    alerts: list[int] = field(default_factory=list)
    gaps: list[int] = field(default_factory=list)
    missed_reported: list[int] = field(default_factory=list)  # sum of gap.missed / missed_before
    first_ns: list[int] = field(default_factory=list)
    last_ns: list[int] = field(default_factory=list)
    receipts: list[tuple[int, int]] = field(default_factory=list)


def _missed_in(payload: bytes) -> int:
    """The loss a gap notice reports (the streaming API's only loss report)."""
    response = outputs_pb2.response.FromString(payload)
    return int(response.gap.missed) if response.HasField("gap") else 0


async def _subscribe_all(spec: SubscriberSpec, control: multiprocessing.connection.Connection) -> None:
    report = SubscriberReport(
        alerts=[0] * spec.count,
        gaps=[0] * spec.count,
        missed_reported=[0] * spec.count,
        first_ns=[0] * spec.count,
        last_ns=[0] * spec.count,
    )
    channel = grpc.aio.insecure_channel(spec.target)
    stream = channel.unary_stream(
        spec.method, request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    clock = time.monotonic_ns

    async def one(index: int) -> None:
        alerts = report.alerts
        last = report.last_ns
        record = spec.record_ids and index == 0
        stall = index == spec.stall_index
        receipts = report.receipts
        count = 0
        async for message in stream(spec.request):
            for payload in unframe(message) if spec.batched else (message,):
                now = clock()
                if payload[0] == ALERT_FIRST_BYTE:
                    count += 1
                    alerts[index] = count
                    last[index] = now
                    if count == 1:
                        report.first_ns[index] = now
                        if stall:
                            await asyncio.sleep(spec.stall_seconds)
                    if record:
                        match = ID_PATTERN.search(payload)
                        if match:
                            receipts.append((int(match.group(1)), now))
                else:
                    report.gaps[index] += 1
                if stall:
                    # Only the stalled subscriber pays for parsing: it is the one told about its loss.
                    report.missed_reported[index] += _missed_in(payload)

    tasks = [asyncio.create_task(one(i)) for i in range(spec.count)]
    loop = asyncio.get_running_loop()
    # The controller asks for the report ("report") and finally says "stop".
    while True:
        command = await loop.run_in_executor(None, control.recv)
        control.send(report)
        if command == "stop":
            break
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await channel.close(grace=None)


def _subscriber_main(spec: SubscriberSpec, control: multiprocessing.connection.Connection) -> None:
    asyncio.run(_subscribe_all(spec, control))


class Subscribers:
    """``count`` gRPC subscribers in one separate process (so they do not share the server's core time)."""

    def __init__(self, spec: SubscriberSpec) -> None:
        context = multiprocessing.get_context("spawn")
        self._control, child = context.Pipe()
        self.process = context.Process(target=_subscriber_main, args=(spec, child), daemon=True)
        self.process.start()

    def report(self) -> SubscriberReport:
        self._control.send("report")
        report: SubscriberReport = self._control.recv()
        return report

    def stop(self) -> SubscriberReport:
        self._control.send("stop")
        report: SubscriberReport = self._control.recv()
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
        return report

    def wait_for(self, expected: int, *, idle_timeout: float = 3.0) -> SubscriberReport:
        """Until every subscriber has ``expected`` alerts, or nothing moved for ``idle_timeout`` s."""
        last_total, last_change = -1, time.monotonic()
        while True:
            report = self.report()
            if all(count >= expected for count in report.alerts):
                return report
            total = sum(report.alerts)
            if total != last_total:
                last_total, last_change = total, time.monotonic()
            elif time.monotonic() - last_change > idle_timeout:
                return report
            time.sleep(0.05)


def wait_subscribed(server: ServerProcess, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while server.metrics().get("falco_api_subscribers", 0) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} subscribers did not connect within {timeout}s")
        time.sleep(0.05)


# --- load generators ----------------------------------------------------------------------------


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


@dataclass
class WrkResult:
    requests: int
    seconds: float
    errors: int
    non_2xx: int

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def run_wrk(port: int, *, seconds: float, connections: int, bodies: int = 16) -> WrkResult:
    """wrk posting realistic alerts (a rotation of ``bodies`` different ones) for ``seconds``."""
    script_dir = Path(tempfile.mkdtemp(prefix="fapi-wrk-"))
    script = script_dir / "post.lua"
    lua_bodies = ",\n".join("[==[" + alert_body(i).decode() + "]==]" for i in range(bodies))
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"local bodies = {{\n{lua_bodies}\n}}\n"
        "local i = 0\n"
        "request = function()\n"
        "  i = i + 1\n"
        "  return wrk.format(nil, nil, nil, bodies[(i % #bodies) + 1])\n"
        "end\n"
    )
    try:
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "-s",
                str(script),
                f"http://127.0.0.1:{port}/",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        shutil.rmtree(script_dir, ignore_errors=True)
    match = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    if not match:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    took = float(match.group(2)) / (1000 if match.group(3) == "ms" else 1)
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non_2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    return WrkResult(int(match.group(1)), took, errors, non_2xx)


def write_lines(path: str, lines: Sequence[bytes], total: int) -> tuple[int, float]:
    """Write ``total`` lines (cycling through ``lines``) as fast as the socket takes them."""
    chunk = b"".join(lines)
    per_chunk = len(lines)
    sent = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(path)
        start = time.monotonic()
        while sent + per_chunk <= total:
            conn.sendall(chunk)
            sent += per_chunk
        if sent < total:
            conn.sendall(b"".join(lines[: total - sent]))
            sent = total
        took = time.monotonic() - start
    return sent, took


def _line_writer_main(path: str, total: int, result: multiprocessing.connection.Connection) -> None:
    lines = [alert_body(i) + b"\n" for i in range(64)]
    result.send(write_lines(path, lines, total))


class LineWriter:
    """Falco's program_output stand-in in its own process: ``total`` lines as fast as possible."""

    def __init__(self, path: str, total: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._result, child = context.Pipe()
        self.process = context.Process(target=_line_writer_main, args=(path, total, child), daemon=True)
        self.start_ns = time.monotonic_ns()
        self.process.start()

    def join(self) -> tuple[int, float]:
        sent: tuple[int, float] = self._result.recv()
        self.process.join(5)
        return sent


# --- the paced load generator (latency, stalled subscriber) -------------------------------------

_ID_PLACEHOLDER = b"BENCHID0000000000"


@dataclass
class PacedSpec:
    rate: float
    seconds: float
    http_port: int = 0  # POST to this port, or
    line_path: str = ""  # write lines to this unix socket
    connections: int = 4


@dataclass
class PacedReport:
    sent: int = 0
    send_ns: list[int] = field(default_factory=list)  # index = bench id
    lag_ns: list[int] = field(default_factory=list)  # how late each send was against its schedule
    rtt_ns: list[int] = field(default_factory=list)  # POST to its response (HTTP only)
    non_204: int = 0


async def _paced(spec: PacedSpec) -> PacedReport:
    """Fixed-rate sends, scheduled every millisecond; ids are 0.. in send order.

    HTTP requests are pipelined over a few keep-alive connections (responses come
    back in order per connection), so the generator never waits for a response
    before the next scheduled send.
    """
    templates = [alert_body(i, bench_id=0) for i in range(64)]
    report = PacedReport()
    clock = time.monotonic_ns
    writers: list[asyncio.StreamWriter] = []
    pending: list[list[int]] = []
    readers: list[asyncio.Task[None]] = []

    async def read_responses(reader: asyncio.StreamReader, queue: list[int]) -> None:
        buffer = b""
        while True:
            data = await reader.read(65536)
            if not data:
                return
            buffer += data
            while (end := buffer.find(b"\r\n\r\n")) >= 0:
                head, buffer = buffer[:end], buffer[end + 4 :]
                now = clock()
                report.rtt_ns.append(now - queue.pop(0))
                if not head.startswith(b"HTTP/1.1 204"):
                    report.non_204 += 1

    if spec.http_port:
        for _ in range(spec.connections):
            reader, writer = await asyncio.open_connection("127.0.0.1", spec.http_port)
            queue: list[int] = []
            writers.append(writer)
            pending.append(queue)
            readers.append(asyncio.create_task(read_responses(reader, queue)))
    else:
        _, writer = await asyncio.open_unix_connection(spec.line_path)
        writers.append(writer)
    total = int(spec.rate * spec.seconds)
    interval_ns = 1e9 / spec.rate
    start = clock()
    sent = 0
    while sent < total:
        now = clock()
        due = min(total, int((now - start) / interval_ns) + 1)
        while sent < due:
            body = templates[sent % 64].replace(_ID_PLACEHOLDER, b"BENCHID%010d" % sent)
            target = sent % len(writers)
            if spec.http_port:
                data = (
                    b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body) + body
                )
            else:
                data = body + b"\n"
            sent_at = clock()
            writers[target].write(data)
            if spec.http_port:
                pending[target].append(sent_at)
            report.send_ns.append(sent_at)
            report.lag_ns.append(sent_at - int(start + sent * interval_ns))
            sent += 1
        await asyncio.sleep(0.001)
    for writer in writers:
        await writer.drain()
    deadline = time.monotonic() + 10
    while any(pending) and time.monotonic() < deadline:  # noqa: ASYNC110 - several queues, polled briefly
        await asyncio.sleep(0.01)
    for task in readers:
        task.cancel()
    for writer in writers:
        writer.close()
    report.sent = sent
    return report


def _paced_main(spec: PacedSpec, result: multiprocessing.connection.Connection) -> None:
    result.send(asyncio.run(_paced(spec)))


class PacedGenerator:
    """The fixed-rate generator in its own process."""

    def __init__(self, spec: PacedSpec) -> None:
        context = multiprocessing.get_context("spawn")
        self._result, child = context.Pipe()
        self.process = context.Process(target=_paced_main, args=(spec, child), daemon=True)
        self.process.start()

    def join(self) -> PacedReport:
        report: PacedReport = self._result.recv()
        self.process.join(5)
        return report


def latency_stats(values_ns: Sequence[int]) -> dict[str, float]:
    """p50 / p99 / max in milliseconds."""
    ms = [v / 1e6 for v in values_ns]
    return {
        "p50_ms": percentile(ms, 0.50),
        "p99_ms": percentile(ms, 0.99),
        "max_ms": max(ms) if ms else 0.0,
        "n": len(ms),
    }


def delivery_latencies(paced: PacedReport, receipts: Sequence[tuple[int, int]]) -> list[int]:
    return [received - paced.send_ns[bench_id] for bench_id, received in receipts if bench_id < paced.sent]
