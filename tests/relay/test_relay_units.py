"""The relay's pure parts: targets from flags and pods, the merge, backoff, configuration."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from falco_api.alerts import Alert, parse_alert
from falco_api.contract.falco import outputs_pb2
from falco_api.contract.falco.api import drops_pb2
from falco_api.discovery import SelectorError
from falco_api.filters import AlertFilter
from falco_api.hub import GAP_OVERFLOW
from falco_api.testing.falco_double import rule_alert
from falco_api.tls import TlsConfigError, TlsFiles
from falco_api_relay.main import RelayConfig, build_parser, config_from_args, main
from falco_api_relay.merge import (
    REPLAY_ALL_ORIGIN,
    Cursor,
    MalformedResponse,
    RecentDigests,
    RelayStreams,
    UpstreamStatus,
    alert_from_response,
    describe,
)
from falco_api_relay.targets import (
    UpstreamTarget,
    plan_changes,
    pod_targets,
    sidecar_targets,
    static_targets,
)
from falco_api_relay.upstream import Backoff, BackoffPolicy

# --- targets -----------------------------------------------------------------------------------


def pod(
    name: str,
    node: str,
    *,
    ip: str = "10.0.0.1",
    uid: str = "",
    ready: bool = True,
    port_name: str = "falco-api",
    created: str = "2024-05-01T00:00:00Z",
    deleting: bool = False,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": "falco",
        "uid": uid or f"uid-{name}",
        "creationTimestamp": created,
    }
    if deleting:
        metadata["deletionTimestamp"] = "2024-05-01T01:00:00Z"
    return {
        "metadata": metadata,
        "spec": {
            "nodeName": node,
            "containers": [
                {"name": "falco"},
                {"name": "falco-api", "ports": [{"name": port_name, "containerPort": 5060}]},
            ],
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def test_pods_give_one_upstream_per_node_with_a_ready_sidecar() -> None:
    pods = [
        pod("falco-a", "node-a", ip="10.0.0.1"),
        pod("falco-b", "node-b", ip="fd00::2"),
        pod("falco-c", "node-c", ready=False),
        pod("falco-d", "node-d", port_name="http"),
        pod("falco-e", "node-e", deleting=True),
    ]
    targets = pod_targets(pods)
    assert {key: target.address for key, target in targets.items()} == {
        "node:node-a": "10.0.0.1:5060",
        "node:node-b": "[fd00::2]:5060",
    }
    assert targets["node:node-a"].name == "node-a"
    assert pod_targets(pods, port_name="http") == {
        "node:node-d": UpstreamTarget("node:node-d", "10.0.0.1:5060", ("uid-falco-d", "10.0.0.1", "5060"))
    }


def test_during_a_rollout_the_newest_pod_of_a_node_is_followed() -> None:
    old = pod("falco-old", "node-a", ip="10.0.0.1", created="2024-05-01T00:00:00Z")
    new = pod("falco-new", "node-a", ip="10.0.0.9", created="2024-05-02T00:00:00Z")
    assert pod_targets([new, old])["node:node-a"].address == "10.0.0.9:5060"


def test_plan_restarts_only_what_changed() -> None:
    current = pod_targets([pod("falco-a", "node-a", ip="10.0.0.1"), pod("falco-b", "node-b", ip="10.0.0.2")])
    same = pod_targets([pod("falco-a", "node-a", ip="10.0.0.1"), pod("falco-b", "node-b", ip="10.0.0.2")])
    assert plan_changes(current, same).stop == () and plan_changes(current, same).start == ()
    # node-a's pod replaced (new uid, same IP), node-b gone, node-c new
    desired = pod_targets(
        [pod("falco-a2", "node-a", ip="10.0.0.1", uid="new"), pod("falco-c", "node-c", ip="10.0.0.3")]
    )
    plan = plan_changes(current, desired)
    assert plan.stop == ("node:node-a", "node:node-b")
    assert [t.key for t in plan.start] == ["node:node-a", "node:node-c"]
    assert plan_changes({}, {}).start == ()


def test_static_upstreams_are_checked_and_deduplicated() -> None:
    targets = static_targets(["10.0.0.1:5060", "unix:///run/falco-api/falco-api.sock", "10.0.0.1:5060"])
    assert sorted(t.address for t in targets.values()) == [
        "10.0.0.1:5060",
        "unix:///run/falco-api/falco-api.sock",
    ]
    for bad in ("10.0.0.1", "host:port", "10.0.0.1:0", "unix://relative.sock", "10.0.0.1:70000"):
        with pytest.raises(ValueError, match="--upstream"):
            static_targets([bad])


def test_sidecar_targets_keep_identity_per_process() -> None:
    from falco_api.discovery import Sidecar

    one = Sidecar("node-a", "falco", "falco-a", "uid-1", "10.0.0.1", 5060)
    restarted = Sidecar("node-a", "falco", "falco-a", "uid-1", "10.0.0.7", 5060)
    assert (
        sidecar_targets({"node-a": one})["node:node-a"].identity
        != sidecar_targets({"node-a": restarted})["node:node-a"].identity
    )


# --- backoff -----------------------------------------------------------------------------------


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap() -> None:
    policy = BackoffPolicy(initial=1.0, maximum=8.0)
    low, high = Backoff(policy, rng=lambda: 0.0), Backoff(policy, rng=lambda: 0.999999)
    assert [low.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert [round(high.next_delay(), 3) for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    low.reset()
    assert low.next_delay() == 0.5
    many = Backoff(policy, rng=lambda: 0.5)
    for _ in range(500):
        many.next_delay()  # no overflow after a very long outage
    assert many.next_delay() == 6.0
    with pytest.raises(ValueError):
        BackoffPolicy(initial=0, maximum=1)
    with pytest.raises(ValueError):
        BackoffPolicy(initial=2, maximum=1)


# --- the merge ---------------------------------------------------------------------------------


def alert_bytes(origin: str, seq: int, *, index: int = 0, host: str = "node-a", **extra: Any) -> bytes:
    alert = parse_alert(json.dumps(rule_alert(host, index=index)))
    response = alert.to_response(seq=seq, origin=origin)
    for name, value in extra.items():
        setattr(response, name, value)
    return response.SerializeToString()


def gap_bytes(origin: str, missed: int, reason: str, first: int = 0, last: int = 0) -> bytes:
    return outputs_pb2.response(
        origin=origin,
        gap=outputs_pb2.Gap(missed=missed, reason=reason, origin=origin, first_seq=first, last_seq=last),
    ).SerializeToString()


def test_filters_read_the_same_fields_from_a_relayed_alert() -> None:
    raw = rule_alert("node-b", index=1)
    original = parse_alert(json.dumps(raw))
    wire = original.to_response(seq=1, origin="node-b/1").SerializeToString()
    relayed = alert_from_response(outputs_pb2.response.FromString(wire))
    requests = [
        outputs_pb2.request(min_priority=4),
        outputs_pb2.request(min_priority=3),
        outputs_pb2.request(hostnames=["node-b"], tags=["filesystem"]),
        outputs_pb2.request(rules=["Read*"], sources=["syscall"], exclude_internal=True),
        outputs_pb2.request(exclude_rules=["Read*"]),
    ]
    for request in requests:
        alert_filter = AlertFilter.from_request(request)
        assert alert_filter.matches(relayed) == alert_filter.matches(original), request
    assert (relayed.seconds, relayed.nanos, relayed.tags) == (original.seconds, original.nanos, original.tags)


async def test_alerts_are_published_once_with_their_upstream_bytes_and_positions() -> None:
    streams = RelayStreams(hostname="relay", replay_size=10, queue_size=10)
    cursor = Cursor()
    assert cursor.resume_after() == {REPLAY_ALL_ORIGIN: 0}
    first, second = alert_bytes("node-a/1", 1), alert_bytes("node-a/1", 2, index=1)
    assert streams.accept_alert(first, cursor).entry is not None
    result = streams.accept_alert(second, cursor)
    assert result.entry is not None and result.entry.payload == second
    assert (result.entry.origin, result.entry.seq) == ("node-a/1", 2)
    assert cursor.resume_after() == {"node-a/1": 2}
    # The same alert again (the same sidecar reached by a second upstream): never twice.
    assert streams.accept_alert(second, Cursor()).entry is None
    assert streams.stats.duplicates == 1
    snapshot = streams.alerts.subscribe(lambda _alert: True, follow=False, replay_all=True)
    payloads = []
    while (delivery := await snapshot.next()) is not None:
        assert delivery.entry is not None
        payloads.append(delivery.entry.payload)
    assert payloads == [first, second]


def test_an_upstream_missed_before_is_not_copied_to_every_relay_subscriber() -> None:
    streams = RelayStreams(hostname="relay", replay_size=10, queue_size=10)
    result = streams.accept_alert(alert_bytes("node-a/1", 7, missed_before=3), Cursor())
    assert result.entry is not None
    assert outputs_pb2.response.FromString(result.entry.payload).missed_before == 0
    assert outputs_pb2.response.FromString(result.entry.payload).seq == 7


def test_malformed_upstream_responses_are_refused_clearly() -> None:
    streams = RelayStreams(hostname="relay", replay_size=10, queue_size=10)
    with pytest.raises(MalformedResponse, match="undecodable"):
        streams.accept_alert(b"\xff\xff\xff", Cursor())
    with pytest.raises(MalformedResponse, match="origin and seq"):
        streams.accept_alert(outputs_pb2.response(rule="x").SerializeToString(), Cursor())
    with pytest.raises(MalformedResponse, match="undecodable"):
        streams.accept_drop(b"\xff\xff\xff")
    assert streams.stats.alerts == 0


async def test_upstream_gaps_reach_streaming_and_legacy_subscribers() -> None:
    streams = RelayStreams(hostname="relay", replay_size=10, queue_size=10)
    cursor = Cursor("node-a/1", 3)
    streaming = streams.alerts.subscribe(lambda _a: True, follow=True, report_idle_gaps=True)
    legacy = streams.alerts.subscribe(lambda _a: True, follow=True, report_idle_gaps=False)
    result = streams.accept_alert(gap_bytes("node-a/1", 5, "evicted_before_resume", 4, 8), cursor)
    assert result.gap is not None and result.gap.missed == 5
    assert cursor.seq == 8  # never ask for what is gone again
    idle = await asyncio.wait_for(streaming.next(), 1)
    assert idle is not None and idle.entry is None and idle.gap is not None
    assert (idle.gap.missed, idle.gap.reason, idle.gap.first_seq, idle.gap.last_seq) == (
        5,
        "evicted_before_resume",
        4,
        8,
    )
    streams.accept_alert(alert_bytes("node-a/1", 9), cursor)
    on_alert = await asyncio.wait_for(legacy.next(), 1)
    assert on_alert is not None and on_alert.entry is not None and on_alert.gap is not None
    assert on_alert.gap.missed == 5 and legacy.total_missed == 5
    # Two losses before the next alert add up; across origins the seq bounds mean nothing.
    streams.accept_alert(gap_bytes("node-a/1", 2, GAP_OVERFLOW, 10, 11), cursor)
    streams.accept_alert(gap_bytes("node-b/1", 1, GAP_OVERFLOW, 4, 4), Cursor("node-b/1", 3))
    streams.accept_alert(alert_bytes("node-a/1", 12), cursor)
    merged = await asyncio.wait_for(legacy.next(), 1)
    assert merged is not None and merged.gap is not None
    assert (merged.gap.missed, merged.gap.origin, merged.gap.first_seq) == (3, "", 0)
    # Upstream losses were reported by the sidecar that had them: no second drop report here.
    assert streams.drops.stats.published == 0


def test_our_own_first_connection_notice_is_swallowed_and_a_restart_resets_the_cursor() -> None:
    streams = RelayStreams(hostname="relay", replay_size=10, queue_size=10)
    subscription = streams.alerts.subscribe(lambda _a: True, follow=True)
    cursor = Cursor()
    assert streams.accept_alert(gap_bytes(REPLAY_ALL_ORIGIN, 0, "unknown_origin"), cursor).gap is None
    assert subscription._pending_gap is None
    cursor = Cursor("node-a/old", 40)
    gap = streams.accept_alert(gap_bytes("node-a/old", 0, "unknown_origin"), cursor).gap
    assert gap is not None and gap.origin == "node-a/old"
    assert cursor.resume_after() == {REPLAY_ALL_ORIGIN: 0}


def test_a_relay_subscriber_that_overflows_gets_a_drop_report_from_the_relay() -> None:
    streams = RelayStreams(hostname="relay", replay_size=10, queue_size=1)
    subscription = streams.alerts.subscribe(lambda _a: True, follow=True, peer="ipv4:1.2.3.4", method="m")
    cursor = Cursor()
    for seq in range(1, 4):
        streams.accept_alert(alert_bytes("node-a/1", seq), cursor)
    assert subscription.total_missed == 2

    async def drain() -> None:
        await subscription.next()
        await subscription.next()

    asyncio.run(drain())
    reports = [entry.item for entry in streams.drops._ring]
    assert [(r.kind, r.origin, r.subscriber_overflow.missed) for r in reports] == [
        (drops_pb2.DROP_KIND_SUBSCRIBER_OVERFLOW, streams.origin, 2)
    ]


def test_replayed_drop_reports_are_recognised() -> None:
    streams = RelayStreams(hostname="relay", replay_size=10, queue_size=10)
    report = drops_pb2.DropReport(kind=drops_pb2.DROP_KIND_SYSCALL_EVENT, origin="node-a/1", dropped=3)
    other = drops_pb2.DropReport(kind=drops_pb2.DROP_KIND_SYSCALL_EVENT, origin="node-a/1", dropped=4)
    assert streams.accept_drop(report.SerializeToString()) is not None
    assert streams.accept_drop(report.SerializeToString()) is None
    entry = streams.accept_drop(other.SerializeToString())
    assert entry is not None and entry.seq == 2 and entry.payload == other.SerializeToString()
    digests = RecentDigests(2)
    assert digests.add(b"a") and digests.add(b"b") and not digests.add(b"a")
    assert digests.add(b"c") and digests.add(b"b")  # "b" was the oldest: forgotten, then new again
    with pytest.raises(ValueError):
        RecentDigests(0)


def test_status_line_names_every_upstream() -> None:
    assert describe({}) == "no upstreams"
    line = describe(
        {
            "b": UpstreamStatus("b", "10.0.0.2:5060", False, "", 0, 3, "UNAVAILABLE: refused"),
            "a": UpstreamStatus("a", "10.0.0.1:5060", True, "node-a/1", 42, 0),
        }
    )
    assert line.index("a [10.0.0.1:5060] connected origin=node-a/1 seq=42") < line.index(
        "b [10.0.0.2:5060] down (UNAVAILABLE: refused)"
    )


# --- configuration -----------------------------------------------------------------------------


def test_flags_make_a_config(tmp_path: Any) -> None:
    args = build_parser().parse_args(
        ["--upstream", "10.0.0.1:5060", "--upstream", "10.0.0.2:5060", "--insecure", "--replay-size", "7"]
    )
    config = config_from_args(args)
    assert config.upstreams == ["10.0.0.1:5060", "10.0.0.2:5060"]
    assert not config.kubernetes and config.replay_size == 7 and config.upstream_tls is None
    args = build_parser().parse_args(["--insecure", "--namespace", "sec", "--sidecar-selector", "app=falco"])
    config = config_from_args(args)
    assert config.kubernetes and config.namespace == "sec"


def test_upstream_tls_defaults_to_the_server_files(tmp_path: Any) -> None:
    files = {}
    for name in ("cert", "key", "ca", "ucert"):
        (tmp_path / name).write_text("pem")
        files[name] = str(tmp_path / name)
    args = build_parser().parse_args(
        [
            "--upstream=10.0.0.1:5060",
            f"--tls-cert={files['cert']}",
            f"--tls-key={files['key']}",
            f"--tls-ca={files['ca']}",
            f"--upstream-tls-cert={files['ucert']}",
        ]
    )
    config = config_from_args(args)
    assert config.tls == TlsFiles(files["cert"], files["key"], files["ca"])
    assert config.upstream_tls == TlsFiles(files["ucert"], files["key"], files["ca"])


@pytest.mark.parametrize(
    ("flags", "error", "message"),
    [
        (["--upstream", "10.0.0.1:5060"], TlsConfigError, "refusing plain TCP"),
        (["--upstream", "10.0.0.1:5060", "--grpc-listen", "unix:///tmp/r.sock"], TlsConfigError, "sidecars"),
        (["--upstream", "nope", "--insecure"], ValueError, "--upstream must be host:port"),
        (["--insecure", "--sidecar-selector", "app!=falco"], SelectorError, "key=value"),
        (["--upstream", "1.2.3.4:1", "--insecure", "--queue-size", "0"], ValueError, "--queue-size"),
        (["--upstream", "1.2.3.4:1", "--upstream-tls-cert", "/x"], TlsConfigError, "all three"),
        (
            ["--upstream", "1.2.3.4:1", "--tls-cert", "/no/c", "--tls-key", "/no/k", "--tls-ca", "/no/a"],
            TlsConfigError,
            "cannot read",
        ),
    ],
)
def test_bad_flags_are_refused_before_anything_starts(
    flags: list[str], error: type[Exception], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(error, match=message):
        config_from_args(build_parser().parse_args(flags))
    assert main(flags) == 2
    assert message in capsys.readouterr().err


def test_a_relay_with_nothing_to_follow_is_refused() -> None:
    with pytest.raises(ValueError, match="nothing to relay"):
        RelayConfig(grpc_listen="unix:///tmp/x.sock", kubernetes=False).check()


def test_alert_adapter_is_a_plain_alert() -> None:
    assert isinstance(alert_from_response(outputs_pb2.response()), Alert)
