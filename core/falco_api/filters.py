"""Server-side alert filters: what one subscription wants to receive."""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import translate

from falco_api.alerts import PRIORITY_NAMES, Alert
from falco_api.contract.falco import outputs_pb2

_MAX_PATTERNS = 256
_MAX_PATTERN_LENGTH = 1024


class FilterError(ValueError):
    """A subscription asked for something that cannot be a filter."""


def _compile_globs(patterns: list[str], what: str) -> re.Pattern[str] | None:
    if not patterns:
        return None
    if len(patterns) > _MAX_PATTERNS:
        raise FilterError(f"too many {what} patterns ({len(patterns)}; at most {_MAX_PATTERNS})")
    for pattern in patterns:
        if not pattern or len(pattern) > _MAX_PATTERN_LENGTH:
            raise FilterError(
                f"{what} pattern must be 1-{_MAX_PATTERN_LENGTH} characters, got {len(pattern)}"
            )
    # fnmatch.translate makes case-sensitive, anchored regexes; one alternation for all.
    return re.compile("|".join(f"(?:{translate(pattern)})" for pattern in patterns))


@dataclass(frozen=True, slots=True)
class AlertFilter:
    """An ANDed set of conditions; every empty condition lets everything through."""

    max_priority_number: int = len(PRIORITY_NAMES) - 1
    include_rules: re.Pattern[str] | None = None
    exclude_rules: re.Pattern[str] | None = None
    tags: frozenset[str] = frozenset()
    sources: frozenset[str] = frozenset()
    hostnames: frozenset[str] = frozenset()
    exclude_internal: bool = False

    @classmethod
    def from_request(cls, request: outputs_pb2.request) -> AlertFilter:
        max_priority = len(PRIORITY_NAMES) - 1
        if request.HasField("min_priority"):
            if not 0 <= request.min_priority < len(PRIORITY_NAMES):
                raise FilterError(f"min_priority {request.min_priority} is not a Falco priority (0-7)")
            max_priority = request.min_priority
        return cls(
            max_priority_number=max_priority,
            include_rules=_compile_globs(list(request.rules), "rule"),
            exclude_rules=_compile_globs(list(request.exclude_rules), "exclude_rule"),
            tags=frozenset(request.tags),
            sources=frozenset(request.sources),
            hostnames=frozenset(request.hostnames),
            exclude_internal=request.exclude_internal,
        )

    def matches(self, alert: Alert) -> bool:
        # Cheapest checks first: this runs once per alert per subscriber.
        if alert.priority > self.max_priority_number:
            return False
        if self.exclude_internal and alert.is_internal:
            return False
        if self.sources and alert.source not in self.sources:
            return False
        if self.hostnames and alert.hostname not in self.hostnames:
            return False
        if self.tags and self.tags.isdisjoint(alert.tags):
            return False
        if self.include_rules is not None and not self.include_rules.match(alert.rule):
            return False
        return not (self.exclude_rules is not None and self.exclude_rules.match(alert.rule))


MATCH_ALL = AlertFilter()
