"""Sidecar discovery: which Falco pods serve the Falco API, and at which address.

Shared by the operator (which pushes rules to every node's sidecar) and the relay
(which subscribes to every sidecar). The core is pure functions over pod dicts as
the Kubernetes API returns them; :class:`SidecarDirectory` folds watch events into
a node -> sidecar map; :func:`register_kopf_pod_watch` is the thin kopf-facing part.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_PORT_NAME = "falco-api"
DEFAULT_SELECTOR = "app.kubernetes.io/name=falco"


def add_discovery_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say where the sidecars are: the same for the operator and the relay."""
    parser.add_argument(
        "--namespace", default="falco", help="namespace of the Falco pods (default: %(default)s)"
    )
    parser.add_argument(
        "--sidecar-selector",
        default=DEFAULT_SELECTOR,
        help="label selector of the Falco pods, key=value,... (default: %(default)s)",
    )
    parser.add_argument(
        "--sidecar-port-name",
        default=DEFAULT_PORT_NAME,
        help="named container port of the sidecar (default: %(default)s)",
    )


class SelectorError(ValueError):
    """A label selector string that this module cannot use."""


@dataclass(frozen=True)
class Sidecar:
    """One reachable sidecar. ``pod_uid`` changes when the pod is replaced, ``ip`` when it restarts."""

    node: str
    namespace: str
    pod: str
    pod_uid: str
    ip: str
    port: int

    @property
    def address(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port}"

    @property
    def identity(self) -> tuple[str, str, int]:
        """What changes when the sidecar process is a new one that has to be given the full state."""
        return (self.pod_uid, self.ip, self.port)


def parse_equality_selector(selector: str) -> dict[str, str]:
    """Parse ``a=b,c==d`` into a dict; set-based selectors are refused with a clear message.

    Only equality terms are accepted because the same selector has to be expressed
    as kopf's ``labels=`` filter and as a ``labelSelector`` query parameter.
    """
    labels: dict[str, str] = {}
    for raw_term in selector.split(","):
        term = raw_term.strip()
        if not term:
            continue
        if "!=" in term or " in " in term or " notin " in term or term.startswith("!"):
            raise SelectorError(f"the sidecar selector supports only key=value terms: {term!r}")
        key, sep, value = term.replace("==", "=").partition("=")
        if not sep or not key.strip():
            raise SelectorError(f"sidecar selector term {term!r} is not of the form key=value")
        labels[key.strip()] = value.strip()
    if not labels:
        raise SelectorError("the sidecar selector is empty; it would match every pod in the namespace")
    return labels


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def is_pod_ready(pod: Mapping[str, Any]) -> bool:
    """Ready as the kubelet reports it, and not on its way out."""
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    if status.get("phase") != "Running":
        return False
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Ready":
            return bool(condition.get("status") == "True")
    return False


def named_container_port(pod: Mapping[str, Any], port_name: str) -> int | None:
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == port_name and isinstance(port.get("containerPort"), int):
                return int(port["containerPort"])
    return None


def sidecar_from_pod(pod: Mapping[str, Any], port_name: str = DEFAULT_PORT_NAME) -> Sidecar | None:
    """The sidecar a pod offers, or None when it offers none now (not Ready, no IP, no such port, no node)."""
    if not is_pod_ready(pod):
        return None
    metadata = pod.get("metadata") or {}
    node = (pod.get("spec") or {}).get("nodeName")
    ip = (pod.get("status") or {}).get("podIP")
    port = named_container_port(pod, port_name)
    if not node or not ip or port is None:
        return None
    return Sidecar(
        node=str(node),
        namespace=str(metadata.get("namespace") or ""),
        pod=str(metadata.get("name") or ""),
        pod_uid=str(metadata.get("uid") or ""),
        ip=str(ip),
        port=port,
    )


def sidecars_by_node(
    pods: Iterable[Mapping[str, Any]], port_name: str = DEFAULT_PORT_NAME
) -> dict[str, Sidecar]:
    """Map node name -> sidecar. With two usable pods on a node (a rollout), the newest one wins."""
    chosen: dict[str, tuple[str, Sidecar]] = {}
    for pod in pods:
        sidecar = sidecar_from_pod(pod, port_name)
        if sidecar is None:
            continue
        created = str((pod.get("metadata") or {}).get("creationTimestamp") or "")
        previous = chosen.get(sidecar.node)
        if previous is None or (created, sidecar.pod) > (previous[0], previous[1].pod):
            chosen[sidecar.node] = (created, sidecar)
    return {node: sidecar for node, (_, sidecar) in chosen.items()}


def pod_key(pod: Mapping[str, Any]) -> tuple[str, str]:
    metadata = pod.get("metadata") or {}
    return (str(metadata.get("namespace") or ""), str(metadata.get("name") or ""))


class SidecarDirectory:
    """Folds pod watch events into the current node -> sidecar map.

    ``observe`` returns the nodes whose sidecar changed (appeared, disappeared, or
    became a different process), so callers only react to real changes.
    """

    def __init__(self, port_name: str = DEFAULT_PORT_NAME) -> None:
        self.port_name = port_name
        self._pods: dict[tuple[str, str], Mapping[str, Any]] = {}
        self._by_node: dict[str, Sidecar] = {}
        # (namespace, name) of every pod an event was observed for, deleted ones included.
        self.seen: set[tuple[str, str]] = set()

    @property
    def by_node(self) -> Mapping[str, Sidecar]:
        return dict(self._by_node)

    @property
    def pod_nodes(self) -> set[str]:
        """Nodes with a selected pod that offers no usable sidecar now (not Ready, no IP, no port)."""
        nodes = {str((pod.get("spec") or {}).get("nodeName") or "") for pod in self._pods.values()}
        return {node for node in nodes if node and node not in self._by_node}

    def observe(self, event_type: str | None, pod: Mapping[str, Any]) -> set[str]:
        key = pod_key(pod)
        self.seen.add(key)
        if event_type == "DELETED":
            self._pods.pop(key, None)
        else:
            self._pods[key] = pod
        new = sidecars_by_node(self._pods.values(), self.port_name)
        changed = {
            node
            for node in set(new) | set(self._by_node)
            if (new.get(node) is None) != (self._by_node.get(node) is None)
            or (new[node].identity if node in new else None)
            != (self._by_node[node].identity if node in self._by_node else None)
        }
        self._by_node = new
        return changed


def register_kopf_pod_watch(
    registry: Any,
    selector: str,
    directory: SidecarDirectory,
    on_change: Callable[[set[str]], Awaitable[None] | None],
) -> None:
    """Watch the selected pods through kopf and feed ``directory``; ``on_change`` gets the changed nodes.

    The namespace is kopf's: run the operator with ``namespaces=[...]`` so that only
    the Falco namespace's pods are listed (and RBAC stays namespaced).
    """
    import kopf  # kopf is only needed by callers that run inside a kopf operator

    labels = parse_equality_selector(selector)

    @kopf.on.event("", "v1", "pods", labels=labels, registry=registry)  # type: ignore[untyped-decorator]
    async def sidecar_pod_event(event: Mapping[str, Any], body: Mapping[str, Any], **_: Any) -> None:
        changed = directory.observe(event.get("type"), body)
        if changed:
            pending = on_change(changed)
            if pending is not None:
                await pending
