"""The managed rules and config drop-in files that Falco loads: an atomic, crash-safe store.

Layout under the managed root (default /etc/falco/falco-api), see docs/managed-files.md:

    falco-api.yaml                           THE file Falco is told about (falco.yaml config_files);
                                             the managed drop-ins merged, plus `rules_files:` naming
                                             the current generation's rules folder
    generations/0000000007/rules.d/NN-name.yaml, falco-api-state.yaml
    generations/0000000007/config.d/NN-name.yaml   each drop-in as given (a record; Falco reads the
                                             merged falco-api.yaml)
    generations/0000000007/index.json        names, orders, hashes, versions (never read by Falco)
    state.json                               Falco's verdicts and the last-known-good generation

Generations are immutable. An apply builds a complete new generation beside the old ones (unchanged
files are hard links: their inodes and mtimes stay), then replaces falco-api.yaml with one rename:
that rename is the commit point and the one change Falco sees (inotify IN_DELETE_SELF on the old
file's inode). Every read Falco makes is consistent: it reads falco-api.yaml once (old or new, never a
mix) and then a folder that never changes. A folder swapped behind a symlink would not be: Falco
lists a folder and opens its files by path afterwards, so a swap between the two mixes generations.

Every file is written to a temp name, fsynced and renamed, and every folder fsynced, so a kill at
any instant leaves falco-api.yaml naming either the old or the new complete generation.

All methods do blocking file I/O; the async sidecar calls them through asyncio.to_thread. A lock
serialises them, so concurrent calls are safe.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import yaml

from falco_api.configs import (
    ConfigFinding,
    ConfigMergeError,
    canonical_dropin_yaml,
    compute_state_sha256,
    content_sha256,
    merge_dropins,
    read_base_config,
    validate_dropin_set,
)
from falco_api.rules.model import RulesFile

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/etc/falco/falco-api")
LIVE_CONFIG_FILE = "falco-api.yaml"
GENERATIONS_DIR = "generations"
RULES_DIR = "rules.d"
CONFIG_DIR = "config.d"
INDEX_FILE = "index.json"
STATE_FILE = "state.json"
# A comment-only rules file whose hash names the whole managed state; Falco reports its sha256 in
# /metrics like any rules file, which proves it loaded this exact set. User files always start with
# two digits, so this name cannot collide with one.
STATE_MARKER_FILE = "falco-api-state.yaml"

_TMP_PREFIX = ".tmp-"
_BUILDING_PREFIX = ".building-"
_TRIGGER_NAME = ".falco-api-reload"
_INDEX_FORMAT = 1
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_GENERATION_RE = re.compile(r"[0-9]{10}")
_RULES_PATH_RE = re.compile(r"(?:^|/)generations/([0-9]{10})/rules\.d/?$")
MAX_ORDER = 99


class FindingLike(Protocol):
    """What the store needs from a validation finding (rules and config findings both fit)."""

    @property
    def file(self) -> str: ...
    @property
    def item_kind(self) -> str: ...
    @property
    def item_name(self) -> str: ...
    @property
    def line(self) -> int: ...
    @property
    def column(self) -> int: ...
    @property
    def message(self) -> str: ...
    @property
    def severity(self) -> str: ...


RulesValidator = Callable[[Sequence[RulesFile]], Sequence[FindingLike]]
ConfigValidator = Callable[
    [Sequence[tuple[str, Mapping[str, Any]]], Mapping[str, Any] | None], Sequence[FindingLike]
]


def default_rules_validator(files: Sequence[RulesFile]) -> Sequence[FindingLike]:
    """The project's rules validator (falco_api.rules), imported when first used."""
    from falco_api.rules import validate_rules

    return validate_rules(files)


def default_config_validator(
    dropins: Sequence[tuple[str, Mapping[str, Any]]], base: Mapping[str, Any] | None
) -> Sequence[FindingLike]:
    return validate_dropin_set(dropins, base)


class LoadState(enum.Enum):
    PENDING = "PENDING"
    LOADED = "LOADED"
    FAILED = "FAILED"
    UNKNOWN = "UNKNOWN"


@dataclass(frozen=True)
class LoadStatus:
    state: LoadState
    message: str = ""
    # Unix time in seconds when the state was entered.
    since: float = 0.0


@dataclass(frozen=True)
class RulesetSpec:
    """A ruleset as a client asks for it."""

    name: str
    content: str
    order: int


@dataclass(frozen=True)
class ConfigSpec:
    """A config drop-in as a client asks for it: `settings` is a subtree of falco.yaml."""

    name: str
    settings: Mapping[str, Any]
    order: int


@dataclass(frozen=True)
class ManagedRuleset:
    name: str
    content: str
    order: int
    sha256: str
    version: int
    status: LoadStatus
    # The file's name in the managed rules folder, `NN-name.yaml`.
    file_name: str


@dataclass(frozen=True)
class ManagedConfig:
    name: str
    settings: dict[str, Any]
    # The exact YAML written to disk (its sha256 is `sha256`).
    content: str
    order: int
    sha256: str
    version: int
    status: LoadStatus
    file_name: str


@dataclass(frozen=True)
class WriteResult:
    """The outcome of a write (or of a dry run: then nothing was written)."""

    changed: bool
    generation: int
    state_sha256: str
    status: LoadStatus
    rulesets: list[ManagedRuleset]
    configs: list[ManagedConfig]
    # Non-blocking findings (warnings); errors raise ValidationFailedError instead.
    warnings: list[FindingLike] = field(default_factory=list)
    rolled_back: bool = False
    dry_run: bool = False


@dataclass(frozen=True)
class RecoveryReport:
    """What open() found and cleaned after an unclean stop."""

    generation: int
    removed: list[str]
    triggered: bool
    created: bool


class ManagedError(Exception):
    """Base of every error the store raises on purpose."""


class InvalidRequestError(ManagedError, ValueError):
    """A name, order or request shape that can never be accepted."""


class NotFoundError(ManagedError, LookupError):
    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"{kind} '{name}' does not exist")
        self.kind = kind
        self.name = name


class VersionConflictError(ManagedError):
    def __init__(self, kind: str, name: str, expected: int, actual: int) -> None:
        if expected == 0:
            detail = f"expected it not to exist, but it is at version {actual}"
        elif actual == 0:
            detail = f"expected version {expected}, but it does not exist"
        else:
            detail = f"expected version {expected}, but it is at version {actual}"
        super().__init__(f"{kind} '{name}': {detail}")
        self.kind = kind
        self.name = name
        self.expected = expected
        self.actual = actual


class ValidationFailedError(ManagedError):
    def __init__(self, findings: Sequence[FindingLike]) -> None:
        self.findings = list(findings)
        errors = [f for f in self.findings if f.severity == "error"]
        lines = "\n".join(f"  {f}" for f in errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        super().__init__(f"refused, nothing was written: {len(errors)} validation error(s)\n{lines}{more}")


class CorruptStoreError(ManagedError):
    """The managed root holds something this store did not write; it refuses to guess."""


class NoLastGoodError(ManagedError):
    """A rollback was asked for, but Falco never confirmed any generation."""


def check_name(name: object, kind: str = "name") -> str:
    """The name if it is safe as a file name part, else InvalidRequestError saying why."""
    if not isinstance(name, str):
        raise InvalidRequestError(f"{kind} must be a string, got {type(name).__name__}")
    if not name:
        raise InvalidRequestError(f"{kind} must not be empty")
    if len(name) > 63:
        raise InvalidRequestError(
            f"{kind} '{name[:70]}' is {len(name)} characters long; at most 63 are allowed"
        )
    if "/" in name or "\\" in name or "\x00" in name:
        raise InvalidRequestError(f"{kind} {name!r} must not contain path separators")
    if ".." in name:
        raise InvalidRequestError(f"{kind} {name!r} must not contain '..'")
    if not _NAME_RE.fullmatch(name):
        raise InvalidRequestError(
            f"{kind} {name!r} must be 1-63 characters of A-Z, a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_order(order: object, kind: str = "order") -> int:
    if isinstance(order, bool) or not isinstance(order, int):
        raise InvalidRequestError(f"{kind} must be an integer from 0 to {MAX_ORDER}, got {order!r}")
    if not 0 <= order <= MAX_ORDER:
        raise InvalidRequestError(f"{kind} must be from 0 to {MAX_ORDER}, got {order}")
    return order


def file_name_for(name: str, order: int) -> str:
    return f"{order:02d}-{name}.yaml"


def state_marker_content(state_sha256: str) -> str:
    return f"# falco-api managed state {state_sha256}\n# Written by the falco-api sidecar; do not edit.\n"


# ---------------------------------------------------------------------------------------------------
# The pure state model.


@dataclass(frozen=True)
class _Item:
    name: str
    order: int
    content: str
    sha256: str
    version: int

    @property
    def file_name(self) -> str:
        return file_name_for(self.name, self.order)


@dataclass(frozen=True)
class _State:
    generation: int
    rules: Mapping[str, _Item]
    configs: Mapping[str, _Item]
    # The last version of deleted items, so a re-created name continues from there: a client that
    # remembers version 3 of the old item can never overwrite a new one by mistake.
    tombstones: Mapping[str, Mapping[str, int]]

    @property
    def state_sha256(self) -> str:
        return compute_state_sha256(
            ((i.name, i.order, i.sha256) for i in self.rules.values()),
            ((i.name, i.order, i.sha256) for i in self.configs.values()),
        )

    def same_content(self, other: _State) -> bool:
        return _fingerprint(self.rules) == _fingerprint(other.rules) and _fingerprint(
            self.configs
        ) == _fingerprint(other.configs)

    def rules_in_load_order(self) -> list[_Item]:
        return sorted(self.rules.values(), key=lambda i: i.file_name)

    def configs_in_load_order(self) -> list[_Item]:
        return sorted(self.configs.values(), key=lambda i: i.file_name)


def _fingerprint(items: Mapping[str, _Item]) -> set[tuple[str, int, str]]:
    return {(i.name, i.order, i.sha256) for i in items.values()}


def _next_items(
    current: Mapping[str, _Item], desired: Mapping[str, tuple[str, int]], tombstones: Mapping[str, int]
) -> tuple[dict[str, _Item], dict[str, int]]:
    items: dict[str, _Item] = {}
    new_tombstones = dict(tombstones)
    for name, (content, order) in desired.items():
        sha = content_sha256(content)
        old = current.get(name)
        if old is not None and old.sha256 == sha and old.order == order:
            items[name] = old
            continue
        previous = old.version if old is not None else tombstones.get(name, 0)
        items[name] = _Item(name, order, content, sha, previous + 1)
        new_tombstones.pop(name, None)
    for name, old in current.items():
        if name not in desired:
            new_tombstones[name] = old.version
    return items, new_tombstones


def _next_state(
    current: _State,
    rules: Mapping[str, tuple[str, int]],
    configs: Mapping[str, tuple[str, int]],
) -> _State:
    new_rules, rules_tombstones = _next_items(current.rules, rules, current.tombstones.get("rules", {}))
    new_configs, config_tombstones = _next_items(
        current.configs, configs, current.tombstones.get("configs", {})
    )
    return _State(
        current.generation,
        new_rules,
        new_configs,
        {"rules": rules_tombstones, "configs": config_tombstones},
    )


# ---------------------------------------------------------------------------------------------------
# File system steps, each announced to an optional fault hook so tests can kill an apply anywhere.


class _Fs:
    def __init__(self, fault: Callable[[str], None] | None, durable: bool = True) -> None:
        self._fault = fault
        self._durable = durable

    def step(self, label: str) -> None:
        if self._fault is not None:
            self._fault(label)

    def mkdir(self, path: Path) -> None:
        self.step(f"mkdir {path.name}")
        path.mkdir(mode=0o755)

    def write_atomic(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{secrets.token_hex(4)}")
        self.step(f"create {tmp.name}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
                self.step(f"write {tmp.name}")
            self.step(f"fsync {tmp.name}")
            if self._durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        self.step(f"rename {tmp.name} -> {path.name}")
        os.rename(tmp, path)
        self.fsync_dir(path.parent)

    def link(self, source: Path, target: Path) -> None:
        self.step(f"link {target.name}")
        os.link(source, target)

    def fsync_dir(self, path: Path) -> None:
        self.step(f"fsync dir {path.name}")
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if self._durable:
                os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, source: Path, target: Path) -> None:
        self.step(f"rename {source.name} -> {target.name}")
        os.rename(source, target)

    def poke(self, folder: Path) -> None:
        # A directory, not a file: Falco loads every regular file of a config folder, never a directory.
        trigger = folder / _TRIGGER_NAME
        self.step(f"poke {folder.parent.name}/{folder.name}")
        with contextlib.suppress(FileExistsError):
            os.mkdir(trigger)
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(trigger)

    def remove_tree(self, path: Path) -> None:
        self.step(f"remove {path.name}")
        if path.is_symlink() or path.is_file():
            path.unlink()
        else:
            shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------------


class ManagedStore:
    """The managed rulesets and config drop-ins of one node. Create it with ManagedStore.open()."""

    def __init__(
        self,
        root: Path,
        *,
        rules_validator: RulesValidator | None = None,
        config_validator: ConfigValidator | None = None,
        base_config_path: Path | None = None,
        preceding_rules_files: Sequence[Path] = (),
        falco_root: Path | None = None,
        gc_grace_s: float = 60.0,
        fault: Callable[[str], None] | None = None,
        durable: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root)
        # Where Falco's container sees the managed root (it may mount the volume elsewhere).
        self.falco_root = Path(falco_root) if falco_root is not None else self.root
        # Superseded generations stay this long, so a Falco reload that read the previous
        # falco-api.yaml can still read the folder it names.
        self._gc_grace_s = gc_grace_s
        self._superseded: dict[int, float] = {}
        self._rules_validator: RulesValidator = rules_validator or default_rules_validator
        self._config_validator: ConfigValidator = config_validator or default_config_validator
        self._base_config_path = base_config_path
        self._preceding_rules_files = list(preceding_rules_files)
        # durable=False skips fsync: only for tests that need speed, never for a real node.
        self._fs = _Fs(fault, durable)
        self._clock = clock
        self._lock = threading.RLock()
        self._state: _State | None = None
        self._last_good: int | None = None
        self._statuses: dict[int, LoadStatus] = {}
        self.recovery: RecoveryReport | None = None

    @classmethod
    def open(cls, root: Path, **kwargs: Any) -> ManagedStore:
        """Load the managed state, recovering from an unclean stop; create the layout if missing."""
        store = cls(root, **kwargs)
        store.recovery = store._recover()
        return store

    # -- paths Falco must be configured with ------------------------------------------------------

    @property
    def config_file(self) -> Path:
        """The file to list in falco.yaml `config_files` (as the sidecar sees it)."""
        return self.root / LIVE_CONFIG_FILE

    @property
    def falco_config_file(self) -> Path:
        """The same file as Falco sees it: the entry falco.yaml's `config_files` must hold."""
        return self.falco_root / LIVE_CONFIG_FILE

    @property
    def rules_dir(self) -> Path:
        """The current generation's rules folder (read-only; Falco learns it from falco-api.yaml)."""
        return self._generation_dir(self._current().generation) / RULES_DIR

    @property
    def config_dir(self) -> Path:
        """The current generation's record of the drop-ins as given (Falco reads falco-api.yaml)."""
        return self._generation_dir(self._current().generation) / CONFIG_DIR

    # -- reads ---------------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return self._current().generation

    @property
    def last_good_generation(self) -> int | None:
        return self._last_good

    @property
    def state_sha256(self) -> str:
        return self._current().state_sha256

    def status(self, generation: int | None = None) -> LoadStatus:
        """Falco's verdict on a generation (the current one by default)."""
        with self._lock:
            gen = self._current().generation if generation is None else generation
            return self._statuses.get(gen, LoadStatus(LoadState.PENDING))

    def list_rulesets(self) -> list[ManagedRuleset]:
        """The managed rulesets in Falco's load order."""
        with self._lock:
            state = self._current()
            return [self._ruleset_view(state, item) for item in state.rules_in_load_order()]

    def get_ruleset(self, name: str) -> ManagedRuleset:
        with self._lock:
            state = self._current()
            item = state.rules.get(name)
            if item is None:
                raise NotFoundError("ruleset", name)
            return self._ruleset_view(state, item)

    def list_configs(self) -> list[ManagedConfig]:
        """The managed config drop-ins in Falco's merge order."""
        with self._lock:
            state = self._current()
            return [self._config_view(state, item) for item in state.configs_in_load_order()]

    def get_config(self, name: str) -> ManagedConfig:
        with self._lock:
            state = self._current()
            item = state.configs.get(name)
            if item is None:
                raise NotFoundError("config drop-in", name)
            return self._config_view(state, item)

    def expected_rules_hashes(self) -> dict[str, str]:
        """file name -> sha256 that Falco's /metrics shows once it has loaded the current state.

        Falco labels `falcosecurity_falco_sha256_rules_files_info` with the file's base name.
        """
        with self._lock:
            state = self._current()
            expected = {i.file_name: i.sha256 for i in state.rules.values()}
            expected[STATE_MARKER_FILE] = content_sha256(state_marker_content(state.state_sha256))
            return expected

    def expected_config_hashes(self) -> dict[str, str]:
        """file name -> sha256 that Falco's /metrics shows (sha256_config_files_info) once loaded."""
        with self._lock:
            return {LIVE_CONFIG_FILE: content_sha256(self._live_config_content(self._current()))}

    def state_marker_sha256(self) -> str:
        """The sha256 of the state marker file: seeing it in Falco's metrics means the whole set loaded."""
        return content_sha256(state_marker_content(self.state_sha256))

    # -- writes --------------------------------------------------------------------------------

    def put_ruleset(
        self,
        name: str,
        content: str,
        order: int,
        *,
        expected_version: int | None = None,
        dry_run: bool = False,
    ) -> WriteResult:
        check_name(name, "ruleset name")
        check_order(order, "ruleset order")
        if not isinstance(content, str):
            raise InvalidRequestError("ruleset content must be text")
        with self._lock:
            state = self._current()
            self._check_version("ruleset", name, state.rules.get(name), expected_version)
            rules = _desired(state.rules)
            rules[name] = (content, order)
            return self._write(state, rules, _desired(state.configs), dry_run=dry_run)

    def delete_ruleset(
        self, name: str, *, expected_version: int | None = None, dry_run: bool = False
    ) -> WriteResult:
        check_name(name, "ruleset name")
        with self._lock:
            state = self._current()
            if name not in state.rules:
                raise NotFoundError("ruleset", name)
            self._check_version("ruleset", name, state.rules.get(name), expected_version)
            rules = _desired(state.rules)
            del rules[name]
            return self._write(state, rules, _desired(state.configs), dry_run=dry_run)

    def put_config(
        self,
        name: str,
        settings: Mapping[str, Any],
        order: int,
        *,
        expected_version: int | None = None,
        dry_run: bool = False,
    ) -> WriteResult:
        check_name(name, "config drop-in name")
        check_order(order, "config drop-in order")
        content = _config_content(name, settings)
        with self._lock:
            state = self._current()
            self._check_version("config drop-in", name, state.configs.get(name), expected_version)
            configs = _desired(state.configs)
            configs[name] = (content, order)
            return self._write(state, _desired(state.rules), configs, dry_run=dry_run)

    def delete_config(
        self, name: str, *, expected_version: int | None = None, dry_run: bool = False
    ) -> WriteResult:
        check_name(name, "config drop-in name")
        with self._lock:
            state = self._current()
            if name not in state.configs:
                raise NotFoundError("config drop-in", name)
            self._check_version("config drop-in", name, state.configs.get(name), expected_version)
            configs = _desired(state.configs)
            del configs[name]
            return self._write(state, _desired(state.rules), configs, dry_run=dry_run)

    def apply(
        self, rulesets: Sequence[RulesetSpec], configs: Sequence[ConfigSpec], *, dry_run: bool = False
    ) -> WriteResult:
        """Replace the whole managed state: anything not listed is removed. Falco sees one change."""
        rules: dict[str, tuple[str, int]] = {}
        for spec in rulesets:
            check_name(spec.name, "ruleset name")
            check_order(spec.order, f"order of ruleset '{spec.name}'")
            if not isinstance(spec.content, str):
                raise InvalidRequestError(f"content of ruleset '{spec.name}' must be text")
            if spec.name in rules:
                raise InvalidRequestError(f"ruleset '{spec.name}' is listed twice")
            rules[spec.name] = (spec.content, spec.order)
        dropins: dict[str, tuple[str, int]] = {}
        for config in configs:
            check_name(config.name, "config drop-in name")
            check_order(config.order, f"order of config drop-in '{config.name}'")
            if config.name in dropins:
                raise InvalidRequestError(f"config drop-in '{config.name}' is listed twice")
            dropins[config.name] = (_config_content(config.name, config.settings), config.order)
        with self._lock:
            return self._write(self._current(), rules, dropins, dry_run=dry_run)

    def validate_rulesets(
        self, rulesets: Sequence[RulesetSpec], *, standalone: bool = False
    ) -> list[FindingLike]:
        """Findings for `rulesets` loaded with the managed set (same names replace managed ones)."""
        for spec in rulesets:
            check_name(spec.name, "ruleset name")
            check_order(spec.order, f"order of ruleset '{spec.name}'")
        with self._lock:
            state = self._current()
            rules = {} if standalone else _desired(state.rules)
            for spec in rulesets:
                rules[spec.name] = (spec.content, spec.order)
            candidate = _next_state(state, rules, _desired(state.configs))
            return list(self._validate_rules(candidate, include_preceding=not standalone))

    # -- Falco's verdicts ----------------------------------------------------------------------

    def mark_loaded(self, generation: int, message: str = "") -> None:
        """Falco reported this generation's hashes: it becomes the last-known-good one."""
        with self._lock:
            self._statuses[generation] = LoadStatus(LoadState.LOADED, message, self._clock())
            newer = self._last_good is None or generation > self._last_good
            if newer and self._generation_dir(generation).is_dir():
                self._last_good = generation
            self._save_statuses()
            self._collect_garbage()

    def mark_failed(self, generation: int, message: str) -> None:
        """Falco refused this generation (hot restart failure); call rollback_to_last_good() next."""
        self._mark(generation, LoadStatus(LoadState.FAILED, message, self._clock()))

    def mark_unknown(self, generation: int, message: str) -> None:
        """No verdict from Falco in time; the files stay in place."""
        self._mark(generation, LoadStatus(LoadState.UNKNOWN, message, self._clock()))

    def rollback_to_last_good(self) -> WriteResult:
        """Write the last-known-good state back as a new generation (no validation: Falco ran it).

        Items that change get a new version, so a client holding the refused version cannot
        overwrite the restored one by accident.
        """
        with self._lock:
            if self._last_good is None:
                raise NoLastGoodError(
                    "Falco has not confirmed any managed state yet; nothing to roll back to"
                )
            good = self._read_generation(self._last_good)
            state = self._current()
            result = self._write(state, _desired(good.rules), _desired(good.configs), validate=False)
            return replace(result, rolled_back=True)

    # -- internals -------------------------------------------------------------------------------

    def _current(self) -> _State:
        if self._state is None:
            raise ManagedError("the store is not open; use ManagedStore.open()")
        return self._state

    def _check_version(self, kind: str, name: str, item: _Item | None, expected: int | None) -> None:
        if expected is None:
            return
        if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
            raise InvalidRequestError(f"expected_version must be a non-negative integer, got {expected!r}")
        actual = item.version if item is not None else 0
        if actual != expected:
            raise VersionConflictError(kind, name, expected, actual)

    def _mark(self, generation: int, status: LoadStatus) -> None:
        with self._lock:
            self._statuses[generation] = status
            self._save_statuses()

    def _write(
        self,
        state: _State,
        rules: Mapping[str, tuple[str, int]],
        configs: Mapping[str, tuple[str, int]],
        *,
        dry_run: bool = False,
        validate: bool = True,
    ) -> WriteResult:
        candidate = _next_state(state, rules, configs)
        changed = not candidate.same_content(state)
        findings: list[FindingLike] = []
        if validate and (changed or dry_run):
            findings = self._validate(candidate)
            if any(f.severity == "error" for f in findings):
                raise ValidationFailedError(findings)
        warnings = [f for f in findings if f.severity != "error"]
        if dry_run or not changed:
            view_state = candidate if dry_run else state
            return WriteResult(
                changed=changed,
                generation=state.generation,
                state_sha256=view_state.state_sha256,
                status=self.status(state.generation),
                rulesets=[self._ruleset_view(view_state, i) for i in view_state.rules_in_load_order()],
                configs=[self._config_view(view_state, i) for i in view_state.configs_in_load_order()],
                warnings=warnings,
                dry_run=dry_run,
            )
        new_state = replace(candidate, generation=self._next_generation_number())
        self._commit(state, new_state)
        return WriteResult(
            changed=True,
            generation=new_state.generation,
            state_sha256=new_state.state_sha256,
            status=self.status(new_state.generation),
            rulesets=self.list_rulesets(),
            configs=self.list_configs(),
            warnings=warnings,
        )

    def _validate(self, candidate: _State) -> list[FindingLike]:
        findings: list[FindingLike] = list(self._validate_rules(candidate, include_preceding=True))
        dropins = [(i.name, _parse_config(i.content)) for i in candidate.configs_in_load_order()]
        base, _ = read_base_config(self._base_config_path)
        findings.extend(self._config_validator(dropins, base))
        return findings

    def _validate_rules(self, candidate: _State, *, include_preceding: bool) -> Sequence[FindingLike]:
        files: list[RulesFile] = []
        findings: list[FindingLike] = []
        if include_preceding:
            for path in self._preceding_rules_files:
                try:
                    files.append(RulesFile(str(path), path.read_text("utf-8")))
                except (OSError, UnicodeDecodeError) as exc:
                    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                    findings.append(
                        ConfigFinding(
                            str(path),
                            f"not validated with the managed rulesets: cannot read it ({reason})",
                            severity="warning",
                            item_kind="file",
                        )
                    )
        files.extend(RulesFile(item.name, item.content) for item in candidate.rules_in_load_order())
        if files:
            findings.extend(self._rules_validator(files))
        return findings

    def _ruleset_view(self, state: _State, item: _Item) -> ManagedRuleset:
        return ManagedRuleset(
            item.name,
            item.content,
            item.order,
            item.sha256,
            item.version,
            self._item_status(state, "rules", item),
            item.file_name,
        )

    def _config_view(self, state: _State, item: _Item) -> ManagedConfig:
        return ManagedConfig(
            item.name,
            _parse_config(item.content),
            item.content,
            item.order,
            item.sha256,
            item.version,
            self._item_status(state, "configs", item),
            item.file_name,
        )

    def _item_status(self, state: _State, kind: str, item: _Item) -> LoadStatus:
        current = self._statuses.get(state.generation, LoadStatus(LoadState.PENDING))
        if (
            current.state is LoadState.LOADED
            or self._last_good is None
            or self._last_good == state.generation
        ):
            return current
        # Falco still runs the last-known-good set: an item it holds unchanged is loaded already.
        good = self._good_fingerprints()
        if (kind, item.name, item.order, item.sha256) in good:
            return self._statuses.get(self._last_good, LoadStatus(LoadState.LOADED))
        return current

    def _good_fingerprints(self) -> set[tuple[str, str, int, str]]:
        if self._last_good is None:
            return set()
        if self._good_cache is None or self._good_cache[0] != self._last_good:
            try:
                good = self._read_generation(self._last_good)
            except ManagedError:
                return set()
            prints = {("rules", i.name, i.order, i.sha256) for i in good.rules.values()}
            prints |= {("configs", i.name, i.order, i.sha256) for i in good.configs.values()}
            self._good_cache = (self._last_good, prints)
        return self._good_cache[1]

    _good_cache: tuple[int, set[tuple[str, str, int, str]]] | None = None

    # -- disk layout -----------------------------------------------------------------------------

    @property
    def _generations(self) -> Path:
        return self.root / GENERATIONS_DIR

    def _generation_dir(self, generation: int) -> Path:
        return self._generations / f"{generation:010d}"

    def _generation_numbers(self) -> list[int]:
        numbers = []
        for entry in os.listdir(self._generations):
            if _GENERATION_RE.fullmatch(entry):
                numbers.append(int(entry))
            elif entry.startswith(_BUILDING_PREFIX) and _GENERATION_RE.fullmatch(
                entry[len(_BUILDING_PREFIX) :]
            ):
                numbers.append(int(entry[len(_BUILDING_PREFIX) :]))
        return sorted(numbers)

    def _next_generation_number(self) -> int:
        numbers = self._generation_numbers()
        return max([*numbers, self._current().generation]) + 1

    def _current_target(self) -> int | None:
        path = self.root / LIVE_CONFIG_FILE
        try:
            document = yaml.safe_load(path.read_text("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise CorruptStoreError(f"cannot read {path}: {exc}") from exc
        entries = document.get("rules_files") if isinstance(document, dict) else None
        for entry in entries if isinstance(entries, list) else []:
            match = _RULES_PATH_RE.search(str(entry))
            if match:
                return int(match.group(1))
        raise CorruptStoreError(f"{path} names no managed generation; this store did not write it")

    def _live_config_content(self, state: _State) -> str:
        dropins = [_parse_config(i.content) for i in state.configs_in_load_order()]
        try:
            merged = merge_dropins({}, dropins)
        except ConfigMergeError as exc:
            raise ManagedError(f"the managed drop-ins cannot be merged: {exc}") from exc
        rules_folder = self.falco_root / GENERATIONS_DIR / f"{state.generation:010d}" / RULES_DIR
        merged["rules_files"] = [str(rules_folder)]
        header = (
            f"# Written by the falco-api sidecar: generation {state.generation}, "
            f"state {state.state_sha256}. Do not edit.\n"
        )
        return header + canonical_dropin_yaml(merged)

    def _commit(self, old: _State, new: _State) -> None:
        fs = self._fs
        building = self._generations / f"{_BUILDING_PREFIX}{new.generation:010d}"
        try:
            self._build_generation(old, new, building)
        except BaseException:
            # Nothing Falco reads changed; drop the half-built folder (open() would, too).
            with contextlib.suppress(Exception):
                fs.remove_tree(building)
            raise
        fs.rename(building, self._generation_dir(new.generation))
        fs.fsync_dir(self._generations)
        # The commit point: from here on falco-api.yaml names the new generation.
        fs.write_atomic(self.root / LIVE_CONFIG_FILE, self._live_config_content(new).encode("utf-8"))
        now = self._clock()
        if old.generation > 0:
            self._superseded[old.generation] = now
        self._state = new
        self._statuses[new.generation] = LoadStatus(LoadState.PENDING, "", now)
        # Replacing falco-api.yaml is the event Falco reacts to (its old inode is deleted). The
        # rules folder Falco loaded last is poked too, in case Falco's watch on that file was set
        # up on a newer inode than the one it read.
        self._poke_rules_folders([old.generation, *([self._last_good] if self._last_good else [])])
        self._save_statuses()
        self._collect_garbage()

    def _build_generation(self, old: _State, new: _State, building: Path) -> None:
        fs = self._fs
        fs.mkdir(building)
        old_dir = self._generation_dir(old.generation)
        for sub, items, old_items in (
            (RULES_DIR, new.rules, old.rules),
            (CONFIG_DIR, new.configs, old.configs),
        ):
            folder = building / sub
            fs.mkdir(folder)
            for item in sorted(items.values(), key=lambda i: i.file_name):
                previous = old_items.get(item.name)
                source = old_dir / sub / item.file_name
                if (
                    previous is not None
                    and previous.file_name == item.file_name
                    and previous.sha256 == item.sha256
                ):
                    # The same inode: Falco's watch on it and its mtime stay as they were.
                    fs.link(source, folder / item.file_name)
                else:
                    fs.write_atomic(folder / item.file_name, item.content.encode("utf-8"))
            if sub == RULES_DIR:
                fs.write_atomic(
                    folder / STATE_MARKER_FILE, state_marker_content(new.state_sha256).encode("utf-8")
                )
            fs.fsync_dir(folder)
        fs.write_atomic(building / INDEX_FILE, _index_bytes(new))
        fs.fsync_dir(building)

    def nudge_falco(self) -> None:
        """Make Falco reload what it should run now (e.g. when its reported hashes match no state).

        Opens falco-api.yaml for writing and closes it unchanged (IN_CLOSE_WRITE, no new mtime or
        content), and pokes the rules folder of every generation kept: Falco watches the file and
        the folder it last loaded, and an empty directory made and removed there loads nothing.
        """
        with self._lock:
            self._fs.step("nudge falco-api.yaml")
            os.close(os.open(self.root / LIVE_CONFIG_FILE, os.O_WRONLY | os.O_CLOEXEC))
            self._poke_rules_folders(self._generation_numbers())

    def _poke_rules_folders(self, generations: Iterable[int]) -> None:
        for number in sorted(set(generations)):
            folder = self._generation_dir(number) / RULES_DIR
            if folder.is_dir():
                self._fs.poke(folder)

    def _collect_garbage(self) -> None:
        keep = {self._current().generation}
        if self._last_good is not None:
            keep.add(self._last_good)
        now = self._clock()
        keep |= {n for n, since in self._superseded.items() if now - since < self._gc_grace_s}
        self._superseded = {n: since for n, since in self._superseded.items() if n in keep}
        for number in self._generation_numbers():
            folder = self._generation_dir(number)
            if number not in keep and folder.is_dir():
                self._fs.remove_tree(folder)
                self._statuses.pop(number, None)
        self._statuses = {n: s for n, s in self._statuses.items() if n in keep}

    def _save_statuses(self) -> None:
        document = {
            "format": _INDEX_FORMAT,
            "last_good": self._last_good,
            "superseded": {str(n): since for n, since in sorted(self._superseded.items())},
            "statuses": {
                str(n): {"state": s.state.value, "message": s.message, "since": s.since}
                for n, s in sorted(self._statuses.items())
            },
        }
        self._fs.write_atomic(self.root / STATE_FILE, (json.dumps(document, indent=2) + "\n").encode("utf-8"))

    def _load_statuses(self) -> None:
        path = self.root / STATE_FILE
        try:
            document = json.loads(path.read_text("utf-8"))
            last_good = document.get("last_good")
            statuses = {
                int(n): LoadStatus(
                    LoadState(s["state"]), str(s.get("message", "")), float(s.get("since", 0.0))
                )
                for n, s in document.get("statuses", {}).items()
            }
            superseded = {int(n): float(t) for n, t in document.get("superseded", {}).items()}
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Verdicts only: losing them costs a re-confirmation by Falco, never managed content.
            log.warning("ignoring unreadable %s (%s); Falco's verdicts will be read again", path, exc)
            return
        self._last_good = (
            last_good if isinstance(last_good, int) and not isinstance(last_good, bool) else None
        )
        self._statuses = statuses
        self._superseded = superseded

    def _read_generation(self, generation: int) -> _State:
        folder = self._generation_dir(generation)
        index_path = folder / INDEX_FILE
        try:
            index = json.loads(index_path.read_text("utf-8"))
        except FileNotFoundError as exc:
            raise CorruptStoreError(f"generation {generation} has no {INDEX_FILE} ({index_path})") from exc
        except (OSError, ValueError) as exc:
            raise CorruptStoreError(f"cannot read {index_path}: {exc}") from exc
        try:
            if index.get("format") != _INDEX_FORMAT:
                raise CorruptStoreError(f"{index_path}: unknown format {index.get('format')!r}")
            rules = {e["name"]: self._read_item(folder / RULES_DIR, e) for e in index["rules"]}
            configs = {e["name"]: self._read_item(folder / CONFIG_DIR, e) for e in index["configs"]}
            tombstones = {
                kind: {str(k): int(v) for k, v in index.get("tombstones", {}).get(kind, {}).items()}
                for kind in ("rules", "configs")
            }
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptStoreError(f"{index_path} is malformed: {exc!r}") from exc
        return _State(generation, rules, configs, tombstones)

    def _read_item(self, folder: Path, entry: Mapping[str, Any]) -> _Item:
        name = check_name(entry["name"])
        order = check_order(entry["order"])
        path = folder / file_name_for(name, order)
        try:
            content = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CorruptStoreError(f"cannot read managed file {path}: {exc}") from exc
        sha = content_sha256(content)
        if sha != entry["sha256"]:
            raise CorruptStoreError(
                f"managed file {path} was changed outside falco-api (sha256 {sha}, expected "
                f"{entry['sha256']}); managed files must only be changed through the API"
            )
        return _Item(name, order, content, sha, int(entry["version"]))

    def _recover(self) -> RecoveryReport:
        with self._lock:
            removed: list[str] = []
            self.root.mkdir(parents=True, exist_ok=True)
            self._generations.mkdir(exist_ok=True)
            for entry in os.listdir(self.root):
                if entry.startswith(_TMP_PREFIX):
                    self._fs.remove_tree(self.root / entry)
                    removed.append(entry)
            for entry in os.listdir(self._generations):
                if entry.startswith(_BUILDING_PREFIX) or entry.startswith(_TMP_PREFIX):
                    self._fs.remove_tree(self._generations / entry)
                    removed.append(f"{GENERATIONS_DIR}/{entry}")
            self._load_statuses()
            created = False
            target = self._current_target()
            if target is None:
                complete = [n for n in self._generation_numbers() if self._generation_dir(n).is_dir()]
                if complete:
                    # Killed between renaming the very first generation into place and naming it.
                    target = complete[-1]
                    self._state = self._read_generation(target)
                    self._fs.write_atomic(
                        self.root / LIVE_CONFIG_FILE, self._live_config_content(self._state).encode("utf-8")
                    )
                else:
                    self._create_initial_generation()
                    created = True
                    target = self._current().generation
            if not self._generation_dir(target).is_dir():
                raise CorruptStoreError(
                    f"{self.root / LIVE_CONFIG_FILE} names generation {target}, which does not exist"
                )
            if not created:
                self._state = self._read_generation(target)
            for number in self._generation_numbers():
                for sub in (RULES_DIR, CONFIG_DIR):
                    trigger = self._generation_dir(number) / sub / _TRIGGER_NAME
                    if trigger.is_dir():
                        os.rmdir(trigger)
            if self._last_good is not None and not self._generation_dir(self._last_good).is_dir():
                self._last_good = None
            # Killed after the commit but before poking Falco: poke now (harmless if it already reloaded).
            triggered = self._last_good != target
            if triggered:
                self._poke_rules_folders(n for n in self._generation_numbers() if n != target)
            before = set(self._generation_numbers())
            self._collect_garbage()
            removed.extend(
                f"{GENERATIONS_DIR}/{n:010d}" for n in sorted(before - set(self._generation_numbers()))
            )
            self._save_statuses()
            return RecoveryReport(target, removed, triggered, created)

    def _create_initial_generation(self) -> None:
        empty = _State(0, {}, {}, {"rules": {}, "configs": {}})
        self._state = empty
        first = replace(empty, generation=max([0, *self._generation_numbers()]) + 1)
        # No previous generation to link from: every file is written.
        self._commit(replace(empty, generation=-1), first)


def _desired(items: Mapping[str, _Item]) -> dict[str, tuple[str, int]]:
    return {name: (item.content, item.order) for name, item in items.items()}


def _config_content(name: str, settings: object) -> str:
    if not isinstance(settings, Mapping):
        raise InvalidRequestError(f"settings of config drop-in '{name}' must be a mapping of falco.yaml keys")
    try:
        return canonical_dropin_yaml(settings)
    except yaml.YAMLError as exc:
        raise InvalidRequestError(
            f"settings of config drop-in '{name}' cannot be written as YAML: {exc}"
        ) from exc


def _parse_config(content: str) -> dict[str, Any]:
    loaded = yaml.safe_load(content)
    return dict(loaded) if isinstance(loaded, Mapping) else {}


def _index_bytes(state: _State) -> bytes:
    def entries(items: Iterable[_Item]) -> list[dict[str, Any]]:
        return [
            {"name": i.name, "order": i.order, "sha256": i.sha256, "version": i.version}
            for i in sorted(items, key=lambda i: i.file_name)
        ]

    document = {
        "format": _INDEX_FORMAT,
        "generation": state.generation,
        "state_sha256": state.state_sha256,
        "rules": entries(state.rules.values()),
        "configs": entries(state.configs.values()),
        "tombstones": {kind: dict(sorted(v.items())) for kind, v in state.tombstones.items()},
    }
    return (json.dumps(document, indent=2) + "\n").encode("utf-8")
