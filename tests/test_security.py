"""Security basics: files kiln loads cannot run code, and secrets stay in the environment (or DVC's local config),
never in params.yaml, the committed DVC config or anything MLflow stores."""

from __future__ import annotations

import configparser
import os
import pickle
import re
from pathlib import Path

import pytest
import ray.train
import torch
import yaml

from kiln.core.errors import CorruptFile, InputError
from kiln.core.models import initial_state, load_trained_model
from kiln.train.checkpoint import STATE_FILE, load
from tests.conftest import REPO, key_paths

SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
SPEC = {"name": "lenet", "in_channels": 1, "num_classes": 10, "image_size": 28, "mean": [0.5], "std": [0.5]}


class Payload:
    """Unpickling this touches `marker`: proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return Path.touch, (self.marker,)


def planted(path: Path, marker: Path) -> Path:
    torch.save({"spec": SPEC, "state_dict": Payload(marker)}, path)
    return path


@pytest.mark.bad_input
def test_pickled_code_in_weights_models_and_checkpoints_is_refused_unrun(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(InputError, match="train.weights: .*refused, it holds pickled code"):
        initial_state(planted(tmp_path / "weights.pt", marker), SPEC)  # train.weights
    with pytest.raises(CorruptFile, match="refused, it holds pickled code"):
        load_trained_model(str(planted(tmp_path / "model.pt", marker)))  # models/model.pt, compress and evaluate
    planted(tmp_path / STATE_FILE, marker)
    with pytest.raises(CorruptFile, match="refused, it holds pickled code"):
        load(ray.train.Checkpoint.from_directory(str(tmp_path)))  # an epoch checkpoint a run resumes from
    assert not marker.exists()
    with open(tmp_path / "plain.pkl", "wb") as handle:  # the payload is live: plain unpickling runs it
        pickle.dump(Payload(marker), handle)
    with open(tmp_path / "plain.pkl", "rb") as handle:
        pickle.load(handle)
    assert marker.exists()


def test_no_credentials_in_params_or_the_committed_dvc_config() -> None:
    keys = [".".join(path) for path, _ in key_paths(yaml.safe_load((REPO / "params.yaml").read_text()))]
    assert not [key for key in keys if SECRET_NAME.search(key)]
    config = configparser.ConfigParser()
    config.read_string((REPO / ".dvc" / "config").read_text())
    found = [f"{section}.{key}" for section in config.sections() for key in config[section]
             if re.search(r"access_key|secret|token|password|credential", key)]
    assert not found, f"credentials belong in .dvc/config.local or the environment, not .dvc/config: {found}"


@pytest.mark.slow
def test_no_secret_from_the_environment_reaches_mlflow(reproduced: Path) -> None:
    """The session's Ray token and the stack's S3 keys were in the environment of the whole pipeline run: no byte of
    them is in the MLflow store or its artifacts."""
    secrets = {name: value for name, value in os.environ.items() if SECRET_NAME.search(name) and len(value) >= 8}
    assert {"RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY"} <= secrets.keys()
    stored = [reproduced / "mlflow.db", *(path for path in (reproduced / "mlartifacts").rglob("*") if path.is_file())]
    assert len(stored) > 10
    leaks = [f"{name} in {path.relative_to(reproduced)}" for path in stored for name, value in secrets.items()
             if value.encode() in path.read_bytes()]
    assert not leaks
