"""In-process sidecars (fed over HTTP by the Falco double's alert shapes), a relay in front of them,
and a TCP proxy that can cut the relay off from a sidecar for a while."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from falco_api.contract.falco import outputs_pb2
from falco_api.testing.falco_double import FalcoDouble
from falco_api.tls import TlsFiles
from falco_api_relay.main import Relay, RelayConfig
from falco_api_relay.upstream import BackoffPolicy
from falco_api_sidecar.main import Sidecar, SidecarConfig

FAST_BACKOFF = BackoffPolicy(initial=0.05, maximum=0.2, stable_after=1.0, connect_timeout=1.0)


async def wait_until(condition: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class Node:
    """One sidecar on a node, restartable at the same gRPC address (a new process, a new origin)."""

    def __init__(
        self,
        name: str,
        falco_url: str,
        session: aiohttp.ClientSession,
        *,
        tcp: bool,
        replay_size: int,
        tls: TlsFiles | None,
        directory: Path,
    ) -> None:
        self.name = name
        self.falco_url = falco_url
        self.session = session
        self.tcp = tcp
        self.replay_size = replay_size
        self.tls = tls
        self.grpc_listen = "127.0.0.1:0" if tcp else f"unix://{directory / f'{name}.sock'}"
        self.sidecar: Sidecar | None = None

    @property
    def running(self) -> Sidecar:
        assert self.sidecar is not None, f"sidecar {self.name} is not running"
        return self.sidecar

    @property
    def address(self) -> str:
        """Where the relay reaches it (a restarted TCP sidecar keeps its first port)."""
        return self.grpc_listen

    @property
    def origin(self) -> str:
        return self.running.origin

    async def start(self) -> None:
        sidecar = Sidecar(
            SidecarConfig(
                grpc_listen=self.grpc_listen,
                ingest_listen="127.0.0.1:0",
                metrics_listen=None,
                falco_url=self.falco_url,
                node_name=self.name,
                replay_size=self.replay_size,
                queue_size=1000,
                grace=0.5,
                tls=self.tls,
                insecure=self.tcp and self.tls is None,
            )
        )
        await sidecar.start()
        if self.tcp and self.grpc_listen.endswith(":0"):
            self.grpc_listen = f"127.0.0.1:{sidecar.grpc_port}"
        self.sidecar = sidecar

    async def stop(self) -> None:
        if self.sidecar is not None:
            sidecar, self.sidecar = self.sidecar, None
            await sidecar.stop()

    async def post(self, alert: dict[str, Any]) -> None:
        url = f"http://127.0.0.1:{self.running.ingest_port}/"
        async with self.session.post(
            url, data=json.dumps(alert), headers={"Content-Type": "application/json"}
        ) as reply:
            await reply.read()
            assert reply.status == 204, reply.status


class Cluster:
    """Sidecars and relays of one test, all stopped at the end."""

    def __init__(self, falco: FalcoDouble, directory: Path, session: aiohttp.ClientSession) -> None:
        self.falco = falco
        self.directory = directory
        self.session = session
        self.nodes: list[Node] = []
        self.relays: list[Relay] = []

    async def node(
        self, name: str, *, tcp: bool = False, replay_size: int = 1000, tls: TlsFiles | None = None
    ) -> Node:
        node = Node(
            name,
            self.falco.url,
            self.session,
            tcp=tcp,
            replay_size=replay_size,
            tls=tls,
            directory=self.directory,
        )
        await node.start()
        self.nodes.append(node)
        return node

    async def relay(self, upstreams: list[str], **overrides: Any) -> Relay:
        settings: dict[str, Any] = {
            "grpc_listen": f"unix://{self.directory / f'relay{len(self.relays)}.sock'}",
            "upstreams": upstreams,
            "kubernetes": False,
            "insecure": True,
            "replay_size": 1000,
            "queue_size": 1000,
            "backoff": FAST_BACKOFF,
            "status_interval": 0,
            "grace": 0.5,
            "hostname": "relay-test",
        }
        settings.update(overrides)
        relay = Relay(RelayConfig(**settings))
        await relay.start()
        self.relays.append(relay)
        return relay

    async def close(self) -> None:
        for relay in self.relays:
            await relay.stop()
        for node in self.nodes:
            await node.stop()


@pytest.fixture
async def cluster(falco_double: FalcoDouble) -> AsyncIterator[Cluster]:
    # AF_UNIX paths are limited to ~107 bytes; pytest's tmp_path can be longer.
    directory = Path(tempfile.mkdtemp(prefix="frelay-"))
    async with aiohttp.ClientSession() as session:
        cluster = Cluster(falco_double, directory, session)
        try:
            yield cluster
        finally:
            await cluster.close()
    shutil.rmtree(directory, ignore_errors=True)


def relay_target(relay: Relay) -> str:
    return relay.config.grpc_listen


def upstreams_connected(relay: Relay, count: int) -> Callable[[], bool]:
    return lambda: sum(status.connected for status in relay.upstreams.statuses().values()) >= count


def subscribers(relay: Relay, count: int) -> Callable[[], bool]:
    return lambda: len(relay.streams.alerts.subscriptions) >= count


class Reader:
    """Reads a response stream in the background so that tests can wait for what arrived."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.got: list[Any] = []
        self.error: BaseException | None = None
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for response in self.call:
                self.got.append(response)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                self.error = error

    @property
    def alerts(self) -> list[outputs_pb2.response]:
        return [r for r in self.got if not r.HasField("gap")]

    @property
    def gaps(self) -> list[outputs_pb2.Gap]:
        return [r.gap for r in self.got if r.HasField("gap")]

    async def wait_alerts(self, count: int, seconds: float = 10.0) -> list[outputs_pb2.response]:
        def arrived() -> bool:
            return len(self.alerts) >= count or self.error is not None

        await wait_until(arrived, f"{count} alerts", seconds)
        assert self.error is None, self.error
        return self.alerts

    async def settle(self, seconds: float = 0.3) -> None:
        """Give anything that should NOT arrive (a duplicate) the time to arrive."""
        await asyncio.sleep(seconds)

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a sidecar; :meth:`cut` breaks every connection and refuses new ones."""

    def __init__(self, target: str) -> None:
        self.target_host, _, port = target.rpartition(":")
        self.target_port = int(port)
        self.port = 0
        self.cut_off = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        self._writers |= {writer, up_writer}

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._writers -= {writer, up_writer}

    def cut(self) -> None:
        self.cut_off = True
        for writer in list(self._writers):
            writer.transport.abort()

    def restore(self) -> None:
        self.cut_off = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def proxy_factory() -> AsyncIterator[Callable[[str], Awaitable[TcpProxy]]]:
    proxies: list[TcpProxy] = []

    async def make(target: str) -> TcpProxy:
        proxy = TcpProxy(target)
        await proxy.start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        await proxy.close()
