"""falco-api: the command-line client of the Falco API (sidecar or relay)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Sequence
from typing import TextIO

import grpc
from google.protobuf import json_format

from falco_api import __version__
from falco_api.alerts import AlertError, parse_priority
from falco_api.cli_inputs import add_inputs_parser, run_inputs
from falco_api.cli_manage import (
    ManageUsageError,
    add_config_parser,
    add_rules_commands,
    run_config,
    run_rules,
)
from falco_api.client import describe_rpc_error, priority_name, response_to_falco_json, timestamp_text
from falco_api.contract.falco import outputs_pb2, version_pb2
from falco_api.contract.falco.api import drops_pb2, streaming_pb2_grpc, unary_pb2_grpc
from falco_api.rules import validate_paths
from falco_api.tls import TlsConfigError, TlsFiles, open_channel

DEFAULT_SERVER = "unix:///run/falco-api/falco-api.sock"

_DROP_KINDS = {
    "syscall": drops_pb2.DROP_KIND_SYSCALL_EVENT,
    "outputs-queue": drops_pb2.DROP_KIND_OUTPUTS_QUEUE,
    "subscriber": drops_pb2.DROP_KIND_SUBSCRIBER_OVERFLOW,
    "ingest": drops_pb2.DROP_KIND_INGEST_REJECTED,
}


class UsageError(Exception):
    pass


def _connection_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--server",
        default=os.environ.get("FALCO_API_SERVER", DEFAULT_SERVER),
        help="unix:///path or host:port (default: $FALCO_API_SERVER or %(default)s)",
    )
    group.add_argument(
        "--tls-cert", default=os.environ.get("FALCO_API_TLS_CERT"), help="client certificate (PEM)"
    )
    group.add_argument("--tls-key", default=os.environ.get("FALCO_API_TLS_KEY"), help="client key (PEM)")
    group.add_argument("--tls-ca", default=os.environ.get("FALCO_API_TLS_CA"), help="CA of the server (PEM)")
    group.add_argument("--tls-server-name", help="name to check in the server certificate")
    group.add_argument("--insecure", action="store_true", help="plain TCP without TLS (never in production)")
    group.add_argument(
        "--timeout", type=float, default=10.0, help="seconds for unary calls (default: %(default)s)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="falco-api", description="Client of the Falco API.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _connection_args(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    version = commands.add_parser("version", help="Falco's version, as the server reports it")
    version.add_argument("-o", "--output", choices=["text", "json"], default="text")

    events = commands.add_parser("events", help="alerts: a snapshot of recent ones, or --follow live")
    events.add_argument("-f", "--follow", action="store_true", help="keep streaming new alerts")
    events.add_argument("--min-priority", help="only alerts at least this severe (e.g. warning)")
    events.add_argument("--rule", action="append", default=[], help="rule-name glob to include (repeatable)")
    events.add_argument(
        "--exclude-rule", action="append", default=[], help="rule-name glob to drop (repeatable)"
    )
    events.add_argument("--tag", action="append", default=[], help="only alerts with one of these tags")
    events.add_argument(
        "--source", action="append", default=[], help="only these sources (syscall, k8s_audit, ...)"
    )
    events.add_argument("--hostname", action="append", default=[], help="only alerts from these hosts")
    events.add_argument("--no-internal", action="store_true", help="leave out Falco's internal alerts")
    events.add_argument(
        "--resume",
        action="append",
        default=[],
        metavar="ORIGIN=SEQ",
        help="resume after this position (repeatable, one per origin)",
    )
    events.add_argument(
        "-o",
        "--output",
        choices=["text", "json"],
        default="text",
        help="compact text, or one Falco-style JSON object per line",
    )

    drops = commands.add_parser("drops", help="drop reports: what was lost, where and when")
    drops.add_argument("-f", "--follow", action="store_true", help="keep streaming new reports")
    drops.add_argument("--kind", action="append", default=[], choices=sorted(_DROP_KINDS))
    drops.add_argument("-o", "--output", choices=["text", "json"], default="text")

    rules = commands.add_parser("rules", help="Falco rules: list, get, apply, delete, validate")
    rules_commands = rules.add_subparsers(dest="rules_command", required=True, metavar="RULES_COMMAND")
    validate = rules_commands.add_parser(
        "validate", help="check rules files as Falco's loader would (no server needed); exit 1 on errors"
    )
    validate.add_argument(
        "paths",
        nargs="+",
        metavar="FILE",
        help="rules files or folders, in load order (a folder: its .yaml files, sorted)",
    )
    validate.add_argument(
        "--engine-version", help="Falco's engine version to check required_engine_version against"
    )
    validate.add_argument("--falco-binary", help="also run this falco's -V; its verdict is final")
    add_rules_commands(rules_commands)
    add_config_parser(commands)
    add_inputs_parser(commands)
    return parser


def validate_rules_command(args: argparse.Namespace, out: TextIO) -> int:
    """Print every finding as file:line:col: item: message; exit 1 when any is an error."""
    findings = validate_paths(args.paths, engine_version=args.engine_version, falco_binary=args.falco_binary)
    for finding in findings:
        out.write(f"{finding}\n")
    errors = sum(1 for finding in findings if finding.severity == "error")
    warnings = len(findings) - errors
    summary = f"{len(args.paths)} path(s): {errors} error(s), {warnings} warning(s)"
    print(summary, file=sys.stderr)
    return 1 if errors else 0


def outputs_request(args: argparse.Namespace) -> outputs_pb2.request:
    request = outputs_pb2.request(
        follow=args.follow,
        rules=args.rule,
        exclude_rules=args.exclude_rule,
        tags=args.tag,
        sources=args.source,
        hostnames=args.hostname,
        exclude_internal=args.no_internal,
    )
    if args.min_priority:
        try:
            request.min_priority = parse_priority(args.min_priority)  # type: ignore[assignment]
        except AlertError as error:
            raise UsageError(str(error)) from None
    for position in args.resume:
        origin, separator, seq = position.rpartition("=")
        if not separator or not origin or not seq.isdigit():
            raise UsageError(f"--resume takes ORIGIN=SEQ, got {position!r}")
        request.resume_after[origin] = int(seq)
    return request


def format_event(response: outputs_pb2.response, output: str) -> str:
    if output == "json":
        return json.dumps(response_to_falco_json(response), separators=(",", ":"))
    time_text = timestamp_text(response.time.seconds, response.time.nanos)
    priority = priority_name(response.priority)
    line = f"{time_text} {priority:<13} {response.hostname} [{response.rule}] {response.output}"
    if response.missed_before:
        line = f"!! {response.missed_before} alert(s) lost before this one\n{line}"
    return line


def format_gap(response: outputs_pb2.response, output: str) -> str:
    gap = response.gap
    if output == "json":
        return json.dumps({"gap": json_format.MessageToDict(gap, preserving_proto_field_name=True)})
    return f"!! {gap.missed} alert(s) lost ({gap.reason}) origin={gap.origin or '-'}"


def format_drop(report: drops_pb2.DropReport, output: str) -> str:
    if output == "json":
        return json.dumps(
            json_format.MessageToDict(report, preserving_proto_field_name=True), separators=(",", ":")
        )
    kind = drops_pb2.DropKind.Name(report.kind).removeprefix("DROP_KIND_").lower()
    end = timestamp_text(report.window_end.seconds, report.window_end.nanos)
    detail = report.WhichOneof("detail") or ""
    extra = (
        json_format.MessageToDict(getattr(report, detail), preserving_proto_field_name=True) if detail else {}
    )
    counts = json.dumps(extra, separators=(",", ":"))
    return f"{end} {kind:<20} {report.hostname} dropped={report.dropped} {counts}"


async def event_batches(
    streaming: streaming_pb2_grpc.streamingAsyncStub, request: outputs_pb2.request
) -> AsyncIterator[Sequence[outputs_pb2.response]]:
    """Alerts as they come, batched (at high rates one message carries many); from a server of an
    older version without the batched stream, one by one."""
    try:
        async for batch in streaming.outputs_batched(request):
            yield batch.responses
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
        async for response in streaming.outputs(request):
            yield (response,)


async def run_command(args: argparse.Namespace, out: TextIO) -> int:
    tls = TlsFiles.from_flags(args.tls_cert, args.tls_key, args.tls_ca)
    channel = open_channel(args.server, tls=tls, insecure=args.insecure, server_name=args.tls_server_name)
    async with channel:
        if args.command == "version":
            reply: version_pb2.response = await unary_pb2_grpc.unaryStub(channel).version(
                version_pb2.request(), timeout=args.timeout
            )
            if args.output == "json":
                out.write(json_format.MessageToJson(reply, preserving_proto_field_name=True) + "\n")
            else:
                out.write(
                    f"Falco {reply.version} (engine {reply.engine_version}, libs {reply.libs_version}) "
                    f"on {reply.hostname}; falco-api {reply.api_version}\n"
                )
            return 0
        if args.command == "rules":
            return await run_rules(args, channel, out)
        if args.command == "config":
            return await run_config(args, channel, out)
        if args.command == "inputs":
            return await run_inputs(args, channel, out)
        streaming = streaming_pb2_grpc.streamingStub(channel)
        if args.command == "events":
            async for responses in event_batches(streaming, outputs_request(args)):
                for response in responses:
                    text = (
                        format_gap(response, args.output)
                        if response.HasField("gap")
                        else format_event(response, args.output)
                    )
                    out.write(text + "\n")
                out.flush()
            return 0
        if args.command == "drops":
            request = drops_pb2.DropsRequest(follow=args.follow, kinds=[_DROP_KINDS[k] for k in args.kind])
            async for report in streaming.drops(request):
                out.write(format_drop(report, args.output) + "\n")
                out.flush()
            return 0
    raise UsageError(f"unknown command {args.command}")


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "rules" and args.rules_command == "validate":
        return validate_rules_command(args, out)
    try:
        return asyncio.run(run_command(args, out))
    except (UsageError, ManageUsageError, TlsConfigError) as error:
        print(f"falco-api: {error}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as error:
        print(f"falco-api: {describe_rpc_error(error, args.server)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
