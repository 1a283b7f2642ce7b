"""Rebuild a registered model version from its lineage, and say stage by stage whether the outputs match the record.

The version's tags name the DVC experiment that produced it (kiln.platform.lineage): the git repository, the ref and
the commit (for `dvc exp run`, the ref's commit in that repository), whose params.yaml, dvc.lock and reports are the
run's record. `reproduce` checks that commit out in a fresh workspace, gets the recorded data (from the cache of the
checkout the repository lives in, when it is one on this machine, else from the DVC remote in KILN_DVC_REMOTE),
re-runs each stage up to the registration (those POLICY checks) with `dvc repro --force --single-item` against a
scratch MLflow store, and compares each stage's new outputs with the recorded ones. It then puts the recorded
outputs back, so the next stage starts from exactly the inputs the original run had.

The policy, on the same CPU class (POLICY): prepare's data, train's per-epoch metrics, compress's per-variant
accuracies and evaluate's metrics must be identical; timings (latency, images/s) are measured, not compared. Tune's
best configuration (ASHA trials finish in another order when several run at once) and compress's deployable variant
(chosen by measured latency) are reported as identical or not, and the recorded decision is what later stages use.
The stages after the registration (UNCHECKED) are not re-run; a stage that neither covers is refused, named, before
any data moves.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from kiln.core.errors import InputError
from kiln.platform.contract import DVC_FILE, stages
from kiln.platform.shell import CommandError, run, stream
from kiln.platform.workspace import recorded_stages

TIMINGS = re.compile(r"(latency|images_per_s|_ms$)")  # measured figures: never compared


@dataclass(frozen=True)
class Lineage:
    name: str
    version: str
    remote: str  # the git repository holding the experiment's ref
    ref: str
    commit: str


@dataclass(frozen=True)
class StageCheck:
    stage: str
    identical: bool
    required: bool  # False: allowed to differ by the policy (reported only)
    detail: str


def _without_timings(value: Any) -> Any:
    """`value` with every timing key (latency, images/s, milliseconds) removed, recursively."""
    if isinstance(value, dict):
        return {key: _without_timings(item) for key, item in value.items() if not TIMINGS.search(key)}
    if isinstance(value, list):
        return [_without_timings(item) for item in value]
    return value


def _lock_outs(workspace: Path, stage: str) -> list[tuple[str, str]]:
    """(path, md5) of every output dvc.lock records for `stage`."""
    return [(out["path"], out["md5"]) for out in recorded_stages(workspace)[stage]["outs"]]


def _output(workspace: Path, stage: str, name: str) -> str:
    return (workspace / stages(workspace)[stage].output(name)).read_text()


@dataclass(frozen=True)
class Rule:
    """How one stage's result is read from a workspace, whether it must match the record, and what it is."""

    read: Callable[[Path], Any]
    required: bool
    what: str
    compared: Callable[[Any], Any] = lambda result: result  # the part that is compared
    note: Callable[[Any, Any], str] = lambda new, old: ""  # what else to report


POLICY: dict[str, Rule] = {
    "prepare": Rule(lambda ws: _lock_outs(ws, "prepare"), True, "prepared data hashes"),
    "tune": Rule(lambda ws: json.loads((ws / stages(ws)["tune"].paths["best_config"]).read_text())["hyperparameters"],
                 False, "best hyperparameters", note=lambda new, old: f"; the recorded {old} are used"),
    "train": Rule(lambda ws: _without_timings(list(csv.DictReader(io.StringIO(_output(ws, "train", "history.csv"))))),
                  True, "per-epoch metrics"),
    "compress": Rule(lambda ws: json.loads(_output(ws, "compress", "variants.json")), True, "per-variant accuracies",
                     compared=lambda table: {row["variant"]: row["val_accuracy"] for row in table["variants"]},
                     note=lambda new, old: "; the same deployable variant" if new["selected_variant"] ==
                     old["selected_variant"] else f"; deployable {new['selected_variant']} by its timing, recorded "
                     f"{old['selected_variant']} (used)"),
    "evaluate": Rule(lambda ws: _without_timings(json.loads(_output(ws, "evaluate", "models.json"))), True,
                     "test metrics of both models"),
}
UNCHECKED: dict[str, str] = {  # stages deliberately not re-run, and why
    "finetune_data": "the fine-tune's data, used only after the registration",
    "finetune": "registers models of its own, after the registration",
}


def check(stage: str, new: Any, recorded: Any) -> StageCheck:
    """`stage`'s new result against the recorded one, by POLICY."""
    rule = POLICY[stage]
    same = rule.compared(new) == rule.compared(recorded)
    return StageCheck(stage, same, rule.required,
                      f"{rule.what} {'identical' if same else 'differ'}{rule.note(new, recorded)}")


def lineage_of(model_uri: str, client: MlflowClient) -> Lineage:
    """The experiment a registered version (`models:/NAME/VERSION` or `models:/NAME@ALIAS`) was recorded with."""
    found = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([\w-]+))", model_uri)
    if not found:
        raise InputError(f"{model_uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    name, number, alias = found.groups()
    try:
        version = (client.get_model_version(name, number) if number
                   else client.get_model_version_by_alias(name, alias))
    except MlflowException as exc:
        raise InputError(f"{model_uri}: not in the registry at {client.tracking_uri}: {exc.message}") from None
    tags = version.tags
    what = f"{model_uri} (v{version.version})"
    if "kiln.experiment" not in tags:
        raise InputError(f"{what} names no experiment: it was registered by a bare `dvc repro` or a stage command, "
                         "which record none (`kiln run`, `kiln flow`, a deployment and `dvc exp run` do); its commit "
                         f"{tags.get('kiln.git_commit', 'unknown')} does not hold its params")
    if "kiln.experiment_ref" not in tags:
        raise InputError(f"{what} was registered by the run of experiment {tags['kiln.experiment']}, which ended "
                         "before saving it (killed, or a failure kiln could not record); nothing records its params")
    commit = tags.get("kiln.experiment_commit") or _ref_commit(tags["kiln.git_remote"], tags["kiln.experiment_ref"])
    if not commit:
        raise InputError(f"{what}: its experiment {tags['kiln.experiment_ref']} is not in {tags['kiln.git_remote']}: "
                         "the `dvc exp run` that registered it did not finish, or the experiment was removed")
    return Lineage(name, str(version.version), tags["kiln.git_remote"], tags["kiln.experiment_ref"], commit)


def _ref_commit(remote: str, ref: str) -> str | None:
    """The commit `ref` points at in the git repository `remote`, None if it has no such ref."""
    try:
        found = run(["git", "ls-remote", remote, ref]).split()
    except CommandError:
        return None
    return found[0] if found else None


def planned_stages(root: Path) -> list[str]:
    """The stages of `root`'s dvc.yaml that POLICY checks, in DAG order; InputError naming every stage that neither
    POLICY nor UNCHECKED covers, so that a new stage is refused rather than silently skipped."""
    declared = list(stages(root))
    uncovered = [name for name in declared if name not in POLICY and name not in UNCHECKED]
    if uncovered:
        raise InputError(f"{root / DVC_FILE}: kiln.platform.reproduce.POLICY does not cover stage(s) "
                         f"{', '.join(uncovered)}; add a Rule for each to POLICY (or to UNCHECKED, saying why it is "
                         "not re-run)")
    return [name for name in declared if name in POLICY]


def clone(lineage: Lineage, workspace: Path) -> None:
    """Clone the experiment's commit into `workspace`."""
    try:
        run(["git", "clone", "--quiet", "--no-checkout", lineage.remote, str(workspace)])
        run(["git", "fetch", "--quiet", "origin", f"{lineage.ref}:{lineage.ref}"], cwd=workspace)
        run(["git", "checkout", "--quiet", "--detach", lineage.commit], cwd=workspace)
    except CommandError as exc:
        raise InputError(f"v{lineage.version}'s experiment {lineage.ref} ({lineage.commit[:10]}) cannot be fetched "
                         f"from {lineage.remote}: {exc}") from None


def get_data(lineage: Lineage, workspace: Path, last: str) -> None:
    """Get the recorded data and outputs of the stages up to `last` (the last one POLICY checks: a run that failed
    after them recorded none of the later ones) into the cloned `workspace`."""
    remote = None
    if (Path(lineage.remote) / ".dvc").is_dir():  # a checkout on this machine (`kiln run`, `kiln flow`): its cache
        run(["dvc", "cache", "dir", "--local", run(["dvc", "cache", "dir"], cwd=lineage.remote).strip()], cwd=workspace)
        get = ["dvc", "checkout"]
    elif remote := os.environ.get("KILN_DVC_REMOTE"):
        run(["dvc", "remote", "add", "--local", "--force", "--default", "team", remote], cwd=workspace)
        get = ["dvc", "pull"]
    else:
        raise InputError(f"{lineage.remote} is not a local checkout; set KILN_DVC_REMOTE to the DVC remote holding "
                         f"v{lineage.version}'s data")
    try:
        run([*get, "--with-deps", last], cwd=workspace)  # what the checked stages had; no later stage's
    except CommandError as exc:
        raise InputError(f"v{lineage.version}'s recorded data is missing from the DVC "
                         f"{'remote ' + remote if remote else 'cache'}: {exc}") from None


def restore(workspace: Path, lineage: Lineage, stage: str) -> None:
    """Put the recorded outputs of `stage` back: dvc.lock and the reports git keeps from the commit, the cached
    outputs from DVC."""
    declared = [str(path) for path in stages(workspace)[stage].outs]
    kept = run(["git", "ls-tree", "--name-only", lineage.commit, *declared], cwd=workspace).split()
    run(["git", "checkout", lineage.commit, "--", "dvc.lock", *kept], cwd=workspace)
    run(["dvc", "checkout", "--force", stage], cwd=workspace)


def reproduce(lineage: Lineage, workspace: Path, echo: Callable[[str], None]) -> list[StageCheck]:
    """Re-run each stage of the recorded experiment that POLICY checks in `workspace`, checking it, then restoring the
    recorded outputs for the next stage."""
    clone(lineage, workspace)
    plan = planned_stages(workspace)  # before any data moves
    get_data(lineage, workspace, plan[-1])
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'reproduce-mlflow.db'}"}
    checks = []
    for stage in plan:
        command = ["dvc", "repro", "--force", "--single-item", stage]
        code, _ = stream(command, echo, cwd=workspace, env=env)
        if code:
            raise CommandError(f"`{' '.join(command)}` exited {code} in {workspace}")
        new = POLICY[stage].read(workspace)
        restore(workspace, lineage, stage)
        checks.append(check(stage, new, POLICY[stage].read(workspace)))
        echo(f"reproduce: {stage}: {checks[-1].detail}")
    return checks
