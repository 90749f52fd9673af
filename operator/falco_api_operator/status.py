"""Status of one FalcoRule/FalcoConfig from its per-node outcomes (pure).

The operator is the only writer of these objects' status; it patches only when
:func:`status_differs` says the visible content changed, so the number of writes
follows changes of the outcome, not the number of nodes reporting it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

MAX_FAILING_NODES = 5


class NodeState(enum.Enum):
    LOADED = "loaded"
    FAILED = "failed"
    PENDING = "pending"


@dataclass(frozen=True)
class NodeOutcome:
    node: str
    state: NodeState
    message: str = ""


@dataclass(frozen=True)
class Acceptance:
    accepted: bool
    message: str = ""


def _condition(kind: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
    return {"type": kind, "status": "True" if ok else "False", "reason": reason, "message": message}


def failing_nodes_summary(failed: Iterable[NodeOutcome], limit: int = MAX_FAILING_NODES) -> list[str]:
    ordered = sorted(failed, key=lambda o: o.node)
    lines = [f"{o.node}: {o.message}" if o.message else o.node for o in ordered[:limit]]
    if len(ordered) > limit:
        lines.append(f"(+{len(ordered) - limit} more)")
    return lines


def aggregate_status(
    generation: int,
    acceptance: Acceptance,
    outcomes: Iterable[NodeOutcome],
    *,
    enabled: bool = True,
) -> dict[str, Any]:
    """The whole ``status`` of a CR, without timestamps (see :func:`with_transition_times`)."""
    results = list(outcomes)
    loaded = [o for o in results if o.state is NodeState.LOADED]
    failed = [o for o in results if o.state is NodeState.FAILED]
    pending = [o for o in results if o.state is NodeState.PENDING]
    targeted = len(results)

    if not acceptance.accepted:
        ready = _condition(
            "Ready", False, "NotAccepted", "not pushed to any node: it did not pass validation"
        )
    elif not enabled:
        ready = _condition("Ready", False, "Disabled", "spec.enabled is false: removed from every node")
    elif failed:
        names = ", ".join(sorted(o.node for o in failed)[:MAX_FAILING_NODES])
        more = f" (+{len(failed) - MAX_FAILING_NODES} more)" if len(failed) > MAX_FAILING_NODES else ""
        ready = _condition(
            "Ready", False, "LoadFailed", f"not loaded on {len(failed)} node(s): {names}{more}"
        )
    elif pending:
        ready = _condition("Ready", False, "Pending", f"waiting for {len(pending)} of {targeted} node(s)")
    elif targeted == 0:
        ready = _condition(
            "Ready", True, "NoTargets", "no node with a Falco sidecar matches spec.nodeSelector"
        )
    else:
        ready = _condition("Ready", True, "Loaded", f"loaded on all {targeted} targeted node(s)")

    accepted = _condition(
        "Accepted",
        acceptance.accepted,
        "Validated" if acceptance.accepted else "ValidationFailed",
        acceptance.message or ("passed validation" if acceptance.accepted else "failed validation"),
    )
    return {
        "observedGeneration": generation,
        "conditions": [accepted, ready],
        "targeted": targeted,
        "loaded": len(loaded),
        "failed": len(failed),
        "pending": len(pending),
        "loadedSummary": f"{len(loaded)}/{targeted}",
        "failingNodes": failing_nodes_summary(failed),
    }


def _without_times(status: Mapping[str, Any] | None) -> dict[str, Any]:
    if not status:
        return {}
    stripped = {k: v for k, v in status.items() if k != "conditions"}
    stripped["conditions"] = [
        {k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions") or []
    ]
    return stripped


def status_differs(current: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether writing ``new`` would change anything a reader sees (timestamps aside)."""
    relevant = {k: v for k, v in (current or {}).items() if k in new}
    return _without_times(relevant) != _without_times(new)


def with_transition_times(
    current: Mapping[str, Any] | None, new: Mapping[str, Any], now: str
) -> dict[str, Any]:
    """Keep a condition's lastTransitionTime unless its status flipped, as Kubernetes conventions ask."""
    previous = {c.get("type"): c for c in (current or {}).get("conditions") or []}
    conditions = []
    for condition in new.get("conditions") or []:
        old = previous.get(condition["type"])
        since = old.get("lastTransitionTime") if old and old.get("status") == condition["status"] else None
        conditions.append({**condition, "lastTransitionTime": since or now})
    return {**new, "conditions": conditions}
