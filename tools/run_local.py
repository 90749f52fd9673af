"""`make run`: a sidecar fed by Falco (or by the Falco double), with alerts shown live.

Starts, as separate processes like in production:
  1. Falco's stand-in, the Falco double, unless a `falco` binary is installed and
     FALCO_API_USE_FALCO=1 (then your Falco must post to the sidecar: see below);
  2. falco-api-sidecar on a unix socket in a temporary folder;
  3. `falco-api events --follow` in the foreground. Ctrl-C stops everything.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
INGEST = "127.0.0.1:2801"
FALCO_WEB = "127.0.0.1:8765"

FALCO_SETTINGS = f"""Add this to your falco.yaml (or a file in /etc/falco/config.d):
  json_output: true
  http_output: {{enabled: true, url: "http://{INGEST}/"}}
  webserver: {{enabled: true, listen_port: 8765}}
"""


def wait_for(path: Path, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.05)
    return False


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    # SIGTERM (e.g. from `timeout`) stops the children too, like Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="falco-api-run-"))
    socket_path = workdir / "falco-api.sock"
    server = f"unix://{socket_path}"
    processes: list[subprocess.Popen[bytes]] = []
    use_falco = shutil.which("falco") is not None and os.environ.get("FALCO_API_USE_FALCO") == "1"
    try:
        if use_falco:
            print(FALCO_SETTINGS, file=sys.stderr)
        else:
            print(
                "No Falco in use here: the Falco double posts alerts instead "
                "(FALCO_API_USE_FALCO=1 uses an installed Falco).",
                file=sys.stderr,
            )
            processes.append(
                subprocess.Popen(
                    [
                        str(BIN / "python"),
                        "-m",
                        "falco_api.testing.falco_double",
                        "--listen",
                        FALCO_WEB,
                        "--post-url",
                        f"http://{INGEST}/",
                        "--rate",
                        "3",
                    ]
                )
            )
        processes.append(
            subprocess.Popen(
                [
                    str(BIN / "falco-api-sidecar"),
                    "--grpc-listen",
                    server,
                    "--ingest-listen",
                    INGEST,
                    "--falco-url",
                    f"http://{FALCO_WEB}",
                    "--metrics-listen",
                    "127.0.0.1:9376",
                    "--log-level",
                    "WARNING",
                ]
            )
        )
        if not wait_for(socket_path, 15):
            print("the sidecar did not start; see its messages above", file=sys.stderr)
            return 1
        subprocess.run([str(BIN / "falco-api"), "--server", server, "version"], check=False)
        print(
            f"Streaming alerts from {server} (Ctrl-C to stop). Metrics: http://127.0.0.1:9376/metrics",
            file=sys.stderr,
        )
        return subprocess.run(
            [str(BIN / "falco-api"), "--server", server, "events", "--follow"], check=False
        ).returncode
    except KeyboardInterrupt:
        return 0
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
