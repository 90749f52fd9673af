"""Every write to the managed files, confirmed by Falco itself and rolled back when Falco refuses it.

A write is only as good as what Falco made of it. After the store commits a
new generation, :class:`WriteCoordinator` waits for Falco's verdict:

- loaded: Falco's ``/metrics`` lists every expected file with the expected
  sha256 (``falcosecurity_falco_sha256_rules_files_info`` and
  ``..._config_files_info``), including the state marker that names the whole set;
- failed: a ``Falco internal: hot restart failure`` alert reached our ingest.
  Falco kept running its previous rules; we write the last set it loaded back,
  so the files on disk match what runs again;
- unknown: neither within the timeout. Said as such, never guessed.

Writes are serialised: Falco reloads everything at once, so two verdicts could
not be told apart.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from falco_api.alerts import Alert
from falco_api.hub import Delivery, Hub, Subscription
from falco_api.servicers import Unavailable
from falco_api_sidecar.falco_web import FalcoWebClient
from falco_api_sidecar.managed import (
    LoadState,
    LoadStatus,
    ManagedError,
    ManagedStore,
    NoLastGoodError,
    WriteResult,
)

log = logging.getLogger(__name__)

HOT_RESTART_FAILURE_RULE = "Falco internal: hot restart failure"
RULES_FILES_METRIC = "falcosecurity_falco_sha256_rules_files_info"
CONFIG_FILES_METRIC = "falcosecurity_falco_sha256_config_files_info"

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>[^}]*)\}\s")
_LABEL = re.compile(r'(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"')


def loaded_file_hashes(metrics_text: str) -> tuple[dict[str, str], dict[str, str]]:
    """(rules, configs): base file name -> sha256 of what Falco reports it loaded."""
    rules: dict[str, str] = {}
    configs: dict[str, str] = {}
    for line in metrics_text.splitlines():
        match = _SAMPLE.match(line)
        if not match or match["name"] not in (RULES_FILES_METRIC, CONFIG_FILES_METRIC):
            continue
        labels = {m["key"]: m["value"] for m in _LABEL.finditer(match["labels"])}
        file_name, sha = labels.get("file_name"), labels.get("sha256")
        if not file_name or not sha:
            continue
        target = rules if match["name"] == RULES_FILES_METRIC else configs
        target[file_name.rsplit("/", 1)[-1]] = sha.lower()
    return rules, configs


def is_loaded(expected: dict[str, str], reported: dict[str, str]) -> bool:
    return all(reported.get(name) == sha for name, sha in expected.items())


@dataclass(frozen=True)
class WriteOutcome:
    """A committed write and Falco's verdict on it (after any rollback)."""

    result: WriteResult
    status: LoadStatus
    rolled_back: bool = False
    rollback_result: WriteResult | None = None


class WriteCoordinator:
    def __init__(
        self,
        store: ManagedStore,
        falco: FalcoWebClient,
        alerts: Hub[Alert],
        *,
        confirm_timeout: float = 30.0,
        poll_interval: float = 0.2,
    ) -> None:
        self.store = store
        self.falco = falco
        self.alerts = alerts
        self.confirm_timeout = confirm_timeout
        self.poll_interval = poll_interval
        self._lock = asyncio.Lock()
        self._in_flight: set[asyncio.Task[WriteOutcome]] = set()

    async def write(self, operation: Callable[[], WriteResult]) -> WriteOutcome:
        """Run one store operation (in a thread), then wait for Falco's verdict and act on it.

        The store's own errors (validation, conflicts, bad names) propagate unchanged:
        nothing was written then.

        Once started, a write runs to its end even if the caller goes away (a client's deadline,
        a dropped connection): stopping between the commit and the verdict would leave a set that
        Falco refused on disk, with every later write built on it.
        """
        task = asyncio.ensure_future(self._write_serialised(operation))
        self._in_flight.add(task)
        task.add_done_callback(self._finished)
        return await asyncio.shield(task)

    def _finished(self, task: asyncio.Task[WriteOutcome]) -> None:
        self._in_flight.discard(task)
        error = None if task.cancelled() else task.exception()
        # Refusals (validation, conflicts) are the caller's answer, not the sidecar's failure.
        if error is not None and not isinstance(error, ManagedError):
            log.error("a managed write failed: %s", error)

    async def drain(self, seconds: float) -> None:
        """Shutting down: let writes in flight reach Falco's verdict, for at most ``seconds``."""
        if self._in_flight:
            count = len(self._in_flight)
            log.info("waiting up to %.1f s for %d write(s) to get Falco's verdict", seconds, count)
            await asyncio.wait(set(self._in_flight), timeout=seconds)

    async def _write_serialised(self, operation: Callable[[], WriteResult]) -> WriteOutcome:
        async with self._lock:
            # Subscribe before writing, so a failure alert that arrives at once is not missed.
            failures = self.alerts.subscribe(
                lambda alert: alert.rule == HOT_RESTART_FAILURE_RULE, follow=True, report_idle_gaps=False
            )
            try:
                result = await asyncio.to_thread(operation)
                # Falco stamps its refusal when its dry run fails, at least one debounce (100 ms)
                # after the file event: a refusal stamped before the commit returned is about an
                # earlier change (an unconfirmed write, an edit elsewhere), not this one.
                committed_ns = time.time_ns()
                if result.dry_run:
                    return WriteOutcome(result, result.status)
                if not result.changed and result.status.state == LoadState.LOADED:
                    return WriteOutcome(result, result.status)
                status = await self._verdict(result, failures, not_before_ns=committed_ns)
                return await self._settle(result, status)
            finally:
                failures.cancel()

    async def _settle(self, result: WriteResult, status: LoadStatus) -> WriteOutcome:
        store = self.store
        if status.state == LoadState.LOADED:
            await asyncio.to_thread(store.mark_loaded, result.generation, status.message)
            return WriteOutcome(replace(result, status=status), status)
        if status.state == LoadState.UNKNOWN:
            await asyncio.to_thread(store.mark_unknown, result.generation, status.message)
            return WriteOutcome(replace(result, status=status), status)
        await asyncio.to_thread(store.mark_failed, result.generation, status.message)
        log.warning(
            "Falco refused generation %d: %s; restoring the last good set", result.generation, status.message
        )
        try:
            restored = await asyncio.to_thread(store.rollback_to_last_good)
        except NoLastGoodError as error:
            message = f"{status.message} (nothing to roll back to: {error})"
            failed = LoadStatus(LoadState.FAILED, message, status.since)
            return WriteOutcome(replace(result, status=failed), failed)
        restored_status = await self._verdict(restored, None)
        if restored_status.state == LoadState.LOADED:
            await asyncio.to_thread(store.mark_loaded, restored.generation, "restored after a refused write")
        else:
            await asyncio.to_thread(store.mark_unknown, restored.generation, restored_status.message)
        message = f"{status.message} (previous rules restored)"
        failed = LoadStatus(LoadState.FAILED, message, status.since)
        return WriteOutcome(
            replace(result, status=failed), failed, rolled_back=True, rollback_result=restored
        )

    async def _verdict(
        self, result: WriteResult, failures: Subscription[Alert] | None, *, not_before_ns: int = 0
    ) -> LoadStatus:
        expected_rules = await asyncio.to_thread(self.store.expected_rules_hashes)
        expected_configs = await asyncio.to_thread(self.store.expected_config_hashes)
        deadline = time.monotonic() + self.confirm_timeout
        failure_wait: asyncio.Task[Delivery[Alert] | None] | None = None
        if failures is not None:
            failure_wait = asyncio.ensure_future(failures.next())
        last_problem = ""
        # Falco sets its watches after reading: a commit landing in between goes unseen.
        # If the verdict is slow, poke the watched folders once (it loads nothing by itself).
        nudge_at = time.monotonic() + self.confirm_timeout / 3
        try:
            while True:
                if nudge_at and time.monotonic() >= nudge_at:
                    nudge_at = 0.0
                    await asyncio.to_thread(self.store.nudge_falco)
                try:
                    rules, configs = loaded_file_hashes(await self.falco.metrics())
                    if is_loaded(expected_rules, rules) and is_loaded(expected_configs, configs):
                        return LoadStatus(LoadState.LOADED, "", time.time())
                    last_problem = ""
                except Unavailable as error:
                    last_problem = f"; last error: {error}"
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return LoadStatus(
                        LoadState.UNKNOWN,
                        f"Falco did not report loading generation {result.generation} within "
                        f"{self.confirm_timeout:g} s{last_problem}",
                        time.time(),
                    )
                if failure_wait is None:
                    await asyncio.sleep(min(self.poll_interval, remaining))
                    continue
                done, _ = await asyncio.wait({failure_wait}, timeout=min(self.poll_interval, remaining))
                if failure_wait in done:
                    delivery = failure_wait.result()
                    if delivery is not None and delivery.entry is not None:
                        alert = delivery.entry.item
                        if alert.time_ns < not_before_ns and failures is not None:
                            log.info(
                                "ignoring a hot restart failure stamped before generation %d was "
                                "committed: %s",
                                result.generation,
                                alert.output or alert.message,
                            )
                            failure_wait = asyncio.ensure_future(failures.next())
                            continue
                        message = alert.output or alert.message or HOT_RESTART_FAILURE_RULE
                        return LoadStatus(
                            LoadState.FAILED, f"Falco refused the new set: {message}", time.time()
                        )
                    failure_wait = None
        finally:
            if failure_wait is not None:
                failure_wait.cancel()
