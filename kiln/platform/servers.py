"""The stack's MLflow and Prefect servers and its Prefect worker: command lines, environments and health checks.

Secrets (database passwords, S3 keys) reach the servers through their environment, never their command line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from kiln.platform.processes import StackError

BIN = Path(sys.executable).parent
WORK_POOL = "kiln-cluster"
MLFLOW_WORKERS = 1


def http_ok(url: str, body: dict | None = None) -> bytes | None:
    """The response body of a GET (or a JSON POST of `body`) to `url` if it answers 2xx, else None."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            return response.read()
    except OSError:
        return None


def mlflow_command(host: str, port: int, artifacts: str) -> list[str]:
    """`mlflow server` proxying artifacts to `artifacts` (s3://...), so its clients need no S3 keys."""
    return [str(BIN / "mlflow"), "server", "--host", host, "--port", str(port), "--workers", str(MLFLOW_WORKERS),
            "--serve-artifacts", "--artifacts-destination", artifacts]


def mlflow_env(database: str, s3_endpoint: str) -> dict[str, str]:
    """The server's settings: its Postgres store (psycopg 3), the S3 endpoint, and no job-runner processes."""
    return {"MLFLOW_BACKEND_STORE_URI": database.replace("postgresql://", "postgresql+psycopg://", 1),
            "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def mlflow_ready(url: str) -> bool:
    return http_ok(f"{url}/health") is not None


def prefect_server_command(host: str, port: int) -> list[str]:
    return [str(BIN / "prefect"), "server", "start", "--host", host, "--port", str(port)]


def prefect_env(home: Path, database: str | None = None) -> dict[str, str]:
    """Prefect's home under the stack's root, no telemetry, and for the server its Postgres database (asyncpg)."""
    env = {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if database is not None:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database.replace("postgresql://", "postgresql+asyncpg://", 1)
    return env


def prefect_ready(api: str) -> bool:
    return http_ok(f"{api}/health") is not None


def create_work_pool(env: dict[str, str], cwd: Path) -> None:
    """The process work pool `kiln-cluster` (left as it is if it exists)."""
    result = subprocess.run([str(BIN / "prefect"), "work-pool", "create", WORK_POOL, "--type", "process"], cwd=cwd,
                            env=env, capture_output=True, text=True, timeout=120)
    if result.returncode and "already exists" not in result.stdout + result.stderr:
        raise StackError(f"`prefect work-pool create {WORK_POOL}` failed:\n{result.stdout[-2000:]}{result.stderr}")


def worker_command(name: str) -> list[str]:
    return [str(BIN / "prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process", "--name", name]


def online_workers(api: str) -> list[str]:
    """The names of the pool's workers that Prefect reports ONLINE."""
    body = http_ok(f"{api}/work_pools/{WORK_POOL}/workers/filter", {})
    return [worker["name"] for worker in json.loads(body or b"[]") if worker.get("status") == "ONLINE"]
