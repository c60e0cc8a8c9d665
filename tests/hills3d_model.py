"""A coarse 3-D hill family and a tiny closure trained on it (shared by the 3-D tests).

The family is the coarsest the size check allows in 3-D: alpha = 1 at resolution 0.05 (10 x 10
hexahedra in-plane) with 2 span layers, crest amplitudes 0 (the extruded hill) and 0.2, about
220 points a case. The model trains for a few epochs (seconds) with the crest-varying case held
out. Built once per session by the ``coarse_3d_model`` fixture of ``tests/conftest.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

RESOLUTION = 0.05
SPAN_CELLS = 2
CREST_AMPLITUDES = (0.0, 0.2)
HELD_OUT = "hill3d_a1.000_crest0.200"
EPOCHS = 30


class Coarse3dModel(NamedTuple):
    """Where the family and the run are, and the run's result.

    Attributes:
        cases: folder of the case files.
        run: the training run's folder (``best.pt``, ``lcurve.tsv``).
        history: the epoch records of the run (train loss per epoch).
    """

    cases: Path
    run: Path
    history: list

    @property
    def model(self) -> Path:
        """The best checkpoint."""
        return self.run / "best.pt"


def build(folder: Path) -> Coarse3dModel:
    """Generate the family into ``folder / "cases"`` and train into ``folder / "run"``."""
    from solvers.generate import GenerateConfig, run_generate
    from vcnn.training import TrainConfig, train

    cases = folder / "cases"
    generated = run_generate(GenerateConfig.from_dict({
        "alphas": [1.0], "dim": 3, "crest_amplitudes": list(CREST_AMPLITUDES),
        "out": str(cases), "plots": False, "xdmf": False,
        "mesh": {"resolution": RESOLUTION, "span_cells": SPAN_CELLS},
    }))
    assert generated.all_succeeded, generated.table()
    result = train(TrainConfig.from_dict({
        "data": str(cases), "out": str(folder / "run"), "validation_cases": [HELD_OUT],
        "epochs": EPOCHS, "batch_size": 32, "cloud_size": 24, "queries_per_case": "all",
        "learning_rate": 3e-3, "device": "cpu", "num_threads": 1, "ema_decay": 0.0, "seed": 0,
        "model": {"embedding": [8, 16], "fitting": [32]},
    }))
    return Coarse3dModel(cases, folder / "run", list(result.history))
