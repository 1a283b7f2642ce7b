"""Running the command-line tools kiln drives (dvc, git): streamed line by line (and tethered: a streamed command and
everything it starts die with this process), or captured; failures name the command and show its output."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


class CommandError(RuntimeError):
    """A command exited non-zero; the message names it and ends with its output."""


def run(command: Sequence[str], cwd: Path | str | None = None, env: dict[str, str] | None = None,
        ok_codes: Sequence[int] = (0,)) -> str:
    """Run `command` to completion and return its stdout; raise CommandError with its output if it exits with a code
    not in `ok_codes`."""
    result = subprocess.run(list(command), cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode not in ok_codes:
        raise CommandError(f"`{' '.join(command)}` exited {result.returncode}:\n{result.stdout[-3000:]}"
                           f"{result.stderr[-3000:]}")
    return result.stdout


def stream(command: Sequence[str], echo: Callable[[str], None], cwd: Path | str | None = None,
           env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `command`, passing each output line (stdout and stderr merged) to `echo` as it comes; returns the exit
    code and the whole output. The command runs under kiln.platform.tether: if this process dies, even by SIGKILL, the
    command and all it started are stopped instead of running on as orphans."""
    lines = []
    tethered = [sys.executable, "-m", "kiln.platform.tether", str(os.getpid()), *command]
    with subprocess.Popen(tethered, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as process:
        for line in process.stdout:
            echo(line.rstrip("\n"))
            lines.append(line)
    return process.returncode, "".join(lines)
