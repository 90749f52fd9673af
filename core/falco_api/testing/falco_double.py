"""A Falco double: behaves like Falco towards the sidecar, by Falco's documented contracts.

- posts alerts the way ``http_output`` does (one JSON object per POST,
  ``Content-Type: application/json``), rule alerts and internal ones;
- serves the webserver's ``/healthz``, ``/versions`` and ``/metrics``.

It stands in for Falco only where Falco cannot run (development machines, CI).
Run it alone with ``python -m falco_api.testing.falco_double --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import random
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
from aiohttp import web

from falco_api.netaddr import split_host_port

log = logging.getLogger(__name__)

FALCO_VERSION = "0.43.0"
ENGINE_VERSION_SEMVER = "0.52.0"

VERSIONS: dict[str, Any] = {
    "falco_version": FALCO_VERSION,
    "libs_version": "0.22.1",
    "plugin_api_version": "3.11.0",
    "driver_api_version": "8.0.0",
    "driver_schema_version": "3.69.0",
    "default_driver_version": "8.1.0+driver",
    "engine_version": "52",
    "engine_version_semver": ENGINE_VERSION_SEMVER,
    "plugin_versions": {},
}


def falco_time(time_ns: int) -> str:
    """Falco's alert time: ISO-8601 UTC with nanoseconds."""
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}Z"


_PROCESSES = [
    ("bash", "/bin/bash", "containerd-shim"),
    ("sh", "/bin/sh", "runc"),
    ("cat", "/usr/bin/cat", "bash"),
]

# (rule, priority, tags, output template) for a few rules of the public stable ruleset.
_RULES = [
    (
        "Terminal shell in container",
        "Notice",
        ["maturity_stable", "container", "shell", "mitre_execution", "T1059"],
        "A shell was spawned in a container with an attached terminal | evt_type={evt_type} user={user} "
        "process={proc} command={cmdline} terminal={tty}",
    ),
    (
        "Read sensitive file untrusted",
        "Warning",
        ["maturity_stable", "host", "container", "filesystem", "mitre_credential_access", "T1555"],
        "Sensitive file opened for reading by non-trusted program | file=/etc/shadow evt_type={evt_type} "
        "user={user} process={proc} command={cmdline} terminal={tty}",
    ),
    (
        "Drop and execute new binary in container",
        "Critical",
        ["maturity_stable", "container", "process", "mitre_persistence", "TA0003", "PCI_DSS_11.5.1"],
        "Executing binary not part of base image | proc_exe={exe} evt_type={evt_type} user={user} "
        "process={proc} command={cmdline} terminal={tty}",
    ),
]


def rule_alert(hostname: str, *, index: int, time_ns: int | None = None) -> dict[str, Any]:
    """A rule alert as Falco's JSON output prints it (typed output_fields, evt.time in ns)."""
    time_ns = time_ns or time.time_ns()
    rule, priority, tags, template = _RULES[index % len(_RULES)]
    proc, exe, parent = _PROCESSES[index % len(_PROCESSES)]
    fields: dict[str, Any] = {
        "evt.time": time_ns,
        "evt.type": "execve" if index % 2 else "openat",
        "user.name": "root",
        "user.uid": 0,
        "user.loginuid": -1,
        "proc.name": proc,
        "proc.exepath": exe,
        "proc.pname": parent,
        "proc.cmdline": f"{proc} -c id #{index}",
        "proc.tty": 34816 if index % 3 else 0,
        "container.id": f"{index % 7:012x}",
        "container.name": None if index % 5 == 0 else f"app-{index % 7}",
        "k8s.ns.name": "default",
        "k8s.pod.name": f"app-{index % 7}-7d4b9c",
    }
    text_time = falco_time(time_ns)
    output = template.format(
        evt_type=fields["evt.type"],
        user="root",
        proc=proc,
        cmdline=fields["proc.cmdline"],
        tty=fields["proc.tty"],
        exe=exe,
    )
    return {
        "hostname": hostname,
        "output": f"{text_time[11:29]}: {priority} {output}",
        "output_fields": fields,
        "priority": priority,
        "rule": rule,
        "source": "syscall",
        "tags": tags,
        "time": text_time,
    }


def syscall_drop_alert(hostname: str, *, n_drops: int, time_ns: int | None = None) -> dict[str, Any]:
    """Falco's ``syscall event drop`` internal alert: every counter, as strings."""
    time_ns = time_ns or time.time_ns()
    counters = {
        "n_evts": str(50_000 + n_drops),
        "n_drops": str(n_drops),
        "n_drops_buffer_total": str(n_drops),
        "n_drops_buffer_clone_fork_exit": "0",
        "n_drops_buffer_execve_exit": str(n_drops // 2),
        "n_drops_buffer_connect_exit": "0",
        "n_drops_buffer_open_exit": str(n_drops - n_drops // 2),
        "n_drops_buffer_dir_file_exit": "0",
        "n_drops_buffer_other_interest_exit": "0",
        "n_drops_buffer_close_exit": "0",
        "n_drops_buffer_proc_exit": "0",
        "n_drops_scratch_map": "0",
        "n_drops_page_faults": "0",
        "n_drops_bug": "0",
        "ebpf_enabled": "1",
    }
    return {
        "hostname": hostname,
        "output": f"Falco internal: syscall event drop. {n_drops} system calls dropped in last second.",
        "output_fields": counters,
        "priority": "Debug",
        "rule": "Falco internal: syscall event drop",
        "source": "internal",
        "time": falco_time(time_ns),
    }


def metrics_snapshot_alert(
    hostname: str, *, outputs_queue_drops: int, num_evts: int, time_ns: int | None = None
) -> dict[str, Any]:
    time_ns = time_ns or time.time_ns()
    return {
        "hostname": hostname,
        "output": "Falco metrics snapshot",
        "output_fields": {
            "evt.source": "syscall",
            "falco.num_evts": num_evts,
            "falco.outputs_queue_num_drops": outputs_queue_drops,
            "scap.n_evts": num_evts,
            "scap.n_drops": 0,
            "falco.host_boot_ts": 1_700_000_000_000_000_000,
            "falco.version": FALCO_VERSION,
        },
        "priority": "Informational",
        "rule": "Falco internal: metrics snapshot",
        "source": "internal",
        "time": falco_time(time_ns),
    }


def alert_mix(hostname: str) -> Iterator[dict[str, Any]]:
    """An endless, varied stream: mostly rule alerts, with internal drops and metrics now and then."""
    outputs_queue_drops = 0
    for index in itertools.count():
        if index % 25 == 24:
            yield syscall_drop_alert(hostname, n_drops=1 + index % 40)
        elif index % 50 == 49:
            outputs_queue_drops += index % 3
            yield metrics_snapshot_alert(
                hostname, outputs_queue_drops=outputs_queue_drops, num_evts=index * 1000
            )
        else:
            yield rule_alert(hostname, index=index)


class AlertPoster:
    """Posts alerts like ``http_output``: one JSON object per POST, in order, never in parallel."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sent = 0
        self.failed = 0
        self._session: aiohttp.ClientSession | None = None

    async def post(self, alert: dict[str, Any]) -> int:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        body = json.dumps(alert).encode()
        try:
            async with self._session.post(
                self.url, data=body, headers={"Content-Type": "application/json"}
            ) as reply:
                await reply.read()
                if reply.status < 300:
                    self.sent += 1
                else:
                    self.failed += 1
                return reply.status
        except (aiohttp.ClientError, TimeoutError) as error:
            # Falco logs http_output errors and goes on with the next alert.
            self.failed += 1
            log.debug("http_output POST failed: %s", error)
            return 0

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class FalcoDouble:
    """Falco's webserver endpoints plus its http_output, runnable in-process or as a program."""

    def __init__(
        self,
        *,
        hostname: str = "falco-double",
        versions: dict[str, Any] | None = None,
        metrics_text: Callable[[], str] | None = None,
        alert_url: str | None = None,
    ) -> None:
        self.hostname = hostname
        self.versions = dict(versions or VERSIONS)
        self.healthy = True
        self._metrics_text = metrics_text
        self._runner: web.AppRunner | None = None
        self.port = 0
        # http_output: alerts Falco raises itself (e.g. hot restart failure) go here, in order.
        self.alert_url = alert_url
        self._outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self.reload: Any = None

    def emit(self, alert: dict[str, Any]) -> None:
        """Raise an alert through http_output (called by the reload model on the loop's thread)."""
        self._outbox.put_nowait(alert)

    def attach_reload(self, model: Any) -> None:
        """Load files like Falco (a falco_reload.FalcoReloadModel): /metrics reports what it loaded.

        The model must have been made with ``on_alert=double.emit``; start() starts it (an invalid
        set at start raises, as Falco exits) and keeps it watching.
        """
        self.reload = model
        self._metrics_text = model.metrics_text

    async def _post_alerts(self) -> None:
        posters: dict[str, AlertPoster] = {}
        try:
            while True:
                alert = await self._outbox.get()
                if self.alert_url:
                    poster = posters.setdefault(self.alert_url, AlertPoster(self.alert_url))
                    await poster.post(alert)
        finally:
            for poster in posters.values():
                await poster.close()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/versions", self._versions)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def _healthz(self, _request: web.Request) -> web.Response:
        if not self.healthy:
            return web.json_response({"status": "error"}, status=503)
        return web.json_response({"status": "ok"})

    async def _versions(self, _request: web.Request) -> web.Response:
        return web.json_response(self.versions)

    async def _metrics(self, _request: web.Request) -> web.Response:
        text = self._metrics_text() if self._metrics_text else ""
        base = (
            "# HELP falcosecurity_falco_version_info Falco version\n"
            "# TYPE falcosecurity_falco_version_info gauge\n"
            f'falcosecurity_falco_version_info{{version="{self.versions.get("falco_version", "")}"}} 1\n'
        )
        return web.Response(text=base + text, content_type="text/plain")

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        if self.reload is not None:
            self.reload.start()
            self._tasks.append(asyncio.create_task(self.reload.run()))
        self._tasks.append(asyncio.create_task(self._post_alerts()))
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else port
        return self.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.reload is not None:
            self.reload.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def _run(args: argparse.Namespace) -> None:
    double = FalcoDouble(hostname=args.hostname)
    host, port = split_host_port(args.listen, flag="--listen")
    await double.start(host, port)
    poster = AlertPoster(args.post_url)
    log.info(
        "Falco double: webserver on %s, posting %.1f alerts/s to %s", args.listen, args.rate, args.post_url
    )
    try:
        for alert in alert_mix(args.hostname):
            await poster.post(alert)
            await asyncio.sleep(random.expovariate(args.rate) if args.rate > 0 else 3600)
    finally:
        await poster.close()
        await double.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="falco-double", description=__doc__.splitlines()[0] if __doc__ else ""
    )
    parser.add_argument(
        "--listen", default="127.0.0.1:8765", help="webserver host:port (default: %(default)s)"
    )
    parser.add_argument(
        "--post-url", default="http://127.0.0.1:2801/", help="http_output.url (default: %(default)s)"
    )
    parser.add_argument("--rate", type=float, default=2.0, help="alerts per second (default: %(default)s)")
    parser.add_argument("--hostname", default=socket.gethostname(), help="hostname in alerts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s falco-double: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
