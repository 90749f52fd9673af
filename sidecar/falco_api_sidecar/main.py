"""falco-api-sidecar: the Falco API gRPC server that runs beside one Falco."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from falco_api import __version__
from falco_api.contract.falco import version_pb2
from falco_api.netaddr import split_host_port
from falco_api.process import exit_code, run_until_signalled
from falco_api.rules import Finding, RulesFile, validate_rules
from falco_api.server import RunningServer, start_server
from falco_api.servicers import (
    LEGACY_OUTPUTS_SERVICE,
    LEGACY_VERSION_SERVICE,
    STREAMING_SERVICE,
    UNARY_SERVICE,
    DropsServicer,
    OutputsServicer,
    Unavailable,
    VersionServicer,
    outputs_handlers,
    streaming_handlers,
    version_handlers,
)
from falco_api.streams import DEFAULT_QUEUE_SIZE, DEFAULT_REPLAY_SIZE, EventStreams
from falco_api.tls import TlsConfigError, TlsFiles, check_transport
from falco_api_sidecar.authz import add_authz_arguments, audit, authz_interceptor
from falco_api_sidecar.falco_web import FalcoVersionError, FalcoWebClient, version_response
from falco_api_sidecar.ingest import DEFAULT_MAX_BODY, ingest_app
from falco_api_sidecar.inputs import (
    BIDIRECTIONAL_SERVICE,
    DEFAULT_K8SAUDIT_URL,
    InputsCollector,
    InputsLimits,
    add_inputs_arguments,
    create_inputs_servicer,
    inputs_handlers,
    inputs_limits_from_args,
)
from falco_api_sidecar.line_ingest import RunningLineIngest, start_line_ingest
from falco_api_sidecar.managed import ManagedError, ManagedStore
from falco_api_sidecar.metrics import metrics_app
from falco_api_sidecar.unary import UnaryServicer, register_unary
from falco_api_sidecar.writes import WriteCoordinator

log = logging.getLogger("falco_api_sidecar")

DEFAULT_GRPC_LISTEN = "unix:///run/falco-api/falco-api.sock"
REJECTION_REPORT_INTERVAL = 10.0


@dataclass
class SidecarConfig:
    grpc_listen: str = DEFAULT_GRPC_LISTEN
    ingest_listen: str = "127.0.0.1:2801"
    falco_url: str = "http://127.0.0.1:8765"
    metrics_listen: str | None = "127.0.0.1:9376"
    tls: TlsFiles | None = None
    insecure: bool = False
    node_name: str = field(default_factory=socket.gethostname)
    replay_size: int = DEFAULT_REPLAY_SIZE
    queue_size: int = DEFAULT_QUEUE_SIZE
    max_body: int = DEFAULT_MAX_BODY
    grace: float = 5.0
    # unix:///path (or tcp://127.0.0.1:port): Falco's program_output, one JSON alert per line.
    line_ingest: str | None = None
    # The write side (rules and configs). Without managed_root those calls answer UNIMPLEMENTED.
    managed_root: Path | None = None
    falco_managed_root: Path | None = None
    falco_config: Path | None = None
    base_rules: tuple[Path, ...] = ()
    falco_binary: str | None = None
    confirm_timeout: float = 30.0
    authz_config: str | None = None
    k8saudit_url: str = DEFAULT_K8SAUDIT_URL
    inputs_limits: InputsLimits = field(default_factory=InputsLimits)


def record_write(_context: object, action: str, target: str, old: str, new: str, result: str) -> None:
    """Audit every write: the caller is read from the call's authorization context."""
    audit(None, action, target, old or None, new or None, result)


class Sidecar:
    """Every part of the sidecar, started and stopped together (also used in-process by tests)."""

    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        check_transport(config.grpc_listen, config.tls, config.insecure)
        self.origin = f"{config.node_name}/{int(time.time())}-{secrets.token_hex(3)}"
        self.streams = EventStreams(
            origin=self.origin,
            hostname=config.node_name,
            replay_size=config.replay_size,
            queue_size=config.queue_size,
        )
        self.falco = FalcoWebClient(config.falco_url)
        self.authz = authz_interceptor(config.authz_config, config.grpc_listen, config.tls)
        self.inputs = create_inputs_servicer(config.k8saudit_url, config.inputs_limits)
        self.engine_version: str | None = None
        self.store: ManagedStore | None = None
        self.writes: WriteCoordinator | None = None
        if config.managed_root is not None:
            self.store = ManagedStore.open(
                config.managed_root,
                rules_validator=self._validate_rules,
                base_config_path=config.falco_config,
                preceding_rules_files=config.base_rules,
                falco_root=config.falco_managed_root,
            )
            self.writes = WriteCoordinator(
                self.store, self.falco, self.streams.alerts, confirm_timeout=config.confirm_timeout
            )
        self.grpc: RunningServer | None = None
        self._runners: list[web.AppRunner] = []
        self.ingest_port = 0
        self.line_ingest: RunningLineIngest | None = None
        self.metrics_port = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def version(self) -> version_pb2.response:
        versions = await self.falco.versions()
        try:
            response = version_response(versions, hostname=self.config.node_name)
        except FalcoVersionError as error:
            raise Unavailable(str(error)) from None
        # Remembered for required_engine_version checks of later writes.
        self.engine_version = response.engine_version or None
        return response

    def _validate_rules(self, files: Sequence[RulesFile]) -> list[Finding]:
        return validate_rules(
            files, engine_version=self.engine_version, falco_binary=self.config.falco_binary
        )

    async def _serve_http(self, app: web.Application, address: str, flag: str) -> int:
        host, port = split_host_port(address, flag=flag)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        self._runners.append(runner)
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else port

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
                *inputs_handlers(self.inputs),
            ],
            interceptors=[self.authz],
            register=[
                register_unary(
                    UnaryServicer(
                        version,
                        store=self.store,
                        writes=self.writes,
                        audit=record_write,
                        base_config_path=self.config.falco_config,
                    )
                )
            ],
            service_names=[
                LEGACY_OUTPUTS_SERVICE,
                LEGACY_VERSION_SERVICE,
                STREAMING_SERVICE,
                UNARY_SERVICE,
                BIDIRECTIONAL_SERVICE,
            ],
        )
        self.ingest_port = await self._serve_http(
            ingest_app(self.streams, max_body=self.config.max_body),
            self.config.ingest_listen,
            "--ingest-listen",
        )
        if self.config.line_ingest:
            self.line_ingest = await start_line_ingest(
                self.streams, self.config.line_ingest, max_line=self.config.max_body
            )
        if self.config.metrics_listen:
            self.metrics_port = await self._serve_http(
                metrics_app(self.streams, InputsCollector(self.inputs.stats)),
                self.config.metrics_listen,
                "--metrics-listen",
            )
        self._tasks.append(asyncio.create_task(self._report_rejections()))
        if self.store is not None:
            with contextlib.suppress(Unavailable):
                await self.version()
            log.info(
                "managing rules and configs in %s; Falco must list %s in config_files",
                self.config.managed_root,
                self.store.falco_config_file,
            )
        log.info(
            "sidecar %s up: gRPC %s, ingest %s, Falco webserver %s",
            self.origin,
            self.config.grpc_listen,
            self.config.ingest_listen,
            self.config.falco_url,
        )

    @property
    def grpc_port(self) -> int:
        return self.grpc.port if self.grpc else 0

    async def _report_rejections(self) -> None:
        while True:
            await asyncio.sleep(REJECTION_REPORT_INTERVAL)
            self.streams.flush_rejections()

    async def stop(self) -> None:
        """Stop taking alerts, let subscribers drain their queues within the grace period, then close."""
        if self.writes is not None:
            # Everything a verdict needs (Falco's webserver, our ingest) is still up here.
            await self.writes.drain(self.config.grace)
        for task in self._tasks:
            task.cancel()
        if self.line_ingest is not None:
            await self.line_ingest.stop()
        for runner in self._runners:
            await runner.cleanup()
        self.streams.flush_rejections()
        self.streams.close()
        if self.grpc is not None:
            await self.grpc.stop(self.config.grace)
        await self.falco.close()
        await self.inputs.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="falco-api-sidecar",
        description="The Falco API (outputs, drops, version, rules, configs, inputs) beside one Falco.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--grpc-listen",
        default=os.environ.get("FALCO_API_GRPC_LISTEN", DEFAULT_GRPC_LISTEN),
        help="unix:///path (local, no auth) or host:port (mutual TLS) (default: %(default)s)",
    )
    parser.add_argument(
        "--ingest-listen",
        default="127.0.0.1:2801",
        help="where Falco's http_output posts alerts (default: %(default)s)",
    )
    parser.add_argument(
        "--falco-url", default="http://127.0.0.1:8765", help="Falco's webserver (default: %(default)s)"
    )
    parser.add_argument(
        "--metrics-listen",
        default="127.0.0.1:9376",
        help="Prometheus /metrics host:port, or 'off' (default: %(default)s)",
    )
    parser.add_argument("--tls-cert", help="this server's certificate (PEM)")
    parser.add_argument("--tls-key", help="this server's private key (PEM)")
    parser.add_argument("--tls-ca", help="CA that signs client certificates (PEM)")
    parser.add_argument(
        "--insecure", action="store_true", help="allow plain TCP without TLS (never in production)"
    )
    parser.add_argument(
        "--node-name",
        default=os.environ.get("NODE_NAME") or socket.gethostname(),
        help="this node's name, used in origins and reports (default: $NODE_NAME or hostname)",
    )
    parser.add_argument(
        "--replay-size",
        type=int,
        default=DEFAULT_REPLAY_SIZE,
        help="alerts kept for get and resume (default: %(default)s)",
    )
    parser.add_argument(
        "--queue-size",
        type=int,
        default=DEFAULT_QUEUE_SIZE,
        help="alerts queued per subscriber before it loses some (default: %(default)s)",
    )
    parser.add_argument(
        "--max-body",
        type=int,
        default=DEFAULT_MAX_BODY,
        help="largest alert POST (or line) accepted, bytes (default: %(default)s)",
    )
    parser.add_argument(
        "--line-ingest",
        help="also read alerts one JSON object per line (Falco's program_output) from this "
        "unix:///path socket (or tcp://127.0.0.1:port); see docs/line-ingest.md",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=5.0,
        help="seconds streams get to drain on SIGTERM (default: %(default)s)",
    )
    writes = parser.add_argument_group("rules and configs (the write side)")
    writes.add_argument(
        "--managed-root",
        type=Path,
        help="folder (shared with Falco) for the managed rules and config files; "
        "without it the write calls answer UNIMPLEMENTED",
    )
    writes.add_argument(
        "--falco-managed-root",
        type=Path,
        help="the same folder as Falco's container sees it (default: --managed-root)",
    )
    writes.add_argument(
        "--falco-config",
        type=Path,
        default=Path("/etc/falco/falco.yaml"),
        help="Falco's base falco.yaml, for the effective config (default: %(default)s)",
    )
    writes.add_argument(
        "--base-rules",
        type=Path,
        action="append",
        default=[],
        help="rules files Falco loads before the managed ones, for validation (repeatable)",
    )
    writes.add_argument("--falco-binary", help="also validate with this falco's -V (its verdict is final)")
    writes.add_argument(
        "--confirm-timeout",
        type=float,
        default=30.0,
        help="seconds to wait for Falco to confirm a write (default: %(default)s)",
    )
    add_authz_arguments(parser)
    add_inputs_arguments(parser)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def config_from_args(args: argparse.Namespace) -> SidecarConfig:
    if args.replay_size < 0 or args.queue_size < 1 or args.max_body < 1024:
        raise ValueError("--replay-size must be >= 0, --queue-size >= 1 and --max-body >= 1024")
    return SidecarConfig(
        grpc_listen=args.grpc_listen,
        ingest_listen=args.ingest_listen,
        falco_url=args.falco_url,
        metrics_listen=None if args.metrics_listen == "off" else args.metrics_listen,
        tls=TlsFiles.from_flags(args.tls_cert, args.tls_key, args.tls_ca),
        insecure=args.insecure,
        node_name=args.node_name,
        replay_size=args.replay_size,
        queue_size=args.queue_size,
        max_body=args.max_body,
        grace=args.grace,
        line_ingest=args.line_ingest,
        managed_root=args.managed_root,
        falco_managed_root=args.falco_managed_root,
        falco_config=args.falco_config,
        base_rules=tuple(args.base_rules),
        falco_binary=args.falco_binary,
        confirm_timeout=args.confirm_timeout,
        authz_config=args.authz_config,
        k8saudit_url=args.k8saudit_url,
        inputs_limits=inputs_limits_from_args(args),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def serve() -> None:
        config = config_from_args(args)
        asyncio.run(run_until_signalled(Sidecar(config), grace=config.grace, log=log))

    return exit_code(
        "falco-api-sidecar", serve, usage_errors=(TlsConfigError, ManagedError, ValueError, OSError)
    )


if __name__ == "__main__":
    sys.exit(main())
