"""The service stack kiln runs on at scale, started natively on one machine: PostgreSQL (the MLflow and Prefect
databases), SeaweedFS S3 (MLflow artifacts, the DVC remote, Ray checkpoints), an MLflow server proxying artifacts, a
Prefect server with the process work pool `kiln-cluster` and a worker, and a Ray cluster of one or more nodes. Every
service listens on the stack's host (127.0.0.1 unless told otherwise) except Ray's own gRPC servers: Ray 2.60 maps a
loopback node address to the machine's address and its GCS, raylet and worker gRPC servers listen on every interface,
guarded by the cluster's token authentication (RAY_AUTH_MODE=token). Secrets come from the environment or are
generated, and are written only to kiln.env and the services' records. A supervisor (kiln.platform.supervise) restarts
a crashed service other than a Ray node; `restart` restarts services on purpose.

    root/
      kiln.env        what kiln's commands need (KEY=VALUE, mode 0600): `set -a; . kiln.env; set +a`
      stack.json      ports, URLs and data locations, kept so that a restart keeps its URLs and data
      pids.json       the session id of each running service (gone after `down`)
      services/       NAME.json: the command, environment and directory each service was started with (mode 0600)
      restarts.json   how many times the supervisor restarted each service since `up`
      logs/NAME.log   each service's output
      s3/ prefect/    SeaweedFS's data, Prefect's home
      worker/         the Prefect worker's working directory (unless `worker_dir` says otherwise)
      postgres/       PostgreSQL's data, unless the `postgres` user cannot reach root (see postgres.default_data_dir)
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shlex
import shutil
import socket
import sys
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kiln.platform import objectstore, postgres, processes, raynodes, servers, supervise
from kiln.platform.processes import StackError

ENV_FILE = "kiln.env"
STATE_FILE = "stack.json"
BIN = Path(sys.executable).parent
DVC_REMOTE = f"s3://{objectstore.BUCKETS['dvc']}/cache"
STORAGE_PATH = f"s3://{objectstore.BUCKETS['ray']}/checkpoints"
MLFLOW_ARTIFACTS = f"s3://{objectstore.BUCKETS['mlflow']}"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StackSettings:
    root: Path                            # all state: data dirs, logs/<service>.log, pids, kiln.env
    host: str = "127.0.0.1"
    ray_nodes: int = 1                    # the test session uses 2
    cpus_per_ray_node: int | None = None  # None: the machine's CPUs shared out between the nodes (all on one node)
    worker_dir: Path | None = None        # the Prefect worker's working directory (default root/"worker"; never a repo)
    postgres_dir: Path | None = None      # PostgreSQL's data (default: postgres.default_data_dir(root))


@dataclass(frozen=True)
class Stack:
    root: Path
    env: dict[str, str]      # what kiln's commands need; also written to root/"kiln.env" as KEY=VALUE lines
    urls: dict[str, str]     # service name -> URL, for people
    env_file: Path
    startup_seconds: float = 0.0


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int           # the service's session id
    processes: int     # live processes in its session
    rss: int           # their resident memory, bytes
    healthy: bool
    restarts: int      # by the supervisor, after a crash, since `up`


def read_env(path: Path) -> dict[str, str]:
    """The KEY=VALUE lines of an env file (values as the shell reads them)."""
    if not path.is_file():
        return {}
    pairs = (line.partition("=") for line in path.read_text().splitlines() if "=" in line and not line.startswith("#"))
    return {key: "".join(shlex.split(value)) for key, _, value in pairs}


def write_env(path: Path, env: dict[str, str]) -> None:
    """Write `env` as KEY=VALUE lines readable by the owner only (it holds secrets)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.writelines(f"{key}={shlex.quote(value)}\n" for key, value in env.items())


def _state(root: Path) -> dict:
    path = root / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _ports(host: str, previous: dict[str, dict[str, int]], ray_nodes: int) -> dict[str, dict[str, int]]:
    """Every port of the stack, by service: the previous run's where still free (so URLs survive a restart), else new
    free ones. SeaweedFS's admin port also needs admin + 10000 free."""
    wanted = {"postgres": ("port",), "s3": objectstore.PORTS, "mlflow": ("port",), "prefect": ("port",),
              "ray-head": raynodes.HEAD_PORTS, **{f"ray-node-{n}": raynodes.NODE_PORTS for n in range(1, ray_nodes)}}
    taken: set[int] = set()

    def usable(port: int | None, offset: int) -> bool:
        return (port is not None and port not in taken and port + offset < 65536 and processes.is_free(host, port)
                and (not offset or processes.is_free(host, port + offset)))

    ports: dict[str, dict[str, int]] = {}
    for service, names in wanted.items():
        ports[service] = {}
        for name in names:
            offset = objectstore.ADMIN_GRPC_OFFSET if (service, name) == ("s3", "admin") else 0
            port = previous.get(service, {}).get(name)
            while not usable(port, offset):
                port = processes.free_port(host)
            taken.update({port, port + offset} if offset else {port})
            ports[service][name] = port
    return ports


def _secrets(previous: dict[str, str]) -> dict[str, str]:
    """The S3 keys and Ray token from the environment, else the previous env file, else new; the Postgres password
    from the previous env file (it was set when the database was created), else new."""
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    source = next((env for env in (os.environ, previous) if all(env.get(key) for key in keys)), None)
    s3 = {key: source[key] for key in keys} if source else {keys[0]: f"KILN{secrets.token_hex(8).upper()}",
                                                               keys[1]: secrets.token_hex(20)}
    password = urllib.parse.urlsplit(previous.get("KILN_POSTGRES_URL", "")).password or secrets.token_hex(16)
    token = os.environ.get("RAY_AUTH_TOKEN") or previous.get("RAY_AUTH_TOKEN") or secrets.token_hex(32)
    return {**s3, "RAY_AUTH_TOKEN": token, "postgres_password": password}


def _urls(host: str, ports: dict[str, dict[str, int]]) -> dict[str, str]:
    return {"postgres": f"postgresql://{host}:{ports['postgres']['port']}",
            "s3": f"http://{host}:{ports['s3']['s3']}",
            "mlflow": f"http://{host}:{ports['mlflow']['port']}",
            "prefect": f"http://{host}:{ports['prefect']['port']}",
            "ray": f"{host}:{ports['ray-head']['gcs']}"}


def _env(urls: dict[str, str], secret: dict[str, str], host: str, ports: dict[str, dict[str, int]]) -> dict[str, str]:
    return {
        "MLFLOW_TRACKING_URI": urls["mlflow"], "PREFECT_API_URL": f"{urls['prefect']}/api",
        "RAY_ADDRESS": urls["ray"], "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secret["RAY_AUTH_TOKEN"],
        "AWS_ACCESS_KEY_ID": secret["AWS_ACCESS_KEY_ID"], "AWS_SECRET_ACCESS_KEY": secret["AWS_SECRET_ACCESS_KEY"],
        "AWS_ENDPOINT_URL": urls["s3"], "AWS_ENDPOINT_URL_S3": urls["s3"], "AWS_DEFAULT_REGION": objectstore.REGION,
        "KILN_DVC_REMOTE": DVC_REMOTE, "KILN_STORAGE_PATH": STORAGE_PATH, "KILN_MLFLOW_ARTIFACTS": MLFLOW_ARTIFACTS,
        "KILN_WORK_POOL": servers.WORK_POOL,
        "KILN_POSTGRES_URL": postgres.url(secret["postgres_password"], host, ports["postgres"]["port"]),
    }


def _base_env() -> dict[str, str]:
    """This environment for the services, without another stack's addresses, the venv's tools first on PATH."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "RAY_ADDRESS", processes.MARKER)}
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}


def _worker_dir(settings: StackSettings, root: Path) -> Path:
    worker_dir = (settings.worker_dir or root / "worker").resolve()
    if (worker_dir / ".git").exists():
        raise StackError(f"the Prefect worker's directory {worker_dir} is a git repository; flow runs clone their own")
    worker_dir.mkdir(parents=True, exist_ok=True)
    return worker_dir


def up(settings: StackSettings) -> Stack:
    """Start every service, wait until each is healthy, write root/kiln.env and return the stack. A failure stops
    what was started and raises StackError naming the service and the end of its log."""
    started = time.perf_counter()
    if settings.ray_nodes < 1:
        raise StackError(f"ray_nodes must be at least 1 (the head), not {settings.ray_nodes}")
    root = settings.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    if any(processes.session(pid) for pid in processes.recorded(root).values()):
        raise StackError(f"a stack is already running in {root}: `kiln cluster down --root {root}` first")
    (root / processes.PIDS).unlink(missing_ok=True)
    (root / supervise.COUNTS).unlink(missing_ok=True)
    state, previous = _state(root), read_env(root / ENV_FILE)
    host = settings.host
    ports = _ports(host, state.get("ports", {}), settings.ray_nodes)
    secret, urls = _secrets(previous), _urls(host, ports)
    env = _env(urls, secret, host, ports)
    data = (settings.postgres_dir or (Path(state["postgres_dir"]) if state.get("postgres_dir") else None)
            or postgres.default_data_dir(root)).resolve()
    worker_dir = _worker_dir(settings, root)
    (root / STATE_FILE).write_text(json.dumps({"host": host, "ports": ports, "urls": urls, "postgres_dir": str(data),
                                               "ray_temp_dir": str(raynodes.temp_dir(root))}, indent=1))
    write_env(root / ENV_FILE, env)  # first: it keeps the secrets the data is created with, even if a start fails
    cpus = settings.cpus_per_ray_node or max(1, len(os.sched_getaffinity(0)) // settings.ray_nodes)
    try:
        _start(root, host, ports, env, secret["postgres_password"], data, worker_dir, settings.ray_nodes, cpus)
    except BaseException:
        down(root)
        raise
    return Stack(root, env, urls, root / ENV_FILE, time.perf_counter() - started)


def _start(root: Path, host: str, ports: dict[str, dict[str, int]], env: dict[str, str], password: str, data: Path,
           worker_dir: Path, ray_nodes: int, cpus: int) -> None:
    """Start the services, each group while the previous one's dependencies come up."""
    base = _base_env()
    s3_env = {key: env[key] for key in env if key.startswith("AWS_")}
    database = postgres.url(password, host, ports["postgres"]["port"])
    (root / "s3").mkdir(exist_ok=True)

    postgres.initialise(data, password)
    postgres.start(root, data, host, ports["postgres"]["port"])
    processes.leaves_behind(root, "postgres", data / "postmaster.pid")  # a killed server's lock
    processes.spawn(root, "s3", objectstore.command(root / "s3", host, ports["s3"]), {**base, **s3_env}, root / "s3")
    processes.wait_for(root, "postgres", lambda: postgres.ready(database, data), f"accepting connections at {host}")
    postgres.create_databases(database)
    processes.wait_for(root, "s3", lambda: objectstore.ready(env["AWS_ENDPOINT_URL"], env["AWS_ACCESS_KEY_ID"],
                                                             env["AWS_SECRET_ACCESS_KEY"]), "S3 with the buckets")

    ray_env = {**base, **s3_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": env["RAY_AUTH_TOKEN"],
               **raynodes.SHUTDOWN_ENV}
    processes.spawn(root, "ray-head", raynodes.node_command(root, host, ports["ray-head"], cpus, None), ray_env, root)
    processes.spawn(root, "mlflow", servers.mlflow_command(host, ports["mlflow"]["port"], MLFLOW_ARTIFACTS),
                    {**base, **s3_env, **servers.mlflow_env(f"{database}/mlflow", env["AWS_ENDPOINT_URL"])}, root)
    prefect_home = root / "prefect"
    processes.spawn(root, "prefect-server", servers.prefect_server_command(host, ports["prefect"]["port"]),
                    {**base, **servers.prefect_env(prefect_home, f"{database}/prefect")}, root)

    gcs = ports["ray-head"]["gcs"]
    processes.wait_for(root, "ray-head", lambda: processes.listening(host, gcs), "its GCS listening")
    for node in range(1, ray_nodes):
        name = f"ray-node-{node}"
        processes.spawn(root, name, raynodes.node_command(root, host, ports[name], cpus, env["RAY_ADDRESS"]), ray_env,
                        root)
    api = env["PREFECT_API_URL"]
    processes.wait_for(root, "prefect-server", lambda: servers.prefect_ready(api), f"{api}/health")
    cli_env = {**base, **servers.prefect_env(prefect_home), "PREFECT_API_URL": api}
    servers.create_work_pool(cli_env, root)
    worker_env = {**base, **env, **servers.prefect_env(prefect_home), "GIT_CEILING_DIRECTORIES": str(worker_dir.parent)}
    worker = f"kiln-{socket.gethostname()}"
    processes.spawn(root, "prefect-worker", servers.worker_command(worker), worker_env, worker_dir)
    processes.wait_for(root, "mlflow", lambda: servers.mlflow_ready(env["MLFLOW_TRACKING_URI"]), "its /health")
    raynodes.wait_for_nodes(env["RAY_ADDRESS"], ray_nodes, {**ray_env, "RAY_ADDRESS": env["RAY_ADDRESS"]})
    processes.wait_for(root, "prefect-worker", lambda: worker in servers.online_workers(api),
                       f"online in the work pool {servers.WORK_POOL}")
    processes.spawn(root, supervise.NAME, supervise.command(root), base, root)


def _stop(root: Path, name: str, state: dict) -> None:
    """Stop one service: PostgreSQL with `pg_ctl stop` first (a SIGTERM would wait for its clients to leave)."""
    if name == "postgres" and state.get("postgres_dir"):
        try:
            postgres.stop(Path(state["postgres_dir"]))
        except StackError as exc:
            log.warning("%s; stopping its processes", exc)
    processes.stop(root, name)


def down(root: Path, purge: bool = False) -> None:
    """Stop everything `up` started in `root` (the supervisor first, each service's session, PostgreSQL with `pg_ctl
    stop`, then any process still carrying the stack's marker); idempotent. With `purge`, also delete its data, state
    and kiln.env (its databases, buckets and Ray's session files), keeping only root/logs."""
    root = root.resolve()
    state = _state(root)
    with supervise.held(root):
        processes.stop(root, supervise.NAME)
        for name in reversed(processes.recorded(root)):
            _stop(root, name, state)
        processes.sweep(root)
        if purge and root.is_dir():
            data = [Path(state[key]) for key in ("postgres_dir", "ray_temp_dir") if state.get(key)]
            for path in [*data, *(entry for entry in root.iterdir() if entry.name != "logs")]:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def restart(root: Path, names: list[str] | None = None) -> list[str]:
    """Restart the named services (all that the supervisor watches when none are named), each with the command and
    environment it was first started with, one after another in start order, each healthy before the next; the
    names restarted. The supervisor leaves them alone meanwhile."""
    root = root.resolve()
    running = [name for name in processes.recorded(root) if name in supervise.SUPERVISED]
    if not running:
        raise StackError(f"no stack runs in {root}")
    if unknown := sorted(set(names or ()) - set(running)):
        raise StackError(f"{', '.join(unknown)}: not a running service of the stack in {root}; restart one of "
                         f"{', '.join(running)}")
    chosen = [name for name in running if not names or name in names]
    state, checks = _state(root), _checks(root)
    with supervise.held(root):
        for name in reversed(chosen):
            _stop(root, name, state)
        for name in chosen:
            processes.respawn(root, name)
            processes.wait_for(root, name, checks[name], "its health check")
    return chosen


def _checks(root: Path) -> dict[str, Callable[[], bool]]:
    """A health check per service, from the ports in stack.json."""
    state = _state(root)
    host, ports, urls = state["host"], state["ports"], state["urls"]
    checks = {"postgres": lambda: processes.listening(host, ports["postgres"]["port"]),
              "s3": lambda: processes.listening(host, ports["s3"]["s3"]),
              "mlflow": lambda: servers.mlflow_ready(urls["mlflow"]),
              "prefect-server": lambda: servers.prefect_ready(f"{urls['prefect']}/api"),
              "prefect-worker": lambda: bool(servers.online_workers(f"{urls['prefect']}/api")),
              "ray-head": lambda: processes.listening(host, ports["ray-head"]["gcs"]),
              supervise.NAME: lambda: True}  # alive is healthy
    for name in ports:
        if name.startswith("ray-node-"):
            checks[name] = lambda port=ports[name]["node_manager"]: processes.listening(host, port)
    return checks


def status(root: Path) -> list[ServiceStatus]:
    """What runs of the stack in `root`: each recorded service's processes, memory, health and restarts."""
    root = root.resolve()
    checks = _checks(root) if (root / STATE_FILE).is_file() else {}
    counts = supervise.restarts(root)
    report = []
    for name, sid in processes.recorded(root).items():
        members = processes.session(sid)
        healthy = bool(members) and name in checks and checks[name]()
        report.append(ServiceStatus(name, sid, len(members), processes.rss(members), healthy, counts.get(name, 0)))
    return report


def stack_pids(root: Path) -> list[int]:
    """Every live process of the stack in `root`: its services' sessions and whatever carries its marker."""
    root = root.resolve()
    members = {pid for sid in processes.recorded(root).values() for pid in processes.session(sid)}
    return sorted(members | set(processes.marked(root)))


def memory(root: Path) -> int:
    """The stack's resident memory in bytes (the RSS sum of its processes)."""
    return processes.rss(stack_pids(root))
