"""A workspace of its own for each pipeline run, recorded as a DVC experiment.

A run never edits the checkout it starts from. `clone_workspace` makes a git clone of it (its HEAD, plus its
uncommitted changes to tracked files, as `dvc exp run --temp` does) that shares its DVC cache, so a stage whose inputs
DVC has seen before is restored from the run-cache instead of run. `save_experiment` commits the run's params,
dvc.lock and reports as a DVC experiment (what finished, when a stage failed), and `push_experiment` sends the git
ref to the origin repository (and the outputs and run-cache to the DVC remote, unless the cache is shared): `dvc exp
show` lists it, `dvc exp apply NAME` brings it into a checkout.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from kiln.core.errors import InputError
from kiln.platform.contract import stages
from kiln.platform.shell import run


@dataclass(frozen=True)
class Experiment:
    name: str
    ref: str  # refs/exps/...: fetch it from `remote` to get the run's commit
    commit: str  # the experiment commit: code, params.yaml, dvc.lock and the reports of the run
    baseline: str  # the commit the run started from
    remote: str  # the git repository holding the ref: the workspace, or `origin` once pushed


def clone_workspace(source: Path, workspace: Path) -> Path:
    """Clone `source`'s repository at HEAD into `workspace`, apply `source`'s uncommitted changes to tracked files,
    point the clone's DVC cache at `source`'s and check out what the cache holds of the DVC-tracked files."""
    source, workspace = source.resolve(), workspace.resolve()
    try:
        run(["git", "rev-parse", "--verify", "HEAD"], cwd=source)
    except Exception:
        raise InputError(f"{source}: not a git repository with a commit; a run starts from a commit") from None
    run(["git", "clone", "--quiet", "--shared", str(source), str(workspace)])
    changes = run(["git", "diff", "HEAD", "--binary"], cwd=source)
    if changes.strip():
        subprocess.run(["git", "apply", "--whitespace=nowarn"], cwd=workspace, input=changes, text=True, check=True)
    cache = run(["dvc", "cache", "dir"], cwd=source).strip()
    run(["dvc", "cache", "dir", "--local", cache], cwd=workspace)
    run(["dvc", "checkout", "--allow-missing"], cwd=workspace)  # the raw data, and whatever a committed dvc.lock names
    return workspace


def require_tracked_data(workspace: Path) -> None:
    """Raise InputError naming every `.dvc`-tracked input (raw data) missing from `workspace`: a run without it would
    fail late (prepare) or not at all but record nothing (DVC refuses to save an experiment with a missing output)."""
    missing = []
    for tracked in run(["git", "ls-files", "*.dvc"], cwd=workspace).split():
        outs = yaml.safe_load((workspace / tracked).read_text()).get("outs", [])
        missing += [f"{tracked} ({out['path']})" for out in outs
                    if not (workspace / tracked).parent.joinpath(out["path"]).exists()]
    if missing:
        raise InputError(f"{workspace}: the DVC-tracked inputs {', '.join(missing)} are in neither the DVC cache nor "
                         "the remote; `dvc push` them from a checkout that has them (`make data`)")


def files_to_record(workspace: Path) -> list[str]:
    """Untracked files an experiment commit must hold: dvc.lock, the metrics and plots git keeps (`cache: false`)
    and the .gitignore files DVC writes beside cached outputs, those that exist."""
    declared = [path for stage in stages(workspace).values() for path in stage.outs]
    candidates = {"dvc.lock", *map(str, declared), *(str(path.parent / ".gitignore") for path in declared)}
    untracked = set(run(["git", "ls-files", "--others", "--exclude-standard"], cwd=workspace).split())
    return sorted(candidates & untracked)


def recorded_stages(workspace: Path) -> dict[str, dict]:
    """dvc.lock's entry of each stage it records (none before the first stage finishes)."""
    lock = workspace / "dvc.lock"
    return (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if lock.is_file() else {}


def commit_finished(workspace: Path) -> None:
    """`dvc commit` the stages dvc.lock records whose outputs are all there, as `dvc exp save` does for every stage
    (which also saves each one's run-cache entry); a stage whose outputs are gone (it failed this time) stays as the
    lock has it."""
    finished = [stage for stage, entry in recorded_stages(workspace).items()
                if all((workspace / out["path"]).exists() for out in entry.get("outs", []))]
    if finished:
        run(["dvc", "commit", "--force", "--quiet", *finished], cwd=workspace)


def save_experiment(workspace: Path, name: str) -> Experiment:
    """Commit the workspace as it is (code, params, dvc.lock and the reports of the stages that finished, even if a
    later one failed) as the DVC experiment `name`: the commit `dvc exp save` makes, which refuses a run with a
    missing output. HEAD, the index and the files stay as they were."""
    commit_finished(workspace)
    baseline = run(["git", "rev-parse", "HEAD"], cwd=workspace).strip()
    ref = f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"
    identity = [] if run(["git", "config", "user.email"], cwd=workspace, ok_codes=(0, 1)).strip() else [
        "-c", "user.name=kiln", "-c", "user.email=kiln@localhost"]
    with tempfile.TemporaryDirectory(prefix="kiln-index-") as folder:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(folder) / "index")}
        run(["git", "read-tree", "HEAD"], cwd=workspace, env=env)
        run(["git", "add", "--update"], cwd=workspace, env=env)
        run(["git", "add", "--force", "--", *files_to_record(workspace)], cwd=workspace, env=env)
        tree = run(["git", "write-tree"], cwd=workspace, env=env).strip()
    commit = run(["git", *identity, "commit-tree", tree, "-p", baseline, "-m", f"kiln: experiment {name}"],
                 cwd=workspace).strip()
    run(["git", "update-ref", ref, commit], cwd=workspace)
    return Experiment(name, ref, commit, baseline, str(workspace.resolve()))


def push_experiment(workspace: Path, experiment: Experiment, with_data: bool) -> Experiment:
    """Push the experiment's ref to `origin`; with `with_data`, also its outputs and the run-cache to the default DVC
    remote (not needed when the workspace shares the origin checkout's cache). Returns it as found in `origin`."""
    data = ["--run-cache"] if with_data else ["--no-cache"]
    run(["dvc", "exp", "push", *data, "origin", experiment.name], cwd=workspace)
    if with_data:
        push_uncached_outputs(workspace)
    return replace(experiment, remote=run(["git", "remote", "get-url", "origin"], cwd=workspace).strip())


def push_uncached_outputs(workspace: Path) -> None:
    """Push the copies of the finished stages' `cache: false` outputs (metrics, plots) that DVC's run-cache keeps in
    the local cache. `dvc exp push --run-cache` sends the run-cache entries but not these files, so a clone elsewhere
    would run those stages again instead of restoring them (`dvc repro --pull`: "Some of the cache files do not
    exist neither locally nor on remote")."""
    from dvc.repo import Repo
    from dvc_data.hashfile.hash_info import HashInfo

    hashes = [out["md5"] for entry in recorded_stages(workspace).values() for out in entry.get("outs", [])
              if not out["md5"].endswith(".dir")]  # every out is a file or an already pushed cached folder
    with Repo(str(workspace)) as repo:
        repo.cloud.push({HashInfo("md5", md5) for md5 in hashes if repo.cache.local.exists(md5)})
