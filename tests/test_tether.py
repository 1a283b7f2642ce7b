"""A command kiln streams (`dvc repro` under `kiln run` or a Prefect flow run) dies with the process that started it,
grandchildren included, even when that process is SIGKILLed."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO, alive, until

pytestmark = pytest.mark.fault
STREAMER = ("from kiln.platform import shell; shell.stream(['bash', '-c', 'sleep 300 & echo pids $$ $!; wait'], "
            "echo=lambda out: print(out, flush=True))")


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=lambda signum: signum.name)
def test_a_streamed_command_and_its_children_die_with_the_streamer(signum: signal.Signals) -> None:
    streamer = subprocess.Popen([sys.executable, "-c", STREAMER], cwd=REPO, stdout=subprocess.PIPE, text=True)
    line = streamer.stdout.readline()
    assert line.startswith("pids "), line
    started = [int(pid) for pid in line.split()[1:]]  # bash (the command) and its background sleep (a grandchild)
    assert all(alive(pid) for pid in started)
    streamer.send_signal(signum)
    streamer.wait(timeout=10)
    until(lambda: not any(alive(pid) for pid in started), 15, f"still running after the streamer died: {started}",
          every=0.2)
