"""The tune stage's results as tables and figures: one row per trial, the best value against trial-epochs spent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from ray import tune

from kiln.core.files import atomic_path, write_json
from kiln.core.params import TuneParams
from kiln.tune.plots import save_best_so_far, save_hyperparameter_scatter
from kiln.tune.trials import trial_state

REPORTS = {"trials": "trials.json", "trials_csv": "trials.csv", "curve": "best_so_far.csv",
           "scatter": "hyperparameters.png", "curve_plot": "best_so_far.png", "metrics": "metrics.json"}


def trial_table(results: tune.ResultGrid, settings: TuneParams) -> pd.DataFrame:
    """One row per trial, best first: its hyperparameters, final metric, epochs it trained, where it ran and how it
    ended."""
    rows = []
    for result in results:
        metrics, history = result.metrics or {}, result.metrics_dataframe
        epochs = 0 if history is None else len(history)  # trained here; a PBT clone starts from another's epoch
        state = trial_state(bool(result.error), metrics.get("training_iteration", 0), settings.epochs)
        rows.append({"trial_id": metrics.get("trial_id", Path(result.path).name), "state": state, "epochs": epochs,
                     **{key: result.config[key] for key in settings.search_space},
                     settings.metric: metrics.get(settings.metric, float("nan")),
                     "node_id": metrics.get("node_id", "")})
    ascending = settings.mode == "min"
    return pd.DataFrame(rows).sort_values(settings.metric, ascending=ascending, na_position="last")


def progress_curve(results: tune.ResultGrid, settings: TuneParams) -> pd.DataFrame:
    """Best metric so far against trial-epochs spent, all trials' epochs in the order they finished."""
    frames = [r.metrics_dataframe for r in results if r.metrics_dataframe is not None]
    epochs = pd.concat(frames).sort_values(["timestamp", "time_total_s"])[[settings.metric]].reset_index(drop=True)
    best = epochs[settings.metric].cummax() if settings.mode == "max" else epochs[settings.metric].cummin()
    return pd.DataFrame({"trial_epochs": np.arange(1, len(epochs) + 1), "best_so_far": best,
                         "metric": settings.metric})


def summary(trials: pd.DataFrame, curve: pd.DataFrame, best_value: float, settings: TuneParams) -> dict[str, Any]:
    """The stage's metrics: the best value, how many trials ended how, trial-epochs spent, nodes used."""
    finished = trials[trials.state != "failed"]
    return {f"best_{settings.metric}": best_value, "trials": len(trials),
            "failed_trials": int((trials.state == "failed").sum()),
            "stopped_early_trials": int((trials.state == "stopped_early").sum()), "trial_epochs": len(curve),
            "nodes": int(finished.node_id.replace("", np.nan).nunique())}


def write_reports(out: dict[str, Path], trials: pd.DataFrame, curve: pd.DataFrame, metrics: dict[str, Any],
                  settings: TuneParams) -> None:
    """Every file of REPORTS at the paths in `out`: the trials table (JSON and CSV), the best-so-far curve, their
    figures and the stage metrics."""
    records = json.loads(trials.to_json(orient="records", double_precision=15))
    write_json(out["trials"], {record.pop("trial_id"): record for record in records})
    for frame, key in ((trials, "trials_csv"), (curve, "curve")):
        with atomic_path(out[key]) as tmp:
            frame.to_csv(tmp, index=False)
    log_scale = {key for key, dim in settings.search_space.items() if "log" in dim.type}
    save_hyperparameter_scatter(trials, list(settings.search_space), settings.metric, log_scale, out["scatter"])
    save_best_so_far(curve, settings.metric, out["curve_plot"])
    write_json(out["metrics"], metrics)
