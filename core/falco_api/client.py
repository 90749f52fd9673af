"""Client-side helpers: reading responses back into Falco's JSON shape, and readable RPC errors."""

from __future__ import annotations

import json
from typing import Any

import grpc

from falco_api.alerts import PRIORITY_NAMES
from falco_api.contract.falco import outputs_pb2


def field_python_value(value: outputs_pb2.FieldValue) -> Any:
    """The JSON value a FieldValue was made from (see falco_api.alerts.field_value)."""
    kind = value.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return None
    if kind == "list_value":
        return [field_python_value(item) for item in value.list_value.values]
    if kind == "json_value":
        return json.loads(value.json_value)
    return getattr(value, kind)


def timestamp_text(seconds: int, nanos: int) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}Z"


def priority_name(number: int) -> str:
    return PRIORITY_NAMES[number] if 0 <= number < len(PRIORITY_NAMES) else str(number)


def response_to_falco_json(response: outputs_pb2.response) -> dict[str, Any]:
    """An alert as Falco's own JSON output would print it, plus falco-api's seq and origin."""
    if response.typed_output_fields:
        fields = {name: field_python_value(value) for name, value in response.typed_output_fields.items()}
    else:
        fields = dict(response.output_fields)
    alert: dict[str, Any] = {
        "time": timestamp_text(response.time.seconds, response.time.nanos),
        "rule": response.rule,
        "priority": priority_name(response.priority),
        "source": response.source,
        "hostname": response.hostname,
        "output": response.output,
        "output_fields": fields,
        "seq": response.seq,
        "origin": response.origin,
    }
    if response.tags:
        alert["tags"] = list(response.tags)
    if response.message:
        alert["message"] = response.message
    if response.missed_before:
        alert["missed_before"] = response.missed_before
    return alert


def describe_rpc_error(error: grpc.aio.AioRpcError, server: str) -> str:
    """One line a person can act on."""
    code = error.code()
    details = error.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        hint = ""
        lowered = details.lower()
        if "handshake" in lowered or "ssl" in lowered or "certificate" in lowered or "tls" in lowered:
            hint = (
                " (TLS failed: check --tls-ca matches the server's CA and the server trusts your certificate)"
            )
        elif "connect" in lowered or "no such file" in lowered or "refused" in lowered:
            hint = " (is the sidecar running, and is --server right?)"
        return f"cannot reach {server}: {details}{hint}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{server} did not answer in time: {details}"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return f"{server} refused: {details} (your certificate's identity lacks the role for this call)"
    return f"{server}: {code.name}: {details}"
