"""Field classes per event source, and the `%field` references of rule outputs.

Falco knows the full field tables only at run time (plugins add fields), so this module checks the part
that is fixed: the field *class* (the text before the first dot) for the built-in sources. For any other
source (a plugin's), every class is accepted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Classes libsinsp provides for the syscall source, plus those that the plugins shipped with Falco
# contribute to it (container, k8smeta) and legacy ones still accepted by older engines.
SYSCALL_FIELD_CLASSES = frozenset(
    {
        "evt",
        "evtin",
        "proc",
        "thread",
        "user",
        "group",
        "fd",
        "fdlist",
        "fs",
        "container",
        "k8s",
        "k8smeta",
        "mesos",
        "span",
        "syslog",
        "tracer",
        "syscall",
    }
)
# The k8saudit plugin's classes; `evt` holds the generic fields every source has (evt.time, ...).
K8S_AUDIT_FIELD_CLASSES = frozenset({"ka", "jevt", "json", "evt", "k8saudit"})

# Plugins whose field classes are already in the tables above.
KNOWN_FIELD_PLUGINS = frozenset({"container", "k8smeta", "k8saudit", "json"})

BUILTIN_SOURCES: dict[str, frozenset[str]] = {
    "syscall": SYSCALL_FIELD_CLASSES,
    "k8s_audit": K8S_AUDIT_FIELD_CLASSES,
}

_OUTPUT_FIELD = re.compile(r"[a-zA-Z][a-zA-Z0-9_]*(?:\.[a-zA-Z0-9_]+)+")
_OUTPUT_TRANSFORMER = re.compile(r"(tolower|toupper|b64|basename|len|join|concat|getopt)\(")


def known_classes(source: str) -> frozenset[str] | None:
    """The field classes of a built-in source, or None when the source is a plugin's (anything goes)."""
    return BUILTIN_SOURCES.get(source)


@dataclass(frozen=True)
class OutputField:
    name: str
    arg: str | None
    offset: int

    @property
    def field_class(self) -> str:
        return self.name.split(".", 1)[0]


@dataclass(frozen=True)
class OutputProblem:
    message: str
    offset: int


def parse_output(text: str) -> tuple[list[OutputField], list[OutputProblem]]:
    """The `%field` / `%field[arg]` / `%transformer(field)` references of an output string.

    `%%` is a literal percent sign. Anything else after `%` that is not a field is reported, the way
    Falco's formatter refuses it when compiling the rule.
    """
    found: list[OutputField] = []
    problems: list[OutputProblem] = []
    i = 0
    n = len(text)
    while i < n:
        pct = text.find("%", i)
        if pct < 0:
            break
        j = pct + 1
        if j < n and text[j] == "%":
            i = j + 1
            continue
        closing = 0
        transformer = _OUTPUT_TRANSFORMER.match(text, j)
        while transformer is not None:
            closing += 1
            j = transformer.end()
            transformer = _OUTPUT_TRANSFORMER.match(text, j)
        match = _OUTPUT_FIELD.match(text, j)
        if match is None:
            snippet = text[pct : pct + 12].split()[0] if text[pct:].strip() else "%"
            problems.append(
                OutputProblem(
                    f"'{snippet}' is not a field reference (expected %class.field, e.g. %proc.name)", pct
                )
            )
            i = pct + 1
            continue
        name = match.group(0)
        j = match.end()
        arg: str | None = None
        if j < n and text[j] == "[":
            close = text.find("]", j + 1)
            if close < 0 or close == j + 1:
                problems.append(
                    OutputProblem(f"field '%{name}[' has no closing ']' or an empty argument", pct)
                )
                i = j + 1
                continue
            arg = text[j + 1 : close]
            j = close + 1
        if closing:
            for _ in range(closing):
                if j < n and text[j] == ")":
                    j += 1
                else:
                    problems.append(OutputProblem(f"transformer around '%{name}' is missing a ')'", pct))
                    break
        found.append(OutputField(name, arg, pct))
        i = j
    return found, problems
