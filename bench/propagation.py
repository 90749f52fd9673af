"""Scenario 4: a FalcoRule change to Ready on every node, with 1/10/100/500 sidecars.

The real operator (kopf, in its own thread and loop, production push and debounce settings)
against the Kubernetes API emulator of the operator tests (tests/operator/k8s_emulator.py), with
a gRPC server per node in a separate process (so the nodes do not share the operator's
interpreter): by default a contract double answering falco.api.unary/apply with LOADED at once
(what is measured is then the operator and the API server), or with ``--real`` the real sidecar
beside a Falco double that reloads like Falco (tests/real_sidecar.py, as the operator tests use).

Per change: time from the PATCH of the spec to status Ready=True with loadedSummary n/n and
observedGeneration of the change; status writes on that FalcoRule; API requests the operator
made (the benchmark's own polling is not counted). Baseline, same run: the bare fan-out, one
client calling apply on every sidecar concurrently with the same request (no Kubernetes, no
operator): the floor for pushing to n nodes.

    python -m bench.propagation [--sidecars 1,10,100,500] [--changes 3]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import multiprocessing
import multiprocessing.connection
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import grpc
import kmock
import kopf
import yaml

from bench.harness import load_average, machine, print_table, save
from falco_api.contract.falco.api import apply_pb2, rules_pb2, unary_pb2_grpc
from falco_api.tls import open_channel
from falco_api_operator.desired import state_from_request, state_sha256
from falco_api_operator.handlers import OperatorConfig, Runtime, register
from tests.operator.conftest import CONFIGS, NAMESPACE, RULES, Kube
from tests.operator.k8s_emulator import FalcoApiServerEmulator

POLLER_HEADER = "X-Bench-Poller"
RULE = """
- rule: Shell in bench container
  desc: a shell was spawned
  condition: evt.type = execve and proc.name = {shell}
  output: shell (user=%user.name)
  priority: WARNING
"""


@attrs.define(kw_only=True)
class CountingEmulator(FalcoApiServerEmulator):
    requests_seen: collections.Counter[str] = attrs.field(factory=collections.Counter, init=False)

    async def __call__(self, raw_request: Any) -> Any:
        if POLLER_HEADER not in raw_request.headers:
            self.requests_seen[raw_request.method] += 1
        return await super().__call__(raw_request)


# --- the sidecars' process ----------------------------------------------------------------------


class ContractSidecar:
    """falco.api.unary/apply by the contract, Falco loading instantly: isolates the operator's cost."""

    def __init__(self) -> None:
        self.loaded_sha = ""

    async def apply(self, request: apply_pb2.ApplyRequest, _context: Any) -> apply_pb2.ApplyResponse:
        sha = state_sha256(*state_from_request(request))
        changed, self.loaded_sha = sha != self.loaded_sha, sha
        status = rules_pb2.LoadStatus(state=rules_pb2.LoadStatus.STATE_LOADED)
        result = apply_pb2.WriteResult(changed=changed, status=status, state_sha256=sha)
        return apply_pb2.ApplyResponse(result=result, rulesets=request.rulesets, configs=request.configs)


async def _serve_sidecars(
    count: int, pki: dict[str, Any] | None, control: multiprocessing.connection.Connection
) -> None:
    if pki is not None:
        # The real sidecar (managed store, apply over gRPC, mutual TLS, the operator as the only
        # writer) beside a Falco double that reloads like Falco: tests/real_sidecar.py, as the
        # operator tests use it.
        from tests.real_sidecar import RealSidecar

        nodes = [
            RealSidecar(f"node-{i:03}", tls=pki["sidecar"], authz_config=pki["authz_config"])
            for i in range(count)
        ]
        for node in nodes:
            await node.start()
        control.send([node.port for node in nodes])
        await asyncio.get_running_loop().run_in_executor(None, control.recv)
        await asyncio.gather(*(node.close() for node in nodes))
        return
    servers = []
    for _ in range(count):
        server = grpc.aio.server()
        apply = grpc.unary_unary_rpc_method_handler(
            ContractSidecar().apply,
            request_deserializer=apply_pb2.ApplyRequest.FromString,
            response_serializer=apply_pb2.ApplyResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("falco.api.unary", {"apply": apply}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append((server, port))
    control.send([port for _, port in servers])
    await asyncio.get_running_loop().run_in_executor(None, control.recv)
    await asyncio.gather(*(server.stop(0.1) for server, _ in servers))


def _sidecars_main(
    count: int, pki: dict[str, Any] | None, control: multiprocessing.connection.Connection
) -> None:
    logging.disable(logging.WARNING)
    asyncio.run(_serve_sidecars(count, pki, control))


def _real_sidecar_pki(directory: Path) -> dict[str, Any]:
    """What the operator tests set up: one CA, the sidecars' server certificate, the operator's
    client certificate, and a roles file naming the operator as the only writer."""
    from tests.certs import Authority
    from tests.operator.conftest import OPERATOR_IDENTITY, SIDECAR_SERVER_NAME

    ca = Authority.create(directory, "falco-api-ca")
    authz_config = directory / "authz.yaml"
    authz_config.write_text(yaml.safe_dump({"roles": {"writer": [OPERATOR_IDENTITY]}}))
    return {
        "sidecar": ca.issue(directory, "sidecar", dns_names=(SIDECAR_SERVER_NAME,)),
        "operator": ca.issue(directory, OPERATOR_IDENTITY, dns_names=()),
        "authz_config": authz_config,
        "server_name": SIDECAR_SERVER_NAME,
    }


# --- one scenario -------------------------------------------------------------------------------


def _resources(emulator: FalcoApiServerEmulator) -> None:
    for path, kind, namespaced, subresources in (
        (RULES, "FalcoRule", False, {"status"}),
        (CONFIGS, "FalcoConfig", False, {"status"}),
        ("v1/pods", "Pod", True, {"status"}),
        ("v1/nodes", "Node", False, {"status"}),
        ("v1/events", "Event", True, set()),
        ("v1/namespaces", "Namespace", False, set()),
    ):
        emulator.resources[path] = kmock.ResourceInfo(
            kind=kind,
            namespaced=namespaced,
            subresources=subresources,
            verbs={"list", "watch", "get", "create", "patch", "delete"},
        )


def _start_operator(url: str, pki: dict[str, Any] | None) -> tuple[threading.Event, threading.Thread]:
    connection = kopf.ConnectionInfo(server=url, insecure=True)
    if pki is None:
        config = OperatorConfig(namespace=NAMESPACE, insecure=True, connection=connection)
    else:
        config = OperatorConfig(
            namespace=NAMESPACE,
            tls=pki["operator"],
            sidecar_server_name=pki["server_name"],
            connection=connection,
        )
    runtime = Runtime(config)
    registry = kopf.OperatorRegistry()
    register(registry, runtime)
    settings = kopf.OperatorSettings()
    settings.posting.enabled = False  # k8s Events are not what is measured
    stop, ready = threading.Event(), threading.Event()

    def serve() -> None:
        asyncio.run(
            kopf.operator(
                registry=registry,
                settings=settings,
                standalone=True,
                namespaces=[NAMESPACE],
                stop_flag=stop,
                ready_flag=ready,
            )
        )

    thread = threading.Thread(target=serve, name="operator", daemon=True)
    thread.start()
    if not ready.wait(30):
        raise RuntimeError("the operator did not start within 30 s")
    return stop, thread


async def _ready(kube: Kube, name: str, count: int, generation: int, within: float) -> float:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        status = (await kube.rule(name)).get("status") or {}
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", [])
        )
        if (
            ready
            and status.get("loadedSummary") == f"{count}/{count}"
            and status.get("observedGeneration") == generation
        ):
            return time.monotonic()
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{name} not Ready on {count} sidecars within {within}s")


async def _bare_fan_out(ports: list[int], shell: str, pki: dict[str, Any] | None) -> float:
    request = apply_pb2.ApplyRequest()
    request.rulesets.add(name="r1", content=RULE.format(shell=shell), order=50)
    channels = [
        open_channel(
            f"127.0.0.1:{port}",
            tls=pki["operator"] if pki else None,
            insecure=pki is None,
            server_name=pki["server_name"] if pki else None,
        )
        for port in ports
    ]
    try:
        # Connections are warm, as the operator's are after its first push.
        await asyncio.gather(*(ch.channel_ready() for ch in channels))
        start = time.monotonic()
        await asyncio.gather(*(unary_pb2_grpc.unaryStub(ch).apply(request, timeout=20) for ch in channels))
        return time.monotonic() - start
    finally:
        await asyncio.gather(*(ch.close(None) for ch in channels))


async def scenario(count: int, changes: int, real: bool) -> dict[str, Any]:
    pki_dir = Path(tempfile.mkdtemp(prefix="fapi-bench-pki-"))
    try:
        return await _scenario(count, changes, _real_sidecar_pki(pki_dir) if real else None)
    finally:
        shutil.rmtree(pki_dir, ignore_errors=True)


async def _scenario(count: int, changes: int, pki: dict[str, Any] | None) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    control, child = context.Pipe()
    process = context.Process(target=_sidecars_main, args=(count, pki, child), daemon=True)
    process.start()
    ports: list[int] = await asyncio.get_running_loop().run_in_executor(None, control.recv)
    emulator = CountingEmulator()
    _resources(emulator)
    try:
        async with (
            emulator,
            kmock.Server(emulator) as server,
            aiohttp.ClientSession(headers={POLLER_HEADER: "1"}) as session,
        ):
            emulator.base_url = str(server.url).rstrip("/")
            kube = Kube(emulator.base_url, session)
            for i, port in enumerate(ports):
                await kube.add_node(f"node-{i:03}")
                await kube.add_falco_pod(f"node-{i:03}", port)
            stop, thread = _start_operator(emulator.base_url, pki)
            try:
                started = time.monotonic()
                await kube.apply_rule("r1", RULE.format(shell="bash"))
                first_ready = await _ready(kube, "r1", count, 1, within=120) - started
                times, status_writes, requests, bare = [], [], [], []
                for change in range(changes):
                    await asyncio.sleep(1.0)  # let the previous change's last writes land
                    writes_before = emulator.status_patches("falcorules", "r1")
                    requests_before = sum(emulator.requests_seen.values())
                    shell = f"sh{change}"
                    t0 = time.monotonic()
                    await kube.patch(
                        "/apis/falcoapi.io/v1alpha1/falcorules/r1",
                        {"spec": {"rules": RULE.format(shell=shell)}},
                    )
                    times.append(await _ready(kube, "r1", count, change + 2, within=120) - t0)
                    await asyncio.sleep(1.0)
                    status_writes.append(emulator.status_patches("falcorules", "r1") - writes_before)
                    requests.append(sum(emulator.requests_seen.values()) - requests_before)
                    bare.append(await _bare_fan_out(ports, f"bare{change}", pki))
            finally:
                # Before the emulator goes: the operator's watches would retry against a closed port.
                stop.set()
                await asyncio.to_thread(thread.join, 30)
    finally:
        control.send("stop")
        process.join(30)
        if process.is_alive():
            process.kill()
    return {
        "sidecars": count,
        "first_ready_s": first_ready,
        "change_to_ready_s": times,
        "status_writes_per_change": status_writes,
        "operator_api_requests_per_change": requests,
        "bare_fan_out_s": bare,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.propagation", description=__doc__)
    parser.add_argument("--sidecars", default="1,10,100,500", help="comma-separated (default: %(default)s)")
    parser.add_argument("--changes", type=int, default=3, help="changes timed per size (default: 3)")
    parser.add_argument(
        "--real",
        action="store_true",
        help="real sidecars with Falco doubles (tests/real_sidecar.py) instead of contract doubles",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("kopf").setLevel(logging.ERROR)
    info = machine()
    results = []
    rows = []
    for count in [int(n) for n in args.sidecars.split(",")]:
        print(f"{count} sidecar(s), load {load_average():.2f}", flush=True)
        try:
            result = asyncio.run(scenario(count, args.changes, args.real))
        except (TimeoutError, RuntimeError, OSError) as error:
            print(f"  {count} sidecars: not measured: {error}", flush=True)
            results.append({"sidecars": count, "error": str(error)})
            rows.append([count, "-", "-", "-", "-", "-", "-", f"failed: {error}"])
            continue
        results.append(result)
        change = statistics.median(result["change_to_ready_s"])
        bare = statistics.median(result["bare_fan_out_s"])
        rows.append(
            [
                count,
                result["first_ready_s"],
                change,
                max(result["change_to_ready_s"]),
                bare,
                f"{change / bare:.0f}x" if bare else "-",
                max(result["status_writes_per_change"]),
                statistics.median(result["operator_api_requests_per_change"]),
            ]
        )
    print_table(
        f"rule propagation, seconds ({'real sidecars' if args.real else 'contract-double sidecars'}, "
        f"{args.changes} change(s) each; {info['nproc']} cores, "
        f"load at start {info['load_at_start']}, now {load_average():.2f})",
        [
            "sidecars",
            "first Ready",
            "change->Ready p50",
            "max",
            "bare fan-out",
            "/bare",
            "status writes/change (max)",
            "API requests/change",
        ],
        rows,
    )
    path = save("propagation", {"machine": info, "args": vars(args), "results": results})
    print(f"\nwritten: {path.relative_to(path.parents[2])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
