"""Where benchmarks put their figures: benchmarks/results/NAME.json and a section of docs/benchmarks.md."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiln.core.files import atomic_path, write_json

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"


def write_results(name: str, results: dict[str, Any]) -> None:
    write_json(ROOT / "benchmarks" / "results" / f"{name}.json", results)


def write_section(name: str, command: str, setup: str, header: Sequence[str], rows: Sequence[Sequence[Any]],
                  verdict: str) -> None:
    """Replace (or append) the `name` section of docs/benchmarks.md with a markdown table."""
    table = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    table += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    body = "\n".join([f"<!-- {name}:start -->", f"## {name}", "", f"`{command}`", "", setup + ".", "", *table, "",
                      verdict, f"<!-- {name}:end -->"])
    text = DOC.read_text() if DOC.is_file() else "# Benchmarks\n\nMeasured on this project's 2-core CI machine class.\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start in text:
        text = text[: text.index(start)] + body + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    with atomic_path(DOC) as tmp:
        tmp.write_text(text)
