"""`falco-api rules` and `falco-api config` against a real writable sidecar, with its audit lines."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from falco_api.cli_manage import ManageUsageError, settings_from_pairs
from tests.real_sidecar import RealSidecar
from tests.test_writes import MORE_SHELLS, SHELLS


@pytest.fixture
async def node() -> AsyncIterator[RealSidecar]:
    sidecar = RealSidecar("node-a", grpc_listen="unix")
    await sidecar.start()
    yield sidecar
    await sidecar.close()


async def cli(node: RealSidecar, *argv: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "falco_api.cli",
        "--server",
        node.target,
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_rules_and_config_commands(
    node: RealSidecar, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="falco_api.audit")
    shells, more = tmp_path / "shells.yaml", tmp_path / "more-shells.yaml"
    shells.write_text(SHELLS)
    more.write_text(MORE_SHELLS)

    code, out, err = await cli(node, "rules", "apply", "-f", str(shells), "--order", "10")
    assert (code, out) == (0, "ruleset shells v1: loaded by Falco\n"), err
    code, out, err = await cli(
        node, "rules", "apply", "-f", str(more), "--order", "20", "--expected-version", "0"
    )
    assert code == 0 and "loaded by Falco" in out, err
    code, out, _ = await cli(node, "rules", "list")
    assert out.splitlines() == [
        "10 shells                           v1    loaded",
        "20 more-shells                      v1    loaded",
    ]
    code, out, _ = await cli(node, "rules", "get", "more-shells")
    assert code == 0 and out == MORE_SHELLS

    code, out, err = await cli(node, "rules", "apply", "-f", str(more), "--expected-version", "7")
    assert code == 1 and "FAILED_PRECONDITION" in err and "expected version 7" in err

    code, out, err = await cli(node, "config", "set", "tuning", "priority=warning", "outputs.rate=5")
    assert code == 0 and "loaded by Falco" in out, err
    code, out, _ = await cli(node, "config", "get", "-o", "json")
    document = json.loads(out)
    assert document["effective"]["priority"] == "warning" and document["dropins"][0]["name"] == "tuning"
    code, out, err = await cli(node, "config", "set", "hijack", "webserver.enabled=false")
    assert code == 1 and "INVALID_ARGUMENT" in err and "webserver" in err

    code, out, err = await cli(node, "rules", "delete", "more-shells")
    assert code == 0 and "deleted: loaded by Falco" in out, err
    code, out, err = await cli(node, "config", "unset", "tuning")
    assert code == 0, err

    audit = [json.loads(r.getMessage()) for r in caplog.records if r.name == "falco_api.audit"]
    actions = [(line["action"], line["target"]) for line in audit]
    assert ("put_rule", "shells") in actions and ("delete_rule", "more-shells") in actions
    assert ("put_config", "tuning") in actions and ("delete_config", "tuning") in actions
    refused = [line for line in audit if line["target"] == "hijack"]
    assert refused and refused[0]["result"].startswith("refused")
    assert all(SHELLS not in json.dumps(line) for line in audit)  # never rule content


def test_settings_from_pairs() -> None:
    assert settings_from_pairs(["a.b=1", "a.c=x", "d=[1, 2]", "e="]) == {
        "a": {"b": 1, "c": "x"},
        "d": [1, 2],
        "e": "",
    }
    for bad in (["nokey"], ["=1"], ["a..b=1"], ["a=1", "a.b=2"]):
        with pytest.raises(ManageUsageError):
            settings_from_pairs(bad)
