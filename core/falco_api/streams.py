"""The alert and drop streams of one origin: what the sidecar ingests, what subscribers read.

:class:`EventStreams` numbers each alert, serialises it once, publishes it on
the alerts hub and derives drop reports from Falco's internal alerts and from
our own losses. It has no sockets: the ingest endpoint and the gRPC servicers
call into it.
"""

from __future__ import annotations

import time
from collections import Counter

from falco_api.alerts import Alert
from falco_api.contract.falco.api import drops_pb2
from falco_api.drops import DropAlertInterpreter, ingest_rejected_report, subscriber_overflow_report
from falco_api.hub import Entry, Gap, Hub, Sequencer, Subscription

DEFAULT_REPLAY_SIZE = 10_000
DEFAULT_QUEUE_SIZE = 10_000
DEFAULT_DROPS_REPLAY_SIZE = 1_000


class EventStreams:
    def __init__(
        self,
        *,
        origin: str,
        hostname: str,
        replay_size: int = DEFAULT_REPLAY_SIZE,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        drops_replay_size: int = DEFAULT_DROPS_REPLAY_SIZE,
    ) -> None:
        self.origin = origin
        self.hostname = hostname
        self.alerts: Hub[Alert] = Hub(
            replay_size=replay_size, queue_size=queue_size, on_gap_delivered=self._report_overflow
        )
        self.drops: Hub[drops_pb2.DropReport] = Hub(
            replay_size=drops_replay_size, queue_size=queue_size, on_gap_delivered=self._report_overflow
        )
        self._alert_seq = Sequencer(origin)
        self._drop_seq = Sequencer(origin)
        self._interpreter = DropAlertInterpreter(origin)
        self.rejected: Counter[str] = Counter()
        self._rejected_unreported: Counter[str] = Counter()
        self._rejected_window_start_ns = time.time_ns()

    def ingest(self, alert: Alert) -> Entry[Alert]:
        """Number, serialise and publish one alert; publish the drop report it implies."""
        seq = self._alert_seq.next()
        payload = alert.to_payload(seq=seq, origin=self.origin)
        entry = Entry(seq, self.origin, alert.without_fields(), payload)
        self.alerts.publish(entry)
        report = self._interpreter.interpret(alert)
        if report is not None:
            self.publish_drop(report)
        return entry

    def publish_drop(self, report: drops_pb2.DropReport) -> None:
        seq = self._drop_seq.next()
        self.drops.publish(Entry(seq, self.origin, report, report.SerializeToString()))

    def reject(self, reason: str) -> None:
        """Count an alert refused at ingest; reported on the drops stream by :meth:`flush_rejections`."""
        self.rejected[reason] += 1
        self._rejected_unreported[reason] += 1

    def flush_rejections(self) -> drops_pb2.DropReport | None:
        """Publish one report of the rejections since the last one (called periodically)."""
        now = time.time_ns()
        if not self._rejected_unreported:
            self._rejected_window_start_ns = now
            return None
        report = ingest_rejected_report(
            self._rejected_unreported,
            start_ns=self._rejected_window_start_ns,
            end_ns=now,
            hostname=self.hostname,
            origin=self.origin,
        )
        self._rejected_unreported = Counter()
        self._rejected_window_start_ns = now
        self.publish_drop(report)
        return report

    def close(self) -> None:
        self.alerts.close()
        self.drops.close()

    def _report_overflow(
        self, subscription: Subscription[Alert] | Subscription[drops_pb2.DropReport], gap: Gap
    ) -> None:
        self.publish_drop(
            subscriber_overflow_report(
                gap,
                peer=subscription.peer,
                method=subscription.method,
                hostname=self.hostname,
                origin=self.origin,
            )
        )
