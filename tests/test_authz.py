"""Authorization: identities from certificates, roles from a file, PERMISSION_DENIED, the audit log."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from falco_api.contract.falco import outputs_pb2, version_pb2
from falco_api.contract.falco.api import (
    apply_pb2,
    bidirectional_pb2_grpc,
    configs_pb2,
    inputs_pb2,
    rules_pb2,
    streaming_pb2_grpc,
    unary_pb2_grpc,
)
from falco_api.server import RunningServer, start_server
from falco_api.servicers import (
    LEGACY_OUTPUTS_SERVICE,
    STREAMING_SERVICE,
    UNARY_SERVICE,
    DropsServicer,
    OutputsServicer,
    VersionServicer,
    outputs_handlers,
    streaming_handlers,
)
from falco_api.streams import EventStreams
from falco_api.testing.k8saudit_double import K8sAuditDouble
from falco_api.tls import TlsFiles, open_channel
from falco_api_sidecar.authz import (
    METHOD_ROLES,
    AuthzConfigError,
    AuthzInterceptor,
    AuthzPolicy,
    Identity,
    Role,
    Transport,
    add_authz_arguments,
    audit,
    authz_interceptor,
    current_identity,
    identity_from_auth_context,
    load_authz_config,
    parse_authz_config,
    policy_for,
)
from falco_api_sidecar.inputs import InputsServicer, K8sAuditForwarder, inputs_handlers
from tests.certs import Authority, Pki

INJECTOR_URI = "spiffe://cluster.local/ns/falco/sa/audit-shipper"

AUTHZ_YAML = f"""
# who may do what
roles:
  reader: ["falco-api-relay"]
  writer: ["falco-api-operator"]
  injector: ["{INJECTOR_URI}"]
"""

READS = [m for m, role in METHOD_ROLES.items() if role is Role.READER]
WRITES = [m for m, role in METHOD_ROLES.items() if role is Role.WRITER]
INPUTS = "/falco.api.bidirectional/inputs"


def cert_identity(common_name: str, *sans: str) -> Identity:
    return Identity(Transport.MTLS, peer="ipv4:10.0.0.1:5000", common_name=common_name, sans=sans)


POLICY = parse_authz_config(AUTHZ_YAML, source="authz.yaml")


# --- the policy, without sockets -------------------------------------------------------------


def test_reader_reads_and_nothing_else() -> None:
    relay = cert_identity("falco-api-relay")
    assert all(POLICY.allowed(relay, method) for method in READS)
    assert not any(POLICY.allowed(relay, method) for method in [*WRITES, INPUTS])
    assert {
        "/falco.api.unary/list_rules",
        "/falco.api.unary/get_config",
        "/grpc.health.v1.Health/Check",
    } <= set(READS)
    assert {"/falco.api.unary/put_rule", "/falco.api.unary/apply", "/falco.api.unary/delete_config"} <= set(
        WRITES
    )


def test_writer_implies_reader_but_not_injector() -> None:
    operator = cert_identity("falco-api-operator")
    assert all(POLICY.allowed(operator, method) for method in [*READS, *WRITES])
    assert not POLICY.allowed(operator, INPUTS)


def test_injector_only_injects_and_is_found_by_san() -> None:
    shipper = cert_identity("whatever-cn", "shipper.falco.svc", INJECTOR_URI)
    assert POLICY.roles_of(shipper) == {Role.INJECTOR}
    assert POLICY.allowed(shipper, INPUTS)
    assert not POLICY.allowed(shipper, "/falco.api.streaming/outputs")


def test_unknown_identity_and_unknown_method_are_denied_with_a_message_naming_both() -> None:
    stranger = cert_identity("falco-api-client", "localhost")
    decision = POLICY.decide(stranger, "/falco.api.unary/apply")
    assert not decision.allowed and decision.needed is Role.WRITER
    assert decision.reason == (
        "permission denied: CN=falco-api-client SAN=localhost needs role writer for "
        "/falco.api.unary/apply (roles from authz.yaml)"
    )
    unknown = POLICY.decide(cert_identity("falco-api-operator"), "/falco.api.unary/format_disk")
    assert not unknown.allowed and "not covered by the authorization policy" in unknown.reason


def test_unix_socket_is_local_admin() -> None:
    local = Identity(Transport.UNIX, peer="unix:")
    for method in [*READS, *WRITES, INPUTS, "/some.new.service/call"]:
        assert POLICY.allowed(local, method)


def test_plaintext_tcp_may_only_read_whatever_the_file_says() -> None:
    anonymous = Identity(Transport.INSECURE, peer="ipv4:10.0.0.9:4000")
    open_to_all = parse_authz_config('roles: {writer: ["*"], injector: ["*"]}', source="wide.yaml")
    for policy in (POLICY, open_to_all, AuthzPolicy.default()):
        assert all(policy.allowed(anonymous, method) for method in READS)
        decision = policy.decide(anonymous, "/falco.api.unary/put_rule")
        assert not decision.allowed and "plaintext TCP (--insecure) may only read" in decision.reason
        assert not policy.allowed(anonymous, INPUTS)


def test_default_policy_lets_any_certificate_read_and_nobody_write() -> None:
    default = AuthzPolicy.default()
    anyone = cert_identity("some-client")
    assert all(default.allowed(anyone, method) for method in READS)
    assert not any(default.allowed(anyone, method) for method in [*WRITES, INPUTS])
    assert "no --authz-config" in default.decide(anyone, "/falco.api.unary/apply").reason
    assert policy_for(None, tcp_with_tls=True) == default


def test_wildcard_grants_every_certificate() -> None:
    policy = parse_authz_config('roles:\n  reader: ["*"]\n  writer: [ops]\n', source="x")
    assert policy.allowed(cert_identity("anyone"), "/falco.api.streaming/drops")
    assert not policy.allowed(cert_identity("anyone"), "/falco.api.unary/apply")
    assert policy.allowed(cert_identity("ops"), "/falco.api.unary/apply")


def test_identity_from_grpc_auth_context() -> None:
    assert (
        identity_from_auth_context("unix:", {"transport_security_type": [b"insecure"]}).transport
        is Transport.UNIX
    )
    plain = identity_from_auth_context("ipv4:127.0.0.1:1", {"transport_security_type": [b"insecure"]})
    assert plain.transport is Transport.INSECURE and plain.names == ()
    tls = identity_from_auth_context(
        "ipv4:127.0.0.1:2",
        {
            "transport_security_type": [b"ssl"],
            "x509_common_name": [b"falco-api-relay"],
            "x509_subject_alternative_name": [b"relay.svc", INJECTOR_URI.encode()],
        },
    )
    assert tls == Identity(
        Transport.MTLS,
        peer="ipv4:127.0.0.1:2",
        common_name="falco-api-relay",
        sans=("relay.svc", INJECTOR_URI),
    )
    assert tls.names == ("falco-api-relay", "relay.svc", INJECTOR_URI)
    assert str(tls) == f"CN=falco-api-relay SAN=relay.svc,{INJECTOR_URI}"


def test_a_common_name_cannot_pose_as_a_uri_identity() -> None:
    """CNs are free text to many issuers; a SPIFFE-style grant is only proved by a URI SAN."""
    poser = cert_identity(INJECTOR_URI, "poser.falco.svc")
    assert POLICY.roles_of(poser) == frozenset()
    assert not POLICY.allowed(poser, INPUTS)


def test_email_sans_are_not_identities() -> None:
    """Issuers rarely check e-mail SANs; gRPC lists them with the others, typed ones say which."""
    context = {
        "transport_security_type": [b"ssl"],
        "x509_common_name": [b"someone"],
        "x509_subject_alternative_name": [b"someone.svc", b"falco-api-operator", INJECTOR_URI.encode()],
        "peer_dns": [b"someone.svc"],
        "peer_email": [b"falco-api-operator"],
        "peer_uri": [INJECTOR_URI.encode()],
    }
    identity = identity_from_auth_context("ipv4:10.0.0.2:1", context)
    assert identity.sans == ("someone.svc", INJECTOR_URI)
    assert POLICY.roles_of(identity) == {Role.INJECTOR}


# --- the roles file --------------------------------------------------------------------------


def test_roles_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "authz.yaml"
    path.write_text(AUTHZ_YAML)
    policy = load_authz_config(path)
    assert policy.grants == {
        Role.READER: frozenset({"falco-api-relay"}),
        Role.WRITER: frozenset({"falco-api-operator"}),
        Role.INJECTOR: frozenset({INJECTOR_URI}),
    }
    assert policy.source == str(path)
    assert policy_for(str(path), tcp_with_tls=True) == policy


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("roles:\n  reader: [a\n", "invalid YAML at line 3, column 1"),
        ("", "expected a mapping with a 'roles' key"),
        ("- reader\n", "expected a mapping with a 'roles' key"),
        ("roles: {reader: [a]}\nusers: {}\n", "unknown top-level key(s) ['users']"),
        ("roles: [reader]\n", "'roles' must map role names to lists of identities"),
        ("roles:\n  admin: [root]\n", "unknown role 'admin' (known roles: injector, reader, writer)"),
        ("roles:\n  reader: falco-api-relay\n", "role 'reader' must be a list of identities"),
        ("roles:\n  writer: [ok, 42]\n", "role 'writer' must be a list of identities"),
        ("roles:\n  writer: ['']\n", "role 'writer' must be a list of identities"),
    ],
)
def test_bad_roles_files_are_clear_startup_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "authz.yaml"
    path.write_text(content)
    with pytest.raises(AuthzConfigError) as caught:
        load_authz_config(path)
    assert str(caught.value).startswith(f"authz config {path}")
    assert message in str(caught.value)


def test_missing_or_binary_roles_file(tmp_path: Path) -> None:
    with pytest.raises(AuthzConfigError, match=r"cannot read authz config '/nope/authz\.yaml': No such file"):
        load_authz_config("/nope/authz.yaml")
    binary = tmp_path / "authz.yaml"
    binary.write_bytes(b"\xff\xfe roles")
    with pytest.raises(AuthzConfigError, match="is not UTF-8 text"):
        load_authz_config(binary)
    # A startup error is a ValueError, which the sidecar's main already reports with exit status 2.
    assert issubclass(AuthzConfigError, ValueError)


def test_an_empty_role_grants_nobody() -> None:
    policy = parse_authz_config("roles:\n  writer:\n", source="x")
    assert policy.grants == {Role.WRITER: frozenset()}
    assert not policy.allowed(cert_identity("falco-api-operator"), "/falco.api.unary/apply")


# --- the audit log ---------------------------------------------------------------------------


def test_audit_line_format(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="falco_api.audit")
    old, new = "a" * 64, "b" * 64
    line = audit(cert_identity("falco-api-operator"), "put_rule", "10-custom", old, new, "loaded")
    (record,) = [r for r in caplog.records if r.name == "falco_api.audit"]
    assert record.getMessage() == line and "\n" not in line
    entry = json.loads(line)
    assert set(entry) == {
        "time",
        "identity",
        "transport",
        "action",
        "target",
        "old_sha256",
        "new_sha256",
        "result",
    }
    assert entry["identity"] == "CN=falco-api-operator" and entry["transport"] == "mtls"
    assert (entry["action"], entry["target"], entry["result"]) == ("put_rule", "10-custom", "loaded")
    assert (entry["old_sha256"], entry["new_sha256"]) == (old, new)
    stamp = datetime.datetime.fromisoformat(entry["time"].replace("Z", "+00:00"))
    assert abs((datetime.datetime.now(datetime.UTC) - stamp).total_seconds()) < 60


def test_audit_never_records_content(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="falco_api.audit")
    rule_text = "- rule: secret\n  condition: evt.type = open\n"
    entry = json.loads(audit("operator", "apply", "x" * 2000, rule_text, None, "failed: " + "y" * 2000))
    assert entry["old_sha256"] == "<not a sha256>" and entry["new_sha256"] is None
    assert "secret" not in json.dumps(entry)
    assert len(entry["target"]) == 512 and entry["target"].endswith("...")
    assert len(entry["result"]) == 512
    assert entry["identity"] == "operator" and entry["transport"] is None


def test_audit_without_identity_uses_the_current_caller() -> None:
    assert current_identity() is None
    assert json.loads(audit(None, "delete_config", "50-x", None, None, "ok"))["identity"] == "unknown"


# --- over real gRPC --------------------------------------------------------------------------


def issue_with_uri(ca: Authority, directory: Path, common_name: str, uri: str) -> TlsFiles:
    """A client certificate whose identity is a SPIFFE-style URI SAN."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{common_name}.crt", directory / f"{common_name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return TlsFiles(cert=str(cert_path), key=str(key_path), ca=str(ca.path))


class AuditingUnary(unary_pb2_grpc.unaryServicer):
    """Version answers; put_rule writes an audit line like the rules handlers will; the rest UNIMPLEMENTED."""

    async def version(  # type: ignore[override]
        self, request: version_pb2.request, context: grpc.aio.ServicerContext[Any, Any]
    ) -> version_pb2.response:
        return version_pb2.response(version="0.43.0")

    async def put_rule(  # type: ignore[override]
        self, request: rules_pb2.PutRuleRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apply_pb2.PutRuleResponse:
        audit(None, "put_rule", request.ruleset.name, None, "c" * 64, "written")
        return apply_pb2.PutRuleResponse()


class Servers:
    def __init__(
        self, tcp: RunningServer, unix: RunningServer, socket_dir: Path, inputs: InputsServicer
    ) -> None:
        self.tcp, self.unix, self.socket_dir, self.inputs = tcp, unix, socket_dir, inputs

    async def close(self) -> None:
        await self.tcp.stop(0)
        await self.unix.stop(0)
        await self.inputs.close()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


async def serve(
    policy: AuthzPolicy, tls: TlsFiles | None, webhook: str, *, put_rule_audits: bool = False
) -> Servers:
    """The sidecar's services behind the interceptor, on TCP (mTLS or --insecure) and on a unix socket."""
    streams = EventStreams(origin="node-a/1", hostname="node-a")
    outputs = OutputsServicer(streams.alerts)
    version = VersionServicer(lambda: _version())
    inputs = InputsServicer(K8sAuditForwarder(webhook, timeout=5))
    unary = AuditingUnary() if put_rule_audits else unary_pb2_grpc.unaryServicer()  # type: ignore[abstract]
    if not put_rule_audits:
        unary.version = version.version  # type: ignore[method-assign]

    def register(server: grpc.aio.Server) -> None:
        unary_pb2_grpc.add_unaryServicer_to_server(unary, server)  # type: ignore[no-untyped-call]

    handlers = [
        *outputs_handlers(outputs),
        *streaming_handlers(outputs, DropsServicer(streams.drops)),
        *inputs_handlers(inputs),
    ]
    names = [LEGACY_OUTPUTS_SERVICE, STREAMING_SERVICE, UNARY_SERVICE]
    socket_dir = Path(tempfile.mkdtemp(prefix="fapi-authz-"))
    servers = []
    for address, server_tls in (("127.0.0.1:0", tls), (f"unix://{socket_dir}/api.sock", None)):
        servers.append(
            await start_server(
                address,
                tls=server_tls,
                insecure=server_tls is None,
                handlers=handlers,
                register=[register],
                service_names=names,
                interceptors=[AuthzInterceptor(policy)],
            )
        )
    return Servers(servers[0], servers[1], socket_dir, inputs)


async def _version() -> version_pb2.response:
    return version_pb2.response(version="0.43.0")


@pytest.fixture
async def k8saudit() -> AsyncIterator[K8sAuditDouble]:
    double = K8sAuditDouble()
    await double.start()
    yield double
    await double.stop()


def audit_event_json() -> str:
    return json.dumps(
        {
            "kind": "Event",
            "apiVersion": "audit.k8s.io/v1",
            "auditID": "a-1",
            "stage": "ResponseComplete",
            "verb": "get",
            "requestURI": "/api",
            "stageTimestamp": "2024-05-01T10:00:00Z",
        }
    )


async def code_of(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def outputs_code(channel: grpc.aio.Channel) -> grpc.StatusCode:
    try:
        async for _ in streaming_pb2_grpc.streamingStub(channel).outputs(outputs_pb2.request(), timeout=5):
            pass
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def inputs_outcome(channel: grpc.aio.Channel) -> tuple[grpc.StatusCode, str, list[bool]]:
    acks: list[bool] = []
    try:
        stub = bidirectional_pb2_grpc.bidirectionalStub(channel)
        request = inputs_pb2.InputsRequest(id=1, k8s_audit_json=audit_event_json())
        async for ack in stub.inputs(iter([request]), timeout=5):
            acks.append(ack.accepted)
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or "", acks
    return grpc.StatusCode.OK, "", acks


def write_calls(stub: unary_pb2_grpc.unaryStub) -> dict[str, Any]:
    return {
        "put_rule": stub.put_rule(rules_pb2.PutRuleRequest(), timeout=5),
        "delete_rule": stub.delete_rule(rules_pb2.DeleteRuleRequest(), timeout=5),
        "put_config": stub.put_config(configs_pb2.PutConfigRequest(), timeout=5),
        "delete_config": stub.delete_config(configs_pb2.DeleteConfigRequest(), timeout=5),
        "apply": stub.apply(apply_pb2.ApplyRequest(), timeout=5),
    }


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> dict[str, TlsFiles]:
    directory = tmp_path_factory.mktemp("authz-certs")
    return {
        "reader": pki.ca.issue(directory, "falco-api-relay"),
        "writer": pki.ca.issue(directory, "falco-api-operator"),
        "injector": issue_with_uri(pki.ca, directory, "audit-shipper", INJECTOR_URI),
        "stranger": pki.client,
    }


async def test_over_mutual_tls_each_role_gets_what_it_may(
    pki: Pki, identities: dict[str, TlsFiles], k8saudit: K8sAuditDouble
) -> None:
    servers = await serve(POLICY, pki.server, k8saudit.url)
    address = f"127.0.0.1:{servers.tcp.port}"
    try:
        async with open_channel(address, tls=identities["reader"], server_name="localhost") as channel:
            unary = unary_pb2_grpc.unaryStub(channel)
            assert (await unary.version(version_pb2.request(), timeout=5)).version == "0.43.0"
            assert await outputs_code(channel) == grpc.StatusCode.OK
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            for name, call in write_calls(unary).items():
                try:
                    await call
                    raise AssertionError(f"{name} passed for a reader")
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, name
                    assert error.details() == (
                        "permission denied: CN=falco-api-relay SAN=localhost,127.0.0.1 needs role writer for "
                        f"/falco.api.unary/{name} (roles from authz.yaml)"
                    )
            code, details, acks = await inputs_outcome(channel)
            assert (
                code == grpc.StatusCode.PERMISSION_DENIED and "needs role injector" in details and acks == []
            )

        async with open_channel(address, tls=identities["writer"], server_name="localhost") as channel:
            unary = unary_pb2_grpc.unaryStub(channel)
            # Past authorization, the (not yet written) handlers answer UNIMPLEMENTED.
            for name, call in write_calls(unary).items():
                assert await code_of(call) == grpc.StatusCode.UNIMPLEMENTED, name
            assert await code_of(unary.list_rules(rules_pb2.ListRulesRequest(), timeout=5)) == (
                grpc.StatusCode.UNIMPLEMENTED
            )
            assert await outputs_code(channel) == grpc.StatusCode.OK
            code, details, _ = await inputs_outcome(channel)
            assert code == grpc.StatusCode.PERMISSION_DENIED

        async with open_channel(address, tls=identities["injector"], server_name="localhost") as channel:
            assert await inputs_outcome(channel) == (grpc.StatusCode.OK, "", [True])
            assert len(k8saudit.events) == 1
            assert await outputs_code(channel) == grpc.StatusCode.PERMISSION_DENIED

        async with open_channel(address, tls=identities["stranger"], server_name="localhost") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await unary_pb2_grpc.unaryStub(channel).version(version_pb2.request(), timeout=5)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "CN=falco-api-client" in (caught.value.details() or "")
            assert "needs role reader" in (caught.value.details() or "")
    finally:
        await servers.close()


async def test_unix_socket_is_allowed_everything(pki: Pki, k8saudit: K8sAuditDouble) -> None:
    servers = await serve(POLICY, pki.server, k8saudit.url)
    try:
        async with grpc.aio.insecure_channel(f"unix://{servers.socket_dir}/api.sock") as channel:
            unary = unary_pb2_grpc.unaryStub(channel)
            for name, call in write_calls(unary).items():
                assert await code_of(call) == grpc.StatusCode.UNIMPLEMENTED, name
            assert await outputs_code(channel) == grpc.StatusCode.OK
            assert await inputs_outcome(channel) == (grpc.StatusCode.OK, "", [True])
    finally:
        await servers.close()


async def test_insecure_tcp_reads_only(k8saudit: K8sAuditDouble) -> None:
    servers = await serve(POLICY, None, k8saudit.url)
    try:
        async with open_channel(f"127.0.0.1:{servers.tcp.port}", tls=None, insecure=True) as channel:
            unary = unary_pb2_grpc.unaryStub(channel)
            assert (await unary.version(version_pb2.request(), timeout=5)).version == "0.43.0"
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await unary.apply(apply_pb2.ApplyRequest(), timeout=5)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "unauthenticated peer ipv4:127.0.0.1" in (caught.value.details() or "")
            code, _, _ = await inputs_outcome(channel)
            assert code == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await servers.close()


async def test_default_policy_over_mtls(pki: Pki, k8saudit: K8sAuditDouble) -> None:
    servers = await serve(AuthzPolicy.default(), pki.server, k8saudit.url)
    try:
        async with open_channel(
            f"127.0.0.1:{servers.tcp.port}", tls=pki.client, server_name="localhost"
        ) as channel:
            unary = unary_pb2_grpc.unaryStub(channel)
            assert (await unary.version(version_pb2.request(), timeout=5)).version == "0.43.0"
            assert await code_of(unary.put_rule(rules_pb2.PutRuleRequest(), timeout=5)) == (
                grpc.StatusCode.PERMISSION_DENIED
            )
    finally:
        await servers.close()


async def test_handlers_see_the_caller_for_their_audit_lines(
    pki: Pki, identities: dict[str, TlsFiles], k8saudit: K8sAuditDouble, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="falco_api.audit")
    servers = await serve(POLICY, pki.server, k8saudit.url, put_rule_audits=True)
    try:
        address = f"127.0.0.1:{servers.tcp.port}"
        async with open_channel(address, tls=identities["writer"], server_name="localhost") as channel:
            request = rules_pb2.PutRuleRequest(ruleset=rules_pb2.Ruleset(name="custom"))
            await unary_pb2_grpc.unaryStub(channel).put_rule(request, timeout=5)
        async with grpc.aio.insecure_channel(f"unix://{servers.socket_dir}/api.sock") as channel:
            await unary_pb2_grpc.unaryStub(channel).put_rule(request, timeout=5)
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "falco_api.audit"]
        assert [(line["identity"], line["transport"], line["target"]) for line in lines] == [
            ("CN=falco-api-operator SAN=localhost,127.0.0.1", "mtls", "custom"),
            ("local unix socket", "unix", "custom"),
        ]
    finally:
        await servers.close()


def test_sidecar_flag_builds_the_interceptor(tmp_path: Path, pki: Pki) -> None:
    parser = argparse.ArgumentParser()
    add_authz_arguments(parser)
    path = tmp_path / "authz.yaml"
    path.write_text(AUTHZ_YAML)
    args = parser.parse_args(["--authz-config", str(path)])
    assert authz_interceptor(args.authz_config, "127.0.0.1:5060", pki.server).policy == AuthzPolicy(
        POLICY.grants, source=str(path)
    )
    assert authz_interceptor(None, "127.0.0.1:5060", pki.server).policy == AuthzPolicy.default()
    path.write_text("roles:\n  superuser: [me]\n")
    with pytest.raises(AuthzConfigError, match="unknown role 'superuser'"):
        authz_interceptor(str(path), "unix:///run/falco-api/falco-api.sock", None)


def test_every_method_of_the_contract_has_a_role() -> None:
    """A call added to proto/ without a role would be denied to everyone over TCP."""
    from falco_api.contract.falco import outputs_pb2, version_pb2
    from falco_api.contract.falco.api import bidirectional_pb2, streaming_pb2, unary_pb2
    from falco_api_sidecar.authz import METHOD_ROLES

    methods = {
        f"/{service.full_name}/{method.name}"
        for module in (outputs_pb2, version_pb2, unary_pb2, streaming_pb2, bidirectional_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert methods - set(METHOD_ROLES) == set()
