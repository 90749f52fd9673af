"""Edge cases of the operator against the API emulator and real sidecars (the review of issue 4)."""

from __future__ import annotations

import asyncio

from .conftest import Kube, OperatorStarter, SidecarFactory, eventually
from .test_operator_flow import RULE, ready_status


def other_rule(tag: str) -> str:
    return RULE.replace("Shell in", f"{tag} shell in")


async def test_operator_start_never_pushes_a_partial_state(
    kube: Kube, sidecar_factory: SidecarFactory, start_operator: OperatorStarter
) -> None:
    # Rules and pods exist before the operator starts (an operator restart). Its watches list
    # them in any order: a push before every rule, config and node label is known would take
    # rules away from Falco on every node until the next push.
    sidecars = [await sidecar_factory(f"node-{i}") for i in range(3)]
    names = [f"rule-{i:02}" for i in range(8)]
    for sidecar in sidecars:
        await kube.add_node(sidecar.node, {"falco": "on"})
        await kube.add_falco_pod(sidecar.node, sidecar.port)
    for index, name in enumerate(names):
        await kube.apply_rule(
            name, other_rule(name), order=10 + index, nodeSelector={"matchLabels": {"falco": "on"}}
        )
    await start_operator()
    await eventually(lambda: all(s.in_force(*names) for s in sidecars))

    async def all_loaded() -> bool:
        return all([(await ready_status(kube, n)).get("loadedSummary") == "3/3" for n in names])

    await eventually(all_loaded)
    for sidecar in sidecars:
        assert sidecar.applies and all(applied == names for applied in sidecar.applies), sidecar.applies


MACRO_RULES = """
- macro: spawned_shell
  condition: evt.type = execve and proc.name = bash
"""
USES_MACRO = """
- rule: Shell via macro
  desc: a shell was spawned
  condition: spawned_shell
  output: shell (user=%user.name)
  priority: WARNING
"""


async def test_rule_using_a_macro_of_a_later_listed_rule_stays_loaded_across_a_restart(
    kube: Kube, sidecar_factory: SidecarFactory, start_operator: OperatorStarter
) -> None:
    # "z-uses" needs the macro of "a-defines" and is listed first after a restart. Validated
    # against only what the handlers had seen so far, it was refused and taken off every node
    # until its next change.
    sidecar = await sidecar_factory("node-a")
    await kube.add_node("node-a")
    await kube.add_falco_pod("node-a", sidecar.port)
    first = await start_operator()
    await kube.apply_rule("z-uses", USES_MACRO, order=60)
    await kube.apply_rule("a-defines", MACRO_RULES, order=10)
    await kube.patch("/apis/falcoapi.io/v1alpha1/falcorules/z-uses", {"metadata": {"labels": {"x": "y"}}})
    await eventually(lambda: sidecar.in_force("a-defines", "z-uses"))
    await first.stop()
    pushed_before = len(sidecar.applies)
    # Both objects carry kopf's finalizer and annotations already: each gets one event, from the list.
    await start_operator()
    await kube.apply_rule("later", other_rule("later"), order=90)
    await eventually(lambda: sidecar.in_force("a-defines", "z-uses", "later"))
    assert all("z-uses" in applied for applied in sidecar.applies[pushed_before:]), sidecar.applies


def big_rules(size: int) -> str:
    items = ", ".join(f"/usr/local/lib/falco-api/binary-{i:06}" for i in range(size // 36))
    return f"- list: allowed_binaries\n  items: [{items}]\n" + RULE


async def test_a_rules_string_over_the_annotation_limit_is_handled_and_loaded(
    kube: Kube, sidecar_factory: SidecarFactory, start_operator: OperatorStarter
) -> None:
    # kopf keeps a copy of the spec in an annotation for change detection; the API server refuses
    # more than 256 KiB of annotations, so that copy must leave out the unbounded fields.
    sidecar = await sidecar_factory("node-a")
    await kube.add_node("node-a")
    await kube.add_falco_pod("node-a", sidecar.port)
    await start_operator()
    rules = big_rules(270 * 1024)
    assert len(rules) > 256 * 1024
    await kube.apply_rule("big", rules)
    await eventually(lambda: sidecar.in_force("big"))

    async def handled() -> bool:
        annotations = (await kube.rule("big"))["metadata"].get("annotations") or {}
        return "falcoapi.io/last-handled-configuration" in annotations

    await eventually(handled)
    obj = await kube.rule("big")
    assert "allowed_binaries" not in obj["metadata"]["annotations"]["falcoapi.io/last-handled-configuration"]
    assert "falcoapi.io/finalizer" in obj["metadata"]["finalizers"]


async def test_a_rule_and_a_config_applied_together_cost_one_apply_per_node(
    kube: Kube, sidecar_factory: SidecarFactory, start_operator: OperatorStarter
) -> None:
    # `kubectl apply -f dir/` creates them milliseconds apart; each apply is a Falco reload.
    sidecars = [await sidecar_factory(f"node-{i}") for i in range(2)]
    for sidecar in sidecars:
        await kube.add_node(sidecar.node)
        await kube.add_falco_pod(sidecar.node, sidecar.port)
    await start_operator()
    await kube.apply_rule("r1", RULE)
    await asyncio.sleep(0.05)  # kubectl's round trip between the two objects
    await kube.create(
        "/apis/falcoapi.io/v1alpha1/falcoconfigs",
        {
            "apiVersion": "falcoapi.io/v1alpha1",
            "kind": "FalcoConfig",
            "metadata": {"name": "c1"},
            "spec": {"config": {"json_include_tags_property": True}, "order": 50},
        },
    )
    await eventually(lambda: all(s.in_force("r1") and s.store.list_configs() for s in sidecars))
    for sidecar in sidecars:
        assert sidecar.applies == [["r1"]], sidecar.applies
