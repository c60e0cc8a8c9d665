"""Turn a literate script in the jupytext "percent" format into its Jupyter notebook twin.

Usage::

    python docs/percent_to_ipynb.py                  # docs/tutorial.py -> docs/tutorial.ipynb
    python docs/percent_to_ipynb.py --check          # exit 1 when the .ipynb is stale
    python docs/percent_to_ipynb.py SCRIPT.py [NOTEBOOK.ipynb]

The format: a line ``# %%`` starts a code cell, ``# %% [markdown]`` a Markdown cell whose
lines are comments (``# `` is stripped). Comment lines before the first cell are the file's
header (not a cell). Blank lines at the ends of a cell are dropped. The notebook is written
without outputs, with sorted keys and one-space indentation, so that the same script always
gives the same bytes (tests/test_tutorial.py compares them). Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: A cell marker: ``# %%``, optionally followed by ``[markdown]`` (or ``[md]``).
CELL_MARKER = re.compile(r"^# %%(?:\s+\[(?P<kind>markdown|md)\])?\s*$")


@dataclass(frozen=True)
class Cell:
    """One cell of the notebook.

    Attributes:
        kind: ``"code"`` or ``"markdown"``.
        source: the cell's text, without the comment prefix of a Markdown cell.
    """

    kind: str
    source: str


def cells_from_percent(text: str) -> list[Cell]:
    """The cells of a percent-format script, in order.

    Raises:
        ValueError: a Markdown cell holds a line that is not a comment, or code precedes the
            first cell marker.
    """
    cells: list[Cell] = []
    kind: str | None = None
    lines: list[str] = []

    def close() -> None:
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        if kind is not None:
            cells.append(Cell(kind, "\n".join(lines)))

    for number, line in enumerate(text.splitlines(), start=1):
        marker = CELL_MARKER.match(line)
        if marker is not None:
            close()
            kind, lines = ("markdown" if marker.group("kind") else "code"), []
        elif kind is None:
            if line.strip() and not line.startswith("#"):
                raise ValueError(f"line {number}: code before the first '# %%' cell marker")
        elif kind == "markdown":
            if line.strip() and not line.startswith("#"):
                raise ValueError(f"line {number}: a Markdown cell line must be a comment")
            lines.append(line[2:] if line.startswith("# ") else line[1:])
        else:
            lines.append(line)
    close()
    return cells


def notebook(cells: list[Cell]) -> dict:
    """An nbformat 4 notebook (a JSON-ready dict) of ``cells``, without outputs."""

    def source(text: str) -> list[str]:
        return text.splitlines(keepends=True)

    return {
        "cells": [
            {"cell_type": "markdown", "metadata": {}, "source": source(cell.source)}
            if cell.kind == "markdown"
            else {
                "cell_type": "code",
                "execution_count": None,
                "metadata": {},
                "outputs": [],
                "source": source(cell.source),
            }
            for cell in cells
        ],
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def notebook_text(script: Path) -> str:
    """The notebook file's text for ``script`` (deterministic)."""
    document = notebook(cells_from_percent(script.read_text(encoding="utf-8")))
    return json.dumps(document, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check`` compare) the notebook of a percent script; exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("script", nargs="?", type=Path, default=HERE / "tutorial.py")
    parser.add_argument("notebook", nargs="?", type=Path)
    parser.add_argument("--check", action="store_true", help="exit 1 if the notebook is stale")
    args = parser.parse_args(argv)
    target = args.notebook or args.script.with_suffix(".ipynb")
    text = notebook_text(args.script)
    if args.check:
        current = target.read_text(encoding="utf-8") if target.is_file() else None
        if current != text:
            print(f"{target} is stale: run python {Path(__file__).name} {args.script}")
            return 1
        return 0
    target.write_text(text, encoding="utf-8")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
