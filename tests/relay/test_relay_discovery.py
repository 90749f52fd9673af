"""The relay follows sidecars as Falco pods come and go, through kopf against the Kubernetes API emulator."""

from __future__ import annotations

import grpc
import kopf

from falco_api.contract.falco import outputs_pb2
from falco_api.contract.falco.api import streaming_pb2_grpc
from falco_api.testing.falco_double import rule_alert
from tests.operator.conftest import NAMESPACE, Kube, api, kube  # noqa: F401  (fixtures)
from tests.operator.k8s_emulator import FalcoApiServerEmulator
from tests.relay.conftest import Cluster, Reader, relay_target, subscribers, upstreams_connected, wait_until


async def test_sidecars_are_followed_as_their_pods_come_and_go(
    api: FalcoApiServerEmulator,  # noqa: F811
    kube: Kube,  # noqa: F811
    cluster: Cluster,  # after the API: the relay's pod watch stops before the API server does
) -> None:
    node_a = await cluster.node("node-a", tcp=True)
    node_b = await cluster.node("node-b", tcp=True)
    relay = await cluster.relay(
        [],
        kubernetes=True,
        namespace=NAMESPACE,
        kube_connection=kopf.ConnectionInfo(server=api.base_url, insecure=True),
    )
    port_a = int(node_a.address.rpartition(":")[2])
    port_b = int(node_b.address.rpartition(":")[2])
    async with grpc.aio.insecure_channel(relay_target(relay)) as channel:
        reader = Reader(streaming_pb2_grpc.streamingStub(channel).outputs(outputs_pb2.request(follow=True)))
        await wait_until(subscribers(relay, 1), "the relay subscriber")

        await kube.add_falco_pod("node-a", port_a)
        await kube.add_falco_pod("node-b", port_b, ready=False)  # not Ready: not followed yet
        await wait_until(upstreams_connected(relay, 1), "node-a's sidecar", seconds=15)
        assert set(relay.upstreams.statuses()) == {"node-a"}
        await node_a.post(rule_alert("node-a", index=0))
        await reader.wait_alerts(1)

        await kube.set_pod("falco-node-b", "node-b", port_b, ready=True)
        await wait_until(upstreams_connected(relay, 2), "node-b's sidecar")
        await node_b.post(rule_alert("node-b", index=1))
        await reader.wait_alerts(2)

        await kube.delete(f"/api/v1/namespaces/{NAMESPACE}/pods/falco-node-a")
        await wait_until(lambda: set(relay.upstreams.statuses()) == {"node-b"}, "node-a to be dropped")
        await node_a.post(rule_alert("node-a", index=2))  # no longer followed
        await node_b.post(rule_alert("node-b", index=3))
        await reader.wait_alerts(3)
        await reader.settle()
        assert [(r.hostname, r.seq) for r in reader.alerts] == [("node-a", 1), ("node-b", 1), ("node-b", 2)]
        await reader.close()
