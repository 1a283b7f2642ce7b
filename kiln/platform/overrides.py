"""Dotted-key overrides written back into a params file the way `dvc exp run -S` does: validated first, comments and
layout kept, a file whose values already match left untouched."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from kiln.core.files import atomic_path
from kiln.core.params import Params, load_params, read_raw_params


def _round_trip_yaml() -> YAML:
    """ruamel's round-trip YAML that changes nothing it was not asked to: no line wrapping, `null` kept as `null`."""
    document = YAML()
    document.width = 4096
    document.representer.add_representer(
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null"))
    return document


def write_overrides(path: Path | str, overrides: Mapping[str, Any]) -> Params:
    """Validate `overrides`, then write the values that differ into the params file, keeping its comments and layout
    (like `dvc exp run -S`); a file whose values already match is not touched."""
    params = load_params(path, overrides)
    current = read_raw_params(path)
    changed = {dotted: value for dotted, value in overrides.items() if _lookup(current, dotted) != value}
    if not changed:
        return params
    yaml_file = _round_trip_yaml()
    document = yaml_file.load(Path(path).read_text())
    for dotted, value in changed.items():
        *parents, leaf = dotted.split(".")
        node = document
        for part in parents:
            node = node[part]
        node[leaf] = value
    with atomic_path(path) as tmp, open(tmp, "w") as handle:
        yaml_file.dump(document, handle)
    return params


def _lookup(raw: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted key, or a sentinel that equals nothing when the key is absent."""
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return object()
        node = node[part]
    return node
