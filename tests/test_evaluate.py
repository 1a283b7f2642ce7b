"""The evaluate stage on real components: calibration and robustness metrics, Integrated Gradients, and the stage end
to end on a LeNet trained on scikit-learn's digits (int8 ONNX deployable) with a real MLflow store in a temp dir."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn

from kiln.compress.quantize import quantize_int8
from kiln.core.errors import InputError
from kiln.core.export import export_onnx
from kiln.core.files import write_json
from kiln.core.inference import onnx_logits, torch_logits
from kiln.core.models import load_trained_model, save_trained_model
from kiln.core.params import EvaluateParams, Params, ParamsError, apply_overrides, validate_params
from kiln.core.prepared import MANIFEST, SPLITS, load_split, save_split, split_file, to_float
from kiln.evaluate import explain
from kiln.evaluate.gate import Decision
from kiln.evaluate.measures import calibration, class_keys, perturbed_sets, robustness
from kiln.evaluate.plots import ATTRIBUTION_CELL_INCHES
from kiln.evaluate.registry import GateError
from kiln.evaluate.report import HEADLINE
from kiln.platform.contract import stages
from tasks import evaluate
from tests.conftest import TINY_PARAMS, train_lenet

REPO = Path(__file__).resolve().parents[1]
CLASSES = [str(digit) for digit in range(10)]
RUN_IDS = {"mlflow_run_id": "train-run-of-the-fixture", "tune_run_id": "tune-run-of-the-fixture"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stage's inputs in the layout dvc.yaml declares: digits as prepared data (1200 train, 300 val, 297 test
    images of 1x8x8), a LeNet trained for a few epochs, its int8 ONNX export as the deployable, an empty MLflow db."""
    root = tmp_path_factory.mktemp("workspace")
    digits = load_digits()
    images = (digits.images * 255 / 16).round().astype(np.uint8)[:, None]
    order = np.random.default_rng(0).permutation(len(images))
    prepared = root / "data/prepared"
    prepared.mkdir(parents=True)
    for split, indices in zip(SPLITS, np.split(order, [1200, 1500]), strict=True):
        save_split(split_file(prepared, split), images[indices], digits.target[indices])
    train = to_float(images[order[:1200]])
    normalization = {"mean": [float(train.mean())], "std": [float(train.std())]}
    write_json(prepared / MANIFEST, {"dataset": "digits", "classes": CLASSES, "image_shape": [1, 8, 8],
                                     "normalization": normalization})
    spec = dict(name="lenet", in_channels=1, num_classes=10, image_size=8, **normalization)
    model = train_lenet(spec, torch.from_numpy(train), torch.from_numpy(digits.target[order[:1200]]))
    (root / "models").mkdir()
    save_trained_model(str(root / "models/model.pt"), model, spec, extra=RUN_IDS)
    export_onnx(model, torch.from_numpy(train[:2]), root / "fp32.onnx")
    quantize_int8(root / "fp32.onnx", root / "models/deployable.onnx", train[:128])
    write_json(root / "reports/compress/selection.json", {"selected_variant": "int8"})
    MlflowClient(f"sqlite:///{root / 'mlflow.db'}").search_registered_models()  # creates the schema (seconds)
    return root


@pytest.fixture(scope="module")
def params() -> Params:
    overrides = {"evaluate.fgsm_epsilons": [0.05, 0.2], "evaluate.pgd_epsilons": [0.1], "evaluate.pgd_steps": 3,
                 "evaluate.noise_sigmas": [0.1], "evaluate.robustness_samples": 150, "evaluate.calibration_bins": 10,
                 "evaluate.explain_steps": 16, "latency.calls": 3}
    return validate_params(apply_overrides(TINY_PARAMS, overrides))


@pytest.fixture(scope="module")
def fp32(workspace: Path) -> nn.Module:
    return load_trained_model(str(workspace / "models/model.pt"))[0]


@pytest.fixture(scope="module")
def digits_test(workspace: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_split(workspace / "data/prepared", "test")
    return to_float(images), labels


@contextmanager
def inside(root: Path) -> Iterator[Path]:
    """Run from `root`, with MLflow on its mlflow.db. Set rather than deleted: MLflow mirrors its tracking URI into
    MLFLOW_TRACKING_URI, and only a variable the patch set is removed again afterwards."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        yield root


@pytest.fixture(scope="module")
def stage(workspace: Path, params: Params) -> tuple[Path, dict, Decision]:
    """One evaluate run in the workspace: its root, summary metrics and gate decision."""
    with inside(workspace):
        summary, decision = evaluate_in(workspace, params)
    return workspace, summary, decision


@pytest.fixture
def second_workspace(stage: tuple[Path, dict, Decision], tmp_path: Path) -> Iterator[Path]:
    """A copy of the workspace after the first evaluation (version 1 is champion), current directory during a test."""
    with inside(shutil.copytree(stage[0], tmp_path / "copy")) as root:
        yield root


def evaluate_in(root: Path, params: Params, **paths: Path) -> tuple[dict, Decision]:
    """The stage with its dvc.yaml paths under `root` (or `paths` in their place)."""
    contract = {role: root / path for role, path in stages(REPO)["evaluate"].paths.items()}
    return evaluate.run(params, **{**contract, **paths})


def client_for(root: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def aliases(client: MlflowClient) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model("kiln").aliases.items()}


def test_ece_is_zero_when_confident_and_right_and_large_when_overconfident() -> None:
    labels = np.arange(200) % 4
    certain = np.eye(4)[labels]
    assert calibration(certain, labels, 15).ece == 0.0
    overconfident = np.full((200, 4), 0.01 / 3)
    guesses = np.where(np.arange(200) % 2 == 0, labels, (labels + 1) % 4)  # half right, always 99% sure
    overconfident[np.arange(200), guesses] = 0.99
    result = calibration(overconfident, labels, 15)
    assert result.ece == pytest.approx(0.49)
    assert result.bins == [{"lower": pytest.approx(14 / 15), "upper": 1.0, "count": 200,
                            "confidence": pytest.approx(0.99), "accuracy": 0.5}]
    uniform = calibration(np.full((200, 4), 0.25), labels, 4)  # ties: argmax picks class 0, right a quarter of times
    assert uniform.ece == pytest.approx(0.0) and uniform.bins[0]["upper"] == 0.25


def test_class_names_become_metric_keys() -> None:
    assert class_keys(["T-shirt/top", "Ankle boot", "0"]) == ["t_shirt_top", "ankle_boot", "0"]
    assert class_keys(["a b", "a-b"]) == ["0_a_b", "1_a_b"]


def test_robustness_falls_as_the_attack_grows(fp32: nn.Module, digits_test: tuple[np.ndarray, np.ndarray],
                                              workspace: Path) -> None:
    images, labels = digits_test
    settings = EvaluateParams(seed=0, gate_metric="test_accuracy", gate_margin=0,
                              gate_alpha=0.05, fgsm_epsilons=[0.02, 0.1, 0.3], pgd_epsilons=[0.1], pgd_steps=5,
                              noise_sigmas=[0.05, 0.5])
    sets = perturbed_sets(fp32, images, labels, settings)
    for name, perturbed in sets.items():
        assert perturbed.dtype == np.float32 and perturbed.min() >= 0 and perturbed.max() <= 1, name
    assert np.abs(sets["fgsm_from_fp32_eps0.1"] - images).max() <= 0.1 + 1e-6
    assert np.abs(sets["pgd_from_fp32_eps0.1"] - images).max() <= 0.1 + 1e-6
    white_box = robustness(torch_logits(fp32), sets, labels)
    fgsm = [white_box[f"robust_fgsm_from_fp32_eps{eps}_accuracy"] for eps in (0.02, 0.1, 0.3)]
    assert white_box["robust_clean_accuracy"] > 0.85
    assert white_box["robust_clean_accuracy"] > fgsm[0] > fgsm[1] > fgsm[2]
    assert white_box["robust_pgd_from_fp32_eps0.1_accuracy"] <= fgsm[1]
    assert white_box["robust_noise_sigma0.5_accuracy"] < white_box["robust_noise_sigma0.05_accuracy"]
    transfer = robustness(onnx_logits(workspace / "models/deployable.onnx"), sets, labels)  # int8: no gradients
    assert transfer["robust_fgsm_from_fp32_eps0.3_accuracy"] < transfer["robust_clean_accuracy"] - 0.3


def test_integrated_gradients_are_complete(fp32: nn.Module, digits_test: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = digits_test
    attributions = explain.attribute("integrated_gradients", fp32, images[:4], labels[:4], steps=64, seed=0)
    with torch.no_grad():
        change = (fp32(torch.from_numpy(images[:4])) - fp32(torch.zeros_like(torch.from_numpy(images[:4]))))
    expected = change[torch.arange(4), torch.from_numpy(labels[:4])].numpy()
    assert attributions.shape == images[:4].shape
    np.testing.assert_allclose(attributions.sum(axis=(1, 2, 3)), expected, rtol=0.05, atol=0.05)


def test_every_explanation_deletes_accuracy_faster_than_random_pixels(
        fp32: nn.Module, digits_test: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    images, labels = digits_test
    out = {key: tmp_path / name for key, name in explain.REPORTS.items()}
    measured = np.arange(100)
    scores = explain.save_explanations(fp32, images, labels, CLASSES, 16, 0, measured, out)
    assert set(scores) == {*explain.METHODS, "random"}
    for method in explain.METHODS:
        assert scores[method]["deletion_area"] < scores["random"]["deletion_area"] - 0.2, (method, scores)
        assert scores[method]["infidelity"] >= 0
    assert json.loads(out["fidelity"].read_text()) == {"images": 100, **scores}
    rows = list(csv.DictReader(out["deletion"].open()))
    assert [float(row["deleted_fraction"]) for row in rows] == list(explain.DELETED_FRACTIONS)
    assert float(rows[0]["random"]) == float(rows[0]["lime"]) > 0.85  # nothing deleted yet: the model's accuracy
    width, height = ATTRIBUTION_CELL_INCHES
    for method in explain.METHODS:
        with Image.open(out[method]) as picture:  # the first image of each of 10 classes: 2 rows of 5
            assert picture.format == "PNG" and picture.size == (round(5 * width * 110), round(2 * height * 110))
    assert out["deletion_plot"].read_bytes()[:4] == b"\x89PNG"


def test_stage_logs_both_models_side_by_side(stage: tuple[Path, dict, Decision]) -> None:
    root, summary, decision = stage
    reports = root / "reports/evaluate"
    assert json.loads((reports / "metrics.json").read_text()) == {
        key: value for key, value in summary.items() if key.removeprefix("fp32_") in HEADLINE}
    full = json.loads((reports / "models.json").read_text())
    assert {**full["deployable"]["metrics"], **{f"fp32_{k}": v for k, v in full["baseline"]["metrics"].items()}} == (
        summary) and full["deployable"]["variant"] == "int8"
    registration = json.loads((reports / "registration.json").read_text())
    assert registration == {"registered_model": "kiln", **decision.as_dict()} and registration["version"] == "1"
    headline = {"test_accuracy", "test_macro_f1", "test_ece", "robust_clean_accuracy",
                "robust_fgsm_from_fp32_eps0.05_accuracy", "robust_fgsm_from_fp32_eps0.2_accuracy",
                "robust_pgd_from_fp32_eps0.1_accuracy", "robust_noise_sigma0.1_accuracy",
                "latency_batched_p50_ms", "latency_batched_p50_min_ms", "latency_batched_p50_max_ms",
                "latency_batched_images_per_s", "model_size_bytes"}
    assert set(summary) == headline | {f"fp32_{key}" for key in headline}
    assert summary["test_accuracy"] > 0.85 and abs(summary["test_accuracy"] - summary["fp32_test_accuracy"]) < 0.03
    assert summary["model_size_bytes"] < summary["fp32_model_size_bytes"]
    for name in ("confusion_matrix.png", "confusion_matrix_fp32.png", "reliability.png", "deletion_curves.png",
                 *(f"explanations_{method}.png" for method in explain.METHODS)):
        assert (reports / name).read_bytes()[:4] == b"\x89PNG", name
    assert (reports / "per_class.csv").read_text().splitlines()[0] == (
        "class,support,fp32_precision,fp32_recall,deployable_precision,deployable_recall")
    assert (reports / "reliability_deployable.csv").read_text().startswith("lower,upper,count,confidence,accuracy")

    client = client_for(root)
    experiment = client.get_experiment_by_name("kiln").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`kiln.stage` = 'evaluate'")
    children = {run.info.run_name: run
                for run in client.search_runs([experiment], "tags.`kiln.stage` = 'evaluate-model'")}
    assert parent.info.run_name == "evaluate" and set(children) == {"baseline", "deployable"}
    assert {run.data.tags["mlflow.parentRunId"] for run in children.values()} == {parent.info.run_id}
    assert [children[name].data.tags["kiln.variant"] for name in ("baseline", "deployable")] == ["fp32", "int8"]
    assert children["deployable"].data.tags["kiln.attack"] == "transfer-from-fp32"
    keys = {name: set(run.data.metrics) - {key for key in run.data.metrics if key.startswith("gate_")}
            for name, run in children.items()}
    assert keys["baseline"] == keys["deployable"] == headline | {f"test_{kind}_{digit}" for kind in
                                                                 ("precision", "recall") for digit in CLASSES}
    fidelity = json.loads((reports / "explanations.json").read_text())
    explained = {f"explain_{method}_{key}": value for method in [*explain.METHODS, "random"]
                 for key, value in fidelity[method].items()}
    assert parent.data.metrics == {**summary, **explained}  # no gate statistics: there was no champion to compare with
    assert children["deployable"].data.metrics["test_accuracy"] == summary["test_accuracy"]

    version = client.get_model_version("kiln", "1")
    assert version.run_id == children["deployable"].info.run_id
    assert version.tags["kiln.train_run_id"] == RUN_IDS["mlflow_run_id"]
    assert version.tags["kiln.tune_run_id"] == RUN_IDS["tune_run_id"]
    assert {"kiln.data_hash", "kiln.params_hash"} <= set(version.tags)
    assert "kiln.git_commit" not in version.tags, "a version's commit is its experiment's, set when it is recorded"
    assert len(version.tags["kiln.params_hash"]) == 64 and version.tags["kiln.variant"] == "int8"
    assert decision.promoted and decision.reason == "no champion yet" and aliases(client) == {"champion": "1",
                                                                                              "challenger": "1"}
    assert children["deployable"].data.tags["kiln.promoted"] == parent.data.tags["kiln.promoted"] == "true"


def test_logged_models_load_back_and_predict(stage: tuple[Path, dict, Decision], fp32: nn.Module,
                                             digits_test: tuple[np.ndarray, np.ndarray]) -> None:
    root = stage[0]
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = client_for(root)
    experiment = client.get_experiment_by_name("kiln").experiment_id
    (baseline,) = client.search_runs([experiment], "attributes.run_name = 'baseline'")
    loaded = mlflow.pytorch.load_model(f"runs:/{baseline.info.run_id}/model")
    batch = torch.from_numpy(digits_test[0][:5])
    with torch.no_grad():
        np.testing.assert_allclose(loaded(batch).numpy(), fp32(batch).numpy(), atol=1e-5)
    champion = mlflow.pyfunc.load_model("models:/kiln@champion")
    assert champion.metadata.get_input_schema().inputs[0].shape == (-1, 1, 8, 8)
    assert (champion.predict(digits_test[0][:5])["logits"].argmax(1) == digits_test[1][:5]).mean() >= 0.8


def test_an_equal_challenger_leaves_the_champion(second_workspace: Path, params: Params, tmp_path: Path) -> None:
    _, decision = evaluate_in(second_workspace, params)
    client = client_for(second_workspace)
    assert not decision.promoted and decision.delta == 0 and aliases(client) == {"champion": "1", "challenger": "2"}
    run_id = client.get_model_version("kiln", "2").run_id
    logged = json.loads(Path(client.download_artifacts(run_id, "promotion.json", str(tmp_path))).read_text())
    assert logged == decision.as_dict()


def snapshot(root: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.mark.fault
@pytest.mark.parametrize("failure", ["unreadable deployable.onnx", "champion without predictions"])
def test_failure_leaves_aliases_and_reports(second_workspace: Path, params: Params, failure: str) -> None:
    client = client_for(second_workspace)
    if failure == "unreadable deployable.onnx":
        (second_workspace / "models/deployable.onnx").write_bytes(b"not a model")
        expected: type[Exception] = Exception
    else:  # fails in the gate, after the new version is registered
        run = client.create_run(client.get_experiment_by_name("kiln").experiment_id)
        client.log_metric(run.info.run_id, "test_accuracy", 0.5)
        client.set_terminated(run.info.run_id)
        bare = client.create_model_version("kiln", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
        client.set_registered_model_alias("kiln", "champion", bare.version)
        expected = GateError
    before, reports = aliases(client), snapshot(second_workspace / "reports")
    with pytest.raises(expected):
        evaluate_in(second_workspace, params)
    assert aliases(client) == before and snapshot(second_workspace / "reports") == reports


@pytest.mark.bad_input
def test_missing_deployable_is_named_first(params: Params, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"models/model.pt: missing; run the train stage"):
        evaluate_in(tmp_path, params)
    (tmp_path / "models").mkdir()
    (tmp_path / "models/model.pt").touch()
    with pytest.raises(InputError, match=r"deployable.onnx: missing; run the compress stage"):
        evaluate_in(tmp_path, params)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("fgsm_epsilons", [], "evaluate.fgsm_epsilons: List should have at least 1 item"),
        ("fgsm_epsilons", [0.0, 0.1], "evaluate.fgsm_epsilons: [0.0] outside (0, 1]: pixels are in [0, 1]"),
        ("pgd_epsilons", [1.5], "evaluate.pgd_epsilons: [1.5] outside (0, 1]"),
        ("noise_sigmas", [0.1, 0.1], "evaluate.noise_sigmas: lists a value twice"),
        ("pgd_steps", 0, "evaluate.pgd_steps: Input should be greater than or equal to 1"),
        ("robustness_samples", 0, "evaluate.robustness_samples: Input should be greater than or equal to 1"),
        ("calibration_bins", 1, "evaluate.calibration_bins: Input should be greater than or equal to 2"),
        ("explain_steps", 0, "evaluate.explain_steps: Input should be greater than or equal to 1"),
    ],
)
def test_bad_evaluate_params_name_the_key(key: str, value: object, expected: str) -> None:
    with pytest.raises(ParamsError) as error:
        validate_params(apply_overrides(TINY_PARAMS, {f"evaluate.{key}": value}))
    assert expected in str(error.value)
