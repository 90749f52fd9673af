"""`falco-api rules ...` and `falco-api config ...`: the write side of the CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, TextIO

import grpc
import yaml
from google.protobuf import json_format

from falco_api.contract.falco.api import apply_pb2, configs_pb2, rules_pb2, unary_pb2_grpc

# Writes wait for Falco's verdict, which takes a reload.
WRITE_TIMEOUT = 120.0
DEFAULT_ORDER = 50

EXIT_LOADED, EXIT_FAILED, EXIT_UNKNOWN = 0, 1, 3


class ManageUsageError(Exception):
    pass


def add_rules_commands(rules_commands: Any) -> None:
    listing = rules_commands.add_parser("list", help="the managed rulesets and whether Falco loaded them")
    listing.add_argument("-o", "--output", choices=["text", "json"], default="text")
    get = rules_commands.add_parser("get", help="one managed ruleset's content")
    get.add_argument("name")
    get.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    apply = rules_commands.add_parser(
        "apply", help="create or update rulesets from files (one reload for all); waits for Falco's verdict"
    )
    apply.add_argument(
        "-f",
        "--file",
        dest="files",
        action="append",
        required=True,
        type=Path,
        help="rules file; the ruleset is named after the file unless --name (repeatable)",
    )
    apply.add_argument("--name", help="ruleset name (one file only)")
    apply.add_argument(
        "--order", type=int, default=DEFAULT_ORDER, help="load order 0-99 (default: %(default)s)"
    )
    apply.add_argument(
        "--expected-version",
        type=int,
        help="only if the ruleset is at this version (0: must not exist); one file only",
    )
    delete = rules_commands.add_parser("delete", help="remove a managed ruleset; waits for Falco's verdict")
    delete.add_argument("name")
    delete.add_argument("--expected-version", type=int)


def add_config_parser(commands: Any) -> None:
    config = commands.add_parser("config", help="Falco config drop-ins managed by the sidecar")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="CONFIG_COMMAND")
    get = config_commands.add_parser("get", help="the effective config (falco.yaml + managed drop-ins)")
    get.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    set_ = config_commands.add_parser("set", help="create or replace a drop-in; waits for Falco's verdict")
    set_.add_argument("name", help="drop-in name")
    set_.add_argument(
        "settings",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted keys, YAML values (e.g. outputs.rate=5 priority=warning)",
    )
    set_.add_argument("-f", "--file", type=Path, help="the drop-in as a YAML mapping instead")
    set_.add_argument(
        "--order", type=int, default=DEFAULT_ORDER, help="merge order 0-99 (default: %(default)s)"
    )
    set_.add_argument("--expected-version", type=int)
    unset = config_commands.add_parser("unset", help="remove a drop-in; waits for Falco's verdict")
    unset.add_argument("name")
    unset.add_argument("--expected-version", type=int)


def settings_from_pairs(pairs: list[str]) -> dict[str, Any]:
    """``a.b=1 c=x`` -> {"a": {"b": 1}, "c": "x"}; values are read as YAML scalars."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, separator, text = pair.partition("=")
        if not separator or not key or any(not part for part in key.split(".")):
            raise ManageUsageError(f"settings are KEY=VALUE with dotted keys, got {pair!r}")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as error:
            raise ManageUsageError(f"value of {key} is not YAML: {error}") from None
        node = settings
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ManageUsageError(f"{key}: {part} is already set to a value")
            node = child
        node[leaf] = value
    return settings


def _read_text(path: Path) -> str:
    try:
        return path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ManageUsageError(f"cannot read {path}: {error}") from None


def describe_result(result: apply_pb2.WriteResult) -> tuple[str, int]:
    state = result.status.state
    changed = "" if result.changed else " (no change)"
    if state == rules_pb2.LoadStatus.STATE_LOADED:
        return f"loaded by Falco{changed}", EXIT_LOADED
    if state == rules_pb2.LoadStatus.STATE_FAILED:
        return f"FAILED: {result.status.message}", EXIT_FAILED
    if state == rules_pb2.LoadStatus.STATE_UNKNOWN:
        return f"written, but Falco's verdict is unknown: {result.status.message}", EXIT_UNKNOWN
    return f"written, pending{changed}", EXIT_UNKNOWN


def _state_name(status: rules_pb2.LoadStatus) -> str:
    return rules_pb2.LoadStatus.State.Name(status.state).removeprefix("STATE_").lower()


async def run_rules(args: argparse.Namespace, channel: grpc.aio.Channel, out: TextIO) -> int:
    stub = unary_pb2_grpc.unaryStub(channel)
    command = args.rules_command
    if command == "list":
        reply = await stub.list_rules(rules_pb2.ListRulesRequest(), timeout=args.timeout)
        if args.output == "json":
            out.write(json_format.MessageToJson(reply, preserving_proto_field_name=True) + "\n")
        for ruleset in reply.rulesets if args.output == "text" else []:
            line = (
                f"{ruleset.order:02d} {ruleset.name:<32} v{ruleset.version:<4} {_state_name(ruleset.status)}"
            )
            out.write(line + (f"  {ruleset.status.message}" if ruleset.status.message else "") + "\n")
        return 0
    if command == "get":
        ruleset = await stub.get_rule(rules_pb2.GetRuleRequest(name=args.name), timeout=args.timeout)
        if args.output == "json":
            out.write(json_format.MessageToJson(ruleset, preserving_proto_field_name=True) + "\n")
        else:
            out.write(ruleset.content)
        return 0
    if command == "delete":
        request = rules_pb2.DeleteRuleRequest(name=args.name)
        if args.expected_version is not None:
            request.expected_version = args.expected_version
        deleted = await stub.delete_rule(request, timeout=max(args.timeout, WRITE_TIMEOUT))
        text, code = describe_result(deleted.result)
        out.write(f"ruleset {args.name} deleted: {text}\n")
        return code
    # apply
    if (args.name or args.expected_version is not None) and len(args.files) != 1:
        raise ManageUsageError("--name and --expected-version go with exactly one -f FILE")
    rulesets = [
        rules_pb2.Ruleset(name=args.name or path.stem, content=_read_text(path), order=args.order)
        for path in args.files
    ]
    if len(rulesets) == 1:
        put = rules_pb2.PutRuleRequest(ruleset=rulesets[0])
        if args.expected_version is not None:
            put.expected_version = args.expected_version
        put_reply = await stub.put_rule(put, timeout=max(args.timeout, WRITE_TIMEOUT))
        text, code = describe_result(put_reply.result)
        out.write(f"ruleset {rulesets[0].name} v{put_reply.ruleset.version}: {text}\n")
        return code
    # Several files: one apply of the whole set, so Falco reloads once.
    current = await stub.list_rules(rules_pb2.ListRulesRequest(include_content=True), timeout=args.timeout)
    configs = await stub.get_config(configs_pb2.GetConfigRequest(), timeout=args.timeout)
    names = {r.name for r in rulesets}
    whole_set = apply_pb2.ApplyRequest(
        rulesets=[r for r in current.rulesets if r.name not in names] + rulesets,
        configs=list(configs.dropins),
    )
    applied = await stub.apply(whole_set, timeout=max(args.timeout, WRITE_TIMEOUT))
    text, code = describe_result(applied.result)
    out.write(f"rulesets {', '.join(sorted(names))}: {text}\n")
    return code


async def run_config(args: argparse.Namespace, channel: grpc.aio.Channel, out: TextIO) -> int:
    stub = unary_pb2_grpc.unaryStub(channel)
    command = args.config_command
    if command == "get":
        reply = await stub.get_config(configs_pb2.GetConfigRequest(), timeout=args.timeout)
        document = {
            "effective": json_format.MessageToDict(reply.effective),
            "base_included": reply.base_included,
            "dropins": [
                {
                    "name": d.name,
                    "order": d.order,
                    "version": d.version,
                    "status": _state_name(d.status),
                    "settings": json_format.MessageToDict(d.settings),
                }
                for d in reply.dropins
            ],
        }
        if args.output == "json":
            out.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
        else:
            out.write(yaml.safe_dump(document, sort_keys=True, default_flow_style=False))
        return 0
    if command == "unset":
        request = configs_pb2.DeleteConfigRequest(name=args.name)
        if args.expected_version is not None:
            request.expected_version = args.expected_version
        deleted = await stub.delete_config(request, timeout=max(args.timeout, WRITE_TIMEOUT))
        text, code = describe_result(deleted.result)
        out.write(f"drop-in {args.name} removed: {text}\n")
        return code
    # set
    if bool(args.file) == bool(args.settings):
        raise ManageUsageError("give either KEY=VALUE settings or -f FILE")
    if args.file:
        try:
            settings = yaml.safe_load(_read_text(args.file))
        except yaml.YAMLError as error:
            raise ManageUsageError(f"{args.file} is not YAML: {error}") from None
        if not isinstance(settings, dict):
            raise ManageUsageError(f"{args.file} must hold a mapping of falco.yaml keys")
    else:
        settings = settings_from_pairs(args.settings)
    dropin = configs_pb2.ConfigDropIn(name=args.name, order=args.order)
    dropin.settings.update(settings)
    put = configs_pb2.PutConfigRequest(dropin=dropin)
    if args.expected_version is not None:
        put.expected_version = args.expected_version
    put_reply = await stub.put_config(put, timeout=max(args.timeout, WRITE_TIMEOUT))
    text, code = describe_result(put_reply.result)
    out.write(f"drop-in {args.name} v{put_reply.dropin.version}: {text}\n")
    return code
