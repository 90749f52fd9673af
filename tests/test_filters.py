from __future__ import annotations

import json

import pytest

from falco_api.alerts import parse_alert
from falco_api.contract.falco import outputs_pb2, schema_pb2
from falco_api.filters import AlertFilter, FilterError
from falco_api.testing.falco_double import metrics_snapshot_alert, rule_alert, syscall_drop_alert

SHELL = parse_alert(json.dumps(rule_alert("node-a", index=0)))  # Terminal shell in container, Notice
SENSITIVE = parse_alert(json.dumps(rule_alert("node-b", index=1)))  # Read sensitive file untrusted, Warning
DROP_BINARY = parse_alert(json.dumps(rule_alert("node-a", index=2)))  # Drop and execute ..., Critical
SYSCALL_DROP = parse_alert(json.dumps(syscall_drop_alert("node-a", n_drops=3)))
SNAPSHOT = parse_alert(json.dumps(metrics_snapshot_alert("node-b", outputs_queue_drops=0, num_evts=1)))
ALL = [SHELL, SENSITIVE, DROP_BINARY, SYSCALL_DROP, SNAPSHOT]


def passing(**request: object) -> list[str]:
    alert_filter = AlertFilter.from_request(outputs_pb2.request(**request))  # type: ignore[arg-type]
    return [alert.rule for alert in ALL if alert_filter.matches(alert)]


def test_empty_request_passes_everything() -> None:
    assert passing() == [alert.rule for alert in ALL]


def test_min_priority_is_inclusive() -> None:
    assert passing(min_priority=schema_pb2.WARNING) == [SENSITIVE.rule, DROP_BINARY.rule]
    assert passing(min_priority=schema_pb2.EMERGENCY) == []


def test_rule_globs_include_then_exclude() -> None:
    assert passing(rules=["*container*"]) == [SHELL.rule, DROP_BINARY.rule]
    assert passing(rules=["*container*"], exclude_rules=["Drop *"]) == [SHELL.rule]
    assert passing(rules=["terminal shell*"]) == []  # globs are case-sensitive, like rule names


def test_tags_sources_hostnames_and_internal() -> None:
    assert passing(tags=["filesystem", "nope"]) == [SENSITIVE.rule]
    assert passing(sources=["internal"]) == [SYSCALL_DROP.rule, SNAPSHOT.rule]
    assert passing(hostnames=["node-b"]) == [SENSITIVE.rule, SNAPSHOT.rule]
    assert passing(exclude_internal=True) == [SHELL.rule, SENSITIVE.rule, DROP_BINARY.rule]
    assert passing(hostnames=["node-a"], exclude_internal=True, min_priority=schema_pb2.CRITICAL) == [
        DROP_BINARY.rule
    ]


@pytest.mark.parametrize(
    "request_fields",
    [{"rules": [""]}, {"rules": ["x" * 2000]}, {"exclude_rules": ["*"] * 300}, {"min_priority": 9}],
)
def test_bad_filters_are_refused(request_fields: dict[str, object]) -> None:
    with pytest.raises(FilterError):
        AlertFilter.from_request(outputs_pb2.request(**request_fields))  # type: ignore[arg-type]
