from __future__ import annotations

import json

import pytest

from falco_api.alerts import AlertError, alert_from_object, parse_alert, parse_priority, parse_time
from falco_api.client import field_python_value, response_to_falco_json
from falco_api.contract.falco import outputs_pb2, schema_pb2
from falco_api.testing.falco_double import metrics_snapshot_alert, rule_alert, syscall_drop_alert


def test_rule_alert_round_trips_losslessly() -> None:
    raw = rule_alert("node-a", index=3, time_ns=1_732_631_000_123_456_789)
    alert = parse_alert(json.dumps(raw))
    response = outputs_pb2.response.FromString(
        alert.to_response(seq=7, origin="node-a/1").SerializeToString()
    )

    assert response.rule == raw["rule"]
    assert response.priority == schema_pb2.NOTICE
    assert response.source == "syscall" and response.source_deprecated == schema_pb2.SYSCALL
    assert (response.time.seconds, response.time.nanos) == (1_732_631_000, 123_456_789)
    assert list(response.tags) == raw["tags"]
    assert (response.seq, response.origin) == (7, "node-a/1")
    # evt.time is an integer in ns: above 2**53, a double would round it.
    assert response.typed_output_fields["evt.time"].int_value == 1_732_631_000_123_456_789
    assert response.output_fields["evt.time"] == "1732631000123456789"
    assert response_to_falco_json(response)["output_fields"] == raw["output_fields"]


def test_null_and_nested_values_are_kept() -> None:
    raw = rule_alert("node-a", index=5)
    raw["output_fields"]["odd.list"] = [1, "two", None, 2**64 - 1, {"k": 1}]
    raw["output_fields"]["huge"] = 2**70
    raw["output_fields"]["ratio"] = 0.25
    raw["output_fields"]["flag"] = True
    response = parse_alert(json.dumps(raw)).to_response()
    back = {name: field_python_value(value) for name, value in response.typed_output_fields.items()}
    assert back == raw["output_fields"]
    assert response.output_fields["container.name"] == "<NA>"
    assert response.output_fields["flag"] == "true"


def test_internal_alerts_parse() -> None:
    drop = parse_alert(json.dumps(syscall_drop_alert("h", n_drops=5)))
    snapshot = parse_alert(json.dumps(metrics_snapshot_alert("h", outputs_queue_drops=1, num_evts=10)))
    assert drop.is_internal and drop.priority == schema_pb2.DEBUG and drop.tags == ()
    assert snapshot.is_internal and snapshot.priority == schema_pb2.INFORMATIONAL
    assert drop.to_response().source_deprecated == schema_pb2.INTERNAL


def test_plugin_sources_map_to_plugin() -> None:
    raw = rule_alert("h", index=0) | {"source": "k8s_audit"}
    assert parse_alert(json.dumps(raw)).to_response().source_deprecated == schema_pb2.K8S_AUDIT
    raw["source"] = "aws_cloudtrail"
    response = parse_alert(json.dumps(raw)).to_response()
    assert response.source_deprecated == schema_pb2.PLUGIN and response.source == "aws_cloudtrail"


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("Emergency", 0),
        ("ALERT", 1),
        ("critical", 2),
        ("Error", 3),
        ("warning", 4),
        ("NOTICE", 5),
        ("Informational", 6),
        ("INFO", 6),
        ("info", 6),
        ("Debug", 7),
    ],
)
def test_priorities_are_case_insensitive_with_info_alias(text: str, number: int) -> None:
    assert parse_priority(text) == number


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T12:00:00.123456789Z", (1714564800, 123456789)),
        ("2024-05-01T12:00:00Z", (1714564800, 0)),
        ("2024-05-01T12:00:00.5Z", (1714564800, 500_000_000)),
        ("2024-05-01T14:00:00.000000001+02:00", (1714564800, 1)),
    ],
)
def test_times(text: str, expected: tuple[int, int]) -> None:
    assert parse_time(text) == expected


@pytest.mark.parametrize(
    ("body", "reason", "words"),
    [
        (b"{not json", "bad_json", "not valid JSON"),
        (b"\xff\xfe", "bad_json", "not valid JSON"),
        (b"[1, 2]", "not_an_object", "JSON object"),
        (b"[" * 100_000, "bad_json", "nested too deeply"),
        (
            json.dumps({"time": "2024-05-01T12:00:00Z", "priority": "Warning"}).encode(),
            "missing_field",
            "'rule'",
        ),
        (json.dumps({"rule": "r", "priority": "Warning"}).encode(), "missing_field", "'time'"),
        (
            json.dumps({"rule": "r", "time": "yesterday", "priority": "Warning"}).encode(),
            "bad_time",
            "ISO-8601",
        ),
        (
            json.dumps({"rule": "r", "time": "2024-13-01T12:00:00Z", "priority": "Warning"}).encode(),
            "bad_time",
            "range",
        ),
        (
            json.dumps({"rule": "r", "time": "2024-05-01T12:00:00Z", "priority": "Severe"}).encode(),
            "unknown_priority",
            "'Severe'",
        ),
        (
            json.dumps({"rule": 5, "time": "2024-05-01T12:00:00Z", "priority": "Warning"}).encode(),
            "wrong_type",
            "'rule' must be a string",
        ),
        (
            json.dumps(
                {"rule": "r", "time": "2024-05-01T12:00:00Z", "priority": "Warning", "tags": "a"}
            ).encode(),
            "wrong_type",
            "'tags'",
        ),
        (
            json.dumps(
                {"rule": "r", "time": "2024-05-01T12:00:00Z", "priority": "Warning", "output_fields": [1]}
            ).encode(),
            "wrong_type",
            "'output_fields'",
        ),
    ],
)
def test_malformed_alerts_are_refused_with_a_reason(body: bytes, reason: str, words: str) -> None:
    with pytest.raises(AlertError) as caught:
        parse_alert(body)
    assert caught.value.reason == reason
    assert words in str(caught.value)


def test_minimal_alert_defaults() -> None:
    alert = alert_from_object({"rule": "r", "time": "2024-05-01T12:00:00Z", "priority": "info"})
    assert alert.source == "syscall" and alert.hostname == "" and alert.output_fields == {}
