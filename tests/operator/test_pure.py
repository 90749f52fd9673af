"""Pure parts of the operator: selectors, desired state, hashing, status aggregation, backoff, discovery."""

from __future__ import annotations

import random
from typing import Any

import pytest

from falco_api.discovery import SelectorError, SidecarDirectory, parse_equality_selector, sidecar_from_pod
from falco_api_operator.desired import (
    FalcoConfigSpec,
    FalcoRuleSpec,
    LabelSelector,
    apply_request,
    desired_state,
    state_from_request,
    state_sha256,
)
from falco_api_operator.desired import SelectorError as NodeSelectorError
from falco_api_operator.pusher import PushSettings, push_backoff
from falco_api_operator.status import Acceptance, NodeOutcome, NodeState, aggregate_status, status_differs
from falco_api_operator.validation import validate_rule_in_set

from .conftest import falco_pod


def rule(
    name: str, order: int = 50, selector: dict[str, Any] | None = None, enabled: bool = True
) -> FalcoRuleSpec:
    return FalcoRuleSpec(
        name, f"- list: {name}\n  items: []\n", order, LabelSelector.from_dict(selector), enabled
    )


@pytest.mark.parametrize(
    "selector,labels,expected",
    [
        ({}, {}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]}, {"a": "2"}, True),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1"]}]}, {}, False),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {}, True),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {"a": "1"}, False),
        ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"a": ""}, True),
        ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"a": ""}, False),
    ],
)
def test_label_selector(selector: dict[str, Any], labels: dict[str, str], expected: bool) -> None:
    assert LabelSelector.from_dict(selector).matches(labels) is expected


@pytest.mark.parametrize(
    "bad",
    [
        {"matchExpressions": [{"key": "a", "operator": "Near"}]},
        {"matchExpressions": [{"key": "a", "operator": "In"}]},
        {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]},
        {"matchLabels": ["a"]},
    ],
)
def test_bad_selectors_are_refused_with_a_message(bad: dict[str, Any]) -> None:
    with pytest.raises(NodeSelectorError):
        LabelSelector.from_dict(bad)


def test_desired_state_is_enabled_and_matching_in_order_then_name() -> None:
    rules = [
        rule("b", 10),
        rule("a", 10),
        rule("first", 1),
        rule("off", 0, enabled=False),
        rule("db", 5, {"matchLabels": {"role": "db"}}),
    ]
    state = desired_state(rules, [], {"role": "web"})
    assert [r.name for r in state.rulesets] == ["first", "a", "b"]


def test_state_hash_is_order_independent_in_input_and_sensitive_to_content() -> None:
    one = desired_state([rule("a", 1), rule("b", 2)], [], {})
    two = desired_state([rule("b", 2), rule("a", 1)], [], {})
    assert one.sha256 == two.sha256
    changed = desired_state(
        [rule("a", 1), FalcoRuleSpec("b", "- list: x\n  items: []\n", 2, LabelSelector())], [], {}
    )
    assert changed.sha256 != one.sha256


def test_apply_request_round_trips_rules_and_configs() -> None:
    configs = [FalcoConfigSpec("c", {"json_output": True, "nested": {"k": "v"}}, 3, LabelSelector())]
    state = desired_state([rule("a", 1)], configs, {})
    request = apply_request(state)
    rules_back, configs_back = state_from_request(request)
    assert state_sha256(rules_back, configs_back) == state.sha256
    assert request.configs[0].order == 3


def test_status_counts_and_caps_failing_nodes() -> None:
    outcomes = [NodeOutcome(f"n{i}", NodeState.FAILED, "boom") for i in range(7)]
    outcomes += [NodeOutcome("ok", NodeState.LOADED), NodeOutcome("wait", NodeState.PENDING)]
    status = aggregate_status(3, Acceptance(True), outcomes)
    assert (status["targeted"], status["loaded"], status["failed"], status["pending"]) == (9, 1, 7, 1)
    assert status["loadedSummary"] == "1/9"
    assert status["failingNodes"][:1] == ["n0: boom"]
    assert status["failingNodes"][-1] == "(+2 more)"
    assert len(status["failingNodes"]) == 6
    assert status["conditions"][1]["reason"] == "LoadFailed"
    assert status["observedGeneration"] == 3


def test_status_ready_and_not_accepted() -> None:
    ready = aggregate_status(1, Acceptance(True), [NodeOutcome("a", NodeState.LOADED)])
    assert ready["conditions"][1]["status"] == "True"
    refused = aggregate_status(1, Acceptance(False, "bad"), [])
    assert refused["conditions"][0] == {
        "type": "Accepted",
        "status": "False",
        "reason": "ValidationFailed",
        "message": "bad",
    }
    assert refused["conditions"][1]["reason"] == "NotAccepted"


def test_status_differs_ignores_transition_times_only() -> None:
    status = aggregate_status(1, Acceptance(True), [NodeOutcome("a", NodeState.LOADED)])
    timed = {
        **status,
        "conditions": [{**c, "lastTransitionTime": "2024-01-01T00:00:00Z"} for c in status["conditions"]],
    }
    assert not status_differs(timed, status)
    assert status_differs(timed, aggregate_status(2, Acceptance(True), [NodeOutcome("a", NodeState.LOADED)]))


def test_backoff_grows_is_capped_and_jittered() -> None:
    settings = PushSettings(backoff_initial=1, backoff_max=8)
    rng = random.Random(1)
    delays = [push_backoff(n, settings, rng) for n in range(1, 8)]
    assert all(0.5 <= d <= 8 for d in delays)
    assert delays[-1] >= 4  # capped at 8, jitter over [cap/2, cap]


def test_sidecar_from_pod_requires_ready_ip_and_named_port() -> None:
    pod = falco_pod("falco-x", "node-x", 5060, ready=True)
    sidecar = sidecar_from_pod(pod)
    assert sidecar is not None and sidecar.address == "127.0.0.1:5060" and sidecar.node == "node-x"
    assert sidecar_from_pod(falco_pod("falco-x", "node-x", 5060, ready=False)) is None
    assert sidecar_from_pod(pod, port_name="other") is None
    no_ip = falco_pod("falco-x", "node-x", 5060, ready=True)
    del no_ip["status"]["podIP"]
    assert sidecar_from_pod(no_ip) is None


def test_directory_reports_changed_nodes_only() -> None:
    directory = SidecarDirectory()
    assert directory.observe("ADDED", falco_pod("p", "n", 1, ready=True)) == {"n"}
    assert directory.observe("MODIFIED", falco_pod("p", "n", 1, ready=True)) == set()
    assert directory.observe("MODIFIED", falco_pod("p", "n", 1, ready=False)) == {"n"}
    assert directory.pod_nodes == {"n"}
    assert directory.observe("DELETED", falco_pod("p", "n", 1, ready=False)) == set()
    assert directory.pod_nodes == set()


@pytest.mark.parametrize("bad", ["", "a!=b", "a in (b)", "novalue"])
def test_sidecar_selector_must_be_equality_terms(bad: str) -> None:
    with pytest.raises(SelectorError):
        parse_equality_selector(bad)


def test_set_validation_catches_override_of_undefined_rule() -> None:
    override = FalcoRuleSpec(
        "o",
        "- rule: Ghost\n  condition: and proc.name = x\n  override:\n    condition: append\n",
        50,
        LabelSelector(),
    )
    assert "Ghost" in str(validate_rule_in_set(override, [])[0])
    base = FalcoRuleSpec(
        "base",
        "- rule: Ghost\n  desc: d\n  condition: evt.type = execve\n  output: o\n  priority: INFO\n",
        1,
        LabelSelector(),
    )
    assert validate_rule_in_set(override, [base]) == []
    later = FalcoRuleSpec("zz", base.rules, 99, LabelSelector())
    assert validate_rule_in_set(override, [later]), "an override loaded before its base is an error"


def test_broken_yaml_is_a_finding_not_a_crash() -> None:
    broken = FalcoRuleSpec("b", "- rule: [unclosed\n", 50, LabelSelector())
    assert "yaml" in str(validate_rule_in_set(broken, [])[0]).lower()


def test_operator_flags_become_a_config(tmp_path: object) -> None:
    import pytest as _pytest

    from falco_api.tls import TlsConfigError
    from falco_api_operator.main import build_parser, config_from_args

    args = build_parser().parse_args(
        [
            "--tls-cert",
            "c.crt",
            "--tls-key",
            "c.key",
            "--tls-ca",
            "ca.crt",
            "--webhook-port",
            "9443",
            "--webhook-cert",
            "w.crt",
            "--webhook-key",
            "w.key",
            "--webhook-ca",
            "ca.crt",
            "--sidecar-server-name",
            "sidecar.example",
            "--no-manage-webhook-configuration",
        ]
    )
    config = config_from_args(args)
    assert config.webhook_ca == "ca.crt" and config.sidecar_server_name == "sidecar.example"
    assert config.tls is not None and not config.manage_webhook_configuration
    with _pytest.raises(TlsConfigError, match="--insecure"):
        config_from_args(build_parser().parse_args([]))


def test_ties_load_in_the_sidecars_file_order_not_plain_name_order() -> None:
    # The sidecar writes NN-name.yaml and Falco loads a folder alphabetically: "50-a-b.yaml"
    # comes before "50-a.yaml" ('-' sorts before '.'), although "a" < "a-b".
    from falco_api_sidecar.managed import file_name_for

    rules = [rule("a", 50), rule("a-b", 50), rule("a0", 50), rule("b", 7)]
    state = desired_state(rules, [], {})
    falco_order = sorted(rules, key=lambda r: file_name_for(r.name, r.order))
    assert [r.name for r in state.rulesets] == [r.name for r in falco_order] == ["b", "a-b", "a", "a0"]


def test_admission_validates_ties_in_the_order_falco_loads_them() -> None:
    base = FalcoRuleSpec(
        "shell",
        "- rule: Shell\n  desc: d\n  condition: proc.name = bash\n  output: o\n  priority: WARNING\n",
        50,
        LabelSelector(),
    )
    extension = FalcoRuleSpec(
        "shell-extra",
        "- rule: Shell\n  condition: and user.name = root\n  override:\n    condition: append\n",
        50,
        LabelSelector(),
    )
    # Falco loads 50-shell-extra.yaml before 50-shell.yaml: the override comes first and fails.
    findings = validate_rule_in_set(extension, [base])
    assert findings and "override" in findings[0].message


def test_rule_acceptance_is_not_recomputed_for_unchanged_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every event re-validates, including the operator's own status patches echoing back; a large
    # rules string takes most of a second to validate, on the event loop.
    from falco_api.discovery import SidecarDirectory as Directory
    from falco_api_operator import handlers
    from falco_api_operator.cluster import ClusterModel, TrackedObject

    calls: list[str] = []
    real = handlers.validate_rule_in_set

    def counting(candidate: FalcoRuleSpec, others: Any) -> Any:
        calls.append(candidate.name)
        return real(candidate, others)

    monkeypatch.setattr(handlers, "validate_rule_in_set", counting)

    async def no_io(*_: Any) -> None:
        return None

    model = ClusterModel(Directory(), None, no_io, no_io)  # type: ignore[arg-type]
    a, b = rule("a"), rule("b")
    model.objects[("falcorules", "b")] = TrackedObject(b, Acceptance(True), {})
    assert handlers.rule_acceptance(a, model).accepted
    assert handlers.rule_acceptance(a, model).accepted
    assert calls == ["a"]
    model.objects[("falcorules", "b")] = TrackedObject(rule("b", 60), Acceptance(True), {})
    assert handlers.rule_acceptance(a, model).accepted
    assert handlers.rule_acceptance(rule("a", 40), model).accepted
    assert calls == ["a", "a", "a"]


async def test_a_status_write_that_keeps_failing_is_retried_with_backoff() -> None:
    # A refused write (RBAC, a webhook, an API outage) was retried every debounce, forever.
    import asyncio

    from falco_api.discovery import SidecarDirectory as Directory
    from falco_api_operator.cluster import ClusterModel, TrackedObject

    attempts: list[float] = []

    async def refused(*_: Any) -> None:
        attempts.append(asyncio.get_running_loop().time())
        raise RuntimeError("PATCH .../status: HTTP 403: forbidden")

    async def no_event(*_: Any) -> None:
        return None

    model = ClusterModel(Directory(), None, refused, no_event, debounce_seconds=0.02)  # type: ignore[arg-type]
    model.objects[("falcorules", "r1")] = TrackedObject(rule("r1"), Acceptance(True), {})
    model.start()
    model.mark_all_dirty()
    await asyncio.sleep(1.2)
    model.mark_all_dirty()  # other objects' changes do not cut a failing write's wait short
    await asyncio.sleep(0.3)
    await model.close()
    assert 2 <= len(attempts) <= 4, len(attempts)


async def test_status_writes_follow_kopfs_renewed_credentials() -> None:
    # kopf logs in again when its token is refused (a rotated service account token); the status
    # client kept the first token and every later status write failed with 401.
    import kopf

    from falco_api_operator.handlers import OperatorConfig, Runtime

    first = kopf.ConnectionInfo(server="https://127.0.0.1:1", token="first-token", insecure=True)
    runtime = Runtime(OperatorConfig(insecure=True, connection=first))
    try:
        before = await runtime.status_client()
        runtime.connection = kopf.ConnectionInfo(server="https://127.0.0.1:1", token="renewed", insecure=True)
        after = await runtime.status_client()
        assert after is not before
        assert after.authorization == "Bearer renewed"
        assert await runtime.status_client() is after
    finally:
        await runtime.close()
