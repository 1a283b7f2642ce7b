"""Where benchmarks put their figures: benchmarks/results/NAME.json and a section of docs/benchmarks.md."""

from __future__ import annotations

import ast
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch
import yaml

from kiln.core.files import atomic_path, write_json
from kiln.core.tracking import git_commit
from kiln.platform.codebase import closure, combined_hash, data_digest, file_hashes, stage_files

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")  # what ORT's kernels pick from


def machine() -> str:
    """The CPU model, core count and the vector/matrix extensions that decide which kernels ONNX Runtime and torch
    use (int8 pays very differently with and without VNNI/AMX)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = next((set(line.split(":", 1)[1].split()) for line in info.splitlines() if line.startswith("flags")), set())
    present = [flag for flag in CPU_FLAGS if flag in flags]
    return (f"{os.cpu_count()} CPU cores, {model}, flags: {' '.join(present) or 'none of ' + ', '.join(CPU_FLAGS)}; "
            f"torch {torch.__version__}, onnxruntime {ort.__version__}")


def stages_run(benchmark: Path) -> set[str]:
    """The stages a benchmark runs through `run_stage("STAGE", ...)` (as subprocesses, so not among its imports)."""
    return {node.args[0].value for node in ast.walk(ast.parse(benchmark.read_text()))
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run_stage"
            and node.args and isinstance(node.args[0], ast.Constant)}


def upstream(stages: set[str], root: Path) -> set[str]:
    """`stages` and every stage whose outputs they depend on, transitively, as dvc.yaml wires them."""
    pipeline = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    producer = {str(out if isinstance(out, str) else next(iter(out))): name
                for name, stage in pipeline.items() for out in stage.get("outs", [])}
    found, todo = set(), list(stages)
    while todo:
        stage = todo.pop()
        if stage not in found:
            found.add(stage)
            todo.extend(producer[dep] for dep in pipeline[stage].get("deps", []) if dep in producer)
    return found


def params_hashes(stages: set[str], root: Path) -> dict[str, str]:
    """A hash per params.yaml section that `stages` or the stages upstream of them read (dvc.yaml's `params`, a
    dotted key counting as its whole section), keyed `params.yaml:SECTION`."""
    pipeline = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    sections = {key.split(".")[0] for stage in upstream(stages, root) for key in pipeline[stage].get("params", [])}
    params = yaml.safe_load((root / "params.yaml").read_text())
    return {f"params.yaml:{section}": data_digest(params[section]) for section in sections}


def measured_code(name: str, root: Path = ROOT) -> dict[str, str]:
    """Hashes of what benchmark `name`'s figures depend on: the project modules it imports, those of the stages it
    runs, and the params.yaml sections those stages and their upstream stages read (their stock values)."""
    benchmark = root / "benchmarks" / f"{name}.py"
    stages = stages_run(benchmark)
    files = closure([benchmark], root).union(*(stage_files(stage, root) for stage in stages))
    return {**file_hashes(files, root), **params_hashes(stages, root)}


def write_results(name: str, results: dict[str, Any], code: dict[str, str]) -> None:
    """Write benchmarks/results/NAME.json, stamped with the commit and the hashes of the code it measured (`code`,
    taken from `measured_code(name)` when the benchmark started, so edits made while it ran make it stale)."""
    stamp = {"commit": git_commit(), "code_hash": combined_hash(code), "code_files": code}
    write_json(ROOT / "benchmarks" / "results" / f"{name}.json", {**results, **stamp})


def write_section(name: str, command: str, setup: str, header: Sequence[str], rows: Sequence[Sequence[Any]],
                  verdict: str) -> None:
    """Replace (or append) the `name` section of docs/benchmarks.md with a markdown table."""
    table = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    table += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    body = "\n".join([f"<!-- {name}:start -->", f"## {name}", "", f"`{command}`", "", setup + ".", "", *table, "",
                      verdict, f"<!-- {name}:end -->"])
    text = DOC.read_text() if DOC.is_file() else "# Benchmarks\n\nMeasured on this project's 2-core CI machine class.\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start in text:
        text = text[: text.index(start)] + body + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    with atomic_path(DOC) as tmp:
        tmp.write_text(text)
