"""Bad params at scale: hypothesis breaks the stock params.yaml one key at a time (a value of the wrong type, a key
removed, an unknown key added) and every result is either still valid or a ParamsError that names the broken key;
a sample goes through the real command line, which must refuse it fast, in one line, touching nothing."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.core.params import ParamsError, validate_params
from kiln.platform.contract import stages
from tests.conftest import REPO, key_paths, record_cases

pytestmark = pytest.mark.bad_input
STOCK = yaml.safe_load((REPO / "params.yaml").read_text())


LEAVES = [path for path, value in key_paths(STOCK) if not (isinstance(value, dict) and value)]
SECTIONS = [path for path, value in key_paths(STOCK) if isinstance(value, dict)]


def wrong_types(value: Any) -> list[Any]:
    """Values no schema for `value`'s key should take: another type that pydantic cannot coerce into it."""
    if isinstance(value, str):
        return [[1, 2], {"x": 1}]
    if isinstance(value, list):
        return ["!bad", {"x": 1}]
    return ["!bad", [1, 2]]  # numbers, booleans and null


def node(tree: dict, path: tuple[str, ...]) -> dict:
    for key in path:
        tree = tree[key]
    return tree


def copy() -> dict:
    return yaml.safe_load(yaml.safe_dump(STOCK))


@st.composite
def broken_params(draw: st.DrawFn) -> tuple[str, dict, tuple[str, ...]]:
    """(what was broken, the params, the texts the error must contain)."""
    raw, kind = copy(), draw(st.sampled_from(["wrong type", "missing", "unknown key"]))
    if kind == "unknown key":
        parent = draw(st.sampled_from(SECTIONS))
        name = "zz_" + draw(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8))
        node(raw, parent)[name] = 1
        return f"{kind} {'.'.join(parent)}.{name}", raw, (".".join(parent), name)
    *parent, key = draw(st.sampled_from(LEAVES))
    if kind == "missing":
        del node(raw, tuple(parent))[key]
    else:
        node(raw, tuple(parent))[key] = draw(st.sampled_from(wrong_types(node(raw, tuple(parent))[key])))
    return f"{kind} {'.'.join((*parent, key))}", raw, (".".join(parent), key)


@pytest.fixture(autouse=True)
def local_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(broken_params())
def test_every_broken_key_is_named_or_harmless(request: pytest.FixtureRequest,
                                               case: tuple[str, dict, tuple[str, ...]]) -> None:
    what, raw, named = case
    try:
        validate_params(raw)
    except ParamsError as error:
        record_cases(request.node, what)
        assert all(text in str(error) for text in named), f"{what}: the error does not name {named}:\n{error}"
    else:
        assert what.startswith("missing"), f"{what} was accepted"  # a key with a default may be left out


def cases_for_the_command_line() -> list[tuple[str, dict, str]]:
    """One of each kind, on keys of different sections, drawn once."""
    picked = []
    for kind, key in (("wrong type", ("train", "epochs")), ("wrong type", ("compress", "variants")),
                      ("missing", ("tune", "search")), ("unknown key", ("prepare",))):
        raw = copy()
        if kind == "unknown key":
            node(raw, key)["zz_typo"] = 1
            picked.append((f"{kind} prepare.zz_typo", raw, "zz_typo"))
        elif kind == "missing":
            del node(raw, key[:-1])[key[-1]]
            picked.append((f"{kind} {'.'.join(key)}", raw, ".".join(key)))
        else:
            node(raw, key[:-1])[key[-1]] = wrong_types(node(raw, key[:-1])[key[-1]])[0]
            picked.append((f"{kind} {'.'.join(key)}", raw, ".".join(key)))
    return picked


@pytest.mark.parametrize("case", cases_for_the_command_line(), ids=lambda case: case[0])
def test_the_stage_command_refuses_fast_in_one_line_touching_nothing(case: tuple[str, dict, str],
                                                                     tmp_path: Path) -> None:
    _, raw, named = case
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "prepared"
    command = shlex.split(stages(REPO)["prepare"].cmd)[1:]
    command[command.index("--out") + 1] = str(out)
    started = time.monotonic()
    result = subprocess.run([sys.executable, *command, "--params", str(tmp_path / "params.yaml")], cwd=REPO,
                            capture_output=True, text=True)
    assert time.monotonic() - started < 5
    assert result.returncode == 1 and named in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
