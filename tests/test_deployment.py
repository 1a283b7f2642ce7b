"""`prefect deployment run 'kiln/local'` against a real local Prefect server and process worker."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import psutil
import pytest

from tests.conftest import BIN, LEAN_PARAMS, alive, copy_repo, free_port, record_cases, repo_env, run, stop, until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # a killed flow run, its rerun, two restored: ~4 min
EPOCHS = 12  # long enough to kill the flow run while its train stage runs (~20 s after epoch 2)


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory: pytest.TempPathFactory, ray_address: str) -> Iterator[dict[str, str]]:
    """A `prefect server start` on 127.0.0.1 with its own home; yields the environment that talks to it."""
    port = free_port()
    env = {**repo_env(), "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-home")),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def healthy() -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
            return True
        except OSError:
            return False

    try:
        until(healthy, 120, "prefect server did not become healthy within 120 s", server, every=1)
    except BaseException:
        server.kill()
        raise
    yield env
    stop(server)


def send(repo: Path, env: dict[str, str], overrides: dict, watch: bool) -> str:
    """`prefect deployment run 'kiln/local'` with `overrides`, watched to its end or not; returns the flow run id."""
    watching = ["--watch", "--watch-interval", "1", "--watch-timeout", "1200"] if watch else []
    sent = subprocess.run([str(BIN / "prefect"), "deployment", "run", "kiln/local", "--param",
                           f"overrides={json.dumps(overrides)}", *watching],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=1300)
    return re.search(r"UUID: ([0-9a-f-]{36})", sent.stdout).group(1)


def flow_run(env: dict[str, str], run_id: str) -> dict:
    with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/flow_runs/{run_id}", timeout=10) as response:
        return json.loads(response.read())


def interval(run: dict) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(run["start_time"]), datetime.fromisoformat(run["end_time"])


def experiment_of(run: dict) -> str:
    """The DVC experiment a flow run records: named after the flow run (flows/pipeline.py)."""
    return f"{run['name']}-{run['id'][:8]}"


def refused_quickly_naming_the_key(repo: Path, env: dict[str, str]) -> None:
    """A bad override sent through `prefect deployment run` fails the flow run within 5 s of its start, its state
    message naming the key; params.yaml stays as it was."""
    params = (repo / "params.yaml").read_bytes()
    refused = flow_run(env, send(repo, env, {"train.lr": -1}, watch=True))
    assert refused["state"]["type"] == "FAILED", refused["state"]
    assert "train.lr" in refused["state"]["message"], refused["state"]["message"]
    started, ended = interval(refused)
    assert (ended - started).total_seconds() < 5, f"failed {ended - started} after the flow started"
    assert (repo / "params.yaml").read_bytes() == params


def stage_statuses(repo: Path, env: dict[str, str], run_id: str) -> dict[str, str]:
    """What each stage did in flow run `run_id`, from the run report it published (flows/pipeline.py)."""
    inspected = subprocess.run([str(BIN / "prefect"), "artifact", "inspect", "kiln-run-report", "--output", "json"],
                               cwd=repo, env=env, capture_output=True, text=True, timeout=60, check=True)
    (report,) = [item["data"] for item in json.loads(inspected.stdout) if item["flow_run_id"] == run_id]
    return {row[0]: row[1] for line in report.splitlines()[2:] if len(row := [cell.strip() for cell in
                                                                            line.strip("|").split("|")]) > 1}


def killed_while_training_then_sent_again(repo: Path, env: dict[str, str], worker_log: Path) -> dict:
    """SIGKILL a flow run's process while its train stage runs: the run shows as crashed, nothing it started runs
    on, DVC's locks are free, and sending the same run again redoes only the stages that had not finished; returns
    that run, completed."""
    overrides = {"train.epochs": EPOCHS}
    run_id = send(repo, env, overrides, watch=False)

    def training() -> bool:
        assert flow_run(env, run_id)["state"]["type"] in ("SCHEDULED", "PENDING", "RUNNING"), worker_log.read_text()
        return f"train: epoch 2/{EPOCHS}" in worker_log.read_text()

    until(training, 600, "the train stage did not start within 600 s")
    flow_process = psutil.Process(int(flow_run(env, run_id)["infrastructure_pid"]))
    started = flow_process.children(recursive=True)
    assert any("tasks" in process.cmdline() and "train" in process.cmdline() for process in started)
    workspace = next(Path(process.cwd()) for process in started if "repro" in process.cmdline())
    flow_process.kill()
    until(lambda: flow_run(env, run_id)["state"]["type"] == "CRASHED", 60,
          lambda: f"killed flow run is {flow_run(env, run_id)['state']['type']}, not CRASHED", every=1)

    def orphans() -> list[str]:
        return [" ".join(process.cmdline()) for process in started if alive(process.pid)]

    until(lambda: not orphans(), 30, lambda: f"still running 30 s after their flow run was killed: {orphans()}")
    run(["dvc", "repro", "--single-item", "prepare"], cwd=workspace)  # DVC's locks went with the killed run
    again = flow_run(env, send(repo, env, overrides, watch=True))
    assert again["state"]["type"] == "COMPLETED", worker_log.read_text()[-8000:]
    statuses = stage_statuses(repo, env, again["id"])
    assert [statuses[stage] for stage in ("prepare", "tune", "train")] == ["restored", "restored", "ran"], statuses
    return again


@pytest.mark.fault
def test_deployment_runs_the_pipeline_on_a_worker(prefect_env: dict[str, str], tmp_path: Path, ray_address: str,
                                                  request: pytest.FixtureRequest) -> None:
    """A bad override is refused; a run killed mid-train crashes cleanly and its rerun redoes only what had not
    finished, to the end; then two runs sent at once queue on the deployment's concurrency limit (one checkout, one DVC
    cache and MLflow store) instead of interleaving, and each records what the run alone did."""
    record_cases(request.node, "flow parameter overrides {'train.lr': -1} through prefect deployment run",
                 kind="bad_input")
    record_cases(request.node, "two prefect deployment runs at once", "a flow run SIGKILLed mid-train under a worker")
    (tmp_path / "repo").mkdir()
    repo = copy_repo(tmp_path / "repo", LEAN_PARAMS)
    env = {**prefect_env, "PWD": str(repo)}

    def prefect(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
        result = subprocess.run([str(BIN / "prefect"), *args], cwd=repo, env=env, capture_output=True, text=True,
                                timeout=timeout)
        assert result.returncode == 0, f"prefect {args} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        return result

    prefect("work-pool", "create", "local", "--type", "process")
    prefect("--no-prompt", "deploy", "--name", "local")
    worker_log = tmp_path / "worker.log"
    with open(worker_log, "w") as log:
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "local"], cwd=repo,
                                  env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2"},  # polls every 2 s, not 10
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        refused_quickly_naming_the_key(repo, env)
        first = killed_while_training_then_sent_again(repo, env, worker_log)
        pair = [send(repo, env, {"train.epochs": EPOCHS}, watch=False) for _ in range(2)]
        until(lambda: all(flow_run(env, run_id)["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
                          for run_id in pair), 900, "two queued runs did not finish within 900 s", every=1)
        pair_runs = [flow_run(env, run_id) for run_id in pair]
    finally:
        stop(worker)
    assert [run["state"]["type"] for run in pair_runs] == ["COMPLETED", "COMPLETED"], worker_log.read_text()[-8000:]
    (a_start, a_end), (b_start, b_end) = sorted(interval(run) for run in pair_runs)
    assert a_end <= b_start, "two runs of the local deployment overlapped in one checkout"
    assert run(["git", "status", "--porcelain"], cwd=repo).stdout == "", "the deployment's checkout is not edited"
    locks = {}
    for recorded in (first, *pair_runs):
        run(["dvc", "exp", "apply", experiment_of(recorded)], cwd=repo)  # the run's outputs, from the shared cache
        locks[recorded["id"]] = (repo / "dvc.lock").read_text()
    assert len(set(locks.values())) == 1, "a queued run recorded other outputs than the run alone"
    assert (repo / "models/model_int8.onnx").is_file()
    assert json.loads((repo / "reports/train/metrics.json").read_text())["epoch"] == EPOCHS
    assert "up to date" in run(["dvc", "status"], cwd=repo).stdout
    top = json.loads(prefect("artifact", "inspect", "kiln-top-trials", "--output", "json").stdout)[0]
    rows = json.loads(top["data"])
    assert len(rows) == LEAN_PARAMS["tune"]["num_samples"] and {"lr", "val_accuracy", "state"} <= set(rows[0])
