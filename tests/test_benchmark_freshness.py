"""Committed benchmark figures describe the code as it is: each benchmarks/results/NAME.json carries the hashes of the
modules and params it measured, and a change to any of them makes this test name the benchmark to re-run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks.report import measured_code
from kiln.platform.codebase import combined_hash

REPO = Path(__file__).resolve().parents[1]
RESULTS = sorted((REPO / "benchmarks" / "results").glob("*.json"))


def stale_files(results: dict, root: Path, name: str) -> list[str]:
    """Files whose hash differs from the one the results recorded (added, removed or edited)."""
    now, then = measured_code(name, root), results.get("code_files", {})
    return sorted(path for path in now.keys() | then.keys() if now.get(path) != then.get(path))


@pytest.mark.parametrize("results_file", RESULTS, ids=lambda path: path.stem)
def test_committed_results_describe_the_current_code(results_file: Path) -> None:
    name = results_file.stem
    assert (REPO / "benchmarks" / f"{name}.py").is_file(), f"{results_file.name} has no benchmark benchmarks/{name}.py"
    results = json.loads(results_file.read_text())
    assert {"commit", "code_hash", "code_files"} <= results.keys(), (
        f"{results_file.name} does not say what code it measured: re-run `python -m benchmarks.{name}`")
    assert results["code_hash"] == combined_hash(results["code_files"]), f"{results_file.name}: code_hash edited"
    changed = stale_files(results, REPO, name)
    assert not changed, (f"{results_file.name} was measured on other code (changed since: {', '.join(changed)}); "
                         f"re-run `python -m benchmarks.{name}` and commit its results")


def test_an_edit_stales_only_the_benchmarks_that_depend_on_it(tmp_path: Path) -> None:
    for folder in ("kiln", "tasks", "benchmarks"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "results"))
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, tmp_path)
    before = {name: measured_code(name, tmp_path) for name in ("tune", "int8_architectures")}
    search = tmp_path / "kiln" / "tune" / "search.py"
    search.write_text(search.read_text().replace('"""', '"""A docstring edit. ', 1) + "\n# a comment\n")
    assert stale_files({"code_files": before["tune"]}, tmp_path, "tune") == []
    search.write_text(search.read_text() + "\nEXTRA = 1\n")
    assert stale_files({"code_files": before["tune"]}, tmp_path, "tune") == ["kiln/tune/search.py"]
    assert stale_files({"code_files": before["int8_architectures"]}, tmp_path, "int8_architectures") == []
    params = tmp_path / "params.yaml"
    params.write_text(params.read_text() + "\n# a comment\n")
    assert stale_files({"code_files": before["tune"]}, tmp_path, "tune") == ["kiln/tune/search.py"]
    params.write_text(params.read_text().replace("calibration_samples: 512", "calibration_samples: 256"))
    assert stale_files({"code_files": before["tune"]}, tmp_path, "tune") == ["kiln/tune/search.py"]
    params.write_text(params.read_text().replace("seed: 42", "seed: 43", 1))
    assert stale_files({"code_files": before["tune"]}, tmp_path, "tune") == ["kiln/tune/search.py",
                                                                              "params.yaml:prepare"]
    assert stale_files({"code_files": before["int8_architectures"]}, tmp_path, "int8_architectures") == []
