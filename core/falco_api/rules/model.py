"""Public value types of the rules validator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class RulesFile:
    """One rules file's text; `name` is what messages call it (a path, a ConfigMap key, ...)."""

    name: str
    content: str


@dataclass(frozen=True)
class Finding:
    """One problem found in a rules set.

    item_kind is "rule", "macro", "list", "required_engine_version", "required_plugin_versions", "item"
    (an item whose kind is unknown) or "file" (the file as a whole). line/column are 1-based; 0 when no
    position is known.
    """

    file: str
    item_kind: str
    item_name: str
    line: int
    column: int
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        where = self.file
        if self.line:
            where += f":{self.line}:{self.column}"
        prefix = "warning: " if self.severity == "warning" else ""
        subject = f"{self.item_kind} '{self.item_name}': " if self.item_name else ""
        if not self.item_name and self.item_kind not in ("file", ""):
            subject = f"{self.item_kind}: "
        return f"{where}: {prefix}{subject}{self.message}"


@dataclass(frozen=True)
class DefinedItems:
    """The names a rules set defines once fully loaded, each in order of first definition."""

    rules: tuple[str, ...]
    macros: tuple[str, ...]
    lists: tuple[str, ...]


def has_errors(findings: list[Finding]) -> bool:
    return any(f.severity == "error" for f in findings)
