"""The one Kubernetes write kopf does not do for us: status patches outside of handlers.

It reuses the credentials kopf logged in with (a :class:`kopf.ConnectionInfo`), so
there is a single source of truth for where the API server is and who we are.
"""

from __future__ import annotations

import base64
import json
import ssl
import tempfile
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
        if info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
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

    async def close(self) -> None:
        await self._session.close()
