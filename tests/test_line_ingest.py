"""Line ingest: one alert per line over a unix socket, bad lines counted and skipped, never a crash."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from falco_api.alerts import Alert
from falco_api.contract.falco import outputs_pb2
from falco_api.hub import Subscription
from falco_api.streams import EventStreams
from falco_api.testing.falco_double import rule_alert
from falco_api_sidecar.line_ingest import (
    LineIngestAddressError,
    LineSplitter,
    RunningLineIngest,
    start_line_ingest,
)


def line(index: int) -> bytes:
    return json.dumps(rule_alert("node-a", index=index)).encode() + b"\n"


# --- the pure splitter --------------------------------------------------------------------------


def test_splitter_yields_complete_lines_and_keeps_the_rest_for_later() -> None:
    splitter = LineSplitter(max_line=100)
    assert splitter.feed(b"a\nb\nc") == ([b"a", b"b"], 0)
    assert splitter.feed(b"c") == ([], 0)
    assert splitter.feed(b"c\nd\n") == ([b"ccc", b"d"], 0)
    assert splitter.finish() is False


def test_splitter_rejects_an_oversized_line_once_and_resyncs_at_the_next_newline() -> None:
    splitter = LineSplitter(max_line=10)
    assert splitter.feed(b"ok\n" + b"x" * 8) == ([b"ok"], 0)
    # The pending line crosses the limit here: counted now, then discarded as it goes on.
    assert splitter.feed(b"x" * 8) == ([], 1)
    assert splitter.feed(b"x" * 1000) == ([], 0)
    assert splitter.feed(b"xx\nnext\n") == ([b"next"], 0)
    # An oversized line that arrives whole in one chunk.
    assert splitter.feed(b"y" * 11 + b"\nz\n") == ([b"z"], 1)
    assert splitter.finish() is False


def test_splitter_reports_a_line_cut_off_by_the_writer() -> None:
    splitter = LineSplitter(max_line=100)
    splitter.feed(b'{"rule": "half')
    assert splitter.finish() is True
    # A trailing blank fragment is not an alert that was lost.
    splitter.feed(b"\n  ")
    assert splitter.finish() is False


def test_splitter_refuses_a_zero_limit() -> None:
    with pytest.raises(ValueError):
        LineSplitter(max_line=0)


# --- over a real unix socket ----------------------------------------------------------------------


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to ~107 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="fapi-li-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def streams() -> EventStreams:
    return EventStreams(origin="node-a/1-abc", hostname="node-a", replay_size=1000, queue_size=1000)


@pytest.fixture
async def line_ingest(streams: EventStreams, socket_dir: Path) -> AsyncIterator[RunningLineIngest]:
    running = await start_line_ingest(streams, f"unix://{socket_dir}/alerts.sock", max_line=4096)
    yield running
    await running.stop()


async def write_and_close(path: Path, *chunks: bytes, pause: float = 0.0) -> None:
    _, writer = await asyncio.open_unix_connection(str(path))
    for chunk in chunks:
        writer.write(chunk)
        await writer.drain()
        if pause:
            await asyncio.sleep(pause)
    writer.close()
    await writer.wait_closed()


async def until(check: object, within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def drain(subscription: Subscription[Alert], count: int) -> list[outputs_pb2.response]:
    """What subscribers receive: the published bytes, decoded."""
    got = []
    for _ in range(count):
        delivery = await asyncio.wait_for(subscription.next(), 5)
        assert delivery is not None and delivery.entry is not None
        got.append(outputs_pb2.response.FromString(delivery.entry.payload))
    return got


async def test_good_lines_are_published_in_order(
    line_ingest: RunningLineIngest, streams: EventStreams
) -> None:
    subscription = streams.alerts.subscribe(lambda _a: True, follow=True)
    assert line_ingest.socket_path is not None
    assert oct(line_ingest.socket_path.stat().st_mode & 0o777) == oct(0o660)
    await write_and_close(line_ingest.socket_path, b"".join(line(i) for i in range(200)))
    got = await drain(subscription, 200)
    assert [a.output_fields["proc.cmdline"] for a in got] == [
        rule_alert("node-a", index=i)["output_fields"]["proc.cmdline"] for i in range(200)
    ]
    assert line_ingest.ingest.stats.accepted == 200
    assert not streams.rejected


async def test_lines_split_across_reads_are_joined(
    line_ingest: RunningLineIngest, streams: EventStreams
) -> None:
    subscription = streams.alerts.subscribe(lambda _a: True, follow=True)
    data = line(1) + line(2)
    # Cut in the middle of the first alert and right before the second newline.
    assert line_ingest.socket_path is not None
    await write_and_close(line_ingest.socket_path, data[:37], data[37:-1], data[-1:], pause=0.02)
    got = await drain(subscription, 2)
    assert [a.rule for a in got] == [rule_alert("n", index=1)["rule"], rule_alert("n", index=2)["rule"]]
    assert not streams.rejected


async def test_malformed_lines_are_counted_by_reason_and_the_good_ones_still_flow(
    line_ingest: RunningLineIngest, streams: EventStreams
) -> None:
    subscription = streams.alerts.subscribe(lambda _a: True, follow=True)
    bad_priority = json.dumps(rule_alert("node-a", index=0) | {"priority": "Severe"}).encode() + b"\n"
    assert line_ingest.socket_path is not None
    await write_and_close(
        line_ingest.socket_path,
        line(0) + b"{not json\n" + b"[1,2]\n" + bad_priority + b"\n\r\n" + b"\xff\xfe\n" + line(1),
    )
    got = await drain(subscription, 2)
    assert len(got) == 2
    await until(lambda: sum(streams.rejected.values()) == 4)
    assert streams.rejected == {"bad_json": 2, "not_an_object": 1, "unknown_priority": 1}
    # Rejections reach the drops stream like the HTTP path's do.
    report = streams.flush_rejections()
    assert report is not None and report.dropped == 4


async def test_oversized_line_is_rejected_and_the_next_line_is_read(
    line_ingest: RunningLineIngest, streams: EventStreams
) -> None:
    subscription = streams.alerts.subscribe(lambda _a: True, follow=True)
    huge = b'{"output": "' + b"x" * 100_000 + b'"}\n'
    assert line_ingest.socket_path is not None
    await write_and_close(line_ingest.socket_path, line(0), huge[:50_000], huge[50_000:], line(1), pause=0.01)
    got = await drain(subscription, 2)
    assert len(got) == 2
    await until(lambda: streams.rejected["too_large"] == 1)
    assert sum(streams.rejected.values()) == 1


async def test_writer_that_disconnects_mid_line_loses_only_that_line(
    line_ingest: RunningLineIngest, streams: EventStreams
) -> None:
    subscription = streams.alerts.subscribe(lambda _a: True, follow=True)
    assert line_ingest.socket_path is not None
    await write_and_close(line_ingest.socket_path, line(0) + line(1)[:40])
    await until(lambda: streams.rejected["partial_line"] == 1)
    # The connector reconnects and carries on; the new connection starts clean.
    await write_and_close(line_ingest.socket_path, line(2))
    got = await drain(subscription, 2)
    assert [a.output_fields["proc.cmdline"] for a in got] == ["bash -c id #0", "cat -c id #2"]
    assert sum(streams.rejected.values()) == 1
    assert line_ingest.ingest.stats.connections == 2


async def test_several_writers_at_once(line_ingest: RunningLineIngest, streams: EventStreams) -> None:
    subscription = streams.alerts.subscribe(lambda _a: True, follow=True)
    assert line_ingest.socket_path is not None
    path = line_ingest.socket_path
    await asyncio.gather(*(write_and_close(path, b"".join(line(i) for i in range(50))) for _ in range(4)))
    assert len(await drain(subscription, 200)) == 200


async def test_restart_replaces_a_stale_socket_file(streams: EventStreams, socket_dir: Path) -> None:
    address = f"unix://{socket_dir}/alerts.sock"
    first = await start_line_ingest(streams, address)
    first.server.close()  # a crash: the socket file stays behind
    await first.server.wait_closed()
    assert (socket_dir / "alerts.sock").exists()
    second = await start_line_ingest(streams, address)
    await write_and_close(socket_dir / "alerts.sock", line(0))
    await until(lambda: second.ingest.stats.accepted == 1)
    await second.stop()
    assert not (socket_dir / "alerts.sock").exists()


async def test_a_regular_file_in_the_way_is_never_deleted(streams: EventStreams, socket_dir: Path) -> None:
    precious = socket_dir / "alerts.sock"
    precious.write_text("not a socket")
    with pytest.raises(LineIngestAddressError, match="not a socket"):
        await start_line_ingest(streams, f"unix://{precious}")
    assert precious.read_text() == "not a socket"


@pytest.mark.parametrize(
    "address", ["alerts.sock", "unix://relative/alerts.sock", "tcp://nowhere", "http://x:1"]
)
async def test_bad_addresses_are_refused_clearly(streams: EventStreams, address: str) -> None:
    with pytest.raises(LineIngestAddressError, match="--line-ingest"):
        await start_line_ingest(streams, address)


async def test_tcp_listener_on_loopback(streams: EventStreams) -> None:
    running = await start_line_ingest(streams, "tcp://127.0.0.1:0")
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", running.port)
        writer.write(line(0) + line(1))
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        await until(lambda: running.ingest.stats.accepted == 2)
    finally:
        await running.stop()


async def test_a_subscriber_that_stopped_reading_never_holds_ingest_up(
    line_ingest: RunningLineIngest, streams: EventStreams
) -> None:
    stalled = streams.alerts.subscribe(lambda _a: True, follow=True, max_queue=2000)
    assert line_ingest.socket_path is not None
    started = asyncio.get_running_loop().time()
    await write_and_close(line_ingest.socket_path, b"".join(line(i) for i in range(3000)))
    await until(lambda: line_ingest.ingest.stats.accepted == 3000)
    # Every chunk past the catch-up depth costs one short step, not the full pause.
    assert asyncio.get_running_loop().time() - started < 2.0
    assert stalled.depth == 2000 and stalled.total_missed == 1000


# --- wired into the sidecar: --line-ingest ---------------------------------------------------------


async def test_sidecar_flag_starts_line_ingest_and_stops_it(socket_dir: Path) -> None:
    from falco_api_sidecar import main as sidecar_main

    address = f"unix://{socket_dir}/alerts.sock"
    flags = {
        "--grpc-listen": f"unix://{socket_dir}/api.sock",
        "--ingest-listen": "127.0.0.1:0",
        "--metrics-listen": "off",
        "--falco-url": "http://127.0.0.1:9",
        "--line-ingest": address,
    }
    args = sidecar_main.build_parser().parse_args([part for pair in flags.items() for part in pair])
    config = sidecar_main.config_from_args(args)
    assert config.line_ingest == address
    sidecar = sidecar_main.Sidecar(config)
    await sidecar.start()
    try:
        subscription = sidecar.streams.alerts.subscribe(lambda _a: True, follow=True)
        await write_and_close(socket_dir / "alerts.sock", line(0) + b"{oops\n")
        assert len(await drain(subscription, 1)) == 1
        await until(lambda: sidecar.streams.rejected["bad_json"] == 1)
    finally:
        await sidecar.stop()
    assert not (socket_dir / "alerts.sock").exists()


async def test_an_unpaired_surrogate_escape_is_a_bad_line_not_a_dead_connection(
    line_ingest: RunningLineIngest, streams: EventStreams
) -> None:
    subscription = streams.alerts.subscribe(lambda _a: True, follow=True)
    lone = rule_alert("node-a", index=0)
    lone["output_fields"]["proc.name"] = "\ud800"
    paired = rule_alert("node-a", index=1)
    paired["output_fields"]["proc.name"] = "\U0001f600"
    assert line_ingest.socket_path is not None
    await write_and_close(
        line_ingest.socket_path, json.dumps(lone).encode() + b"\n" + json.dumps(paired).encode() + b"\n"
    )
    got = await drain(subscription, 1)
    assert got[0].output_fields["proc.name"] == "\U0001f600"
    assert streams.rejected == {"bad_json": 1}


# --- what subscribers receive: the contract's message, whatever the field values -----------------

ODD_FIELDS: dict[str, object] = {
    "null": None,
    "yes": True,
    "no": False,
    "zero": 0,
    "negative": -5,
    "int64.min": -(2**63),
    "int64.max": 2**63 - 1,
    "uint64": 2**63,
    "uint64.max": 2**64 - 1,
    "beyond": 2**64,
    "far.below": -(2**64),
    "float": 1.5,
    "negative.zero": -0.0,
    "empty": "",
    "unicode": "é☃\U0001f600",
    "long": "x" * 1000,
    "list": [1, "a", None, [2.5, True]],
    "object": {"b": 1, "a": [1]},
    "n" * 300: "long name",
}


def _contract_cases() -> list[dict[str, Any]]:
    from falco_api.testing.falco_double import alert_mix

    mix = alert_mix("node-a")
    alerts = [next(mix) for _ in range(50)]
    # Rule alerts of each kind, a syscall-drop and a metrics-snapshot internal alert.
    cases = [alerts[i] for i in (0, 1, 2, 24, 49)]
    base = rule_alert("node-a", index=3)
    cases += [
        base | {"output_fields": base["output_fields"] | ODD_FIELDS},
        base | {"time": "1969-12-31T23:59:58.5Z", "priority": "Emergency", "source": "k8s_audit"},
        base | {"time": "1970-01-01T00:00:00Z", "tags": [], "source": "aws_cloudtrail", "output": ""},
        base | {"hostname": "", "message": "é", "tags": ["a", "", "☃"], "output_fields": {}},
        {"time": "2024-05-01T12:00:00+02:00", "rule": "r", "priority": "debug"},
    ]
    return cases


@pytest.mark.parametrize("case", _contract_cases())
def test_published_bytes_are_exactly_the_contract_response(
    streams: EventStreams, case: dict[str, Any]
) -> None:
    from falco_api.alerts import parse_alert
    from falco_api.contract.falco import outputs_pb2

    # Twice: the second time the field encodings come from the cache.
    for _ in range(2):
        alert = parse_alert(json.dumps(case))
        entry = streams.ingest(alert)
        expected = alert.to_response(seq=entry.seq, origin=streams.origin)
        assert outputs_pb2.response.FromString(entry.payload) == expected
    assert outputs_pb2.response.FromString(alert.to_payload()) == alert.to_response()
