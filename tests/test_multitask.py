"""Multi-task training: tasks in params, every task prepared, one trunk with a head per task trained on Ray Train by
the one loop (batches from every task, the weighted sum of the task losses), and bad task settings refused."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from mlflow.models import get_model_info

from kiln.core.files import read_json
from kiln.core.models import TaskHead, build_model, load_trained_model
from kiln.core.multitask import TaskLayout
from kiln.core.params import ParamsError, apply_overrides, validate_params
from kiln.core.prepared import load_split, read_manifest, task_folders
from kiln.train.loop import VAL_BATCH, validate
from kiln.train.multitask import EqualShares, own_head_predictions, weighted_loss
from kiln.train.recipe import make_loader
from tasks import compress, evaluate, prepare
from tasks import train as train_stage
from tests.conftest import BIN, REPO, TINY_PARAMS, repo_env

# Digits and Fashion-MNIST brought to digits' 8x8: two 10-class tasks on one lenet trunk.
TWO_TASKS = {"prepare.image_side": 8, "train.tasks": {"digits": 1.0, "fashion_mnist": 0.5},
             "train.augmentation": {"digits": {}, "fashion_mnist": {"hflip": True}},
             "compress.variants": ["fp32", "int8"]}
LAYOUT = TaskLayout(names=("digits", "fashion_mnist"), classes=(10, 3), weights=(1.0, 0.5),
                    augments=({}, {}))


def two_task_params(**overrides: object):
    return validate_params(apply_overrides(TINY_PARAMS, {**TWO_TASKS, "train.use_tuned": False, **overrides}))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"train.tasks": {"digits": 1.0, "mnist": 1.0}}, "train.tasks.mnist.[key]: Input should be 'fashion_mnist'"),
    ({"train.tasks": {"digits": 1.0, "fashion_mnist": 0.0}}, "train.tasks.fashion_mnist: Input should be greater"),
    ({"train.tasks": {"digits": 1.0}}, "train.tasks: list two or more tasks"),
    ({"train.tasks": {"fashion_mnist": 1.0, "cifar10": 1.0}}, "must include prepare.dataset ('digits')"),
    ({"train.tasks": {"digits": 1.0, "cifar10": 1.0}}, "train.tasks: channel counts differ"),
    ({"prepare.image_side": None}, "train.tasks: image sides differ ({'digits': 8, 'fashion_mnist': 28}); set "
                                   "prepare.image_side"),
    ({"train.augmentation": {"digits": {}}}, "train.augmentation has no entry for the task 'fashion_mnist'"),
    ({"train.adversarial": {"method": "fgsm"}}, "train.adversarial: adversarial examples are single-task"),
    ({"compress.variants": ["fp32", "int8", "pruned"]}, "compress.variants ['pruned'] are single-task"),
    ({"tune.metric": "val_accuracy_cifar10"}, "tune.metric: 'val_accuracy_cifar10' names no task of train.tasks"),
    ({"tune.metric": "accuracy_digits"}, "tune.metric: String should match pattern"),
])
def test_bad_task_settings_name_the_key(overrides: dict, message: str) -> None:
    with pytest.raises(ParamsError, match=None) as error:
        two_task_params(**overrides)
    assert message in str(error.value)


def test_a_bad_task_fails_through_the_stage_command_before_ray(tmp_path: Path) -> None:
    raw = apply_overrides(TINY_PARAMS, {**TWO_TASKS, "train.tasks": {"digits": 1.0, "svhn": 1.0}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "tasks", "prepare", "--out", str(tmp_path / "out"), "--params",
                           str(tmp_path / "params.yaml")], cwd=REPO, env=repo_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and "train.tasks.svhn" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_the_loss_weighs_each_items_cross_entropy_on_its_own_head_by_its_task() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 13), torch.tensor([0, 9, 4, 10, 12, 11])  # three digits, three of task two
    expected = (torch.nn.functional.cross_entropy(logits[:3, :10], labels[:3], reduction="sum")
                + 0.5 * torch.nn.functional.cross_entropy(logits[3:, 10:], labels[3:] - 10, reduction="sum")) / 6
    assert torch.allclose(weighted_loss(LAYOUT)(logits, torch.zeros(6), labels), expected)
    predicted = own_head_predictions(LAYOUT)(logits, labels)
    assert torch.equal(predicted[:3], logits[:3, :10].argmax(1))
    assert torch.equal(predicted[3:], logits[3:, 10:].argmax(1) + 10)


def test_equal_shares_give_every_task_the_same_count_and_split_across_ranks() -> None:
    sizes = [100, 20]
    shards = [list(EqualShares(sizes, seed=3, rank=rank, world=2)) for rank in range(2)]
    drawn = np.array(shards[0] + shards[1])
    assert len(drawn) == 120 and (drawn < 100).sum() == (drawn >= 100).sum() == 60
    assert set(drawn[drawn >= 100]) == set(range(100, 120)), "the small task repeats, every item at least once"
    again = EqualShares(sizes, seed=3)
    again.set_epoch(1)
    assert list(again) != list(EqualShares(sizes, seed=3)), "a new epoch reshuffles"


def test_a_multitask_model_shares_its_trunk_and_names_each_head() -> None:
    model = build_model("compact", 1, 13, 8, [0.5], [0.25], tasks={"digits": 10, "fashion_mnist": 3})
    assert model(torch.rand(4, 1, 8, 8)).shape == (4, 13)
    assert list(model[1].heads) == ["digits", "fashion_mnist"]
    single = build_model("compact", 1, 10, 8, [0.5], [0.25])
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in single.parameters()) + 128 * 3 + 3


@pytest.fixture(scope="module")
def two_task_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("two-tasks") / "prepared"
    prepare.run(two_task_params(), out)
    return out


def test_prepare_writes_every_tasks_splits(two_task_prepared: Path) -> None:
    folders = task_folders(two_task_prepared)
    assert list(folders) == ["digits", "fashion_mnist"] and folders["digits"] == two_task_prepared
    for task, folder in folders.items():
        manifest = read_manifest(folder)
        assert manifest["dataset"] == task and manifest["image_shape"] == [1, 8, 8]
        assert load_split(folder, "test")[0].shape[1:] == (1, 8, 8)


@pytest.mark.slow
def test_a_two_task_model_trains_compresses_evaluates_registers_and_serves_each_head(
        two_task_prepared: Path, tmp_path: Path, ray_address: str, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    params = two_task_params(**{"train.epochs": 3, "train.task_sampling": "equal", "train.batch_size": 64})
    final = train_stage.run(params, two_task_prepared, tmp_path / "unused.json", tmp_path / "model.pt",
                            tmp_path / "train")
    assert "| fashion_mnist val_loss" in capfd.readouterr().out, "the progress line shows each task"
    model, saved = load_trained_model(str(tmp_path / "model.pt"))
    assert saved["spec"]["tasks"] == {"digits": 10, "fashion_mnist": 10}
    layout = TaskLayout(("digits", "fashion_mnist"), (10, 10), (1.0, 0.5), ({},) * 2)
    folders = task_folders(two_task_prepared)
    for index, (task, folder) in enumerate(folders.items()):
        stats = validate(TaskHead(model, layout.columns(index)), make_loader(*load_split(folder, "val"), VAL_BATCH,
                                                                             False, 0))
        assert stats.accuracy == pytest.approx(final[f"val_accuracy_{task}"]), "the saved model is the one measured"
        assert stats.accuracy > {"digits": 0.8, "fashion_mnist": 0.6}[task], f"the {task} head learned"
    assert final["val_accuracy"] == pytest.approx(np.mean([final[f"val_accuracy_{task}"] for task in layout.names]))

    compress.run(params, tmp_path / "model.pt", two_task_prepared, tmp_path / "onnx", tmp_path / "compress")
    deployable = tmp_path / "onnx/deployable.onnx"
    assert [output.name for output in onnx.load(str(deployable)).graph.output] == ["logits_digits",
                                                                                   "logits_fashion_mnist"]
    summary, decision = evaluate.run(params, two_task_prepared, tmp_path / "model.pt", deployable,
                                     tmp_path / "compress/selection.json", tmp_path / "evaluate")
    assert decision.promoted and summary["test_accuracy"] == pytest.approx(
        (summary["test_accuracy_digits"] + summary["test_accuracy_fashion_mnist"]) / 2)
    assert read_json(tmp_path / "evaluate/tasks/fashion_mnist/metrics.json")["test_accuracy"] == pytest.approx(
        summary["test_accuracy_fashion_mnist"]), "the other task's reports are its own"
    signature = get_model_info("models:/kiln@champion").signature
    assert signature.outputs.input_names() == ["logits_digits", "logits_fashion_mnist"]

    predict = [str(BIN / "kiln"), "predict", "--model-uri", "models:/kiln@champion"]
    for task, folder in folders.items():
        images, labels = load_split(folder, "test")
        np.save(tmp_path / f"{task}.npy", images[:300])
        done = subprocess.run([*predict, str(tmp_path / f"{task}.npy"), "--task", task, "--output",
                               str(tmp_path / f"{task}.csv")], cwd=tmp_path, env=repo_env(), capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        classes = read_manifest(folder)["classes"]
        with open(tmp_path / f"{task}.csv") as handle:
            predicted = [row["predicted"] for row in csv.DictReader(handle)]
        hits = np.mean([name == classes[label] for name, label in zip(predicted, labels[:300], strict=True)])
        assert hits == pytest.approx(summary[f"test_accuracy_{task}"], abs=0.06), f"{task}'s head serves {task}"
    refused = subprocess.run([*predict, str(tmp_path / "digits.npy")], cwd=tmp_path, env=repo_env(),
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "pass --task, one of digits, fashion_mnist" in refused.stderr
