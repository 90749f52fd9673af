"""The relay over real gRPC, in front of real in-process sidecars fed over HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from falco_api.contract.falco import outputs_pb2, outputs_pb2_grpc, schema_pb2, version_pb2, version_pb2_grpc
from falco_api.contract.falco.api import drops_pb2, rules_pb2, streaming_pb2_grpc, unary_pb2_grpc
from falco_api.testing.falco_double import FALCO_VERSION, rule_alert, syscall_drop_alert
from falco_api_relay.merge import REPLAY_ALL_ORIGIN
from tests.relay.conftest import (
    Cluster,
    Reader,
    TcpProxy,
    relay_target,
    subscribers,
    upstreams_connected,
    wait_until,
)

RAW_OUTPUTS = "/falco.api.streaming/outputs"


async def held_open(request: outputs_pb2.request) -> AsyncIterator[outputs_pb2.request]:
    """A legacy ``sub`` request stream: one request, then open until the call is cancelled."""
    yield request
    await asyncio.Event().wait()


def positions(responses: list[outputs_pb2.response]) -> list[tuple[str, int]]:
    return [(r.origin, r.seq) for r in responses]


async def test_two_sidecars_merge_into_one_stream_each_alert_exactly_once(cluster: Cluster) -> None:
    node_a, node_b = await cluster.node("node-a"), await cluster.node("node-b")
    # Buffered before the relay exists: a first connection asks for the sidecar's whole buffer.
    for index in range(3):
        await node_a.post(rule_alert("node-a", index=index))
    relay = await cluster.relay([node_a.address, node_b.address])
    await wait_until(upstreams_connected(relay, 2), "both upstreams")
    await wait_until(lambda: relay.streams.alerts.stats.published >= 3, "node-a's buffered alerts")
    async with grpc.aio.insecure_channel(relay_target(relay)) as channel:
        # The buffered alerts reached the relay before this subscriber: it resumes from node-a's start.
        request = outputs_pb2.request(follow=True, resume_after={node_a.origin: 0})
        reader = Reader(streaming_pb2_grpc.streamingStub(channel).outputs(request))
        await wait_until(subscribers(relay, 1), "the relay subscriber")
        for index in range(3, 23):
            await node_a.post(rule_alert("node-a", index=index))
            await node_b.post(rule_alert("node-b", index=index))
        got = await reader.wait_alerts(43)
        await reader.settle()
        assert len(reader.alerts) == 43 and not reader.gaps
        by_origin = {node_a.origin: list(range(1, 24)), node_b.origin: list(range(1, 21))}
        for origin, seqs in by_origin.items():
            assert [r.seq for r in got if r.origin == origin] == seqs  # in order, none twice
        assert {r.hostname for r in got if r.origin == node_b.origin} == {"node-b"}

        # The relay re-publishes each alert as the very bytes the sidecar serialised.
        async with grpc.aio.insecure_channel(node_a.address) as upstream:
            sidecar_bytes = [
                payload
                async for payload in upstream.unary_stream(
                    RAW_OUTPUTS, request_serializer=outputs_pb2.request.SerializeToString
                )(outputs_pb2.request())
            ]
        relayed_bytes = [
            payload
            async for payload in channel.unary_stream(
                RAW_OUTPUTS, request_serializer=outputs_pb2.request.SerializeToString
            )(outputs_pb2.request(hostnames=["node-a"]))
        ]
        assert relayed_bytes == sidecar_bytes
        await reader.close()


async def test_filters_apply_at_the_relay(cluster: Cluster) -> None:
    node_a, node_b = await cluster.node("node-a"), await cluster.node("node-b")
    relay = await cluster.relay([node_a.address, node_b.address])
    request = outputs_pb2.request(
        follow=True,
        min_priority=schema_pb2.WARNING,
        hostnames=["node-b"],
        exclude_rules=["Drop and execute*"],
        exclude_internal=True,
    )
    async with grpc.aio.insecure_channel(relay_target(relay)) as channel:
        stub = streaming_pb2_grpc.streamingStub(channel)
        filtered = Reader(stub.outputs(request))
        internal = Reader(stub.outputs(outputs_pb2.request(follow=True, sources=["internal"])))
        await wait_until(subscribers(relay, 2), "two relay subscribers")
        await wait_until(upstreams_connected(relay, 2), "both upstreams")
        for index in range(12):  # the double's rules cycle Notice, Warning, Critical
            await node_a.post(rule_alert("node-a", index=index))
            await node_b.post(rule_alert("node-b", index=index))
        await node_b.post(syscall_drop_alert("node-b", n_drops=7))
        got = await filtered.wait_alerts(4)
        drops = await internal.wait_alerts(1)
        await filtered.settle()
        wanted = {("node-b", "Read sensitive file untrusted")}
        assert {(r.hostname, r.rule) for r in filtered.alerts} == wanted
        assert len(filtered.alerts) == 4 == len(got)
        assert (
            [r.rule for r in internal.alerts]
            == ["Falco internal: syscall event drop"]
            == [r.rule for r in drops]
        )
        # A bad filter is refused at the relay too.
        try:
            async for _ in stub.outputs(outputs_pb2.request(rules=[""])):
                pass
            raise AssertionError("an empty rule pattern was accepted")
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        await filtered.close()
        await internal.close()


async def test_a_restarted_sidecar_is_followed_again_without_duplicates(cluster: Cluster) -> None:
    node = await cluster.node("node-a")
    relay = await cluster.relay([node.address])
    async with grpc.aio.insecure_channel(relay_target(relay)) as channel:
        reader = Reader(streaming_pb2_grpc.streamingStub(channel).outputs(outputs_pb2.request(follow=True)))
        await wait_until(subscribers(relay, 1), "the relay subscriber")
        await wait_until(upstreams_connected(relay, 1), "the upstream")
        for index in range(5):
            await node.post(rule_alert("node-a", index=index))
        await reader.wait_alerts(5)
        old_origin = node.origin
        await node.stop()
        await node.start()  # same address, a new process: a new origin, seq from 1 again
        assert node.origin != old_origin
        for index in range(5, 9):
            await node.post(rule_alert("node-a", index=index))
        got = await reader.wait_alerts(9)
        await reader.settle()
        assert positions(reader.alerts) == [(old_origin, s) for s in range(1, 6)] + [
            (node.origin, s) for s in range(1, 5)
        ]
        # Whatever the old process had not sent is unknowable: said so, never hidden.
        assert [(g.reason, g.origin) for g in reader.gaps] == [("unknown_origin", old_origin)]
        assert "id #5 " in got[5].output
        assert relay.upstreams.statuses()[node.address].reconnects >= 1
        await reader.close()


async def test_a_brief_disconnection_resumes_from_the_last_seq(
    cluster: Cluster, proxy_factory: Callable[[str], Awaitable[TcpProxy]]
) -> None:
    node = await cluster.node("node-a", tcp=True)
    proxy = await proxy_factory(node.address)
    relay = await cluster.relay([proxy.address])
    async with grpc.aio.insecure_channel(relay_target(relay)) as channel:
        stub = streaming_pb2_grpc.streamingStub(channel)
        reader = Reader(stub.outputs(outputs_pb2.request(follow=True)))
        drops = Reader(stub.drops(drops_pb2.DropsRequest(follow=True)))
        await wait_until(subscribers(relay, 1), "the relay subscriber")
        await wait_until(upstreams_connected(relay, 1), "the upstream")
        for index in range(3):
            await node.post(rule_alert("node-a", index=index))
        await node.post(syscall_drop_alert("node-a", n_drops=3))
        await reader.wait_alerts(4)
        await wait_until(lambda: len(drops.got) == 1, "the drop report")

        proxy.cut()
        await wait_until(lambda: not upstreams_connected(relay, 1)(), "the upstream to notice the cut")
        for index in range(3, 8):  # alerts keep coming while the relay is cut off
            await node.post(rule_alert("node-a", index=index))
        proxy.restore()
        await reader.wait_alerts(9)
        await wait_until(lambda: relay.upstreams.statuses()[proxy.address].reconnects >= 1, "a reconnect")
        await reader.settle()
        assert positions(reader.alerts) == [(node.origin, seq) for seq in range(1, 10)]
        assert not reader.gaps and not any(r.missed_before for r in reader.alerts)
        # The sidecar replays its whole drops ring on reconnect: the relay passes each report once.
        assert [d.kind for d in drops.got] == [drops_pb2.DROP_KIND_SYSCALL_EVENT]
        assert relay.streams.stats.duplicate_drops == 1
        await reader.close()
        await drops.close()


async def test_a_gap_upstream_reaches_relay_subscribers(
    cluster: Cluster, proxy_factory: Callable[[str], Awaitable[TcpProxy]]
) -> None:
    node = await cluster.node("node-a", tcp=True, replay_size=3)
    proxy = await proxy_factory(node.address)
    relay = await cluster.relay([proxy.address])
    async with grpc.aio.insecure_channel(relay_target(relay)) as channel:
        streaming = Reader(
            streaming_pb2_grpc.streamingStub(channel).outputs(outputs_pb2.request(follow=True))
        )
        legacy_stub = outputs_pb2_grpc.serviceStub(channel)
        legacy = Reader(legacy_stub.sub(held_open(outputs_pb2.request())))
        await wait_until(subscribers(relay, 2), "two relay subscribers")
        await wait_until(upstreams_connected(relay, 1), "the upstream")
        for index in range(3):
            await node.post(rule_alert("node-a", index=index))
        await streaming.wait_alerts(3)
        await legacy.wait_alerts(3)

        proxy.cut()
        await wait_until(lambda: not upstreams_connected(relay, 1)(), "the upstream to notice the cut")
        for index in range(3, 11):  # seq 4..11: the sidecar keeps only 9..11
            await node.post(rule_alert("node-a", index=index))
        proxy.restore()
        await streaming.wait_alerts(6)
        await legacy.wait_alerts(6)
        assert [(g.missed, g.reason, g.origin, g.first_seq, g.last_seq) for g in streaming.gaps] == [
            (5, "evicted_before_resume", node.origin, 4, 8)
        ]
        assert [r.seq for r in streaming.alerts] == [1, 2, 3, 9, 10, 11]
        # Legacy clients get no loss notices: the count rides on the next alert.
        assert [(r.seq, r.missed_before) for r in legacy.alerts][3:] == [(9, 5), (10, 0), (11, 0)]
        await streaming.close()
        await legacy.close()


async def test_legacy_get_and_sub_against_the_relay(cluster: Cluster) -> None:
    node_a, node_b = await cluster.node("node-a"), await cluster.node("node-b")
    await node_a.post(rule_alert("node-a", index=0))
    await node_b.post(rule_alert("node-b", index=1))
    relay = await cluster.relay([node_a.address, node_b.address])
    await wait_until(lambda: relay.streams.stats.alerts == 2, "the buffered alerts")
    async with grpc.aio.insecure_channel(relay_target(relay)) as channel:
        stub = outputs_pb2_grpc.serviceStub(channel)
        buffered = [r async for r in stub.get(outputs_pb2.request())]
        assert sorted(r.hostname for r in buffered) == ["node-a", "node-b"]
        only_b = [r async for r in stub.get(outputs_pb2.request(hostnames=["node-b"]))]
        assert [r.hostname for r in only_b] == ["node-b"]

        live = Reader(stub.sub(held_open(outputs_pb2.request(min_priority=schema_pb2.WARNING))))
        await wait_until(subscribers(relay, 1), "the legacy subscriber")
        for index in range(2, 8):
            await node_a.post(rule_alert("node-a", index=index))
        got = await live.wait_alerts(4)
        await live.settle()
        assert len(live.alerts) == 4
        assert all(r.priority <= schema_pb2.WARNING for r in got)
        await live.close()


async def test_version_comes_from_a_sidecar_with_the_relays_api_version(cluster: Cluster) -> None:
    from falco_api import __version__

    node = await cluster.node("node-a")
    relay = await cluster.relay([node.address])
    async with grpc.aio.insecure_channel(relay_target(relay)) as channel:
        await wait_until(upstreams_connected(relay, 1), "the upstream")
        legacy = await version_pb2_grpc.serviceStub(channel).version(version_pb2.request())
        unary = await unary_pb2_grpc.unaryStub(channel).version(version_pb2.request())
        assert legacy == unary
        assert legacy.version == FALCO_VERSION and legacy.api_version == __version__
        assert legacy.hostname == "node-a"
        # The relay manages no rules: that half of falco.api.unary is not there.
        try:
            await unary_pb2_grpc.unaryStub(channel).list_rules(rules_pb2.ListRulesRequest())
            raise AssertionError("the relay answered list_rules")
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNIMPLEMENTED

        await node.stop()
        await wait_until(lambda: not upstreams_connected(relay, 1)(), "the upstream to go")
        try:
            await version_pb2_grpc.serviceStub(channel).version(version_pb2.request())
            raise AssertionError("a version without any sidecar")
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "no sidecar" in (error.details() or "")


async def test_first_connection_sentinel_is_not_passed_on(cluster: Cluster) -> None:
    node = await cluster.node("node-a")
    relay = await cluster.relay([node.address])
    async with grpc.aio.insecure_channel(relay_target(relay)) as channel:
        reader = Reader(streaming_pb2_grpc.streamingStub(channel).outputs(outputs_pb2.request(follow=True)))
        await wait_until(subscribers(relay, 1), "the relay subscriber")
        await wait_until(upstreams_connected(relay, 1), "the upstream")
        await node.post(rule_alert("node-a", index=0))
        await reader.wait_alerts(1)
        await reader.settle(0.1)
        assert not reader.gaps
        assert all(g.origin != REPLAY_ALL_ORIGIN for g in reader.gaps)
        await reader.close()


async def test_a_sidecar_without_the_batched_stream_is_followed_alert_by_alert(cluster: Cluster) -> None:
    """A relay upgraded before its sidecars: the older sidecar answers UNIMPLEMENTED for
    outputs_batched, and the relay falls back to the per-alert stream."""
    from falco_api.alerts import parse_alert
    from falco_api.servicers import STREAMING_SERVICE, DropsServicer, OutputsServicer
    from falco_api.streams import EventStreams

    streams = EventStreams(origin="old-node/1", hostname="old-node")
    outputs, drops = OutputsServicer(streams.alerts), DropsServicer(streams.drops)
    old_api = grpc.method_handlers_generic_handler(
        STREAMING_SERVICE,
        {
            "outputs": grpc.unary_stream_rpc_method_handler(
                outputs.outputs,
                request_deserializer=outputs_pb2.request.FromString,
                response_serializer=bytes,
            ),
            "drops": grpc.unary_stream_rpc_method_handler(
                drops.drops, request_deserializer=drops_pb2.DropsRequest.FromString, response_serializer=bytes
            ),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((old_api,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        relay = await cluster.relay([f"127.0.0.1:{port}"])
        await wait_until(upstreams_connected(relay, 1), "the old sidecar")
        async with grpc.aio.insecure_channel(relay_target(relay)) as channel:
            reader = Reader(
                streaming_pb2_grpc.streamingStub(channel).outputs(outputs_pb2.request(follow=True))
            )
            await wait_until(subscribers(relay, 1), "the relay subscriber")
            await asyncio.sleep(0.2)
            for index in range(5):
                streams.ingest(parse_alert(json.dumps(rule_alert("old-node", index=index))))
            got = await reader.wait_alerts(5)
            assert [r.seq for r in got] == [1, 2, 3, 4, 5] and {r.origin for r in got} == {"old-node/1"}
            await reader.close()
    finally:
        streams.close()
        await server.stop(0.5)
