"""Which upstreams the relay should follow: a static list, the sidecars discovered from pods, or both.

Pure functions: :class:`falco_api_relay.upstream.UpstreamManager` applies the plan.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from falco_api.discovery import DEFAULT_PORT_NAME, Sidecar, sidecars_by_node
from falco_api.netaddr import split_host_port
from falco_api.tls import is_unix

STATIC_PREFIX = "static:"
NODE_PREFIX = "node:"


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """One sidecar to follow. A different ``identity`` under the same ``key`` is a new process."""

    key: str
    address: str
    identity: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.key.partition(":")[2]


def check_upstream_address(address: str) -> str:
    """``host:port``, ``[v6]:port`` or ``unix:///path``; a clear error otherwise."""
    if is_unix(address):
        if len(address) <= len("unix://") or not address.startswith("unix:///"):
            raise ValueError(f"--upstream unix address must be unix:///absolute/path, got {address!r}")
        return address
    _host, port = split_host_port(address, flag="--upstream")
    if port == 0:
        raise ValueError(f"--upstream needs a real port, got {address!r}")
    return address


def static_targets(addresses: Iterable[str]) -> dict[str, UpstreamTarget]:
    """The ``--upstream`` flags, checked; the same address twice is one upstream."""
    targets: dict[str, UpstreamTarget] = {}
    for raw in addresses:
        address = check_upstream_address(raw.strip())
        key = STATIC_PREFIX + address
        targets[key] = UpstreamTarget(key=key, address=address, identity=(address,))
    return targets


def sidecar_targets(by_node: Mapping[str, Sidecar]) -> dict[str, UpstreamTarget]:
    """One upstream per node's sidecar; a replaced pod or a new IP is a new identity."""
    return {
        NODE_PREFIX + node: UpstreamTarget(
            key=NODE_PREFIX + node,
            address=sidecar.address,
            identity=(sidecar.pod_uid, sidecar.ip, str(sidecar.port)),
        )
        for node, sidecar in by_node.items()
    }


def pod_targets(
    pods: Iterable[Mapping[str, Any]], port_name: str = DEFAULT_PORT_NAME
) -> dict[str, UpstreamTarget]:
    """Upstreams for a list of pods as the Kubernetes API returns them (Ready, with the named port)."""
    return sidecar_targets(sidecars_by_node(pods, port_name))


@dataclass(frozen=True, slots=True)
class Plan:
    stop: tuple[str, ...]
    start: tuple[UpstreamTarget, ...]


def plan_changes(current: Mapping[str, UpstreamTarget], desired: Mapping[str, UpstreamTarget]) -> Plan:
    """Stop the upstreams that went away or changed identity; start the new and the changed ones."""
    stop = sorted(
        key
        for key, target in current.items()
        if key not in desired or desired[key].identity != target.identity
    )
    start = sorted(
        (target for key, target in desired.items() if key not in current or key in stop),
        key=lambda target: target.key,
    )
    return Plan(tuple(stop), tuple(start))
