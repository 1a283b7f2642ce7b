"""Batch inference with a real registered ONNX model (sqlite MLflow store in a temp dir)."""

from __future__ import annotations

import csv
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from kiln.core.export import export_onnx
from kiln.core.inference import predict_onnx
from kiln.core.models import build_model
from kiln.serve.classify import Classifier
from kiln.serve.images import ShapeMismatch, UnreadableInput
from kiln.serve.model import ModelUnavailable, load_model
from tasks.predict import predict
from tests.conftest import BIN, REPO

CLASSES = ["ant", "bee", "cat"]
RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (5, 8, 8), dtype=np.uint8)


@contextmanager
def tracking_to(uri: str) -> Iterator[None]:
    """Point MLflow's global tracking URI (which it mirrors into MLFLOW_TRACKING_URI) at `uri`, then restore it."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(tracking URI, ONNX file) of an 8x8 one-channel LeNet registered as `kiln`: v1 @champion with class names,
    v2 @plain without."""
    root = tmp_path_factory.mktemp("predict-store")
    torch.manual_seed(0)
    onnx_path = root / "model.onnx"
    export_onnx(build_model("lenet", 1, len(CLASSES), 8, [0.5], [0.25]), torch.zeros(2, 1, 8, 8), onnx_path)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with tracking_to(uri):
        experiment = mlflow.create_experiment("predict", artifact_location=(root / "artifacts").as_uri())
        for metadata in ({"classes": CLASSES}, None):
            with mlflow.start_run(experiment_id=experiment):
                mlflow.onnx.log_model(
                    onnx.load(onnx_path), name="model", registered_model_name="kiln", metadata=metadata
                )
    client = MlflowClient(uri)
    client.set_registered_model_alias("kiln", "champion", "1")
    client.set_registered_model_alias("kiln", "plain", "2")
    return uri, onnx_path


@pytest.fixture
def tracking(store: tuple[str, Path]) -> Iterator[Path]:
    """Point in-process predictions at the store; yields the ONNX file for expected outputs."""
    with tracking_to(store[0]):
        yield store[1]


def expected(onnx_path: Path, images: np.ndarray) -> list[str]:
    return [CLASSES[i] for i in predict_onnx(onnx_path, images[:, None].astype(np.float32) / 255).argmax(1)]


def cli(store: tuple[str, Path], *args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": store[0]}
    command = [str(BIN / "kiln"), "predict", *map(str, args)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def save_png(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(path)  # (H, W) uint8 -> L, (H, W, 3) -> RGB


def test_cli_classifies_an_npy_array(store: tuple[str, Path], tmp_path: Path) -> None:
    np.save(tmp_path / "batch.npy", IMAGES)
    result = cli(store, tmp_path / "batch.npy", "--output", tmp_path / "out.csv")
    assert result.returncode == 0, result.stderr
    assert "5 items" in result.stdout
    table = rows(tmp_path / "out.csv")
    assert [row["item"] for row in table] == ["0", "1", "2", "3", "4"]
    assert [row["predicted"] for row in table] == expected(store[1], IMAGES)
    assert all(1 / len(CLASSES) <= float(row["confidence"]) <= 1 for row in table)


def test_cli_classifies_a_folder_of_images(store: tuple[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for index, pixels in enumerate(IMAGES[:3]):
        save_png(folder / f"img{index}.png", pixels)
    save_png(folder / "rgb.PNG", np.repeat(IMAGES[3][..., None], 3, axis=2))  # converted to one channel
    (folder / "notes.txt").write_text("not an image")
    result = cli(store, folder, "--output", tmp_path / "out.csv", "--model-uri", "models:/kiln@champion")
    assert result.returncode == 0, result.stderr
    table = rows(tmp_path / "out.csv")
    assert [row["item"] for row in table] == ["img0.png", "img1.png", "img2.png", "rgb.PNG"]
    assert [row["predicted"] for row in table] == expected(store[1], IMAGES[:4])


def test_without_class_names_predictions_are_indices(tracking: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "batch.npy", IMAGES.astype(np.float32) / 255)  # float input in [0, 1]
    assert predict(tmp_path / "batch.npy", tmp_path / "out.csv", "models:/kiln@plain") == 5
    assert [row["predicted"] for row in rows(tmp_path / "out.csv")] == [
        str(CLASSES.index(name)) for name in expected(tracking, IMAGES)
    ]


def test_a_server_classifies_in_memory_with_kiln_serve(tracking: Path, tmp_path: Path) -> None:
    """What a server does, without the command line: load once (a registered model or a bare ONNX file), then
    classify batches of float32 pixels."""
    pixels = IMAGES[:, None].astype(np.float32) / 255
    registered = load_model("models:/kiln@champion", tmp_path)
    assert registered.chw == (1, 8, 8) and registered.classes == CLASSES
    labels, confidence = Classifier(registered)(pixels)
    assert labels == expected(tracking, IMAGES) and confidence.shape == (5,)
    bare = load_model(str(tracking), tmp_path)
    assert bare.classes is None
    assert Classifier(bare)(pixels)[0] == [str(CLASSES.index(name)) for name in labels]


def npy(folder: Path, array: np.ndarray) -> Path:
    np.save(folder / "x.npy", array)
    return folder / "x.npy"


def tall_png(folder: Path) -> Path:
    save_png(folder / "tall.png", np.zeros((9, 8), np.uint8))
    return folder


def corrupt_png(folder: Path) -> Path:
    save_png(folder / "a.png", IMAGES[0])
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return folder


def garbage_npy(folder: Path) -> Path:
    (folder / "x.npy").write_bytes(b"garbage")
    return folder / "x.npy"


BAD_INPUTS = {
    "wrong-size": (
        lambda d: npy(d, IMAGES[:, :, :7]),
        ShapeMismatch,
        r"x\.npy: array of shape \(5, 8, 7\), but the model expects \(N, 1, 8, 8\) or \(N, 8, 8\)",
    ),
    "wrong-channels": (
        lambda d: npy(d, np.stack([IMAGES] * 3, 1)),
        ShapeMismatch,
        r"x\.npy: array of shape \(5, 3, 8, 8\), but the model expects \(N, 1, 8, 8\)",
    ),
    "wrong-image-size": (tall_png, ShapeMismatch, r"tall\.png: image is 8x9 pixels, the model expects 8x8"),
    "empty-folder": (lambda d: d, UnreadableInput, r"input: no PNG or JPEG images"),
    "unreadable-image": (corrupt_png, UnreadableInput, r"b\.png: not a readable image"),
    "unreadable-npy": (garbage_npy, UnreadableInput, r"x\.npy: not a readable \.npy array"),
    "float-out-of-range": (lambda d: npy(d, IMAGES * 2.0), UnreadableInput, r"x\.npy: float pixels must lie in"),
    "missing": (lambda d: d / "missing.npy", UnreadableInput, r"missing\.npy: no such file or folder"),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_clear_error_and_writes_nothing(tracking: Path, tmp_path: Path, case: str) -> None:
    make_input, error, message = BAD_INPUTS[case]
    source = tmp_path / "input"
    source.mkdir()
    output = tmp_path / "out.csv"
    output.write_text("previous results\n")
    with pytest.raises(error, match=message):
        predict(make_input(source), output, "models:/kiln@champion")
    assert output.read_text() == "previous results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input", "out.csv"]


@pytest.mark.bad_input
def test_unknown_model_is_a_clear_error(tracking: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "batch.npy", IMAGES)
    with pytest.raises(ModelUnavailable, match="cannot load models:/kiln@nobody"):
        predict(tmp_path / "batch.npy", tmp_path / "out.csv", "models:/kiln@nobody")
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.bad_input
def test_cli_error_exits_1_without_traceback_or_csv(store: tuple[str, Path], tmp_path: Path) -> None:
    np.save(tmp_path / "batch.npy", np.stack([IMAGES] * 3, 1))
    result = cli(store, tmp_path / "batch.npy", "--output", tmp_path / "out.csv")
    assert result.returncode == 1
    assert "predict: " in result.stderr and "(5, 3, 8, 8)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.csv").exists()
