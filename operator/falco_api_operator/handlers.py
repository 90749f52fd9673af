"""kopf handlers (thin): they translate Kubernetes events into calls on the ClusterModel."""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import kopf

from falco_api.discovery import (
    DEFAULT_PORT_NAME,
    DEFAULT_SELECTOR,
    SidecarDirectory,
    parse_equality_selector,
    pod_key,
    register_kopf_pod_watch,
)
from falco_api.tls import TlsFiles, open_channel

from .cluster import KINDS, ClusterModel
from .desired import (
    CONFIGS_PLURAL,
    GROUP,
    RULES_PLURAL,
    VERSION,
    FalcoConfigSpec,
    FalcoRuleSpec,
    SelectorError,
)
from .kube import StatusClient
from .pusher import PushManager, PushSettings, make_grpc_client_factory
from .status import Acceptance
from .validation import Finding, admission_message, validate_config, validate_rule_in_set, validate_selector

log = logging.getLogger(__name__)

PREFIX = "falcoapi.io"
WEBHOOK_CONFIGURATION = "falco-api-operator.falcoapi.io"


@dataclass
class OperatorConfig:
    namespace: str = "falco"
    sidecar_selector: str = DEFAULT_SELECTOR
    sidecar_port_name: str = DEFAULT_PORT_NAME
    tls: TlsFiles | None = None
    insecure: bool = False
    # Sidecars are reached by pod IP; their certificates name this instead.
    sidecar_server_name: str | None = "falco-api-sidecar"
    webhook_port: int | None = None
    webhook_addr: str = "0.0.0.0"
    webhook_cert: str | None = None
    webhook_key: str | None = None
    # The CA bundle the API server should trust (default: the server certificate itself).
    webhook_ca: str | None = None
    webhook_url: str | None = None
    webhook_service: str = "falco-api-operator"
    webhook_service_port: int = 443
    manage_webhook_configuration: bool = True
    resync_seconds: float = 300.0
    status_debounce_seconds: float = 0.5
    standalone: bool = True
    peering_name: str = "falco-api-operator"
    push: PushSettings = field(default_factory=PushSettings)
    # Tests and special set-ups give the API connection explicitly instead of in-cluster/kubeconfig login.
    connection: kopf.ConnectionInfo | None = None


class ClientConfigWebhookServer(kopf.WebhookServer):  # type: ignore[misc]
    """kopf's HTTPS webhook server, advertising either a Service or a fixed URL to the API server.

    kopf advertises ``https://<host>:<port>``; behind a Service the API server must be
    given the Service reference instead, and with ``--webhook-url`` exactly that URL.
    """

    def __init__(
        self, *, service: Mapping[str, Any] | None = None, url: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.advertised_service = dict(service) if service else None
        self.advertised_url = url

    async def __call__(self, fn: Any) -> AsyncIterator[kopf.WebhookClientConfig]:
        async for client_config in super().__call__(fn):
            config = {k: v for k, v in client_config.items() if k != "url"}
            if self.advertised_service is not None:
                config["service"] = dict(self.advertised_service)
            elif self.advertised_url is not None:
                config["url"] = self.advertised_url
            else:
                config["url"] = client_config["url"]
            yield cast(kopf.WebhookClientConfig, config)


def webhook_server(config: OperatorConfig) -> ClientConfigWebhookServer | None:
    if config.webhook_port is None:
        return None
    common: dict[str, Any] = {"addr": config.webhook_addr, "port": config.webhook_port}
    if config.webhook_cert and config.webhook_key:
        common.update(certfile=config.webhook_cert, pkeyfile=config.webhook_key, cafile=config.webhook_ca)
    if config.webhook_url:
        parsed = urllib.parse.urlsplit(config.webhook_url)
        return ClientConfigWebhookServer(url=config.webhook_url.rstrip("/"), host=parsed.hostname, **common)
    service = {
        "namespace": config.namespace,
        "name": config.webhook_service,
        "port": config.webhook_service_port,
        "path": "",
    }
    host = f"{config.webhook_service}.{config.namespace}.svc"
    return ClientConfigWebhookServer(service=service, host=host, extra_sans=[host], **common)


def object_reference(plural: str, body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KINDS[plural],
        "metadata": {"name": meta.get("name"), "uid": meta.get("uid")},
    }


class Runtime:
    """Everything the handlers share; built before kopf starts, started in the startup handler."""

    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        self.connection: kopf.ConnectionInfo | None = config.connection
        self._status_client: StatusClient | None = None
        self._status_client_login: kopf.ConnectionInfo | None = None
        self.directory = SidecarDirectory(config.sidecar_port_name)
        push_settings = PushSettings(**{**config.push.__dict__, "resync_seconds": config.resync_seconds})

        def channel(address: str) -> Any:
            return open_channel(
                address, tls=config.tls, insecure=config.insecure, server_name=config.sidecar_server_name
            )

        self.pushes = PushManager(make_grpc_client_factory(channel), self._on_outcome, push_settings)
        self.model = ClusterModel(
            self.directory,
            self.pushes,
            self._patch_status,
            self._post_event,
            debounce_seconds=config.status_debounce_seconds,
        )

    def _on_outcome(self, *args: Any) -> None:
        self.model.on_outcome(*args)

    async def status_client(self) -> StatusClient:
        """A client on kopf's current credentials: kopf logs in again when a token is refused."""
        if self.connection is None:
            raise RuntimeError("not logged in to the Kubernetes API yet")
        if self._status_client is None or self._status_client_login is not self.connection:
            if self._status_client is not None:
                await self._status_client.close()
            self._status_client = StatusClient(self.connection)
            self._status_client_login = self.connection
        return self._status_client

    async def _patch_status(self, plural: str, name: str, status: dict[str, Any]) -> None:
        await (await self.status_client()).patch_status(plural, name, status)

    async def _post_event(self, reference: Mapping[str, Any], reason: str, message: str) -> None:
        # Posted through the API directly: kopf.warn/info only work inside kopf's handler
        # context, and this runs in the status writer's own task.
        await (await self.status_client()).post_event(
            self.config.namespace, reference, reason, message, warning=reason != "Recovered"
        )

    async def close(self) -> None:
        await self.model.close()
        await self.pushes.close()
        if self._status_client is not None:
            await self._status_client.close()


def rule_acceptance(spec: FalcoRuleSpec, model: ClusterModel) -> Acceptance:
    # Every event of the object lands here, the echo of our own status patches included; a large
    # set takes most of a second to validate on the event loop, so an unchanged set is not redone.
    others = tuple(sorted((r for r in model.all_rules() if r.name != spec.name), key=lambda r: r.name))
    cached = model.acceptance_cache.get(spec.name)
    if cached is not None and cached[0] == spec and cached[1] == others:
        return cached[2]
    findings = validate_rule_in_set(spec, list(others))
    acceptance = Acceptance(
        not findings, admission_message(findings) if findings else "passed the rules validator"
    )
    model.acceptance_cache[spec.name] = (spec, others, acceptance)
    return acceptance


def config_acceptance(spec: FalcoConfigSpec) -> Acceptance:
    findings = validate_config(spec)
    return Acceptance(
        not findings, admission_message(findings) if findings else "passed the config validator"
    )


def register(registry: kopf.OperatorRegistry, runtime: Runtime) -> None:
    config = runtime.config
    model = runtime.model
    model.accept_rule = lambda spec: rule_acceptance(spec, model)

    @kopf.on.login(registry=registry)  # type: ignore[untyped-decorator]
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        info = (
            config.connection
            or kopf.login_with_service_account(**kwargs)
            or kopf.login_with_kubeconfig(**kwargs)
        )
        runtime.connection = info
        return info

    @kopf.on.startup(registry=registry)  # type: ignore[untyped-decorator]
    async def configure(
        settings: kopf.OperatorSettings, logger: logging.Logger | logging.LoggerAdapter[Any], **_: Any
    ) -> None:
        settings.persistence.finalizer = f"{PREFIX}/finalizer"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
        # kopf copies the spec into this annotation; the API server refuses more than 256 KiB of
        # annotations, and spec.rules may be 1 MiB. No handler here reads spec diffs, so the
        # unbounded fields are left out of the copy.
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=PREFIX, key="last-handled-configuration", ignored_fields=["spec.rules", "spec.config"]
        )
        settings.peering.name = config.peering_name
        settings.peering.standalone = config.standalone
        settings.peering.clusterwide = True
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 300
        server = webhook_server(config)
        if server is not None:
            settings.admission.server = server  # type: ignore[assignment]
            if config.manage_webhook_configuration:
                settings.admission.managed = WEBHOOK_CONFIGURATION
        runtime.pushes.start()
        model.start()
        logger.info("falco-api-operator: sidecars %r in %r", config.sidecar_selector, config.namespace)

    @kopf.on.cleanup(registry=registry)  # type: ignore[untyped-decorator]
    async def shut_down(**_: Any) -> None:
        await runtime.close()

    @kopf.on.probe(id="sidecars", registry=registry)  # type: ignore[untyped-decorator]
    def sidecars_known(**_: Any) -> int:
        return len(runtime.directory.by_node)

    # Index handlers (async: kopf would run sync ones in a thread) do no indexing: their presence
    # makes kopf hold every event handler until each kind's initial list is in, and they tell the
    # model what was listed (see ClusterModel.primed).
    @kopf.index(GROUP, VERSION, RULES_PLURAL, registry=registry)  # type: ignore[untyped-decorator]
    async def falcorules_listed(name: str, **_: Any) -> None:
        model.listed[RULES_PLURAL].add(name)

    @kopf.index(GROUP, VERSION, CONFIGS_PLURAL, registry=registry)  # type: ignore[untyped-decorator]
    async def falcoconfigs_listed(name: str, **_: Any) -> None:
        model.listed[CONFIGS_PLURAL].add(name)

    @kopf.index("", "v1", "nodes", registry=registry)  # type: ignore[untyped-decorator]
    async def nodes_listed(name: str, **_: Any) -> None:
        model.listed["nodes"].add(name)

    @kopf.index(  # type: ignore[untyped-decorator]
        "", "v1", "pods", labels=parse_equality_selector(config.sidecar_selector), registry=registry
    )
    async def pods_listed(body: Mapping[str, Any], **_: Any) -> None:
        model.listed_pods.add(pod_key(body))

    register_kopf_pod_watch(
        registry, config.sidecar_selector, runtime.directory, lambda _nodes: model.reconcile()
    )

    @kopf.on.event("", "v1", "nodes", registry=registry)  # type: ignore[untyped-decorator]
    async def node_event(event: Mapping[str, Any], name: str, labels: Mapping[str, str], **_: Any) -> None:
        model.seen["nodes"].add(name)
        await model.set_node(name, None if event.get("type") == "DELETED" else labels)

    # --- FalcoRule ---------------------------------------------------------------------------

    def admit_rule(body: Mapping[str, Any], spec: Mapping[str, Any], **_: Any) -> None:
        findings = validate_selector(spec.get("nodeSelector"), str(body.get("metadata", {}).get("name")))
        if not findings:
            candidate = FalcoRuleSpec.from_object(body)
            if candidate.enabled:
                findings = validate_rule_in_set(
                    candidate, [r for r in model.all_rules() if r.name != candidate.name]
                )
        if findings:
            raise kopf.AdmissionError(admission_message(findings), code=422)

    if config.webhook_port is not None:  # kopf refuses admission handlers without a server
        kopf.on.validate(
            GROUP,
            VERSION,
            RULES_PLURAL,
            id="validate-falcorule",
            operations=["CREATE", "UPDATE"],
            registry=registry,
        )(admit_rule)

    @kopf.on.event(GROUP, VERSION, RULES_PLURAL, registry=registry)  # type: ignore[untyped-decorator]
    async def rule_event(
        event: Mapping[str, Any], body: Mapping[str, Any], name: str, status: Mapping[str, Any], **_: Any
    ) -> None:
        model.seen[RULES_PLURAL].add(name)
        if event.get("type") == "DELETED":
            await model.forget(RULES_PLURAL, name)
            return
        if body.get("metadata", {}).get("deletionTimestamp"):
            return  # the deletion handler owns it from here
        try:
            spec = FalcoRuleSpec.from_object(body)
        except (SelectorError, ValueError, TypeError) as error:
            spec = FalcoRuleSpec(
                name, "", 0, spec_selector_fallback(), enabled=False, generation=generation_of(body)
            )
            acceptance = Acceptance(False, f"spec is not usable: {error}")
        else:
            acceptance = rule_acceptance(spec, model) if spec.enabled else Acceptance(True, "disabled")
        await model.upsert(RULES_PLURAL, spec, acceptance, object_reference(RULES_PLURAL, body), status)

    @kopf.on.delete(GROUP, VERSION, RULES_PLURAL, registry=registry)  # type: ignore[untyped-decorator]
    async def rule_deleted(name: str, logger: logging.Logger | logging.LoggerAdapter[Any], **_: Any) -> None:
        await remove_everywhere(RULES_PLURAL, name, logger)

    # --- FalcoConfig -------------------------------------------------------------------------

    def admit_config(body: Mapping[str, Any], spec: Mapping[str, Any], **_: Any) -> None:
        name = str(body.get("metadata", {}).get("name"))
        findings = validate_selector(spec.get("nodeSelector"), name) or validate_config(
            FalcoConfigSpec.from_object(body)
        )
        if findings:
            raise kopf.AdmissionError(admission_message(findings), code=422)

    if config.webhook_port is not None:  # kopf refuses admission handlers without a server
        kopf.on.validate(
            GROUP,
            VERSION,
            CONFIGS_PLURAL,
            id="validate-falcoconfig",
            operations=["CREATE", "UPDATE"],
            registry=registry,
        )(admit_config)

    @kopf.on.event(GROUP, VERSION, CONFIGS_PLURAL, registry=registry)  # type: ignore[untyped-decorator]
    async def config_event(
        event: Mapping[str, Any], body: Mapping[str, Any], name: str, status: Mapping[str, Any], **_: Any
    ) -> None:
        model.seen[CONFIGS_PLURAL].add(name)
        if event.get("type") == "DELETED":
            await model.forget(CONFIGS_PLURAL, name)
            return
        if body.get("metadata", {}).get("deletionTimestamp"):
            return
        try:
            spec = FalcoConfigSpec.from_object(body)
        except (SelectorError, ValueError, TypeError) as error:
            spec = FalcoConfigSpec(
                name, {}, 0, spec_selector_fallback(), enabled=False, generation=generation_of(body)
            )
            acceptance = Acceptance(False, f"spec is not usable: {error}")
        else:
            acceptance = config_acceptance(spec)
        await model.upsert(CONFIGS_PLURAL, spec, acceptance, object_reference(CONFIGS_PLURAL, body), status)

    @kopf.on.delete(GROUP, VERSION, CONFIGS_PLURAL, registry=registry)  # type: ignore[untyped-decorator]
    async def config_deleted(
        name: str, logger: logging.Logger | logging.LoggerAdapter[Any], **_: Any
    ) -> None:
        await remove_everywhere(CONFIGS_PLURAL, name, logger)

    async def remove_everywhere(
        plural: str, name: str, logger: logging.Logger | logging.LoggerAdapter[Any]
    ) -> None:
        """Finalizer: release the object only when no reachable sidecar still runs it.

        Unreachable sidecars do not block deletion: when they come back they get the
        full desired state, which no longer contains this object.
        """
        await model.forget(plural, name)
        waiting = model.nodes_still_loading(plural, name)
        if waiting:
            shown = ", ".join(waiting[:5]) + (f" (+{len(waiting) - 5} more)" if len(waiting) > 5 else "")
            raise kopf.TemporaryError(f"waiting for removal from node(s): {shown}", delay=1)
        logger.info("%s %s removed from every reachable node", KINDS[plural], name)


def spec_selector_fallback() -> Any:
    from .desired import LabelSelector

    return LabelSelector()


def generation_of(body: Mapping[str, Any]) -> int:
    return int((body.get("metadata") or {}).get("generation") or 0)


__all__ = ["ClientConfigWebhookServer", "Finding", "OperatorConfig", "Runtime", "register", "webhook_server"]
