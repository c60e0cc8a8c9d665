"""The tutorial notebook runs end to end, and its notebook is the twin of its literate script.

``docs/tutorial.ipynb`` is generated from ``docs/tutorial.py`` by ``docs/percent_to_ipynb.py``.
The notebook's code cells are executed in order in one namespace, in a temporary work folder
(``VCNN_TUTORIAL_DIR``): a cell that raises fails the test, and so does the tutorial's last
cell, which checks the a posteriori tau error of the held-out case against a tolerance.
"""

from mpi4py import MPI  # noqa: F401  (initialise MPI before dolfinx)

import importlib.util
import json
import os
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "docs" / "tutorial.py"
NOTEBOOK = REPO / "docs" / "tutorial.ipynb"


def _converter():
    path = REPO / "docs" / "percent_to_ipynb.py"
    spec = importlib.util.spec_from_file_location("percent_to_ipynb", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_notebook_is_the_twin_of_the_script():
    converter = _converter()
    assert NOTEBOOK.read_text(encoding="utf-8") == converter.notebook_text(SCRIPT), (
        "docs/tutorial.ipynb is stale: run python docs/percent_to_ipynb.py"
    )


def test_the_converter_splits_cells_and_refuses_code_in_markdown():
    converter = _converter()
    cells = converter.cells_from_percent(
        "# header\n# %% [markdown]\n# # Title\n#\n# text\n\n# %%\nx = 1\n\n\n# %%\ny = x\n"
    )
    assert [(cell.kind, cell.source) for cell in cells] == [
        ("markdown", "# Title\n\ntext"), ("code", "x = 1"), ("code", "y = x"),
    ]
    with pytest.raises(ValueError, match="line 3: a Markdown cell line must be a comment"):
        converter.cells_from_percent("# %% [markdown]\n# text\nx = 1\n")
    with pytest.raises(ValueError, match="code before the first"):
        converter.cells_from_percent("x = 1\n# %%\n")


def test_the_tutorial_notebook_runs_and_its_check_passes(tmp_path, monkeypatch, capsys):
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code_cells = ["".join(cell["source"]) for cell in notebook["cells"]
                  if cell["cell_type"] == "code"]
    assert "TAU_ERROR_BOUND_PERCENT" in code_cells[-1], "the last cell is the check"
    work = tmp_path / "work"
    monkeypatch.setenv("VCNN_TUTORIAL_DIR", str(work))
    monkeypatch.chdir(tmp_path)  # the tutorial changes into its work folder; restored after
    threads = torch.get_num_threads()  # training sets torch's threads for this process
    namespace = {"__name__": "__main__"}
    started = time.perf_counter()
    try:
        for index, source in enumerate(code_cells):
            exec(compile(source, f"<tutorial cell {index}>", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - started
    out = capsys.readouterr().out
    assert "check passed: a posteriori tau error" in out
    assert Path(namespace["WORK"]) == work.resolve()
    assert not (REPO / "vcnn_tutorial").exists()
    # what the tutorial says it made is there
    for made in ("meshes/bump_h0.60.msh", "bump.toml", "data/bump_h0.60.npz", "run/best.pt",
                 "run/lcurve.png", "evaluate/parity.png", "simulate/bump_h0.60.png"):
        assert (work / made).is_file(), made
    # the held-out case stayed out of training and validation
    split = tomllib.loads((work / "run" / "config.toml").read_text())["split"]
    assert split == {"train": ["bump_h0.30", "bump_h0.45", "bump_h0.90"],
                     "validation": ["bump_h0.75"], "test": ["bump_h0.60"]}
    print(f"tutorial ran in {seconds:.0f} s ({os.cpu_count()} CPUs)")
