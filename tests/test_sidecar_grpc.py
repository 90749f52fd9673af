"""The sidecar over real gRPC (unix socket), fed over real HTTP the way Falco's http_output feeds it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from falco_api.alerts import parse_alert
from falco_api.contract.falco import outputs_pb2, outputs_pb2_grpc, schema_pb2, version_pb2, version_pb2_grpc
from falco_api.contract.falco.api import drops_pb2, streaming_pb2_grpc, unary_pb2_grpc
from falco_api.testing.falco_double import FalcoDouble, rule_alert, syscall_drop_alert
from tests.conftest import RunningSidecar


async def collect(call: Any, count: int, seconds: float = 10) -> list[outputs_pb2.response]:
    got: list[outputs_pb2.response] = []

    async def read() -> None:
        async for response in call:
            got.append(response)
            if len(got) == count:
                return

    await asyncio.wait_for(read(), seconds)
    return got


async def wait_subscribers(sidecar: RunningSidecar, count: int) -> None:
    for _ in range(200):
        if len(sidecar.sidecar.streams.alerts.subscriptions) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {count} subscribers")


async def test_three_subscribers_each_get_exactly_their_alerts(sidecar: RunningSidecar) -> None:
    alerts = [rule_alert(f"node-{i % 2}", index=i) for i in range(30)]
    alerts += [syscall_drop_alert("node-0", n_drops=i + 1) for i in range(3)]
    requests = {
        "warning+": outputs_pb2.request(follow=True, min_priority=schema_pb2.WARNING),
        "shells-on-node-1": outputs_pb2.request(follow=True, rules=["Terminal shell*"], hostnames=["node-1"]),
        "internal": outputs_pb2.request(follow=True, sources=["internal"]),
    }
    parsed = [parse_alert(json.dumps(a)) for a in alerts]
    from falco_api.filters import AlertFilter

    expected = {
        name: [(a.rule, a.hostname, a.output) for a in parsed if AlertFilter.from_request(request).matches(a)]
        for name, request in requests.items()
    }
    assert all(expected.values())
    async with grpc.aio.insecure_channel(sidecar.grpc_target) as channel:
        stub = streaming_pb2_grpc.streamingStub(channel)
        calls = {name: stub.outputs(request) for name, request in requests.items()}
        await wait_subscribers(sidecar, 3)
        for alert in alerts:
            assert await sidecar.post(alert) == 204
        for name, call in calls.items():
            got = await collect(call, len(expected[name]))
            assert [(r.rule, r.hostname, r.output) for r in got] == expected[name]
            # Nothing beyond the expected ones: a snapshot of the same filter has exactly these.
            snapshot = [
                r
                async for r in stub.outputs(
                    outputs_pb2.request(
                        min_priority=requests[name].min_priority
                        if requests[name].HasField("min_priority")
                        else None,
                        rules=requests[name].rules,
                        hostnames=requests[name].hostnames,
                        sources=requests[name].sources,
                    )
                )
            ]
            assert [(r.rule, r.hostname, r.output) for r in snapshot] == expected[name]
            assert all(r.origin == sidecar.sidecar.origin for r in got)
            assert [r.seq for r in got] == sorted(r.seq for r in got)
            call.cancel()


async def test_stalled_subscriber_loses_only_its_own_alerts_and_is_told_exactly(
    sidecar: RunningSidecar,
) -> None:
    total = 3000
    streams = sidecar.sidecar.streams
    # No BDP probing: the stalled client's transport window stays at 64 KiB instead of growing
    # to megabytes, so the stall reaches the sidecar's queue within a few thousand alerts.
    async with grpc.aio.insecure_channel(
        sidecar.grpc_target, options=[("grpc.http2.bdp_probe", 0)]
    ) as channel:
        stub = streaming_pb2_grpc.streamingStub(channel)
        stalled = stub.outputs(outputs_pb2.request(follow=True))
        readers = [stub.outputs(outputs_pb2.request(follow=True)) for _ in range(2)]
        await wait_subscribers(sidecar, 3)
        tasks = [asyncio.create_task(collect(call, total, seconds=60)) for call in readers]
        raw = rule_alert("node-a", index=1)
        for index in range(total):
            streams.ingest(parse_alert(json.dumps(raw | {"output": f"alert {index}"})))
            if index % 50 == 49:
                # Pace like a reader that keeps up: wait for the two healthy queues to drain.
                # The stalled queue never drains, and nothing waits for it.
                for _ in range(2000):
                    if sorted(streams.alerts.queue_depths())[:2] == [0, 0]:
                        break
                    await asyncio.sleep(0.001)
            assert max(streams.alerts.queue_depths()) <= streams.alerts.queue_size  # memory stays bounded
        # The healthy subscribers receive every alert, in order, none missed.
        for task in tasks:
            got = await task
            assert [r.output for r in got] == [f"alert {i}" for i in range(total)]
            assert not any(r.missed_before or r.HasField("gap") for r in got)
        assert any(s.total_missed for s in streams.alerts.subscriptions)
        # The stalled one reads now: alerts received + alerts reported lost == alerts published.
        received, lost = 0, 0

        async def read_stalled() -> None:
            nonlocal received, lost
            async for response in stalled:
                if response.HasField("gap"):
                    assert response.gap.reason == "subscriber_overflow"
                    lost += response.gap.missed
                else:
                    received += 1
                if received + lost == total:
                    return

        await asyncio.wait_for(read_stalled(), 30)
        assert lost > 0 and received + lost == total
    # The loss is also on the drops stream, with the same count.
    reports = [e.item for e in streams.drops._ring if e.item.kind == drops_pb2.DROP_KIND_SUBSCRIBER_OVERFLOW]
    assert sum(r.subscriber_overflow.missed for r in reports) == lost
    assert all(r.subscriber_overflow.method == "falco.api.streaming/outputs" for r in reports)


async def test_snapshot_and_resume(sidecar: RunningSidecar) -> None:
    for index in range(5):
        assert await sidecar.post(rule_alert("node-a", index=index)) == 204
    async with grpc.aio.insecure_channel(sidecar.grpc_target) as channel:
        stub = streaming_pb2_grpc.streamingStub(channel)
        snapshot = [r async for r in stub.outputs(outputs_pb2.request())]
        assert [r.seq for r in snapshot] == [1, 2, 3, 4, 5]
        origin = snapshot[0].origin
        resumed_call = stub.outputs(outputs_pb2.request(follow=True, resume_after={origin: 3}))
        first_two = await collect(resumed_call, 2)
        assert [r.seq for r in first_two] == [4, 5]
        assert await sidecar.post(rule_alert("node-a", index=9)) == 204
        live = await collect(resumed_call, 1)
        assert live[0].seq == 6
        resumed_call.cancel()


async def test_legacy_get_and_sub(sidecar: RunningSidecar) -> None:
    for index in range(3):
        await sidecar.post(rule_alert("node-a", index=index))
    async with grpc.aio.insecure_channel(sidecar.grpc_target) as channel:
        stub = outputs_pb2_grpc.serviceStub(channel)
        got = [r async for r in stub.get(outputs_pb2.request())]
        assert [r.rule for r in got] == [rule_alert("x", index=i)["rule"] for i in range(3)]

        requests: asyncio.Queue[outputs_pb2.request | None] = asyncio.Queue()

        async def request_stream() -> Any:
            while (request := await requests.get()) is not None:
                yield request

        await requests.put(outputs_pb2.request())
        sub = stub.sub(request_stream())
        await wait_subscribers(sidecar, 1)
        await sidecar.post(rule_alert("node-a", index=0))
        first = await collect(sub, 1)
        assert first[0].rule == "Terminal shell in container"
        # A new request replaces the filters on the same stream.
        await requests.put(outputs_pb2.request(min_priority=schema_pb2.CRITICAL))
        await asyncio.sleep(0.1)
        await sidecar.post(rule_alert("node-a", index=0))  # Notice: filtered out now
        await sidecar.post(rule_alert("node-a", index=2))  # Critical
        second = await collect(sub, 1)
        assert second[0].priority == schema_pb2.CRITICAL
        # Half-close ends the stream, as in Falco.
        await requests.put(None)
        rest = [r async for r in sub]
        assert rest == []


async def test_version_from_falco_and_unavailable_when_falco_is_down(
    sidecar: RunningSidecar, falco_double: FalcoDouble
) -> None:
    async with grpc.aio.insecure_channel(sidecar.grpc_target) as channel:
        legacy = await version_pb2_grpc.serviceStub(channel).version(version_pb2.request())
        new = await unary_pb2_grpc.unaryStub(channel).version(version_pb2.request())
        assert legacy == new
        assert (legacy.version, legacy.major, legacy.minor, legacy.patch) == ("0.43.0", 0, 43, 0)
        assert (legacy.engine_major, legacy.engine_minor, legacy.engine_patch) == (0, 52, 0)
        assert legacy.engine_version == "0.52.0" and legacy.libs_version == "0.22.1"
        assert legacy.api_version and legacy.hostname == "node-a"
        await falco_double.stop()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await version_pb2_grpc.serviceStub(channel).version(version_pb2.request())
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "cannot reach Falco's webserver" in (caught.value.details() or "")


async def test_drops_stream(sidecar: RunningSidecar) -> None:
    await sidecar.post(syscall_drop_alert("node-a", n_drops=4))
    await sidecar.post(rule_alert("node-a", index=0))
    async with grpc.aio.insecure_channel(sidecar.grpc_target) as channel:
        stub = streaming_pb2_grpc.streamingStub(channel)
        reports = [r async for r in stub.drops(drops_pb2.DropsRequest())]
        assert [r.kind for r in reports] == [drops_pb2.DROP_KIND_SYSCALL_EVENT]
        assert reports[0].syscall_event.n_drops == 4 and reports[0].hostname == "node-a"
        follow = stub.drops(drops_pb2.DropsRequest(follow=True, kinds=[drops_pb2.DROP_KIND_INGEST_REJECTED]))
        await asyncio.sleep(0.05)
        assert await sidecar.post(None, raw=b"{broken") == 400
        sidecar.sidecar.streams.flush_rejections()
        got = await collect(follow, 1)
        assert dict(got[0].ingest_rejected.by_reason) == {"bad_json": 1}  # type: ignore[attr-defined]
        follow.cancel()


async def test_health_reflection_and_unimplemented(sidecar: RunningSidecar) -> None:
    async with grpc.aio.insecure_channel(sidecar.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "falco.outputs.service", "falco.api.streaming"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask() -> Any:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names = set()
        async for answer in reflection.ServerReflectionInfo(ask()):
            names = {s.name for s in answer.list_services_response.service}
        assert {
            "falco.outputs.service",
            "falco.version.service",
            "falco.api.streaming",
            "falco.api.unary",
        } <= names


async def test_bad_filter_is_invalid_argument(sidecar: RunningSidecar) -> None:
    async with grpc.aio.insecure_channel(sidecar.grpc_target) as channel:
        stub = streaming_pb2_grpc.streamingStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [r async for r in stub.outputs(outputs_pb2.request(rules=[""]))]
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "rule pattern" in (caught.value.details() or "")


async def test_batched_stream_carries_the_same_alerts_and_losses(sidecar: RunningSidecar) -> None:
    from falco_api.contract.falco.api import batch_pb2

    streams = sidecar.sidecar.streams
    for index in range(5):
        streams.ingest(parse_alert(json.dumps(rule_alert("node-a", index=index))))
    async with grpc.aio.insecure_channel(sidecar.grpc_target) as channel:
        stub = streaming_pb2_grpc.streamingStub(channel)
        snapshot = [batch async for batch in stub.outputs_batched(outputs_pb2.request())]
        assert isinstance(snapshot[0], batch_pb2.OutputsBatch)
        assert [r.seq for b in snapshot for r in b.responses] == [1, 2, 3, 4, 5]
        assert len(snapshot) < 5  # what was ready went out together

        # A subscriber that cannot keep up gets every alert or a loss notice, batched.
        follow = stub.outputs_batched(outputs_pb2.request(follow=True))
        await wait_subscribers(sidecar, 1)
        total = streams.alerts.queue_size * 3
        for index in range(total):
            streams.ingest(parse_alert(json.dumps(rule_alert("node-a", index=index))))
        received, lost = 0, 0
        async for batch in follow:
            for response in batch.responses:
                if response.HasField("gap"):
                    lost += response.gap.missed
                else:
                    received += 1
            if received + lost == total:
                break
        assert lost > 0 and received + lost == total
        follow.cancel()
