"""The operator's in-memory view of the cluster, and the debounced status writer.

Everything here is driven by the kopf handlers (thin) and by the push loop; no
Kubernetes I/O happens here except through the injected ``patch_status`` and
``post_event`` callables, which keeps this testable without a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from falco_api.backoff import backoff_delay
from falco_api.discovery import SidecarDirectory

from .desired import CONFIGS_PLURAL, RULES_PLURAL, DesiredState, FalcoConfigSpec, FalcoRuleSpec, desired_state
from .pusher import PushManager
from .status import (
    Acceptance,
    NodeOutcome,
    NodeState,
    aggregate_status,
    status_differs,
    with_transition_times,
)

log = logging.getLogger(__name__)

STATUS_RETRY_MAX = 60.0

ResourceKey = tuple[str, str]  # (plural, name)
PatchStatus = Callable[[str, str, dict[str, Any]], Awaitable[None]]
PostEvent = Callable[[Mapping[str, Any], str, str], Awaitable[None]]  # (object reference, reason, message)


@dataclass
class TrackedObject:
    spec: FalcoRuleSpec | FalcoConfigSpec
    acceptance: Acceptance
    reference: dict[str, Any]
    last_status: dict[str, Any] | None = None


@dataclass
class NodeRecord:
    desired: DesiredState = field(default_factory=DesiredState)
    outcome_sha: str | None = None
    outcome: NodeOutcome | None = None
    loaded: DesiredState | None = None


class ClusterModel:
    def __init__(
        self,
        directory: SidecarDirectory,
        pushes: PushManager,
        patch_status: PatchStatus,
        post_event: PostEvent,
        debounce_seconds: float = 0.5,
    ) -> None:
        self.directory = directory
        self.pushes = pushes
        self._patch_status = patch_status
        self._post_event = post_event
        self.debounce_seconds = debounce_seconds
        self.objects: dict[ResourceKey, TrackedObject] = {}
        self.node_labels: dict[str, dict[str, str]] = {}
        self.nodes: dict[str, NodeRecord] = {}
        self._dirty: set[ResourceKey] = set()
        self._dirty_event = asyncio.Event()
        self._reconcile_lock = asyncio.Lock()
        self._writer: asyncio.Task[None] | None = None
        # Status writes that failed: how often in a row, and the timer of the next try.
        self._failures: dict[ResourceKey, int] = {}
        self._retries: dict[ResourceKey, asyncio.TimerHandle] = {}
        # The start-up gate. kopf's index handlers fill ``listed`` while it lists each kind, and kopf
        # runs no event handler before every list is in; event handlers fill ``seen``. Until every
        # listed object went through its handler, a push would be a partial state: Falco on every
        # node would drop the rules not seen yet (an operator restart), so nothing is pushed or
        # written. Without index handlers (nothing listed) the model is live at once.
        self.listed: dict[str, set[str]] = {kind: set() for kind in (*KINDS, "nodes")}
        self.seen: dict[str, set[str]] = {kind: set() for kind in (*KINDS, "nodes")}
        self.listed_pods: set[tuple[str, str]] = set()
        self._primed = False
        # name -> (spec, the other rules, acceptance): see handlers.rule_acceptance.
        self.acceptance_cache: dict[str, tuple[FalcoRuleSpec, tuple[FalcoRuleSpec, ...], Acceptance]] = {}
        # Re-judges a rule against the current set (set by the handlers). A rule can lose what it
        # builds on (another rule deleted, disabled, re-ordered) without an event of its own.
        self.accept_rule: Callable[[FalcoRuleSpec], Acceptance] | None = None

    # --- inputs -------------------------------------------------------------------------------

    def rules(self) -> list[FalcoRuleSpec]:
        return [
            o.spec
            for o in self.objects.values()
            if isinstance(o.spec, FalcoRuleSpec) and o.acceptance.accepted
        ]

    def configs(self) -> list[FalcoConfigSpec]:
        return [
            o.spec
            for o in self.objects.values()
            if isinstance(o.spec, FalcoConfigSpec) and o.acceptance.accepted
        ]

    def all_rules(self) -> list[FalcoRuleSpec]:
        return [o.spec for o in self.objects.values() if isinstance(o.spec, FalcoRuleSpec)]

    @property
    def primed(self) -> bool:
        """Every object listed at start-up has been through its event handler."""
        if not self._primed:
            self._primed = all(self.listed[kind] <= self.seen[kind] for kind in self.listed) and (
                self.listed_pods <= self.directory.seen
            )
        return self._primed

    async def upsert(
        self,
        plural: str,
        spec: FalcoRuleSpec | FalcoConfigSpec,
        acceptance: Acceptance,
        reference: dict[str, Any],
        current_status: Mapping[str, Any] | None,
    ) -> None:
        key = (plural, spec.name)
        previous = self.objects.get(key)
        last = previous.last_status if previous else (dict(current_status) if current_status else None)
        self.objects[key] = TrackedObject(spec, acceptance, reference, last)
        if plural == RULES_PLURAL and (previous is None or previous.spec != spec):
            self.rejudge_rules(except_name=spec.name)
        await self.reconcile()

    async def forget(self, plural: str, name: str) -> None:
        self.objects.pop((plural, name), None)
        if plural == RULES_PLURAL:
            self.acceptance_cache.pop(name, None)
            self.rejudge_rules(except_name=name)
        self._dirty.discard((plural, name))
        self._failures.pop((plural, name), None)
        await self.reconcile()

    def rejudge_rules(self, *, except_name: str) -> None:
        """Judge every other enabled rule again: one that lost its macros or its override target is
        no longer Accepted (so it is not pushed, and says why) rather than making every node refuse
        the whole set."""
        if self.accept_rule is None:
            return
        for (plural, name), tracked in self.objects.items():
            if plural != RULES_PLURAL or name == except_name:
                continue
            spec = tracked.spec
            if isinstance(spec, FalcoRuleSpec) and spec.enabled:
                tracked.acceptance = self.accept_rule(spec)

    async def set_node(self, name: str, labels: Mapping[str, str] | None) -> None:
        if labels is None:
            self.node_labels.pop(name, None)
        else:
            if self.node_labels.get(name) == dict(labels):
                return
            self.node_labels[name] = dict(labels)
        await self.reconcile()

    async def reconcile(self) -> None:
        """Recompute every node's desired state and hand it to the pushers; mark all status dirty."""
        async with self._reconcile_lock:
            if not self.primed:
                return
            sidecars = self.directory.by_node
            rules, configs = self.rules(), self.configs()
            desired = {
                node: desired_state(rules, configs, self.node_labels.get(node, {})) for node in sidecars
            }
            for node in list(self.nodes):
                if node not in sidecars and node not in self.directory.pod_nodes:
                    del self.nodes[node]
            for node in sidecars.keys() | self.directory.pod_nodes:
                self.nodes.setdefault(node, NodeRecord()).desired = desired.get(node, DesiredState())
            await self.pushes.update(sidecars, desired)
            self.mark_all_dirty()

    def on_outcome(self, node: str, pushed: DesiredState, outcome: NodeOutcome) -> None:
        record = self.nodes.setdefault(node, NodeRecord())
        previous = record.outcome if record.outcome_sha == pushed.sha256 else None
        record.outcome_sha, record.outcome = pushed.sha256, outcome
        if outcome.state is NodeState.LOADED:
            record.loaded = pushed
        if previous != outcome:
            self.mark_all_dirty()

    # --- per-object view ---------------------------------------------------------------------

    def node_outcomes(self, plural: str, name: str) -> list[NodeOutcome]:
        sidecars = self.directory.by_node
        unready = self.directory.pod_nodes
        outcomes = []
        for node, record in sorted(self.nodes.items()):
            names = record.desired.rule_names if plural == RULES_PLURAL else record.desired.config_names
            if node not in sidecars:
                tracked = self.objects.get((plural, name))
                if node in unready and tracked is not None and self._would_target(tracked, node):
                    outcomes.append(
                        NodeOutcome(node, NodeState.FAILED, "the Falco pod on this node is not Ready")
                    )
                continue
            if name not in names:
                continue
            if record.outcome is not None and record.outcome_sha == record.desired.sha256:
                outcomes.append(record.outcome)
            elif record.outcome is not None and record.outcome.state is NodeState.FAILED:
                outcomes.append(record.outcome)  # still failing while the new state is being retried
            else:
                outcomes.append(NodeOutcome(node, NodeState.PENDING))
        return outcomes

    def _would_target(self, tracked: TrackedObject, node: str) -> bool:
        return tracked.spec.enabled and tracked.spec.selector.matches(self.node_labels.get(node, {}))

    def compute_status(self, plural: str, name: str) -> dict[str, Any] | None:
        tracked = self.objects.get((plural, name))
        if tracked is None:
            return None
        return aggregate_status(
            tracked.spec.generation,
            tracked.acceptance,
            self.node_outcomes(plural, name) if tracked.acceptance.accepted else [],
            enabled=tracked.spec.enabled,
        )

    def nodes_still_loading(self, plural: str, name: str) -> list[str]:
        """Reachable nodes that still run this object (for the finalizer to wait on)."""
        sidecars = self.directory.by_node
        waiting = []
        for node, record in sorted(self.nodes.items()):
            if node not in sidecars or record.loaded is None:
                continue
            names = record.loaded.rule_names if plural == RULES_PLURAL else record.loaded.config_names
            failing = record.outcome is not None and record.outcome.state is NodeState.FAILED
            if name in names and not failing:
                waiting.append(node)
        return waiting

    # --- status writer -----------------------------------------------------------------------

    def mark_all_dirty(self) -> None:
        self._dirty.update(self.objects)
        self._dirty_event.set()

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write_forever(), name="falco-api-status-writer")

    async def close(self) -> None:
        for handle in self._retries.values():
            handle.cancel()
        self._retries.clear()
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer

    async def _write_forever(self) -> None:
        while True:
            await self._dirty_event.wait()
            # Coalesce: every outcome arriving within the window lands in one write per object.
            await asyncio.sleep(self.debounce_seconds)
            self._dirty_event.clear()
            dirty, self._dirty = self._dirty, set()
            for key in sorted(dirty):
                if key in self._retries:
                    continue  # a failed write waits for its retry, whatever else changed
                try:
                    await self.flush(*key)
                except Exception as error:  # one object's failed write must not stop the writer
                    failures = self._failures[key] = self._failures.get(key, 0) + 1
                    delay = backoff_delay(
                        failures - 1, initial=max(0.5, self.debounce_seconds), maximum=STATUS_RETRY_MAX
                    )
                    log.warning(
                        "writing status of %s/%s failed %d time(s), next try in %.1f s: %s",
                        *key,
                        failures,
                        delay,
                        error,
                    )
                    self._retries[key] = asyncio.get_running_loop().call_later(delay, self._retry, key)
                else:
                    self._failures.pop(key, None)

    def _retry(self, key: ResourceKey) -> None:
        self._retries.pop(key, None)
        if key in self.objects:
            self._dirty.add(key)
            self._dirty_event.set()

    async def flush(self, plural: str, name: str) -> bool:
        tracked = self.objects.get((plural, name))
        new = self.compute_status(plural, name)
        if tracked is None or new is None or not status_differs(tracked.last_status, new):
            return False
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = with_transition_times(tracked.last_status, new, now)
        await self._patch_status(plural, name, body)
        previous = tracked.last_status or {}
        tracked.last_status = body
        event = None
        if new["failed"] and new["failingNodes"] != previous.get("failingNodes"):
            event = ("LoadFailed", new["conditions"][1]["message"])
        elif previous.get("failed") and not new["failed"] and new["targeted"]:
            event = ("Recovered", new["conditions"][1]["message"])
        if event is not None:
            try:
                await self._post_event(tracked.reference, *event)
            except Exception:  # the status is written; a lost Event must not make us rewrite it
                log.exception("posting the %s event of %s/%s failed", event[0], plural, name)
        return True


KINDS: dict[str, str] = {RULES_PLURAL: "FalcoRule", CONFIGS_PLURAL: "FalcoConfig"}
