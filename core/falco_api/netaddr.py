"""``host:port`` strings as the command-line flags take them."""

from __future__ import annotations


def split_host_port(address: str, *, flag: str) -> tuple[str, int]:
    """``127.0.0.1:2801`` or ``[::1]:2801`` -> (host, port); a clear error otherwise."""
    host, separator, port_text = address.rpartition(":")
    if not separator or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{flag} must be host:port (e.g. 127.0.0.1:2801), got {address!r}")
    return host.strip("[]"), int(port_text)
