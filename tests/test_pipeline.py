"""End to end on the real tools: `dvc repro`, its no-op re-run, MLflow runs and registry, the Prefect flow."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import BIN, LEAN_OVERRIDES, STAGES, TINY_PARAMS, repo_env, run, screen_noise

pytestmark = pytest.mark.slow
TINY_EPOCHS = TINY_PARAMS["train"]["epochs"]


def client_for(repo: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def metrics(repo: Path, stage: str) -> dict:
    return json.loads((repo / "reports" / stage / "metrics.json").read_text())


def test_every_stage_writes_its_outputs(reproduced: Path) -> None:
    manifest = json.loads((reproduced / "data/prepared/manifest.json").read_text())
    assert manifest["dataset"] == "digits"
    assert sum(split["count"] for split in manifest["splits"].values()) == 1797
    best = json.loads((reproduced / "models/best_config.json").read_text())
    assert 0.02 <= best["hyperparameters"]["lr"] <= 0.1
    history = (reproduced / "reports/train/history.csv").read_text().splitlines()
    assert len(history) == 1 + TINY_EPOCHS
    assert metrics(reproduced, "train")["val_accuracy"] > 0.8
    for name in ("model.pt", "model_fp32.onnx", "model_int8.onnx"):
        assert (reproduced / "models" / name).stat().st_size > 0
    compress = metrics(reproduced, "compress")
    assert compress["int8_size_ratio"] > 1
    evaluate = metrics(reproduced, "evaluate")
    assert evaluate["test_accuracy"] > 0.8
    assert abs(evaluate["test_accuracy"] - evaluate["fp32_test_accuracy"]) < 0.05  # a 2-point val budget, 360 images
    assert (reproduced / "reports/evaluate/confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


def run_count(repo: Path) -> int:
    client = client_for(repo)
    return len(client.search_runs([client.get_experiment_by_name("kiln").experiment_id], max_results=1000))


def test_the_run_ends_with_a_one_screen_summary(reproduced: Path) -> None:
    output = (reproduced.parent / "kiln-run.log").read_text()
    summary = output[output.rindex("kiln: stages"):].splitlines()
    assert len(summary) <= 24 and max(map(len, summary)) <= 120, "one screen"
    for stage in STAGES:
        assert re.search(rf"^  {stage} +ran +(\d+ min )?\d+ s$", "\n".join(summary), re.M), stage
    text = "\n".join(summary)
    assert re.search(r"^  evaluate +test_accuracy 0\.\d{4} \(fp32 0\.\d{4}\)", text, re.M)
    assert re.search(r"^  compress +deployable \w+", text, re.M)
    assert re.search(r"^  explanations +deletion-curve area, random pixels 0\.\d\d: .*lime 0\.\d\d$", text, re.M)
    assert re.search(r"^  registry +kiln v1 is challenger, promoted to champion: no champion yet", text, re.M)
    assert "mlflow ui" in text and "dvc plots show" in text
    trial_lines = [line for line in output.splitlines() if line.startswith("tune: trial ")]
    assert len(trial_lines) == TINY_PARAMS["tune"]["num_samples"] and "Trial status" not in output
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], cwd=reproduced).stdout)
    columns = {key for files in metrics[""]["data"].values() for key in files["data"]}
    assert len(columns) <= 32, f"dvc metrics show stays readable: {len(columns)} columns"
    plots = json.loads(run(["dvc", "plots", "show", "--json"], cwd=reproduced).stdout)["data"]
    assert plots and all(len(rendered) == 1 for rendered in plots.values()), "dvc plots show draws each plot once"


def test_screen_noise_finds_a_line_ray_forwarded_twice_and_hash_warnings() -> None:
    twice = "(RayTrainWorker pid=7, ip=127.0.0.1) train: epoch 1/6"
    output = f"12:00:01 | {twice}\n12:00:02 | {twice}\n(pid=8) other\nWARNING: No file hash info found for 'x'\n"
    assert screen_noise(output) == [f"2 times: {twice}", "WARNING: No file hash info found for 'x'"]
    assert screen_noise("(pid=8) once\n(pid=9) once\n") == []


def test_the_run_prints_each_ray_line_once_and_no_expected_warnings(reproduced: Path) -> None:
    assert screen_noise((reproduced.parent / "kiln-run.log").read_text()) == []


def test_second_repro_runs_nothing(reproduced: Path) -> None:
    runs_before = run_count(reproduced)
    result = run(["dvc", "repro"], cwd=reproduced)
    assert "Running stage" not in result.stdout
    for stage in STAGES:
        assert f"'{stage}' didn't change, skipping" in result.stdout
    assert "up to date" in run(["dvc", "status"], cwd=reproduced).stdout
    assert run_count(reproduced) == runs_before


def test_mlflow_records_every_stage(reproduced: Path) -> None:
    client = client_for(reproduced)
    experiment = client.get_experiment_by_name("kiln")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    by_stage: dict[str, list] = {}
    for r in runs:
        by_stage.setdefault(r.data.tags["kiln.stage"], []).append(r)
    parent = by_stage["tune"][0]
    children = by_stage["tune-trial"]
    assert len(children) == TINY_PARAMS["tune"]["num_samples"]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    train = by_stage["train"][0]
    curve = client.get_metric_history(train.info.run_id, "val_accuracy")
    assert [m.step for m in curve] == list(range(1, TINY_EPOCHS + 1))
    for r in runs:
        if r.data.tags["kiln.stage"] != "tune-trial":
            assert r.data.tags["kiln.git_commit"] not in ("", "unknown")
            assert r.data.tags["kiln.data_hash"]
            assert len(r.data.tags["kiln.params_hash"]) == 64


def test_first_version_is_champion_and_challenger(reproduced: Path) -> None:
    client = client_for(reproduced)
    champion = client.get_model_version_by_alias("kiln", "champion")
    challenger = client.get_model_version_by_alias("kiln", "challenger")
    assert str(champion.version) == str(challenger.version) == "1"
    train_run = client.search_runs([client.get_experiment_by_name("kiln").experiment_id],
                                   "tags.`kiln.stage` = 'train'")[0]
    assert champion.tags["kiln.train_run_id"] == train_run.info.run_id
    assert {"kiln.git_commit", "kiln.data_hash", "kiln.params_hash", "kiln.tune_run_id"} <= set(champion.tags)


def test_kiln_run_records_a_local_experiment_on_every_version_it_registers(reproduced: Path) -> None:
    client = client_for(reproduced)
    names = set()
    for model in ("kiln", TINY_PARAMS["finetune"]["registered_model"]):
        tags = client.get_model_version(model, "1").tags
        names.add(tags["kiln.experiment"])
        assert tags["kiln.git_commit"] == tags["kiln.experiment_commit"], "the experiment's commit, never HEAD-dirty"
        assert run(["git", "rev-parse", tags["kiln.experiment_ref"]], cwd=reproduced).stdout.strip() == \
            tags["kiln.experiment_commit"]
        assert tags["kiln.git_remote"] == str(reproduced)
    (name,) = names
    assert name.startswith("run-") and name in run(["dvc", "exp", "list", "--name-only"], cwd=reproduced).stdout
    assert f"lineage: experiment {name} " in (reproduced.parent / "kiln-run.log").read_text()


def flow(repo: Path, *assignments: str) -> dict:
    """`kiln flow -S ...` in `repo`: its result, and its output under "log"."""
    result = run([str(BIN / "kiln"), "flow", *(item for assignment in assignments for item in ("-S", assignment))],
                 cwd=repo)
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "log": result.stdout + result.stderr}


# The flow run's overrides: one more epoch, and LEAN_PARAMS' compressions and fine-tune methods (the session's run
# covered them all; this run is about the flow).
FLOW_OVERRIDES = (f"train.epochs={TINY_EPOCHS + 1}", *(f"{key}={json.dumps(value)}" for key, value in
                                                        LEAN_OVERRIDES.items()))


def test_prefect_flow_runs_in_its_own_workspace_and_records_an_experiment(reproduced: Path, tmp_path: Path) -> None:
    params_before = (reproduced / "params.yaml").read_bytes()
    result = flow(reproduced, *FLOW_OVERRIDES)
    expected = {"prepare": "restored", "tune": "restored", "train": "ran", "compress": "ran", "evaluate": "ran",
                "finetune_data": "restored"}  # and finetune runs again if evaluate moved the champion
    assert {stage: result["stages"][stage] for stage in expected} == expected, \
        f"DVC's run-cache restores what the override does not touch:\n" \
                                                    f"{result['log'][-8000:]}"
    assert (reproduced / "params.yaml").read_bytes() == params_before, "the checkout is never edited"
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=reproduced).stdout == ""
    name, commit = result["experiment"], result["commit"]
    assert name in run(["dvc", "exp", "list", "--name-only"], cwd=reproduced).stdout
    recorded = yaml.safe_load(run(["git", "show", f"{commit}:params.yaml"], cwd=reproduced).stdout)
    assert recorded["train"]["epochs"] == TINY_EPOCHS + 1
    lock = yaml.safe_load(run(["git", "show", f"{commit}:dvc.lock"], cwd=reproduced).stdout)
    assert set(lock["stages"]) >= set(STAGES)
    trained = json.loads(run(["git", "show", f"{commit}:reports/train/metrics.json"], cwd=reproduced).stdout)
    assert trained["epoch"] == TINY_EPOCHS + 1

    client = client_for(reproduced)
    assert str(client.get_model_version_by_alias("kiln", "challenger").version) == "2"
    version = client.get_model_version("kiln", "2")
    assert (version.tags["kiln.experiment"], version.tags["kiln.experiment_commit"]) == (name, commit)
    assert version.tags["kiln.experiment_ref"].startswith("refs/exps/")
    assert {item.path for item in client.list_artifacts(version.run_id, "lineage")} == {
        "lineage/params.yaml", "lineage/dvc.lock"}
    v1, v2 = (client.get_run(client.get_model_version("kiln", v).run_id) for v in ("1", "2"))
    decision = json.loads(Path(client.download_artifacts(v2.info.run_id, "promotion.json", str(tmp_path))).read_text())
    assert (decision["champion_version"], decision["value"]) == ("1", v2.data.metrics["test_accuracy"])
    assert decision["champion_value"] == v1.data.metrics["test_accuracy"]
    significant = decision["p_value"] < TINY_PARAMS["evaluate"]["gate_alpha"] and decision["b"] > decision["c"]
    assert decision["promoted"] == (decision["delta"] > 0 and significant)
    assert v2.data.tags["kiln.promoted"] == str(decision["promoted"]).lower()
    expected_champion = "2" if decision["promoted"] else "1"
    assert str(client.get_model_version_by_alias("kiln", "champion").version) == expected_champion

    again = flow(reproduced, *FLOW_OVERRIDES)
    assert set(again["stages"].values()) == {"restored"} and again["experiment"] != name
    versions = client.search_model_versions("name = 'kiln'")
    assert sorted(str(version.version) for version in versions) == ["1", "2"], "nothing registered again"
    assert "didn't change" in run(["dvc", "repro"], cwd=reproduced).stdout
    for version in [*versions, *client.search_model_versions("name = 'kiln-fashion'")]:
        commit = version.tags["kiln.git_commit"]
        assert commit == version.tags["kiln.experiment_commit"] and not commit.endswith("-dirty")
        assert run(["git", "cat-file", "-t", commit], cwd=reproduced).stdout.strip() == "commit", version


def test_a_version_kiln_run_registered_rebuilds_in_another_clone(reproduced: Path, tmp_path: Path) -> None:
    """`kiln reproduce` of the session's `kiln run` version (v1), from a clone of the repository: every stage
    re-run against a scratch store, and the required ones identical."""
    clone = tmp_path / "clone"
    run(["git", "clone", "--quiet", str(reproduced), str(clone)], cwd=tmp_path)
    store = f"sqlite:///{reproduced / 'mlflow.db'}"
    result = subprocess.run([str(BIN / "kiln"), "reproduce", "models:/kiln/1", "--workdir", str(tmp_path / "rebuild")],
                            cwd=clone, env={**repo_env(), "MLFLOW_TRACKING_URI": store}, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    verdicts = dict(re.findall(r"^  (prepare|tune|train|compress|evaluate) +(\S+)", result.stdout, re.M))
    assert verdicts == {"prepare": "identical", "tune": verdicts["tune"], "train": "identical",
                        "compress": "identical", "evaluate": "identical"}, result.stdout[-4000:]
