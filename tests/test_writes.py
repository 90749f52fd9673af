"""Rules and configs through the sidecar's API, confirmed by a Falco double that loads files like Falco."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from falco_api.alerts import Alert, parse_alert
from falco_api.contract.falco.api import apply_pb2, configs_pb2, rules_pb2, unary_pb2_grpc
from falco_api.hub import Entry, Hub
from falco_api_sidecar.managed import LoadState, ManagedStore
from falco_api_sidecar.writes import CONFIG_FILES_METRIC, RULES_FILES_METRIC, WriteCoordinator
from tests.real_sidecar import RealSidecar

LOADED = rules_pb2.LoadStatus.STATE_LOADED
FAILED = rules_pb2.LoadStatus.STATE_FAILED
UNKNOWN = rules_pb2.LoadStatus.STATE_UNKNOWN

SHELLS = """\
- list: shell_binaries
  items: [bash, sh, zsh]
- rule: Shell in container
  desc: a shell started in a container
  condition: spawned_process and container and proc.name in (shell_binaries)
  output: shell in container (user=%user.name command=%proc.cmdline container=%container.id)
  priority: WARNING
  tags: [container, shell]
"""

MORE_SHELLS = """\
- list: shell_binaries
  items: [fish]
  override:
    items: append
"""

# Valid for our validator (plugin sources are only warned about); this Falco has no such plugin.
NEEDS_A_PLUGIN = """\
- rule: Console login without MFA
  desc: needs the cloudtrail plugin
  condition: ct.name = ConsoleLogin
  output: login (user=%ct.user)
  priority: WARNING
  source: aws_cloudtrail
"""


# One node: the tests read its sidecar, Falco double and reload model (tests/real_sidecar.py).
WritableSetup = RealSidecar


@pytest.fixture
async def setup() -> AsyncIterator[RealSidecar]:
    node = RealSidecar("node-a", grpc_listen="unix")
    await node.start()
    yield node
    await node.close()


def ruleset(name: str, content: str, order: int) -> rules_pb2.Ruleset:
    return rules_pb2.Ruleset(name=name, content=content, order=order)


def on_disk(setup: WritableSetup) -> dict[str, str]:
    folder = setup.sidecar.store.rules_dir  # type: ignore[union-attr]
    return {p.name: p.read_text() for p in sorted(folder.iterdir()) if p.name[:2].isdigit()}


async def call(setup: WritableSetup, method: str, request: Any) -> Any:
    async with grpc.aio.insecure_channel(setup.target) as channel:
        return await getattr(unary_pb2_grpc.unaryStub(channel), method)(request, timeout=30)


async def test_apply_loads_then_a_refused_set_is_rolled_back(setup: WritableSetup) -> None:
    good = apply_pb2.ApplyRequest(
        rulesets=[ruleset("shells", SHELLS, 10), ruleset("more-shells", MORE_SHELLS, 20)],
        configs=[configs_pb2.ConfigDropIn(name="quiet", order=10)],
    )
    good.configs[0].settings.update({"priority": "warning"})
    reply = await call(setup, "apply", good)
    assert reply.result.status.state == LOADED, reply.result.status.message
    assert reply.result.changed and not reply.result.rolled_back and len(reply.result.state_sha256) == 64
    assert [(r.name, r.order, r.status.state) for r in reply.rulesets] == [
        ("shells", 10, LOADED),
        ("more-shells", 20, LOADED),
    ]
    assert on_disk(setup) == {"10-shells.yaml": SHELLS, "20-more-shells.yaml": MORE_SHELLS}
    loaded = {Path(p).name: sha for p, sha in setup.model.loaded_rules_files().items()}
    assert {r.sha256 for r in reply.rulesets} <= set(loaded.values())

    # The same state again: nothing changes, still loaded.
    again = await call(setup, "apply", good)
    assert not again.result.changed and again.result.status.state == LOADED
    assert again.result.state_sha256 == reply.result.state_sha256

    # Our validator accepts it; this Falco refuses it: failed with Falco's reason, old set back.
    refused = apply_pb2.ApplyRequest(rulesets=[ruleset("cloud", NEEDS_A_PLUGIN, 5)])
    outcome = await call(setup, "apply", refused)
    assert outcome.result.status.state == FAILED
    assert "Unknown source aws_cloudtrail" in outcome.result.status.message
    assert "previous rules restored" in outcome.result.status.message
    assert outcome.result.rolled_back
    assert on_disk(setup) == {"10-shells.yaml": SHELLS, "20-more-shells.yaml": MORE_SHELLS}
    listed = await call(setup, "list_rules", rules_pb2.ListRulesRequest())
    assert [(r.name, r.status.state) for r in listed.rulesets] == [
        ("shells", LOADED),
        ("more-shells", LOADED),
    ]
    assert setup.model.failed_reloads == 1
    assert {Path(p).name for p in setup.model.loaded_rules_files()} >= {
        "10-shells.yaml",
        "20-more-shells.yaml",
    }


async def test_invalid_rules_are_refused_before_any_file_is_written(setup: WritableSetup) -> None:
    first = await call(setup, "put_rule", rules_pb2.PutRuleRequest(ruleset=ruleset("shells", SHELLS, 10)))
    assert first.result.status.state == LOADED
    generation = setup.sidecar.store.generation  # type: ignore[union-attr]
    broken = SHELLS.replace("spawned_process and", "spawned_proces and")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(setup, "put_rule", rules_pb2.PutRuleRequest(ruleset=ruleset("shells", broken, 10)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert "Shell in container" in details and "spawned_proces" in details
    assert setup.sidecar.store.generation == generation  # type: ignore[union-attr]
    assert on_disk(setup) == {"10-shells.yaml": SHELLS}

    for bad_name in ("../etc/passwd", "a/b", "", ".hidden", "x" * 64):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(setup, "put_rule", rules_pb2.PutRuleRequest(ruleset=ruleset(bad_name, SHELLS, 10)))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(setup, "put_rule", rules_pb2.PutRuleRequest(ruleset=ruleset("late", SHELLS, 100)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_optimistic_concurrency_get_and_delete(setup: WritableSetup) -> None:
    created = await call(
        setup, "put_rule", rules_pb2.PutRuleRequest(ruleset=ruleset("shells", SHELLS, 10), expected_version=0)
    )
    version = created.ruleset.version
    assert version >= 1 and created.ruleset.status.state == LOADED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(
            setup,
            "put_rule",
            rules_pb2.PutRuleRequest(ruleset=ruleset("shells", SHELLS, 10), expected_version=0),
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    changed = SHELLS.replace("WARNING", "ERROR")
    updated = await call(
        setup,
        "put_rule",
        rules_pb2.PutRuleRequest(ruleset=ruleset("shells", changed, 10), expected_version=version),
    )
    assert updated.ruleset.version == version + 1
    fetched = await call(setup, "get_rule", rules_pb2.GetRuleRequest(name="shells"))
    assert fetched.content == changed and fetched.status.state == LOADED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(setup, "delete_rule", rules_pb2.DeleteRuleRequest(name="shells", expected_version=version))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    deleted = await call(setup, "delete_rule", rules_pb2.DeleteRuleRequest(name="shells"))
    assert deleted.result.status.state == LOADED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(setup, "get_rule", rules_pb2.GetRuleRequest(name="shells"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_configs(setup: WritableSetup) -> None:
    dropin = configs_pb2.ConfigDropIn(name="outputs", order=10)
    dropin.settings.update({"priority": "notice", "buffered_outputs": False})
    put = await call(setup, "put_config", configs_pb2.PutConfigRequest(dropin=dropin))
    assert put.result.status.state == LOADED and put.dropin.version >= 1
    effective = await call(setup, "get_config", configs_pb2.GetConfigRequest())
    assert effective.base_included
    assert effective.effective["priority"] == "notice" and effective.effective["json_output"] is True
    assert [d.name for d in effective.dropins] == ["outputs"]

    forbidden = configs_pb2.ConfigDropIn(name="hijack", order=20)
    forbidden.settings.update({"http_output": {"enabled": True, "url": "http://evil/"}})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(setup, "put_config", configs_pb2.PutConfigRequest(dropin=forbidden))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "http_output" in (caught.value.details() or "")

    wrong_type = configs_pb2.ConfigDropIn(name="typo", order=20)
    wrong_type.settings.update({"buffered_outputs": "sometimes"})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(setup, "put_config", configs_pb2.PutConfigRequest(dropin=wrong_type))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "buffered_outputs" in (caught.value.details() or "")


async def test_validate_rules_call(setup: WritableSetup) -> None:
    ok = await call(
        setup, "validate_rules", rules_pb2.ValidateRulesRequest(rulesets=[ruleset("s", SHELLS, 1)])
    )
    assert ok.valid
    alone = await call(
        setup,
        "validate_rules",
        rules_pb2.ValidateRulesRequest(rulesets=[ruleset("s", MORE_SHELLS, 1)], standalone=True),
    )
    assert not alone.valid and any("shell_binaries" in e.message for e in alone.errors)


async def test_no_verdict_from_falco_is_unknown(setup: WritableSetup) -> None:
    setup.sidecar.writes.confirm_timeout = 0.5  # type: ignore[union-attr]
    await setup.falco.stop()
    reply = await call(setup, "put_rule", rules_pb2.PutRuleRequest(ruleset=ruleset("shells", SHELLS, 10)))
    assert reply.result.status.state == UNKNOWN
    assert "did not report loading" in reply.result.status.message
    assert "cannot reach Falco's webserver" in reply.result.status.message
    assert on_disk(setup) == {"10-shells.yaml": SHELLS}


async def test_writes_need_a_managed_root(sidecar: Any) -> None:
    async with grpc.aio.insecure_channel(sidecar.grpc_target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary_pb2_grpc.unaryStub(channel).list_rules(rules_pb2.ListRulesRequest())
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "--managed-root" in (caught.value.details() or "")


async def test_the_operator_computes_the_sidecars_state_hash(setup: WritableSetup) -> None:
    from falco_api_operator.desired import (
        DesiredState,
        FalcoConfigSpec,
        FalcoRuleSpec,
        LabelSelector,
        apply_request,
        state_sha256,
    )

    everywhere = LabelSelector()
    rules = [
        FalcoRuleSpec("shells", SHELLS, 10, everywhere),
        FalcoRuleSpec("more-shells", MORE_SHELLS, 20, everywhere),
    ]
    configs = [
        FalcoConfigSpec(
            "quiet", {"priority": "warning", "outputs": {"rate": 5, "max_burst": 1000}}, 10, everywhere
        )
    ]
    request = apply_request(DesiredState(tuple(rules), tuple(configs)))
    reply = await call(setup, "apply", request)
    assert reply.result.status.state == LOADED
    assert reply.result.state_sha256 == state_sha256(rules, configs)


# --- the coordinator alone, against a scripted Falco ---------------------------------------------


class ScriptedFalco:
    """/metrics reports whatever `loaded` says Falco runs (base name -> sha256)."""

    def __init__(self) -> None:
        self.loaded_rules: dict[str, str] = {}
        self.loaded_configs: dict[str, str] = {}

    def load(self, store: ManagedStore) -> None:
        self.loaded_rules = store.expected_rules_hashes()
        self.loaded_configs = store.expected_config_hashes()

    async def metrics(self) -> str:
        lines = [
            f'{RULES_FILES_METRIC}{{file_name="{n}",sha256="{s}"}} 1' for n, s in self.loaded_rules.items()
        ]
        lines += [
            f'{CONFIG_FILES_METRIC}{{file_name="{n}",sha256="{s}"}} 1' for n, s in self.loaded_configs.items()
        ]
        return "\n".join(lines) + "\n"


def hot_restart_failure(at: datetime, error: str) -> Alert:
    stamp = at.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"
    return parse_alert(
        json.dumps(
            {
                "time": stamp,
                "rule": "Falco internal: hot restart failure",
                "priority": "Critical",
                "source": "internal",
                "hostname": "n",
                "output": f"Falco internal: hot restart failure: {error}",
                "output_fields": {},
            }
        )
    )


@pytest.fixture
def coordinated(tmp_path: Path) -> tuple[ManagedStore, ScriptedFalco, Hub[Alert], WriteCoordinator]:
    store = ManagedStore.open(tmp_path / "root", rules_validator=lambda files: [], durable=False)
    falco = ScriptedFalco()
    alerts: Hub[Alert] = Hub(replay_size=10, queue_size=10)
    writes = WriteCoordinator(store, falco, alerts, confirm_timeout=3.0, poll_interval=0.01)  # type: ignore[arg-type]
    return store, falco, alerts, writes


async def test_a_refusal_older_than_the_commit_is_not_this_writes_verdict(
    coordinated: tuple[ManagedStore, ScriptedFalco, Hub[Alert], WriteCoordinator],
) -> None:
    """An unrelated, earlier reload's refusal reaching the sidecar late must not roll back this write."""
    store, falco, alerts, writes = coordinated
    earlier = datetime.now(UTC)

    def put() -> Any:
        outcome = store.put_ruleset("shells", SHELLS, 10)
        # Falco's refusal of an older change arrives while we wait; then Falco loads ours.
        alerts.publish(Entry(1, "falco", hot_restart_failure(earlier, "an older edit"), b""))
        return outcome

    async def falco_loads_later() -> None:
        await asyncio.sleep(0.2)
        falco.load(store)

    loader = asyncio.create_task(falco_loads_later())
    outcome = await writes.write(put)
    await loader
    assert outcome.status.state == LoadState.LOADED, outcome.status.message
    assert not outcome.rolled_back
    assert [r.name for r in store.list_rulesets()] == ["shells"]


async def test_a_client_that_goes_away_does_not_stop_the_rollback(
    coordinated: tuple[ManagedStore, ScriptedFalco, Hub[Alert], WriteCoordinator],
) -> None:
    store, falco, alerts, writes = coordinated
    first = await asyncio.gather(
        writes.write(lambda: store.put_ruleset("shells", SHELLS, 10)), _load_soon(falco, store)
    )
    assert first[0].status.state == LoadState.LOADED
    good = store.state_sha256

    caller = asyncio.create_task(writes.write(lambda: store.put_ruleset("more", MORE_SHELLS, 20)))
    await asyncio.sleep(0.1)  # the write is committed and waiting for Falco's verdict
    caller.cancel()  # the client's deadline passed
    with pytest.raises(asyncio.CancelledError):
        await caller
    alerts.publish(Entry(1, "falco", hot_restart_failure(datetime.now(UTC), "bad rules"), b""))
    # Falco still runs the first set: the restored set is confirmed by the same hashes.
    for _ in range(200):
        if store.state_sha256 == good and store.status().state == LoadState.LOADED:
            break
        await asyncio.sleep(0.01)
    assert [r.name for r in store.list_rulesets()] == ["shells"]
    assert store.state_sha256 == good


async def _load_soon(falco: ScriptedFalco, store: ManagedStore) -> None:
    await asyncio.sleep(0.05)
    falco.load(store)
