"""Config drop-in validation and Falco's merge (falco_api.configs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from falco_api import configs
from falco_api.configs import (
    SIDECAR_OWNED_KEYS,
    ConfigMergeError,
    canonical_dropin_yaml,
    compute_state_sha256,
    content_sha256,
    effective_config,
    merge_dropin,
    merge_dropins,
    validate_dropin,
    validate_dropin_set,
    validate_dropin_text,
)


def errors(findings: list[configs.ConfigFinding]) -> list[str]:
    return [str(f) for f in findings if f.severity == "error"]


def test_a_valid_partial_dropin_passes() -> None:
    dropin = {
        "priority": "warning",
        "syscall_event_drops": {"threshold": 0.2, "actions": ["log", "alert"]},
        "append_output": [{"match": {"source": "syscall"}, "extra_output": "pod=%k8s.pod.name"}],
    }
    assert validate_dropin(dropin, file="10-tuning.yaml") == []


def test_wrong_types_are_errors_with_the_key_path() -> None:
    findings = validate_dropin({"syscall_event_drops": {"threshold": "high"}}, file="10-x.yaml")
    assert errors(findings) == [
        "10-x.yaml: key 'syscall_event_drops.threshold': 'high' is not of type 'number'"
    ]


def test_an_incomplete_nested_block_explains_falcos_top_level_replace() -> None:
    [finding] = validate_dropin({"engine": {"modern_ebpf": {"cpus_for_each_buffer": 2}}}, file="d")
    assert finding.severity == "error"
    assert "'kind' is a required property" in finding.message
    assert "replaces the whole 'engine' block" in finding.message


def test_unknown_keys_are_warnings_not_errors() -> None:
    [finding] = validate_dropin({"prority": "debug"}, file="d")
    assert finding.severity == "warning"
    assert finding.item_name == "prority"
    assert "not a Falco configuration key" in str(finding)


@pytest.mark.parametrize("key", sorted(SIDECAR_OWNED_KEYS))
def test_sidecar_owned_keys_are_refused_with_the_reason(key: str) -> None:
    findings = validate_dropin({key: True}, file="20-x.yaml")
    [refusal] = errors(findings)
    assert refusal.startswith(
        f"20-x.yaml: key '{key}': is managed by the falco-api sidecar and cannot be set: "
    )
    assert SIDECAR_OWNED_KEYS[key] in refusal


def test_required_keys_list_matches_the_brief() -> None:
    for key in (
        "http_output",
        "json_output",
        "json_include_output_property",
        "webserver",
        "rules_files",
        "config_files",
        "watch_config_files",
    ):
        assert key in SIDECAR_OWNED_KEYS


@pytest.mark.parametrize("bad", [["a"], "text", 3, None])
def test_a_dropin_must_be_a_mapping(bad: object) -> None:
    [finding] = validate_dropin(bad, file="x")
    assert "must be a mapping of falco.yaml keys" in finding.message


def test_non_string_keys_are_refused() -> None:
    [finding] = validate_dropin({1: "a"}, file="x")
    assert "keys must be strings" in finding.message


def test_yaml_text_errors_carry_line_and_column() -> None:
    parsed = validate_dropin_text("priority: debug\nmetrics: {enabled: true\n", file="bad.yaml")
    assert parsed.settings is None
    [finding] = parsed.findings
    assert finding.line == 3 and finding.column >= 1
    assert str(finding).startswith("bad.yaml:3:")
    assert "invalid YAML" in finding.message


def test_yaml_text_that_is_not_a_mapping_is_refused() -> None:
    parsed = validate_dropin_text("- priority\n", file="x.yaml")
    assert parsed.settings is None
    assert "got sequence" in parsed.findings[0].message


def test_yaml_text_is_validated_like_a_mapping() -> None:
    parsed = validate_dropin_text("json_output: false\npriority: notice\n", file="x.yaml")
    assert parsed.settings == {"json_output": False, "priority": "notice"}
    assert [f.item_name for f in parsed.findings] == ["json_output"]


def test_empty_text_is_an_empty_dropin() -> None:
    parsed = validate_dropin_text("# nothing yet\n")
    assert parsed.settings == {} and parsed.findings == []


# Falco's merge (yaml_helper::include_config_file): top-level keys only.


def test_append_appends_sequences_and_replaces_maps_and_scalars_whole() -> None:
    base = {
        "priority": "debug",
        "load_plugins": ["json"],
        "metrics": {"enabled": False, "interval": "1m", "output_rule": True},
    }
    merged = merge_dropin(
        base, {"priority": "notice", "load_plugins": ["k8saudit"], "metrics": {"enabled": True}}
    )
    assert merged == {
        "priority": "notice",
        "load_plugins": ["json", "k8saudit"],
        # Not a deep merge: Falco replaces the whole top-level value.
        "metrics": {"enabled": True},
    }
    assert base["load_plugins"] == ["json"], "inputs stay untouched"


def test_append_to_an_absent_or_null_key_sets_the_sequence() -> None:
    assert merge_dropin(
        {"rules": None}, {"rules": [{"disable": {"rule": "x"}}], "plugins": [{"name": "p"}]}
    ) == {
        "rules": [{"disable": {"rule": "x"}}],
        "plugins": [{"name": "p"}],
    }


def test_append_of_a_sequence_onto_a_map_fails_like_falco() -> None:
    with pytest.raises(ConfigMergeError, match="cannot append a sequence to the map"):
        merge_dropin({"metrics": {"enabled": True}}, {"metrics": [1]})


def test_override_and_add_only_strategies() -> None:
    base = {"load_plugins": ["json"], "priority": "debug"}
    assert merge_dropin(base, {"load_plugins": ["k"]}, "override") == {
        "load_plugins": ["k"],
        "priority": "debug",
    }
    assert merge_dropin(base, {"priority": "x", "log_level": "info"}, "add-only") == {
        "load_plugins": ["json"],
        "priority": "debug",
        "log_level": "info",
    }


def test_config_files_inside_a_dropin_fails_the_merge() -> None:
    with pytest.raises(ConfigMergeError, match="config_files"):
        merge_dropin({}, {"config_files": ["/x"]})


def test_dropins_merge_in_the_order_given() -> None:
    merged = merge_dropins({"priority": "debug"}, [{"priority": "notice"}, {"priority": "error"}])
    assert merged["priority"] == "error"


def test_effective_config_with_a_readable_base(tmp_path: Path) -> None:
    base = tmp_path / "falco.yaml"
    base.write_text("priority: debug\nload_plugins: [json]\nwebserver:\n  enabled: true\n")
    result = effective_config(
        base, [("10-a.yaml", {"load_plugins": ["k8saudit"]}), ("20-b.yaml", {"priority": "error"})]
    )
    assert result.base_included and result.base_error == ""
    assert result.effective == {
        "priority": "error",
        "load_plugins": ["json", "k8saudit"],
        "webserver": {"enabled": True},
    }


def test_effective_config_without_a_base_says_why(tmp_path: Path) -> None:
    result = effective_config(tmp_path / "missing.yaml", [("10-a.yaml", {"priority": "error"})])
    assert not result.base_included
    assert "cannot read" in result.base_error
    assert result.effective == {"priority": "error"}


def test_effective_config_reports_and_skips_an_unmergeable_dropin(tmp_path: Path) -> None:
    base = tmp_path / "falco.yaml"
    base.write_text("metrics: {enabled: true}\n")
    result = effective_config(base, [("10-a.yaml", {"metrics": [1]}), ("20-b.yaml", {"priority": "error"})])
    assert result.effective == {"metrics": {"enabled": True}, "priority": "error"}
    assert [f.file for f in result.findings] == ["10-a.yaml"]


def test_effective_config_with_an_invalid_base(tmp_path: Path) -> None:
    base = tmp_path / "falco.yaml"
    base.write_text("- not a mapping\n")
    result = effective_config(base, [])
    assert not result.base_included and "must be a mapping" in result.base_error


def test_validate_dropin_set_checks_each_then_the_merge() -> None:
    assert (
        validate_dropin_set(
            [("10-a.yaml", {"load_plugins": ["json"]}), ("20-b.yaml", {"load_plugins": ["k"]})]
        )
        == []
    )
    findings = validate_dropin_set([("10-a.yaml", {"metrics": [1]})], base={"metrics": {"enabled": True}})
    assert errors(findings)  # the schema refuses a sequence for metrics already
    merge_only = validate_dropin_set(
        [("10-a.yaml", {"static_fields": {"a": "b"}}), ("20-b.yaml", {"rules": []})], base={"rules": "x"}
    )
    assert [f.file for f in merge_only] == ["20-b.yaml"]


def test_canonical_yaml_is_stable_and_turns_integral_floats_into_ints() -> None:
    a = canonical_dropin_yaml({"metrics": {"interval": "1m", "enabled": True}, "output_timeout": 2000.0})
    b = canonical_dropin_yaml({"output_timeout": 2000, "metrics": {"enabled": True, "interval": "1m"}})
    assert a == b
    assert "output_timeout: 2000\n" in a
    assert canonical_dropin_yaml({}) == "{}\n"


def test_state_hash_depends_on_name_order_and_content_only() -> None:
    h1 = compute_state_sha256([("a", 10, "x"), ("b", 20, "y")], [("c", 0, "z")])
    h2 = compute_state_sha256([("b", 20, "y"), ("a", 10, "x")], [("c", 0, "z")])
    assert h1 == h2
    assert h1 != compute_state_sha256([("a", 11, "x"), ("b", 20, "y")], [("c", 0, "z")])
    # A ruleset and a drop-in with the same name, order and hash are different states.
    assert compute_state_sha256([("c", 0, "z")], []) != compute_state_sha256([], [("c", 0, "z")])
    assert content_sha256("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize(
    "metrics",
    [{"enabled": False}, {"interval": "5m", "output_rule": True}],
)
def test_a_dropin_cannot_switch_off_the_metrics_that_confirm_every_write(metrics: object) -> None:
    """A `metrics` map replaces falco.yaml's whole: without enabled the loaded-file hashes vanish."""
    [refusal] = errors(validate_dropin({"metrics": metrics}, file="20-x.yaml"))
    assert "key 'metrics'" in refusal and "enabled: true" in refusal


def test_metrics_tuning_that_keeps_them_enabled_is_accepted() -> None:
    assert errors(validate_dropin({"metrics": {"enabled": True, "interval": "5m"}})) == []
