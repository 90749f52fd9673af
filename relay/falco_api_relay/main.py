"""falco-api-relay: one cluster-wide event stream, merged from every sidecar, with the sidecar's API."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from falco_api import __version__
from falco_api.contract.falco import version_pb2
from falco_api.discovery import (
    DEFAULT_PORT_NAME,
    DEFAULT_SELECTOR,
    SelectorError,
    Sidecar,
    add_discovery_arguments,
    parse_equality_selector,
)
from falco_api.process import exit_code, run_until_signalled
from falco_api.server import RunningServer, start_server
from falco_api.servicers import (
    LEGACY_OUTPUTS_SERVICE,
    LEGACY_VERSION_SERVICE,
    STREAMING_SERVICE,
    UNARY_SERVICE,
    DropsServicer,
    OutputsServicer,
    VersionServicer,
    outputs_handlers,
    streaming_handlers,
    version_handlers,
)
from falco_api.tls import TlsConfigError, TlsFiles, check_transport, is_unix
from falco_api_relay.kube import DiscoveryError, KopfPodWatch
from falco_api_relay.merge import DEFAULT_QUEUE_SIZE, DEFAULT_REPLAY_SIZE, RelayStreams
from falco_api_relay.targets import UpstreamTarget, sidecar_targets, static_targets
from falco_api_relay.upstream import BackoffPolicy, UpstreamManager, channel_factory

log = logging.getLogger("falco_api_relay")

DEFAULT_GRPC_LISTEN = "0.0.0.0:5060"


@dataclass
class RelayConfig:
    grpc_listen: str = DEFAULT_GRPC_LISTEN
    tls: TlsFiles | None = None
    upstream_tls: TlsFiles | None = None
    upstream_server_name: str | None = None
    insecure: bool = False
    upstreams: list[str] = field(default_factory=list)
    kubernetes: bool = True
    namespace: str = "falco"
    sidecar_selector: str = DEFAULT_SELECTOR
    sidecar_port_name: str = DEFAULT_PORT_NAME
    # A kopf.ConnectionInfo for the pod watch; None: the pod's service account, else the kubeconfig.
    kube_connection: Any = None
    hostname: str = field(default_factory=socket.gethostname)
    replay_size: int = DEFAULT_REPLAY_SIZE
    queue_size: int = DEFAULT_QUEUE_SIZE
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    status_interval: float = 60.0
    grace: float = 5.0

    def check(self) -> None:
        """Refuse, before anything starts, what could only fail later (and then forever)."""
        if self.replay_size < 0 or self.queue_size < 1:
            raise ValueError("--replay-size must be >= 0 and --queue-size >= 1")
        if not self.upstreams and not self.kubernetes:
            raise ValueError("nothing to relay: give --upstream ADDR, or run in Kubernetes with discovery")
        check_transport(self.grpc_listen, self.tls, self.insecure)
        static = static_targets(self.upstreams)
        needs_tls = self.kubernetes or any(not is_unix(t.address) for t in static.values())
        if needs_tls and self.upstream_tls is None and not self.insecure:
            raise TlsConfigError(
                "sidecars are reached over TCP: give --upstream-tls-cert/-key/-ca (or --tls-cert/-key/-ca) "
                "for mutual TLS, or --insecure (never in production)"
            )
        for files in (self.tls, self.upstream_tls):
            if files is not None:
                files.read()
        if self.kubernetes:
            parse_equality_selector(self.sidecar_selector)


class Relay:
    """Every part of the relay, started and stopped together (also used in-process by tests)."""

    def __init__(self, config: RelayConfig) -> None:
        config.check()
        self.config = config
        self.streams = RelayStreams(
            hostname=config.hostname, replay_size=config.replay_size, queue_size=config.queue_size
        )
        self.upstreams = UpstreamManager(
            self.streams,
            channel_factory(
                tls=config.upstream_tls, insecure=config.insecure, server_name=config.upstream_server_name
            ),
            config.backoff,
        )
        self.grpc: RunningServer | None = None
        self.pod_watch: KopfPodWatch | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    @property
    def grpc_port(self) -> int:
        return self.grpc.port if self.grpc else 0

    async def version(self) -> version_pb2.response:
        return await self.upstreams.version()

    async def start(self) -> None:
        outputs = OutputsServicer(self.streams.alerts)
        drops = DropsServicer(self.streams.drops)
        version = VersionServicer(self.version)
        self.grpc = await start_server(
            self.config.grpc_listen,
            tls=self.config.tls,
            insecure=self.config.insecure,
            handlers=[
                *outputs_handlers(outputs),
                *streaming_handlers(outputs, drops),
                *version_handlers(version),
                *version_handlers(version, UNARY_SERVICE),
            ],
            service_names=[LEGACY_OUTPUTS_SERVICE, LEGACY_VERSION_SERVICE, STREAMING_SERVICE, UNARY_SERVICE],
        )
        await self.upstreams.set_static(static_targets(self.config.upstreams))
        if self.config.kubernetes:
            self.pod_watch = KopfPodWatch(
                namespace=self.config.namespace,
                selector=self.config.sidecar_selector,
                port_name=self.config.sidecar_port_name,
                loop=asyncio.get_running_loop(),
                on_sidecars=self._on_sidecars,
                connection=self.config.kube_connection,
            )
            self.pod_watch.start()
        if self.config.status_interval > 0:
            self._tasks.append(asyncio.create_task(self._log_status()))
        log.info(
            "relay %s up: gRPC %s, %d static upstream(s)%s",
            __version__,
            self.config.grpc_listen,
            len(self.config.upstreams),
            f", sidecars {self.config.sidecar_selector!r} in {self.config.namespace!r}"
            if self.config.kubernetes
            else "",
        )

    def _on_sidecars(self, by_node: Mapping[str, Sidecar]) -> None:
        targets: dict[str, UpstreamTarget] = sidecar_targets(by_node)
        task = asyncio.create_task(self.upstreams.set_discovered(targets))
        self._tasks.append(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)

    async def _log_status(self) -> None:
        while True:
            await asyncio.sleep(self.config.status_interval)
            stats = self.streams.stats
            log.info(
                "upstreams: %s | relayed %d alerts (%d duplicates skipped), %d gaps (%d missed), "
                "%d drop reports; %d subscribers",
                self.upstreams.describe(),
                stats.alerts,
                stats.duplicates,
                stats.gaps,
                stats.missed,
                stats.drops,
                len(self.streams.alerts.subscriptions),
            )

    async def failed(self) -> None:
        """Returns (raising) only if discovery stopped on its own: the relay cannot follow sidecars then."""
        if self.pod_watch is None:
            await asyncio.Event().wait()
        else:
            await self.pod_watch.failed

    async def stop(self) -> None:
        """Stop following sidecars, let subscribers drain their queues within the grace period, then close."""
        if self.pod_watch is not None:
            await asyncio.to_thread(self.pod_watch.stop)
        for task in list(self._tasks):
            task.cancel()
        await self.upstreams.close()
        self.streams.close()
        if self.grpc is not None:
            await self.grpc.stop(self.config.grace)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="falco-api-relay",
        description="One cluster-wide alerts and drops stream, merged from every Falco API sidecar, "
        "served with the sidecar's streaming API.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--grpc-listen",
        default=os.environ.get("FALCO_API_RELAY_GRPC_LISTEN", DEFAULT_GRPC_LISTEN),
        help="host:port (mutual TLS) or unix:///path (local, no auth) (default: %(default)s)",
    )
    parser.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="ADDR",
        help="a sidecar to follow, host:port or unix:///path (repeatable); without any, sidecars are "
        "discovered from Kubernetes pods",
    )
    parser.add_argument(
        "--kubernetes",
        action="store_true",
        help="discover sidecars from Kubernetes pods even when --upstream is given",
    )
    add_discovery_arguments(parser)
    parser.add_argument("--tls-cert", help="the relay server's certificate (PEM)")
    parser.add_argument("--tls-key", help="its private key (PEM)")
    parser.add_argument("--tls-ca", help="CA that signs the relay's clients' certificates (PEM)")
    parser.add_argument(
        "--upstream-tls-cert", help="client certificate towards sidecars (default: --tls-cert)"
    )
    parser.add_argument("--upstream-tls-key", help="its private key (default: --tls-key)")
    parser.add_argument(
        "--upstream-tls-ca", help="CA that signs the sidecars' certificates (default: --tls-ca)"
    )
    parser.add_argument(
        "--upstream-server-name", help="name to check in sidecar certificates (they are reached by pod IP)"
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow plain TCP, both sides, without TLS (never in production)",
    )
    parser.add_argument(
        "--replay-size",
        type=int,
        default=DEFAULT_REPLAY_SIZE,
        help="alerts kept for get and resume, all sidecars together (default: %(default)s)",
    )
    parser.add_argument(
        "--queue-size",
        type=int,
        default=DEFAULT_QUEUE_SIZE,
        help="alerts queued per subscriber before it loses some (default: %(default)s)",
    )
    parser.add_argument(
        "--status-interval",
        type=float,
        default=60.0,
        help="seconds between upstream status log lines, 0 for none (default: %(default)s)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=5.0,
        help="seconds streams get to drain on SIGTERM (default: %(default)s)",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def _upstream_tls(args: argparse.Namespace) -> TlsFiles | None:
    cert = args.upstream_tls_cert or args.tls_cert
    key = args.upstream_tls_key or args.tls_key
    ca = args.upstream_tls_ca or args.tls_ca
    given = [value for value in (cert, key, ca) if value]
    if not given:
        return None
    if len(given) != 3:
        raise TlsConfigError(
            "mutual TLS towards sidecars needs a certificate, a key and a CA: give all three of "
            "--upstream-tls-cert/-key/-ca (each defaults to its --tls-* counterpart)"
        )
    return TlsFiles(cert=cert, key=key, ca=ca)


def config_from_args(args: argparse.Namespace) -> RelayConfig:
    config = RelayConfig(
        grpc_listen=args.grpc_listen,
        tls=TlsFiles.from_flags(args.tls_cert, args.tls_key, args.tls_ca),
        upstream_tls=_upstream_tls(args),
        upstream_server_name=args.upstream_server_name,
        insecure=args.insecure,
        upstreams=list(args.upstream),
        kubernetes=args.kubernetes or not args.upstream,
        namespace=args.namespace,
        sidecar_selector=args.sidecar_selector,
        sidecar_port_name=args.sidecar_port_name,
        hostname=os.environ.get("POD_NAME") or socket.gethostname(),
        replay_size=args.replay_size,
        queue_size=args.queue_size,
        status_interval=args.status_interval,
        grace=args.grace,
    )
    config.check()
    return config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def serve() -> None:
        config = config_from_args(args)
        relay = Relay(config)
        asyncio.run(run_until_signalled(relay, grace=config.grace, log=log, failure=relay.failed))

    return exit_code(
        "falco-api-relay",
        serve,
        usage_errors=(TlsConfigError, SelectorError, ValueError, OSError),
        fatal_errors=(DiscoveryError,),
    )


if __name__ == "__main__":
    sys.exit(main())
