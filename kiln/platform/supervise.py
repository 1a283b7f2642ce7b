"""The stack's supervisor: `python -m kiln.platform.supervise ROOT`, a service of the stack that `up` starts last and
`down` stops first. It restarts a crashed PostgreSQL, SeaweedFS, MLflow server, Prefect server or Prefect worker as it
was first started (processes.respawn), at once after a first crash, then after 2, 4, 8 ... up to 60 s while each
restart crashes within a minute, and counts restarts in root/restarts.json. Ray nodes are left to Ray.

Whoever stops or restarts services on purpose (`down`, `restart`) holds the lock on the root folder meanwhile; the
supervisor looks at the services only while holding it, so it never sees them stopping.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kiln.platform import processes

NAME = "supervisor"
SUPERVISED = ("postgres", "s3", "mlflow", "prefect-server", "prefect-worker")
COUNTS = "restarts.json"
POLL_SECONDS = 1.0
STABLE_SECONDS = 60.0  # a service up this long has recovered: its next crash is restarted at once
MAX_DELAY_SECONDS = 60.0
log = logging.getLogger(__name__)


def command(root: Path) -> list[str]:
    return [sys.executable, "-m", __name__, str(root)]


@contextmanager
def held(root: Path) -> Iterator[None]:
    """Hold the stack's lock (an flock on `root` itself, so no file is left behind); a no-op if `root` is missing."""
    if not root.is_dir():
        yield
        return
    descriptor = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def restarts(root: Path) -> dict[str, int]:
    """Service name -> how many times the supervisor restarted it since `up`."""
    path = root / COUNTS
    return json.loads(path.read_text()) if path.is_file() else {}


def delay(failures: int) -> float:
    """Seconds before restarting a service after its `failures`-th crash in a row."""
    return 0.0 if failures <= 1 else min(2.0 ** (failures - 1), MAX_DELAY_SECONDS)


@dataclass
class Watch:
    sid: int                  # the session the supervisor last saw recorded
    started: float            # when it saw it start (monotonic)
    failures: int = 0         # crashes in a row, each within STABLE_SECONDS of the restart before
    due: float | None = None  # when to restart it, once it crashed


def _restart(root: Path, name: str, watch: Watch) -> None:
    """Clear what the crashed service left in its session, start it again and count it."""
    processes.terminate(lambda: processes.session(watch.sid), grace=0)
    processes.reap(watch.sid)
    watch.sid = processes.respawn(root, name)
    counts = restarts(root)
    counts[name] = counts.get(name, 0) + 1
    (root / COUNTS).write_text(json.dumps(counts, indent=1))
    log.warning("restarted %s (pid %d), restart %d", name, watch.sid, counts[name])


def check(root: Path, watches: dict[str, Watch]) -> None:
    """One round, under the lock: note each supervised service that crashed, and restart those whose backoff has
    passed."""
    with held(root):
        now = time.monotonic()
        for name, sid in processes.recorded(root).items():
            if name not in SUPERVISED:
                continue
            watch = watches.get(name)
            if watch is None or watch.sid != sid:
                watch = watches[name] = Watch(sid, now)
            if processes.leads(sid):
                continue
            if watch.due is None:
                watch.failures = watch.failures + 1 if now - watch.started < STABLE_SECONDS else 1
                watch.due = now + delay(watch.failures)
                log.warning("%s (pid %d) exited; restarting it in %.0f s", name, sid, watch.due - now)
            if now >= watch.due:
                try:
                    _restart(root, name, watch)
                except (OSError, ValueError):
                    log.exception("could not restart %s; trying again later", name)
                watch.started, watch.due = time.monotonic(), None


def main(root: Path) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    log.info("supervising %s in %s", ", ".join(SUPERVISED), root)
    watches: dict[str, Watch] = {}
    while True:
        check(root, watches)
        time.sleep(POLL_SECONDS)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
