"""buf checks of the contract: lint, and wire compatibility with Falco 0.43's own protos."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

BUF = REPO_ROOT / "tools" / "buf" / "node_modules" / ".bin" / "buf"

pytestmark = pytest.mark.skipif(
    not BUF.exists(), reason="buf is not installed: `make test` installs it (npm ci --prefix tools/buf)"
)


def run_buf(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BUF), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_buf_lint() -> None:
    result = run_buf("lint", cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def _modules(tmp_path: Path) -> tuple[Path, Path]:
    ours, falcos = tmp_path / "ours", tmp_path / "falco-0.43"
    shutil.copytree(REPO_ROOT / "proto", ours)
    shutil.copytree(REPO_ROOT / "tests" / "legacy_proto", falcos)
    (ours / "buf.yaml").write_text("version: v2\nbreaking:\n  use: [WIRE]\n")
    (falcos / "buf.yaml").write_text("version: v2\n")
    return ours, falcos


def test_wire_compatible_with_falco_043(tmp_path: Path) -> None:
    ours, falcos = _modules(tmp_path)
    result = run_buf("breaking", ours.name, "--against", falcos.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compatibility_check_catches_a_break(tmp_path: Path) -> None:
    ours, falcos = _modules(tmp_path)
    outputs = ours / "falco" / "outputs.proto"
    outputs.write_text(outputs.read_text().replace("string rule = 4;", "int32 rule = 4;"))
    result = run_buf("breaking", ours.name, "--against", falcos.name, cwd=tmp_path)
    assert result.returncode != 0 and '"rule"' in result.stdout
