"""Scenario 5: time to validate Falco's public stable ruleset, in total and per rule.

Ours: ``falco_api.rules.validate_rules`` over the file (safe YAML loading, every item, every
condition parsed, references resolved). Baseline, same run and interleaved: ``yaml.safe_load`` of
the same text with PyYAML's pure-Python SafeLoader (the loader ours extends), the least anything
that reads the file must do; the C loader's time is shown too when PyYAML has it.

    python -m bench.validation [--repeat 7] [--rules /work/shared/corpus/falco_rules.yaml]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bench.harness import REPO, load_average, machine, median, print_table, save
from falco_api.rules import RulesFile, validate_rules

DEFAULT_RULES = REPO.parent / "shared" / "corpus" / "falco_rules.yaml"


def _time(action: Callable[[], Any]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.validation", description=__doc__)
    parser.add_argument("--rules", type=Path, default=DEFAULT_RULES, help="rules file (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=7, help="interleaved repetitions (default: 7)")
    args = parser.parse_args(argv)
    text = args.rules.read_text()
    items = yaml.safe_load(text) or []
    rules = sum(1 for item in items if isinstance(item, dict) and "rule" in item)
    files = [RulesFile(args.rules.name, text)]
    findings = validate_rules(files)
    errors = [f for f in findings if f.severity == "error"]
    c_loader = getattr(yaml, "CSafeLoader", None)
    timings: dict[str, list[float]] = {"validate_rules": [], "yaml.safe_load": [], "yaml CSafeLoader": []}
    for _ in range(args.repeat):
        timings["yaml.safe_load"].append(_time(lambda: yaml.safe_load(text)))
        if c_loader is not None:
            timings["yaml CSafeLoader"].append(_time(lambda: yaml.load(text, Loader=c_loader)))
        timings["validate_rules"].append(_time(lambda: validate_rules(files)))
    ours = median(timings["validate_rules"])
    rows = []
    for name, values in timings.items():
        if not values:
            continue
        took = median(values)
        rows.append([name, took * 1000, took / rules * 1e6 if rules else 0.0, f"{ours / took:.2f}"])
    info = machine()
    print_table(
        f"validation of {args.rules.name}: {len(items)} items, {rules} rules, {len(errors)} errors found "
        f"(median of {args.repeat}; {info['nproc']} cores, load {info['load_at_start']}, "
        f"now {load_average():.2f})",
        ["what", "total ms", "per rule us", "validate_rules / this"],
        rows,
    )
    path = save(
        "validation",
        {
            "machine": info,
            "args": {"rules": str(args.rules), "repeat": args.repeat},
            "items": len(items),
            "rules": rules,
            "errors_found": len(errors),
            "timings_s": timings,
        },
    )
    print(f"\nwritten: {path.relative_to(path.parents[2])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
