"""The operator scenarios against a real cluster (see tests/e2e/conftest.py for what must be installed)."""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

import pytest

# tests/e2e is not a package; the fixture hands over the connection and where Falco runs.
Cluster = Any
NAMESPACE = os.environ.get("FALCO_API_NAMESPACE", "falco")
SELECTOR = os.environ.get("FALCO_API_SELECTOR", "app.kubernetes.io/name=falco")

pytestmark = pytest.mark.e2e

RULES = "/apis/falcoapi.io/v1alpha1/falcorules"
RULE = """
- rule: falco-api e2e rule {tag}
  desc: e2e test rule, safe to delete
  condition: evt.type = execve and proc.name = falco-api-e2e-{tag}
  output: e2e (user=%user.name)
  priority: DEBUG
"""


def rule_object(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "falcoapi.io/v1alpha1",
        "kind": "FalcoRule",
        "metadata": {"name": name},
        "spec": {"rules": RULE.format(tag=name), "order": 90, "enabled": True, **spec},
    }


async def wait_for(cluster: Cluster, name: str, predicate: Any, within: float = 120) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + within
    last: Any = None
    while asyncio.get_running_loop().time() < deadline:
        status, last = await cluster.request("GET", f"{RULES}/{name}")
        if status == 200 and predicate(last):
            return dict(last)
        await asyncio.sleep(1)
    raise AssertionError(f"{name} did not reach the expected state in {within}s; last seen: {last}")


def ready(obj: dict[str, Any]) -> str:
    for cond in obj.get("status", {}).get("conditions", []):
        if cond["type"] == "Ready":
            return str(cond["status"])
    return ""


@pytest.fixture
async def rule_name(cluster: Cluster) -> Any:
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    yield name
    await cluster.request("DELETE", f"{RULES}/{name}")


async def falco_pods(cluster: Cluster) -> list[dict[str, Any]]:
    data = await cluster.ok("GET", f"/api/v1/namespaces/{NAMESPACE}/pods?labelSelector={SELECTOR}")
    return list(data["items"])


async def test_apply_becomes_ready_on_every_falco_node(cluster: Cluster, rule_name: str) -> None:
    pods = await falco_pods(cluster)
    if not pods:
        pytest.skip(f"no Falco pods match {SELECTOR} in {NAMESPACE}")
    await cluster.ok("POST", RULES, rule_object(rule_name))
    obj = await wait_for(cluster, rule_name, lambda o: ready(o) == "True")
    assert obj["status"]["loaded"] == obj["status"]["targeted"] == len({p["spec"]["nodeName"] for p in pods})


async def test_broken_rule_is_refused_at_admission(cluster: Cluster, rule_name: str) -> None:
    broken = rule_object(rule_name)
    broken["spec"]["rules"] = "- rule: broken\n  desc: no condition\n  output: o\n  priority: WARNING\n"
    status, answer = await cluster.request("POST", RULES, broken)
    assert status in (400, 422), answer
    assert "condition" in answer["message"]


async def test_node_selector_matching_no_node_targets_none(cluster: Cluster, rule_name: str) -> None:
    selector = {"matchLabels": {"falcoapi.io/e2e-no-such-label": "x"}}
    await cluster.ok("POST", RULES, rule_object(rule_name, nodeSelector=selector))
    obj = await wait_for(cluster, rule_name, lambda o: o.get("status", {}).get("observedGeneration") == 1)
    assert obj["status"]["targeted"] == 0


async def test_restarted_falco_pod_gets_the_rule_again(cluster: Cluster, rule_name: str) -> None:
    pods = await falco_pods(cluster)
    if not pods:
        pytest.skip(f"no Falco pods match {SELECTOR} in {NAMESPACE}")
    await cluster.ok("POST", RULES, rule_object(rule_name))
    await wait_for(cluster, rule_name, lambda o: ready(o) == "True")
    victim = pods[0]["metadata"]["name"]
    await cluster.ok("DELETE", f"/api/v1/namespaces/{NAMESPACE}/pods/{victim}")
    # The DaemonSet replaces the pod; the new sidecar must be given the full state again.
    await wait_for(cluster, rule_name, lambda o: ready(o) == "False" or o["status"].get("pending"), within=60)
    await wait_for(cluster, rule_name, lambda o: ready(o) == "True", within=300)


async def test_deleted_rule_is_released_by_the_finalizer(cluster: Cluster, rule_name: str) -> None:
    await cluster.ok("POST", RULES, rule_object(rule_name))
    obj = await wait_for(
        cluster, rule_name, lambda o: "falcoapi.io/finalizer" in o["metadata"].get("finalizers", [])
    )
    assert obj
    await cluster.ok("DELETE", f"{RULES}/{rule_name}")
    deadline = asyncio.get_running_loop().time() + 120
    while asyncio.get_running_loop().time() < deadline:
        status, _ = await cluster.request("GET", f"{RULES}/{rule_name}")
        if status == 404:
            return
        await asyncio.sleep(1)
    raise AssertionError(f"{rule_name} still exists 120 s after deletion")


async def test_one_change_writes_status_a_bounded_number_of_times(cluster: Cluster, rule_name: str) -> None:
    """Status writes per change must not grow with the number of nodes (whatever this cluster has)."""
    pods = await falco_pods(cluster)
    if not pods:
        pytest.skip(f"no Falco pods match {SELECTOR} in {NAMESPACE}")
    await cluster.ok("POST", RULES, rule_object(rule_name))
    obj = await wait_for(cluster, rule_name, lambda o: ready(o) == "True")
    changed = RULE.format(tag=rule_name).replace("priority: DEBUG", "priority: INFORMATIONAL")
    patched = await cluster.ok(
        "PATCH", f"{RULES}/{rule_name}", {"spec": {"rules": changed}}, "application/merge-patch+json"
    )
    events = await cluster.watch(
        f"{RULES}?fieldSelector=metadata.name%3D{rule_name}", patched["metadata"]["resourceVersion"], 60
    )
    status_writes, previous = [], obj.get("status")
    for event in events:
        current = event["object"].get("status")
        if event["type"] == "MODIFIED" and current != previous:
            status_writes.append(event)
        previous = current
    final = await wait_for(
        cluster, rule_name, lambda o: ready(o) == "True" and o["status"]["observedGeneration"] == 2
    )
    assert final["status"]["loaded"] == len({p["spec"]["nodeName"] for p in pods})
    # Pending -> loaded, with transition times: a handful of writes, never one per node.
    assert len(status_writes) <= 4, [e["object"]["status"] for e in status_writes]
