"""Transport security shared by every falco-api server and client.

The rule, inherited from Falco's own gRPC server: a ``unix://`` address is local
and unauthenticated (file permissions guard it); any TCP address requires
mutual TLS, unless the operator of the process explicitly says ``--insecure``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

UNIX_PREFIX = "unix://"


class TlsConfigError(ValueError):
    """The combination of address, certificates and --insecure is not allowed."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: this side's certificate and key, and the CA that signs the peer's."""

    cert: str
    key: str
    ca: str

    def read(self) -> tuple[bytes, bytes, bytes]:
        contents = []
        for label, path in (("certificate", self.cert), ("key", self.key), ("CA", self.ca)):
            try:
                contents.append(Path(path).read_bytes())
            except OSError as error:
                raise TlsConfigError(f"cannot read TLS {label} file {path!r}: {error.strerror}") from error
        return contents[0], contents[1], contents[2]

    @classmethod
    def from_flags(cls, cert: str | None, key: str | None, ca: str | None) -> TlsFiles | None:
        given = [
            flag for flag, value in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)) if value
        ]
        if not given:
            return None
        if len(given) != 3:
            missing = sorted({"--tls-cert", "--tls-key", "--tls-ca"} - set(given))
            raise TlsConfigError(
                f"mutual TLS needs all three of --tls-cert, --tls-key, --tls-ca; missing {missing}"
            )
        assert cert and key and ca
        return cls(cert=cert, key=key, ca=ca)


def is_unix(address: str) -> bool:
    return address.startswith(UNIX_PREFIX)


def check_transport(address: str, tls: TlsFiles | None, insecure: bool) -> None:
    """Refuse plain TCP unless explicitly allowed; warn loudly when it is."""
    if is_unix(address):
        return
    if tls is None and not insecure:
        raise TlsConfigError(
            f"refusing plain TCP on {address}: give --tls-cert, --tls-key and --tls-ca for mutual TLS, "
            "or use a unix:// address, or pass --insecure (never in production)"
        )
    if tls is None:
        log.warning(
            "INSECURE: %s uses plain TCP without authentication or encryption (--insecure); "
            "anyone who can reach it can read alerts and, with write access, change Falco's rules",
            address,
        )


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """Server side of mutual TLS: clients must present a certificate signed by ``tls.ca``."""
    cert, key, ca = tls.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def client_channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    cert, key, ca = tls.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def open_channel(
    address: str,
    *,
    tls: TlsFiles | None,
    insecure: bool = False,
    server_name: str | None = None,
    options: list[tuple[str, str | int]] | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel to ``unix:///path`` or ``host:port``, secured by the same rule as servers.

    ``server_name`` overrides the name checked against the server certificate, for
    sidecars reached by pod IP whose certificates name a Service or the node.
    """
    check_transport(address, tls, insecure)
    channel_options: list[tuple[str, str | int]] = list(options or [])
    if is_unix(address) or tls is None:
        return grpc.aio.insecure_channel(address, options=channel_options)
    if server_name:
        channel_options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(address, client_channel_credentials(tls), options=channel_options)


def add_listener(server: grpc.aio.Server, address: str, *, tls: TlsFiles | None, insecure: bool) -> int:
    """Bind ``server`` to ``address`` under the transport rule; returns the bound TCP port (0 for unix)."""
    check_transport(address, tls, insecure)
    if is_unix(address):
        Path(address[len(UNIX_PREFIX) :]).parent.mkdir(parents=True, exist_ok=True)
        return server.add_insecure_port(address)
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(tls))
