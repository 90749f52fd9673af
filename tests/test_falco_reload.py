"""The Falco double's reload model, and the managed store seen through it."""

from __future__ import annotations

import hashlib
import os
import random
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from falco_api.rules.model import Finding, RulesFile
from falco_api.testing.falco_reload import (
    HOT_RESTART_FAILURE_RULE,
    ConfigEntry,
    FalcoReloadModel,
    FalcoStartError,
    LoadedSet,
)
from falco_api_sidecar.managed import (
    STATE_MARKER_FILE,
    ConfigSpec,
    LoadState,
    ManagedStore,
    RulesetSpec,
)

RULE_A = "- macro: a_macro\n  condition: evt.type = open\n"
RULE_B = "- list: b_list\n  items: [x, y]\n"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refuses(marker: str):  # type: ignore[no-untyped-def]
    def validator(files: Sequence[RulesFile]) -> list[Finding]:
        return [
            Finding(f.name, "rule", "r", 2, 3, f"refused by {marker}") for f in files if marker in f.content
        ]

    return validator


def settle(model: FalcoReloadModel, clock: FakeClock, steps: int = 8) -> list[Any]:
    """Advance the fake clock past Falco's debounce windows, polling like its watcher loop."""
    outcomes = []
    for _ in range(steps):
        outcome = model.poll_once()
        if outcome is not None:
            outcomes.append(outcome)
        clock.now += 0.06
    return outcomes


@pytest.fixture
def plain(tmp_path: Path) -> tuple[Path, Path, Path]:
    rules = tmp_path / "rules.d"
    rules.mkdir()
    (rules / "10-a.yaml").write_text(RULE_A)
    (rules / "20-b.yaml").write_text(RULE_B)
    (rules / "notes.txt").write_text("not a rules file")
    config = tmp_path / "config.d"
    config.mkdir()
    (config / "10-x.yaml").write_text("priority: notice\n")
    main = tmp_path / "falco.yaml"
    main.write_text("priority: debug\nload_plugins: [json]\n")
    return rules, config, main


def make(plain: tuple[Path, Path, Path], clock: FakeClock, **kwargs: Any) -> FalcoReloadModel:
    rules, config, main = plain
    kwargs.setdefault("rules_validator", refuses("INVALID"))
    return FalcoReloadModel([str(rules)], [config], main_config=main, clock=clock, **kwargs)


def test_start_loads_folders_in_order_and_reports_hashes(plain: tuple[Path, Path, Path]) -> None:
    rules, config, main = plain
    model = make(plain, FakeClock())
    loaded = model.start()
    assert list(model.loaded_rules_files()) == [str(rules / "10-a.yaml"), str(rules / "20-b.yaml")]
    assert list(model.loaded_config_files()) == [str(main), str(config / "10-x.yaml")]
    assert loaded.effective_config == {
        "priority": "notice",
        "load_plugins": ["json"],
        "rules_files": [str(rules)],
    }
    text = model.metrics_text()
    sha_a = model.loaded_rules_files()[str(rules / "10-a.yaml")]
    assert f'falcosecurity_falco_sha256_rules_files_info{{file_name="10-a.yaml",sha256="{sha_a}"}} 1' in text
    # Like Falco: config files inside a config folder are merged but not hashed in /metrics.
    assert 'sha256_config_files_info{file_name="falco.yaml"' in text
    assert "10-x.yaml" not in text.split("sha256_config_files_info", 1)[1]
    assert "falco_double_reloads_total 0" in text
    model.close()


def test_invalid_rules_at_start_are_fatal(plain: tuple[Path, Path, Path]) -> None:
    (plain[0] / "30-bad.yaml").write_text("INVALID\n")
    model = make(plain, FakeClock())
    with pytest.raises(FalcoStartError, match="refused by INVALID"):
        model.start()
    assert model.start_error and not model.started


def test_a_change_reloads_after_the_debounce(plain: tuple[Path, Path, Path]) -> None:
    clock = FakeClock()
    model = make(plain, clock)
    model.start()
    first_ts = model.reload_ts_ns
    (plain[0] / "30-c.yaml").write_text(RULE_B)
    assert model.poll_once() is None  # the event is seen, the debounce starts
    clock.now += 0.05
    assert model.poll_once() is None  # still inside 100 ms
    clock.now += 0.06
    assert model.poll_once() is None  # dry run passes; wait another 100 ms before restarting
    assert str(plain[0] / "30-c.yaml") not in model.loaded_rules_files()
    clock.now += 0.11
    outcome = model.poll_once()
    assert outcome is not None and outcome.reloaded
    assert str(plain[0] / "30-c.yaml") in model.loaded_rules_files()
    assert model.reload_count == 1 and model.reload_ts_ns >= first_ts
    model.close()


def test_events_during_the_wait_start_the_debounce_over(plain: tuple[Path, Path, Path]) -> None:
    clock = FakeClock()
    model = make(plain, clock)
    model.start()
    for i in range(5):
        (plain[0] / f"3{i}-c.yaml").write_text(RULE_B)
        model.poll_once()
        clock.now += 0.05
    assert model.reload_count == 0
    settle(model, clock)
    assert model.reload_count == 1
    assert len(model.loaded_rules_files()) == 7
    model.close()


def test_a_refused_reload_keeps_the_old_set_and_alerts(plain: tuple[Path, Path, Path]) -> None:
    clock = FakeClock()
    received: list[dict[str, Any]] = []
    model = make(
        plain,
        clock,
        on_alert=received.append,
        hostname="node-1",
        wall_clock_ns=lambda: 1_700_000_000_123_456_789,
    )
    model.start()
    before = model.loaded_rules_files()
    (plain[0] / "20-b.yaml").write_text("INVALID\n")
    outcomes = settle(model, clock)
    assert [o.reloaded for o in outcomes] == [False]
    assert model.loaded_rules_files() == before
    [alert] = received
    assert alert == {
        "hostname": "node-1",
        "output": f"{HOT_RESTART_FAILURE_RULE}: {plain[0] / '20-b.yaml'}:2:3: rule 'r': refused by INVALID",
        "output_fields": {},
        "priority": "Critical",
        "rule": HOT_RESTART_FAILURE_RULE,
        "source": "internal",
        "time": "2023-11-14T22:13:20.123456789Z",
    }
    assert model.failed_reloads == 1
    # Fixing the file reloads it.
    (plain[0] / "20-b.yaml").write_text(RULE_B)
    settle(model, clock)
    assert model.reload_count == 1
    model.close()


def test_a_config_that_falco_cannot_merge_is_refused(plain: tuple[Path, Path, Path]) -> None:
    clock = FakeClock()
    model = make(plain, clock)
    model.start()
    (plain[1] / "20-y.yaml").write_text("load_plugins: {a: b}\nconfig_files: [/x]\n")
    [outcome] = settle(model, clock)
    assert not outcome.reloaded and "config_files" in outcome.error
    model.close()


def test_from_falco_yaml(tmp_path: Path, plain: tuple[Path, Path, Path]) -> None:
    falco_yaml = tmp_path / "falco-main.yaml"
    falco_yaml.write_text(
        f"rules_files:\n  - {plain[0]}\n  - {tmp_path}/missing.yaml\n"
        f"config_files:\n  - path: {plain[1]}\n    strategy: override\n"
    )
    model = FalcoReloadModel.from_falco_yaml(falco_yaml, rules_validator=refuses("INVALID"))
    assert model.config_entries == [ConfigEntry(plain[1], "override")]
    model.start()
    assert len(model.loaded_rules_files()) == 2
    model.close()


def test_swapping_a_symlink_alone_is_invisible_to_falco(tmp_path: Path) -> None:
    """Why the store pokes the old folders: inotify resolved `current` when the watch was added."""
    for gen, content in (("g1", RULE_A), ("g2", RULE_B)):
        (tmp_path / gen / "rules.d").mkdir(parents=True)
        (tmp_path / gen / "rules.d" / "10-x.yaml").write_text(content)
    (tmp_path / "current").symlink_to("g1")
    clock = FakeClock()
    model = FalcoReloadModel(
        [str(tmp_path / "current" / "rules.d")], clock=clock, rules_validator=refuses("INVALID")
    )
    model.start()
    (tmp_path / "next").symlink_to("g2")
    os.rename(tmp_path / "next", tmp_path / "current")
    settle(model, clock)
    assert model.reload_count == 0, "Falco does not see a symlink swap"
    os.mkdir(tmp_path / "g1" / "rules.d" / ".poke")
    os.rmdir(tmp_path / "g1" / "rules.d" / ".poke")
    settle(model, clock)
    assert model.reload_count == 1
    assert list(model.loaded.rules_contents.values()) == [RULE_B]  # type: ignore[union-attr]
    model.close()


def test_writing_files_one_by_one_exposes_a_mix(plain: tuple[Path, Path, Path]) -> None:
    """The hazard the store avoids: a reload between two single-file writes loads half a change."""
    clock = FakeClock()
    model = make(plain, clock)
    model.start()
    applied_a = "# v2\n" + RULE_A
    applied_b = "# v2\n" + RULE_B
    (plain[0] / "10-a.yaml").write_text(applied_a)
    settle(model, clock)  # Falco reloads before the second file is written
    (plain[0] / "20-b.yaml").write_text(applied_b)
    contents = [list(s.rules_contents.values()) for s in model.load_history]
    assert [applied_a, RULE_B] in contents, "a set that was never applied as a whole was loaded"
    settle(model, clock)
    assert list(model.loaded.rules_contents.values()) == [applied_a, applied_b]  # type: ignore[union-attr]
    model.close()


# The managed store seen through the double.


def store_and_model(tmp_path: Path, clock: Any, **kwargs: Any) -> tuple[ManagedStore, FalcoReloadModel]:
    # fsync off: these tests are about what Falco sees, not about power loss.
    store = ManagedStore.open(tmp_path / "managed", rules_validator=refuses("INVALID"), durable=False)
    main = tmp_path / "falco.yaml"
    main.write_text("priority: debug\n")
    kwargs.setdefault("rules_validator", refuses("INVALID"))
    model = FalcoReloadModel(
        [str(tmp_path / "falco_rules.yaml")],
        [store.config_file],
        main_config=main,
        clock=clock,
        **kwargs,
    )
    return store, model


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def config_hashes(text: str) -> dict[str, str]:
    pattern = r'falcosecurity_falco_sha256_config_files_info\{file_name="([^"]+)",sha256="([0-9a-f]+)"\} 1'
    return dict(re.findall(pattern, text))


def metrics_hashes(text: str) -> dict[str, str]:
    pattern = r'falcosecurity_falco_sha256_rules_files_info\{file_name="([^"]+)",sha256="([0-9a-f]+)"\} 1'
    return dict(re.findall(pattern, text))


def test_the_store_is_loaded_in_one_reload_and_confirmed_by_hash(tmp_path: Path) -> None:
    clock = FakeClock()
    store, model = store_and_model(tmp_path, clock)
    model.start()
    store.apply(
        [RulesetSpec("a", RULE_A, 10), RulesetSpec("b", RULE_B, 20)],
        [ConfigSpec("tune", {"priority": "notice"}, 10)],
    )
    assert [o.reloaded for o in settle(model, clock)] == [True]
    assert model.reload_count == 1
    reported = metrics_hashes(model.metrics_text())
    assert reported[STATE_MARKER_FILE] == store.state_marker_sha256()
    assert store.expected_rules_hashes().items() <= reported.items()
    assert model.loaded.effective_config["priority"] == "notice"  # type: ignore[union-attr]
    assert config_hashes(model.metrics_text()) == {"falco.yaml": sha_of(tmp_path / "falco.yaml")} | dict(
        store.expected_config_hashes()
    )
    store.mark_loaded(store.generation)
    assert store.get_ruleset("a").status.state is LoadState.LOADED
    # A second change, after GC removed the generation Falco was watching, is still seen.
    store.put_ruleset("c", RULE_B, 30)
    settle(model, clock)
    assert metrics_hashes(model.metrics_text())[STATE_MARKER_FILE] == store.state_marker_sha256()
    model.close()


def test_replacing_falco_api_yaml_alone_is_seen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit's rename deletes the inode Falco watches (IN_DELETE_SELF): enough without pokes."""
    monkeypatch.setattr("falco_api_sidecar.managed._Fs.poke", lambda self, folder: None)
    clock = FakeClock()
    store, model = store_and_model(tmp_path, clock)
    model.start()
    for i in range(3):
        store.put_ruleset("a", f"# {i}\n" + RULE_A, 10)
        settle(model, clock)
        assert metrics_hashes(model.metrics_text())[STATE_MARKER_FILE] == store.state_marker_sha256()
    assert model.reload_count == 3
    model.close()


def test_nudge_makes_falco_reload_what_it_runs(tmp_path: Path) -> None:
    clock = FakeClock()
    store, model = store_and_model(tmp_path, clock)
    model.start()
    store.put_ruleset("a", RULE_A, 10)
    settle(model, clock)
    before = model.loaded_rules_files()
    store.nudge_falco()
    settle(model, clock)
    assert model.reload_count == 2
    assert model.loaded_rules_files() == before
    model.close()


def test_falco_refuses_then_the_store_rolls_back(tmp_path: Path) -> None:
    clock = FakeClock()
    alerts: list[dict[str, Any]] = []
    # Falco is stricter than the store's validator here (e.g. a plugin it lacks).
    store, model = store_and_model(
        tmp_path, clock, rules_validator=refuses("NEEDS_PLUGIN"), on_alert=alerts.append
    )
    model.start()
    store.put_ruleset("a", RULE_A, 10)
    settle(model, clock)
    store.mark_loaded(store.generation)
    good = metrics_hashes(model.metrics_text())
    store.put_ruleset("b", "# NEEDS_PLUGIN\n" + RULE_B, 20)
    settle(model, clock)
    assert [a["rule"] for a in alerts] == [HOT_RESTART_FAILURE_RULE]
    assert metrics_hashes(model.metrics_text()) == good, "Falco keeps running the old set"
    store.mark_failed(store.generation, alerts[0]["output"])
    result = store.rollback_to_last_good()
    assert result.rolled_back
    settle(model, clock)
    assert metrics_hashes(model.metrics_text()) == good
    assert model.failed_reloads == 1
    model.close()


def views_of(store: ManagedStore) -> tuple[frozenset[tuple[str, str]], frozenset[tuple[str, str]]]:
    return frozenset(store.expected_rules_hashes().items()), frozenset(store.expected_config_hashes().items())


def loaded_views(loaded: LoadedSet) -> tuple[frozenset[tuple[str, str]], frozenset[tuple[str, str]]]:
    """The managed part of what the double loaded, named like Falco's /metrics labels."""
    managed_rules = re.compile(r"/generations/[0-9]{10}/rules\.d/[^/]+$")
    rules = frozenset(
        (os.path.basename(p), h) for p, h in loaded.rules_files.items() if managed_rules.search(p)
    )
    configs = frozenset(
        (os.path.basename(p), h) for p, h in loaded.config_files.items() if p.endswith("/falco-api.yaml")
    )
    return rules, configs


def test_falco_never_loads_a_mix_while_the_store_applies(tmp_path: Path) -> None:
    store, model = store_and_model(tmp_path, time.monotonic, debounce_s=0.005)
    model.start()
    applied_rules = {views_of(store)[0]}
    applied_configs = {views_of(store)[1]}
    stop = threading.Event()

    def falco_watcher() -> None:
        while not stop.is_set():
            model.poll_once()
            time.sleep(0.0005)  # a tight loop, but one that lets the writer have the GIL

    watcher = threading.Thread(target=falco_watcher)
    watcher.start()
    rng = random.Random(7)
    try:
        for i in range(200):
            names = rng.sample(["a", "b", "c", "d", "e"], rng.randint(0, 5))
            store.apply(
                [
                    RulesetSpec(
                        n, f"# {n} {rng.randint(0, 3)}\n" + RULE_A.replace("a_macro", f"{n}_macro"), 10
                    )
                    for n in names
                ],
                [ConfigSpec("tune", {"priority": rng.choice(["debug", "notice", "error"])}, 10)]
                if i % 3
                else [],
            )
            rules_view, configs_view = views_of(store)
            applied_rules.add(rules_view)
            applied_configs.add(configs_view)
            if store.generation % 10 == 0:
                store.mark_loaded(store.generation)
            time.sleep(rng.random() * 0.012)
        # Falco sets its watches after reading, so the last apply can land in between and go
        # unseen; the sidecar sees the marker hash lag behind and nudges, as done here.
        deadline = time.monotonic() + 5
        next_nudge = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            if model.loaded and loaded_views(model.loaded) == views_of(store):
                break
            if time.monotonic() > next_nudge:
                store.nudge_falco()
                next_nudge = time.monotonic() + 0.5
            time.sleep(0.01)
    finally:
        stop.set()
        watcher.join()
        model.close()
    assert model.reload_count >= 10, "the double reloaded during the applies"
    for loaded in model.load_history:
        rules_view, configs_view = loaded_views(loaded)
        assert rules_view in applied_rules, "Falco loaded a rules folder that was never applied"
        assert configs_view in applied_configs, "Falco loaded a config folder that was never applied"
    assert loaded_views(model.loaded) == views_of(store)  # type: ignore[arg-type]
