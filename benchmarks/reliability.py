"""Count kiln's reliability promises: run every test marked `bad_input` or `fault` (bad params, data, flow
parameters and files; killed drivers, workers, flow runs and Ray nodes, a tracking server down, two runs at once) and
tally what they tried and what held.

    python -m benchmarks.reliability                   # ~20 min on 2 CPU cores (the fault tests start the service
                                                       # stack); writes benchmarks/results/reliability.json and
                                                       # docs/reliability.md
    python -m benchmarks.reliability --ledger FILE     # the same figures from a test run that already wrote FILE
                                                       # (`KILN_RELIABILITY_LEDGER=FILE make test`)

A test counts as one case, or as the distinct cases it names (a hypothesis test names every broken params file it
tried). A case holds when its test passed: a bad input was refused in one line naming the key or file, before any
work, touching nothing; a fault was survived or failed clearly, losing nothing. `runs_left_running` and
`outputs_lost` add up what the fault tests measured before asserting on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import typer

from benchmarks.report import machine, measured_code, write_results
from kiln.core.files import atomic_path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
COUNTED = {"bad_input": ("bad_inputs_tried", "bad_inputs_refused_clearly"),
           "fault": ("faults_tried", "faults_survived")}
MEASURED = ("runs_left_running", "outputs_lost")
FIGURES = (*(key for pair in COUNTED.values() for key in pair), *MEASURED)


def run_tests(ledger: Path) -> int:
    """pytest on every `bad_input` and `fault` test, appending their outcomes to `ledger`; its exit code."""
    env = {**os.environ, "KILN_RELIABILITY_LEDGER": str(ledger)}
    return subprocess.run([sys.executable, "-m", "pytest", "-m", "bad_input or fault", "-p", "no:cacheprovider",
                           "tests"], cwd=ROOT, env=env).returncode


def outcomes(ledger: Path) -> dict[str, dict[str, Any]]:
    """Per test: its kind, whether every phase passed, its cases by kind, and what it measured."""
    tests: dict[str, dict[str, Any]] = {}
    for line in ledger.read_text().splitlines():
        entry = json.loads(line)
        test = tests.setdefault(entry["test"], {"kind": entry["kind"], "passed": True, "cases": {}, "measured": {}})
        test["passed"] &= entry["passed"]
        for kind, names in entry["cases"].items():
            test["cases"][kind] = sorted(set(test["cases"].get(kind, [])) | set(names))
        test["measured"].update(entry["measured"])
    return tests


def cases(tests: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every case: its kind, name, test and whether it held (a test without named cases is one case)."""
    rows = []
    for test, outcome in sorted(tests.items()):
        named = outcome["cases"] or {outcome["kind"]: [test.split("::", 1)[1]]}
        rows += [{"kind": kind, "case": name, "test": test, "held": outcome["passed"]}
                 for kind, names in named.items() for name in names]
    return rows


def tally(tests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's figures: cases tried and held per kind, and the measured leftovers of the fault tests."""
    rows = cases(tests)
    figures: dict[str, Any] = {}
    for kind, (tried, held) in COUNTED.items():
        figures[tried] = sum(row["kind"] == kind for row in rows)
        figures[held] = sum(row["kind"] == kind and row["held"] for row in rows)
    for key in MEASURED:
        figures[key] = sum(outcome["measured"].get(key, 0) for outcome in tests.values())
        figures[f"{key}_measured_by"] = sorted(test for test, outcome in tests.items() if key in outcome["measured"])
    figures["failed_tests"] = sorted(test for test, outcome in tests.items() if not outcome["passed"])
    figures["cases"] = rows
    return figures


def write_doc(figures: dict[str, Any]) -> None:
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in figures["cases"]:
        by_kind[row["kind"]].append(row)
    lines = ["# Reliability", "", "Written by `python -m benchmarks.reliability` (see its docstring); every case is a "
             "test marked `bad_input` or `fault`, run in CI.", "", *(f"- `{key}`: {figures[key]}" for key in FIGURES),
             f"- measured on: {figures['machine']}", ""]
    for kind, title in (("bad_input", "Bad inputs"), ("fault", "Faults and concurrency")):
        lines += [f"## {title}", "", "| case | test | outcome |", "| --- | --- | --- |"]
        lines += [f"| {row['case']} | `{row['test']}` | {'held' if row['held'] else '**failed**'} |"
                  for row in by_kind[kind]]
        lines.append("")
    with atomic_path(DOC) as tmp:
        tmp.write_text("\n".join(lines))


def main(ledger: Path | None = None) -> None:
    """Run the reliability tests (or read the `ledger` of a test run) and write the figures and docs/reliability.md."""
    code = measured_code("reliability")
    if ledger is None:
        with tempfile.TemporaryDirectory(prefix="kiln-bench-reliability-") as tmp:
            ledger = Path(tmp) / "ledger.jsonl"
            run_tests(ledger)
            tests = outcomes(ledger)
    else:
        tests = outcomes(ledger)
    figures = {**tally(tests), "machine": machine()}
    for key in FIGURES:
        print(f"bench: {key} {figures[key]}", flush=True)
    write_results("reliability", figures, code)
    write_doc(figures)


if __name__ == "__main__":
    typer.run(main)
