"""Mutual TLS on both sides of the relay: client certificates towards sidecars, and for its clients."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from falco_api.contract.falco import outputs_pb2
from falco_api.contract.falco.api import streaming_pb2_grpc
from falco_api.testing.falco_double import rule_alert
from falco_api.tls import client_channel_credentials
from tests.certs import Pki
from tests.relay.conftest import Cluster, Reader, subscribers, upstreams_connected, wait_until


async def test_relay_follows_a_tls_sidecar_and_serves_its_own_clients_over_mtls(
    cluster: Cluster, pki: Pki
) -> None:
    node = await cluster.node("node-a", tcp=True, tls=pki.server)
    relay = await cluster.relay(
        [node.address],
        grpc_listen="127.0.0.1:0",
        insecure=False,
        tls=pki.server,
        upstream_tls=pki.client,
        upstream_server_name="localhost",
    )
    address = f"127.0.0.1:{relay.grpc_port}"
    await wait_until(upstreams_connected(relay, 1), "the TLS upstream")
    credentials = client_channel_credentials(pki.client)
    async with grpc.aio.secure_channel(address, credentials) as channel:
        reader = Reader(streaming_pb2_grpc.streamingStub(channel).outputs(outputs_pb2.request(follow=True)))
        await wait_until(subscribers(relay, 1), "the relay subscriber")
        await node.post(rule_alert("node-a", index=0))
        assert [r.origin for r in await reader.wait_alerts(1)] == [node.origin]
        await reader.close()

        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = {s.name async for r in reflection for s in r.list_services_response.service}
        assert {"falco.api.streaming", "falco.outputs.service", "falco.version.service"} <= services

    # A client the relay's CA did not sign is refused.
    stranger = client_channel_credentials(pki.stranger_client)
    async with grpc.aio.secure_channel(
        address, stranger, options=[("grpc.ssl_target_name_override", "localhost")]
    ) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            raise AssertionError("a stranger's certificate was accepted")
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_sidecar_that_refuses_the_relays_certificate_is_retried_not_fatal(
    cluster: Cluster, pki: Pki
) -> None:
    node = await cluster.node("node-a", tcp=True, tls=pki.server)
    relay = await cluster.relay([node.address], upstream_tls=pki.stranger_client, insecure=False)
    await wait_until(lambda: relay.upstreams.statuses()[node.address].reconnects >= 2, "retries")
    status = relay.upstreams.statuses()[node.address]
    assert not status.connected and status.last_error
