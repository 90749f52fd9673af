"""Sidecar discovery in Kubernetes: the operator's pod watch, run by kopf in a thread of its own.

kopf runs in its own thread and event loop because, in the main thread, it takes
over SIGTERM (and may SIGKILL the process after a timeout); the relay keeps its
own graceful stop. The thread only folds pod events into a
:class:`~falco_api.discovery.SidecarDirectory` and hands each new node -> sidecar
map to the relay's loop; what to do with it is pure (:mod:`falco_api_relay.targets`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, cast

from falco_api.discovery import Sidecar, SidecarDirectory, parse_equality_selector, register_kopf_pod_watch

log = logging.getLogger("falco_api_relay.kube")


class DiscoveryError(RuntimeError):
    """The pod watch stopped for good: the relay cannot follow sidecars any more."""


SidecarsCallback = Callable[[Mapping[str, Sidecar]], None]


class KopfPodWatch:
    """Watches the selected Falco pods of one namespace; ``on_sidecars`` runs on ``loop`` after changes."""

    def __init__(
        self,
        *,
        namespace: str,
        selector: str,
        port_name: str,
        loop: asyncio.AbstractEventLoop,
        on_sidecars: SidecarsCallback,
        connection: Any = None,
    ) -> None:
        """``connection``: a ``kopf.ConnectionInfo``; None logs in as the pod's service account, or
        else with the kubeconfig, as kopf does."""
        parse_equality_selector(selector)  # a bad selector fails at start-up, not in the thread
        self.namespace = namespace
        self.selector = selector
        self.directory = SidecarDirectory(port_name)
        self._loop = loop
        self._on_sidecars = on_sidecars
        self._connection = connection
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failed: asyncio.Future[None] = loop.create_future()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kopf-pod-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _changed(self, _nodes: set[str]) -> None:
        snapshot = dict(self.directory.by_node)
        self._loop.call_soon_threadsafe(self._on_sidecars, snapshot)

    def _run(self) -> None:
        try:
            asyncio.run(self._operator())
            error: BaseException | None = None
        except BaseException as raised:  # the thread's end must reach the relay, whatever it was
            error = raised
        if not self._stop.is_set():
            self._report(DiscoveryError(f"the Kubernetes pod watch ended: {error or 'without an error'}"))

    def _report(self, error: BaseException) -> None:
        log.error("pod discovery stopped: %s", error)
        self._loop.call_soon_threadsafe(self._fail, error)

    def _fail(self, error: BaseException) -> None:
        if not self.failed.done():
            self.failed.set_exception(error)

    async def _operator(self) -> None:
        import kopf

        registry = kopf.OperatorRegistry()

        @kopf.on.login(registry=registry)  # type: ignore[untyped-decorator]
        def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
            if self._connection is not None:
                return cast(kopf.ConnectionInfo, self._connection)
            info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
            if info is None:
                # kopf would wait for credentials forever, following no sidecar: say so and stop.
                self._report(
                    DiscoveryError(
                        "no Kubernetes credentials (no service account token, no kubeconfig) to discover "
                        "sidecars; outside Kubernetes, give --upstream ADDR"
                    )
                )
                self._stop.set()
            return info

        @kopf.on.startup(registry=registry)  # type: ignore[untyped-decorator]
        def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
            settings.posting.enabled = False  # a watcher with nothing to report on pods
            settings.watching.server_timeout = 300

        register_kopf_pod_watch(registry, self.selector, self.directory, self._changed)
        log.info("watching pods %r in namespace %r for sidecars", self.selector, self.namespace)
        await kopf.operator(
            registry=registry, standalone=True, namespaces=[self.namespace], stop_flag=self._stop
        )
