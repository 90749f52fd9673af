"""Line-oriented ingest: one Falco JSON alert per line over a local stream socket.

Falco's ``program_output`` (``keep_alive: true``) pipes one JSON alert per line
into a small connector that forwards them to this socket (see
docs/line-ingest.md for the wiring and why it never stalls Falco). This path
skips HTTP entirely: no request parsing, no response, no per-alert round trip.

Each complete line is parsed once and handed to :meth:`EventStreams.ingest`;
every bad line (malformed JSON, wrong keys, longer than ``max_line``, cut off by
a disconnect) is counted with :meth:`EventStreams.reject` and skipped. Nothing a
writer sends can crash the reader or make it wait for anything but more bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from falco_api.alerts import AlertError, parse_alert
from falco_api.netaddr import split_host_port
from falco_api.streams import EventStreams

log = logging.getLogger(__name__)

DEFAULT_MAX_LINE = 1024 * 1024
# One read takes what the kernel has, up to this: ~70 typical alerts, handled
# back to back before the loop gets a turn to send them to subscribers.
READ_CHUNK = 64 * 1024
# When subscribers fall behind because the process is busy ingesting (not because a client
# stopped reading), ingest pauses up to MAX_CATCH_UP per chunk so gRPC can send what is queued.
# Real sleeps, not bare loop turns: gRPC's completion thread needs the GIL to make progress.
CATCH_UP_DEPTH = 1024
MAX_CATCH_UP = 0.05
CATCH_UP_STEP = 0.0002
UNIX_SCHEME = "unix://"
TCP_SCHEME = "tcp://"

REASON_TOO_LARGE = "too_large"
REASON_PARTIAL_LINE = "partial_line"
REASON_INTERNAL_ERROR = "internal_error"


class LineIngestAddressError(ValueError):
    """A ``--line-ingest`` address that is neither ``unix:///path`` nor ``tcp://127.0.0.1:port``."""


@dataclass(slots=True)
class LineIngestStats:
    connections: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)


class LineSplitter:
    """Bytes in, complete lines out; oversized and partial lines are reported, not buffered.

    Pure (no I/O) so that every edge case is tested without sockets. A line longer
    than ``max_line`` is rejected once and its bytes are discarded as they arrive,
    so memory per connection stays under ``max_line + READ_CHUNK``.
    """

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        if max_line < 1:
            raise ValueError("max_line must be >= 1")
        self.max_line = max_line
        self._pending = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> tuple[list[bytes], int]:
        """The complete lines in ``data`` (after what was pending) and how many were too large."""
        lines = data.split(b"\n")
        tail = lines.pop()
        too_large = 0
        if lines:
            first = lines[0]
            if self._discarding:
                # The end of an oversized line: it was already counted.
                self._discarding = False
                lines = lines[1:]
            elif self._pending:
                self._pending += first
                lines[0] = bytes(self._pending)
                self._pending.clear()
            kept = []
            for line in lines:
                if len(line) > self.max_line:
                    too_large += 1
                else:
                    kept.append(line)
            lines = kept
        if self._discarding:
            return lines, too_large
        self._pending += tail
        if len(self._pending) > self.max_line:
            too_large += 1
            self._pending.clear()
            self._discarding = True
        return lines, too_large

    def finish(self) -> bool:
        """The writer went away: True when it left a line without its newline (a partial line)."""
        partial = bool(self._pending.strip()) and not self._discarding
        self._pending.clear()
        self._discarding = False
        return partial


class LineIngest:
    """Reads newline-delimited alerts from any number of writers into one :class:`EventStreams`."""

    def __init__(self, streams: EventStreams, *, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.streams = streams
        self.max_line = max_line
        self.stats = LineIngestStats()

    def ingest_lines(self, lines: list[bytes]) -> None:
        """Parse and publish a batch of complete lines; blank lines (keep-alive newlines) are skipped."""
        streams = self.streams
        accepted = 0
        for line in lines:
            if not line or line.isspace():
                continue
            try:
                alert = parse_alert(line)
            except AlertError as error:
                self._reject(error.reason)
                continue
            except Exception:  # a bug must cost one line, not the connection and every line after it
                log.exception("line ingest: unexpected error parsing a line; skipped")
                self._reject(REASON_INTERNAL_ERROR)
                continue
            streams.ingest(alert)
            accepted += 1
        self.stats.accepted += accepted

    def _reject(self, reason: str, count: int = 1) -> None:
        for _ in range(count):
            self.streams.reject(reason)
        self.stats.rejected[reason] += count

    async def _let_subscribers_catch_up(self) -> None:
        """Pause while a subscriber that is draining has a deep queue, so gRPC can send it.

        read() returns buffered bytes without yielding, and one chunk is ~70 alerts
        while sending one gRPC message takes several loop turns and gRPC's own
        thread: without this, a fast writer fills every queue and subscribers lose
        alerts the process could have delivered (and the writer is slowed instead,
        through the socket, the way a busy HTTP server slows its clients). Only
        queues that shrank during the last step count: a client that stopped
        reading costs one step per chunk, never holds ingest up.
        """
        await asyncio.sleep(0)
        hub = self.streams.alerts
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MAX_CATCH_UP
        deep = {s: s.depth for s in hub.subscriptions if CATCH_UP_DEPTH < s.depth < s.max_queue}
        while deep and loop.time() < deadline:
            await asyncio.sleep(CATCH_UP_STEP)
            deep = {s: s.depth for s, before in deep.items() if CATCH_UP_DEPTH < s.depth < before}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One writer's connection, until it closes it (or we stop)."""
        self.stats.connections += 1
        splitter = LineSplitter(self.max_line)
        try:
            while True:
                try:
                    data = await reader.read(READ_CHUNK)
                except (ConnectionError, OSError) as error:
                    log.info("line ingest: writer connection failed: %s", error)
                    break
                if not data:
                    break
                lines, too_large = splitter.feed(data)
                if too_large:
                    self._reject(REASON_TOO_LARGE, too_large)
                self.ingest_lines(lines)
                await self._let_subscribers_catch_up()
            if splitter.finish():
                self._reject(REASON_PARTIAL_LINE)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


@dataclass
class RunningLineIngest:
    ingest: LineIngest
    server: asyncio.Server
    address: str
    port: int = 0
    socket_path: Path | None = None

    async def stop(self) -> None:
        self.server.close()
        # Python < 3.12.1 does not close accepted connections on Server.close(); the
        # handlers end when their readers see EOF or the loop cancels them.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.server.wait_closed(), 1.0)
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()


def _remove_stale_socket(path: Path) -> None:
    """A socket file left by a previous run would make bind fail; anything else is not ours to delete."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise LineIngestAddressError(f"{path} exists and is not a socket; refusing to replace it")
    path.unlink()


async def start_line_ingest(
    streams: EventStreams, address: str, *, max_line: int = DEFAULT_MAX_LINE, socket_mode: int = 0o660
) -> RunningLineIngest:
    """Listen for line writers on ``unix:///path`` (recommended) or ``tcp://host:port``.

    The unix socket gets ``socket_mode`` (owner and group, like the gRPC socket):
    anyone who can write to it can inject alerts.
    """
    ingest = LineIngest(streams, max_line=max_line)
    if address.startswith(UNIX_SCHEME):
        path = Path(address[len(UNIX_SCHEME) :])
        if not path.is_absolute():
            raise LineIngestAddressError(f"--line-ingest unix path must be absolute, got {address!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_socket(path)
        server = await asyncio.start_unix_server(ingest.handle, path=str(path), limit=READ_CHUNK)
        os.chmod(path, socket_mode)
        log.info("line ingest listening on %s", address)
        return RunningLineIngest(ingest, server, address, socket_path=path)
    if address.startswith(TCP_SCHEME):
        try:
            host, port = split_host_port(address[len(TCP_SCHEME) :], flag="--line-ingest")
        except ValueError as error:
            raise LineIngestAddressError(str(error)) from None
        server = await asyncio.start_server(ingest.handle, host, port, limit=READ_CHUNK, reuse_address=True)
        bound = int(server.sockets[0].getsockname()[1]) if server.sockets else port
        log.info("line ingest listening on %s:%d", host, bound)
        return RunningLineIngest(ingest, server, address, port=bound)
    raise LineIngestAddressError(
        f"--line-ingest must be unix:///absolute/path or tcp://host:port, got {address!r}"
    )
