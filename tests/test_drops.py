from __future__ import annotations

import json

from falco_api.alerts import parse_alert
from falco_api.contract.falco.api import drops_pb2
from falco_api.drops import SYSCALL_DROP_COUNTERS, DropAlertInterpreter
from falco_api.streams import EventStreams
from falco_api.testing.falco_double import metrics_snapshot_alert, rule_alert, syscall_drop_alert

T0 = 1_732_631_000_000_000_000


def alert(raw: dict[str, object]):  # type: ignore[no-untyped-def]
    return parse_alert(json.dumps(raw))


def test_syscall_drop_alert_becomes_a_typed_report_with_every_counter() -> None:
    raw = syscall_drop_alert("node-a", n_drops=9, time_ns=T0)
    report = DropAlertInterpreter("node-a/1").interpret(alert(raw))
    assert report is not None and report.kind == drops_pb2.DROP_KIND_SYSCALL_EVENT
    for name in SYSCALL_DROP_COUNTERS:
        assert getattr(report.syscall_event, name) == int(raw["output_fields"][name])  # type: ignore[index]
    assert report.syscall_event.ebpf_enabled is True
    assert report.dropped == 9
    assert report.window_end.ToNanoseconds() - report.window_start.ToNanoseconds() == 1_000_000_000
    assert report.window_end.ToNanoseconds() == T0


def test_outputs_queue_drops_are_deltas_between_snapshots() -> None:
    interpreter = DropAlertInterpreter("o")
    first = metrics_snapshot_alert("h", outputs_queue_drops=10, num_evts=1, time_ns=T0)
    same = metrics_snapshot_alert("h", outputs_queue_drops=10, num_evts=2, time_ns=T0 + 10**9)
    more = metrics_snapshot_alert("h", outputs_queue_drops=25, num_evts=3, time_ns=T0 + 2 * 10**9)
    restarted = metrics_snapshot_alert("h", outputs_queue_drops=4, num_evts=1, time_ns=T0 + 3 * 10**9)
    assert interpreter.interpret(alert(first)) is None  # baseline only
    assert interpreter.interpret(alert(same)) is None
    report = interpreter.interpret(alert(more))
    assert report is not None and (report.outputs_queue.delta, report.outputs_queue.total) == (15, 25)
    assert report.window_start.ToNanoseconds() == T0 + 10**9
    after_restart = interpreter.interpret(alert(restarted))
    assert after_restart is not None and after_restart.outputs_queue.delta == 4


def test_rule_alerts_imply_no_drop_and_garbage_counters_do_not_crash() -> None:
    interpreter = DropAlertInterpreter("o")
    assert interpreter.interpret(alert(rule_alert("h", index=0))) is None
    raw = syscall_drop_alert("h", n_drops=1)
    raw["output_fields"] = {"n_drops": "lots", "n_evts": None}
    report = interpreter.interpret(alert(raw))
    assert report is not None and report.syscall_event.n_drops == 0


def test_streams_publish_drop_reports_and_rejections() -> None:
    streams = EventStreams(origin="o", hostname="h", replay_size=10, queue_size=10)
    streams.ingest(alert(syscall_drop_alert("h", n_drops=2)))
    streams.reject("bad_json")
    streams.reject("bad_json")
    streams.reject("too_large")
    report = streams.flush_rejections()
    assert report is not None and dict(report.ingest_rejected.by_reason) == {"bad_json": 2, "too_large": 1}
    assert streams.flush_rejections() is None
    kinds = [e.item.kind for e in streams.drops._ring]
    assert kinds == [drops_pb2.DROP_KIND_SYSCALL_EVENT, drops_pb2.DROP_KIND_INGEST_REJECTED]
    assert streams.alerts.stats.published == 1


def test_the_replay_buffer_keeps_bytes_not_field_values() -> None:
    from falco_api.contract.falco import outputs_pb2

    streams = EventStreams(origin="o", hostname="h", replay_size=10, queue_size=10)
    raw = rule_alert("h", index=0)
    streams.ingest(alert(raw))
    entry = streams.alerts._ring[0]
    assert entry.item.output_fields == {} and entry.item.rule == raw["rule"]
    assert outputs_pb2.response.FromString(entry.payload).output_fields["proc.name"] == "bash"
