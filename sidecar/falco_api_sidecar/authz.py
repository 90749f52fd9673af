"""Who may call what: identities from client certificates, roles from a YAML file, an audit log.

The policy is plain data and a pure decision function; :class:`AuthzInterceptor` only reads the
caller's transport and certificate names from the gRPC context and applies the decision. The
rules (documented in docs/authorization.md):

- the unix socket is local admin: its file permissions already decide who gets in;
- plaintext TCP (``--insecure``) proves no identity, so it may only read;
- over mutual TLS, the certificate's common name and subject alternative names are looked up
  in the roles file; without a roles file every certificate the CA signed may read, nobody writes;
- a method the policy does not name is denied (except on the unix socket).
"""

from __future__ import annotations

import argparse
import contextvars
import datetime
import enum
import inspect
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import yaml

from falco_api.tls import TlsFiles, is_unix

log = logging.getLogger(__name__)
audit_log = logging.getLogger("falco_api.audit")

ANY_CERTIFICATE = "*"


class AuthzConfigError(ValueError):
    """The roles file cannot be used; the sidecar must not start with a policy it did not mean."""


class Role(enum.StrEnum):
    READER = "reader"
    WRITER = "writer"
    INJECTOR = "injector"


# A writer can already change what Falco detects, which is more than reading reveals; an operator
# that writes also needs to read back status and versions. Injecting events grants no reading.
IMPLIED_ROLES: Mapping[Role, frozenset[Role]] = {
    Role.READER: frozenset({Role.READER}),
    Role.WRITER: frozenset({Role.WRITER, Role.READER}),
    Role.INJECTOR: frozenset({Role.INJECTOR}),
}

_READ_METHODS = (
    "/falco.outputs.service/sub",
    "/falco.outputs.service/get",
    "/falco.version.service/version",
    "/falco.api.streaming/outputs",
    "/falco.api.streaming/outputs_batched",
    "/falco.api.streaming/drops",
    "/falco.api.unary/version",
    "/falco.api.unary/list_rules",
    "/falco.api.unary/get_rule",
    "/falco.api.unary/validate_rules",
    "/falco.api.unary/get_config",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
)
_WRITE_METHODS = (
    "/falco.api.unary/put_rule",
    "/falco.api.unary/delete_rule",
    "/falco.api.unary/put_config",
    "/falco.api.unary/delete_config",
    "/falco.api.unary/apply",
)
_INJECT_METHODS = ("/falco.api.bidirectional/inputs",)

METHOD_ROLES: Mapping[str, Role] = {
    **dict.fromkeys(_READ_METHODS, Role.READER),
    **dict.fromkeys(_WRITE_METHODS, Role.WRITER),
    **dict.fromkeys(_INJECT_METHODS, Role.INJECTOR),
}


class Transport(enum.StrEnum):
    UNIX = "unix"
    MTLS = "mtls"
    INSECURE = "insecure"


@dataclass(frozen=True)
class Identity:
    """The caller as the transport proved it: a local socket user, a certificate, or nobody."""

    transport: Transport
    peer: str = ""
    common_name: str = ""
    sans: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """Every name a roles file may use for this caller (certificate CN and SANs).

        A CN shaped like a URI is left out: many issuers take the CN as the requester wrote it,
        while a URI identity (SPIFFE) is only proved by a URI SAN.
        """
        if self.transport is not Transport.MTLS:
            return ()
        common = () if _URI_SHAPED.search(self.common_name) else (self.common_name,)
        return tuple(name for name in (*common, *self.sans) if name)

    def __str__(self) -> str:
        if self.transport is Transport.UNIX:
            return "local unix socket"
        if self.transport is Transport.INSECURE:
            return f"unauthenticated peer {self.peer or 'unknown'} (plaintext TCP)"
        text = f"CN={self.common_name}" if self.common_name else "certificate without CN"
        if self.sans:
            text += f" SAN={','.join(self.sans)}"
        return text


_URI_SHAPED = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# gRPC's typed SAN properties; e-mail SANs (peer_email) are left out on purpose: issuers rarely
# check them, so they prove nothing a roles file should rely on.
_TYPED_SANS = ("peer_dns", "peer_ip", "peer_uri")


def _texts(values: Iterable[bytes] | None) -> tuple[str, ...]:
    return tuple(value.decode("utf-8", "replace") for value in values or ())


def _sans(auth_context: Mapping[str, Iterable[bytes]]) -> tuple[str, ...]:
    if any(key in auth_context for key in (*_TYPED_SANS, "peer_email")):
        return tuple(name for key in _TYPED_SANS for name in _texts(auth_context.get(key)))
    # An older gRPC without typed properties: only the untyped list is there.
    return _texts(auth_context.get("x509_subject_alternative_name"))


def identity_from_auth_context(peer: str, auth_context: Mapping[str, Iterable[bytes]]) -> Identity:
    """Build the identity from what grpc reports: ``peer()`` and ``auth_context()``."""
    if peer.startswith("unix:"):
        return Identity(Transport.UNIX, peer=peer)
    security = _texts(auth_context.get("transport_security_type"))
    if security != ("ssl",):
        return Identity(Transport.INSECURE, peer=peer)
    common_names = _texts(auth_context.get("x509_common_name"))
    return Identity(
        Transport.MTLS,
        peer=peer,
        common_name=common_names[0] if common_names else "",
        sans=_sans(auth_context),
    )


@dataclass(frozen=True)
class Decision:
    allowed: bool
    needed: Role | None
    reason: str


@dataclass(frozen=True)
class AuthzPolicy:
    """Role -> identity names granted it (``*``: any certificate the CA signed)."""

    grants: Mapping[Role, frozenset[str]] = field(default_factory=dict)
    source: str = "built-in default"

    @classmethod
    def default(cls) -> AuthzPolicy:
        # Before falco-api, a certificate from the CA was enough to read Falco's outputs; keep
        # that, and make every write and input an explicit grant.
        return cls({Role.READER: frozenset({ANY_CERTIFICATE})}, source="built-in default (no --authz-config)")

    def roles_of(self, identity: Identity) -> frozenset[Role]:
        if identity.transport is Transport.UNIX:
            return frozenset(Role)
        if identity.transport is Transport.INSECURE:
            return IMPLIED_ROLES[Role.READER]
        names = set(identity.names)
        roles: set[Role] = set()
        for role, granted in self.grants.items():
            if ANY_CERTIFICATE in granted or names & granted:
                roles |= IMPLIED_ROLES[role]
        return frozenset(roles)

    def decide(self, identity: Identity, method: str) -> Decision:
        needed = METHOD_ROLES.get(method)
        if identity.transport is Transport.UNIX:
            # Local admin: the socket's file permissions already decided who gets in.
            return Decision(True, needed, "")
        if needed is None:
            return Decision(
                False, None, f"permission denied: {method} is not covered by the authorization policy"
            )
        if needed in self.roles_of(identity):
            return Decision(True, needed, "")
        if identity.transport is Transport.INSECURE:
            hint = "plaintext TCP (--insecure) may only read; use mutual TLS or the unix socket"
        else:
            hint = f"roles from {self.source}"
        return Decision(
            False, needed, f"permission denied: {identity} needs role {needed} for {method} ({hint})"
        )

    def allowed(self, identity: Identity, method: str) -> bool:
        return self.decide(identity, method).allowed


def parse_authz_config(text: str, *, source: str) -> AuthzPolicy:
    """The roles file: ``roles: {reader: [names], writer: [...], injector: [...]}``."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise AuthzConfigError(f"authz config {source}: invalid YAML{where}: {problem}") from None
    if not isinstance(document, dict):
        raise AuthzConfigError(f"authz config {source}: expected a mapping with a 'roles' key")
    unknown_keys = sorted(str(key) for key in document if key != "roles")
    if unknown_keys:
        raise AuthzConfigError(
            f"authz config {source}: unknown top-level key(s) {unknown_keys}; only 'roles'"
        )
    roles = document.get("roles")
    if not isinstance(roles, dict):
        raise AuthzConfigError(f"authz config {source}: 'roles' must map role names to lists of identities")
    known = sorted(role.value for role in Role)
    grants: dict[Role, frozenset[str]] = {}
    for name, members in roles.items():
        if name not in known:
            raise AuthzConfigError(
                f"authz config {source}: unknown role {name!r} (known roles: {', '.join(known)})"
            )
        if members is None:
            members = []
        if not isinstance(members, list) or not all(isinstance(m, str) and m.strip() for m in members):
            raise AuthzConfigError(
                f"authz config {source}: role {name!r} must be a list of identities (CN or SAN strings)"
            )
        grants[Role(name)] = frozenset(member.strip() for member in members)
    for role, members in grants.items():
        if ANY_CERTIFICATE in members and role is not Role.READER:
            log.warning("authz config %s grants %s to every certificate the CA signed ('*')", source, role)
    return AuthzPolicy(grants, source=source)


def load_authz_config(path: str | Path) -> AuthzPolicy:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise AuthzConfigError(f"cannot read authz config {str(path)!r}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise AuthzConfigError(f"authz config {str(path)!r} is not UTF-8 text: {error.reason}") from None
    return parse_authz_config(text, source=str(path))


def policy_for(authz_config: str | None, *, tcp_with_tls: bool) -> AuthzPolicy:
    """What the sidecar enforces for the given ``--authz-config`` (None: the built-in default)."""
    if authz_config:
        return load_authz_config(authz_config)
    if tcp_with_tls:
        log.info(
            "no --authz-config: every client certificate signed by the CA may read; "
            "rules/config writes and inputs are only allowed on the unix socket"
        )
    return AuthzPolicy.default()


_current_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "falco_api_caller_identity", default=None
)


def current_identity() -> Identity | None:
    """The caller of the RPC being handled (set by :class:`AuthzInterceptor`), for audit lines."""
    return _current_identity.get()


Context = grpc.aio.ServicerContext[Any, Any]


if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # the stubs are generic, the runtime class is not
    _ServerInterceptor = grpc.aio.ServerInterceptor


class AuthzInterceptor(_ServerInterceptor):
    """Checks every call against the policy before the handler runs; denied calls get PERMISSION_DENIED."""

    def __init__(self, policy: AuthzPolicy) -> None:
        self.policy = policy

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            # Nothing is served at that name: the server answers UNIMPLEMENTED, nothing to guard.
            return handler
        return _guarded_handler(handler, handler_call_details.method, self)

    async def admit(self, method: str, context: Context) -> Identity:
        identity = identity_from_auth_context(context.peer() or "", context.auth_context())
        decision = self.policy.decide(identity, method)
        if not decision.allowed:
            log.warning("%s", decision.reason)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, decision.reason)
        _current_identity.set(identity)
        return identity


def _guarded_behavior(
    behavior: Callable[..., Any], method: str, guard: AuthzInterceptor
) -> Callable[..., Any]:
    # grpc.aio picks how to drive a handler from its function kind, so the guard must keep it.
    if inspect.isasyncgenfunction(behavior):

        async def guarded_stream(request: Any, context: Context) -> AsyncIterator[Any]:
            await guard.admit(method, context)
            async for response in behavior(request, context):
                yield response

        return guarded_stream

    async def guarded(request: Any, context: Context) -> Any:
        await guard.admit(method, context)
        result = behavior(request, context)
        return await result if inspect.isawaitable(result) else result

    return guarded


def _guarded_handler(
    handler: grpc.RpcMethodHandler[Any, Any], method: str, guard: AuthzInterceptor
) -> grpc.RpcMethodHandler[Any, Any]:
    deserializer = handler.request_deserializer
    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _guarded_behavior(handler.unary_unary, method, guard), deserializer, serializer
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _guarded_behavior(handler.unary_stream, method, guard), deserializer, serializer
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _guarded_behavior(handler.stream_unary, method, guard), deserializer, serializer
        )
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            _guarded_behavior(handler.stream_stream, method, guard), deserializer, serializer
        )
    raise TypeError(f"handler for {method} has no behaviour")


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MAX_FIELD = 512


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_FIELD else text[: _MAX_FIELD - 3] + "..."


def _hash_field(value: str | None) -> str | None:
    # Only a hash may go here; anything else could be file content, which the audit log never holds.
    if not value:
        return None
    return value if _SHA256.match(value) else "<not a sha256>"


def audit(
    identity: Identity | str | None,
    action: str,
    target: str,
    old_sha256: str | None,
    new_sha256: str | None,
    result: str,
) -> str:
    """Log one JSON line for one write to ``falco_api.audit``; returns the line.

    ``identity`` None means the caller of the current RPC. Never pass content: only names,
    hashes and the outcome are recorded.
    """
    who = current_identity() if identity is None else identity
    record: dict[str, Any] = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "identity": _clip(str(who)) if who is not None else "unknown",
        "transport": who.transport.value if isinstance(who, Identity) else None,
        "action": _clip(action),
        "target": _clip(target),
        "old_sha256": _hash_field(old_sha256),
        "new_sha256": _hash_field(new_sha256),
        "result": _clip(result),
    }
    line = json.dumps(record, separators=(",", ":"), ensure_ascii=True)
    audit_log.info("%s", line)
    return line


def add_authz_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--authz-config",
        default=os.environ.get("FALCO_API_AUTHZ_CONFIG"),
        help="YAML file mapping client certificate names (CN or SAN) to roles reader, writer, injector; "
        "without it, any certificate signed by --tls-ca may read and nobody may write over TCP "
        "(default: $FALCO_API_AUTHZ_CONFIG)",
    )


def authz_interceptor(authz_config: str | None, grpc_listen: str, tls: TlsFiles | None) -> AuthzInterceptor:
    """The interceptor for the sidecar's gRPC server; raises AuthzConfigError (a ValueError) on a bad file."""
    policy = policy_for(authz_config, tcp_with_tls=not is_unix(grpc_listen) and tls is not None)
    if is_unix(grpc_listen) and authz_config:
        log.info(
            "%s is a unix socket (local admin): --authz-config %s only applies to TCP",
            grpc_listen,
            authz_config,
        )
    return AuthzInterceptor(policy)
