"""Falco's embedded webserver (``/healthz``, ``/versions``, ``/metrics``) as the sidecar reads it."""

from __future__ import annotations

import re
from typing import Any

import aiohttp

from falco_api import __version__
from falco_api.contract.falco import version_pb2
from falco_api.servicers import Unavailable

_SEMVER = re.compile(
    r"^v?(?P<major>0|[1-9]\d*)\.(?P<minor>0|[1-9]\d*)\.(?P<patch>0|[1-9]\d*)"
    r"(?:-(?P<prerelease>[0-9A-Za-z.-]+))?(?:\+(?P<build>[0-9A-Za-z.-]+))?$"
)
_MAX_BODY = 4 * 1024 * 1024


class FalcoVersionError(ValueError):
    """``/versions`` answered, but not with what Falco documents."""


def parse_semver(text: str) -> tuple[int, int, int, str, str]:
    match = _SEMVER.match(text.strip())
    if not match:
        raise FalcoVersionError(f"{text!r} is not a semantic version")
    return (
        int(match["major"]),
        int(match["minor"]),
        int(match["patch"]),
        match["prerelease"] or "",
        match["build"] or "",
    )


def version_response(versions: Any, *, hostname: str) -> version_pb2.response:
    """Map Falco's ``/versions`` JSON (the JSON of ``falco --version``) to the version response."""
    if not isinstance(versions, dict) or not isinstance(versions.get("falco_version"), str):
        raise FalcoVersionError("Falco's /versions did not answer an object with a 'falco_version' string")
    major, minor, patch, prerelease, build = parse_semver(versions["falco_version"])
    response = version_pb2.response(
        version=versions["falco_version"],
        major=major,
        minor=minor,
        patch=patch,
        prerelease=prerelease,
        build=build,
        api_version=__version__,
        hostname=hostname,
    )
    engine_semver = versions.get("engine_version_semver")
    if isinstance(engine_semver, str) and engine_semver:
        engine_major, engine_minor, engine_patch, _, _ = parse_semver(engine_semver)
        response.engine_version = engine_semver
        response.engine_major, response.engine_minor, response.engine_patch = (
            engine_major,
            engine_minor,
            engine_patch,
        )
    else:
        # Older Falcos publish only the engine's minor number, as a string.
        engine_minor_text = str(versions.get("engine_version", ""))
        if not engine_minor_text.isdigit():
            raise FalcoVersionError(f"Falco's /versions has no usable engine version: {engine_minor_text!r}")
        response.engine_minor = int(engine_minor_text)
        response.engine_version = f"0.{engine_minor_text}.0"
    for key in (
        "libs_version",
        "plugin_api_version",
        "driver_api_version",
        "driver_schema_version",
        "default_driver_version",
    ):
        value = versions.get(key)
        if isinstance(value, str):
            setattr(response, key, value)
    plugins = versions.get("plugin_versions")
    if isinstance(plugins, dict):
        for name, plugin_version in plugins.items():
            response.plugin_versions[str(name)] = str(plugin_version)
    return response


class FalcoWebClient:
    """Reads Falco's webserver. Every failure becomes :class:`Unavailable` with the reason."""

    def __init__(self, base_url: str, *, timeout: float = 3.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def _get(self, path: str) -> bytes:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        url = f"{self.base_url}{path}"
        try:
            async with self._session.get(url) as reply:
                if reply.status != 200:
                    raise Unavailable(f"Falco's webserver answered {reply.status} for {url}")
                body = await reply.content.read(_MAX_BODY + 1)
                if len(body) > _MAX_BODY:
                    raise Unavailable(f"Falco's webserver answer for {url} is larger than {_MAX_BODY} bytes")
                return body
        except (aiohttp.ClientError, TimeoutError) as error:
            raise Unavailable(
                f"cannot reach Falco's webserver at {url}: {error or type(error).__name__}"
            ) from None

    async def versions(self) -> Any:
        import json

        body = await self._get("/versions")
        try:
            return json.loads(body)
        except ValueError as error:
            raise Unavailable(f"Falco's /versions is not JSON: {error}") from None

    async def metrics(self) -> str:
        return (await self._get("/metrics")).decode("utf-8", errors="replace")

    async def healthy(self) -> bool:
        try:
            await self._get("/healthz")
        except Unavailable:
            return False
        return True

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
