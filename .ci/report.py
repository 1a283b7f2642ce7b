"""docs/ci.md: where CI's time goes, measured on a fresh clone of this checkout's HEAD.

    python3 .ci/report.py                # clone HEAD, time `bash .ci/run` there (the whole CI, ~40 min on 2 cores)
    python3 .ci/report.py --from DIR     # the same report from a run that already wrote DIR/timings.jsonl, DIR/wall
    python3 .ci/report.py --installs     # also time pip and uv installing the pinned set from empty caches (~4 min)

Each test's time is split into the expensive fixtures it set up first (tests/conftest.py records them) and its own
setup, call and teardown; each part is grouped by what it pays for. Standard library only: it runs before the venv.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ci.md"
SHOWN_OVER_S = 20  # tests listed one by one
BUDGET_S = 40 * 60  # the whole `.ci/run`, installs included

# What a fixture's set-up pays for, and what a test module's own time pays for.
FIXTURES = {
    "stack": "service stack start-up", "reproduced": "a pipeline run end to end",
    "deployed_run": "a pipeline run end to end", "prefect_env": "server start-up", "server": "server start-up",
    "browser": "server start-up", "stage": "training epochs", "tiny_repo": "repository copies",
}
MODULES = {
    "test_cluster": "a pipeline run end to end", "test_deployment": "a pipeline run end to end",
    "test_pipeline": "a pipeline run end to end", "test_readme": "a pipeline run end to end",
    "test_reliability": "training epochs", "test_train_resume": "training epochs",
    "test_train": "training epochs", "test_tune": "training epochs", "test_tune_node_lost": "training epochs",
    "test_tracking_faults": "training epochs", "test_multitask": "training epochs", "test_compress": "training epochs",
    "test_finetune": "training epochs", "test_stack": "service stack start-up", "test_mlflow_ui": "a browser",
}
OTHER = "the rest (imports, small stages, checks)"

HOW_TO_KEEP = """## How to keep it there

- **Budget.** `.ci/run` stays under 40 minutes on the 2-core machine, installs included; `pytest -m "not slow"` under 3.
  A new end-to-end test gets **60 s** of its own: assert on what a shared fixture already ran, and run only the one
  thing the test is about (a stage, a fault, a flow run). A test that needs more says why in its docstring.
- **Shared fixtures and helpers** (`tests/conftest.py`), paid once per session:
  - `stack`: the service stack (PostgreSQL, SeaweedFS, MLflow and Prefect servers, a Prefect worker, a two-node Ray
    cluster); `ray_address` points every stage at its Ray. Use them instead of a server or a Ray of your own.
  - `reproduced`: the whole DAG through `kiln run` on `TINY_PARAMS` in a temp git copy of the repository (outputs,
    `mlflow.db`, DVC cache and run-cache); `tests/test_pipeline.py` adds one `kiln flow` run and its DVC experiment.
    Assert on it rather than running `dvc repro` again. A test that must change a repository works on
    `copy_run(reproduced, ...)`: DVC there re-runs only what the change makes stale.
  - `prepared`: `TINY_PARAMS`' dataset, prepared once.
  - `LEAN_PARAMS`: `TINY_PARAMS` with two compressions and one fine-tune method, for tests that run the whole
    pipeline to test how it runs (deployments, the cluster path, the README), not what compress or finetune compute.
- **Wait on the event**, never on a clock: `until(...)` and `printed(...)` poll for the thing itself; a fault test
  kills or restarts as soon as the state it needs is there, and runs only as many epochs as that takes.
- **Measure** with `python3 .ci/report.py` after adding slow tests, and commit the new docs/ci.md.
"""


def fresh_run(folder: Path) -> None:
    """Clone HEAD into `folder`/repo and run `bash .ci/run` there, timing it; tests write `folder`/timings.jsonl."""
    repo = folder / "repo"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(repo)], check=True)
    env = {**os.environ, "CI": "true", "KILN_TEST_TIMINGS": str(folder / "timings.jsonl")}
    started = time.time()
    code = subprocess.run(["bash", ".ci/run"], cwd=repo, env=env, stdin=subprocess.DEVNULL).returncode
    (folder / "wall").write_text(json.dumps({"started": started, "ended": time.time(), "exit_code": code}))


def compare_installs(folder: Path) -> None:
    """Time pip (`make setup` before uv) and uv (`make setup` now) installing the pinned set into fresh venvs with
    empty caches, one after the other; writes `folder`/installs.json."""
    seconds = {}
    for tool in ("pip", "uv"):
        work = Path(tempfile.mkdtemp(prefix=f"kiln-install-{tool}-"))
        venv = work / "venv"
        env = {**os.environ, "PIP_CACHE_DIR": str(work / "cache"), "UV_CACHE_DIR": str(work / "cache")}
        pip = f"{venv}/bin/python -m pip install -q"
        command = (f"python3 -m venv {venv} && {pip} --upgrade pip && {pip} -c constraints.txt -e '.[dev,cluster]'"
                   if tool == "pip" else f"make setup VENV={venv}")
        started = time.monotonic()
        with open(folder / f"install-{tool}.log", "w") as log:
            subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, check=True, stdout=log, stderr=log)
        seconds[tool] = round(time.monotonic() - started, 1)
        subprocess.run(["rm", "-rf", str(work)], check=True)
    (folder / "installs.json").write_text(json.dumps(seconds))


def parts(test: dict) -> list[tuple[str, float]]:
    """(what it pays for, seconds) of one test: its expensive fixtures' set-up, then the rest of its time."""
    fixtures = [(FIXTURES.get(name, OTHER), seconds) for name, seconds in test["fixtures"].items() if name in FIXTURES]
    total = test.get("setup", 0) + test.get("call", 0) + test.get("teardown", 0)
    module = test["test"].split("::")[0].removeprefix("tests/").removesuffix(".py")
    return [*fixtures, (MODULES.get(module, OTHER), max(total - sum(seconds for _, seconds in fixtures), 0))]


def cpu() -> str:
    flags = set()
    model = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    shown = [flag for flag in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if flag in flags]
    return f"{os.cpu_count()} cores, {model}, flags: {' '.join(shown)}"


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min ({seconds:.0f} s)"


def installs(folder: Path) -> list[str]:
    """The install comparison's lines, when `--installs` measured one."""
    if not (folder / "installs.json").is_file():
        return []
    seconds = json.loads((folder / "installs.json").read_text())
    return [f"Installing the pinned set from empty caches, one after the other: pip {seconds['pip']:.0f} s, uv "
            f"{seconds['uv']:.0f} s (`make setup`; {seconds['pip'] / seconds['uv']:.1f}x). With uv's cache warm, as on "
            "a CI machine that ran before, the install step above is what `.ci/run` paid.", ""]


def report(folder: Path) -> str:
    """docs/ci.md's text from `folder`'s timings.jsonl and wall."""
    wall = json.loads((folder / "wall").read_text())
    entries = [json.loads(line) for line in (folder / "timings.jsonl").read_text().splitlines()]
    pytest_started = next(entry["session_start"] for entry in entries if "session_start" in entry)
    tests = [entry for entry in entries if "test" in entry]
    total, install = wall["ended"] - wall["started"], pytest_started - wall["started"]
    by_kind: dict[str, float] = defaultdict(float)
    for test in tests:
        for kind, seconds in parts(test):
            by_kind[kind] += seconds
    failed = [test["test"] for test in tests if test["outcome"] == "failed"]
    lines = [
        "# Where CI's time goes", "",
        "Written by `python3 .ci/report.py` from a fresh clone's `bash .ci/run` (see its docstring).", "",
        f"- `.ci/run`: **{minutes(total)}** (budget {BUDGET_S // 60} min), exit code {wall['exit_code']}, "
        f"{len(tests)} tests, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}",
        f"- before pytest's session starts (`make setup data browser postgres`, pytest's imports): {minutes(install)}",
        f"- pytest: {minutes(wall['ended'] - pytest_started)}",
        f"- machine: {cpu()}; measured {time.strftime('%Y-%m-%d', time.gmtime(wall['started']))}", "",
        *installs(folder),
        "## What the time pays for", "", "| what | seconds | share of pytest |", "| --- | --- | --- |",
        *(f"| {kind} | {seconds:.0f} | {seconds / (wall['ended'] - pytest_started):.0%} |"
          for kind, seconds in sorted(by_kind.items(), key=lambda item: -item[1])), "",
        f"## Every test over {SHOWN_OVER_S} s", "",
        "Seconds include set-up and teardown; the fixtures column is what the test set up first for the tests after "
        "it (shared fixtures are paid by the first test that asks).", "",
        "| test | seconds | share of `.ci/run` | pays for | fixtures set up |", "| --- | --- | --- | --- | --- |"]
    for test in sorted(tests, key=lambda test: -sum(seconds for _, seconds in parts(test))):
        seconds = sum(part for _, part in parts(test))
        if seconds >= SHOWN_OVER_S:
            kinds = sorted({kind for kind, part in parts(test) if part >= 1})
            fixtures = ", ".join(f"`{name}` {value:.0f} s" for name, value in test["fixtures"].items() if value >= 5)
            lines.append(f"| `{test['test']}` | {seconds:.0f} | {seconds / total:.1%} | {'; '.join(kinds)} | "
                         f"{fixtures} |")
    return "\n".join([*lines, "", HOW_TO_KEEP])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="folder", type=Path, help="a folder a run already wrote")
    parser.add_argument("--installs", action="store_true", help="also compare pip's and uv's install from scratch")
    args = parser.parse_args()
    folder = args.folder
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="kiln-ci-report-"))
        print(f"ci report: running .ci/run in {folder / 'repo'}", flush=True)
        fresh_run(folder)
    if args.installs:
        compare_installs(folder)
    DOC.write_text(report(folder))
    print(f"ci report: wrote {DOC.relative_to(ROOT)}")
    sys.exit(json.loads((folder / "wall").read_text())["exit_code"])


if __name__ == "__main__":
    main()
