"""The fine-tune's MLflow record of its methods and their comparison: a child run per method (its settings, then the
row the comparison holds for it), and the comparison's files (kiln.finetune.report)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np

from kiln.core.files import write_json
from kiln.core.inference import accuracy, torch_logits
from kiln.core.params import FinetuneParams
from kiln.core.prepared import to_float
from kiln.finetune.catalog import ADAPTERS
from kiln.finetune.report import markdown, save_accuracy_plot
from kiln.finetune.training import Tuned


def method_runs(settings: FinetuneParams, tags: dict[str, str]) -> dict[str, str]:
    """A child run of the active run per method, with its settings; returns their ids by method."""
    runs = {}
    for method in settings.methods:
        with mlflow.start_run(run_name=method, nested=True, tags={**tags, "kiln.stage": "finetune-method",
                                                                 "kiln.finetune_method": method}) as child:
            mlflow.log_params({"method": method, "lr": settings.lr[method],
                               **(settings.adapters[method].model_dump() if method in ADAPTERS else {})})
            runs[method] = child.info.run_id
    return runs


def method_row(method: str, result: Tuned, x_test: np.ndarray, y_test: np.ndarray) -> dict:
    """One method's line of the comparison: test and final val accuracy, trainable parameters, costs."""
    return {"method": method, "test_accuracy": accuracy(torch_logits(result.model), to_float(x_test), y_test),
            "val_accuracy": result.history[-1]["val_accuracy"], "trainable_parameters": result.trainable_parameters,
            "trainable_fraction": result.trainable_parameters / result.parameters,
            "adapter_bytes": result.adapter_bytes, "wall_seconds": round(result.wall_seconds, 2)}


def compare(tuned: dict[str, Tuned], runs: dict[str, str], x_test: np.ndarray, y_test: np.ndarray) -> list[dict]:
    """Every method's row, each logged as metrics of its run."""
    rows = [method_row(method, result, x_test, y_test) for method, result in tuned.items()]
    for row in rows:
        with mlflow.start_run(run_id=runs[row["method"]], nested=True):
            mlflow.log_metrics({key: float(value) for key, value in row.items() if key != "method"})
    return rows


def write_comparison(out: dict[str, Path], rows: list[dict], selected: str, base_tags: dict[str, str],
                     split: str) -> None:
    """methods.json (with the selected method, the base and whether the test split is clean of the base's training
    data), the Markdown table (`split` under it), the CSV and the plot, at `out`'s paths (kiln.finetune.report.REPORTS
    keys), the table and the plot logged to the active run."""
    write_json(out["methods"], {"selected": selected, "base": base_tags, "split": split, "methods": rows})
    out["table"].write_text(f"{markdown(rows, selected)}\n{split}\n")
    out["curve"].write_text("method,trainable_parameters,test_accuracy\n" + "".join(
        f"{row['method']},{row['trainable_parameters']},{row['test_accuracy']}\n" for row in rows))
    save_accuracy_plot(rows, out["plot"])
    for key in ("methods", "table", "plot"):
        mlflow.log_artifact(str(out[key]))
