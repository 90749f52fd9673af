"""Prometheus metrics of the sidecar, read from the streams' own counters at scrape time.

Nothing is counted twice on the hot path: the hubs keep plain integers and
this collector turns them into metric families when Prometheus asks.
"""

from __future__ import annotations

from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from falco_api.streams import EventStreams


class StreamsCollector(Collector):
    def __init__(self, streams: EventStreams) -> None:
        self._streams = streams

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        alerts = self._streams.alerts
        yield CounterMetricFamily(
            "falco_api_alerts_ingested", "Alerts accepted from Falco", value=alerts.stats.published
        )
        rejected = CounterMetricFamily(
            "falco_api_alerts_rejected", "Alerts refused at ingest, by reason", labels=["reason"]
        )
        for reason, count in sorted(self._streams.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield CounterMetricFamily(
            "falco_api_alerts_delivered", "Alert deliveries to subscribers", value=alerts.stats.delivered
        )
        dropped = CounterMetricFamily(
            "falco_api_alerts_dropped", "Alert deliveries lost, by reason", labels=["reason"]
        )
        dropped.add_metric(["subscriber_overflow"], alerts.stats.dropped_overflow)
        yield dropped
        yield GaugeMetricFamily(
            "falco_api_subscribers", "Open alert subscriptions", value=len(alerts.subscriptions)
        )
        depths = alerts.queue_depths()
        yield GaugeMetricFamily(
            "falco_api_subscriber_queue_depth_max", "Deepest subscriber queue", value=max(depths, default=0)
        )
        yield GaugeMetricFamily(
            "falco_api_subscriber_queue_depth_total", "Alerts queued for all subscribers", value=sum(depths)
        )
        yield CounterMetricFamily(
            "falco_api_drop_reports", "Drop reports published", value=self._streams.drops.stats.published
        )


def metrics_app(streams: EventStreams, *more: Collector) -> web.Application:
    registry = CollectorRegistry()
    registry.register(StreamsCollector(streams))
    for collector in more:
        registry.register(collector)

    async def serve(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", serve)
    return app
