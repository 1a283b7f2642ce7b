"""Faults and concurrency on the real tools: what a team meets running kiln every day finishes, or fails clearly,
and loses nothing already produced."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from kiln.platform.contract import stage_path
from tests.conftest import BIN, copy_run, printed, repo_env, run

pytestmark = [pytest.mark.fault, pytest.mark.slow]  # real runs on the session stack: out of the quick loop


def test_a_second_dvc_repro_in_one_checkout_stops_at_once_and_the_first_finishes(
        reproduced: Path, tmp_path: Path, ray_address: str) -> None:
    repo = copy_run(reproduced, tmp_path / "repo")
    log = tmp_path / "first.log"
    with log.open("w") as out:
        first = subprocess.Popen([str(BIN / "dvc"), "repro", "--force", "--single-item", "tune"], cwd=repo,
                                 env=repo_env(), stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        printed(log, "Running stage 'tune'", first)
        started = time.monotonic()
        second = run([str(BIN / "dvc"), "repro"], cwd=repo, check=False)
        seconds = time.monotonic() - started
        said = second.stderr + second.stdout  # DVC's repo lock, or (while a stage runs) its lock on the stage's paths
        assert second.returncode != 0 and ("Unable to acquire lock" in said or "is being blocked by" in said), said
        assert seconds < 15, f"the second dvc repro took {seconds:.0f} s to give up"
        assert first.wait(timeout=600) == 0, log.read_text()
    finally:
        if first.poll() is None:
            first.kill()
    status = run([str(BIN / "dvc"), "status", "tune"], cwd=repo).stdout
    assert "up to date" in status, f"the first run's outputs are not what dvc.lock records:\n{status}"
    assert (repo / stage_path("tune", "best_config")).is_file()
