"""``falco-api inputs send FILE...``: stream Kubernetes audit events to Falco through the Falco API.

A file holds one audit ``Event``, one ``EventList``, a JSON array of them, or JSON lines (one
per line, as the API server's log backend writes them); ``-`` reads standard input. Each
message is acknowledged by the server; one line is printed per acknowledgement, and the exit
status is 1 when any message was rejected.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

import grpc

from falco_api.contract.falco.api import bidirectional_pb2_grpc, inputs_pb2


@dataclass(frozen=True)
class Message:
    source: str
    text: str


def add_inputs_parser(subparsers: Any) -> None:
    """Add ``inputs send`` to the CLI's subcommands (``subparsers`` from ``add_subparsers``)."""
    inputs = subparsers.add_parser("inputs", help="feed events to Falco's input plugins (k8saudit)")
    actions = inputs.add_subparsers(dest="inputs_command", required=True, metavar="ACTION")
    send = actions.add_parser(
        "send",
        help="send Kubernetes audit events: Event, EventList, a JSON array or JSON lines; '-' for stdin",
    )
    send.add_argument("files", nargs="+", metavar="FILE")
    send.add_argument("-o", "--output", choices=["text", "json"], default="text")


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def messages_in(name: str, stream: TextIO) -> Iterator[Message]:
    """Split one file into messages, reading JSON lines lazily so big audit logs stay out of memory."""
    label = "<stdin>" if name == "-" else name
    lines = iter(stream)
    first_number, first = 0, ""
    while not first.strip():
        first = next(lines, None) or ""
        first_number += 1
        if not first:
            return
    if _is_json_object(first):
        yield Message(f"{label}:{first_number}", first.strip())
        for number, line in enumerate(lines, start=first_number + 1):
            if line.strip():
                yield Message(f"{label}:{number}", line.strip())
        return
    # A pretty-printed document (or garbage): one message, so the server's error names its line.
    text = first + "".join(lines)
    try:
        document = json.loads(text)
    except ValueError:
        yield Message(label, text)
        return
    if isinstance(document, list):
        for index, item in enumerate(document):
            yield Message(f"{label}[{index}]", json.dumps(item, separators=(",", ":")))
    else:
        yield Message(label, text)


def _all_messages(names: list[str], stdin: TextIO) -> Iterator[Message]:
    for name in names:
        if name == "-":
            yield from messages_in(name, stdin)
            continue
        with open(name, encoding="utf-8") as stream:
            yield from messages_in(name, stream)


def _unreadable(names: list[str]) -> str | None:
    """Fail before sending anything when a named file cannot be opened."""
    for name in names:
        if name == "-":
            continue
        try:
            with open(name, encoding="utf-8"):
                pass
        except OSError as error:
            return f"cannot read {name}: {error.strerror or error}"
    return None


def format_ack(response: inputs_pb2.InputsResponse, source: str, output: str) -> str:
    if output == "json":
        return json.dumps(
            {
                "id": response.id,
                "source": source,
                "accepted": response.accepted,
                "events": response.events,
                "reason": response.reason,
            },
            separators=(",", ":"),
        )
    if response.accepted:
        return f"accepted  {source} ({response.events} event{'s' if response.events != 1 else ''})"
    return f"REJECTED  {source}: {response.reason}"


async def run_inputs(args: argparse.Namespace, channel: grpc.aio.Channel, out: TextIO) -> int:
    """Stream every message of ``args.files``: exit 0 if all were accepted, 1 if not, 2 on bad files."""
    problem = _unreadable(args.files)
    if problem:
        print(f"falco-api: {problem}", file=sys.stderr)
        return 2
    sources: dict[int, str] = {}
    read_errors: list[str] = []

    async def requests() -> AsyncIterator[inputs_pb2.InputsRequest]:
        try:
            for request_id, message in enumerate(_all_messages(args.files, sys.stdin), start=1):
                sources[request_id] = message.source
                yield inputs_pb2.InputsRequest(id=request_id, k8s_audit_json=message.text)
        except (OSError, UnicodeDecodeError) as error:
            # Stop sending; what was sent is still acknowledged, and the exit status says it failed.
            read_errors.append(str(error))

    rejected = 0
    stub = bidirectional_pb2_grpc.bidirectionalStub(channel)
    async for response in stub.inputs(requests()):
        source = sources.pop(response.id, f"id {response.id}")
        if not response.accepted:
            rejected += 1
        out.write(format_ack(response, source, args.output) + "\n")
        out.flush()
    for error in read_errors:
        print(f"falco-api: stopped reading input: {error}", file=sys.stderr)
    if read_errors:
        return 2
    return 1 if rejected else 0
