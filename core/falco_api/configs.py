"""Falco config drop-ins: validation, Falco's merge, and the identity of a managed state.

A drop-in is a partial falco.yaml (top-level keys only where it changes something) that Falco
merges over falco.yaml from its `config_files` list. Everything here is pure: no file is written.

Facts this module follows (Falco source, userspace/engine/yaml_helper.h and
userspace/falco/configuration.cpp, 0.38 to 0.43):

- Falco merges drop-ins key by key at the TOP LEVEL only. With the default `append` strategy a
  sequence value is appended to the existing sequence (or becomes it when the key is absent or
  null); any other value (a map or a scalar) REPLACES the existing value as a whole. Nested maps are
  not merged: a drop-in with `webserver: {listen_port: 9000}` drops every other `webserver` key of
  falco.yaml. `override` replaces every value, `add-only` only sets keys that are absent.
- Appending a sequence to a key whose value is a map or a scalar makes yaml-cpp throw, so Falco
  refuses the whole configuration.
- Falco checks every file against its JSON schema but only logs the result; what makes a load fail
  is a YAML error, a wrong type for a key Falco reads, or `config_files` inside a drop-in.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import jsonschema
import yaml

Severity = Literal["error", "warning"]
MergeStrategy = Literal["append", "override", "add-only"]

# Keys whose value the sidecar relies on to do its job; a drop-in that changed them would silently
# break alert delivery, the read-back of what Falco loaded, or the managed files themselves.
SIDECAR_OWNED_KEYS: Mapping[str, str] = {
    "http_output": "the sidecar receives every alert through Falco's http_output; changing it would "
    "stop or divert alert delivery",
    "json_output": "the sidecar parses alerts as JSON; with json_output off Falco posts plain text",
    "json_include_output_property": "alerts without the `output` property lose their message for "
    "every API client",
    "json_include_output_fields_property": "alerts without `output_fields` lose their fields, and the "
    "sidecar reads internal alerts (drops, reload failures) from them",
    "webserver": "the sidecar reads /healthz, /versions and /metrics (what Falco loaded, by hash) from "
    "Falco's webserver",
    "rules_files": "the managed rules folder must stay in Falco's rules list, or managed rulesets are "
    "never loaded",
    "rules_file": "deprecated alias of rules_files: the managed rules folder must stay in Falco's rules list",
    "config_files": "Falco refuses `config_files` inside an included config file, and the managed "
    "config folder must stay in falco.yaml's list",
    "watch_config_files": "the sidecar's writes reach Falco only through its file watcher; with "
    "watching off no change would ever load",
}


@dataclass(frozen=True)
class ConfigFinding:
    """One problem found in a config drop-in; the same fields as a rules finding."""

    file: str
    message: str
    severity: Severity = "error"
    item_kind: str = "config"
    # The dotted key path the finding is about ("" for the file as a whole).
    item_name: str = ""
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        where = self.file
        if self.line:
            where += f":{self.line}:{self.column}"
        prefix = "warning: " if self.severity == "warning" else ""
        subject = f"key '{self.item_name}': " if self.item_name else ""
        return f"{where}: {prefix}{subject}{self.message}"


class ConfigMergeError(ValueError):
    """Falco could not merge a drop-in over the configuration (it would refuse to load)."""


@dataclass(frozen=True)
class ParsedDropin:
    """A drop-in read from YAML text: `settings` is None when the text is unusable."""

    settings: dict[str, Any] | None
    findings: list[ConfigFinding]


@dataclass(frozen=True)
class EffectiveConfig:
    """falco.yaml (when readable) with the drop-ins merged over it, as Falco would see it."""

    effective: dict[str, Any]
    base_included: bool
    # Why the base could not be read, when it could not.
    base_error: str = ""
    findings: list[ConfigFinding] = field(default_factory=list)


@functools.cache
def load_config_schema() -> dict[str, Any]:
    """Falco's config JSON schema, with no key required at the top level (drop-ins are partial)."""
    text = resources.files("falco_api.schemas").joinpath("falco-config.schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    top = schema.get("definitions", {}).get("FalcoConfig", {})
    # Nested `required` keys stay: Falco replaces a top-level map as a whole, so a drop-in's `engine`
    # block must be complete on its own.
    top.pop("required", None)
    return schema


@functools.cache
def _schema_validator() -> Any:
    schema = load_config_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    return validator_class(schema)


def _key_path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def validate_dropin(settings: object, *, file: str = "<drop-in>") -> list[ConfigFinding]:
    """Check one drop-in (a mapping of falco.yaml keys) before it may be written.

    Errors: not a mapping, a non-string key, a key the sidecar owns, a value of the wrong type for
    Falco's schema. Warnings: keys unknown to the schema (Falco ignores keys it does not read, but a
    typo is likely).
    """
    if not isinstance(settings, Mapping):
        return [
            ConfigFinding(
                file,
                f"a config drop-in must be a mapping of falco.yaml keys, got {_type_name(settings)}",
                item_kind="file",
            )
        ]
    findings: list[ConfigFinding] = []
    for key in settings:
        if not isinstance(key, str):
            findings.append(
                ConfigFinding(file, f"top-level keys must be strings, got {key!r}", item_kind="file")
            )
    if findings:
        return findings
    metrics = settings.get("metrics")
    if isinstance(metrics, Mapping) and metrics.get("enabled") is not True:
        findings.append(
            ConfigFinding(
                file,
                "must keep `enabled: true`: a drop-in's map replaces falco.yaml's `metrics` as a whole, "
                "and without metrics Falco stops reporting the hashes of what it loaded, so no write "
                "could be confirmed or rolled back",
                item_name="metrics",
            )
        )
    for key in sorted(settings):
        reason = SIDECAR_OWNED_KEYS.get(key)
        if reason is not None:
            findings.append(
                ConfigFinding(
                    file, f"is managed by the falco-api sidecar and cannot be set: {reason}", item_name=key
                )
            )
    plain = _to_plain(settings)
    errors = sorted(_schema_validator().iter_errors(plain), key=lambda e: [str(p) for p in e.absolute_path])
    for error in errors:
        path = _key_path(error.absolute_path)
        if error.validator == "additionalProperties" and not error.absolute_path:
            known = set(load_config_schema()["definitions"]["FalcoConfig"]["properties"])
            for unknown in sorted(k for k in plain if k not in known and k not in SIDECAR_OWNED_KEYS):
                findings.append(
                    ConfigFinding(
                        file,
                        "is not a Falco configuration key (Falco ignores it; check the spelling)",
                        severity="warning",
                        item_name=unknown,
                    )
                )
            continue
        if path.split(".", 1)[0].split("[", 1)[0] in SIDECAR_OWNED_KEYS:
            continue  # already refused above; one message per key is enough
        message = error.message
        if error.validator == "required" and error.absolute_path:
            message += (
                f" (Falco replaces the whole '{error.absolute_path[0]}' block of falco.yaml with the "
                "drop-in's, so the block must be complete)"
            )
        findings.append(ConfigFinding(file, message, item_name=path))
    return findings


def parse_dropin_text(text: str, *, file: str = "<drop-in>") -> ParsedDropin:
    """Parse YAML text as a drop-in, without validating its keys."""
    try:
        loaded = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (0, 0)
        problem = exc.problem or str(exc)
        return ParsedDropin(
            None,
            [ConfigFinding(file, f"invalid YAML: {problem}", item_kind="file", line=line, column=column)],
        )
    except yaml.YAMLError as exc:
        return ParsedDropin(None, [ConfigFinding(file, f"invalid YAML: {exc}", item_kind="file")])
    if loaded is None:
        # Falco merges an empty file as nothing at all.
        return ParsedDropin({}, [])
    if not isinstance(loaded, dict):
        return ParsedDropin(
            None,
            [
                ConfigFinding(
                    file,
                    f"a config drop-in must be a mapping of falco.yaml keys, got {_type_name(loaded)}",
                    item_kind="file",
                )
            ],
        )
    return ParsedDropin(loaded, [])


def validate_dropin_text(text: str, *, file: str = "<drop-in>") -> ParsedDropin:
    """Parse and validate YAML text as a drop-in (for the CLI and the admission webhook)."""
    parsed = parse_dropin_text(text, file=file)
    if parsed.settings is None:
        return parsed
    return ParsedDropin(parsed.settings, validate_dropin(parsed.settings, file=file))


def merge_dropin(
    config: Mapping[str, Any], dropin: Mapping[str, Any], strategy: MergeStrategy = "append"
) -> dict[str, Any]:
    """`config` with `dropin` merged over it the way Falco does (a new dict; inputs untouched)."""
    merged = copy.deepcopy(dict(config))
    for key, value in dropin.items():
        if key == "config_files":
            raise ConfigMergeError("Falco refuses a 'config_files' directive inside an included config file")
        value = copy.deepcopy(value)
        if strategy == "append" and isinstance(value, list):
            existing = merged.get(key)
            if existing is None:
                merged[key] = value
            elif isinstance(existing, list):
                merged[key] = existing + value
            else:
                raise ConfigMergeError(
                    f"key '{key}': cannot append a sequence to the {_type_name(existing)} already there "
                    "(Falco would refuse the configuration)"
                )
        elif strategy == "add-only":
            if key not in merged:
                merged[key] = value
        else:
            merged[key] = value
    return merged


def merge_dropins(
    base: Mapping[str, Any],
    dropins: Iterable[Mapping[str, Any]],
    strategy: MergeStrategy = "append",
) -> dict[str, Any]:
    """Merge drop-ins over `base` in the order given (Falco's order: file name, byte-wise)."""
    merged = dict(base)
    for dropin in dropins:
        merged = merge_dropin(merged, dropin, strategy)
    return merged


def read_base_config(path: Path | None) -> tuple[dict[str, Any] | None, str]:
    """falco.yaml as a mapping, or None and the reason it could not be used."""
    if path is None:
        return None, "no base falco.yaml configured"
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror or exc}"
    except UnicodeDecodeError as exc:
        return None, f"cannot read {path}: not UTF-8 ({exc.reason})"
    parsed = parse_dropin_text(text, file=str(path))
    if parsed.settings is None:
        return None, "; ".join(str(f) for f in parsed.findings)
    return parsed.settings, ""


def effective_config(
    base_path: Path | None,
    dropins: Sequence[tuple[str, Mapping[str, Any]]],
    strategy: MergeStrategy = "append",
) -> EffectiveConfig:
    """falco.yaml (when readable) with the named drop-ins merged over it, in the order given.

    A drop-in that cannot be merged is reported as a finding and skipped, so the result still shows
    everything else.
    """
    base, base_error = read_base_config(base_path)
    merged: dict[str, Any] = dict(base) if base is not None else {}
    findings: list[ConfigFinding] = []
    for name, dropin in dropins:
        try:
            merged = merge_dropin(merged, dropin, strategy)
        except ConfigMergeError as exc:
            findings.append(ConfigFinding(name, str(exc)))
    return EffectiveConfig(merged, base is not None, base_error, findings)


def validate_dropin_set(
    dropins: Sequence[tuple[str, Mapping[str, Any]]],
    base: Mapping[str, Any] | None = None,
    strategy: MergeStrategy = "append",
) -> list[ConfigFinding]:
    """Check every drop-in, then that Falco could merge them all, in order, over `base`."""
    findings: list[ConfigFinding] = []
    for name, settings in dropins:
        findings.extend(validate_dropin(settings, file=name))
    if any(f.severity == "error" for f in findings):
        return findings
    merged: dict[str, Any] = dict(base) if base is not None else {}
    for name, settings in dropins:
        try:
            merged = merge_dropin(merged, settings, strategy)
        except ConfigMergeError as exc:
            findings.append(ConfigFinding(name, str(exc)))
            break
    return findings


def canonical_dropin_yaml(settings: Mapping[str, Any]) -> str:
    """The exact YAML text written for a drop-in; equal settings give equal bytes on every node.

    Integral floats become integers first: protobuf's Struct carries every number as a double, and
    Falco reads `listen_port: 8765.0` as an invalid integer.
    """
    if not settings:
        return "{}\n"
    return yaml.safe_dump(
        _to_plain(settings),
        sort_keys=True,
        default_flow_style=False,
        allow_unicode=True,
        width=1 << 16,
    )


def content_sha256(content: str | bytes) -> str:
    """Lower-case hex sha256 of a file's bytes (UTF-8 for text), as Falco reports it."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    return hashlib.sha256(data).hexdigest()


def compute_state_sha256(
    rulesets: Iterable[tuple[str, int, str]], configs: Iterable[tuple[str, int, str]]
) -> str:
    """sha256 over a managed state: every (name, order, content sha256) of rulesets and drop-ins.

    The sidecar and the operator both compute it, so the same desired state has the same hash on
    every node.
    """
    lines = [f"rules\t{name}\t{order:02d}\t{sha}\n" for name, order, sha in rulesets]
    lines += [f"config\t{name}\t{order:02d}\t{sha}\n" for name, order, sha in configs]
    return hashlib.sha256("".join(sorted(lines)).encode("utf-8")).hexdigest()


def _to_plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, Mapping):
        return "map"
    if isinstance(value, list | tuple):
        return "sequence"
    if isinstance(value, str):
        return "string"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__
