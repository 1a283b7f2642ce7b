"""The service stack, each service proved for real through the session's shared stack (tests/conftest.py `stack`):
PostgreSQL holds MLflow's and Prefect's databases, MLflow proxies artifacts into S3 for clients without S3 keys, DVC
pushes to and pulls from the S3 remote, Ray tasks on both nodes write to S3 through pyarrow and their output reaches
the driver once, the Prefect worker runs a flow run with the stack's S3 keys, every socket but Ray's binds 127.0.0.1, a
killed Prefect worker is restarted by the supervisor (a killed MLflow server under a training run: test_tracking_faults)
and `kiln cluster restart` restarts one on purpose; and `kiln cluster up/status/down` on a second small stack prints
what it promises and leaves none of its processes behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import psutil
import pytest

from kiln.platform import postgres, processes, servers, supervise
from kiln.platform.stack import Stack, memory, read_env, stack_pids, status
from tests.conftest import BIN, REPO, bucket_keys, kill, pg_query, restarted, restarts, run

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
ENV_KEYS = {"MLFLOW_TRACKING_URI", "PREFECT_API_URL", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
            "AWS_DEFAULT_REGION", "KILN_DVC_REMOTE", "KILN_STORAGE_PATH", "KILN_MLFLOW_ARTIFACTS", "KILN_WORK_POOL",
            "KILN_POSTGRES_URL"}


def python(code: str, env: dict[str, str], cwd: Path, timeout: int = 300) -> str:
    """Run `code` in a fresh interpreter with exactly `env`; its stdout."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=cwd, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result.stdout


def without_s3_keys() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}


def test_startup_time_memory_and_env(stack: Stack, capsys: pytest.CaptureFixture) -> None:
    with capsys.disabled():
        print(f"\nstack: up in {stack.startup_seconds:.1f} s; {memory(stack.root) / 2**20:.0f} MiB resident "
              f"(RSS sum of {len(stack_pids(stack.root))} processes); {stack.urls}")
    assert set(stack.env) == ENV_KEYS
    assert read_env(stack.env_file) == stack.env
    assert stat.S_IMODE(stack.env_file.stat().st_mode) == 0o600
    assert stack.env["RAY_AUTH_TOKEN"] == os.environ["RAY_AUTH_TOKEN"], "the session's token, from the environment"
    assert all(url.split("//")[-1].startswith("127.0.0.1:") for url in stack.urls.values())


def test_mlflow_logs_through_the_server_into_postgres_and_s3_without_client_keys(stack: Stack, tmp_path: Path) -> None:
    env = {**without_s3_keys(), "MLFLOW_TRACKING_URI": stack.env["MLFLOW_TRACKING_URI"]}
    run_id = python("""
        import mlflow
        mlflow.set_experiment("stack-test")
        with mlflow.start_run() as run:
            mlflow.log_param("where", "postgres")
            mlflow.log_text("kiln", "notes/hello.txt")
        print(run.info.run_id)
    """, env, tmp_path).split()[-1]
    params = pg_query(stack.env, "mlflow", "select key, value from params where run_uuid = %s", run_id)
    assert params == [("where", "postgres")], "the run is in the mlflow database"
    assert any(key.endswith(f"{run_id}/artifacts/notes/hello.txt")
               for key in bucket_keys(stack.env, stack.env["KILN_MLFLOW_ARTIFACTS"]))


def test_dvc_pushes_to_and_pulls_from_the_s3_remote(stack: Stack, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "data.txt").write_text("kiln data\n")
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "add", "-q", "data.txt"],
                    ["dvc", "remote", "add", "-d", "team", stack.env["KILN_DVC_REMOTE"]],
                    ["dvc", "remote", "modify", "team", "endpointurl", stack.env["AWS_ENDPOINT_URL"]],
                    ["dvc", "push", "-q"]):
        run(command, cwd=repo)
    shutil.rmtree(repo / ".dvc" / "cache")
    (repo / "data.txt").unlink()
    run(["dvc", "pull", "-q"], cwd=repo)
    assert (repo / "data.txt").read_text() == "kiln data\n"
    assert bucket_keys(stack.env, stack.env["KILN_DVC_REMOTE"]), "the cache is in the kiln-dvc bucket"


def test_ray_tasks_on_both_nodes_write_to_s3_through_pyarrow(stack: Stack, tmp_path: Path) -> None:
    """The driver has no S3 settings: the nodes' own environment carries them."""
    env = {**without_s3_keys(), "RAY_ADDRESS": stack.env["RAY_ADDRESS"]}
    written = json.loads(python(f"""
        import json, ray
        from pyarrow import fs
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        @ray.remote(num_cpus=1)
        def write(uri):
            filesystem, path = fs.FileSystem.from_uri(uri)
            with filesystem.open_output_stream(path) as out:
                out.write(ray.get_runtime_context().get_node_id().encode())
            return uri

        ray.init(logging_level="ERROR")
        nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
        uris = [write.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
            "{stack.env['KILN_STORAGE_PATH']}/stack-test/" + node) for node in nodes]
        print(json.dumps(ray.get(uris)))
    """, env, tmp_path).splitlines()[-1])
    assert len(written) == 2
    stored = bucket_keys(stack.env, f"{stack.env['KILN_STORAGE_PATH']}/stack-test/")
    assert sorted(stored) == sorted(uri.removeprefix("s3://kiln-ray/") for uri in written)


def run_flow(stack: Stack, folder: Path, name: str, body: str) -> None:
    """Deploy the flow `name` (its body the code `body`) on the kiln-cluster pool without job variables, run it, and
    fail unless it completes."""
    (folder / f"{name}.py").write_text(f"import os\nimport boto3\nfrom prefect import flow\n\n\n@flow\n"
                                       f"def {name}() -> None:\n    {body}\n")
    env = {**without_s3_keys(), "PREFECT_API_URL": stack.env["PREFECT_API_URL"],
           "PREFECT_HOME": str(folder / "prefect-home")}
    python(f"""
        from prefect import flow
        flow.from_source(source={str(folder)!r}, entrypoint="{name}.py:{name}").deploy(
            name={name!r}, work_pool_name={stack.env['KILN_WORK_POOL']!r})
    """, env, folder)
    watched = subprocess.run([str(BIN / "prefect"), "deployment", "run", f"{name}/{name}", "--watch",
                              "--watch-timeout", "240"], env=env, cwd=folder, capture_output=True, text=True,
                             timeout=300)
    worker_log = (stack.root / "logs" / "prefect-worker.log").read_text()[-6000:]
    assert "Completed" in watched.stdout, watched.stdout[-3000:] + watched.stderr[-3000:] + worker_log


def test_a_line_a_ray_task_prints_reaches_the_driver_once(stack: Stack, tmp_path: Path) -> None:
    """Each node forwards only its own workers' output (a temp dir of its own): a shared one doubled every line."""
    env = {**os.environ, "RAY_ADDRESS": stack.env["RAY_ADDRESS"]}
    driver = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import time, ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        @ray.remote(num_cpus=1)
        def say(index):
            print(f"kiln-line-from-node-{index}", flush=True)

        ray.init(logging_level="ERROR")
        nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
        ray.get([say.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(index)
                 for index, node in enumerate(nodes)])
        time.sleep(4)  # forwarded lines arrive a log-monitor poll or two later, a duplicate no later than its original
    """)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    output = driver.stdout + driver.stderr
    assert driver.returncode == 0, output[-6000:]
    assert [output.count(f"kiln-line-from-node-{index}") for index in range(2)] == [1, 1], output[-6000:]


def test_the_prefect_worker_runs_a_flow_with_the_stacks_keys(stack: Stack, tmp_path: Path) -> None:
    """A deployment on the kiln-cluster pool, without job variables: the flow run gets its S3 keys from the worker."""
    run_flow(stack, tmp_path, "probe",
             'boto3.client("s3").put_object(Bucket="kiln-dvc", Key="stack-test/flow-run", Body=os.getcwd().encode())')
    assert bucket_keys(stack.env, "s3://kiln-dvc/stack-test/flow-run")
    assert ("kiln-cluster", "process") in pg_query(stack.env, "prefect", "select name, type from work_pool")
    states = pg_query(stack.env, "prefect", "select fr.state_type from flow_run fr join deployment d "
                                     "on fr.deployment_id = d.id where d.name = 'probe'")
    assert [state for (state,) in states] == ["COMPLETED"]
    assert pg_query(stack.env, "prefect", "select w.status from worker w join work_pool p on w.work_pool_id = p.id "
                                   "where p.name = 'kiln-cluster'") == [("ONLINE",)]


def service_of(stack: Stack) -> dict[int, str]:
    """Each live process of the stack -> the service whose session (or process tree) it belongs to."""
    return {pid: name for name, sid in processes.recorded(stack.root).items() for pid in processes.session(sid)}


def test_every_socket_but_rays_binds_loopback_and_ray_wants_its_token(stack: Stack, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    services = service_of(stack)
    listening: dict[str, set[str]] = {}
    for pid in stack_pids(stack.root):
        try:
            connections = psutil.Process(pid).net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        for connection in connections:
            if connection.status == psutil.CONN_LISTEN:
                listening.setdefault(services.get(pid, f"pid {pid}"), set()).add(connection.laddr.ip)
    with capsys.disabled():
        print(f"\nstack: listening addresses by service: {listening}")
    assert {"postgres", "s3", "mlflow", "prefect-server", "ray-head", "ray-node-1"} <= set(listening)
    for service, addresses in listening.items():
        if not service.startswith("ray-"):
            assert addresses == {"127.0.0.1"}, service
    env = {**os.environ, "RAY_ADDRESS": stack.env["RAY_ADDRESS"], "RAY_AUTH_TOKEN": "0" * 64}
    refused = subprocess.run([sys.executable, "-c", "import ray; ray.init(); print(ray.nodes())"], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0, "a client with another token is refused"
    assert re.search("InvalidAuthToken|Unauthenticated", refused.stderr), refused.stderr[-3000:]


def all_healthy(stack: Stack) -> bool:
    return all(service.healthy for service in status(stack.root))


def test_a_killed_prefect_worker_is_back_and_runs_flows_again(stack: Stack, tmp_path: Path) -> None:
    before = restarts(stack, "prefect-worker")
    restarted(stack, "prefect-worker", kill(stack, "prefect-worker"), lambda: True)
    assert restarts(stack, "prefect-worker") == before + 1
    run_flow(stack, tmp_path, "again", 'print("polled again")')
    assert all_healthy(stack)


def test_the_supervisor_backs_off_a_service_that_keeps_crashing(tmp_path: Path) -> None:
    """Restarted at once after its first crash, then 2 s and 4 s later (no stack: a service that exits at once)."""
    processes.spawn(tmp_path, "s3", ["sh", "-c", "exit 3"], dict(os.environ), tmp_path)
    watches: dict[str, supervise.Watch] = {}
    restarted_at = []
    deadline = time.monotonic() + 7.5
    try:
        while time.monotonic() < deadline:
            supervise.check(tmp_path, watches)
            if supervise.restarts(tmp_path).get("s3", 0) > len(restarted_at):
                restarted_at.append(time.monotonic())
            time.sleep(0.05)
    finally:
        processes.stop(tmp_path, "s3", grace=0)
    gaps = [later - earlier for earlier, later in pairwise(restarted_at)]
    assert len(gaps) == 2 and 1.9 < gaps[0] < 3 and 3.9 < gaps[1] < 5, gaps


def cluster(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`kiln cluster ARGS`, as a user would type it."""
    return run([sys.executable, "-c", "from cli.cluster import app; app()", *args], cwd=REPO, check=check)


def test_cluster_restart_restarts_a_service_with_its_recorded_environment(stack: Stack) -> None:
    previous, before = processes.recorded(stack.root)["mlflow"], restarts(stack, "mlflow")
    shown = cluster("restart", "mlflow", "--root", str(stack.root)).stdout
    assert f"restarted mlflow in {stack.root}" in shown
    restarted(stack, "mlflow", previous, lambda: servers.mlflow_ready(stack.env["MLFLOW_TRACKING_URI"]))
    assert restarts(stack, "mlflow") == before, "a restart on purpose is not a crash: the supervisor left it alone"
    report = cluster("status", "--root", str(stack.root)).stdout
    assert re.search(rf"^mlflow +\d+ +\d+ +\d+ MiB +{before} +healthy$", report, re.M), report
    assert report.count("healthy") == len(processes.recorded(stack.root)), report
    refused = cluster("restart", "ray-head", "--root", str(stack.root), check=False)
    assert refused.returncode == 1 and "ray-head: not a running service" in refused.stderr, refused.stderr
    assert all_healthy(stack)


@pytest.fixture
def cli_root() -> Iterator[Path]:
    """A root the `postgres` user can enter (pytest's temp dirs are root-only), removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="kiln-cli-stack-"))
    root.chmod(0o755)
    yield root / "cluster"
    shutil.rmtree(root, ignore_errors=True)


def test_the_cli_starts_reports_and_stops_a_stack_leaving_nothing_behind(stack: Stack, cli_root: Path) -> None:
    """A second, one-node stack beside the session's: `kiln cluster up`, `status`, `down --purge`."""
    shown = cluster("up", "--root", str(cli_root), "--ray-nodes", "1", "--cpus-per-node", "1").stdout
    env = read_env(cli_root / "kiln.env")
    try:
        for url in (env["MLFLOW_TRACKING_URI"], env["PREFECT_API_URL"].removesuffix("/api"), env["RAY_ADDRESS"]):
            assert url in shown
        assert f"set -a; . {cli_root.resolve() / 'kiln.env'}; set +a" in shown
        assert re.search(r"up in \d+ s, \d+ MiB resident", shown), shown
        assert set(env) == ENV_KEYS and env["RAY_ADDRESS"] != stack.env["RAY_ADDRESS"]
        assert (cli_root / "postgres" / "PG_VERSION").is_file(), "root is reachable, so Postgres keeps its data there"
        report = cluster("status", "--root", str(cli_root)).stdout
        assert report.count("healthy") == 7 and re.search(r"^supervisor .* healthy$", report, re.M), report
        again = cluster("up", "--root", str(cli_root), check=False)
        assert again.returncode == 1 and "already running" in again.stderr
        started = stack_pids(cli_root)
        assert len(started) > 6
    finally:
        cluster("down", "--root", str(cli_root), "--purge")
    cluster("down", "--root", str(cli_root))  # idempotent
    assert not [pid for pid in started if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert not stack_pids(cli_root)
    assert sorted(path.name for path in cli_root.iterdir()) == ["logs"]
    assert all(service.healthy for service in status(stack.root)), "the session's stack is left alone"


@pytest.mark.skipif(os.geteuid() != 0, reason="as another user, PostgreSQL runs as that user in root/postgres")
def test_postgres_data_goes_where_the_postgres_user_can_reach(tmp_path: Path, cli_root: Path) -> None:
    assert postgres.default_data_dir(tmp_path).parent == Path("/var/lib/kiln"), "pytest's temp dirs are root-only"
    cli_root.mkdir()
    assert postgres.default_data_dir(cli_root) == cli_root / "postgres"
