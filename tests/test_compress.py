"""The compress stage on real components: a LeNet trained on scikit-learn's digits, pruned with Torch-Pruning and
distilled on a real Ray cluster, exported with torch's exporter and quantized and timed with ONNX Runtime."""

from __future__ import annotations

import json
import math
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from mlflow import MlflowClient
from sklearn.datasets import load_digits
from torch import nn

from kiln.compress.distillation import distillation_loss
from kiln.compress.pruning import count_macs, count_parameters, prune_to_macs, resized, round_targets, thinned
from kiln.compress.quantize import CHANNEL_MULTIPLE, quantize_int8
from kiln.compress.recovery import check_reachable
from kiln.compress.select import select_deployable, within_accuracy
from kiln.core.errors import CorruptFile, InputError
from kiln.core.export import export_onnx
from kiln.core.files import write_json
from kiln.core.inference import onnx_logits, predict_onnx, session_options
from kiln.core.latency import Timing, batch_of, interleaved
from kiln.core.models import build_model, load_trained_model, save_trained_model
from kiln.core.params import LatencyParams, ParamsError, validate_params
from kiln.core.prepared import (
    MANIFEST,
    SPLITS,
    load_split,
    read_manifest,
    save_split,
    split_file,
    to_float,
)
from kiln.platform.contract import stages
from tasks import compress
from tests.conftest import TINY_PARAMS, train_lenet

REPO = Path(__file__).resolve().parents[1]
FULL_PARAMS = validate_params(TINY_PARAMS)
PARAMS = FULL_PARAMS.compress


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
    x_train, y_train = load_split(prepared, "train")
    model = train_lenet(spec, torch.from_numpy(to_float(x_train)), torch.from_numpy(y_train))
    path = tmp_path_factory.mktemp("trained") / "model.pt"
    save_trained_model(str(path), model, spec, extra={})
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


def accuracy(model: nn.Module, val: tuple[np.ndarray, np.ndarray]) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(val[0])).argmax(1).numpy() == val[1]).mean())


@pytest.fixture(scope="module")
def stage(prepared: Path, model_path: Path, tmp_path_factory: pytest.TempPathFactory, ray_address: str) -> tuple[Path,
                                                                                                                   dict]:
    """One compress() run from its output root (models/, reports/, MLflow's mlflow.db and mlartifacts/), its recovery
    training on the session's two-node Ray cluster: the root and the returned metrics."""
    root = tmp_path_factory.mktemp("stage")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        metrics = compress.run(FULL_PARAMS, model_path, prepared, root / "models", root / "reports")
    return root, metrics


def conv_weights(path: Path) -> list[onnx.TensorProto]:
    """The quantized weight of each Conv of the QDQ model at `path` (the initializer its DequantizeLinear reads)."""
    graph = onnx.load(str(path)).graph
    weights = {tensor.name: tensor for tensor in graph.initializer}
    dequantized = {node.output[0]: weights[node.input[0]] for node in graph.node
                   if node.op_type == "DequantizeLinear" and node.input[0] in weights}
    return [dequantized[node.input[1]] for node in graph.node if node.op_type == "Conv"]


def optimized_ops(path: Path, tmp_path: Path) -> list[str]:
    """The op types ONNX Runtime runs for the model at `path`, after its graph optimisations."""
    options = session_options()
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}_optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]


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


def test_int8_is_smaller_agrees_and_runs_integer_kernels(
    fp32_onnx: Path, val: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    images, labels = val
    int8_onnx = tmp_path / "model_int8.onnx"
    quantize_int8(fp32_onnx, int8_onnx, images[:128])
    assert fp32_onnx.stat().st_size / int8_onnx.stat().st_size > 2
    int8, fp32 = predict_onnx(int8_onnx, images).argmax(1), predict_onnx(fp32_onnx, images).argmax(1)
    assert (int8 == fp32).mean() >= 0.95 and (int8 == labels).mean() >= (fp32 == labels).mean() - 0.02
    assert [weight.data_type for weight in conv_weights(int8_onnx)] == [onnx.TensorProto.INT8] * 2
    ops = optimized_ops(int8_onnx, tmp_path)  # every Q/DQ pair fused into integer kernels: no float conv or matmul left
    assert ops.count("QLinearConv") == 2 and ops.count("QGemm") == 3
    assert not {"Conv", "FusedConv", "Gemm", "MatMul"} & set(ops)


def test_int8_gives_image_convs_channels_for_the_fast_kernel(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("compact", 1, 10, 8, [0.5], [0.25], widths=(16, 32, 64, 32)).eval()
    images = np.random.default_rng(0).random((256, 1, 8, 8), dtype=np.float32)
    export_onnx(model, torch.from_numpy(images[:2]), tmp_path / "fp32.onnx")
    quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", images[:128])
    assert [weight.dims[1] for weight in conv_weights(tmp_path / "int8.onnx")] == [CHANNEL_MULTIPLE, 16, 32]
    fp32, int8 = (predict_onnx(tmp_path / f"{name}.onnx", images[128:]) for name in ("fp32", "int8"))
    assert np.abs(int8 - fp32).max() < 0.05 * np.abs(fp32).max()
    assert optimized_ops(tmp_path / "int8.onnx", tmp_path).count("QLinearConv") == 3


def test_export_writes_global_average_pooling(tmp_path: Path) -> None:
    model = build_model("resnet", 1, 10, 8, [0.5], [0.25]).eval()
    images = torch.rand(4, 1, 8, 8)
    export_onnx(model, images[:2], tmp_path / "resnet.onnx")
    ops = [node.op_type for node in onnx.load(str(tmp_path / "resnet.onnx")).graph.node]
    assert "GlobalAveragePool" in ops and "ReduceMean" not in ops
    with torch.no_grad():
        np.testing.assert_allclose(predict_onnx(tmp_path / "resnet.onnx", images.numpy()), model(images).numpy(),
                                   atol=1e-4)


@pytest.mark.parametrize("name", ["lenet", "compact", "resnet",
                                  pytest.param("torchvision:mobilenet_v3_small", marks=pytest.mark.slow)])
def test_pruning_reaches_the_macs_target_on_every_kind_of_zoo_model(name: str, tmp_path: Path) -> None:
    """Plain CNNs, residual adds with batch norm, depthwise convs and squeeze-excitation: iterative pruning reaches the
    target (overshooting only as far as whole channel multiples force), the pruned network still has every class, is
    smaller as ONNX, and a fresh full-width model resized to its state gives the same outputs."""
    torch.manual_seed(0)
    spec = dict(name=name, in_channels=1, num_classes=10, image_size=28, mean=[0.5], std=[0.25])
    model, example = build_model(**spec).eval(), torch.rand(4, 1, 28, 28)
    full = count_macs(model, example[:1])
    pruned = model
    for target in round_targets(full, 0.5, 2):
        pruned = prune_to_macs(pruned, example[:1], target)
    macs = count_macs(pruned, example[:1])
    assert 0.2 * full <= macs <= 0.5 * full and count_parameters(pruned) < count_parameters(model)  # coarse multiples
    assert output_width(pruned) == 10 and count_macs(model, example[:1]) == full  # the original is untouched
    rebuilt = resized(build_model(**spec), pruned.state_dict()).eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(example), pruned(example))
    export_onnx(model, example[:2], tmp_path / "full.onnx")
    export_onnx(pruned, example[:2], tmp_path / "pruned.onnx")
    assert (tmp_path / "pruned.onnx").stat().st_size < 0.75 * (tmp_path / "full.onnx").stat().st_size


def output_width(model: nn.Module) -> int:
    return [module for module in model.modules() if isinstance(module, nn.Linear)][-1].out_features


def test_pruning_to_an_impossible_target_names_it() -> None:
    model = build_model("lenet", 1, 10, 8, [0.5], [0.25]).eval()
    with pytest.raises(ValueError, match="cannot prune below [0-9,]+ MACs"):
        prune_to_macs(model, torch.rand(1, 1, 8, 8), 10)


def test_an_unreachable_macs_target_names_the_key_before_any_training() -> None:
    model = build_model("lenet", 1, 10, 8, [0.5], [0.25])
    with pytest.raises(InputError, match=r"compress.target_macs_ratio: 0.001 is out of reach.*cannot prune below"):
        check_reachable(model, torch.rand(1, 1, 8, 8), 0.001)
    check_reachable(model, torch.rand(1, 1, 8, 8), 0.5)  # reachable: no error


def test_a_student_is_thinner_and_freshly_initialised(model_path: Path, val: tuple[np.ndarray, np.ndarray]) -> None:
    teacher, _ = load_trained_model(str(model_path))
    example = torch.from_numpy(val[0][:1])
    torch.manual_seed(0)
    student = thinned(teacher, example, 0.5 * count_macs(teacher, example))
    torch.manual_seed(0)
    twin = thinned(teacher, example, 0.5 * count_macs(teacher, example))
    assert count_macs(student, example) <= 0.5 * count_macs(teacher, example)
    assert accuracy(student, val) < 0.3 < 0.8 < accuracy(teacher, val), "a student starts from scratch"
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), twin.state_dict().values(),
                                                 strict=True)), "seeded: distilled and its control start alike"


def test_distillation_loss_is_zero_only_for_the_teachers_own_logits(model_path: Path) -> None:
    teacher, _ = load_trained_model(str(model_path))
    images, labels = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    loss = distillation_loss(teacher, temperature=4.0, alpha=1.0)
    with torch.no_grad():
        logits = teacher(images)
    assert loss(logits, images, labels).item() == pytest.approx(0.0, abs=1e-5)
    assert loss(torch.zeros_like(logits), images, labels).item() > 0.01
    blended = distillation_loss(teacher, temperature=4.0, alpha=0.0)(logits, images, labels)
    assert blended.item() == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)


def timing(*rounds_ms: float) -> Timing:
    return Timing(rounds_ms, 64)


def test_selection_ships_the_fastest_variant_that_beats_fp32_beyond_the_noise() -> None:
    accuracy = {"fp32": 0.90, "int8": 0.895, "pruned": 0.85}
    timings = {"fp32": timing(3.0, 3.1, 2.9), "int8": timing(1.0, 1.1, 0.9), "pruned": timing(0.5, 0.6, 0.4)}
    assert within_accuracy(accuracy, 1.0) == ["fp32", "int8"]
    assert select_deployable(accuracy, timings, 1.0, 1.1).variant == "int8"
    assert select_deployable(accuracy, timings, 0.0, 1.1).variant == "fp32"  # the baseline always qualifies
    assert select_deployable(accuracy, timings, 5.0, 1.1).variant == "pruned"
    assert select_deployable({"fp32": 0.9, "int8": 0.99}, {"fp32": timing(1.0), "int8": timing(2.0)}, 0.0,
                             1.0).variant == "fp32"
    assert select_deployable(accuracy, timings, 1.0, 3.0).variant == "int8"  # median paired ratio 3.0/1.0
    assert select_deployable(accuracy, timings, 1.0, 3.1).variant == "fp32"  # not enough faster to ship
    spike = {"fp32": timing(1.3, 1.3, 1.3, 1.3), "int8": timing(1.0, 1.0, 1.0, 1.4)}  # one slow round is allowed
    assert select_deployable({"fp32": 0.9, "int8": 0.9}, spike, 1.0, 1.1).variant == "int8"
    spikes = {"fp32": timing(1.3, 1.3, 1.3, 1.3), "int8": timing(1.0, 1.0, 1.4, 1.4)}  # two are not
    selection = select_deployable({"fp32": 0.9, "int8": 0.9}, spikes, 1.0, 1.1)
    assert selection.variant == "fp32" and selection.robustly_faster == [] and "every" in selection.rule
    biased = {"fp32": timing(1.3, 1.0, 1.3, 1.0), "int8": timing(1.0, 1.3, 1.0, 1.3)}  # whichever is timed first pays
    assert select_deployable({"fp32": 0.9, "int8": 0.9}, biased, 1.0, 1.1).variant == "fp32"
    paired = {"fp32": timing(1.3, 2.6, 1.3), "int8": timing(1.0, 2.0, 1.0)}  # a load change hits both in round 2
    assert select_deployable({"fp32": 0.9, "int8": 0.9}, paired, 1.0, 1.1).variant == "int8"


@pytest.mark.parametrize("order", [("fp32", "copy"), ("copy", "fp32")])
def test_a_variant_with_identical_compute_never_ships(order: tuple[str, str], val: tuple[np.ndarray, np.ndarray],
                                                      fp32_onnx: Path, tmp_path: Path) -> None:
    """A byte-identical copy of fp32 in its own session does exactly the same work: however the two are listed (and so
    timed), the selection keeps fp32 at a real threshold. (An unstructured-pruned copy is not a safe stand-in: one CI
    run timed one 1.5x faster than fp32 in every round, a real effect of the zeroed weights on that machine.)"""
    shutil.copyfile(fp32_onnx, tmp_path / "copy.onnx")
    files = {"fp32": fp32_onnx, "copy": tmp_path / "copy.onnx"}
    protocol = LatencyParams(batch_size=64, rounds=7, calls=20, warmup_calls=10)
    timings = interleaved({name: onnx_logits(files[name]) for name in order}, batch_of(val[0], 64), protocol)
    selection = select_deployable({name: 0.9 for name in order}, timings, 1.0, 1.1)
    assert selection.variant == "fp32", {name: timings[name].rounds_ms for name in order}


@pytest.mark.slow  # the stage fixture trains on the session's Ray cluster
def test_compress_writes_models_and_metrics(stage: tuple[Path, dict]) -> None:
    root, metrics = stage
    reports = root / "reports"
    assert json.loads((reports / "metrics.json").read_text()) == metrics
    for name in ("model_fp32.onnx", "model_int8.onnx", "deployable.onnx"):
        onnx.checker.check_model(str(root / "models" / name))
    assert all(isinstance(value, int | float) and math.isfinite(value) for value in metrics.values())
    assert len(metrics) <= 10, "headline numbers only: every variant's figures are in variants.json"
    rows = {row["variant"]: row for row in json.loads((reports / "variants.json").read_text())["variants"]}
    assert set(rows) == {*PARAMS.variants, "torch_fp32"}
    for row in rows.values():
        assert {"val_accuracy", "batch1_p50_ms", "batched_p50_min_ms", "batched_p50_max_ms", "batched_images_per_s",
                "onnx_bytes", "parameters", "macs", "macs_reduction", "batch1_speedup_vs_fp32"} <= set(row)
        assert row["batched_p50_min_ms"] <= row["batched_p50_ms"] <= row["batched_p50_max_ms"]
    assert rows["fp32"]["val_accuracy"] == rows["torch_fp32"]["val_accuracy"] > 0.8
    assert abs(metrics["int8_accuracy_drop_points"]) <= 2 and metrics["int8_size_ratio"] > 2
    assert metrics["int8_speedup_vs_ort_fp32"] == pytest.approx(rows["int8"]["speedup_vs_fp32"])
    for name in ("pruned_kd", "distilled"):  # smaller dense networks at the MACs target, recovered to near fp32
        assert 1 / PARAMS.target_macs_ratio <= rows[name]["macs_reduction"] < 1.5 / PARAMS.target_macs_ratio
        assert rows[name]["onnx_bytes"] < 0.8 * rows["fp32"]["onnx_bytes"]
        assert rows[name]["parameters"] < rows["fp32"]["parameters"]
        assert rows[name]["val_accuracy"] > 0.7
        assert rows[f"{name}_int8"]["macs"] == rows[name]["macs"]
    assert rows["pruned_kd"]["val_accuracy"] >= rows["fp32"]["val_accuracy"] - 0.03, "pruning keeps what it learned"
    assert (reports / "tradeoff.png").read_bytes().startswith(b"\x89PNG")
    assert all(f"| {variant} |" in (reports / "variants.md").read_text() for variant in PARAMS.variants)


@pytest.mark.slow  # the stage fixture trains on the session's Ray cluster
def test_deployable_follows_the_rule_on_the_measured_rounds(stage: tuple[Path, dict]) -> None:
    root, _ = stage
    table = json.loads((root / "reports" / "variants.json").read_text())
    rows = {row["variant"]: row for row in table["variants"] if not row["variant"].startswith("torch_")}
    assert list(rows) == PARAMS.variants
    baseline, rounds = rows["fp32"], {name: np.array(ms) for name, ms in table["batched_rounds_ms"].items()}
    close = [name for name, row in rows.items() if (baseline["val_accuracy"] - row["val_accuracy"]) * 100 <= 2.0 + 1e-9]
    ratios = {name: rounds["fp32"] / rounds[name] for name in close}
    faster = [name for name in close if name != "fp32" and (ratios[name] <= 1).sum() <= 1 and
              np.median(ratios[name]) >= PARAMS.min_speedup]
    expected = min(faster, key=lambda name: rows[name]["batched_p50_ms"]) if faster else "fp32"
    selection = json.loads((root / "reports" / "selection.json").read_text())
    assert table["selected_variant"] == selection["selected_variant"] == selection["variant"] == expected
    assert (selection["within_accuracy"], selection["robustly_faster"]) == (close, faster)
    assert (root / "models" / "deployable.onnx").stat().st_size == rows[expected]["onnx_bytes"]
    assert "in every interleaved timing round but at most one" in (root / "reports" / "variants.md").read_text()


@pytest.mark.slow  # the stage fixture trains on the session's Ray cluster
def test_compress_logs_a_run_with_a_child_per_variant(stage: tuple[Path, dict]) -> None:
    root, metrics = stage
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(FULL_PARAMS.tracking.experiment).experiment_id
    (parent,) = client.search_runs([experiment], "tags.`kiln.stage` = 'compress'")
    children = {run.info.run_name: run
                for run in client.search_runs([experiment], "tags.`kiln.stage` = 'compress-variant'")}
    assert parent.info.run_name == "compress" and parent.info.status == "FINISHED"
    assert sorted(children) == sorted(PARAMS.variants)
    assert {run.data.tags["mlflow.parentRunId"] for run in children.values()} == {parent.info.run_id}
    assert all(run.data.tags["kiln.variant"] == name for name, run in children.items())
    lineage = {"kiln.git_commit", "kiln.data_hash", "kiln.params_hash"}
    assert all(lineage <= set(run.data.tags) for run in (parent, *children.values()))
    assert parent.data.tags["kiln.deployable_variant"] == json.loads((root / "reports/selection.json").read_text())[
        "selected_variant"]
    assert parent.data.metrics == pytest.approx(metrics)
    assert parent.data.params["target_macs_ratio"] == str(PARAMS.target_macs_ratio)
    assert {item.path for item in client.list_artifacts(parent.info.run_id)} == {
        "metrics.json", "variants.json", "variants.md", "selection.json", "tradeoff.png"}
    rows = {row["variant"]: row for row in json.loads((root / "reports/variants.json").read_text())["variants"]}
    assert "torch_fp32" in rows and "torch_fp32" not in children  # torch eager in the table, not as a variant run
    for name, run in children.items():  # the same keys for every variant, so MLflow's compare view lines them up
        measured = {key: value for key, value in run.data.metrics.items() if not key.startswith("recovery/")}
        assert measured == pytest.approx({key: float(value) for key, value in rows[name].items() if key != "variant"})
    epochs = PARAMS.prune_rounds * PARAMS.recovery_epochs
    for name, count in (("pruned_kd", epochs), ("distilled", PARAMS.student_epochs)):  # recovery curves, per epoch
        curve = client.get_metric_history(children[name].info.run_id, "recovery/val_accuracy")
        assert [point.step for point in curve] == list(range(1, count + 1))
    assert not any(key.startswith("recovery/") for key in children["fp32"].data.metrics)


def snapshot(root: Path) -> dict[Path, bytes | bool]:
    """Every path under `root`, with the bytes of each file."""
    return {path: path.is_file() and path.read_bytes() for path in root.rglob("*")}


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated model.pt", "model built for 16x16 images"])
def test_failed_run_keeps_previous_outputs(
    damage: str, stage: tuple[Path, dict], prepared: Path, model_path: Path, tmp_path: Path
) -> None:
    root = shutil.copytree(stage[0], tmp_path / "outputs")
    before = snapshot(root)
    bad_model, params = tmp_path / "model.pt", FULL_PARAMS
    if damage == "truncated model.pt":
        bad_model.write_bytes(model_path.read_bytes()[:1000])
    else:  # loads fine; with no fine-tune to fail first, it fails inside the ONNX export
        spec = dict(load_trained_model(str(model_path))[1]["spec"], image_size=16)
        save_trained_model(str(bad_model), build_model(**spec), spec, extra={})
        params = FULL_PARAMS.model_copy(update={"compress": PARAMS.model_copy(update={"variants": ["fp32", "int8"]})})
    with pytest.raises(CorruptFile if damage == "truncated model.pt" else RuntimeError):
        compress.run(params, bad_model, prepared, root / "models", root / "reports")
    assert snapshot(root) == before  # same bytes, and no temporaries left behind


@pytest.mark.bad_input
def test_cli_bad_params_exits_1_naming_the_key(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["latency"]["calls"] = 0
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    command = [sys.executable, *shlex.split(stages(REPO)["compress"].cmd)[1:], "--params", str(params)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "latency.calls" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("variants", ["fp32", "int8", "prunned"], "compress.variants: unknown variants ['prunned']"),
        ("variants", ["fp32", "pruned_kd"], "compress.variants: must include ['int8']"),
        ("target_macs_ratio", 1.0, "compress.target_macs_ratio: Input should be less than 1"),
        ("target_macs_ratio", 0.0, "compress.target_macs_ratio: Input should be greater than 0"),
        ("prune_rounds", 0, "compress.prune_rounds: Input should be greater than or equal to 1"),
    ],
)
def test_bad_compress_params_name_the_key(key: str, value: object, expected: str) -> None:
    raw = json.loads(json.dumps(TINY_PARAMS))
    raw["compress"][key] = value
    with pytest.raises(ParamsError) as error:
        validate_params(raw)
    assert expected in str(error.value)
