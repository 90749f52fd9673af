"""The wire form of falco.api.OutputsBatch, built from and split into already-serialised responses.

A batch is its responses' bytes, each framed as field 1 (length-delimited), exactly what protobuf
would encode: building one costs a few bytes per alert and nobody re-serialises the alerts.
"""

from __future__ import annotations

from collections.abc import Iterable

from falco_api.alerts import varint

_ITEM_TAG = bytes([(1 << 3) | 2])


class BatchError(ValueError):
    """Bytes that are not an OutputsBatch of field-1 items."""


def frame(payloads: Iterable[bytes]) -> bytes:
    parts: list[bytes] = []
    for payload in payloads:
        parts.append(_ITEM_TAG)
        parts.append(varint(len(payload)))
        parts.append(payload)
    return b"".join(parts)


def unframe(message: bytes) -> list[bytes]:
    """The serialised responses of one OutputsBatch, in order, without parsing them."""
    items: list[bytes] = []
    position, end = 0, len(message)
    while position < end:
        if message[position] != _ITEM_TAG[0]:
            raise BatchError(f"unexpected field tag {message[position]} at byte {position}")
        position += 1
        length = shift = 0
        while True:
            if position >= end or shift > 63:
                raise BatchError("truncated length")
            byte = message[position]
            position += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        if position + length > end:
            raise BatchError("truncated item")
        items.append(message[position : position + length])
        position += length
    return items
