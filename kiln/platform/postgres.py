"""PostgreSQL for the stack: one database cluster (created once, kept across restarts) holding the `mlflow` and
`prefect` databases, listening on the stack's host only (no Unix socket), with password authentication. PostgreSQL
refuses to run as root, so as root its commands run as the `postgres` system user, in a data directory that user owns.
"""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import psycopg

from kiln.platform.processes import StackError, as_user, spawn

USER = "kiln"
DATABASES = ("mlflow", "prefect")
INSTALL = "install PostgreSQL's server: `apt-get install postgresql` (or `make postgres`)"


def binaries() -> Path:
    """The folder holding initdb, postgres and pg_ctl: Debian's newest /usr/lib/postgresql/*/bin, else the PATH's."""
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda path: int(Path(path).parts[-3]))
    found = versions[-1] if versions else shutil.which("initdb")
    if not found:
        raise StackError(f"PostgreSQL's initdb was not found: {INSTALL}")
    return Path(found).resolve().parent


def server_user() -> str | None:
    """Who runs PostgreSQL: `postgres` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise StackError(f"running as root needs the `postgres` system user: {INSTALL}") from None
    return "postgres"


def _run(command: list[str], cwd: Path) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, **as_user(server_user()))
    if result.returncode:
        raise StackError(f"`{' '.join(command)}` exited {result.returncode}:\n{result.stdout[-2000:]}"
                         f"{result.stderr[-2000:]}")


def reachable(path: Path) -> bool:
    """Whether the server's user can enter `path` (and so every folder above it)."""
    user = server_user()
    return user is None or subprocess.run(["test", "-x", str(path)], **as_user(user)).returncode == 0


def default_data_dir(root: Path) -> Path:
    """root/postgres, or, as root when the `postgres` user cannot reach `root` (a home or pytest folder),
    /var/lib/kiln/postgres-<hash of root>."""
    if reachable(root):
        return root / "postgres"
    return Path("/var/lib/kiln") / f"postgres-{hashlib.sha256(str(root).encode()).hexdigest()[:12]}"


def _own(path: Path) -> None:
    user = server_user()
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def initialise(data: Path, password: str) -> None:
    """Create the database cluster in `data` with the superuser `kiln`, unless it exists."""
    if (data / "PG_VERSION").is_file():
        return
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    _own(data)
    if not reachable(data):
        raise StackError(f"the postgres user cannot reach {data}; choose a data directory it can enter")
    secret = data.with_name(f".{data.name}.password")
    secret.touch(mode=0o600)
    try:
        secret.write_text(password + "\n")
        _own(secret)
        _run([str(binaries() / "initdb"), "-D", str(data), "-U", USER, f"--pwfile={secret}", "--auth=scram-sha-256",
              "--encoding=UTF8", "--locale=C", "--no-instructions"], cwd=data)
    finally:
        secret.unlink(missing_ok=True)


def start(root: Path, data: Path, host: str, port: int) -> int:
    """Run the server in the foreground of a session of its own (its log is the stack's postgres.log)."""
    command = [str(binaries() / "postgres"), "-D", str(data), "-c", f"listen_addresses={host}", "-c", f"port={port}",
               "-c", "unix_socket_directories="]
    return spawn(root, "postgres", command, dict(os.environ), cwd=data, user=server_user())


def url(password: str, host: str, port: int) -> str:
    """The server's URL without a database: append /mlflow or /prefect."""
    return f"postgresql://{USER}:{password}@{host}:{port}"


def ready(server: str, data: Path) -> bool:
    """Whether the server accepts our password; a refused password fails at once."""
    try:
        psycopg.connect(f"{server}/postgres", connect_timeout=2).close()
    except psycopg.OperationalError as exc:
        if "password authentication failed" in str(exc):
            raise StackError(f"the database in {data} refuses the password in kiln.env (it was created with another "
                             f"one): restore that kiln.env, or delete {data} to start with empty databases") from None
        return False
    return True


def create_databases(server: str) -> None:
    with psycopg.connect(f"{server}/postgres", autocommit=True) as connection:
        existing = {row[0] for row in connection.execute("select datname from pg_database")}
        for name in DATABASES:
            if name not in existing:
                connection.execute(f'create database "{name}"')


def stop(data: Path) -> None:
    """`pg_ctl stop -m fast` if a server runs in `data`."""
    if (data / "postmaster.pid").is_file():
        _run([str(binaries() / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w", "-t", "60"], cwd=data)
