"""Fine-tuning a registered model: peft's methods on kiln's models, the registry's base, the target's preparation and
bad input (fast); then the finetune stage of the session's tiny pipeline run, whose digits champion is adapted to
Fashion-MNIST shrunk to 8x8 (slow)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from kiln.core.errors import InputError
from kiln.core.models import build_model, save_trained_model
from kiln.core.params import ParamsError, apply_overrides, validate_params
from kiln.core.prepared import load_split, per_class
from kiln.evaluate.publish import SOURCE_MODEL
from kiln.evaluate.registry import resolve_version
from kiln.finetune.base import Base, load_base
from kiln.finetune.methods import adapt, check_targets, merged, step_hook, trainable_parameters
from kiln.finetune.target import check_target, split_note
from kiln.prepare.datasets import read_digits, resized
from tests.conftest import TINY_PARAMS, record_cases, stage_command

SETTINGS = validate_params(TINY_PARAMS).finetune
METHODS = ["lora", "adalora", "loha", "ia3", "linear_probe", "full", "scratch"]


def lenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("lenet", 1, 10, 8, [0.3], [0.3])


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_what_it_says_and_merges_into_the_base_architecture(method: str) -> None:
    base = lenet()
    model = adapt(base, method, 4, SETTINGS.adapters, seed=0, total_steps=20)
    total = sum(p.numel() for p in base.parameters()) - 10 * 85 + 4 * 85  # a 4-class head replaces 10 classes
    trainable = trainable_parameters(model)
    expected = {"linear_probe": trainable == 4 * 85, "full": trainable == total, "scratch": trainable == total}
    assert expected.get(method, 4 * 85 < trainable < 0.5 * total), (method, trainable, total)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    allocate = step_hook(model, method)
    images, labels = torch.rand(16, 1, 8, 8), torch.randint(0, 4, (16,))
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model.train()(images), labels).backward()
        optimizer.step()
        if allocate:
            allocate()
    plain = merged(model).eval()
    assert type(plain[1]).__name__ == "LeNet" and sorted(plain.state_dict()) == sorted(base.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(images), model.eval()(images), atol=1e-4, rtol=1e-4)
    frozen = {"linear_probe": "features.0.weight"}.get(method)
    if frozen:
        assert torch.equal(plain[1].features[0].weight, base[1].features[0].weight), "the probe leaves the trunk"


@pytest.mark.bad_input
@pytest.mark.parametrize(("method", "target", "problem"), [
    ("lora", "features.9", "no layer has that name"),
    ("lora", "features.1", "it is a ReLU"),
    ("adalora", "features.0", "it is a Conv2d"),
])
def test_a_target_module_that_matches_no_layer_is_refused(method: str, target: str, problem: str) -> None:
    settings = SETTINGS.adapters[method].model_copy(update={"target_modules": [target]})
    with pytest.raises(InputError, match=rf"finetune\.adapters\.{method}\.target_modules: '{target}'.*{problem}"):
        check_targets(lenet(), method, settings)


@pytest.mark.bad_input
@pytest.mark.parametrize(("override", "problem"), [
    ({"finetune.adapters": {"lora": {"target_modules": ["features.0"], "rank": 0}}}, r"finetune\.adapters\.lora\.rank"),
    ({"finetune.select": "ia3", "finetune.methods": ["lora"]}, r"finetune\.select: 'ia3' is not one of methods"),
    ({"finetune.lr": {"lora": 0.01}}, r"finetune\.lr: no entry for methods \['adalora'"),
    ({"finetune.lr": {"lora": -1}}, r"finetune\.lr\.lora: Input should be greater than 0"),
    ({"finetune.methods": ["lora", "lora"]}, r"finetune\.methods: lists a method twice"),
    ({"finetune.registered_model": "kiln"}, "finetune.registered_model: 'kiln' is the base's registry entry"),
    ({"finetune.target.image_side": 2}, r"finetune\.target\.image_side"),
])
def test_bad_finetune_params_are_refused_naming_the_key(override: dict, problem: str,
                                                        request: pytest.FixtureRequest) -> None:
    with pytest.raises(ParamsError, match=problem):
        validate_params(apply_overrides(TINY_PARAMS, override))
    record_cases(request.node, problem)


def test_the_target_is_resized_and_shots_are_stratified_and_seeded() -> None:
    raw = resized(read_digits(), 28)
    images, labels = raw.train
    assert images.shape == (1797, 1, 28, 28) and images.dtype == np.uint8 and images.max() > 200
    shots = per_class(labels, 10, seed=3)
    assert np.bincount(labels[shots]).tolist() == [10] * 10
    assert np.array_equal(shots, per_class(labels, 10, seed=3)) and not np.array_equal(shots, per_class(labels, 10, 4))


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    """A sqlite registry holding model `kiln` v1 (alias champion) whose run keeps its PyTorch weights."""
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    save_trained_model(str(tmp_path / "model.pt"), lenet(), dict(
        name="lenet", in_channels=1, num_classes=10, image_size=8, mean=[0.3], std=[0.3]), {"mlflow_run_id": "r"})
    experiment = client.create_experiment("kiln", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.log_artifact(run_id, str(tmp_path / "model.pt"), str(Path(SOURCE_MODEL).parent))
    client.set_terminated(run_id)
    client.create_registered_model("kiln")
    version = client.create_model_version("kiln", f"runs:/{run_id}/model", run_id).version
    client.set_registered_model_alias("kiln", "champion", version)
    return client


def test_the_base_resolves_an_alias_or_a_version_from_the_registry(registry: MlflowClient) -> None:
    for reference in ("champion", "1"):
        base = load_base(registry, "kiln", resolve_version(registry, "kiln", reference))
        assert (base.version, base.saved["spec"]["image_size"]) == ("1", 8)
        assert base.tags["kiln.base_version"] == "1" and base.tags["kiln.base_run_id"] == base.run_id


@pytest.mark.bad_input
@pytest.mark.parametrize(("name", "reference", "problem"), [
    ("kiln", "champio", r"finetune\.base: kiln has no alias 'champio' \(its aliases: champion\)"),
    ("kiln", "7", r"finetune\.base: kiln has no version 7"),
    ("kilm", "champion", r"tracking\.registered_model: the registry has no model 'kilm'"),
])
def test_an_unknown_base_is_refused_naming_the_key(registry: MlflowClient, name: str, reference: str,
                                                   problem: str) -> None:
    with pytest.raises(InputError, match=problem):
        resolve_version(registry, name, reference)


@pytest.mark.bad_input
@pytest.mark.parametrize(("dataset", "image_shape", "problem"), [
    ("fashion_mnist", [3, 8, 8],
     "finetune.target.dataset: fashion_mnist has 3-channel images but base kiln v1 takes 1 channels"),
    ("fashion_mnist", [1, 12, 12],
     "finetune.target.image_side: the target's images are 12x12 but base kiln v1 takes 8x8"),
    ("digits", [1, 8, 8], "finetune.target.dataset: digits is what base kiln v1 learnt from (digits), so the "
                          "fine-tune's test split would hold images it trained on"),
])
def test_a_base_that_cannot_take_the_target_is_refused(dataset: str, image_shape: list[int], problem: str) -> None:
    base = Base("kiln", "1", "run", lenet(), {"spec": {"in_channels": 1, "image_size": 8}}, ("digits",))
    with pytest.raises(InputError, match=re.escape(problem)):
        check_target(base, {"dataset": dataset, "image_shape": image_shape}, validate_params(TINY_PARAMS))


def test_the_methods_table_says_whether_the_test_split_is_clean() -> None:
    base = Base("kiln", "1", "run", lenet(), {}, ("digits",))
    assert split_note(base, "fashion_mnist") == ("Target fashion_mnist: not among the datasets base kiln v1 learnt "
                                                 "from (digits), so no test image was seen in training.")
    assert "may overlap the base's training data" in split_note(Base("kiln", "1", "run", lenet(), {}, None), "digits")


# The finetune stage of the session's tiny pipeline run (tests/conftest.py's `reproduced`).

def stage_paths(repo: Path, params: Path) -> dict[str, Path]:
    return {"base": repo / "reports/evaluate/finetune_base.json", "data": repo / "data/finetune",
            "model": repo / "models/finetuned.pt", "onnx_model": repo / "models/finetuned.onnx",
            "reports": repo / "reports/finetune", "params": params}


@pytest.mark.slow
def test_the_champion_is_fine_tuned_compared_and_registered_with_its_lineage(reproduced: Path,
                                                                             tmp_path: Path) -> None:
    methods = json.loads((reproduced / "reports/finetune/methods.json").read_text())
    rows = {row["method"]: row for row in methods["methods"]}
    assert list(rows) == METHODS and methods["selected"] == "lora"
    fraction = {name: row["trainable_fraction"] for name, row in rows.items()}
    assert fraction["linear_probe"] < fraction["ia3"] < fraction["lora"] < 0.5 < fraction["full"] == 1.0
    assert all(row["test_accuracy"] > 0.15 for row in rows.values()), "every method learns more than chance (0.1)"
    assert (reproduced / "reports/finetune/methods.png").read_bytes()[:4] == b"\x89PNG"
    client = MlflowClient(f"sqlite:///{reproduced / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("kiln", "champion")
    tuned = client.get_model_version_by_alias("kiln-fashion", "champion")
    assert tuned.tags["kiln.base_model"] == "kiln" and tuned.tags["kiln.base_version"] == str(champion.version)
    assert tuned.tags["kiln.finetune_method"] == "lora"
    experiment = client.get_experiment_by_name("kiln").experiment_id
    runs = client.search_runs([experiment], "tags.`kiln.stage` = 'finetune-method'")
    assert sorted(run.data.tags["kiln.finetune_method"] for run in runs) == sorted(METHODS)
    for run in runs:
        assert {"trainable_parameters", "trainable_fraction", "adapter_bytes", "wall_seconds",
                "test_accuracy", "val_accuracy"} <= set(run.data.metrics)
        epochs = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert len(epochs) >= TINY_PARAMS["finetune"]["epochs"], "per-epoch curves"
    images = load_split(reproduced / "data/finetune", "test")[0][:20]
    np.save(tmp_path / "fashion8.npy", images)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{reproduced / 'mlflow.db'}"}
    subprocess.run(["kiln", "predict", str(tmp_path / "fashion8.npy"), "--model-uri", "models:/kiln-fashion@champion",
                    "--output", str(tmp_path / "fashion8.csv")], cwd=reproduced, check=True, env=env)
    assert len((tmp_path / "fashion8.csv").read_text().splitlines()) == 21


@pytest.mark.slow
def test_moving_the_base_through_evaluate_makes_dvc_fine_tune_again(reproduced: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(reproduced, repo, symlinks=True)
    base = repo / "reports/evaluate/finetune_base.json"
    assert "finetune" not in subprocess.run(["dvc", "status", "finetune"], cwd=repo, capture_output=True,
                                            text=True, check=True).stdout
    moved = json.loads(base.read_text())
    assert moved == {"registered_model": "kiln", "reference": "champion", "version": "1"}
    base.write_text(json.dumps({**moved, "version": "2"}))
    status = subprocess.run(["dvc", "status", "finetune"], cwd=repo, capture_output=True, text=True, check=True)
    assert "finetune:" in status.stdout and "reports/evaluate/finetune_base.json" in status.stdout


@pytest.mark.slow
@pytest.mark.bad_input
@pytest.mark.parametrize(("override", "problem"), [
    ({"finetune.base": "nope"}, "finetune.base: kiln has no alias 'nope'"),
    ({"finetune.adapters.lora.target_modules": ["features.1"]}, "finetune.adapters.lora.target_modules"),
    ({"finetune.shots_per_class": 50000}, "finetune.shots_per_class: 50000 exceeds"),
])
def test_bad_input_fails_the_stage_before_ray_and_keeps_its_outputs(reproduced: Path, tmp_path: Path,
                                                                    override: dict, problem: str) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(apply_overrides(yaml.safe_load((reproduced / "params.yaml").read_text()),
                                                     override)))
    paths = stage_paths(reproduced, params)
    before = paths["model"].read_bytes()
    result = subprocess.run(stage_command("finetune", paths), cwd=reproduced, capture_output=True, text=True,
                            env={**os.environ,
                                 "MLFLOW_TRACKING_URI": f"sqlite:///{reproduced / 'mlflow.db'}"}, timeout=120)
    assert result.returncode == 1 and problem in result.stderr, result.stderr[-2000:]
    assert "Ray" not in result.stderr and paths["model"].read_bytes() == before
