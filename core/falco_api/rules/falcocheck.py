"""Asking a real Falco binary for its verdict: `falco -V FILE ... -o json_output=true`.

Falco prints one JSON document, roughly:

    {"falco_load_results": [{"name": "/path/rules.yaml", "successful": false,
      "errors": [{"code": "LOAD_ERR_COMPILE_CONDITION", "codedesc": "...", "message": "...",
                  "context": {"locations": [{"item_type": "rule", "item_name": "X",
                                             "position": {"name": "/path/rules.yaml", "line": 3,
                                                          "column": 2, "offset": 40}}],
                              "snippet": "..."}}],
      "warnings": [...]}]}

The parser below reads that shape defensively: anything missing degrades to a less precise Finding rather
than an exception.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from typing import Any

from .model import Finding, RulesFile, Severity

DEFAULT_TIMEOUT_SECONDS = 60.0
_ITEM_TYPES = frozenset({"rule", "macro", "list", "required_engine_version", "required_plugin_versions"})
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def _extract_json(stdout: str) -> Any:
    text = stdout.strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        pass
    # Falco may print banner lines around the JSON document; try each line, then the outermost braces.
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    first, last = text.find("{"), text.rfind("}")
    if 0 <= first < last:
        try:
            return json.loads(text[first : last + 1])
        except ValueError:
            return None
    return None


def _as_int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _finding_from_entry(entry: Any, file_name: str, names: dict[str, str], severity: Severity) -> Finding:
    if not isinstance(entry, dict):
        return Finding(file_name, "file", "", 0, 0, f"falco: {entry}", severity)
    message = str(entry.get("message") or entry.get("codedesc") or "problem reported by falco")
    code = entry.get("code")
    if isinstance(code, str) and code:
        message = f"{message} [{code}]"
    kind, name, line, column, file = "file", "", 0, 0, file_name
    context = entry.get("context")
    locations = context.get("locations") if isinstance(context, dict) else None
    if isinstance(locations, list):
        # Locations go from the outermost (the file) to the innermost (the item, its condition, ...).
        for location in locations:
            if not isinstance(location, dict):
                continue
            item_type = location.get("item_type")
            item_name = location.get("item_name")
            if item_type in _ITEM_TYPES:
                kind, name = str(item_type), str(item_name or "")
            position = location.get("position")
            if isinstance(position, dict):
                pos_name = position.get("name")
                if isinstance(pos_name, str) and pos_name:
                    file = names.get(pos_name, names.get(os.path.basename(pos_name), file))
                line = _as_int(position.get("line")) or line
                column = _as_int(position.get("column")) or column
    return Finding(file, kind, name, line, column, f"falco: {message}", severity)


def parse_falco_verdict(
    stdout: str, names: dict[str, str], returncode: int, stderr: str = ""
) -> list[Finding]:
    """Findings from the output of `falco -V ... -o json_output=true`.

    names maps the paths Falco was given (and their basenames) to the names the caller knows them by.
    """
    document = _extract_json(stdout)
    results = document.get("falco_load_results") if isinstance(document, dict) else None
    fallback_file = next(iter(names.values()), "<falco>")
    if not isinstance(results, list):
        detail = (stderr or stdout).strip().splitlines()[-5:]
        if returncode == 0 and document is not None:
            return []
        return [
            Finding(
                fallback_file,
                "file",
                "",
                0,
                0,
                f"falco exited with status {returncode} without a JSON verdict: "
                f"{' | '.join(detail) or 'no output'}",
            )
        ]
    findings: list[Finding] = []
    for result in results:
        if not isinstance(result, dict):
            continue
        result_name = result.get("name")
        file_name = fallback_file
        if isinstance(result_name, str):
            file_name = names.get(result_name, names.get(os.path.basename(result_name), result_name))
        errors = result.get("errors") if isinstance(result.get("errors"), list) else []
        warnings = result.get("warnings") if isinstance(result.get("warnings"), list) else []
        assert isinstance(errors, list) and isinstance(warnings, list)
        findings.extend(_finding_from_entry(e, file_name, names, "error") for e in errors)
        findings.extend(_finding_from_entry(w, file_name, names, "warning") for w in warnings)
        if result.get("successful") is False and not errors:
            findings.append(Finding(file_name, "file", "", 0, 0, "falco: rules file failed to load", "error"))
    if returncode != 0 and not any(f.severity == "error" for f in findings):
        findings.append(
            Finding(fallback_file, "file", "", 0, 0, f"falco exited with status {returncode}", "error")
        )
    return findings


def run_falco_validation(
    files: Sequence[RulesFile], falco_binary: str, *, timeout: float = DEFAULT_TIMEOUT_SECONDS
) -> list[Finding]:
    """Write the files to a private temporary folder, in order, and let Falco validate them."""
    if not files:
        return []
    with tempfile.TemporaryDirectory(prefix="falco-api-rules-") as folder:
        names: dict[str, str] = {}
        args: list[str] = []
        for index, rules_file in enumerate(files):
            base = _UNSAFE_NAME.sub("_", os.path.basename(rules_file.name)) or "rules.yaml"
            # The index prefix keeps names unique and the load order alphabetical, as Falco sorts folders.
            path = os.path.join(folder, f"{index:04d}-{base}")
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(rules_file.content)
            names[path] = rules_file.name
            names[os.path.basename(path)] = rules_file.name
            args += ["-V", path]
        command = [falco_binary, *args, "-o", "json_output=true"]
        try:
            completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return [Finding(files[0].name, "file", "", 0, 0, f"falco did not answer within {timeout:g} s")]
        except OSError as exc:
            return [Finding(files[0].name, "file", "", 0, 0, f"cannot run falco '{falco_binary}': {exc}")]
        return parse_falco_verdict(completed.stdout, names, completed.returncode, completed.stderr)
