"""The first screen after a run: what each stage did and how long it took, the headline results, the registry's
decision, and what to open next. Read from the stages' outputs, wherever dvc.yaml puts them."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from kiln.platform.contract import stages

RAN, UP_TO_DATE, RESTORED = "ran", "up to date", "restored"  # the last: from DVC's run-cache, without running
NEXT = [("dvc plots show", "learning curves, confusion matrix... (dvc_plots/index.html)"),
        ("dvc exp show", "params and metrics of this and earlier experiments")]


def next_steps() -> list[tuple[str, str]]:
    """What to open next: MLflow (the server in MLFLOW_TRACKING_URI, or a UI over the local store), DVC's views."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    mlflow = f"open {uri}" if uri.startswith("http") else "mlflow ui --backend-store-uri sqlite:///mlflow.db"
    return [(mlflow, "every stage's runs, the registry, comparisons"), *NEXT]


def stage_statuses(dvc_output: str) -> dict[str, tuple[str, float | None]]:
    """(status, seconds) of each stage named in `dvc repro`'s output (seconds from the stages' `done in` lines)."""
    statuses: dict[str, tuple[str, float | None]] = {}
    for line in dvc_output.splitlines():
        if found := re.match(r"Running stage '([\w-]+)'", line):
            statuses[found[1]] = (RAN, None)
        elif found := re.match(r"Stage '([\w-]+)' didn't change, skipping", line):
            statuses[found[1]] = (UP_TO_DATE, None)
        elif found := re.match(r"Stage '([\w-]+)' is cached - skipping run", line):
            statuses[found[1]] = (RESTORED, None)
        elif (found := re.match(r"([\w-]+): done in (\d+) s$", line)) and found[1] in statuses:
            statuses[found[1]] = (RAN, float(found[2]))
    return statuses


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def headlines(root: Path = Path(".")) -> dict[str, str]:
    """One line of results per stage that has them."""
    contract = stages(root)
    metrics = {name: _json(root / stage.metrics[0]) if stage.metrics else {} for name, stage in contract.items()}
    lines = {}
    if tune := metrics.get("tune"):
        best = next(key for key in tune if key.startswith("best_"))
        lines["tune"] = (f"best {best.removeprefix('best_')} {tune[best]:.4f} ({tune['trials']} trials, "
                         f"{tune['trial_epochs']} trial-epochs, {tune['stopped_early_trials']} stopped early, "
                         f"{tune['failed_trials']} failed)")
    if train := metrics.get("train"):
        lines["train"] = (f"val_accuracy {train['val_accuracy']:.4f} at epoch {train['epoch']:.0f}, "
                          f"{train['images_per_second']:.0f} img/s on {train['worker_nodes']:.0f} Ray node(s)")
    selection = _json(root / contract["compress"].output("selection.json")) if "compress" in contract else {}
    if selection:
        chosen = selection["selected_variant"]
        lines["compress"] = (f"deployable {chosen}: {selection['macs_reduction']:.2f}x fewer MACs, "
                             f"{selection['speedup_vs_fp32']:.2f}x fp32's speed, "
                             f"{selection['accuracy_drop_points']:+.2f} points of val accuracy lost"
                             if chosen != "fp32" else "deployable fp32: no variant beat it beyond the timing noise "
                             "within the accuracy budget")
    if evaluate := metrics.get("evaluate"):
        lines["evaluate"] = (f"test_accuracy {evaluate['test_accuracy']:.4f} "
                             f"(fp32 {evaluate['fp32_test_accuracy']:.4f}), macro-F1 {evaluate['test_macro_f1']:.4f}, "
                             f"ECE {evaluate['test_ece']:.3f}")
        if fidelity := _json(root / contract["evaluate"].output("explanations.json")):
            areas = {method: scores["deletion_area"] for method, scores in fidelity.items() if isinstance(scores, dict)}
            random = areas.pop("random")
            lines["explanations"] = (f"deletion-curve area, random pixels {random:.2f}: "
                                     + ", ".join(f"{method} {area:.2f}" for method, area in areas.items()))
        registration = _json(root / contract["evaluate"].output("registration.json"))
        if registration:
            outcome = ("promoted to champion" if registration["promoted"]
                       else f"champion stays v{registration['champion_version']}")
            lines["registry"] = (f"{registration['registered_model']} v{registration['version']} is challenger, "
                                 f"{outcome}: {registration['reason']}")
    if metrics.get("finetune"):
        methods = _json(root / contract["finetune"].output("methods.json"))
        rows = {row["method"]: row for row in methods["methods"]}
        chosen = rows[methods["selected"]]
        baselines = [f"{name} {rows[name]['test_accuracy']:.4f}" for name in ("full", "scratch") if name in rows]
        registered = _json(root / contract["finetune"].output("registration.json"))
        status = "champion" if registered["promoted"] else "challenger"
        lines["finetune"] = (f"{methods['selected']} test_accuracy {chosen['test_accuracy']:.4f} training "
                             f"{chosen['trainable_fraction']:.1%} of the weights"
                             + (f" ({', '.join(baselines)})" if baselines else "")
                             + f"; v{registered['version']} {status}")
    return lines


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def render(statuses: dict[str, tuple[str, float | None]], root: Path = Path(".")) -> str:
    """The summary as plain text, one screen."""
    lines = headlines(root)
    width = max(len(name) for name in [*stages(root), *lines])
    text = ["", "kiln: stages"]
    for name in stages(root):
        status, seconds = statuses.get(name, ("not run", None))
        text.append(f"  {name:<{width}}  {status:<10}  {_duration(seconds):>10}")
    text.append("results")
    text += [f"  {name:<{width}}  {line}" for name, line in lines.items()]
    text.append("next")
    text += [f"  {command:<52} {what}" for command, what in next_steps()]
    return "\n".join(text)


def markdown(statuses: dict[str, tuple[str, float | None]], root: Path = Path(".")) -> str:
    """The summary as a markdown table (the Prefect flow's run report)."""
    lines = headlines(root)
    rows = ["| stage | status | time | results |", "| --- | --- | --- | --- |"]
    for name in [*stages(root), *(key for key in lines if key not in stages(root))]:
        status, seconds = statuses.get(name, ("", None))
        rows.append(f"| {name} | {status} | {_duration(seconds)} | {lines.get(name, '')} |")
    return "\n".join(rows)
