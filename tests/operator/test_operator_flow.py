"""The operator end to end against the API server emulator and test sidecars."""

from __future__ import annotations

from typing import Any

from .conftest import Kube, OperatorStarter, SidecarFactory, eventually

RULE = """
- rule: Shell in test container
  desc: a shell was spawned
  condition: evt.type = execve and proc.name = bash
  output: shell (user=%user.name)
  priority: WARNING
"""


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    for cond in obj.get("status", {}).get("conditions", []):
        if cond["type"] == kind:
            return dict(cond)
    return {}


async def test_apply_becomes_ready_on_every_node(
    kube: Kube, sidecar_factory: SidecarFactory, start_operator: OperatorStarter
) -> None:
    sidecars = [await sidecar_factory(f"node-{i}") for i in range(2)]
    for sidecar in sidecars:
        await kube.add_node(sidecar.node)
        await kube.add_falco_pod(sidecar.node, sidecar.port)
    await start_operator()
    await kube.apply_rule("shell-rule", RULE, order=10)

    async def ready() -> bool:
        obj = await kube.rule("shell-rule")
        return condition(obj, "Ready").get("status") == "True"

    await eventually(ready)
    obj = await kube.rule("shell-rule")
    assert obj["status"]["loadedSummary"] == "2/2"
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    assert condition(obj, "Accepted")["status"] == "True"
    for sidecar in sidecars:
        assert sidecar.servicer.ruleset_names == ["shell-rule"]
        assert sidecar.servicer.loaded.rulesets[0].order == 10
