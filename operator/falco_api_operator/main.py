"""falco-api-operator: the command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Any

import kopf

from falco_api.discovery import SelectorError, add_discovery_arguments, parse_equality_selector
from falco_api.tls import TlsConfigError, TlsFiles

from .handlers import OperatorConfig, Runtime, register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="falco-api-operator",
        description="Pushes FalcoRule and FalcoConfig objects to the Falco API sidecars of their nodes.",
    )
    add_discovery_arguments(parser)
    parser.add_argument("--tls-cert", help="client certificate for mutual TLS towards the sidecars")
    parser.add_argument("--tls-key", help="its private key")
    parser.add_argument("--tls-ca", help="CA that signs the sidecars' server certificates")
    parser.add_argument(
        "--sidecar-server-name",
        default="falco-api-sidecar",
        help="name checked in the sidecars' certificates: they are reached by pod IP (default: %(default)s)",
    )
    parser.add_argument(
        "--insecure", action="store_true", help="plain TCP to the sidecars (never in production)"
    )
    parser.add_argument(
        "--webhook-port", type=int, help="serve the validating admission webhook on this port"
    )
    parser.add_argument(
        "--webhook-cert", help="webhook server certificate (default: self-signed, needs certbuilder)"
    )
    parser.add_argument("--webhook-key", help="webhook server private key")
    parser.add_argument(
        "--webhook-ca",
        help="CA bundle the API server trusts for the webhook (default: the webhook certificate itself)",
    )
    parser.add_argument(
        "--webhook-url", help="URL the API server calls, when the webhook is not behind a Service"
    )
    parser.add_argument(
        "--webhook-service", default="falco-api-operator", help="Service in --namespace in front"
    )
    parser.add_argument("--webhook-service-port", type=int, default=443)
    parser.add_argument(
        "--no-manage-webhook-configuration",
        dest="manage_webhook",
        action="store_false",
        help="do not create/patch the ValidatingWebhookConfiguration (it is installed by other means)",
    )
    parser.add_argument("--liveness", help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("--resync-seconds", type=float, default=300.0, help="full re-push period (0: never)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--standalone", dest="standalone", action="store_true", default=True, help="one replica"
    )
    mode.add_argument(
        "--peering", dest="peering", metavar="NAME", help="coordinate replicas via this kopf peering"
    )
    parser.add_argument("--verbose", action="store_true")
    return parser


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    parse_equality_selector(args.sidecar_selector)  # fail at start-up, not on the first pod event
    tls = TlsFiles.from_flags(args.tls_cert, args.tls_key, args.tls_ca)
    if tls is None and not args.insecure:
        raise TlsConfigError(
            "give --tls-cert, --tls-key and --tls-ca for mutual TLS to the sidecars, or --insecure"
        )
    if bool(args.webhook_cert) != bool(args.webhook_key):
        raise TlsConfigError("--webhook-cert and --webhook-key go together")
    return OperatorConfig(
        namespace=args.namespace,
        sidecar_selector=args.sidecar_selector,
        sidecar_port_name=args.sidecar_port_name,
        tls=tls,
        insecure=args.insecure,
        sidecar_server_name=args.sidecar_server_name,
        webhook_port=args.webhook_port,
        webhook_cert=args.webhook_cert,
        webhook_key=args.webhook_key,
        webhook_ca=args.webhook_ca,
        webhook_url=args.webhook_url,
        webhook_service=args.webhook_service,
        webhook_service_port=args.webhook_service_port,
        manage_webhook_configuration=args.manage_webhook,
        resync_seconds=args.resync_seconds,
        standalone=args.peering is None,
        peering_name=args.peering or "falco-api-operator",
    )


async def run(
    config: OperatorConfig,
    liveness: str | None = None,
    *,
    runtime: Runtime | None = None,
    settings: kopf.OperatorSettings | None = None,
    stop_flag: Any = None,
    ready_flag: Any = None,
) -> None:
    """Run the operator until stopped: the one way it starts, in its process and in the tests."""
    registry = kopf.OperatorRegistry()
    register(registry, runtime or Runtime(config))
    await kopf.operator(
        registry=registry,
        settings=settings,
        standalone=config.standalone,
        # kopf takes any peering name as "peering is mandatory": a standalone operator given one
        # pauses every watch until the peering resource exists, which it never looks for.
        peering_name=None if config.standalone else config.peering_name,
        namespaces=[config.namespace],
        liveness_endpoint=liveness,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except (TlsConfigError, SelectorError) as error:
        print(f"falco-api-operator: {error}", file=sys.stderr)
        return 2
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.PLAIN)
    logging.getLogger("falco_api_operator").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        asyncio.run(run(config, args.liveness))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
