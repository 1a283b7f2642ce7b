"""The README's own shell blocks, read from README.md at test time and run as a reader types them.

A block is marked for this test by `<!-- readme-test: NAME -->` on the line before its fence. Each runs in a temp git
copy of the repository on LEAN_PARAMS, with this session's venv first on PATH (as `. .venv/bin/activate` puts it; no
other venv is built), a PREFECT_HOME of its own and a free port for the Prefect server. `make run` is left out (its
`make setup` would build a venv in the copy, and it is the long run); the cluster section's blocks run in
tests/test_cluster.py, on the session's stack. Every process a block starts carries a marker in its environment, so a
block fails if anything it started outlives it, and whatever did is stopped.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from kiln.core.params import apply_overrides
from kiln.platform import processes
from tests.conftest import LEAN_PARAMS, REPO, copy_repo, free_port, repo_env

BLOCK = re.compile(r"^<!-- readme-test: (?P<name>[\w-]+) -->\n```(?:bash|sh)\n(?P<body>.*?)^```", re.M | re.S)

# A block runs as a reader's terminal runs it, except that it stops at the first failing command: with job control
# (`set -m`), a background job gets a process group of its own and keeps SIGINT, which a script's background jobs
# ignore (`prefect worker` stops on SIGTERM by raising SIGINT in itself).
SHELL, JOB_CONTROL = ["bash", "-e", "-o", "pipefail", "-x", "-c"], "set -m\n"


def readme_block(name: str, text: str | None = None) -> str:
    """The shell block marked `<!-- readme-test: NAME -->` in README.md (or in `text`)."""
    text = (REPO / "README.md").read_text() if text is None else text
    blocks = {match["name"]: match["body"] for match in BLOCK.finditer(text)}
    if name not in blocks:
        raise LookupError(f"README.md has no ```bash block right after <!-- readme-test: {name} -->")
    return blocks[name]


def command_line(pid: int) -> str:
    """How `pid` was started, for the failure message."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return f"pid {pid} (gone)"


def run_block(script: str, cwd: Path, env: dict[str, str], folder: Path, timeout: float, grace: float = 30) -> str:
    """Run `script` in `cwd` and return its output (kept in folder/output.log). Fail, showing the output, if a command
    fails, it runs past `timeout` seconds, or a process it started is alive `grace` seconds after it ends; whatever it
    started is stopped in any case."""
    folder.mkdir(parents=True)
    log = folder / "output.log"
    marked = {**env, processes.MARKER: str(folder)}  # inherited by every process the block starts, however deep
    try:
        with open(log, "w") as out:  # a file, not a pipe: a leftover process cannot hold the test up
            code = subprocess.run([*SHELL, JOB_CONTROL + script], cwd=cwd, env=marked, stdin=subprocess.DEVNULL,
                                  stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
        assert code == 0, f"the block exited {code} in {cwd}:\n{processes.tail(log, 80)}"
        deadline = time.monotonic() + grace
        while (alive := processes.marked(folder)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not alive, f"the block left processes running: {[command_line(pid) for pid in alive]}"
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the block ran past {timeout} s in {cwd}:\n{processes.tail(log, 80)}") from None
    finally:
        processes.sweep(folder)
    return log.read_text()


def test_a_missing_marker_is_an_error_naming_it() -> None:
    with pytest.raises(LookupError, match="readme-test: deployment"):
        readme_block("deployment", "<!-- readme-test: other -->\n```bash\ntrue\n```\n")
    with pytest.raises(LookupError, match="readme-test: loose"):  # a marker not followed by its fence
        readme_block("loose", "<!-- readme-test: loose -->\n\nprose\n```bash\ntrue\n```\n")


def test_a_failing_command_or_a_leftover_process_fails_the_block(tmp_path: Path) -> None:
    text = "<!-- readme-test: broken -->\n```bash\necho first\nfalse\necho never\n```\n"
    with pytest.raises(AssertionError, match="exited 1") as failed:
        run_block(readme_block("broken", text), tmp_path, repo_env(), tmp_path / "broken", timeout=30)
    assert "first" in str(failed.value) and "never" not in (tmp_path / "broken/output.log").read_text()
    with pytest.raises(AssertionError, match="left processes running: .*sleep 300"):
        run_block("sleep 300 &\n", tmp_path, repo_env(), tmp_path / "leak", timeout=30, grace=1)
    assert not processes.marked(tmp_path / "leak"), "the leftover is stopped"


def write_predict_inputs(repo: Path, count: int = 5) -> None:
    """What the README's predict block reads: a folder of PNG images and an (N, 1, 8, 8) uint8 .npy of digits."""
    images = (load_digits().images[:count] * 255 / 16).astype(np.uint8)
    (repo / "images").mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image).save(repo / "images" / f"{index}.png")
    np.save(repo / "batch.npy", images[:, None])


@pytest.mark.slow
def test_the_readme_blocks_run_as_written(tmp_path: Path, ray_address: str) -> None:
    """In README order: a knob set (`dvc exp run -S` runs the DAG; `kiln flow -S` and the deployment's runs restore
    it from the run-cache), batch inference with the model it registered, then the deployment walk-through on
    a Prefect server and worker of its own, stopped by the block's own `kill`."""
    (tmp_path / "repo").mkdir()
    # params.yaml holds the README's knob (train.epochs=12) already: the one DAG run (`dvc exp run -S`) is what the
    # deployment's default run, and every run after it, restores from the run-cache
    repo = copy_repo(tmp_path / "repo", apply_overrides(LEAN_PARAMS, {"train.epochs": 12}))
    env = {key: value for key, value in repo_env().items() if not key.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_API_PORT=str(free_port()),
               PREFECT_WORKER_QUERY_SECONDS="2", PYTHONUNBUFFERED="1")  # the worker polls every 2 s, not 10

    run_block(readme_block("knob"), repo, env, tmp_path / "knob", timeout=600)

    write_predict_inputs(repo)
    output = run_block(readme_block("predict"), repo, env, tmp_path / "predict", timeout=120)
    assert "predict: 5 items from images" in output and "predict: 5 items from batch.npy" in output
    assert len((repo / "predictions.csv").read_text().splitlines()) == 1 + 5

    output = run_block(readme_block("deployment"), repo, env, tmp_path / "deployment", timeout=600)
    assert output.count("Flow run finished successfully in 'Completed'") == 2, output[-4000:]
    experiments = subprocess.run(["dvc", "exp", "list", "--name-only"], cwd=repo, env=env, capture_output=True,
                                 text=True).stdout.split()
    assert len(experiments) == 4, f"dvc exp run, kiln flow and the two deployment runs: {experiments}"
