"""Generate the Python code of the contract in proto/ into core/falco_api/contract/.

The generated code is committed so that a fresh clone works without a build step;
tests/test_contract_generated.py runs this script with --check and fails when
the committed code is stale. grpcio-tools is pinned to the grpcio version in
pyproject.toml so that every machine generates the same bytes.

protoc names Python modules after the .proto paths (``falco/outputs.proto`` ->
``falco.outputs_pb2``). A top-level ``falco`` package would clash with the
legacy ``falco`` client on PyPI, so the imports are rewritten to live under
``falco_api.contract``.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "core" / "falco_api" / "contract"
PACKAGE = "falco_api.contract"

# `from falco.api import x_pb2` and `falco.schema_pb2.priority`, not prose in docstrings.
_MODULE_REFERENCE = re.compile(r"(?<![\w.])falco((?:\.api)?)(?=\.\w+_pb2\b| import )")


def _rewrite(text: str) -> str:
    return _MODULE_REFERENCE.sub(lambda m: f"{PACKAGE}.falco{m.group(1)}", text)


def generate(out_dir: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    # protoc finds the mypy plugins (from mypy-protobuf) on PATH, next to this Python.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for path in out_dir.rglob("*.py*"):
        path.write_text(_rewrite(path.read_text()))
    for package_dir in [out_dir, *[p for p in out_dir.rglob("*") if p.is_dir()]]:
        (package_dir / "__init__.py").touch()


def _differences(a: Path, b: Path) -> list[str]:
    names_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    names_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    differing = [str(n) for n in names_a ^ names_b]
    differing += [str(n) for n in names_a & names_b if not filecmp.cmp(a / n, b / n, shallow=False)]
    return sorted(differing)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "contract"
        fresh.mkdir()
        generate(fresh)
        if options.check:
            stale = _differences(fresh, OUT_DIR)
            if stale:
                print("generated code is stale; run: python tools/gen_proto.py", file=sys.stderr)
                print("\n".join(f"  {name}" for name in stale), file=sys.stderr)
                return 1
            return 0
        shutil.rmtree(OUT_DIR, ignore_errors=True)
        shutil.copytree(fresh, OUT_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
