"""A stand-in for the webhook of Falco's k8saudit plugin, for tests.

It behaves like the plugin's webhook: ``POST <path>`` with a JSON content type and a body within
the batch limit is answered 200 *before* the body is parsed; payloads that are not an audit
``Event`` or ``EventList`` (or events without a valid ``stageTimestamp``) are then only logged
and dropped by the plugin, which is why the sidecar validates before forwarding. Other methods
get 405, other content types 400, oversized bodies 400.

For tests it records every event it took and every payload it dropped, tracks how many requests
were in progress at once, and can be made slow, failing (5xx) or strict (400 on malformed payloads).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

DEFAULT_PATH = "/k8s-audit"
# The plugin's defaults: webhookMaxBatchSize and maxEventSize.
DEFAULT_MAX_BATCH_BYTES = 12 * 1024 * 1024
DEFAULT_MAX_EVENT_BYTES = 262_144


@dataclass(frozen=True)
class DroppedPayload:
    reason: str
    size: int


def _parse_rfc3339(text: Any) -> bool:
    if not isinstance(text, str):
        return False
    try:
        datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def audit_events_of(
    payload: Any, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
) -> tuple[list[Any], list[str]]:
    """What the plugin takes from one payload: (events kept, errors for the ones it drops)."""
    if isinstance(payload, list):
        kept: list[Any] = []
        errors: list[str] = []
        for value in payload:
            more_kept, more_errors = audit_events_of(value, max_event_bytes=max_event_bytes)
            kept += more_kept
            errors += more_errors
        return kept, errors
    kind = payload.get("kind") if isinstance(payload, dict) else None
    if kind == "EventList" and isinstance(payload.get("items"), list):
        candidates = list(payload["items"])
    elif kind == "Event":
        candidates = [payload]
    else:
        return [], ["data not recognized as a k8s audit event"]
    kept, errors = [], []
    for event in candidates:
        if not isinstance(event, dict) or "stageTimestamp" not in event:
            errors.append("can't read stageTimestamp")
        elif not _parse_rfc3339(event["stageTimestamp"]):
            errors.append("bad stageTimestamp")
        elif len(json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()) > max_event_bytes:
            errors.append("event larger than maxEventSize")
        else:
            kept.append(event)
    return kept, errors


class K8sAuditDouble:
    def __init__(
        self,
        *,
        path: str = DEFAULT_PATH,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        self.path = path
        self.max_batch_bytes = max_batch_bytes
        self.max_event_bytes = max_event_bytes
        self.events: list[Any] = []
        self.dropped: list[DroppedPayload] = []
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        # Knobs for tests.
        self.delay = 0.0
        self.fail_status: int | None = None
        self.strict = False
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_batch_bytes + 1)
        app.router.add_route("*", self.path, self._webhook)
        return app

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    async def _webhook(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                # stop() cuts the wait short, so a slow double never holds up a test's teardown.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.delay)
            return await self._answer(request)
        except ConnectionResetError:
            return web.Response(status=499, text="client went away")
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.Response:
        if request.method != "POST":
            return web.Response(status=405, text=f"{request.method} method not allowed")
        if "application/json" not in request.headers.get("Content-Type", ""):
            return web.Response(status=400, text="wrong Content Type")
        body = await request.content.read(self.max_batch_bytes + 1)
        if len(body) > self.max_batch_bytes:
            return web.Response(status=400, text="bad request: http: request body too large")
        if self.fail_status is not None:
            return web.Response(status=self.fail_status, text="k8saudit double told to fail")
        try:
            payload = json.loads(body)
        except ValueError as error:
            return self._drop(f"malformed JSON: {error}", len(body))
        kept, errors = audit_events_of(payload, max_event_bytes=self.max_event_bytes)
        if errors and self.strict:
            return web.Response(status=400, text="; ".join(errors))
        self.events.extend(kept)
        for problem in errors:
            self.dropped.append(DroppedPayload(problem, len(body)))
        return web.Response(status=200)

    def _drop(self, reason: str, size: int) -> web.Response:
        if self.strict:
            return web.Response(status=400, text=reason)
        self.dropped.append(DroppedPayload(reason, size))
        return web.Response(status=200)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._stopping = asyncio.Event()
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else port
        return self.port

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
