"""The ingest endpoint takes exactly what Falco's http_output sends, and refuses the rest clearly."""

from __future__ import annotations

import json

import aiohttp
import pytest

from falco_api.testing.falco_double import AlertPoster, alert_mix, rule_alert
from tests.conftest import RunningSidecar

GOOD = rule_alert("node-a", index=0)


@pytest.mark.parametrize(
    ("body", "content_type", "status", "reason"),
    [
        (b"{not json", "application/json", 400, "bad_json"),
        (b"[1]", "application/json", 400, "not_an_object"),
        (json.dumps(GOOD | {"priority": "Severe"}).encode(), "application/json", 400, "unknown_priority"),
        (json.dumps(GOOD | {"rule": ["x"]}).encode(), "application/json", 400, "wrong_type"),
        (json.dumps(GOOD | {"time": 17}).encode(), "application/json", 400, "wrong_type"),
        (
            json.dumps({k: v for k, v in GOOD.items() if k != "rule"}).encode(),
            "application/json",
            400,
            "missing_field",
        ),
        (json.dumps(GOOD).encode(), "text/html", 415, "bad_content_type"),
        (b"{" + b" " * (2 * 1024 * 1024) + b"}", "application/json", 413, "too_large"),
        # A lone UTF-16 surrogate parses as JSON but cannot be encoded: refused before it is numbered.
        (json.dumps(GOOD | {"output": "\ud800"}).encode(), "application/json", 400, "bad_json"),
    ],
)
async def test_malformed_posts_get_4xx_and_are_counted(
    sidecar: RunningSidecar, body: bytes, content_type: str, status: int, reason: str
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(sidecar.ingest_url, data=body, headers={"Content-Type": content_type}) as reply,
    ):
        assert reply.status == status
        if status != 413:
            answer = await reply.json()
            assert answer["error"] == reason and answer["message"]
    assert sidecar.sidecar.streams.rejected[reason] == 1
    assert sidecar.sidecar.streams.alerts.stats.published == 0
    # Still serving.
    assert await sidecar.post(GOOD) == 204
    assert sidecar.sidecar.streams.alerts.stats.published == 1


async def test_the_double_posts_like_falco_and_every_alert_is_accepted(sidecar: RunningSidecar) -> None:
    poster = AlertPoster(sidecar.ingest_url)
    mix = alert_mix("node-a")
    for _ in range(120):
        assert await poster.post(next(mix)) == 204
    await poster.close()
    assert sidecar.sidecar.streams.alerts.stats.published == 120
    assert not sidecar.sidecar.streams.rejected


async def test_healthz_and_metrics(sidecar: RunningSidecar) -> None:
    await sidecar.post(GOOD)
    await sidecar.post(None, raw=b"nope")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{sidecar.sidecar.ingest_port}/healthz") as reply:
            assert await reply.json() == {"status": "ok"}
        async with session.get(f"http://127.0.0.1:{sidecar.sidecar.metrics_port}/metrics") as reply:
            text = await reply.text()
    assert "falco_api_alerts_ingested_total 1.0" in text
    assert 'falco_api_alerts_rejected_total{reason="bad_json"} 1.0' in text
    assert "falco_api_subscribers 0.0" in text
    assert 'falco_api_alerts_dropped_total{reason="subscriber_overflow"} 0.0' in text
