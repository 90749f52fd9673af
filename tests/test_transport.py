"""The transport rule: unix sockets are local; TCP needs mutual TLS unless --insecure is explicit."""

from __future__ import annotations

import logging
import subprocess
import sys

import grpc
import pytest

from falco_api.contract.falco import version_pb2
from falco_api.contract.falco.api import unary_pb2_grpc
from falco_api.testing.falco_double import FalcoDouble
from falco_api.tls import TlsConfigError, TlsFiles, open_channel
from falco_api_sidecar.main import Sidecar, SidecarConfig
from tests.certs import Pki


def tcp_config(falco: FalcoDouble, **overrides: object) -> SidecarConfig:
    values: dict[str, object] = dict(
        grpc_listen="127.0.0.1:0",
        ingest_listen="127.0.0.1:0",
        metrics_listen=None,
        falco_url=falco.url,
        node_name="node-a",
        grace=0.5,
    )
    values.update(overrides)
    return SidecarConfig(**values)  # type: ignore[arg-type]


def test_plain_tcp_without_insecure_is_refused_by_the_program() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "falco_api_sidecar.main",
            "--grpc-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "refusing plain TCP on 127.0.0.1:0" in result.stderr and "--insecure" in result.stderr


def test_half_a_tls_configuration_is_refused() -> None:
    with pytest.raises(TlsConfigError, match="missing \\['--tls-ca'\\]"):
        TlsFiles.from_flags("a.crt", "a.key", None)


def test_unreadable_certificate_is_a_clear_error(falco_double: FalcoDouble) -> None:
    with pytest.raises(TlsConfigError, match=r"cannot read TLS certificate file '/nope\.crt'"):
        TlsFiles("/nope.crt", "/nope.key", "/nope-ca.crt").read()


async def test_insecure_tcp_works_and_warns(
    falco_double: FalcoDouble, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    sidecar = Sidecar(tcp_config(falco_double, insecure=True))
    await sidecar.start()
    try:
        assert "INSECURE" in caplog.text
        async with open_channel(f"127.0.0.1:{sidecar.grpc_port}", tls=None, insecure=True) as channel:
            reply = await unary_pb2_grpc.unaryStub(channel).version(version_pb2.request(), timeout=5)
            assert reply.version == "0.43.0"
    finally:
        await sidecar.stop()


async def test_mutual_tls(falco_double: FalcoDouble, pki: Pki) -> None:
    sidecar = Sidecar(tcp_config(falco_double, tls=pki.server))
    await sidecar.start()
    address = f"127.0.0.1:{sidecar.grpc_port}"
    try:
        async with open_channel(address, tls=pki.client, server_name="localhost") as channel:
            reply = await unary_pb2_grpc.unaryStub(channel).version(version_pb2.request(), timeout=5)
            assert reply.version == "0.43.0"

        # A client certificate from another CA is refused by the server.
        stranger = TlsFiles(pki.stranger_client.cert, pki.stranger_client.key, pki.ca.path.as_posix())
        async with open_channel(address, tls=stranger, server_name="localhost") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await unary_pb2_grpc.unaryStub(channel).version(version_pb2.request(), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

        # A client that trusts the wrong CA refuses the server.
        wrong_ca = TlsFiles(pki.client.cert, pki.client.key, pki.stranger_ca.path.as_posix())
        async with open_channel(address, tls=wrong_ca, server_name="localhost") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await unary_pb2_grpc.unaryStub(channel).version(version_pb2.request(), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

        # No client certificate at all: refused.
        bare = grpc.ssl_channel_credentials(root_certificates=pki.ca.path.read_bytes())
        async with grpc.aio.secure_channel(
            address, bare, options=[("grpc.ssl_target_name_override", "localhost")]
        ) as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await unary_pb2_grpc.unaryStub(channel).version(version_pb2.request(), timeout=5)

        # Plain text to a TLS port: refused.
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await unary_pb2_grpc.unaryStub(channel).version(version_pb2.request(), timeout=5)
    finally:
        await sidecar.stop()


def test_client_refuses_plain_tcp_without_insecure() -> None:
    with pytest.raises(TlsConfigError, match="refusing plain TCP"):
        open_channel("127.0.0.1:1", tls=None)
