"""`python -m kiln.platform.tether PARENT_PID COMMAND...`: run COMMAND in a process group of its own that dies with the
process PARENT_PID, even when that one is SIGKILLed (the OOM killer, a crashed Prefect flow run).

Linux tells this process of its parent's death (PR_SET_PDEATHSIG), and it stops COMMAND's whole group: `dvc repro`,
the stage it runs and the stage's Ray driver, not only the first of them. A signal this process gets (Ctrl-C, a
worker's SIGTERM) goes to the whole group too; what is still running GRACE_SECONDS later is killed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
GRACE_SECONDS = 10


def stop_group(group: int, signum: int) -> None:
    """Send `signum` to the process group, then SIGKILL it if any member outlives GRACE_SECONDS."""
    try:
        os.killpg(group, signum)
        deadline = time.monotonic() + GRACE_SECONDS
        while time.monotonic() < deadline:
            os.killpg(group, 0)  # raises once no member is left
            time.sleep(0.2)
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(parent: int, command: list[str]) -> int:
    """Run `command` tethered to `parent`; returns its exit code (128 + N when a signal N stopped it)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        return 128 + signal.SIGTERM
    child = subprocess.Popen(command, start_new_session=True)

    def forward(signum: int, _frame: object) -> None:
        stop_group(child.pid, signum)
        sys.exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2:]))
