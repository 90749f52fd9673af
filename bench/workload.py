"""The alerts the benchmarks send: Falco JSON as the Falco double prints it, optionally with an id."""

from __future__ import annotations

import json
import re

from falco_api.testing.falco_double import rule_alert

# The id travels inside output_fields, so it is found by the same regex in Falco's JSON
# and in the protobuf bytes a subscriber receives, without parsing either.
ID_FIELD = "bench.id"
ID_PATTERN = re.compile(rb"BENCHID(\d{10})")


def alert_body(index: int, *, bench_id: int | None = None) -> bytes:
    alert = rule_alert("bench-node", index=index)
    if bench_id is not None:
        alert["output_fields"][ID_FIELD] = f"BENCHID{bench_id:010d}"
    return json.dumps(alert, separators=(",", ":")).encode()


def alert_line(index: int, *, bench_id: int | None = None) -> bytes:
    return alert_body(index, bench_id=bench_id) + b"\n"
