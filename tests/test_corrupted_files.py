"""A file that exists but cannot be read (truncated, overwritten, half-written) stops the stage reading it with one
line naming the file and the command that writes it again, before any work, and nothing is written."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import ray.train
import torch
import yaml

from kiln.core.errors import CorruptFile
from kiln.core.export import export_onnx
from kiln.core.inference import onnx_logits
from kiln.core.models import build_model, model_spec, save_trained_model
from kiln.core.prepared import read_manifest
from kiln.train.checkpoint import STATE_FILE, load, save
from tests.conftest import REPO, TINY_PARAMS, stage_command

pytestmark = pytest.mark.bad_input


def truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def overwritten(path: Path) -> None:
    """Zeros over the middle third: the size is right, the content is not."""
    content = bytearray(path.read_bytes())
    third = len(content) // 3
    content[third : 2 * third] = bytes(third)
    path.write_bytes(bytes(content))


@pytest.fixture
def inputs(prepared: Path, tmp_path: Path) -> dict[str, Path]:
    """Copies of a prepared dataset, a trained model (untrained weights do), an ONNX file and a selection, and the
    tiny params, all readable."""
    data = tmp_path / "prepared"
    data.mkdir()
    for file in prepared.iterdir():
        (data / file.name).write_bytes(file.read_bytes())
    spec = model_spec("lenet", read_manifest(data), 0.0)
    model = build_model(**spec).eval()
    save_trained_model(str(tmp_path / "model.pt"), model, spec, {"mlflow_run_id": "", "tune_run_id": ""})
    export_onnx(model, torch.zeros(1, spec["in_channels"], spec["image_size"], spec["image_size"]),
                tmp_path / "deployable.onnx")
    (tmp_path / "selection.json").write_text('{"selected_variant": "fp32"}')
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    return {"data": data, "model": tmp_path / "model.pt", "deployable": tmp_path / "deployable.onnx",
            "selection": tmp_path / "selection.json", "params": tmp_path / "params.yaml",
            "onnx_dir": tmp_path / "onnx", "reports": tmp_path / "reports"}


CASES = {  # case: (stage, role of the damaged file, file under it or None, damage, the command the message names)
    "truncated model.pt": ("compress", "model", None, truncated, "dvc repro train"),
    "overwritten train.npz": ("compress", "data", "train.npz", overwritten, "dvc repro prepare"),
    "truncated val.npz": ("compress", "data", "val.npz", truncated, "dvc repro prepare"),
    "truncated manifest.json": ("evaluate", "data", "manifest.json", truncated, "dvc repro prepare"),
    "overwritten deployable.onnx": ("evaluate", "deployable", None, overwritten, "dvc repro compress"),
}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_corrupt_input_stops_the_stage_in_one_line_naming_it(case: str, inputs: dict[str, Path]) -> None:
    stage, role, name, damage, remedy = CASES[case]
    damaged = inputs[role] / name if name else inputs[role]
    damage(damaged)
    started = time.monotonic()
    result = subprocess.run(stage_command(stage, inputs), cwd=REPO, capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and str(damaged) in lines[0] and remedy in lines[0], result.stderr
    assert time.monotonic() - started < 30  # the stage's imports, then the read: no training, no Ray
    assert not inputs["onnx_dir"].exists() and not inputs["reports"].exists()


def test_a_half_written_checkpoint_is_named_with_what_to_delete(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint_000003"
    folder.mkdir()
    save(str(folder), {"model": {"weight": torch.zeros(64, 64)}, "epoch": 3})
    truncated(folder / STATE_FILE)
    with pytest.raises(CorruptFile, match=rf"{folder / STATE_FILE}: corrupt or truncated .*delete {folder}"):
        load(ray.train.Checkpoint.from_directory(str(folder)))


def test_an_unreadable_onnx_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(CorruptFile, match=r"model\.onnx: corrupt or truncated .*dvc repro compress"):
        onnx_logits(tmp_path / "model.onnx")
