"""The cluster path end to end, on the session's real service stack (Postgres, SeaweedFS S3, MLflow and Prefect
servers, a Prefect worker, two Ray nodes), through the README's cluster blocks run as written: `prefect deployment run
'kiln/cluster'` through a worker whose working directory is not a repository; the run clones the team's repository,
pulls its data from the S3 remote, records a DVC experiment and pushes it back; another machine (a fresh clone) gets
the exact models and predicts with the champion through the MLflow server; a second run that fails after promoting
its version still records its experiment, and that champion rebuilds from its lineage."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from sklearn.datasets import load_digits

from kiln.platform import processes
from tests.conftest import BIN, LEAN_PARAMS, bucket_keys, copy_repo, pg_query, repo_env, run, screen_noise
from tests.test_readme import readme_block, run_block

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(2400)]
EPOCHS = 3  # the README's cluster block's override


def sh(command: str, cwd: Path, env: dict[str, str], timeout: int = 600) -> str:
    result = subprocess.run(shlex.split(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def deployed_run(stack, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The README's `cluster` block, run as written in a copy of the repository on LEAN_PARAMS whose `.kiln/cluster` is
    the session's stack (what `kiln cluster up` starts; the command itself is test_stack's): the team's bare
    repository, the raw data in the S3 remote, the `cluster` deployment and one flow run of it, watched to its end."""
    root = tmp_path_factory.mktemp("team")
    source = copy_repo(root / "source", LEAN_PARAMS)
    (source / ".kiln").mkdir()
    (source / ".kiln" / "cluster").symlink_to(stack.root)
    try:
        output = run_block(readme_block("cluster"), source, repo_env(), root / "cluster-block", timeout=1900)
    except AssertionError as failed:
        worker_log = stack.root / "logs" / "prefect-worker.log"
        raise AssertionError(f"{failed}\nthe worker's log:\n{processes.tail(worker_log, 150)}") from None
    assert "Flow run finished successfully in 'Completed'" in output, output[-4000:]
    git_url = source / ".kiln" / "team.git"
    env = {**repo_env(), **stack.env, "KILN_GIT_URL": str(git_url)}
    refs = sh(f"git ls-remote {git_url} 'refs/exps/*'", root, env).split()
    assert len(refs) == 2, f"one experiment pushed back to the repository: {refs}"
    return {"source": source, "git": git_url, "env": env, "commit": refs[0], "ref": refs[1],
            "name": refs[1].rsplit("/", 1)[-1], "client": MlflowClient(stack.env["MLFLOW_TRACKING_URI"])}


def test_the_run_records_an_experiment_in_git(deployed_run: dict) -> None:
    git, env, commit = deployed_run["git"], deployed_run["env"], deployed_run["commit"]
    params = yaml.safe_load(sh(f"git --git-dir {git} show {commit}:params.yaml", git, env))
    assert params["train"]["epochs"] == EPOCHS
    assert params["train"]["storage_path"] == env["KILN_STORAGE_PATH"]
    lock = yaml.safe_load(sh(f"git --git-dir {git} show {commit}:dvc.lock", git, env))
    assert {"prepare", "tune", "train", "compress", "evaluate"} <= set(lock["stages"])


def test_the_flow_run_prints_each_ray_line_once_and_no_expected_warnings(deployed_run: dict, stack) -> None:
    assert screen_noise((stack.root / "logs" / "prefect-worker.log").read_text()) == []


def test_every_engine_holds_its_part(deployed_run: dict, stack) -> None:
    client, env = deployed_run["client"], stack.env
    experiment = client.get_experiment_by_name(LEAN_PARAMS["tracking"]["experiment"]).experiment_id
    runs = {run.data.tags["kiln.stage"]: run for run in client.search_runs([experiment], max_results=200)}
    assert runs["tune"].data.metrics["nodes"] == 2, "tune trials ran on both Ray nodes"
    assert runs["train"].data.metrics["worker_nodes"] == 2, "the two Ray Train workers ran on both nodes"
    assert pg_query(env, "mlflow", "select count(*) from runs")[0][0] >= len(runs)
    assert pg_query(env, "mlflow", "select count(*) from registered_models where name = 'kiln'")[0][0] == 1
    assert any(key.endswith("model.onnx") for key in bucket_keys(env, env["KILN_MLFLOW_ARTIFACTS"]))
    storage = env["KILN_STORAGE_PATH"]
    prefix = storage.removeprefix("s3://").partition("/")[2]
    runs_in_s3 = {key.removeprefix(prefix).lstrip("/").split("/")[0] for key in bucket_keys(env, storage)}
    assert any(name.startswith("tune-") for name in runs_in_s3), "the Ray Tune experiment in S3"
    # the train run checkpointed to S3, and its checkpoints were removed once it finished (kiln.train.resume.forget)
    assert runs["train"].data.params["storage_path"] == storage
    assert not any(name.startswith("train-") for name in runs_in_s3), runs_in_s3
    version = client.get_model_version_by_alias("kiln", "champion")
    assert version.tags["kiln.experiment_ref"] == deployed_run["ref"]
    assert version.tags["kiln.experiment_commit"] == deployed_run["commit"]


def test_another_machine_gets_the_exact_models_and_predicts(deployed_run: dict, tmp_path: Path) -> None:
    """The README's `cluster-clone` block, as written, then the experiment applied and its champion used."""
    env, name = deployed_run["env"], deployed_run["name"]
    output = run_block(readme_block("cluster-clone"), tmp_path, env, tmp_path / "clone-block", timeout=300)
    assert name in output, f"dvc exp show lists the pulled experiment:\n{output[-4000:]}"
    clone = tmp_path / "kiln-team"
    sh(f"dvc exp apply {name}", clone, env)
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    recorded = next(out["md5"] for out in lock["stages"]["compress"]["outs"] if out["path"] == "models/deployable.onnx")
    assert json.loads(sh("dvc status --cloud --json", clone, env)) == {}, "in sync with the remote"
    assert run(["md5sum", str(clone / "models/deployable.onnx")], cwd=clone).stdout.split()[0] == recorded

    digits = load_digits()
    np.save(tmp_path / "batch.npy", (digits.images[:8] * 255 / 16).round().astype(np.uint8)[:, None])
    keyless = {key: value for key, value in env.items() if not key.startswith("AWS_")}  # artifacts via the server
    sh(f"{BIN / 'kiln'} predict {tmp_path / 'batch.npy'} --output {tmp_path / 'out.csv'} "
       "--model-uri models:/kiln@champion", clone, keyless)
    rows = (tmp_path / "out.csv").read_text().splitlines()
    assert rows[0] == "item,predicted,confidence" and len(rows) == 9


def test_a_run_failing_after_its_promotion_still_records_the_champions_lineage(deployed_run: dict, stack) -> None:
    """The alias `champion` is removed first, as a new registry entry has none, so the run's version is promoted;
    `finetune.base` names a version that does not exist, so the run fails at finetune, after evaluate. Only evaluate
    runs again (`finetune.base` is one of its params); the rest comes from the run-cache the first run pushed."""
    client, git, env = deployed_run["client"], deployed_run["git"], deployed_run["env"]
    client.delete_registered_model_alias("kiln", "champion")
    watched = subprocess.run(
        [str(BIN / "prefect"), "deployment", "run", "kiln/cluster", "--param",
         f"overrides={json.dumps({'train.epochs': EPOCHS, 'finetune.base': '99'})}", "--watch", "--watch-interval",
         "1", "--watch-timeout", "900"], cwd=deployed_run["source"], env=env, capture_output=True, text=True,
        timeout=1000)
    assert "'Failed'" in watched.stdout, watched.stdout[-4000:] + watched.stderr[-4000:]
    worker_log = (stack.root / "logs" / "prefect-worker.log").read_text()
    assert [worker_log.count(f"Running stage '{stage}'") for stage in ("tune", "train", "evaluate")] == [1, 1, 2], \
        "the second run restores tune and train from the run-cache the first one pushed, outputs and all"
    champion = client.get_model_version_by_alias("kiln", "champion")
    assert str(champion.version) == "2", "the failed run's version was promoted"
    tags = champion.tags
    refs = dict(line.split()[::-1] for line in sh(f"git ls-remote {git} 'refs/exps/*'", git, env).splitlines())
    assert refs[tags["kiln.experiment_ref"]] == tags["kiln.experiment_commit"] == tags["kiln.git_commit"]
    lock = yaml.safe_load(sh(f"git --git-dir {git} show {tags['kiln.git_commit']}:dvc.lock", git, env))
    assert "evaluate" in lock["stages"] and "finetune" not in lock["stages"], "what finished, and only that"


def test_the_champion_rebuilds_from_its_lineage(deployed_run: dict, tmp_path: Path) -> None:
    """The README's `reproduce` block, as written, on the failed run's champion (the test before): its experiment's
    commit, data from the S3 remote, every stage."""
    env = {**deployed_run["env"], "TMPDIR": str(tmp_path)}  # the rebuild's temporary workspace
    output = run_block(readme_block("reproduce"), tmp_path, env, tmp_path / "reproduce-block", timeout=1800)
    assert "reproduce: kiln v2 " in output
    verdicts = dict(re.findall(r"^  (prepare|tune|train|compress|evaluate) +(\S+)", output, re.M))
    assert verdicts == {"prepare": "identical", "tune": verdicts["tune"], "train": "identical",
                        "compress": "identical", "evaluate": "identical"}, output[-4000:]
