"""Drop reports: Falco's own losses read from its internal alerts, and ours.

Pure functions and a small stateful tracker; the sidecar publishes what they
return on the drops stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from falco_api.alerts import Alert
from falco_api.contract.falco.api import drops_pb2
from falco_api.hub import Gap

SYSCALL_DROP_RULE = "Falco internal: syscall event drop"
METRICS_SNAPSHOT_RULE = "Falco internal: metrics snapshot"
OUTPUTS_QUEUE_DROPS_FIELD = "falco.outputs_queue_num_drops"

SYSCALL_DROP_COUNTERS = tuple(
    name for name in drops_pb2.SyscallEventDrops.DESCRIPTOR.fields_by_name if name != "ebpf_enabled"
)

_NS = 1_000_000_000


def _set_time(timestamp: Any, time_ns: int) -> None:
    timestamp.seconds, timestamp.nanos = divmod(time_ns, _NS)


def _as_count(value: Any) -> int:
    """Falco sends these counters as strings of digits; be strict but never crash."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, float):
        return max(int(value), 0)
    if isinstance(value, str):
        try:
            return max(int(value.strip() or 0), 0)
        except ValueError:
            return 0
    return 0


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes"}
    return bool(value)


def syscall_drop_report(alert: Alert, origin: str) -> drops_pb2.DropReport:
    """Falco's ``syscall event drop`` alert: one-second deltas ending at the alert's time."""
    fields = alert.output_fields
    detail = drops_pb2.SyscallEventDrops(
        ebpf_enabled=_as_bool(fields.get("ebpf_enabled", False)),
        **{name: _as_count(fields.get(name)) for name in SYSCALL_DROP_COUNTERS},
    )
    report = drops_pb2.DropReport(
        kind=drops_pb2.DROP_KIND_SYSCALL_EVENT,
        hostname=alert.hostname,
        origin=origin,
        dropped=detail.n_drops,
        syscall_event=detail,
    )
    _set_time(report.window_start, alert.time_ns - _NS)
    _set_time(report.window_end, alert.time_ns)
    return report


class OutputsQueueTracker:
    """Turns the ``falco.outputs_queue_num_drops`` totals of metrics snapshots into deltas, per host."""

    def __init__(self) -> None:
        self._previous: dict[str, tuple[int, int]] = {}

    def observe(self, alert: Alert, origin: str) -> drops_pb2.DropReport | None:
        if OUTPUTS_QUEUE_DROPS_FIELD not in alert.output_fields:
            return None
        total = _as_count(alert.output_fields[OUTPUTS_QUEUE_DROPS_FIELD])
        previous = self._previous.get(alert.hostname)
        self._previous[alert.hostname] = (total, alert.time_ns)
        if previous is None:
            return None  # the first snapshot we see is only a baseline
        previous_total, previous_time = previous
        # A smaller total means Falco restarted and its counter began again.
        delta = total - previous_total if total >= previous_total else total
        if delta == 0:
            return None
        report = drops_pb2.DropReport(
            kind=drops_pb2.DROP_KIND_OUTPUTS_QUEUE,
            hostname=alert.hostname,
            origin=origin,
            dropped=delta,
            outputs_queue=drops_pb2.OutputsQueueDrops(delta=delta, total=total),
        )
        _set_time(report.window_start, previous_time)
        _set_time(report.window_end, alert.time_ns)
        return report


class DropAlertInterpreter:
    """Reads every ingested alert once and returns the drop report it implies, if any."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self._outputs_queue = OutputsQueueTracker()

    def interpret(self, alert: Alert) -> drops_pb2.DropReport | None:
        if not alert.is_internal:
            return None
        if alert.rule == SYSCALL_DROP_RULE:
            return syscall_drop_report(alert, self.origin)
        if alert.rule == METRICS_SNAPSHOT_RULE:
            return self._outputs_queue.observe(alert, self.origin)
        return None


def subscriber_overflow_report(
    gap: Gap, *, peer: str, method: str, hostname: str, origin: str
) -> drops_pb2.DropReport:
    report = drops_pb2.DropReport(
        kind=drops_pb2.DROP_KIND_SUBSCRIBER_OVERFLOW,
        hostname=hostname,
        origin=origin,
        dropped=gap.missed,
        subscriber_overflow=drops_pb2.SubscriberOverflow(peer=peer, method=method, missed=gap.missed),
    )
    _set_time(report.window_start, int(gap.first_time * _NS))
    _set_time(report.window_end, int(gap.last_time * _NS))
    return report


def ingest_rejected_report(
    by_reason: Mapping[str, int], *, start_ns: int, end_ns: int, hostname: str, origin: str
) -> drops_pb2.DropReport:
    report = drops_pb2.DropReport(
        kind=drops_pb2.DROP_KIND_INGEST_REJECTED,
        hostname=hostname,
        origin=origin,
        dropped=sum(by_reason.values()),
        ingest_rejected=drops_pb2.IngestRejected(by_reason=dict(by_reason)),
    )
    _set_time(report.window_start, start_ns)
    _set_time(report.window_end, end_ns)
    return report
