"""The project's own code as files: which modules a file imports (transitively, read from its source, not run) and
a hash of what they mean (an edit to a comment or a docstring changes nothing). The contract test checks stages'
code deps with it; benchmarks stamp their results with it."""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

PACKAGES = ("kiln", "tasks", "flows", "benchmarks")  # the project's own top-level packages
STAGE_ENTRY = ("tasks/__main__.py", "tasks/stages.py")  # what `python -m tasks STAGE` runs before the stage module


def module_file(name: str, root: Path) -> Path | None:
    """The file of project module `name` under `root` (a module or a package's __init__), or None."""
    path = root.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(file: Path, root: Path) -> set[str]:
    """Project modules `file` imports anywhere in its body (function-level imports included), with the packages
    Python runs on the way (a.b.c imports a and a.b too)."""
    names = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    found = set()
    for name in names:
        if name.split(".")[0] in PACKAGES:
            parts = name.split(".")
            found.update(".".join(parts[:end]) for end in range(1, len(parts) + 1)
                         if module_file(".".join(parts[:end]), root))
    return found


def docstring_only(file: Path) -> bool:
    """A module with nothing but a docstring (a package's map) cannot change what the code computes."""
    body = ast.parse(file.read_text()).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def closure(files: list[Path], root: Path) -> set[Path]:
    """Every project file with code that importing `files` runs, transitively, relative to `root`."""
    seen, todo = set(), list(files)
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        todo.extend(module_file(name, root) for name in imported_modules(file, root))
    return {path.relative_to(root) for path in seen if not docstring_only(path)}


def stage_files(stage: str, root: Path) -> set[Path]:
    """The project files `python -m tasks STAGE` runs."""
    return closure([root / name for name in (*STAGE_ENTRY, f"tasks/{stage}.py")], root)


def meaning(file: Path) -> str:
    """What a Python module says, without what cannot change behaviour: its syntax tree without docstrings, comments
    and layout."""
    tree = ast.parse(file.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def digest(text: str) -> str:
    """sha256 of `text`, first 12 hex digits."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def data_digest(data: object) -> str:
    """The digest of JSON-able `data` (a YAML section), independent of key order."""
    return digest(json.dumps(data, sort_keys=True))


def file_hashes(files: set[Path], root: Path) -> dict[str, str]:
    """Each module's meaning digested, by path relative to `root`, sorted."""
    return {str(path): digest(meaning(root / path)) for path in sorted(files)}


def combined_hash(hashes: dict[str, str]) -> str:
    """One hash for a set of files from their per-file hashes."""
    return hashlib.sha256("\n".join(f"{path} {digest}" for path, digest in sorted(hashes.items())).encode()
                          ).hexdigest()[:16]
