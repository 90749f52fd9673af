"""The HTTP endpoint Falco's ``http_output`` posts alerts to (falcosidekick's job, port 2801).

One JSON alert per POST. Anything else gets a 4xx with the reason and is
counted; nothing a client sends can crash the process.
"""

from __future__ import annotations

import logging

from aiohttp import web

from falco_api.alerts import AlertError, parse_alert
from falco_api.streams import EventStreams

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 1024 * 1024
_JSON_TYPES = {"application/json", "application/octet-stream", ""}
STREAMS_KEY = web.AppKey("streams", EventStreams)
MAX_BODY_KEY = web.AppKey("max_body", int)


def _refuse(streams: EventStreams, status: int, reason: str, message: str) -> web.Response:
    streams.reject(reason)
    return web.json_response({"error": reason, "message": message}, status=status)


async def _post_alert(request: web.Request) -> web.Response:
    streams = request.app[STREAMS_KEY]
    if request.content_type not in _JSON_TYPES:
        return _refuse(
            streams, 415, "bad_content_type", f"expected application/json, got {request.content_type}"
        )
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _refuse(streams, 413, "too_large", f"alert body larger than {request.app[MAX_BODY_KEY]} bytes")
    try:
        alert = parse_alert(body)
    except AlertError as error:
        return _refuse(streams, 400, error.reason, str(error))
    streams.ingest(alert)
    return web.Response(status=204)


async def _healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def ingest_app(streams: EventStreams, *, max_body: int = DEFAULT_MAX_BODY) -> web.Application:
    app = web.Application(client_max_size=max_body)
    app[STREAMS_KEY] = streams
    app[MAX_BODY_KEY] = max_body
    app.router.add_get("/healthz", _healthz)
    # Falco posts to whatever path http_output.url names; "/" is the usual one.
    app.router.add_post("/{tail:.*}", _post_alert)
    return app
