"""The demo (the quick version of `make demo`) runs end to end and passes its own check."""

from mpi4py import MPI  # noqa: F401  (initialise MPI before dolfinx)

import json

import pytest

from vcnn.demo import QUICK, main


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    assert main(["--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert [m["alpha"] for m in metrics] == [1.45, 1.9]
    assert all(m["rel_l2_percent"] < QUICK.tolerance_percent for m in metrics)
    assert (tmp_path / "run" / "best.pt").is_file()
    assert (tmp_path / "run" / "lcurve.tsv").read_text().count("\n") >= 2
    assert (tmp_path / "cases" / "hill_a1.000.png").is_file()
    (entry,) = json.loads((tmp_path / "simulate" / "metrics.json").read_text())
    assert entry["converged"] and entry["alpha"] == 1.45
    assert entry["tau_rel_l2_percent"] < QUICK.simulate_tolerance_percent
