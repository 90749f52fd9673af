"""Falco's alert JSON in, the contract's protobuf out: parsed once, serialised once.

Falco's ``http_output`` POSTs one JSON object per alert (DESIGN.md, "Alerts").
:func:`parse_alert` checks it against that contract and builds an :class:`Alert`
whose protobuf bytes are computed once and then shared by every subscriber.
"""

from __future__ import annotations

import json
import re
import struct
from calendar import timegm
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import struct_pb2

from falco_api.contract.falco import outputs_pb2, schema_pb2

# Falco's priority names, most severe first; the index is the wire value.
PRIORITY_NAMES = ("Emergency", "Alert", "Critical", "Error", "Warning", "Notice", "Informational", "Debug")
_PRIORITY_BY_NAME = {name.lower(): number for number, name in enumerate(PRIORITY_NAMES)}
_PRIORITY_BY_NAME["info"] = _PRIORITY_BY_NAME["informational"]

_LEGACY_SOURCES = {
    "syscall": schema_pb2.SYSCALL,
    "k8s_audit": schema_pb2.K8S_AUDIT,
    "internal": schema_pb2.INTERNAL,
}

INTERNAL_SOURCE = "internal"

_TIME = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:?\d{2})$",
)
_INT64_MIN, _INT64_MAX, _UINT64_MAX = -(2**63), 2**63 - 1, 2**64 - 1


class AlertError(ValueError):
    """An alert that does not follow Falco's JSON contract.

    ``reason`` is a short stable code (used as a metrics label); the message says
    exactly what is wrong.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_priority(text: str) -> int:
    """Falco priority name (any case, ``INFO`` included) to its wire number."""
    try:
        return _PRIORITY_BY_NAME[text.strip().lower()]
    except KeyError:
        raise AlertError(
            "unknown_priority", f"unknown priority {text!r}; expected one of {', '.join(PRIORITY_NAMES)}"
        ) from None


def parse_time(text: str) -> tuple[int, int]:
    """ISO-8601 (Falco prints UTC with nanoseconds) to (seconds, nanos) since the epoch."""
    match = _TIME.match(text)
    if not match:
        raise AlertError("bad_time", f"time {text!r} is not ISO-8601 like 2024-05-01T12:00:00.123456789Z")
    year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
    fraction, zone = match.group(7) or "", match.group(8)
    try:
        seconds = timegm((year, month, day, hour, minute, second, 0, 0, 0))
    except (ValueError, OverflowError) as error:
        raise AlertError("bad_time", f"time {text!r} is out of range: {error}") from None
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 61):
        raise AlertError("bad_time", f"time {text!r} has a field out of range")
    if zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        seconds -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return seconds, int(fraction.ljust(9, "0")) if fraction else 0


def field_value(value: Any) -> outputs_pb2.FieldValue:
    """A JSON value from ``output_fields`` as a lossless FieldValue."""
    if value is None:
        return outputs_pb2.FieldValue(null_value=struct_pb2.NULL_VALUE)
    if isinstance(value, bool):
        return outputs_pb2.FieldValue(bool_value=value)
    if isinstance(value, int):
        if _INT64_MIN <= value <= _INT64_MAX:
            return outputs_pb2.FieldValue(int_value=value)
        if 0 <= value <= _UINT64_MAX:
            return outputs_pb2.FieldValue(uint_value=value)
        return outputs_pb2.FieldValue(json_value=str(value))
    if isinstance(value, float):
        return outputs_pb2.FieldValue(double_value=value)
    if isinstance(value, str):
        return outputs_pb2.FieldValue(string_value=value)
    if isinstance(value, list):
        return outputs_pb2.FieldValue(
            list_value=outputs_pb2.FieldValueList(values=[field_value(item) for item in value])
        )
    return outputs_pb2.FieldValue(json_value=json.dumps(value, separators=(",", ":"), sort_keys=True))


def field_text(value: Any) -> str:
    """A JSON value from ``output_fields`` as the legacy string map shows it (Falco's formatting)."""
    if value is None:
        return "<NA>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


# --- output_fields straight to protobuf wire bytes ----------------------------------------------
# Building the two maps through the protobuf runtime costs ~2.5 us per field and alert (most of
# the sidecar's per-alert CPU). Falco's field values repeat a lot (user, process, container,
# namespace names), so each (name, value) pair is encoded once, by hand, to the bytes of its
# two map entries and cached; a hit is two dict lookups. Only short names with small scalars
# are cached, at most _CACHED_VALUES_PER_NAME values for at most _CACHED_NAMES_MAX names, so
# memory stays bounded (< 20 MB) whatever the alerts contain. Protobuf parsers merge
# repeated map fields, so these bytes appended to the rest of the message are the same message
# as the one to_response builds (tests check it field for field).

_OUTPUT_FIELDS_TAG = b"\x32"  # field 6, length-delimited
_TYPED_OUTPUT_FIELDS_TAG = b"\x62"  # field 12, length-delimited
_CACHED_NAMES_MAX = 512
_CACHED_VALUES_PER_NAME = 64
_CACHED_LENGTH_MAX = 256
# name -> {(type, value): entry bytes}, or None once the name has shown too many distinct values
# (evt.time, proc.cmdline, ...): those are encoded every time instead of churning the cache.
_field_cache: dict[str, dict[tuple[type, Any], bytes] | None] = {}
_pack_double = struct.Struct("<d").pack


_ONE_BYTE_VARINTS = [bytes((n,)) for n in range(0x80)]


def varint(number: int) -> bytes:
    """Protobuf's base-128 encoding of a non-negative integer."""
    if number < 0x80:
        return _ONE_BYTE_VARINTS[number]
    out = bytearray()
    while number > 0x7F:
        out.append((number & 0x7F) | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


def _length_delimited(tag: bytes, data: bytes) -> bytes:
    return tag + varint(len(data)) + data


def _field_value_bytes(value: Any) -> bytes:
    """The wire bytes of field_value(value), without the protobuf runtime for scalars."""
    kind = type(value)
    if kind is str:
        return _length_delimited(b"\x12", value.encode())
    if kind is int:
        if _INT64_MIN <= value <= _INT64_MAX:
            return b"\x18" + varint((value << 1) ^ (value >> 63))  # sint64: zigzag
        if 0 <= value <= _UINT64_MAX:
            return b"\x20" + varint(value)
    elif value is None:
        return b"\x08\x00"  # null_value, written although 0: it is a oneof member
    elif kind is bool:
        return b"\x30\x01" if value else b"\x30\x00"
    elif kind is float:
        return b"\x29" + _pack_double(value)
    return field_value(value).SerializeToString()


def _field_entries(name: str, value: Any) -> bytes:
    """This field's entry in output_fields followed by its entry in typed_output_fields."""
    key = _length_delimited(b"\x0a", name.encode())
    text = _length_delimited(b"\x12", field_text(value).encode())
    typed = _length_delimited(b"\x12", _field_value_bytes(value))
    return _length_delimited(_OUTPUT_FIELDS_TAG, key + text) + _length_delimited(
        _TYPED_OUTPUT_FIELDS_TAG, key + typed
    )


def output_fields_bytes(output_fields: dict[str, Any]) -> bytes:
    """``output_fields`` and ``typed_output_fields`` of a response, as wire bytes."""
    cache = _field_cache
    parts = []
    for name, value in output_fields.items():
        values = cache.get(name, _MISSING)
        if values is None:
            parts.append(_field_entries(name, value))
            continue
        kind = type(value)
        # Floats are not cached: 0.0 and -0.0 are equal keys but print differently.
        if not (
            (kind is str and len(value) <= _CACHED_LENGTH_MAX)
            or (kind is int and _INT64_MIN <= value <= _UINT64_MAX)
            or kind is bool
            or value is None
        ):
            parts.append(_field_entries(name, value))
            continue
        if values is _MISSING:
            if len(cache) >= _CACHED_NAMES_MAX or len(name) > _CACHED_LENGTH_MAX:
                parts.append(_field_entries(name, value))
                continue
            values = cache[name] = {}
        assert isinstance(values, dict)
        key = (kind, value)
        entries = values.get(key)
        if entries is None:
            entries = _field_entries(name, value)
            if len(values) >= _CACHED_VALUES_PER_NAME:
                cache[name] = None
            else:
                values[key] = entries
        parts.append(entries)
    return b"".join(parts)


_MISSING: Any = object()


@dataclass(slots=True)
class Alert:
    """One Falco alert, validated."""

    seconds: int
    nanos: int
    rule: str
    priority: int
    source: str
    hostname: str
    output: str = ""
    message: str = ""
    tags: tuple[str, ...] = ()
    output_fields: dict[str, Any] = field(default_factory=dict)

    def without_fields(self) -> Alert:
        """What the replay buffer keeps once the alert is serialised: what filters read, no field values.

        Thousands of buffered alerts with their nested field values would be walked by every full
        garbage collection; the serialised bytes already hold them.
        """
        # Built directly: dataclasses.replace costs several times more, once per alert.
        return Alert(
            self.seconds,
            self.nanos,
            self.rule,
            self.priority,
            self.source,
            self.hostname,
            self.output,
            self.message,
            self.tags,
        )

    @property
    def is_internal(self) -> bool:
        return self.source == INTERNAL_SOURCE

    @property
    def time_ns(self) -> int:
        return self.seconds * 1_000_000_000 + self.nanos

    def to_response(self, *, seq: int = 0, origin: str = "") -> outputs_pb2.response:
        response = outputs_pb2.response(
            priority=self.priority,  # type: ignore[arg-type]
            source_deprecated=_LEGACY_SOURCES.get(self.source, schema_pb2.PLUGIN),
            rule=self.rule,
            output=self.output,
            hostname=self.hostname,
            tags=self.tags,
            source=self.source,
            seq=seq,
            origin=origin,
            message=self.message,
        )
        response.time.seconds = self.seconds
        response.time.nanos = self.nanos
        for name, value in self.output_fields.items():
            response.output_fields[name] = field_text(value)
            response.typed_output_fields[name].CopyFrom(field_value(value))
        return response

    def to_payload(self, *, seq: int = 0, origin: str = "") -> bytes:
        """``to_response(...).SerializeToString()``, parsed to the same message, at a fraction of the cost.

        Encoded by hand (field numbers from proto/falco/outputs.proto), proto3 style: fields
        at their default value are left out, except ``time``, which to_response always sets.
        """
        seconds = self.seconds
        time_body = (_varint_tag(0x08, seconds if seconds >= 0 else seconds + 2**64) if seconds else b"") + (
            _varint_tag(0x10, self.nanos) if self.nanos else b""
        )
        # Fields 2-4 and 7-9 are in field-number order around output (5); parsers accept any order.
        return b"".join(
            (
                _length_delimited(b"\x0a", time_body),
                _rule_fields(self.priority, self.source, self.rule, self.hostname, self.tags),
                _string_field(b"\x2a", self.output),
                _varint_tag(0x50, seq) if seq else b"",
                _string_field(b"\x5a", origin),
                _string_field(b"\x6a", self.message),
                output_fields_bytes(self.output_fields),
            )
        )


_RULE_FIELDS_MAX = 4096
_RULE_FIELDS_CACHED_BYTES = 2048
_rule_fields_cache: dict[tuple[int, str, str, str, tuple[str, ...]], bytes] = {}


def _rule_fields(priority: int, source: str, rule: str, hostname: str, tags: tuple[str, ...]) -> bytes:
    """priority, source_deprecated, rule, hostname, tags and source: the same for every alert of a
    rule on a host, so encoded once per combination (bounded: the table is emptied when full)."""
    key = (priority, source, rule, hostname, tags)
    encoded = _rule_fields_cache.get(key)
    if encoded is None:
        legacy_source = _LEGACY_SOURCES.get(source, schema_pb2.PLUGIN)
        encoded = b"".join(
            (
                _varint_tag(0x10, priority) if priority else b"",
                _varint_tag(0x18, legacy_source) if legacy_source else b"",
                _string_field(b"\x22", rule),
                _string_field(b"\x3a", hostname),
                *(_length_delimited(b"\x42", tag.encode()) for tag in tags),
                _string_field(b"\x4a", source),
            )
        )
        if len(encoded) <= _RULE_FIELDS_CACHED_BYTES:  # keeps the table under ~16 MB
            if len(_rule_fields_cache) >= _RULE_FIELDS_MAX:
                _rule_fields_cache.clear()
            _rule_fields_cache[key] = encoded
    return encoded


def _varint_tag(tag: int, number: int) -> bytes:
    return _ONE_BYTE_VARINTS[tag] + varint(number)


def _string_field(tag: bytes, value: str) -> bytes:
    return _length_delimited(tag, value.encode()) if value else b""


def _require_str(data: dict[str, Any], key: str, *, optional: bool = False) -> str:
    value = data.get(key)
    if value is None:
        if optional:
            return ""
        raise AlertError("missing_field", f"alert has no {key!r} (Falco always sends it)")
    if not isinstance(value, str):
        raise AlertError("wrong_type", f"alert key {key!r} must be a string, got {type(value).__name__}")
    return value


def alert_from_object(data: Any) -> Alert:
    """Validate a decoded JSON value as one Falco alert."""
    if not isinstance(data, dict):
        raise AlertError("not_an_object", f"expected one alert as a JSON object, got {type(data).__name__}")
    seconds, nanos = parse_time(_require_str(data, "time"))
    priority = parse_priority(_require_str(data, "priority"))
    tags = data.get("tags", [])
    if tags is None:
        tags = []
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise AlertError("wrong_type", "alert key 'tags' must be an array of strings")
    output_fields = data.get("output_fields", {})
    if output_fields is None:
        output_fields = {}
    if not isinstance(output_fields, dict):
        raise AlertError("wrong_type", "alert key 'output_fields' must be an object")
    return Alert(
        seconds=seconds,
        nanos=nanos,
        rule=_require_str(data, "rule"),
        priority=priority,
        # Falco versions before plugins did not always send "source"; their alerts were syscall.
        source=_require_str(data, "source", optional=True) or "syscall",
        hostname=_require_str(data, "hostname", optional=True),
        output=_require_str(data, "output", optional=True),
        message=_require_str(data, "message", optional=True),
        tags=tuple(tags),
        output_fields=output_fields,
    )


def parse_alert(body: bytes | str) -> Alert:
    """One alert from the body of a Falco ``http_output`` POST."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AlertError("bad_json", f"body is not valid JSON: {error}") from None
    except RecursionError:
        raise AlertError("bad_json", "body is nested too deeply") from None
    if _SURROGATE_ESCAPE.search(body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass")):
        _refuse_lone_surrogates(data)
    return alert_from_object(data)


# JSON may escape UTF-16 surrogates; Python decodes an unpaired one into a str that cannot be
# encoded to UTF-8, which protobuf strings must be. Paired ones decode to one proper character.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _refuse_lone_surrogates(value: Any) -> None:
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            raise AlertError("bad_json", "a string holds an unpaired UTF-16 surrogate escape") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_lone_surrogates(key)
            _refuse_lone_surrogates(item)
    elif isinstance(value, list):
        for item in value:
            _refuse_lone_surrogates(item)
