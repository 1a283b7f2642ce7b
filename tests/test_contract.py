"""dvc.yaml is the contract between the stages: each command names the paths its stage reads and writes, declared
again as deps and outs, and each stage's code deps cover every project module it imports (so editing one re-runs
the stage). The layering that keeps those lists short: kiln imports no stage, flow or Prefect; a stage imports no
other stage; a stage's kiln package imports only the packages it builds on; no two top-level folders import each
other, even through a third. What dvc.yaml declares is not repeated unchecked: every kiln package has a layer, every
report-name table names the stage's declared outputs, and `kiln reproduce` covers every stage."""

from __future__ import annotations

import ast
import importlib
import shlex
from pathlib import Path

import pytest
import yaml

from kiln.core.errors import InputError
from kiln.platform.codebase import imported_modules, stage_files
from kiln.platform.contract import stages
from kiln.platform.reproduce import POLICY, planned_stages
from kiln.tune.experiment import TRIAL_KEYS

REPO = Path(__file__).resolve().parents[1]
KILN_LAYERS = {  # a kiln package -> the kiln packages it may import, besides any package's catalog module
    "core": {"core"}, "prepare": {"core", "prepare"}, "train": {"core", "train"},
    "tune": {"core", "train", "tune"}, "compress": {"core", "train", "compress"}, "evaluate": {"core", "evaluate"},
    "platform": {"core", "platform"}, "finetune": {"core", "train", "evaluate", "finetune"}, "serve": {"core", "serve"},
}
FOLDERS = ("kiln", "tasks", "flows", "cli", "benchmarks")  # the top-level folders of code
REPORT_NAMES = {  # module.TABLE: its stage; a table maps roles to file names in the stage's --reports folder
    "kiln.evaluate.report.REPORTS": "evaluate", "kiln.evaluate.explain.REPORTS": "evaluate",
    "kiln.evaluate.record.REGISTRY_REPORTS": "evaluate", "kiln.evaluate.multitask.TASK_REPORTS": "evaluate",
    "kiln.tune.report.REPORTS": "tune", "tasks.compress.REPORTS": "compress",
    "kiln.finetune.report.REPORTS": "finetune",
}


def missing_code_deps(stage: str, root: Path = REPO) -> list[str]:
    """Project files the stage's command imports that none of its deps (a file or a folder) covers. A catalog module
    is not counted: a stage outside its package reads it only to validate params (as it reads every params section,
    and re-runs only for the sections dvc.yaml names), and the stages of its package depend on the package."""
    declared = stages(root)[stage].deps
    return sorted(str(file) for file in stage_files(stage, root) if not file.stem.endswith("catalog")
                  and not any(file == dep or dep in file.parents for dep in declared))


def unused_code_deps(stage: str, root: Path = REPO) -> list[str]:
    """Code deps (under kiln/ or tasks/) holding nothing the stage imports: they would re-run it for nothing."""
    imported = {file for file in stage_files(stage, root) if not file.stem.endswith("catalog")}
    return sorted(str(dep) for dep in stages(root)[stage].deps if dep.parts[0] in ("kiln", "tasks")
                  and not any(file == dep or dep in file.parents for file in imported))


@pytest.mark.parametrize("stage", list(stages(REPO)))
def test_code_deps_cover_every_module_the_stage_imports(stage: str) -> None:
    assert missing_code_deps(stage) == [], f"add these to stage {stage!r}'s deps in dvc.yaml"
    assert unused_code_deps(stage) == [], f"stage {stage!r} imports nothing from these deps"


def test_the_deps_check_bites(tmp_path: Path) -> None:
    """A dvc.yaml whose train stage lost a folder dep fails the check, naming the modules it no longer covers."""
    for name in ("kiln", "tasks"):
        (tmp_path / name).symlink_to(REPO / name)
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    spec["stages"]["train"]["deps"].remove("kiln/train")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(spec))
    missing = missing_code_deps("train", tmp_path)
    assert "kiln/train/loop.py" in missing and "kiln/train/distributed.py" in missing
    spec["stages"]["train"]["deps"].append("kiln/evaluate")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(spec))
    assert unused_code_deps("train", tmp_path) == ["kiln/evaluate"]


@pytest.mark.parametrize("stage", list(stages(REPO)))
def test_the_command_names_every_path_and_dvc_declares_them(stage: str) -> None:
    contract = stages(REPO)[stage]
    assert shlex.split(contract.cmd)[:4] == ["python", "-m", "tasks", stage]
    declared = set(contract.deps) | set(contract.outs)
    assert all(path in declared or any(out.is_relative_to(path) for out in contract.outs)
               for path in contract.paths.values()), f"{stage}: every path on the command line is a dep or an out"
    assert all(any(out == path or out.is_relative_to(path) for path in contract.paths.values())
               for out in contract.outs), f"{stage}: every output lies under a path the command names"
    assert all(dep.parts[0] in ("kiln", "tasks", "data") or dep in contract.paths.values()
               for dep in contract.deps), f"{stage}: every data dep is on the command line"


def test_stages_pass_paths_only_through_the_command_line() -> None:
    """No stage module or library module writes a pipeline path literally: dvc.yaml's command lines carry them."""
    outputs = {str(path) for stage in stages(REPO).values() for path in (*stage.paths.values(), *stage.outs)
               if len(path.parts) > 1}  # a bare word such as "models" is also a dictionary key
    for file in [*REPO.glob("tasks/*.py"), *REPO.glob("kiln/**/*.py"), *REPO.glob("flows/*.py"),
                 *REPO.glob("cli/*.py"), *REPO.glob("benchmarks/*.py")]:
        text = file.read_text()
        assert not [path for path in outputs if f'"{path}"' in text], f"{file.relative_to(REPO)} repeats a path"


def test_layers() -> None:
    for file in REPO.glob("kiln/**/*.py"):
        modules = imported_modules(file, REPO)
        assert not [m for m in modules if m.split(".")[0] in ("tasks", "flows", "benchmarks")], file
        assert "import prefect" not in file.read_text() and "from prefect" not in file.read_text(), file
        package = file.relative_to(REPO / "kiln").parts[0]
        if file.stem.endswith("catalog"):  # declarations every layer may read: they import nothing of kiln's
            assert not [m for m in modules if m.startswith("kiln.")], f"{file.relative_to(REPO)} imports kiln"
        if package in KILN_LAYERS:
            used = {m.split(".")[1] for m in modules if m.startswith("kiln.") and len(m.split(".")) > 2
                    and not m.endswith("catalog")}
            assert used <= KILN_LAYERS[package], f"{file.relative_to(REPO)} imports kiln.{used - KILN_LAYERS[package]}"
    for stage in stages(REPO):
        others = {f"tasks.{other}" for other in stages(REPO) if other != stage}
        assert not imported_modules(REPO / f"tasks/{stage}.py", REPO) & others, f"tasks/{stage}.py imports a stage"
    for file in REPO.glob("benchmarks/*.py"):
        assert not [m for m in imported_modules(file, REPO) if m.startswith("tasks")], f"{file} imports tasks"


def test_tune_reruns_when_a_train_key_its_trials_use_changes() -> None:
    """dvc.yaml's tune params are the train keys a trial uses (TRIAL_KEYS, which also name the Ray Tune experiment), and
    they cover every train key the recipe reads: a change to any of them re-runs tune."""
    declared = {key.removeprefix("train.") for key in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["tune"]
                ["params"] if key.startswith("train.")}
    assert declared - {"storage_path"} == TRIAL_KEYS  # storage_path: where trials keep checkpoints
    recipe = ast.parse((REPO / "kiln/train/recipe.py").read_text())
    read = {node.attr for function in recipe.body if isinstance(function, ast.FunctionDef)
            and function.name == "make_recipe" for node in ast.walk(function)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "train"}
    assert {"optimizer", "amp", "channels_last", "augmentation"} <= read <= TRIAL_KEYS, read - TRIAL_KEYS


def test_every_kiln_package_has_a_layer() -> None:
    """A package missing from KILN_LAYERS would never be checked by test_layers."""
    packages = sorted(path.parent.name for path in (REPO / "kiln").glob("*/__init__.py"))
    missing = [name for name in packages if name not in KILN_LAYERS]
    assert not missing, f"kiln.{', kiln.'.join(missing)}: add a row to KILN_LAYERS (the kiln packages it may import)"


def folder_imports(root: Path = REPO) -> dict[str, set[str]]:
    """Each top-level folder's imports of the other folders, read from every module's syntax tree."""
    graph: dict[str, set[str]] = {folder: set() for folder in FOLDERS}
    for folder in FOLDERS:
        for file in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                graph[folder].update(top for top in (name.split(".")[0] for name in names)
                                     if top in FOLDERS and top != folder)
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """A path of imports that comes back to where it started ([] if there is none)."""
    def visit(path: list[str]) -> list[str]:
        for after in sorted(graph.get(path[-1], ())):
            found = path[path.index(after):] + [after] if after in path else visit([*path, after])
            if found:
                return found
        return []

    return next((found for start in sorted(graph) if (found := visit([start]))), [])


def test_no_import_cycle_between_top_level_folders() -> None:
    found = cycle(folder_imports())
    assert not found, f"the top-level folders import each other: {' -> '.join(found)}"
    assert cycle({"tasks": {"kiln"}, "cli": {"tasks", "flows"}, "flows": {"kiln"}, "kiln": set()}) == []
    assert cycle({"cli": {"flows"}, "flows": {"tasks"}, "tasks": {"cli"}}) == ["cli", "flows", "tasks", "cli"]


@pytest.mark.parametrize("table", list(REPORT_NAMES))
def test_report_names_are_outputs_dvc_declares(table: str) -> None:
    module, _, name = table.rpartition(".")
    contract = stages(REPO)[REPORT_NAMES[table]]
    value = getattr(importlib.import_module(module), name)
    for file in value.values() if isinstance(value, dict) else [value]:  # a table, or one folder's name
        path = contract.paths["reports"] / file
        assert path in contract.outs, f"{table}: {path} is not among stage {contract.name}'s outputs in dvc.yaml"


def test_reproduce_covers_every_stage_and_refuses_a_new_one(tmp_path: Path) -> None:
    """`kiln reproduce` plans the stages POLICY checks; a stage it does not cover is refused, named, before any work."""
    assert planned_stages(REPO) == list(POLICY)
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    spec["stages"]["serve"] = {"cmd": "python -m tasks serve --model models/model.pt", "deps": ["models/model.pt"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(InputError, match=r"POLICY does not cover stage\(s\) serve;"):
        planned_stages(tmp_path)
