"""One node for tests: a real in-process sidecar beside a Falco double that loads files like Falco.

What a node holds: a managed root shared by the two, a falco.yaml that lists the base
rules and the managed store's live config file, a Falco double whose reload model
watches those files (inotify, debounce, dry run) and posts ``hot restart failure``
alerts to the sidecar's ingest, and the sidecar itself, writable, confirming every
write with the double.

``restart()`` is a container restart: a new Sidecar on the same ports and the same
managed root (its store recovers from disk) while Falco keeps running. ``stop()``
takes the sidecar down and leaves Falco up.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from falco_api.rules import Finding, RulesFile, validate_rules
from falco_api.testing.falco_double import FalcoDouble
from falco_api.testing.falco_reload import FalcoReloadModel
from falco_api.tls import TlsFiles
from falco_api_sidecar.main import Sidecar, SidecarConfig
from falco_api_sidecar.managed import (
    STATE_MARKER_FILE,
    ConfigSpec,
    ManagedRuleset,
    ManagedStore,
    RulesetSpec,
    WriteResult,
)

BASE_RULES = """\
- macro: spawned_process
  condition: (evt.type in (execve, execveat) and evt.dir=<)
- macro: container
  condition: (container.id != host)
"""


def falco_like_validator(files: Sequence[RulesFile]) -> list[Finding]:
    """What this double's Falco accepts: our validator's verdict, and only the sources it has loaded."""
    findings = [f for f in validate_rules(files) if f.severity == "error"]
    for rules_file in files:
        for item in yaml.safe_load(rules_file.content) or []:
            if isinstance(item, dict) and "rule" in item and item.get("source", "syscall") != "syscall":
                findings.append(
                    Finding(
                        rules_file.name,
                        "rule",
                        str(item["rule"]),
                        0,
                        0,
                        f"Unknown source {item['source']}, skipping",
                        "error",
                    )
                )
    return findings


class RealSidecar:
    """A node: Falco double + writable sidecar on a temporary managed root.

    ``grpc_listen`` is ``"tcp"`` (127.0.0.1 on a free port: how the operator reaches a sidecar
    by pod IP and port) or ``"unix"`` (a socket in the root: local admin, may write).
    Over TCP, ``tls`` gives mutual TLS and ``authz_config`` the roles file naming who may
    write; without ``tls`` the sidecar runs --insecure, where its authorization lets callers
    only read.
    """

    def __init__(
        self,
        node: str = "node-a",
        *,
        grpc_listen: str = "tcp",
        tls: TlsFiles | None = None,
        authz_config: Path | None = None,
        confirm_timeout: float = 5.0,
    ) -> None:
        if grpc_listen not in ("tcp", "unix"):
            raise ValueError(f"grpc_listen must be 'tcp' or 'unix', not {grpc_listen!r}")
        if grpc_listen == "unix" and tls is not None:
            raise ValueError("a unix socket takes no TLS")
        self.node = node
        # Short: AF_UNIX paths are limited to ~107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="fapi-"))
        self.managed = self.root / "managed"
        self.base_rules = self.root / "falco_rules.yaml"
        self.falco_yaml = self.root / "falco.yaml"
        self.base_rules.write_text(BASE_RULES)
        self.falco_yaml.write_text(
            yaml.safe_dump(
                {
                    "rules_files": [str(self.base_rules)],
                    "config_files": [str(self.managed / "falco-api.yaml")],
                    "json_output": True,
                    "priority": "debug",
                }
            )
        )
        # The layout Falco is told about exists before Falco starts, as the chart's init does.
        ManagedStore.open(self.managed)
        # When set, Falco refuses every rules file it has never loaded, with this message
        # (as a Falco without a plugin refuses rules for its source); sets it ran before still
        # load, so a rollback succeeds.
        self.falco_refuses: str | None = None
        self.falco = FalcoDouble(hostname=node)
        self.model = FalcoReloadModel.from_falco_yaml(
            self.falco_yaml, on_alert=self.falco.emit, hostname=node, rules_validator=self._falco_verdict
        )
        self.falco.attach_reload(self.model)
        self._falco_running = False
        self._unix = grpc_listen == "unix"
        self._tls = tls
        self._authz_config = authz_config
        self._confirm_timeout = confirm_timeout
        self._sidecar: Sidecar | None = None
        self.running = False
        self.port = 0
        self._ingest_port = 0
        self.starts = 0
        # Ruleset names of each `apply` the current sidecar process was given, in order.
        self.applies: list[list[str]] = []

    # -- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start Falco (first time only), then the sidecar on the ports it had before, if any."""
        if not self._falco_running:
            await self.falco.start()
            self._falco_running = True
        if self.running:
            return
        sidecar = Sidecar(self._config())
        self.applies = []
        self._record_applies(sidecar)
        await sidecar.start()
        self._sidecar = sidecar
        self.running = True
        self.starts += 1
        if not self._unix:
            self.port = sidecar.grpc_port
        self._ingest_port = sidecar.ingest_port
        self.falco.alert_url = f"http://127.0.0.1:{self._ingest_port}/"

    async def stop(self) -> None:
        """Take the sidecar down (Falco keeps running): its port refuses connections."""
        if self._sidecar is not None and self.running:
            self.running = False
            await self._sidecar.stop()

    async def restart(self) -> None:
        """A container restart: a new process, same ports, same managed root (recovered from disk)."""
        await self.stop()
        await self.start()

    async def close(self) -> None:
        await self.stop()
        if self._falco_running:
            self._falco_running = False
            await self.falco.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def _config(self) -> SidecarConfig:
        return SidecarConfig(
            grpc_listen=self.target,
            tls=self._tls,
            insecure=not self._unix and self._tls is None,
            authz_config=str(self._authz_config) if self._authz_config else None,
            # Falco's http_output.url is fixed configuration: a restarted sidecar listens where it did.
            ingest_listen=f"127.0.0.1:{self._ingest_port}",
            metrics_listen=None,
            falco_url=self.falco.url,
            node_name=self.node,
            managed_root=self.managed,
            falco_config=self.falco_yaml,
            base_rules=(self.base_rules,),
            confirm_timeout=self._confirm_timeout,
            grace=0.5,
        )

    def _record_applies(self, sidecar: Sidecar) -> None:
        # The sidecar's apply call hands the whole state to store.apply; recording there sees
        # every push this process received, including those that change nothing.
        store = sidecar.store
        if store is None:
            return
        apply = store.apply

        def recording_apply(
            rulesets: Sequence[RulesetSpec], configs: Sequence[ConfigSpec], *, dry_run: bool = False
        ) -> WriteResult:
            self.applies.append([r.name for r in rulesets])
            return apply(rulesets, configs, dry_run=dry_run)

        store.apply = recording_apply  # type: ignore[method-assign]

    # -- what the node holds -------------------------------------------------------------------

    @property
    def sidecar(self) -> Sidecar:
        """The current (or last) sidecar process."""
        if self._sidecar is None:
            raise RuntimeError(f"the sidecar of {self.node} was never started")
        return self._sidecar

    @property
    def store(self) -> ManagedStore:
        store = self.sidecar.store
        if store is None:
            raise RuntimeError("the sidecar runs without a managed root")
        return store

    @property
    def target(self) -> str:
        """Where a gRPC client connects."""
        return f"unix://{self.root / 'api.sock'}" if self._unix else f"127.0.0.1:{self.port}"

    def rulesets(self) -> list[ManagedRuleset]:
        """The managed rulesets in Falco's load order, as the sidecar's store holds them."""
        return self.store.list_rulesets()

    @property
    def ruleset_names(self) -> list[str]:
        return [r.name for r in self.rulesets()]

    def falco_loaded_rulesets(self) -> list[str]:
        """Managed ruleset files the Falco double runs now (`NN-name.yaml`), in load order."""
        return [name for name, _ in self._falco_loaded_managed()]

    def in_force(self, *names: str) -> bool:
        """The store holds exactly these rulesets, in this order, and Falco runs exactly their files."""
        rulesets = self.rulesets()
        return [r.name for r in rulesets] == list(names) and self._falco_loaded_managed() == [
            (r.file_name, r.sha256) for r in rulesets
        ]

    def _falco_loaded_managed(self) -> list[tuple[str, str]]:
        managed = str(self.managed) + "/"
        return [
            (Path(path).name, sha)
            for path, sha in self.model.loaded_rules_files().items()
            if path.startswith(managed) and Path(path).name != STATE_MARKER_FILE
        ]

    # -- Falco's verdict -----------------------------------------------------------------------

    def _falco_verdict(self, files: Sequence[RulesFile]) -> list[Finding]:
        findings = falco_like_validator(files)
        if self.falco_refuses is None:
            return findings
        ran_before = {sha for loaded in self.model.load_history for sha in loaded.rules_files.values()}
        for rules_file in files:
            if hashlib.sha256(rules_file.content.encode()).hexdigest() not in ran_before:
                findings.append(Finding(rules_file.name, "file", "", 0, 0, self.falco_refuses, "error"))
        return findings
