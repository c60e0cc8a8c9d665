"""``vcnn simulate --dim 3``: a trained 3-D closure two-way coupled in the 3-D flow solver.

The closure is the tiny model of the session's coarse 3-D family (``coarse_3d_model`` in
``tests/conftest.py``), trained on one-way cases: the two-way run couples it with
``--c-k 0.15 --allow-physics-mismatch`` on the held-out crest-varying hill.
"""

from mpi4py import MPI

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from meshes.io import read_xdmf_fields
from solvers.simulate import SimulateConfig
from solvers.simulate_metrics import METRIC_KEYS
from tests.hills3d_model import HELD_OUT, RESOLUTION, SPAN_CELLS
from vcnn import load_closure
from vcnn.casefile import read_case
from vcnn.cli import main as vcnn_main
from vcnn.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).parent / "mpiexec"
SCRIPT = ROOT / "tests" / "mpi_scripts" / "distributed_closure.py"
MESH_FLAGS = ["--alphas", "1", "--crest-amplitudes", "0.2", "--resolution", str(RESOLUTION),
              "--span-cells", str(SPAN_CELLS)]


@pytest.fixture(scope="module")
def two_way_run(coarse_3d_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("simulate3d")
    code = vcnn_main(["-q", "simulate", "--dim", "3", "--model", str(coarse_3d_model.model),
                      *MESH_FLAGS, "--coupling", "two-way", "--c-k", "0.15",
                      "--allow-physics-mismatch", "--compare", "--device", "cpu",
                      "--out", str(out)])
    return code, out


def test_two_way_3d_run_converges_against_the_pde_truth(two_way_run):
    code, out = two_way_run
    assert code == 0
    (entry,) = json.loads((out / "metrics.json").read_text())
    assert set(METRIC_KEYS) <= set(entry)
    assert entry["case"] == HELD_OUT and entry["crest_amplitude"] == 0.2
    assert entry["converged"] and entry["error"] is None and entry["outer"] == "anderson"
    assert 2 <= entry["iterations"] <= 20 and entry["truth_iterations"] <= 20
    assert entry["clouds"] == "full"
    for key in ("tau_rel_l2_percent", "a_priori_tau_rel_l2_percent", "velocity_rel_l2_percent",
                "tau_integral_rel_error", "body_force_rel_error"):
        assert isinstance(entry[key], float) and np.isfinite(entry[key]), key
    # the metrics are those of the stored fields
    case = read_case(out / f"{HELD_OUT}.npz")
    assert case.dim == 3 and case.velocity.shape == (case.num_points, 3)
    assert case.meta["crest_amplitude"] == 0.2 and case.meta["physics"]["c_k"] == 0.15
    truth = case.extra["tau_truth"]
    error = 100 * np.linalg.norm(case.tau - truth) / np.linalg.norm(truth)
    assert error == pytest.approx(entry["tau_rel_l2_percent"], rel=1e-9)
    prior = 100 * np.linalg.norm(case.extra["tau_a_priori"] - truth) / np.linalg.norm(truth)
    assert prior == pytest.approx(entry["a_priori_tau_rel_l2_percent"], rel=1e-9)
    velocity = case.extra["velocity_truth"]
    drift = 100 * np.linalg.norm(case.velocity - velocity) / np.linalg.norm(velocity)
    assert drift == pytest.approx(entry["velocity_rel_l2_percent"], rel=1e-9)
    # the network's tau moves the flow (nu_t feeds back), but not far from the truth's
    assert 0.01 < entry["velocity_rel_l2_percent"] < 20.0


def test_two_way_3d_outputs_xdmf_and_figure(two_way_run):
    _, out = two_way_run
    fields = read_xdmf_fields(out / f"{HELD_OUT}.xdmf")
    for name in ("velocity", "tau", "nu_t", "tau_truth", "tau_minus_truth",
                 "tau_a_priori_minus_truth"):
        assert name in fields, name
    assert (out / f"{HELD_OUT}.png").stat().st_size > 20_000


def test_3d_settings_are_checked_before_any_run():
    base = {"dim": 3, "model": "m.pt", "mesh": {"resolution": RESOLUTION}}
    config = SimulateConfig.from_dict(base)
    assert config.crest_amplitudes == [0.0]
    assert SimulateConfig.from_dict({**base, "clouds": "quadrature"}).clouds == "quadrature"
    with pytest.raises(ConfigError, match=r"crest amplitudes must lie in \[0, 0.3\]"):
        SimulateConfig.from_dict({**base, "crest_amplitudes": [0.4]})
    with pytest.raises(ConfigError, match="is a setting of the 3-D hills"):
        SimulateConfig.from_dict({"model": "m.pt", "crest_amplitudes": [0.1]})


def tau_by_position(report: dict) -> np.ndarray:
    """A report's tau in the lexicographic order of its points (ranks list them otherwise)."""
    points = np.round(np.asarray(report["points"]), 9)
    return np.asarray(report["tau"])[np.lexsort(points.T[::-1])]


def serial_and_two_rank_reports(tmp_path: Path, options: list[str]) -> tuple[dict, dict]:
    """The distributed-closure script's reports of one serial and one 2-rank run."""
    reports = []
    for launcher, name in (([], "serial"), ([str(MPIEXEC), "-n", "2"], "parallel")):
        out = tmp_path / f"{name}.json"
        completed = subprocess.run(
            [*launcher, sys.executable, str(SCRIPT), "--out", str(out), *options],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        reports.append(json.loads(out.read_text()))
    serial, parallel = reports
    assert serial["mode"] == "root" and parallel["mode"] == "distributed"
    return serial, parallel


@pytest.mark.mpi
def test_two_ranks_predict_the_serial_3d_tau(coarse_3d_model, tmp_path):
    if MPI.COMM_WORLD.size > 1:
        pytest.skip("launches its own MPI runs")
    options = ["--model", str(coarse_3d_model.model), "--crest-amplitude", "0.2",
               "--resolution", str(RESOLUTION), "--span-cells", str(SPAN_CELLS)]
    serial, parallel = serial_and_two_rank_reports(tmp_path, options)
    assert parallel["same_cloud_members"], parallel["entries"]
    # each rank holds its owned points and a halo, not the whole field
    assert max(parallel["held_points"]) < serial["num_points"]
    assert sum(parallel["owned_points"]) == serial["num_points"]
    expected, found = tau_by_position(serial), tau_by_position(parallel)
    assert np.abs(found - expected).max() <= 1e-6 * np.abs(expected).max()


def test_a_closure_of_the_other_dimension_is_refused(coarse_3d_model, tmp_path, capsys):
    code = vcnn_main(["simulate", "--model", str(coarse_3d_model.model), "--alphas", "1",
                      "--resolution", "0.05", "--out", str(tmp_path / "s")])
    assert code == 2
    assert "the closure was trained in 3-D, the mesh is 2-D" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    assert load_closure(coarse_3d_model.model, device="cpu").dimension == 3
