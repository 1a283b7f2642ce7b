"""Shared fixtures: the service stack (with its real two-node Ray cluster) once per session, and a temp git + DVC copy
of the repo on tiny params."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import psycopg
import pytest
import torch
import yaml

from kiln.core.models import build_model
from kiln.core.params import apply_overrides, validate_params
from kiln.core.tracking import ARTIFACTS, STORE
from kiln.platform import objectstore, processes, supervise
from kiln.platform.contract import stages
from kiln.platform.stack import Stack, StackSettings, down, status, up
from tasks import prepare

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")
BIN = Path(sys.executable).parent

# Shrunken params: scikit-learn's digits, a few epochs, two tiny trials.
TINY_PARAMS = {
    "tracking": {"experiment": "kiln", "registered_model": "kiln"},
    "latency": {"batch_size": 32, "rounds": 3, "calls": 5, "warmup_calls": 3},
    "prepare": {"dataset": "digits", "data_dir": "data/raw/fashion-mnist", "val_fraction": 0.15, "test_fraction": 0.2,
                "seed": 0},
    "tune": {
        "search": "random", "scheduler": "fifo", "num_samples": 2, "epochs": 2, "grace_period": 1,
        "reduction_factor": 2, "perturbation_interval": 1, "max_train_samples": 400, "cpus_per_trial": 1,
        "workers_per_trial": 1, "metric": "val_accuracy", "mode": "max",
        "search_space": {"lr": {"type": "loguniform", "low": 0.02, "high": 0.1}}, "seed": 0,
    },
    "train": {
        "model": "lenet", "tasks": {}, "task_sampling": "proportional", "dropout": 0.0, "weights": None, "epochs": 6,
        "batch_size": 32, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0001,
        "schedule": "constant", "warmup_epochs": 0, "label_smoothing": 0.0, "early_stopping": {"patience": 0},
        "adversarial": {"method": "none"}, "augmentation": {"digits": {}}, "num_workers": 2, "cpus_per_worker": 1,
        "max_failures": 2, "use_gpu": False, "amp": "none", "channels_last": False, "storage_path": "ray_results",
        "use_tuned": True, "seed": 0,
    },
    "compress": {
        "variants": ["fp32", "int8", "pruned_kd", "pruned_kd_int8", "distilled", "distilled_int8"],
        "calibration_samples": 128, "target_macs_ratio": 0.5, "prune_rounds": 2, "recovery_epochs": 2,
        "recovery_lr": 0.01, "student_epochs": 6, "student_lr": 0.05, "batch_size": 32, "distill_temperature": 2.0,
        "distill_alpha": 0.7, "num_workers": 2, "cpus_per_worker": 1, "max_accuracy_drop_points": 2.0,
        "min_speedup": 1.1, "seed": 0,
    },
    "evaluate": {"gate_metric": "test_accuracy", "gate_margin": 0.0, "gate_alpha": 0.05, "seed": 0},
    "finetune": {  # the digits champion adapted to Fashion-MNIST shrunk to its 8x8 input, 5 shots per class
        "base": "champion", "registered_model": "kiln-fashion",
        "target": {"dataset": "fashion_mnist", "data_dir": "data/raw/fashion-mnist", "val_fraction": 0.02,
                   "test_fraction": 0.2, "image_side": 8, "seed": 0},
        "shots_per_class": 5, "methods": ["lora", "adalora", "loha", "ia3", "linear_probe", "full", "scratch"],
        "select": "lora", "epochs": 3, "batch_size": 16,
        "lr": {"lora": 0.01, "adalora": 0.01, "loha": 0.01, "ia3": 0.03, "linear_probe": 0.03, "full": 0.003,
               "scratch": 0.01},
        "weight_decay": 0.0001,
        "adapters": {"lora": {"target_modules": ["features.0", "features.3", "classifier.1", "classifier.4"]},
                     "adalora": {"target_modules": ["classifier.1", "classifier.4"], "rank": 4, "target_rank": 2},
                     "loha": {"target_modules": ["features.0", "classifier.1"]},
                     "ia3": {"target_modules": ["features.0", "features.3", "classifier.1", "classifier.4"]}},
        "num_workers": 1, "cpus_per_worker": 1, "seed": 0,
    },
}


# TINY_PARAMS without the compressions and fine-tune methods that tests of their own cover (test_compress's stage,
# the session's `reproduced` run): for tests about running the pipeline (deployments, the cluster path, the README,
# resuming), where every stage runs but what it computes is not the subject.
LEAN_OVERRIDES = {"compress.variants": ["fp32", "int8"], "finetune.methods": ["lora"]}
LEAN_PARAMS = apply_overrides(TINY_PARAMS, LEAN_OVERRIDES)


def train_lenet(spec: dict, images: torch.Tensor, labels: torch.Tensor) -> torch.nn.Module:
    """A model built from `spec`, trained for 8 epochs of plain SGD (batch 32, seed 0), in eval mode."""
    torch.manual_seed(0)
    model = build_model(**spec)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(8):
        for batch in torch.randperm(len(labels)).split(32):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TINY_PARAMS' dataset (digits), prepared once per session (test_compress builds its own `prepared`)."""
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    prepare.run(validate_params(TINY_PARAMS), out)
    return out


GENERATED = ("dvc.lock", "reports/", "data/prepared", "models/")  # a clone starts without pipeline outputs
RAW_DATA = Path("data/raw/fashion-mnist")  # data/raw/fashion-mnist.dvc's output, which `make data` brings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def repo_env() -> dict[str, str]:
    """This environment for commands run in a repository copy: the venv's tools first on PATH, and MLflow on the
    copy's own mlflow.db (MLflow mirrors an in-process test's tracking URI into MLFLOW_TRACKING_URI)."""
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    return {**env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def run(command: list[str], cwd: Path, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command in `repo_env()`; on failure show its output."""
    env = {**repo_env(), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} exited {result.returncode}\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    return result


# Ray enables token authentication by default and reads the token when it is first imported, so the session's
# token goes into the environment here, before any test module imports ray; every client (this process,
# `dvc repro`, Prefect workers) inherits it.
os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)})


# `python -m benchmarks.reliability` sets this: every `bad_input` and `fault` test's outcome goes to that file.
LEDGER = os.environ.get("KILN_RELIABILITY_LEDGER")
RELIABILITY_MARKS = ("bad_input", "fault")


def record_cases(node: pytest.Item, *cases: str, kind: str | None = None) -> None:
    """Name the distinct cases a `bad_input` or `fault` test tried when it tries several (a hypothesis test, a
    deployment test that also kills a flow run); `kind` when they are not the test's own. Else the test is one case."""
    node.user_properties.append(("cases", {"kind": kind, "names": cases}))


def record_measured(node: pytest.Item, **counts: int) -> None:
    """What a `fault` test measured before asserting on it: `runs_left_running`, `outputs_lost`."""
    node.user_properties.append(("measured", counts))


# `.ci/report.py` sets this: each test's phases and the fixtures it set up go to that file, for docs/ci.md.
TIMINGS = os.environ.get("KILN_TEST_TIMINGS")
PHASES = pytest.StashKey[dict[str, float]]()  # a test's seconds per phase (setup, call, teardown)
OUTCOMES = pytest.StashKey[set[str]]()  # and the outcome of each
fixture_seconds: dict[str, float] = {}  # the current test's fixtures: seconds to set each up (its own work only)


def write_timing(entry: dict[str, Any]) -> None:
    if TIMINGS:
        with open(TIMINGS, "a") as timings:
            timings.write(json.dumps(entry) + "\n")


def pytest_sessionstart(session: pytest.Session) -> None:
    write_timing({"session_start": time.time()})


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    fixture_seconds.clear()


class FixtureTimer:
    """Times each fixture's set-up, its own work only (what it depends on is set up before this hook runs). A plugin
    of its own: a conftest's hooks do not see session-scoped fixtures, which pytest sets up on the session node."""

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest) -> Iterator[object]:
        started = time.monotonic()
        try:
            return (yield)
        finally:
            name = fixturedef.argname
            fixture_seconds[name] = fixture_seconds.get(name, 0) + time.monotonic() - started


def pytest_configure(config: pytest.Config) -> None:
    if TIMINGS:
        config.pluginmanager.register(FixtureTimer(), "kiln-fixture-timer")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[pytest.TestReport]:
    report = yield
    phases = item.stash.setdefault(PHASES, {})
    phases[report.when] = report.duration
    outcomes = item.stash.setdefault(OUTCOMES, set())
    outcomes.add(report.outcome)
    if report.when == "teardown":
        write_timing({"test": item.nodeid, **phases, "outcome": min(outcomes),  # failed < passed < skipped
                      "fixtures": {name: round(seconds, 1) for name, seconds in fixture_seconds.items()
                                   if seconds >= 1}})
    marks = [mark.name for mark in item.iter_markers() if mark.name in RELIABILITY_MARKS]
    if LEDGER and marks and (report.when == "call" or report.failed):
        cases: dict[str, set[str]] = {}
        measured: dict[str, int] = {}
        for key, value in report.user_properties:
            if key == "cases":
                cases.setdefault(value["kind"] or marks[0], set()).update(value["names"])
            elif key == "measured":
                measured.update(value)
        line = {"test": item.nodeid, "kind": marks[0], "phase": report.when, "passed": report.passed,
                "cases": {kind: sorted(names) for kind, names in cases.items()}, "measured": measured}
        with open(LEDGER, "a") as ledger:
            ledger.write(json.dumps(line) + "\n")
    return report


def until(ready: Callable[[], T], seconds: float, failure: str | Callable[[], str],
          process: subprocess.Popen | None = None, every: float = 0.5) -> T:
    """Poll `ready` every `every` s until it returns something truthy, and return that; fail with `failure` (a text,
    or a function that makes one) after `seconds`, or as soon as `process`, which should be running meanwhile, exits."""
    deadline = time.monotonic() + seconds
    while not (value := ready()):
        if time.monotonic() > deadline or (process is not None and process.poll() is not None):
            pytest.fail(failure() if callable(failure) else failure)
        time.sleep(every)
    return value


def printed(log: Path, text: str, process: subprocess.Popen, seconds: float = 300) -> None:
    """Until `text` appears in `log`, the file `process` writes its output to."""
    until(lambda: text in log.read_text(), seconds,
          lambda: f"no {text!r} after {seconds} s (exit code {process.poll()}):\n{log.read_text()[-4000:]}", process,
          every=0.2)


RAY_FORWARDED = re.compile(r"\((?:\w+ )?pid=\d+[^)]*\) ")  # the prefix of a line Ray forwards from a worker
RAY_CORE_ERROR = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,]+ E \d+ \d+\] ")  # glog: [2026-12-05 10:53:08,639 E 16994 17021]


def screen_noise(output: str) -> list[str]:
    """What a healthy run should not print: a line Ray forwarded more than once (compared from its Ray prefix on, so
    log timestamps before it do not hide a repeat), an error-level line of Ray's C++ core, and DVC's warnings about
    hashes a pull expects to miss."""
    lines = output.splitlines()
    forwarded = Counter(line[found.start():] for line in lines if (found := RAY_FORWARDED.search(line)))
    return ([f"{count} times: {line}" for line, count in forwarded.items() if count > 1]
            + [line for line in lines if "No file hash info" in line or RAY_CORE_ERROR.search(line)])


def output_tail(process: subprocess.Popen, size: int = 4000) -> str:
    """The end of what `process` printed to its stdout pipe; it is stopped first if it still runs."""
    if process.poll() is None:
        process.kill()
    out = process.communicate()[0] or ""
    return (out.decode() if isinstance(out, bytes) else out)[-size:]


def stop(process: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM, and SIGKILL if it has not exited within `grace` seconds."""
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def key_paths(tree: dict, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """(path, value) of every key of a nested mapping, each mapping before what it holds."""
    return [item for key, value in tree.items() for item in
            [((*prefix, key), value), *(key_paths(value, (*prefix, key)) if isinstance(value, dict) else [])]]


def bucket_keys(env: dict[str, str], uri: str) -> list[str]:
    """Every object key under the s3:// `uri`, listed with the S3 endpoint and keys of `env` (a stack's)."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    s3 = objectstore.client(env["AWS_ENDPOINT_URL"], env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def pg_query(env: dict[str, str], database: str, sql: str, *args: object) -> list[tuple]:
    """The rows of `sql` on `database` of the PostgreSQL server in `env` (a stack's)."""
    with psycopg.connect(f"{env['KILN_POSTGRES_URL']}/{database}") as connection:
        return connection.execute(sql, args).fetchall()


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stage_command(stage: str, paths: dict[str, Path]) -> list[str]:
    """dvc.yaml's command line for `stage`, every --ROLE pointing at `paths[ROLE]`."""
    command = shlex.split(stages(REPO)[stage].cmd)[1:]
    for index, word in enumerate(command):
        if word.startswith("--"):
            command[index + 1] = str(paths[word[2:].replace("-", "_")])
    return [sys.executable, *command, "--params", str(paths["params"])]


STACK_URLS = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")  # tests keep their own stores unless they ask for these


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The service stack of `kiln cluster up` (PostgreSQL, SeaweedFS S3, MLflow and Prefect servers, a Prefect worker,
    a Ray head and one more node with 1 CPU each, all on loopback), started once per session by the same code and
    shared by every test that asks for it or for `ray_address`. Its env goes into os.environ for the session (the
    Ray nodes already have the S3 settings), except the MLflow and Prefect URLs: tests that want those servers read
    `stack.env`. Only this stack's processes are stopped afterwards; its logs stay in the session's temp dir."""
    root = tmp_path_factory.mktemp("stack")
    postgres_dir = Path(tempfile.gettempdir()) / f"kiln-test-postgres-{secrets.token_hex(4)}"  # pytest's are root-only
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("PREFECT_WORKER_QUERY_SECONDS", "2")  # the worker polls for flow runs every 2 s, not 10
            started = up(StackSettings(root=root, ray_nodes=2, cpus_per_ray_node=1, postgres_dir=postgres_dir))
    except BaseException:
        down(root, purge=True)
        raise
    saved = {key: os.environ.get(key) for key in started.env}
    os.environ.update({key: value for key, value in started.env.items() if key not in STACK_URLS})
    yield started
    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()
    down(root, purge=True)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def ray_address(stack: Stack) -> str:
    """The stack's real two-node Ray cluster on loopback (a head and one more node, 1 CPU each), shared by in-process
    tests and every stage subprocess (RAY_ADDRESS is set), so multi-worker training and parallel trials really cross
    nodes."""
    os.environ["RAY_ADDRESS"] = stack.env["RAY_ADDRESS"]
    return stack.env["RAY_ADDRESS"]


def copy_repo(target: Path, params: dict) -> Path:
    """A fresh git repository holding the project's tracked files and `params`, as a user's clone would."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file() and not name.startswith(GENERATED):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    if not (REPO / RAW_DATA).is_dir():
        raise RuntimeError(f"{REPO / RAW_DATA} is missing: run `make data` (the tests' repositories track it too)")
    shutil.copytree(REPO / RAW_DATA, target / RAW_DATA)  # as `dvc pull` would bring it
    (target / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.email=ci@kiln", "-c", "user.name=ci", "commit", "-qm", "copy"],
                    [str(BIN / "dvc"), "repro", "-q", str(RAW_DATA) + ".dvc"]):  # into the DVC cache, as `make data`
        subprocess.run(command, cwd=target, check=True)
    return target


def copy_run(source: Path, target: Path) -> Path:
    """A copy of the repository `source` as a pipeline run left it (git history, params, outputs, dvc.lock, DVC cache
    and run-cache) but with an MLflow store and Ray results (train.storage_path) of its own: `dvc repro` there runs
    only what a change makes stale, and a stage it runs starts afresh."""
    storage = TINY_PARAMS["train"]["storage_path"]
    shutil.copytree(source, target, symlinks=True, ignore=shutil.ignore_patterns(STORE, ARTIFACTS, storage))
    return target


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory, ray_address: str) -> Path:
    return copy_repo(tmp_path_factory.mktemp("repo"), TINY_PARAMS)


STAGES = ["prepare", "tune", "train", "compress", "evaluate", "finetune_data", "finetune"]


@pytest.fixture(scope="session")
def reproduced(tiny_repo: Path) -> Path:
    """The whole DAG through `kiln run` (`dvc repro` and the summary) in `tiny_repo`, once per session: the end-to-end
    and MLflow UI tests share it (test_pipeline's later tests re-run and override stages, so they see its state as it
    was left). Its output goes to kiln-run.log beside the repository."""
    result = run([str(BIN / "kiln"), "run"], cwd=tiny_repo, timeout=900)
    (tiny_repo.parent / "kiln-run.log").write_text(result.stdout)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in result.stdout
    return tiny_repo


def kill(stack: Stack, name: str) -> int:
    """SIGKILL every process of the service `name`'s session, as a crash would; its session id."""
    sid = processes.recorded(stack.root)[name]
    for pid in processes.session(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return sid


def restarts(stack: Stack, name: str) -> int:
    return next(service.restarts for service in status(stack.root) if service.name == name)


def restarted(stack: Stack, name: str, previous: int, ready: Callable[[], bool]) -> int:
    """Wait (30 s at most) until `name` runs in a session other than `previous` and `ready` holds; the new session
    id, whose environment is the recorded one."""
    def back() -> int | None:
        sid = processes.recorded(stack.root).get(name)
        return sid if sid != previous and processes.leads(sid) and ready() else None

    sid = until(back, 30, lambda: f"{name} is not back after 30 s; the supervisor's log:\n"
                                  f"{processes.tail(processes.log_path(stack.root, supervise.NAME))}")
    spec = json.loads((stack.root / processes.SPECS / f"{name}.json").read_text())
    environ = dict(line.split("=", 1) for line in Path(f"/proc/{sid}/environ").read_text().split("\0") if line)
    assert environ == {**spec["env"], processes.MARKER: str(stack.root)}, "restarted with the recorded environment"
    return sid
