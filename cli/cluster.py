"""`kiln cluster`: the service stack of a single-machine team server (PostgreSQL, SeaweedFS S3, MLflow and Prefect
servers, a Prefect worker, a Ray cluster), started natively, on 127.0.0.1, with a supervisor that restarts a crashed
service."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from kiln.platform import stack, supervise
from kiln.platform.processes import StackError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
Root = Annotated[Path, typer.Option(help="The stack's state: data, logs, pids and kiln.env.")]
DEFAULT_ROOT = Path(".kiln/cluster")


def mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


@app.command()
def up(root: Root = DEFAULT_ROOT,
       ray_nodes: Annotated[int, typer.Option(min=1, help="Ray nodes on this machine (a head and N-1 more).")] = 1,
       cpus_per_node: Annotated[int | None, typer.Option(
           min=1, help="CPUs each Ray node offers (default: this machine's, shared out between the nodes).")] = None,
       host: Annotated[str, typer.Option(help="The address the services listen on (not Ray's gRPC).")] = "127.0.0.1",
       ) -> None:
    """Start the stack, wait until every service is healthy, and print the URLs and the env file to source."""
    print(f"cluster: starting the stack in {root.resolve()} ...", flush=True)
    try:
        started = stack.up(stack.StackSettings(root=root, host=host, ray_nodes=ray_nodes,
                                               cpus_per_ray_node=cpus_per_node))
    except StackError as exc:
        sys.exit(f"cluster up: {exc}")
    width = max(map(len, started.urls))
    for name, url in started.urls.items():
        print(f"  {name:<{width}}  {url}")
    print(f"up in {started.startup_seconds:.0f} s, {mib(stack.memory(started.root))} resident; logs in "
          f"{started.root / 'logs'}")
    print(f"environment: {started.env_file} (mode 0600, holds secrets); use it with\n"
          f"  set -a; . {started.env_file}; set +a")
    print(f"stop it with: kiln cluster down --root {root}")


@app.command()
def down(root: Root = DEFAULT_ROOT,
         purge: Annotated[bool, typer.Option(help="Also delete its data (databases, buckets); logs stay.")] = False,
         ) -> None:
    """Stop every process the stack started (nothing else); the data stays unless --purge."""
    stack.down(root, purge=purge)
    print(f"cluster: stopped the stack in {root.resolve()}" + (" and deleted its data" if purge else ""))


@app.command()
def restart(service: Annotated[str | None, typer.Argument(
                help=f"One of {', '.join(supervise.SUPERVISED)} (default: all of them).")] = None,
            root: Root = DEFAULT_ROOT) -> None:
    """Restart a service (or every one the supervisor watches) with the environment it was started with, and wait
    until it is healthy."""
    try:
        restarted = stack.restart(root, [service] if service else None)
    except StackError as exc:
        sys.exit(f"cluster restart: {exc}")
    print(f"cluster: restarted {', '.join(restarted)} in {root.resolve()}")


@app.command()
def status(root: Root = DEFAULT_ROOT) -> None:
    """Each service of the stack: its processes, memory, health and restarts after a crash."""
    services = stack.status(root)
    if not services:
        sys.exit(f"cluster: no stack runs in {root.resolve()}")
    print(f"{'service':<16}{'pid':>8}{'procs':>7}{'memory':>11}{'restarts':>10}  health")
    for service in services:
        health = "healthy" if service.healthy else ("DOWN" if not service.processes else "UNHEALTHY")
        print(f"{service.name:<16}{service.pid:>8}{service.processes:>7}{mib(service.rss):>11}{service.restarts:>10}"
              f"  {health}")
    print(f"total {mib(stack.memory(root))} resident")
    if not all(service.healthy for service in services):
        raise typer.Exit(1)
