"""falco.api.bidirectional/inputs: validation, forwarding to the k8saudit webhook, acks, flow control, CLI."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from falco_api.cli_inputs import add_inputs_parser, messages_in, run_inputs
from falco_api.contract.falco.api import bidirectional_pb2_grpc, inputs_pb2
from falco_api.server import RunningServer, start_server
from falco_api.testing.k8saudit_double import K8sAuditDouble
from falco_api_sidecar.authz import AuthzInterceptor, AuthzPolicy
from falco_api_sidecar.inputs import (
    BIDIRECTIONAL_SERVICE,
    InputsCollector,
    InputsLimits,
    InputsServicer,
    InputsStats,
    K8sAuditForwarder,
    Rejected,
    RejectKind,
    Validated,
    add_inputs_arguments,
    inputs_handlers,
    inputs_servicer_from_args,
    validate_audit_json,
)

STAMP = "2024-05-01T10:00:00.123456789Z"


def audit_event(index: int, *, stamp: str = STAMP, top_level: bool = True) -> dict[str, Any]:
    event: dict[str, Any] = {
        "level": "Metadata",
        "auditID": f"audit-{index}",
        "stage": "ResponseComplete",
        "requestURI": "/api/v1/namespaces/default/pods",
        "verb": "create",
        "user": {"username": "admin", "groups": ["system:masters"]},
        "objectRef": {"resource": "pods", "namespace": "default", "name": f"pod-{index}"},
        "requestReceivedTimestamp": stamp,
        "stageTimestamp": stamp,
    }
    if top_level:
        event = {"kind": "Event", "apiVersion": "audit.k8s.io/v1", **event}
    return event


def event_list(first: int, count: int) -> dict[str, Any]:
    return {
        "kind": "EventList",
        "apiVersion": "audit.k8s.io/v1",
        "metadata": {},
        "items": [audit_event(first + n, top_level=False) for n in range(count)],
    }


def text(document: Any) -> str:
    return json.dumps(document)


LIMITS = InputsLimits()


# --- validation (pure) -----------------------------------------------------------------------


def test_a_single_event_and_an_event_list_are_valid() -> None:
    single = validate_audit_json(text(audit_event(1)), LIMITS)
    assert isinstance(single, Validated) and single.events == 1
    assert json.loads(single.body) == audit_event(1)
    batch = validate_audit_json(text(event_list(1, 5)), LIMITS)
    assert isinstance(batch, Validated) and batch.events == 5


@pytest.mark.parametrize(
    ("payload", "kind", "reason"),
    [
        ("", RejectKind.EMPTY, "no k8s_audit_json"),
        ('{"kind": "Event",', RejectKind.MALFORMED, "malformed JSON at line 1 column 18"),
        ('{"kind": "Event", "x": NaN}', RejectKind.MALFORMED, "NaN is not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, RejectKind.MALFORMED, "malformed JSON"),
        ("[1, 2]", RejectKind.NOT_AUDIT, "expected a JSON object, got list"),
        ('{"kind": "Pod", "apiVersion": "v1"}', RejectKind.NOT_AUDIT, "kind is 'Pod'"),
        ('{"apiVersion": "audit.k8s.io/v1"}', RejectKind.NOT_AUDIT, "kind is None"),
        (
            '{"kind": "Event", "apiVersion": "audit.k8s.io/v1beta1", "stageTimestamp": "2024-05-01T10:00Z"}',
            RejectKind.NOT_AUDIT,
            "apiVersion is 'audit.k8s.io/v1beta1', expected 'audit.k8s.io/v1'",
        ),
        ('{"kind": "EventList", "apiVersion": "audit.k8s.io/v1"}', RejectKind.NOT_AUDIT, "no 'items' list"),
        (
            '{"kind": "EventList", "apiVersion": "audit.k8s.io/v1", "items": []}',
            RejectKind.NOT_AUDIT,
            "no items",
        ),
        ('{"kind": "Event", "apiVersion": "audit.k8s.io/v1"}', RejectKind.BAD_EVENT, "has no stageTimestamp"),
        (
            '{"kind": "Event", "apiVersion": "audit.k8s.io/v1", "stageTimestamp": "yesterday"}',
            RejectKind.BAD_EVENT,
            "'yesterday', which is not RFC 3339",
        ),
        (
            '{"kind": "Event", "apiVersion": "audit.k8s.io/v1", "stageTimestamp": "2024-13-40T10:00:00Z"}',
            RejectKind.BAD_EVENT,
            "not a real time",
        ),
        (
            '{"kind": "EventList", "apiVersion": "audit.k8s.io/v1", '
            '"items": [{"stageTimestamp": "2024-05-01T10:00:00Z"}, 3]}',
            RejectKind.BAD_EVENT,
            "items[1] is not a JSON object",
        ),
        (
            '{"kind": "EventList", "apiVersion": "audit.k8s.io/v1", "items": [{"kind": "Pod"}]}',
            RejectKind.BAD_EVENT,
            "items[0] has kind 'Pod', expected 'Event'",
        ),
    ],
)
def test_invalid_messages_are_rejected_with_the_reason(payload: str, kind: RejectKind, reason: str) -> None:
    outcome = validate_audit_json(payload, LIMITS)
    assert isinstance(outcome, Rejected), outcome
    assert outcome.kind is kind
    assert reason in outcome.reason


def test_size_and_count_limits() -> None:
    limits = InputsLimits(max_message_bytes=2000, max_events=3, max_event_bytes=600)
    too_large = validate_audit_json(text(event_list(1, 10)), limits)
    assert isinstance(too_large, Rejected) and too_large.kind is RejectKind.TOO_LARGE
    assert "over the limit of 2000" in too_large.reason
    too_many = validate_audit_json(text(event_list(1, 4)), InputsLimits(max_events=3))
    assert isinstance(too_many, Rejected) and too_many.kind is RejectKind.TOO_MANY_EVENTS
    assert too_many.events == 4 and "4 events, over the limit of 3" in too_many.reason
    big_event = audit_event(1)
    big_event["requestObject"] = {"data": "x" * 700}
    fat = validate_audit_json(text(big_event), limits)
    assert isinstance(fat, Rejected) and fat.kind is RejectKind.BAD_EVENT
    assert "over the plugin's per-event limit of 600" in fat.reason


def test_limits_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="window"):
        InputsLimits(window=0)
    with pytest.raises(ValueError, match="timeout"):
        InputsLimits(forward_timeout=0)


# --- the k8saudit double behaves like the plugin's webhook -----------------------------------


async def test_double_answers_like_the_plugin_webhook() -> None:
    double = K8sAuditDouble()
    await double.start()
    try:
        async with aiohttp.ClientSession() as session:
            json_header = {"Content-Type": "application/json"}
            async with session.post(double.url, data=text(event_list(1, 2)), headers=json_header) as reply:
                assert reply.status == 200
            # The plugin answers before parsing, then only logs what it cannot use.
            async with session.post(double.url, data=b"{nope", headers=json_header) as reply:
                assert reply.status == 200
            async with session.post(double.url, data=b"{}", headers={"Content-Type": "text/plain"}) as reply:
                assert reply.status == 400
            async with session.get(double.url) as reply:
                assert reply.status == 405
            double.strict = True
            async with session.post(double.url, data=b'{"kind": "Pod"}', headers=json_header) as reply:
                assert reply.status == 400
        assert [event["auditID"] for event in double.events] == ["audit-1", "audit-2"]
        assert [drop.reason.split(":")[0] for drop in double.dropped] == ["malformed JSON"]
    finally:
        await double.stop()


# --- over real gRPC --------------------------------------------------------------------------


class InputsServer:
    def __init__(self, servicer: InputsServicer, server: RunningServer, socket_dir: Path) -> None:
        self.servicer = servicer
        self.server = server
        self.socket_dir = socket_dir
        self.channel = grpc.aio.insecure_channel(f"unix://{socket_dir}/api.sock")

    async def send(self, requests: Iterable[inputs_pb2.InputsRequest]) -> list[inputs_pb2.InputsResponse]:
        stub = bidirectional_pb2_grpc.bidirectionalStub(self.channel)
        return [response async for response in stub.inputs(iter(list(requests)), timeout=20)]

    async def close(self) -> None:
        await self.channel.close(None)
        await self.server.stop(0)
        await self.servicer.close()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


async def serve_inputs(url: str, limits: InputsLimits) -> InputsServer:
    servicer = InputsServicer(K8sAuditForwarder(url, timeout=limits.forward_timeout), limits)
    # AF_UNIX paths are limited to ~107 bytes; pytest's tmp_path can be longer.
    socket_dir = Path(tempfile.mkdtemp(prefix="fapi-in-"))
    server = await start_server(
        f"unix://{socket_dir}/api.sock",
        tls=None,
        insecure=False,
        handlers=inputs_handlers(servicer),
        service_names=[BIDIRECTIONAL_SERVICE],
        interceptors=[AuthzInterceptor(AuthzPolicy.default())],
    )
    return InputsServer(servicer, server, socket_dir)


@pytest.fixture
async def k8saudit() -> AsyncIterator[K8sAuditDouble]:
    double = K8sAuditDouble()
    await double.start()
    yield double
    await double.stop()


async def unused_url() -> str:
    """A webhook URL where nothing listens: the port of a double that was started and stopped."""
    double = K8sAuditDouble()
    await double.start()
    url = double.url
    await double.stop()
    return url


def request(request_id: int, document: Any) -> inputs_pb2.InputsRequest:
    payload = document if isinstance(document, str) else text(document)
    return inputs_pb2.InputsRequest(id=request_id, k8s_audit_json=payload)


async def test_events_are_forwarded_and_acknowledged_in_order(k8saudit: K8sAuditDouble) -> None:
    server = await serve_inputs(k8saudit.url, InputsLimits())
    try:
        acks = await server.send(
            [request(10, audit_event(1)), request(11, event_list(2, 3)), request(7, audit_event(5))]
        )
        assert [(ack.id, ack.accepted, ack.events, ack.reason) for ack in acks] == [
            (10, True, 1, ""),
            (11, True, 3, ""),
            (7, True, 1, ""),
        ]
        # Acknowledgements are in order; the forwards themselves run concurrently (the window), so the
        # webhook may receive them in any order.
        assert sorted(event["auditID"] for event in k8saudit.events) == [f"audit-{n}" for n in range(1, 6)]
        assert k8saudit.dropped == []
        stats = server.servicer.stats
        assert (stats.messages_accepted, stats.events_accepted, stats.calls) == (3, 5, 1)
        assert sum(stats.rejected.values()) == 0
    finally:
        await server.close()


async def test_bad_messages_are_rejected_and_later_good_ones_still_go_through(
    k8saudit: K8sAuditDouble,
) -> None:
    server = await serve_inputs(k8saudit.url, InputsLimits(max_message_bytes=4096))
    try:
        acks = await server.send(
            [
                request(1, audit_event(1)),
                request(2, '{"kind": "Event", "apiVersion": '),
                request(3, {"kind": "Pod", "apiVersion": "v1"}),
                request(4, event_list(10, 30)),
                inputs_pb2.InputsRequest(id=5),
                request(6, audit_event(2)),
            ]
        )
        assert [ack.id for ack in acks] == [1, 2, 3, 4, 5, 6]
        assert [ack.accepted for ack in acks] == [True, False, False, False, False, True]
        assert "malformed JSON at line 1" in acks[1].reason
        assert "kind is 'Pod'" in acks[2].reason
        assert "over the limit of 4096" in acks[3].reason
        assert "no k8s_audit_json" in acks[4].reason
        assert sorted(event["auditID"] for event in k8saudit.events) == ["audit-1", "audit-2"]
        rejected = server.servicer.stats.rejected
        assert (rejected["malformed"], rejected["not_audit"], rejected["too_large"], rejected["empty"]) == (
            1,
            1,
            1,
            1,
        )
    finally:
        await server.close()


async def test_unreachable_webhook_every_request_is_told(k8saudit: K8sAuditDouble) -> None:
    url = await unused_url()
    server = await serve_inputs(url, InputsLimits(forward_timeout=2.0))
    try:
        acks = await server.send([request(n, audit_event(n)) for n in range(1, 6)])
        assert [ack.id for ack in acks] == [1, 2, 3, 4, 5]
        for ack in acks:
            assert not ack.accepted and ack.events == 1
            assert ack.reason.startswith(f"k8saudit webhook {url} unreachable: ")
        assert server.servicer.stats.rejected["unreachable"] == 5
    finally:
        await server.close()


async def test_a_call_against_a_dead_webhook_ends_unavailable_instead_of_reading_forever() -> None:
    url = await unused_url()
    server = await serve_inputs(url, InputsLimits(window=4, unreachable_limit=3, forward_timeout=2.0))
    sent: list[int] = []

    acks: list[inputs_pb2.InputsResponse] = []

    async def never_half_closes() -> AsyncIterator[inputs_pb2.InputsRequest]:
        # A long-lived shipper: it sends and keeps the stream open. It sends no more than the
        # server reads before giving up, because grpc-python's client turns a write that races the
        # server's final status into INTERNAL (a client-side artefact, not the server's answer).
        for request_id in range(1, 4):
            sent.append(request_id)
            yield request(request_id, audit_event(request_id))
        await asyncio.Event().wait()

    try:
        stub = bidirectional_pb2_grpc.bidirectionalStub(server.channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for ack in stub.inputs(never_half_closes(), timeout=20):
                acks.append(ack)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        details = caught.value.details() or ""
        assert url in details and "every message read was acknowledged" in details
        # Acknowledged: a prefix of what was sent, each one rejected with the reason.
        assert [ack.id for ack in acks] == list(range(1, len(acks) + 1))
        assert 3 <= len(acks) <= len(sent) and not any(ack.accepted for ack in acks)
        assert server.servicer.stats.calls_ended_unavailable == 1
    finally:
        await server.close()


async def test_webhook_errors_and_timeouts_are_reasons(k8saudit: K8sAuditDouble) -> None:
    server = await serve_inputs(k8saudit.url, InputsLimits(forward_timeout=0.3))
    try:
        k8saudit.fail_status = 503
        (failed,) = await server.send([request(1, audit_event(1))])
        assert not failed.accepted
        assert (
            failed.reason
            == f"k8saudit webhook {k8saudit.url} answered HTTP 503: k8saudit double told to fail"
        )
        k8saudit.fail_status = None
        k8saudit.delay = 1.0
        (slow,) = await server.send([request(2, audit_event(2))])
        assert not slow.accepted and "did not answer within 0.3 s" in slow.reason
        k8saudit.delay = 0
        (recovered,) = await server.send([request(3, audit_event(3))])
        assert recovered.accepted
        stats = server.servicer.stats
        assert (stats.rejected["http_error"], stats.rejected["timeout"], stats.messages_accepted) == (1, 1, 1)
    finally:
        await server.close()


async def test_the_window_bounds_forwards_in_flight(k8saudit: K8sAuditDouble) -> None:
    window = 4
    k8saudit.delay = 0.05
    server = await serve_inputs(k8saudit.url, InputsLimits(window=window))
    try:
        acks = await server.send([request(n, audit_event(n)) for n in range(1, 25)])
        assert [ack.id for ack in acks] == list(range(1, 25)) and all(ack.accepted for ack in acks)
        assert 2 <= k8saudit.max_in_flight <= window
        assert server.servicer.stats.max_forwards_in_flight <= window
        assert server.servicer.stats.forwards_in_flight == 0
    finally:
        await server.close()


async def test_the_server_stops_reading_when_the_window_is_full(k8saudit: K8sAuditDouble) -> None:
    """A stuck webhook: the server holds `window` messages, and HTTP/2 flow control stops the client."""
    k8saudit.delay = 60
    server = await serve_inputs(k8saudit.url, InputsLimits(window=3, forward_timeout=60))
    pulled: list[int] = []
    padded = audit_event(0)
    padded["requestObject"] = {"data": "x" * 200_000}

    async def endless() -> AsyncIterator[inputs_pb2.InputsRequest]:
        request_id = 0
        while True:
            request_id += 1
            pulled.append(request_id)
            yield request(request_id, padded)

    try:
        stub = bidirectional_pb2_grpc.bidirectionalStub(server.channel)
        call = stub.inputs(endless())
        reading = asyncio.ensure_future(call.read())
        samples = [-1, -2]
        for _ in range(50):
            await asyncio.sleep(0.1)
            samples.append(len(pulled))
            if samples[-1] == samples[-2] == samples[-3]:
                break
        assert samples[-1] == samples[-2] == samples[-3], f"the client never stopped: {samples}"
        assert k8saudit.max_in_flight == 3 and server.servicer.stats.forwards_in_flight == 3
        assert not reading.done()
        call.cancel()
        reading.cancel()
    finally:
        await server.close()
    assert server.servicer.stats.forwards_in_flight == 0


async def test_a_client_that_goes_away_leaves_nothing_behind(k8saudit: K8sAuditDouble) -> None:
    k8saudit.delay = 5
    server = await serve_inputs(k8saudit.url, InputsLimits(window=2, forward_timeout=10))
    try:
        stub = bidirectional_pb2_grpc.bidirectionalStub(server.channel)
        call = stub.inputs(iter([request(1, audit_event(1)), request(2, audit_event(2))]))
        for _ in range(50):
            if server.servicer.stats.forwards_in_flight == 2:
                break
            await asyncio.sleep(0.02)
        call.cancel()
        for _ in range(50):
            if server.servicer.stats.forwards_in_flight == 0:
                break
            await asyncio.sleep(0.02)
        assert server.servicer.stats.forwards_in_flight == 0
    finally:
        await server.close()


# --- CLI: falco-api inputs send --------------------------------------------------------------


def parse_cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="falco-api")
    add_inputs_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_files_split_into_messages(tmp_path: Path) -> None:
    pretty = json.dumps(event_list(1, 2), indent=2)
    assert [m.source for m in messages_in("list.json", io.StringIO(pretty))] == ["list.json"]
    lines = "\n".join(json.dumps(audit_event(n)) for n in range(3)) + "\n\n"
    assert [m.source for m in messages_in("log.jsonl", io.StringIO(lines))] == [
        "log.jsonl:1",
        "log.jsonl:2",
        "log.jsonl:3",
    ]
    array = json.dumps([audit_event(1), audit_event(2)], indent=1)
    assert [m.source for m in messages_in("-", io.StringIO(array))] == ["<stdin>[0]", "<stdin>[1]"]
    assert list(messages_in("empty", io.StringIO("\n  \n"))) == []
    (broken,) = messages_in("broken.json", io.StringIO('{\n  "kind": "Event",\n  oops\n}'))
    assert broken.source == "broken.json" and "oops" in broken.text


async def test_cli_send_prints_one_line_per_ack_and_fails_on_rejections(
    k8saudit: K8sAuditDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = tmp_path / "list.json"
    good.write_text(json.dumps(event_list(1, 2), indent=2))
    lines = tmp_path / "audit.log"
    lines.write_text(
        json.dumps(audit_event(3)) + "\n" + '{"kind": "Event"}\n' + json.dumps(audit_event(4)) + "\n"
    )
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(audit_event(5))))
    server = await serve_inputs(k8saudit.url, InputsLimits())
    try:
        out = io.StringIO()
        status = await run_inputs(
            parse_cli(["inputs", "send", str(good), str(lines), "-"]), server.channel, out
        )
        printed = out.getvalue().splitlines()
        assert status == 1
        assert printed == [
            f"accepted  {good} (2 events)",
            f"accepted  {lines}:1 (1 event)",
            f"REJECTED  {lines}:2: apiVersion is None, expected 'audit.k8s.io/v1'",
            f"accepted  {lines}:3 (1 event)",
            "accepted  <stdin>:1 (1 event)",
        ]
        assert len(k8saudit.events) == 5

        out = io.StringIO()
        status = await run_inputs(parse_cli(["inputs", "send", "-o", "json", str(good)]), server.channel, out)
        assert status == 0
        assert json.loads(out.getvalue()) == {
            "id": 1,
            "source": str(good),
            "accepted": True,
            "events": 2,
            "reason": "",
        }
    finally:
        await server.close()


async def test_cli_refuses_a_missing_file_before_sending(
    k8saudit: K8sAuditDouble, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = await serve_inputs(k8saudit.url, InputsLimits())
    try:
        good = tmp_path / "ok.json"
        good.write_text(json.dumps(audit_event(1)))
        args = parse_cli(["inputs", "send", str(good), str(tmp_path / "missing.json")])
        assert await run_inputs(args, server.channel, io.StringIO()) == 2
        error = capsys.readouterr().err
        assert f"cannot read {tmp_path / 'missing.json'}: No such file or directory" in error
        assert k8saudit.events == []
    finally:
        await server.close()


def test_metrics_collector_reports_the_counters() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    stats = InputsStats()
    stats.count(Validated(b"{}", 3))
    stats.count(Rejected(RejectKind.UNREACHABLE, "down"))
    registry = CollectorRegistry()
    registry.register(InputsCollector(stats))
    scraped = generate_latest(registry).decode()
    assert "falco_api_inputs_accepted_total 1.0" in scraped
    assert "falco_api_inputs_events_accepted_total 3.0" in scraped
    assert 'falco_api_inputs_rejected_total{reason="unreachable"} 1.0' in scraped
    assert 'falco_api_inputs_rejected_total{reason="malformed"} 0.0' in scraped


def test_sidecar_flags_build_the_servicer() -> None:
    parser = argparse.ArgumentParser()
    add_inputs_arguments(parser)
    servicer = inputs_servicer_from_args(
        parser.parse_args(["--k8saudit-url", "http://falco:9765/k8s-audit", "--inputs-window", "8"])
    )
    assert servicer.forwarder.url == "http://falco:9765/k8s-audit" and servicer.limits.window == 8
    assert inputs_servicer_from_args(parser.parse_args([])).forwarder.url == "http://127.0.0.1:9765/k8s-audit"
    with pytest.raises(ValueError, match="--k8saudit-url must be an http"):
        inputs_servicer_from_args(parser.parse_args(["--k8saudit-url", "falco:9765"]))
    with pytest.raises(ValueError, match="window"):
        inputs_servicer_from_args(parser.parse_args(["--inputs-window", "0"]))
