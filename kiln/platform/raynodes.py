"""The stack's Ray cluster: a head and further nodes on one machine, each a `ray start --block` in a session of its
own (stopping it stops that node's processes and no other Ray instance's), every port chosen by the stack, and the
stack's S3 settings and auth token in the nodes' environment (Ray Train's s3:// storage goes through pyarrow, which
reads AWS_ENDPOINT_URL_S3 and the keys from the environment of the process that writes)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

from kiln.platform.processes import StackError

BIN = Path(sys.executable).parent
NODE_PORTS = ("node_manager", "object_manager", "runtime_env_agent", "dashboard_agent_grpc", "dashboard_agent_listen",
              "metrics_export")
HEAD_PORTS = ("gcs", *NODE_PORTS)
# The whole stack stops at once: a SIGTERMed node skips Ray's drain wait (up to 30 s for leases to come back).
SHUTDOWN_ENV = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
# Waits, in a driver of its own, until `count` nodes are alive.
PROBE = """import sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
while sum(node["Alive"] for node in ray.nodes()) < int(sys.argv[2]):
    time.sleep(0.5)
"""


def temp_dir(root: Path) -> Path:
    """The folder of this stack's Ray nodes' temp dirs, short enough for Ray's Unix socket paths wherever `root` is."""
    return Path(tempfile.gettempdir()) / f"kiln-ray-{hashlib.sha256(str(root).encode()).hexdigest()[:12]}"


def node_command(root: Path, host: str, ports: dict[str, int], cpus: int, head_address: str | None) -> list[str]:
    """`ray start --block` for the head (when `head_address` is None, `ports` has its GCS port) or a further node.
    Each node has a temp dir of its own, named by its raylet's port: a node's log monitor forwards every worker log in
    its session folder to the drivers, so nodes sharing one would each forward the other's lines too."""
    flags = {"node-ip-address": host, "num-cpus": cpus, "temp-dir": temp_dir(root) / str(ports["node_manager"]),
             **{f"{name.replace('_', '-')}-port": ports[name] for name in NODE_PORTS}}
    if head_address is None:
        role = ["--head", "--include-dashboard=false"]
        flags["port"] = ports["gcs"]
    else:
        role = []
        flags["address"] = head_address
    return [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *role,
            *(f"--{key}={value}" for key, value in flags.items())]


def wait_for_nodes(address: str, count: int, env: dict[str, str], timeout: float = 180) -> None:
    """Return when the cluster at `address` has `count` live nodes."""
    try:
        result = subprocess.run([sys.executable, "-c", PROBE, address, str(count)], env=env, capture_output=True,
                                text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise StackError(f"the Ray cluster at {address} did not reach {count} nodes in {timeout:.0f} s") from None
    if result.returncode:
        raise StackError(f"could not reach the Ray cluster at {address}:\n{result.stderr[-3000:]}")
