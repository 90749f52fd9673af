"""A real process killed with SIGKILL in the middle of applies leaves the old or the new set, never a mix."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from falco_api_sidecar.managed import ManagedStore

WRITER = r"""
import sys
from pathlib import Path
from falco_api_sidecar.managed import ManagedStore, RulesetSpec

SETS = json.loads(sys.argv[2])
store = ManagedStore.open(Path(sys.argv[1]))
print("ready", flush=True)
i = 0
while True:
    chosen = SETS[i % len(SETS)]
    store.apply([RulesetSpec(name, content, order) for name, content, order in chosen], [])
    i += 1
"""


def rule_set(tag: str, count: int) -> list[tuple[str, str, int]]:
    return [
        (f"{tag}-{n}", f"- list: {tag.replace('-', '_')}_{n}\n  items: [{tag}, n{n}]\n", n * 10)
        for n in range(count)
    ]


def test_sigkill_during_applies_never_leaves_a_mix(tmp_path: Path) -> None:
    sets = [rule_set("alpha", 4), rule_set("beta", 2), rule_set("gamma", 5)]
    expected = [{name: (content, order) for name, content, order in s} for s in sets]
    expected.append({})  # the empty state before the first apply commits
    root = tmp_path / "managed"
    rng = random.Random(1234)
    seen: set[int] = set()
    for _round in range(8):
        writer = subprocess.Popen(
            [sys.executable, "-c", "import json\n" + WRITER, str(root), json.dumps(sets)],
            stdout=subprocess.PIPE,
        )
        assert writer.stdout is not None and writer.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.02, 0.3))
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
        store = ManagedStore.open(root)
        state = {r.name: (r.content, r.order) for r in store.list_rulesets()}
        assert state in expected, f"a mix after the kill: {sorted(state)}"
        seen.add(expected.index(state))
        on_disk = {p.name: p.read_text() for p in store.rules_dir.iterdir() if p.name[:2].isdigit()}
        assert on_disk == {f"{order:02d}-{name}.yaml": content for name, (content, order) in state.items()}
        # The one file Falco reads names a complete generation.
        live = store.config_file.read_text()
        assert str(store.rules_dir) in live or str(store.rules_dir.relative_to(root)) in live
    # The kills landed at different points of the apply loop, not always before the first commit.
    assert len(seen) >= 2
