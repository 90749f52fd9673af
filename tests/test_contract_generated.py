"""The committed generated code matches proto/ (regenerate with `make proto`)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_generated_code_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_new_fields_never_reuse_falco_numbers() -> None:
    from falco_api.contract.falco import outputs_pb2, version_pb2

    falco_response = {
        "time": 1,
        "priority": 2,
        "source_deprecated": 3,
        "rule": 4,
        "output": 5,
        "output_fields": 6,
        "hostname": 7,
        "tags": 8,
        "source": 9,
    }
    numbers = {f.name: f.number for f in outputs_pb2.response.DESCRIPTOR.fields}
    assert {name: numbers[name] for name in falco_response} == falco_response
    assert all(number > 9 for name, number in numbers.items() if name not in falco_response)
    falco_version = {
        "version": 1,
        "major": 2,
        "minor": 3,
        "patch": 4,
        "prerelease": 5,
        "build": 6,
        "engine_minor": 7,
        "engine_fields_checksum": 8,
        "engine_major": 9,
        "engine_patch": 10,
        "engine_version": 11,
    }
    numbers = {f.name: f.number for f in version_pb2.response.DESCRIPTOR.fields}
    assert {name: numbers[name] for name in falco_version} == falco_version
    assert all(number > 11 for name, number in numbers.items() if name not in falco_version)
