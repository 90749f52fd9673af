"""The managed rules/config store: layout, versions, validation before writing, crash safety, rollback."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from falco_api.configs import ConfigFinding
from falco_api.rules.model import Finding, RulesFile
from falco_api_sidecar.managed import (
    GENERATIONS_DIR,
    LIVE_CONFIG_FILE,
    STATE_MARKER_FILE,
    ConfigSpec,
    CorruptStoreError,
    FindingLike,
    InvalidRequestError,
    LoadState,
    ManagedStore,
    NoLastGoodError,
    NotFoundError,
    RulesetSpec,
    ValidationFailedError,
    VersionConflictError,
)

CORPUS_RULES = Path("/work/shared/corpus/falco_rules.yaml")


def stand_in_validator(files: Sequence[RulesFile]) -> list[FindingLike]:
    """Refuses any file containing INVALID, warns on WARN: enough to drive the store's logic."""
    findings: list[FindingLike] = []
    for f in files:
        if "INVALID" in f.content:
            findings.append(Finding(f.name, "rule", "r", 1, 1, "stand-in refusal"))
        if "WARN" in f.content:
            findings.append(Finding(f.name, "rule", "r", 1, 1, "stand-in warning", "warning"))
    return findings


def open_store(root: Path, **kwargs: object) -> ManagedStore:
    kwargs.setdefault("rules_validator", stand_in_validator)
    # fsync only guards against power loss; kills are simulated here, so skip it for speed
    # (test_the_whole_set_is_validated_with_the_real_validator runs a durable store).
    kwargs.setdefault("durable", False)
    return ManagedStore.open(root, **kwargs)  # type: ignore[arg-type]


def visible(root: Path) -> dict[str, str]:
    """What Falco reads: falco-api.yaml, then the rules folder it names: name -> content."""
    live = (root / LIVE_CONFIG_FILE).read_text()
    # Compare copies of a root made elsewhere: the path of the root itself does not matter.
    out = {LIVE_CONFIG_FILE: live.replace(str(root), "<root>")}
    [folder] = yaml.safe_load(live)["rules_files"]
    for name in sorted(os.listdir(folder)):
        path = Path(folder) / name
        if path.is_file():
            out[f"rules.d/{name}"] = path.read_text()
    return out


def tree_snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every path under root with its inode, mtime and (for links) target: detects any touch."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            snap[str(path.relative_to(root))] = (
                st.st_ino,
                st.st_mtime_ns,
                os.readlink(path) if path.is_symlink() else "",
            )
    return snap


RULE_A = "- macro: a_macro\n  condition: evt.type = open\n"
RULE_B = "- list: b_list\n  items: [x, y]\n"


@pytest.fixture
def store(tmp_path: Path) -> ManagedStore:
    return open_store(tmp_path / "managed")


def test_open_creates_an_empty_generation_behind_current(tmp_path: Path) -> None:
    root = tmp_path / "managed"
    s = open_store(root)
    assert s.recovery is not None and s.recovery.created
    live = yaml.safe_load((root / LIVE_CONFIG_FILE).read_text())
    assert live == {"rules_files": [str(root / GENERATIONS_DIR / "0000000001" / "rules.d")]}
    assert s.config_file == s.falco_config_file == root / LIVE_CONFIG_FILE
    assert s.rules_dir == root / GENERATIONS_DIR / "0000000001" / "rules.d"
    assert s.config_dir == root / GENERATIONS_DIR / "0000000001" / "config.d"
    assert sorted(visible(root)) == [LIVE_CONFIG_FILE, f"rules.d/{STATE_MARKER_FILE}"]
    assert s.list_rulesets() == [] and s.list_configs() == []
    # Opening again finds the same state and changes nothing Falco reads.
    again = open_store(root)
    assert again.generation == 1 and again.recovery is not None and not again.recovery.created


def test_put_get_list_and_files_on_disk(store: ManagedStore) -> None:
    result = store.put_ruleset("custom", RULE_A, 10)
    assert result.changed and result.generation == 2
    ruleset = store.get_ruleset("custom")
    assert (ruleset.name, ruleset.order, ruleset.version, ruleset.file_name) == (
        "custom",
        10,
        1,
        "10-custom.yaml",
    )
    assert ruleset.status.state is LoadState.PENDING
    assert (store.rules_dir / "10-custom.yaml").read_text() == RULE_A
    assert ruleset.sha256 == store.expected_rules_hashes()["10-custom.yaml"]
    assert result.state_sha256 == store.state_sha256
    with pytest.raises(NotFoundError, match="ruleset 'nope' does not exist"):
        store.get_ruleset("nope")


def test_an_identical_put_changes_nothing(store: ManagedStore) -> None:
    store.put_ruleset("custom", RULE_A, 10)
    before = tree_snapshot(store.root)
    result = store.put_ruleset("custom", RULE_A, 10)
    assert not result.changed and result.generation == 2
    assert tree_snapshot(store.root) == before


def test_versions_increase_on_change_and_continue_after_delete(store: ManagedStore) -> None:
    store.put_ruleset("custom", RULE_A, 10)
    store.put_ruleset("custom", RULE_B, 10)
    assert store.get_ruleset("custom").version == 2
    store.put_ruleset("custom", RULE_B, 20)  # a new order is a change too: the file is renamed
    assert store.get_ruleset("custom").version == 3
    assert sorted(os.listdir(store.rules_dir)) == ["20-custom.yaml", STATE_MARKER_FILE]
    store.delete_ruleset("custom")
    assert store.list_rulesets() == []
    store.put_ruleset("custom", RULE_A, 10, expected_version=0)
    # Re-created: continues after the deleted version, so a stale client holding 3 cannot overwrite it.
    assert store.get_ruleset("custom").version == 4


def test_optimistic_concurrency_conflicts(store: ManagedStore) -> None:
    store.put_ruleset("custom", RULE_A, 10, expected_version=0)
    with pytest.raises(VersionConflictError, match="expected it not to exist, but it is at version 1"):
        store.put_ruleset("custom", RULE_B, 10, expected_version=0)
    with pytest.raises(VersionConflictError, match="expected version 7, but it is at version 1"):
        store.put_ruleset("custom", RULE_B, 10, expected_version=7)
    with pytest.raises(VersionConflictError, match="expected version 2, but it does not exist"):
        store.put_ruleset("other", RULE_B, 10, expected_version=2)
    with pytest.raises(VersionConflictError):
        store.delete_ruleset("custom", expected_version=2)
    store.put_ruleset("custom", RULE_B, 10, expected_version=1)
    store.delete_ruleset("custom", expected_version=2)
    with pytest.raises(NotFoundError):
        store.delete_ruleset("custom")
    with pytest.raises(InvalidRequestError, match="expected_version"):
        store.put_ruleset("x", RULE_A, 1, expected_version=-1)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../etc/passwd",
        "a/b",
        "..",
        "a..b",
        ".hidden",
        "-dash",
        "_under",
        "a b",
        "a\\b",
        "x" * 64,
        "é",
        "a\x00b",
    ],
)
def test_unsafe_names_are_refused_before_anything_is_written(store: ManagedStore, name: str) -> None:
    before = tree_snapshot(store.root)
    with pytest.raises(InvalidRequestError) as info:
        store.put_ruleset(name, RULE_A, 10)
    assert "ruleset name" in str(info.value)
    with pytest.raises(InvalidRequestError):
        store.put_config(name, {"priority": "debug"}, 10)
    with pytest.raises(InvalidRequestError):
        store.apply([RulesetSpec(name, RULE_A, 1)], [])
    assert tree_snapshot(store.root) == before


def test_traversal_messages_are_clear(store: ManagedStore) -> None:
    with pytest.raises(InvalidRequestError, match="must not contain path separators"):
        store.put_ruleset("../x", RULE_A, 1)
    with pytest.raises(InvalidRequestError, match=r"must not contain '\.\.'"):
        store.put_ruleset("a..b", RULE_A, 1)
    with pytest.raises(InvalidRequestError, match="at most 63"):
        store.put_ruleset("y" * 64, RULE_A, 1)


@pytest.mark.parametrize("name", ["a", "A1._-z", "x" * 63, "0rules.v2"])
def test_safe_names_are_accepted(store: ManagedStore, name: str) -> None:
    store.put_ruleset(name, RULE_A, 5)
    assert (store.rules_dir / f"05-{name}.yaml").is_file()


@pytest.mark.parametrize("order", [-1, 100, True, "1", 1.5, None])
def test_orders_outside_0_99_are_refused(store: ManagedStore, order: object) -> None:
    with pytest.raises(InvalidRequestError, match="order"):
        store.put_ruleset("custom", RULE_A, order)  # type: ignore[arg-type]


def test_validation_errors_refuse_the_write_and_touch_nothing(store: ManagedStore) -> None:
    store.put_ruleset("good", RULE_A, 10)
    before = tree_snapshot(store.root)
    with pytest.raises(ValidationFailedError) as info:
        store.put_ruleset("bad", "INVALID", 20)
    assert "stand-in refusal" in str(info.value)
    assert [f.file for f in info.value.findings] == ["bad"]
    with pytest.raises(ValidationFailedError):
        store.put_config("net", {"webserver": {"enabled": False}}, 10)
    with pytest.raises(ValidationFailedError):
        store.apply([RulesetSpec("good", RULE_A, 10), RulesetSpec("bad", "INVALID", 20)], [])
    assert tree_snapshot(store.root) == before
    assert [r.name for r in store.list_rulesets()] == ["good"]


def test_warnings_do_not_block_and_are_returned(store: ManagedStore) -> None:
    result = store.put_ruleset("noisy", "# WARN\n" + RULE_A, 10)
    assert result.changed
    assert [f.message for f in result.warnings] == ["stand-in warning"]


def test_the_whole_set_is_validated_with_the_real_validator(tmp_path: Path) -> None:
    uses_upstream_macro = (
        "- rule: Shell in custom image\n  desc: d\n  condition: spawned_process and proc.name = bash\n"
        "  output: shell (proc.name=%proc.name)\n  priority: WARNING\n"
    )
    alone = ManagedStore.open(tmp_path / "alone")
    with pytest.raises(ValidationFailedError, match="undefined macro 'spawned_process'"):
        alone.put_ruleset("custom", uses_upstream_macro, 50)
    with_upstream = ManagedStore.open(tmp_path / "with", preceding_rules_files=[CORPUS_RULES])
    with_upstream.put_ruleset("custom", uses_upstream_macro, 50)
    assert with_upstream.get_ruleset("custom").version == 1


def test_validate_rulesets_with_and_without_the_managed_set(store: ManagedStore) -> None:
    store.put_ruleset("good", RULE_A, 10)
    assert store.validate_rulesets([RulesetSpec("extra", RULE_B, 30)]) == []
    findings = store.validate_rulesets([RulesetSpec("good", "INVALID", 10)])
    assert [f.file for f in findings] == ["good"]
    assert store.validate_rulesets([RulesetSpec("x", "INVALID", 1)], standalone=True)[0].file == "x"
    assert store.get_ruleset("good").content == RULE_A


def test_config_dropins_are_written_canonically(store: ManagedStore) -> None:
    result = store.put_config("tuning", {"priority": "notice", "output_timeout": 3000.0}, 30)
    assert result.changed
    config = store.get_config("tuning")
    assert config.settings == {"output_timeout": 3000, "priority": "notice"}
    assert config.file_name == "30-tuning.yaml"
    assert (store.config_dir / "30-tuning.yaml").read_text() == config.content
    assert config.content == "output_timeout: 3000\npriority: notice\n"
    # Falco reads the drop-ins merged into falco-api.yaml, next to the rules folder entry.
    live = yaml.safe_load(store.config_file.read_text())
    assert live == {"output_timeout": 3000, "priority": "notice", "rules_files": [str(store.rules_dir)]}
    [(name, sha)] = store.expected_config_hashes().items()
    assert name == LIVE_CONFIG_FILE and sha == hashlib.sha256(store.config_file.read_bytes()).hexdigest()
    store.delete_config("tuning", expected_version=1)
    assert store.list_configs() == []


def test_config_validation_refuses_sidecar_keys_with_a_reason(store: ManagedStore) -> None:
    with pytest.raises(ValidationFailedError) as info:
        store.put_config("bad", {"json_output": False}, 10)
    [finding] = info.value.findings
    assert isinstance(finding, ConfigFinding)
    assert "is managed by the falco-api sidecar" in str(finding)
    with pytest.raises(InvalidRequestError, match="must be a mapping"):
        store.put_config("bad", ["x"], 10)  # type: ignore[arg-type]


def test_config_merge_is_checked_against_the_base(tmp_path: Path) -> None:
    base = tmp_path / "falco.yaml"
    base.write_text("load_plugins: [json]\nrules: disabled-here\n")
    s = open_store(tmp_path / "m", base_config_path=base)
    s.put_config("plugins", {"load_plugins": ["k8saudit"]}, 10)
    with pytest.raises(ValidationFailedError, match="cannot append a sequence"):
        s.put_config("rules", {"rules": [{"disable": {"rule": "x"}}]}, 20)


def test_unchanged_files_keep_their_inode_and_mtime(store: ManagedStore) -> None:
    store.put_ruleset("a", RULE_A, 10)
    store.put_config("c", {"priority": "debug"}, 10)
    a_before = (store.rules_dir / "10-a.yaml").stat()
    c_before = (store.config_dir / "10-c.yaml").stat()
    store.put_ruleset("b", RULE_B, 20)
    a_after = (store.rules_dir / "10-a.yaml").stat()
    c_after = (store.config_dir / "10-c.yaml").stat()
    assert (a_after.st_ino, a_after.st_mtime_ns) == (a_before.st_ino, a_before.st_mtime_ns)
    assert (c_after.st_ino, c_after.st_mtime_ns) == (c_before.st_ino, c_before.st_mtime_ns)


def test_apply_replaces_everything_in_one_generation(store: ManagedStore) -> None:
    store.put_ruleset("old", RULE_A, 10)
    store.put_config("old", {"priority": "debug"}, 10)
    generation = store.generation
    result = store.apply(
        [RulesetSpec("a", RULE_A, 10), RulesetSpec("b", RULE_B, 20)],
        [ConfigSpec("c", {"priority": "error"}, 5)],
    )
    assert result.changed and result.generation == generation + 1
    assert [r.name for r in result.rulesets] == ["a", "b"]
    assert [c.name for c in result.configs] == ["c"]
    assert sorted(visible(store.root)) == [
        LIVE_CONFIG_FILE,
        "rules.d/10-a.yaml",
        "rules.d/20-b.yaml",
        f"rules.d/{STATE_MARKER_FILE}",
    ]
    assert not store.apply(result_specs(store), [ConfigSpec("c", {"priority": "error"}, 5)]).changed


def result_specs(store: ManagedStore) -> list[RulesetSpec]:
    return [RulesetSpec(r.name, r.content, r.order) for r in store.list_rulesets()]


def test_apply_dry_run_writes_nothing(store: ManagedStore) -> None:
    before = tree_snapshot(store.root)
    result = store.apply([RulesetSpec("a", RULE_A, 10)], [], dry_run=True)
    assert result.dry_run and result.changed
    assert [r.name for r in result.rulesets] == ["a"]
    assert result.state_sha256 != store.state_sha256
    assert tree_snapshot(store.root) == before
    with pytest.raises(InvalidRequestError, match="listed twice"):
        store.apply([RulesetSpec("a", RULE_A, 10), RulesetSpec("a", RULE_B, 11)], [])


def test_the_state_marker_names_the_state(store: ManagedStore) -> None:
    first = store.state_marker_sha256()
    store.put_ruleset("a", RULE_A, 10)
    assert store.state_marker_sha256() != first
    assert store.expected_rules_hashes()[STATE_MARKER_FILE] == store.state_marker_sha256()
    assert store.state_sha256 in (store.rules_dir / STATE_MARKER_FILE).read_text()


def test_status_follows_falcos_verdicts(store: ManagedStore) -> None:
    store.put_ruleset("a", RULE_A, 10)
    assert store.get_ruleset("a").status.state is LoadState.PENDING
    store.mark_loaded(store.generation)
    assert store.get_ruleset("a").status.state is LoadState.LOADED
    store.put_ruleset("b", RULE_B, 20)
    # Falco still runs the last good set, which holds `a` unchanged.
    assert store.get_ruleset("a").status.state is LoadState.LOADED
    assert store.get_ruleset("b").status.state is LoadState.PENDING
    store.mark_unknown(store.generation, "no verdict within 10s")
    b_status = store.get_ruleset("b").status
    assert (b_status.state, b_status.message) == (LoadState.UNKNOWN, "no verdict within 10s")
    # Verdicts survive a restart of the sidecar.
    reopened = open_store(store.root)
    assert reopened.get_ruleset("b").status.state is LoadState.UNKNOWN
    assert reopened.last_good_generation == store.last_good_generation


def test_rollback_to_last_known_good(store: ManagedStore) -> None:
    with pytest.raises(NoLastGoodError):
        store.rollback_to_last_good()
    store.put_ruleset("a", RULE_A, 10)
    store.mark_loaded(store.generation)
    good_generation = store.generation
    good_state = store.state_sha256
    store.put_ruleset("a", RULE_B, 10)
    store.put_ruleset("b", RULE_B, 20)
    store.mark_failed(store.generation, "Falco internal: hot restart failure: boom")
    assert store.status().state is LoadState.FAILED
    result = store.rollback_to_last_good()
    assert result.rolled_back and result.changed
    assert result.state_sha256 == good_state
    assert result.generation > good_generation
    assert visible(store.root)["rules.d/10-a.yaml"] == RULE_A
    assert "rules.d/20-b.yaml" not in visible(store.root)
    # The restored `a` is a new version: a client holding the refused version 2 cannot overwrite it.
    assert store.get_ruleset("a").version == 3
    assert store.get_ruleset("a").status.state is LoadState.LOADED
    assert store.last_good_generation == good_generation


def test_old_generations_are_collected(tmp_path: Path) -> None:
    store = open_store(tmp_path / "m", gc_grace_s=0)
    generations = store.root / GENERATIONS_DIR
    for i in range(5):
        store.put_ruleset("a", f"# {i}\n" + RULE_A, 10)
    # Nothing confirmed yet: only the current generation is needed.
    assert sorted(os.listdir(generations)) == [f"{store.generation:010d}"]
    store.mark_loaded(store.generation)
    good = store.generation
    for i in range(3):
        store.put_ruleset("b", f"# {i}\n" + RULE_B, 20)
    assert sorted(os.listdir(generations)) == [f"{good:010d}", f"{store.generation:010d}"]
    store.mark_loaded(store.generation)
    assert sorted(os.listdir(generations)) == [f"{store.generation:010d}"]


def test_the_previous_generations_folders_are_poked(tmp_path: Path) -> None:
    steps: list[str] = []
    s = open_store(tmp_path / "m", fault=steps.append)
    steps.clear()
    s.put_ruleset("a", RULE_A, 10)
    assert "poke 0000000001/rules.d" in steps
    assert not any(step.startswith("poke 0000000002") for step in steps)
    # The trigger leaves nothing behind that Falco could load.
    assert not any(
        name.startswith(".")
        for name in os.listdir(tmp_path / "m" / GENERATIONS_DIR / "0000000002" / "rules.d")
    )


def test_concurrent_writers_are_serialised(store: ManagedStore) -> None:
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(5):
                store.put_ruleset(f"r{n}", f"# {i}\n" + RULE_A, n)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [r.version for r in store.list_rulesets()] == [5, 5, 5, 5]
    assert open_store(store.root).state_sha256 == store.state_sha256


# Crash safety: kill the apply at every file system step, recover, and find old or new, never a mix.


class SimulatedKill(Exception):
    pass


class KillAt:
    """Raises at step number `at` and at every step after it: a killed process does nothing more."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.count = 0
        self.labels: list[str] = []

    def __call__(self, label: str) -> None:
        self.count += 1
        self.labels.append(label)
        if self.count >= self.at:
            raise SimulatedKill(label)


OLD_RULES = [
    RulesetSpec("keep", RULE_A, 10),
    RulesetSpec("change", "# v1\n" + RULE_B, 20),
    RulesetSpec("drop", RULE_B, 30),
]
OLD_CONFIGS = [ConfigSpec("tune", {"priority": "debug"}, 10)]
NEW_RULES = [
    RulesetSpec("keep", RULE_A, 10),
    RulesetSpec("change", "# v2\n" + RULE_B, 20),
    RulesetSpec("add", RULE_B, 40),
]
NEW_CONFIGS = [ConfigSpec("tune", {"priority": "error"}, 10), ConfigSpec("more", {"log_level": "debug"}, 20)]


def run_scenario(root: Path, action: str, kill_at: int | None) -> tuple[dict[str, str], KillAt]:
    """Build the old state without faults, then run `action` with a kill at step `kill_at`.

    Returns what Falco saw just before the action, and the killer (its count of steps).
    """
    killer = KillAt(10**9)
    s = open_store(root, fault=killer)
    s.apply(OLD_RULES, OLD_CONFIGS)
    if action == "rollback":
        s.mark_loaded(s.generation)
        s.apply(NEW_RULES, NEW_CONFIGS)
        s.mark_failed(s.generation, "refused")
    before = visible(root)
    killer.count = 0
    if kill_at is not None:
        killer.at = kill_at
    if action == "apply":
        s.apply(NEW_RULES, NEW_CONFIGS)
    else:
        s.rollback_to_last_good()
    return before, killer


def leftovers(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            if name.startswith((".tmp-", ".building-", ".falco-api-reload")):
                found.append(str(Path(dirpath, name).relative_to(root)))
    return found


@pytest.mark.parametrize("action", ["apply", "rollback"])
def test_a_kill_at_any_step_leaves_old_or_new(tmp_path: Path, action: str) -> None:
    old_view, counter = run_scenario(tmp_path / "complete", action, None)
    new_view = visible(tmp_path / "complete")
    assert old_view != new_view
    assert counter.count > 20
    outcomes = set()
    for at in range(1, counter.count + 1):
        root = tmp_path / f"kill-{at}"
        with pytest.raises(SimulatedKill):
            run_scenario(root, action, at)
        step = f"step {at}"
        recovered = open_store(root)
        view = visible(root)
        assert view in (old_view, new_view), f"mixed state after a kill at {step}"
        outcomes.add("new" if view == new_view else "old")
        assert leftovers(root) == [], f"leftovers after a kill at {step}"
        # The index agrees with the files, and the store works on.
        indexed = {f"rules.d/{r.file_name}": r.content for r in recovered.list_rulesets()}
        assert indexed.items() <= view.items()
        recovered.put_ruleset("after", RULE_A, 99)
        shutil.rmtree(root)
    assert outcomes == {"old", "new"}


def test_a_kill_while_creating_the_first_generation(tmp_path: Path) -> None:
    counter = KillAt(10**9)
    ManagedStore.open(tmp_path / "count", rules_validator=stand_in_validator, fault=counter)
    for at in range(1, counter.count + 1):
        root = tmp_path / f"first-{at}"
        with pytest.raises(SimulatedKill):
            ManagedStore.open(root, rules_validator=stand_in_validator, fault=KillAt(at))
        s = open_store(root)
        assert sorted(visible(root)) == [LIVE_CONFIG_FILE, f"rules.d/{STATE_MARKER_FILE}"]
        assert s.list_rulesets() == [] and leftovers(root) == []


def test_corruption_is_reported_not_guessed(tmp_path: Path) -> None:
    s = open_store(tmp_path / "m")
    s.put_ruleset("a", RULE_A, 10)
    (s.rules_dir / "10-a.yaml").unlink()
    (s.rules_dir / "10-a.yaml").write_text("edited by hand\n")
    with pytest.raises(CorruptStoreError, match="changed outside falco-api"):
        open_store(tmp_path / "m")
    other = tmp_path / "other"
    other.mkdir()
    (other / LIVE_CONFIG_FILE).write_text("rules_files: [/etc/falco/rules.d]\n")
    with pytest.raises(CorruptStoreError, match="did not write"):
        open_store(other)
