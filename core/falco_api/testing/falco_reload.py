"""The Falco double's model of loading and hot-reloading rules and config files (tests only).

It behaves like Falco 0.38-0.43 (userspace/falco/app/restart_handler.cpp,
app/actions/create_signal_handlers.cpp, configuration.cpp):

- What is watched, with inotify, when Falco (re)starts: the main config file and every config file
  listed in `config_files` (IN_CLOSE_WRITE | IN_MOVE_SELF | IN_DELETE_SELF), every config folder
  (IN_CREATE | IN_DELETE | IN_MOVE), every rules file, including each .yaml/.yml file found in a
  rules folder (file mask), and every rules folder (folder mask). Paths that do not exist at start are
  skipped and never watched. inotify resolves symlinks once, when the watch is added: swapping a
  symlink that a listed path goes through is not an event.
- Debounce: after an event, wait until 100 ms pass without events, then do a dry run (read and
  validate everything again); if it passes, wait another 100 ms without events, then restart and
  load what the files hold at that moment. An event during the waits starts over.
- `rules_files` is read from the merged configuration, so a config drop-in can append a rules
  folder (the managed store relies on this).
- A refused dry run keeps the running set and emits `Falco internal: hot restart failure`.
- At start, an invalid set is fatal.

Deterministic use in tests: `poll_once()` with an injected clock, or `check()` to reload at once.
Real-time use: `run()` (asyncio) polls every 25 ms.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import datetime as dt
import errno
import hashlib
import os
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from falco_api.configs import ConfigMergeError, MergeStrategy, merge_dropin
from falco_api.rules.model import RulesFile

HOT_RESTART_FAILURE_RULE = "Falco internal: hot restart failure"

# inotify masks Falco uses (restart_handler.cpp).
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
FILE_MASK = IN_CLOSE_WRITE | IN_MOVE_SELF | IN_DELETE_SELF
FOLDER_MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
_EVENT_HEADER = struct.Struct("iIII")

RulesCheck = Callable[[Sequence[RulesFile]], Sequence[Any]]


class FalcoStartError(RuntimeError):
    """Falco would exit at start-up: its rules or configuration cannot be loaded."""


@dataclass(frozen=True)
class ConfigEntry:
    """One `config_files` entry of falco.yaml."""

    path: Path
    strategy: MergeStrategy = "append"


@dataclass(frozen=True)
class LoadedSet:
    """Everything one read of the watched paths produced."""

    # the effective `rules_files` list (falco.yaml's, with what drop-ins appended)
    rules_paths: list[str]
    # path (as Falco composes it) -> sha256, in load order
    rules_files: dict[str, str]
    rules_contents: dict[str, str]
    # main config and every config file, folder contents included, in merge order
    config_files: dict[str, str]
    # only what Falco hashes in /metrics: the main config and config files listed directly
    hashed_config_files: dict[str, str]
    effective_config: dict[str, Any]


@dataclass
class ReloadOutcome:
    reloaded: bool
    error: str = ""


class _Inotify:
    """The few inotify calls needed, through libc (Linux only, like Falco's watcher)."""

    def __init__(self) -> None:
        libc_name = ctypes.util.find_library("c") or "libc.so.6"
        self._libc = ctypes.CDLL(libc_name, use_errno=True)
        fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.fd: int = fd

    def add_watch(self, path: str, mask: int) -> bool:
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), ctypes.c_uint32(mask))
        return bool(wd >= 0)

    def read_events(self) -> int:
        """How many events are pending (drains them)."""
        count = 0
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return count
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            offset = 0
            while offset + _EVENT_HEADER.size <= len(data):
                _, _, _, length = _EVENT_HEADER.unpack_from(data, offset)
                offset += _EVENT_HEADER.size + length
                count += 1

    def close(self) -> None:
        os.close(self.fd)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_yaml(path: str) -> bool:
    return path.endswith((".yaml", ".yml"))


def _folder_entries(folder: str) -> list[str]:
    """Regular files (symlinks followed) of a folder, sorted by full path like Falco."""
    paths = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            paths.append(path)
    return sorted(paths)


def _iso_time(ns: int) -> str:
    seconds, nanos = divmod(ns, 1_000_000_000)
    stamp = dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{nanos:09d}Z"


class FalcoReloadModel:
    """Loads rules and config files the way Falco does and reloads them on file events."""

    def __init__(
        self,
        rules_files: Sequence[str | Path],
        config_files: Sequence[str | Path | ConfigEntry] = (),
        *,
        main_config: Path | None = None,
        rules_validator: RulesCheck | None = None,
        on_alert: Callable[[dict[str, Any]], None] | None = None,
        hostname: str = "falco-double",
        debounce_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        wall_clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.rules_paths = [str(p) for p in rules_files]
        self.config_entries = [
            c if isinstance(c, ConfigEntry) else ConfigEntry(Path(c)) for c in config_files
        ]
        self.main_config = main_config
        self._rules_validator = rules_validator or _default_rules_validator
        self._on_alert = on_alert
        self.hostname = hostname
        self.debounce_s = debounce_s
        self._clock = clock
        self._wall_clock_ns = wall_clock_ns
        self._lock = threading.RLock()
        self._inotify: _Inotify | None = None
        self._last_event = 0.0
        self._should_check = False
        self._should_restart = False
        self.loaded: LoadedSet | None = None
        self.started = False
        self.start_error = ""
        self.reload_count = 0
        self.failed_reloads = 0
        self.reload_ts_ns = 0
        self.last_error = ""
        self.alerts: list[dict[str, Any]] = []
        self.load_history: list[LoadedSet] = []

    @classmethod
    def from_falco_yaml(cls, path: Path, **kwargs: Any) -> FalcoReloadModel:
        """Take `rules_files` (or the old `rules_file`) and `config_files` from a falco.yaml."""
        document = yaml.safe_load(path.read_text("utf-8")) or {}
        rules = document.get("rules_files", document.get("rules_file", [])) or []
        entries: list[ConfigEntry] = []
        for entry in document.get("config_files", []) or []:
            if isinstance(entry, Mapping):
                entries.append(ConfigEntry(Path(str(entry["path"])), entry.get("strategy", "append")))
            else:
                entries.append(ConfigEntry(Path(str(entry))))
        return cls([str(r) for r in rules], entries, main_config=path, **kwargs)

    # -- Falco's life cycle ---------------------------------------------------------------------

    def start(self) -> LoadedSet:
        """Falco's start-up: load everything or fail (FalcoStartError), then watch."""
        with self._lock:
            loaded, error = self._read_and_check()
            if loaded is None:
                self.start_error = error
                raise FalcoStartError(error)
            self._install(loaded)
            self.started = True
            return loaded

    def poll_once(self) -> ReloadOutcome | None:
        """One turn of Falco's watcher loop; returns the outcome when a dry run or restart happened."""
        with self._lock:
            if self._inotify is None:
                raise RuntimeError("start() first")
            now = self._clock()
            if self._inotify.read_events():
                # An event during a wait dismisses the pending restart and asks for a new dry run.
                self._should_check = True
                self._should_restart = False
                self._last_event = now
                return None
            if now - self._last_event < self.debounce_s:
                return None
            if self._should_check:
                self._should_check = False
                dry, error = self._read_and_check()
                if dry is None:
                    self._refuse(error)
                    return ReloadOutcome(False, error)
                self._should_restart = True
                self._last_event = now
                return None
            if self._should_restart:
                self._should_restart = False
                return self._restart()
            return None

    def check(self) -> ReloadOutcome:
        """Dry run and restart right now, ignoring the debounce (for deterministic tests)."""
        with self._lock:
            if self._inotify is not None:
                self._inotify.read_events()
            self._should_check = self._should_restart = False
            dry, error = self._read_and_check()
            if dry is None:
                self._refuse(error)
                return ReloadOutcome(False, error)
            return self._restart()

    async def run(self, interval_s: float = 0.025) -> None:
        """Poll until cancelled (start() must have succeeded)."""
        while True:
            self.poll_once()
            await asyncio.sleep(interval_s)

    def close(self) -> None:
        with self._lock:
            if self._inotify is not None:
                self._inotify.close()
                self._inotify = None

    # -- what Falco reports -----------------------------------------------------------------------

    def loaded_rules_files(self) -> dict[str, str]:
        """path -> sha256 of every rules file loaded, in load order."""
        with self._lock:
            return dict(self.loaded.rules_files) if self.loaded else {}

    def loaded_config_files(self) -> dict[str, str]:
        """path -> sha256 of the main config and every config file merged (folder contents too)."""
        with self._lock:
            return dict(self.loaded.config_files) if self.loaded else {}

    def metrics_text(self) -> str:
        """Prometheus text as Falco's /metrics serves it for what was loaded (labels: base names)."""
        with self._lock:
            loaded = self.loaded
            lines: list[str] = []
            for metric, files in (
                ("falcosecurity_falco_sha256_rules_files_info", loaded.rules_files if loaded else {}),
                (
                    "falcosecurity_falco_sha256_config_files_info",
                    loaded.hashed_config_files if loaded else {},
                ),
            ):
                lines.append(f"# HELP {metric} https://falco.org/docs/metrics/")
                lines.append(f"# TYPE {metric} gauge")
                for path, sha in files.items():
                    lines.append(f'{metric}{{file_name="{_label(os.path.basename(path))}",sha256="{sha}"}} 1')
            lines += [
                "# HELP falcosecurity_falco_reload_timestamp_nanoseconds https://falco.org/docs/metrics/",
                "# TYPE falcosecurity_falco_reload_timestamp_nanoseconds gauge",
                f"falcosecurity_falco_reload_timestamp_nanoseconds {self.reload_ts_ns}",
                "# HELP falco_double_reloads_total Hot reloads by the Falco double (not a Falco metric).",
                "# TYPE falco_double_reloads_total counter",
                f"falco_double_reloads_total {self.reload_count}",
            ]
            return "\n".join(lines) + "\n"

    # -- internals ----------------------------------------------------------------------------------

    def _refuse(self, error: str) -> None:
        self.failed_reloads += 1
        self.last_error = error
        now = self._wall_clock_ns()
        alert = {
            "hostname": self.hostname,
            "output": f"{HOT_RESTART_FAILURE_RULE}: {error}",
            "output_fields": {},
            "priority": "Critical",
            "rule": HOT_RESTART_FAILURE_RULE,
            "source": "internal",
            "time": _iso_time(now),
        }
        self.alerts.append(alert)
        if self._on_alert is not None:
            self._on_alert(alert)

    def _restart(self) -> ReloadOutcome:
        # The real restart re-reads every file: what loads is what is on disk now, not what the
        # dry run saw.
        loaded, error = self._read_and_check()
        if loaded is None:
            # Falco exits when the real run fails after a passing dry run; the double records it.
            self._refuse(error)
            return ReloadOutcome(False, error)
        self._install(loaded)
        self.reload_count += 1
        return ReloadOutcome(True)

    def _install(self, loaded: LoadedSet) -> None:
        self.loaded = loaded
        self.load_history.append(loaded)
        self.reload_ts_ns = self._wall_clock_ns()
        self._watch(loaded)

    def _watch(self, loaded: LoadedSet) -> None:
        if self._inotify is not None:
            self._inotify.close()
        watcher = _Inotify()
        for path in self._config_watch_files():
            watcher.add_watch(path, FILE_MASK)
        for entry in self.config_entries:
            if entry.path.is_dir():
                watcher.add_watch(str(entry.path), FOLDER_MASK)
        for path in loaded.rules_files:
            watcher.add_watch(path, FILE_MASK)
        for path in loaded.rules_paths:
            if os.path.isdir(path):
                watcher.add_watch(path, FOLDER_MASK)
        self._inotify = watcher
        self._should_check = self._should_restart = False

    def _config_watch_files(self) -> list[str]:
        files = [str(self.main_config)] if self.main_config is not None else []
        files += [str(e.path) for e in self.config_entries if e.path.is_file()]
        return files

    def _read_and_check(self) -> tuple[LoadedSet | None, str]:
        try:
            effective, config_files, hashed = self._read_configs()
        except (OSError, ConfigMergeError, ValueError, yaml.YAMLError) as exc:
            return None, f"Error reading config file: {exc}"
        rules_paths = _string_list(effective.get("rules_files", effective.get("rules_file", [])))
        rules: dict[str, str] = {}
        contents: dict[str, str] = {}
        try:
            for listed in rules_paths:
                if not os.path.exists(listed):
                    continue  # Falco skips rules_files entries that do not exist
                candidates = _folder_entries(listed) if os.path.isdir(listed) else [listed]
                for path in candidates:
                    if not _is_yaml(path):
                        continue
                    data = Path(path).read_bytes()
                    rules[path] = _sha256(data)
                    contents[path] = data.decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            return None, f"Could not read rules file: {exc}"
        findings = self._rules_validator([RulesFile(p, c) for p, c in contents.items()])
        errors = [f for f in findings if getattr(f, "severity", "error") == "error"]
        if errors:
            return None, "; ".join(str(f) for f in errors)
        return LoadedSet(rules_paths, rules, contents, config_files, hashed, effective), ""

    def _read_configs(self) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
        config_files: dict[str, str] = {}
        hashed: dict[str, str] = {}
        merged: dict[str, Any] = {}
        if self.main_config is not None:
            data = self.main_config.read_bytes()
            merged = _mapping(data, str(self.main_config))
            config_files[str(self.main_config)] = hashed[str(self.main_config)] = _sha256(data)
        if self.rules_paths:
            # The rules files given to the double stand for falco.yaml's own `rules_files` list.
            merged["rules_files"] = list(self.rules_paths)
        for entry in self.config_entries:
            if not entry.path.exists():
                continue
            direct = entry.path.is_file()
            paths = [str(entry.path)] if direct else _folder_entries(str(entry.path))
            for path in paths:
                data = Path(path).read_bytes()
                merged = merge_dropin(merged, _mapping(data, path), entry.strategy)
                config_files[path] = _sha256(data)
                if direct:
                    hashed[path] = config_files[path]
        return merged, config_files, hashed


def _mapping(data: bytes, name: str) -> dict[str, Any]:
    loaded = yaml.safe_load(data.decode("utf-8"))
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{name}: a config file must be a mapping")
    return loaded


def _string_list(value: object) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    return [] if value is None else [str(value)]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _default_rules_validator(files: Sequence[RulesFile]) -> Sequence[Any]:
    from falco_api.rules import validate_rules

    return validate_rules(files)
