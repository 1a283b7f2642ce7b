"""params.yaml validation: each bad input is a fast, clear error naming the key and what is allowed."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kiln.core.params import ParamsError, apply_overrides, load_params, validate_params
from kiln.platform.contract import stages
from kiln.platform.overrides import write_overrides
from tests.conftest import REPO, TINY_PARAMS

STOCK = yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture(autouse=True)
def local_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU limits are checked against this machine when no Ray cluster is named."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def error_for(overrides: dict) -> str:
    with pytest.raises(ParamsError) as caught:
        validate_params(apply_overrides(STOCK, overrides))
    return str(caught.value)


def test_stock_and_tiny_params_are_valid() -> None:
    assert load_params(REPO / "params.yaml").prepare.dataset == "fashion_mnist"
    assert validate_params(TINY_PARAMS).train.model == "lenet"


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"train.lr": -0.1}, "train.lr: Input should be greater than 0"),
        ({"train.lr": 0}, "train.lr: Input should be greater than 0"),
        ({"prepare.dataset": "mnist"}, "prepare.dataset: Input should be 'fashion_mnist', 'digits' or 'cifar10'"),
        ({"train.model": "vgg"}, "train.model: unknown model; allowed: lenet, compact, resnet or torchvision:<name>"),
        ({"train.num_workers": 64}, "train: 64 Ray workers x 1 CPUs need 64 CPUs but this machine has"),
        ({"train.amp": "bf16"}, "train: amp needs use_gpu: true (CUDA only)"),
        ({"train.schedule": "cosine", "train.warmup_epochs": 99}, "warmup_epochs (99.0) must be below epochs"),
        ({"train.weights": "missing.pt"}, "train.weights: missing.pt: no such file"),
        ({"train.optimizer": "adam"}, "train.optimizer: Input should be 'sgd' or 'adamw'"),
        ({"train.adversarial.epsilon": 2}, "train.adversarial.epsilon: Input should be less than or equal to 1"),
        ({"train.augmentation.mnist": {}}, "train.augmentation: unknown datasets ['mnist']"),
        ({"train.augmentation.fashion_mnist.crop_padding": 14}, "crop_padding (14) would shift 28-pixel images"),
        ({"prepare.dataset": "digits", "train.augmentation.digits.hflip": True},
         "train.augmentation.digits.hflip: a mirrored image of digits can change its label"),
        ({"train.augmentation": {"digits": {}}}, "train.augmentation has no entry for prepare.dataset 'fashion_mnist'"),
        ({"tune.scheduler": "pbt", "tune.search": "random"}, "tune.scheduler: pbt perturbs the learning rate mid-run"),
        ({"tune.cpus_per_trial": 64}, "tune.cpus_per_trial: a trial asking for 64 CPUs"),
        ({"train.epochs": "many"}, "train.epochs: Input should be a valid integer"),
        ({"train.use_gpu": "sometimes"}, "train.use_gpu: Input should be a valid boolean"),
        ({"train.optimiser": "adam"}, "train.optimiser: unknown key; allowed keys: adversarial, amp, augmentation"),
        ({"tune.search_space.lr.low": 1.0}, "tune.search_space.lr: 'low' (1.0) must be below 'high'"),
        ({"tune.search_space.lr.low": 0.0}, "must be > 0"),
        ({"tune.search_space": {}}, "tune.search_space: Dictionary should have at least 1 item"),
        ({"tune.search_space.epochs": {"type": "choice", "values": [1, 2]}}, "allowed keys: lr, momentum"),
        ({"tune.num_samples": 0}, "tune.num_samples: Input should be greater than or equal to 1"),
        ({"tune.search": "bayes"}, "tune.search: Input should be 'grid', 'random' or 'tpe'"),
        ({"tune.scheduler": "hyperband"}, "tune.scheduler: Input should be 'fifo', 'asha' or 'pbt'"),
        ({"tune.search": "grid"}, "search: grid needs every search_space dimension of type 'grid'"),
        ({"tune.search_space.lr": {"type": "grid", "values": [0.1]}}, "'grid' dimensions ['lr'] need search: grid"),
        ({"tune.scheduler": "pbt"}, "scheduler: pbt explores by itself; use search: random or grid"),
        ({"tune.mode": "min"}, "metric val_accuracy is optimised with mode: max, not min"),
        ({"tune.metric": "accuracy"}, "tune.metric: String should match pattern"),
        ({"tune.grace_period": 99}, "grace_period (99) exceeds epochs"),
        ({"tune.workers_per_trial": 2, "tune.cpus_per_trial": 2}, "a trial asking for 4 CPUs"),
        ({"tune.search_space.lr": {"type": "quniform", "low": 0.1, "high": 0.5}}, "'quniform' needs 'q'"),
        ({"tune.search_space.lr": {"type": "qloguniform", "low": 0.01, "high": 0.5, "q": 0.01}},
         "tpe (Optuna) cannot quantise a log scale: ['lr']"),
        ({"tune.search_space.momentum": {"type": "choice", "values": []}}, "'choice' needs a non-empty 'values'"),
    ],
)
def test_bad_values_name_the_key(overrides: dict, expected: str) -> None:
    assert expected in error_for(overrides)


@pytest.mark.bad_input
def test_missing_key_is_named() -> None:
    raw = apply_overrides(STOCK, {})
    del raw["train"]["epochs"]
    with pytest.raises(ParamsError, match="train.epochs: missing"):
        validate_params(raw)


@pytest.mark.bad_input
def test_override_of_unknown_section_is_named() -> None:
    with pytest.raises(ParamsError, match="'trian' is not a section"):
        apply_overrides(STOCK, {"trian.lr": 0.1})


@pytest.mark.bad_input
def test_write_overrides_keeps_comments_and_refuses_bad_values(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    stock = path.read_text()
    write_overrides(path, {"train.epochs": STOCK["train"]["epochs"], "train.weights": None})
    assert path.read_text() == stock, "values that already match leave the file untouched"
    write_overrides(path, {"train.epochs": 3, "compress.target_macs_ratio": 0.6})
    assert load_params(path).train.epochs == 3
    changed = [(a, b) for a, b in zip(stock.splitlines(), path.read_text().splitlines(), strict=True) if a != b]
    assert [b.split("#")[0].strip() for _, b in changed] == ["epochs: 3", "target_macs_ratio: 0.6"], changed
    before = path.read_text()
    with pytest.raises(ParamsError, match="train.lr"):
        write_overrides(path, {"train.lr": -1})
    assert path.read_text() == before


@pytest.mark.bad_input
def test_stage_cli_rejects_bad_params_fast(tmp_path: Path) -> None:
    bad = apply_overrides(STOCK, {"train.lr": -1})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    started = time.monotonic()
    command = [*shlex.split(stages(REPO)["train"].cmd), "--params", str(tmp_path / "params.yaml")]
    result = subprocess.run([sys.executable, *command[1:]], cwd=REPO, capture_output=True, text=True)
    assert time.monotonic() - started < 5
    assert result.returncode == 1
    assert "train.lr: Input should be greater than 0" in result.stderr
    assert "Traceback" not in result.stderr
