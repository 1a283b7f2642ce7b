"""The compress stage on real components: a LeNet trained on scikit-learn's digits, torch's exporter, ORT."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from sklearn.datasets import load_digits
from torch import nn

from kiln.config import CompressParams
from kiln.data import MANIFEST, SPLITS, load_split, read_manifest, save_split, split_file, to_float
from kiln.io import write_json
from kiln.models import build_model, load_trained_model, save_trained_model
from kiln.onnx_tools import export_onnx, predict_onnx, quantize_int8
from tasks.compress import ENGINES, compress

REPO = Path(__file__).resolve().parents[1]
PARAMS = CompressParams(calibration_samples=128, latency_batch_size=32, latency_repeats=5)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits as prepared data: 1200 train, 300 val, 297 test images of 1x8x8 uint8."""
    digits = load_digits()
    images = (digits.images * 255 / 16).round().astype(np.uint8)[:, None]
    order = np.random.default_rng(0).permutation(len(images))
    root = tmp_path_factory.mktemp("prepared")
    for split, indices in zip(SPLITS, np.split(order, [1200, 1500]), strict=True):
        save_split(split_file(root, split), images[indices], digits.target[indices])
    train = to_float(images[order[:1200]])
    write_json(
        root / MANIFEST,
        {
            "dataset": "digits",
            "classes": [str(digit) for digit in range(10)],
            "image_shape": [1, 8, 8],
            "normalization": {"mean": [float(train.mean())], "std": [float(train.std())]},
        },
    )
    return root


@pytest.fixture(scope="module")
def model_path(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LeNet trained for a few epochs with a plain torch loop, saved as the train stage saves it."""
    spec = dict(name="lenet", in_channels=1, num_classes=10, image_size=8, **read_manifest(prepared)["normalization"])
    torch.manual_seed(0)
    model = build_model(**spec)
    x_train, y_train = load_split(prepared, "train")
    images, labels = torch.from_numpy(to_float(x_train)), torch.from_numpy(y_train)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(8):
        for batch in torch.randperm(len(labels)).split(32):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
    path = tmp_path_factory.mktemp("trained") / "model.pt"
    save_trained_model(str(path), model.eval(), spec, extra={})
    return path


@pytest.fixture(scope="module")
def val(prepared: Path) -> tuple[np.ndarray, np.ndarray]:
    x_val, y_val = load_split(prepared, "val")
    return to_float(x_val), y_val


@pytest.fixture(scope="module")
def fp32_onnx(model_path: Path, val: tuple[np.ndarray, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "model_fp32.onnx"
    export_onnx(load_trained_model(str(model_path))[0], torch.from_numpy(val[0][:2]), path)
    return path


@pytest.fixture(scope="module")
def stage(prepared: Path, model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One compress() run: its output root (models/, reports/) and returned metrics."""
    root = tmp_path_factory.mktemp("stage")
    metrics = compress(PARAMS, model_path, prepared, root / "models", root / "reports")
    return root, metrics


def test_export_matches_torch(model_path: Path, val: tuple[np.ndarray, np.ndarray], fp32_onnx: Path) -> None:
    images, labels = val
    model, _ = load_trained_model(str(model_path))
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    assert (expected.argmax(1) == labels).mean() > 0.8
    np.testing.assert_allclose(predict_onnx(fp32_onnx, images, batch_size=64), expected, atol=1e-4)
    np.testing.assert_allclose(predict_onnx(fp32_onnx, images[:1]), expected[:1], atol=1e-4)  # dynamic batch
    graph = onnx.load(str(fp32_onnx)).graph
    assert [i.name for i in graph.input] == ["pixels"] and [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_int8_is_smaller_and_agrees(fp32_onnx: Path, val: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    images, _ = val
    int8_onnx = tmp_path / "model_int8.onnx"
    quantize_int8(fp32_onnx, int8_onnx, images[:128])
    assert fp32_onnx.stat().st_size / int8_onnx.stat().st_size > 2
    agreement = (predict_onnx(int8_onnx, images).argmax(1) == predict_onnx(fp32_onnx, images).argmax(1)).mean()
    assert agreement >= 0.95


def test_compress_writes_models_and_metrics(stage: tuple[Path, dict]) -> None:
    root, metrics = stage
    assert json.loads((root / "reports" / "metrics.json").read_text()) == metrics
    for name in ("model_fp32.onnx", "model_int8.onnx"):
        onnx.checker.check_model(str(root / "models" / name))
    assert all(isinstance(value, int | float) and math.isfinite(value) for value in metrics.values())
    for engine in ENGINES:
        assert {f"{engine}_val_accuracy", f"{engine}_batch1_p50_ms", f"{engine}_batched_images_per_s"} <= set(metrics)
    assert {"int8_size_ratio", "int8_speedup_vs_ort_fp32", "int8_speedup_vs_torch_eager"} <= set(metrics)
    assert metrics["ort_fp32_val_accuracy"] == metrics["torch_fp32_val_accuracy"] > 0.8
    assert abs(metrics["int8_accuracy_drop_points"]) <= 2
    assert metrics["int8_size_ratio"] > 2


def snapshot(root: Path) -> dict[Path, bytes | bool]:
    """Every path under `root`, with the bytes of each file."""
    return {path: path.is_file() and path.read_bytes() for path in root.rglob("*")}


@pytest.mark.parametrize("damage", ["truncated model.pt", "model built for 16x16 images"])
def test_failed_run_keeps_previous_outputs(
    damage: str, stage: tuple[Path, dict], prepared: Path, model_path: Path, tmp_path: Path
) -> None:
    root = shutil.copytree(stage[0], tmp_path / "outputs")
    before = snapshot(root)
    bad_model = tmp_path / "model.pt"
    if damage == "truncated model.pt":
        bad_model.write_bytes(model_path.read_bytes()[:1000])
    else:  # loads fine, then fails inside the export, after the atomic temporaries exist
        spec = dict(load_trained_model(str(model_path))[1]["spec"], image_size=16)
        save_trained_model(str(bad_model), build_model(**spec), spec, extra={})
    with pytest.raises(RuntimeError):
        compress(PARAMS, bad_model, prepared, root / "models", root / "reports")
    assert snapshot(root) == before  # same bytes, and no temporaries left behind


def test_cli_bad_params_exits_1_naming_the_key(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["compress"]["latency_repeats"] = 0
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    result = subprocess.run(
        [sys.executable, "-m", "tasks", "compress", "--params", str(params)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "compress.latency_repeats" in result.stderr and "Traceback" not in result.stderr
