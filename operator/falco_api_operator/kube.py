"""The one Kubernetes write kopf does not do for us: status patches outside of handlers.

It reuses the credentials kopf logged in with (a :class:`kopf.ConnectionInfo`), so
there is a single source of truth for where the API server is and who we are.
"""

from __future__ import annotations

import base64
import datetime
import json
import ssl
import tempfile
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf

from .desired import GROUP, VERSION


class StatusWriteError(RuntimeError):
    pass


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    context = ssl.create_default_context()
    if info.ca_path:
        context.load_verify_locations(cafile=str(info.ca_path))
    elif info.ca_data:
        pem = info.ca_data.decode() if isinstance(info.ca_data, bytes) else str(info.ca_data)
        if "BEGIN CERTIFICATE" not in pem:
            pem = base64.b64decode(pem).decode()
        context.load_verify_locations(cadata=pem)
    if info.certificate_path and info.private_key_path:
        context.load_cert_chain(str(info.certificate_path), str(info.private_key_path))
    elif info.certificate_data and info.private_key_data:
        # ssl can only load client certificates from files.
        with tempfile.NamedTemporaryFile("wb") as cert, tempfile.NamedTemporaryFile("wb") as key:
            for handle, data in ((cert, info.certificate_data), (key, info.private_key_data)):
                raw = data.encode() if isinstance(data, str) else data
                handle.write(raw if b"BEGIN" in raw else base64.b64decode(raw))
                handle.flush()
            context.load_cert_chain(cert.name, key.name)
    return context


class StatusClient:
    def __init__(self, info: kopf.ConnectionInfo, timeout: float = 10.0) -> None:
        self._info = info
        headers = {"Content-Type": "application/merge-patch+json"}
        self.authorization = f"{info.scheme or 'Bearer'} {info.token}" if info.token else None
        if self.authorization:
            headers["Authorization"] = self.authorization
        auth = aiohttp.BasicAuth(info.username, info.password or "") if info.username else None
        self._session = aiohttp.ClientSession(
            base_url=info.server.rstrip("/") + "/",
            headers=headers,
            auth=auth,
            connector=aiohttp.TCPConnector(ssl=_ssl_context(info)),
            timeout=aiohttp.ClientTimeout(total=timeout),
        )

    async def patch_status(self, plural: str, name: str, status: dict[str, Any]) -> None:
        url = f"apis/{GROUP}/{VERSION}/{plural}/{name}/status"
        async with self._session.patch(url, data=json.dumps({"status": status})) as response:
            if response.status == 404:
                return  # deleted meanwhile: nothing left to report on
            if response.status >= 400:
                raise StatusWriteError(
                    f"PATCH {url}: HTTP {response.status}: {(await response.text())[:300]}"
                )

    async def post_event(
        self, namespace: str, reference: Mapping[str, Any], reason: str, message: str, *, warning: bool
    ) -> None:
        """A core/v1 Event about a custom resource (cluster-scoped: posted in our own namespace)."""
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        meta = reference.get("metadata") or {}
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name', 'falco-api')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": reference.get("apiVersion"),
                "kind": reference.get("kind"),
                "name": meta.get("name"),
                "uid": meta.get("uid"),
            },
            "reason": reason,
            # The API server refuses Event messages over 1 KiB.
            "message": message[:1000],
            "type": "Warning" if warning else "Normal",
            "source": {"component": "falco-api-operator"},
            "reportingComponent": "falco-api-operator",
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        url = f"api/v1/namespaces/{namespace}/events"
        headers = {"Content-Type": "application/json"}
        async with self._session.post(url, data=json.dumps(event), headers=headers) as response:
            if response.status >= 400:
                raise StatusWriteError(f"POST {url}: HTTP {response.status}: {(await response.text())[:300]}")

    async def close(self) -> None:
        await self._session.close()
