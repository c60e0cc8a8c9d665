"""The 3-D study's quick tier (``experiments/hills3d/run.py --quick``), marked ``example``.

Generates a 2 x 2 grid of coarse two-way coupled 3-D hills (r = 0.05, two span layers,
C_k = 0.14), trains a tiny closure, evaluates it a priori on a held-out interior point and on its
transfer case (three span layers) and runs it two-way coupled with its own C_k against the PDE
truth: the script's own mechanics checks must pass and its outputs must hold what the results
page reads.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.example
def test_quick_3d_study(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "hills3d" / "run.py"), "--quick",
         "--out", str(out), "--data", str(tmp_path / "data")],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| case | mesh | points |" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["quick"] is True and metrics["failed"] == []
    (row,) = metrics["held_out"]
    assert row["converged"] and row["crest"] == 0.15
    # trained on two-way coupled cases: simulate runs with the model's own C_k, no mismatch
    assert row["c_k"] == 0.14 and row["allow_physics_mismatch"] is False
    # the held-out case is generate's coupled solution, the --compare truth simulate's: the same
    # PDE solution, so the two a priori errors agree
    assert math.isclose(row["a_priori_percent"], row["a_priori_coupled_percent"], rel_tol=1e-3)
    # the ratio is the a posteriori error over the a priori one on the same coupled truth
    assert math.isclose(row["ratio"], row["a_posteriori_percent"] / row["a_priori_coupled_percent"])
    # the cloud report: full clouds hold more than one point and at most the whole case
    assert 1 < row["cloud_points_mean"] <= row["cloud_points_max"] <= row["num_points"]
    assert [t["mesh"] for t in metrics["transfer"]] == ["hex r=0.05x3"]
    (cloud,) = metrics["clouds"]
    assert cloud["closure_seconds"] > 0 and cloud["pde_iteration_seconds"] > 0
    assert cloud["coupling_iterations"] > 1  # the case is two-way coupled
    assert {"generate_grid", "train", "evaluate", "total"} <= set(metrics["seconds"])
    config = json.loads((out / "config.json").read_text())
    assert config["seed"] == 0 and config["plan"]["resolution"] == 0.05
    assert (out / "errors.png").stat().st_size > 10_000
    # figures of the verbs: evaluate's mid-span field and simulate's comparison
    assert list((out / "a_priori" / "fields").glob("*.png"))
    assert list((out / "simulate").glob("*/*.png"))
