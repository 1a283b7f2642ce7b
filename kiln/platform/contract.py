"""dvc.yaml is the contract between the stages: their order, the paths each command line names, and what each stage
outputs. The flow, the run summary and the benchmarks read paths from here rather than repeating them.

A stage's command is `python -m tasks STAGE --ROLE PATH ...`: every path the stage reads or writes is an option
there (`--best-config models/best_config.json` is role `best_config`), declared again as the stage's dep or out, as
tests/test_contract.py checks.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

DVC_FILE = "dvc.yaml"


@dataclass(frozen=True)
class Stage:
    name: str
    cmd: str
    paths: dict[str, Path]  # role -> path, from the command line's --ROLE PATH options
    deps: tuple[Path, ...]
    outs: tuple[Path, ...]  # outs, metrics and plots: everything the stage writes
    metrics: tuple[Path, ...]

    def output(self, name: str) -> Path:
        """The declared output whose file name is `name` (e.g. "trials.csv")."""
        found = [path for path in self.outs if path.name == name]
        if len(found) != 1:
            raise KeyError(f"stage {self.name!r} declares {len(found)} outputs named {name!r} in {DVC_FILE}")
        return found[0]


def _declared(entries: list) -> tuple[Path, ...]:
    """Paths of a dvc.yaml list whose items are paths or {path: options} mappings."""
    return tuple(Path(next(iter(entry)) if isinstance(entry, dict) else entry) for entry in entries or [])


def command_paths(cmd: str) -> dict[str, Path]:
    """The `--role path` options of a stage command, roles with `-` read as `_`."""
    words = shlex.split(cmd)
    return {word[2:].replace("-", "_"): Path(value) for word, value in zip(words, words[1:], strict=False)
            if word.startswith("--") and word != "--params"}


def stages(root: Path | str = ".") -> dict[str, Stage]:
    """The stages of `root`/dvc.yaml in the order it declares them, which is DAG order."""
    declared = yaml.safe_load((Path(root) / DVC_FILE).read_text())["stages"]
    return {name: Stage(name, body["cmd"], command_paths(body["cmd"]), _declared(body.get("deps")),
                        _declared(body.get("outs")) + _declared(body.get("metrics")) + _declared(body.get("plots")),
                        _declared(body.get("metrics")))
            for name, body in declared.items()}


def stage_path(stage: str, role: str, root: Path | str = ".") -> Path:
    """The path a stage's command gives for `role` (e.g. stage_path("train", "model") -> models/model.pt), under
    `root`."""
    return Path(root) / stages(root)[stage].paths[role]
