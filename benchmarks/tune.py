"""Benchmark the tune stage: grid vs random vs TPE+ASHA on a Fashion-MNIST subset, side by side in one Ray session.

    python -m benchmarks.tune            # ~15 min on 2 CPU cores; writes benchmarks/results/tune.json and
                                         # the tune table in docs/benchmarks.md

Every strategy runs the real tune stage (its dvc.yaml command) on the same prepared data, model, subset and
epoch budget per trial; only the search algorithm, scheduler and number of trials differ.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import typer

from benchmarks.report import write_results, write_section
from benchmarks.stages import run_stage
from kiln.core.params import apply_overrides, read_raw_params

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 6
GRID = {"lr": [0.01, 0.03, 0.1, 0.3], "momentum": [0.8, 0.9, 0.95], "weight_decay": [1e-5, 1e-4, 1e-3]}
CONTINUOUS = {"lr": {"type": "loguniform", "low": 0.01, "high": 0.3},
              "momentum": {"type": "uniform", "low": 0.8, "high": 0.95},
              "weight_decay": {"type": "loguniform", "low": 1e-5, "high": 1e-3}}
GRID_SIZE = len(GRID["lr"]) * len(GRID["momentum"]) * len(GRID["weight_decay"])


def strategies(tpe_trials: int) -> dict[str, dict[str, Any]]:
    """tune-section overrides of each strategy; grid and random get the same number of full-length trials."""
    grid_space = {key: {"type": "grid", "values": values} for key, values in GRID.items()}
    return {
        "grid": {"search": "grid", "scheduler": "fifo", "num_samples": 1, "search_space": grid_space},
        "random": {"search": "random", "scheduler": "fifo", "num_samples": GRID_SIZE, "search_space": CONTINUOUS},
        "tpe_asha": {"search": "tpe", "scheduler": "asha", "num_samples": tpe_trials, "grace_period": 1,
                     "reduction_factor": 3, "search_space": CONTINUOUS},
    }


def main(train_samples: int = 6000, tpe_trials: int = 30) -> None:
    """Run the three strategies and record best validation accuracy and trial-epochs of each."""
    stock = read_raw_params(ROOT / "params.yaml")
    base = apply_overrides(stock, {"tune.epochs": EPOCHS, "tune.max_train_samples": train_samples,
                                   "tune.cpus_per_trial": 1, "tune.workers_per_trial": 1,
                                   "tune.metric": "val_accuracy", "tune.mode": "max"})
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-tune-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    base = apply_overrides(base, {"train.storage_path": str(work / "ray_results")})
    prepared = work / "prepared"
    run_stage("prepare", base, {"out": prepared}, work)
    results: dict[str, Any] = {}
    for name, overrides in strategies(tpe_trials).items():
        params = apply_overrides(base, {f"tune.{k}": v for k, v in overrides.items()})
        seconds = run_stage("tune", params, {"data": prepared, "best_config": work / name / "best.json",
                                             "reports": work / name}, work)
        metrics = json.loads((work / name / "metrics.json").read_text())
        results[f"{name}_best_val_accuracy"] = metrics["best_val_accuracy"]
        results[f"{name}_trial_epochs"] = metrics["trial_epochs"]
        results[f"{name}_trials"] = metrics["trials"]
        results[f"{name}_wall_seconds"] = round(seconds, 1)
        print(f"bench: {name}: best val_accuracy {metrics['best_val_accuracy']:.4f}, "
              f"{metrics['trial_epochs']} trial-epochs, {results[f'{name}_wall_seconds']} s", flush=True)
    results["tpe_asha_gap_points"] = round((results["grid_best_val_accuracy"]
                                            - results["tpe_asha_best_val_accuracy"]) * 100, 3)
    results["tpe_asha_trial_epoch_fraction"] = round(results["tpe_asha_trial_epochs"] / results["grid_trial_epochs"], 4)
    results["setup"] = (f"Fashion-MNIST, {train_samples} stratified training images, full validation split, "
                        f"LeNet, batch 128, {EPOCHS} epochs max per trial, {GRID_SIZE}-point grid")
    results["machine"] = f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, Ray local"
    write_results("tune", results)
    rows = [(name, f"{results[f'{name}_best_val_accuracy']:.4f}", results[f"{name}_trials"],
             results[f"{name}_trial_epochs"], results[f"{name}_wall_seconds"]) for name in strategies(tpe_trials)]
    write_section("tune", "python -m benchmarks.tune", results["setup"],
                  ("strategy", "best val accuracy", "trials", "trial-epochs", "wall s"), rows,
                  f"TPE+ASHA ends {abs(results['tpe_asha_gap_points']):.2f} points "
                  f"{'below' if results['tpe_asha_gap_points'] > 0 else 'above'} grid's best with "
                  f"{results['tpe_asha_trial_epoch_fraction']:.0%} of grid's trial-epochs "
                  "(target: within 0.5 points, at most 35%).")


if __name__ == "__main__":
    typer.run(main)
