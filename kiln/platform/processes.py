"""The stack's long-running processes, and only those.

Each service starts in a session of its own (its pid is the session id), logs to root/logs/NAME.log, is recorded in
root/pids.json, carries KILN_STACK=root in its environment, and has its command, environment and directory kept in
root/services/NAME.json (mode 0600: the environment holds secrets), so that it can be started again alone. Stopping a
service signals every live process of its session; a final sweep also ends processes that left the session but
inherited the marker (a Prefect flow run in a session of its own). Other processes on the machine, other Ray
instances included, are never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

PIDS = "pids.json"
SPECS = "services"
MARKER = "KILN_STACK"


class StackError(RuntimeError):
    """A service is missing, would not start or did not become healthy; the message says what to do."""


def free_port(host: str) -> int:
    """A port nobody listens on at `host`, as the kernel picks it."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def is_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (connections of a stopped one lingering in TIME_WAIT do not
    count, as servers set SO_REUSEADDR)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def listening(host: str, port: int) -> bool:
    """Whether something accepts TCP connections at host:port."""
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True


def as_user(user: str | None) -> dict:
    """Popen arguments that run a command as `user` (only when we are root and `user` is set)."""
    if user is None or os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def recorded(root: Path) -> dict[str, int]:
    """Service name -> session id, in start order."""
    path = root / PIDS
    return json.loads(path.read_text()) if path.is_file() else {}


def _record(root: Path, name: str, pid: int | None) -> None:
    pids = recorded(root)
    if pid is None:
        pids.pop(name, None)
    else:
        pids[name] = pid
    if pids:
        (root / PIDS).write_text(json.dumps(pids, indent=1))
    else:
        (root / PIDS).unlink(missing_ok=True)


def log_path(root: Path, name: str) -> Path:
    return root / "logs" / f"{name}.log"


def _keep_spec(root: Path, name: str, spec: dict) -> None:
    folder = root / SPECS
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(folder / f"{name}.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(spec, handle, indent=1)


def _launch(root: Path, name: str, spec: dict) -> int:
    """Start the service `spec` describes in a new session with its output appended to its log; record its pid."""
    log = log_path(root, name)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(spec['command'])}\n".encode())
        out.flush()
        process = subprocess.Popen(spec["command"], cwd=spec["cwd"], env={**spec["env"], MARKER: str(root)},
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True, **as_user(spec["user"]))
    _record(root, name, process.pid)
    return process.pid


def spawn(root: Path, name: str, command: list[str], env: dict[str, str], cwd: Path, user: str | None = None) -> int:
    """Start `command` in a new session with its output appended to its log; record and return its pid, and keep
    what started it for `respawn`."""
    spec = {"command": command, "env": env, "cwd": str(cwd), "user": user, "leaves": []}
    _keep_spec(root, name, spec)
    return _launch(root, name, spec)


def _spec(root: Path, name: str) -> dict:
    return json.loads((root / SPECS / f"{name}.json").read_text())


def leaves_behind(root: Path, name: str, *paths: Path) -> None:
    """Note files that the service `name` leaves behind when killed and that would stop it from starting again (a pid
    file naming a zombie nobody reaped, or a pid since reused): `respawn` deletes them first."""
    spec = _spec(root, name)
    _keep_spec(root, name, {**spec, "leaves": [*spec["leaves"], *map(str, paths)]})


def respawn(root: Path, name: str) -> int:
    """Start the service `name` again as `spawn` first started it (once it is stopped, or dead with its session
    cleared); record and return its new pid."""
    spec = _spec(root, name)
    for path in spec["leaves"]:
        Path(path).unlink(missing_ok=True)
    return _launch(root, name, spec)


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, parent, group, session, ...); None when the
    process is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields


def leads(sid: int) -> bool:
    """Whether process `sid` lives (not a zombie) and still leads its session (its pid was not reused)."""
    fields = _stat(sid)
    return fields is not None and int(fields[3]) == sid


def _processes() -> dict[int, int]:
    """Every live (not zombie) process -> its parent."""
    return {int(entry): int(fields[1]) for entry in os.listdir("/proc")
            if entry.isdigit() and (fields := _stat(entry)) is not None}


def session(sid: int) -> list[int]:
    """The live processes of session `sid`, with their descendants that left it (PostgreSQL's backends)."""
    parents = _processes()
    members = set()
    for pid in parents:
        try:
            if os.getsid(pid) == sid:
                members.add(pid)
        except OSError:
            continue
    while grown := {pid for pid, parent in parents.items() if parent in members} - members:
        members |= grown
    return sorted(members)


def marked(root: Path) -> list[int]:
    """Live processes whose environment carries this stack's marker."""
    needle = f"\0{MARKER}={root}\0".encode()
    found = []
    for pid in _processes():
        try:
            environ = b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ and pid != os.getpid():
            found.append(pid)
    return found


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            continue


def reap(pid: int) -> None:
    """Collect the exit status of `pid` if it is our child, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _wait(left: Callable[[], list[int]], seconds: float) -> list[int]:
    """Poll `left` until it is empty or `seconds` pass; what is still alive."""
    deadline = time.monotonic() + seconds
    while (alive := left()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def terminate(find: Callable[[], list[int]], grace: float, leader: int | None = None) -> None:
    """SIGTERM `leader` alone first (a `ray start --block` or a server stops its own processes in order) and give it
    `grace` seconds to exit and 5 more for its processes; then SIGTERM whatever `find` still returns (and anything it
    returned before: orphans), wait 10 s, and SIGKILL what is left."""
    seen: set[int] = set()

    def left() -> list[int]:
        seen.update(find())
        return sorted(seen & set(_processes()))

    left()
    if leader is not None:
        _signal([leader], signal.SIGTERM)
        _wait(lambda: [pid for pid in left() if pid == leader], grace)
        _wait(left, 5)
    _signal(left(), signal.SIGTERM)
    _signal(_wait(left, 10), signal.SIGKILL)
    _wait(left, 10)


def stop(root: Path, name: str, grace: float = 30) -> None:
    """Stop the recorded service `name` and everything in its session; forget it."""
    sid = recorded(root).get(name)
    if sid is not None:
        terminate(lambda: session(sid), grace, leader=sid)
        reap(sid)
        _record(root, name, None)


def sweep(root: Path) -> None:
    """End any process that still carries this stack's marker."""
    terminate(lambda: marked(root), grace=0)


def rss(pids: list[int]) -> int:
    """Resident memory of `pids` in bytes."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except OSError:
            continue
    return total


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


def wait_for(root: Path, name: str, check: Callable[[], bool], what: str, timeout: float = 180) -> None:
    """Poll `check` until it holds; fail, showing the end of the service's log, if the service's session empties or
    `timeout` seconds pass."""
    sid = recorded(root)[name]
    deadline = time.monotonic() + timeout
    while not check():
        gone = not session(sid)
        if gone or time.monotonic() > deadline:
            reason = "exited" if gone else f"did not become ready in {timeout:.0f} s"
            raise StackError(f"{name} {reason} ({what}); end of {log_path(root, name)}:\n"
                             f"{tail(log_path(root, name))}")
        time.sleep(0.3)
