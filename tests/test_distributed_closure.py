"""The distributed network closure: halo geometry, and serial against ``mpiexec -n 2``."""

from mpi4py import MPI

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from solvers.closures import NetworkClosure
from solvers.halo import HaloExchange, _Grid

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "mpi_scripts" / "distributed_closure.py"
MPIEXEC = Path(sys.executable).parent / "mpiexec"
MODEL = ROOT / "experiments" / "coupled" / "model" / "best.pt"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_the_grid_marks_every_point_within_reach_and_little_more():
    rng = np.random.default_rng(0)
    owned = rng.uniform([0.0, 0.0], [2.0, 1.0], size=(400, 2))
    reach = rng.uniform(0.05, 0.4, size=400)
    grid = _Grid.covering(np.zeros(2), np.array([9.0, 3.0]), float(reach.max()))
    marked = grid.marked(owned, reach).ravel()
    probes = rng.uniform([-0.5, -0.5], [9.5, 3.5], size=(20000, 2))
    distance = np.linalg.norm(probes[:, None, :] - owned[None, :, :], axis=2)
    within = np.any(distance <= reach[None, :], axis=1)
    hit = grid.lookup(marked, probes)
    assert within.any() and np.all(hit[within]), "a point within reach fell in no marked cell"
    # boxes around the clouds, a cell wider: a superset, but not the domain
    assert hit.mean() < 2.5 * within.mean()


def test_one_rank_has_no_halo():
    points = np.random.default_rng(1).uniform(size=(50, 2))
    halo = HaloExchange.build(
        points, np.full(50, 0.3), np.arange(50), np.array([1.0, 0.0]), MPI.COMM_SELF
    )
    assert halo.num_halo == 0 and halo.exchange(points).shape == (0, 2)


def test_a_single_rank_predicts_on_the_root_path():
    from vcnn import load_closure

    closure = NetworkClosure(load_closure(str(MODEL), device="cpu"), MPI.COMM_SELF)
    assert closure.ranks == "root"
    with pytest.raises(ValueError, match="ranks must be one of"):
        NetworkClosure(None, MPI.COMM_SELF, ranks="everywhere")


def _run(command: list[str], out: Path, *options: str, timeout: float = 300) -> dict:
    completed = subprocess.run(
        [*command, sys.executable, str(SCRIPT), "--out", str(out), *options],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(out.read_text()) if out.exists() else {}


def _by_position(report: dict) -> np.ndarray:
    points = np.asarray(report["points"])
    order = np.lexsort((np.round(points[:, 1], 9), np.round(points[:, 0], 9)))
    return np.asarray(report["tau"])[order]


@pytest.mark.mpi
def test_two_ranks_predict_the_serial_tau_from_exact_clouds(tmp_path):
    if MPI.COMM_WORLD.size > 1:
        pytest.skip("launches its own MPI runs")
    serial = _run([], tmp_path / "serial.json")
    parallel = _run([str(MPIEXEC), "-n", "2"], tmp_path / "parallel.json")
    assert serial["mode"] == "root" and parallel["mode"] == "distributed"
    total = parallel["num_points"]
    assert serial["num_points"] == total
    # the halo: every owned point's cloud holds exactly its serial members and images, some
    # of them points of the other rank seen across the periodic boundary in x
    assert parallel["same_cloud_members"], parallel["entries"]
    assert parallel["halo_images_from_other_ranks"] > 0
    # no rank holds the whole field: its owned points and halo are fewer than all points
    assert sum(parallel["owned_points"]) == total
    assert max(parallel["held_points"]) < 0.8 * total
    expected, found = _by_position(serial), _by_position(parallel)
    # float32 pooling sums in another member order: round-off, far below the model's error
    scale = np.abs(expected).max()
    assert np.abs(found - expected).max() <= 1e-6 * scale
    assert np.linalg.norm(found - expected) <= 1e-6 * np.linalg.norm(expected)


@pytest.mark.mpi
def test_two_ranks_predict_the_serial_tau_with_quadrature_clouds(tmp_path):
    if MPI.COMM_WORLD.size > 1:
        pytest.skip("launches its own MPI runs")
    serial = _run([], tmp_path / "serial.json", "--clouds", "quadrature")
    parallel = _run([str(MPIEXEC), "-n", "2"], tmp_path / "parallel.json", "--clouds", "quadrature")
    assert serial["mode"] == "root" and parallel["mode"] == "distributed"
    # the halo holds every point a node reads and every point those points' fits read, and
    # the nodes are oriented with the mean speed over all points, not over a rank's points
    assert parallel["same_quadrature_members"]
    assert parallel["quadrature_weight_difference"] <= 1e-6
    assert sum(parallel["owned_points"]) == parallel["num_points"] == serial["num_points"]
    expected, found = _by_position(serial), _by_position(parallel)
    assert np.abs(found - expected).max() <= 1e-6 * np.abs(expected).max()


@pytest.mark.mpi
@pytest.mark.parametrize(
    ("failure", "rank", "ranks"),
    [("nan-velocity", 1, "distributed"), ("model-error", 0, "distributed"),
     ("nan-velocity", 1, "root")],
)
def test_a_failure_on_one_rank_stops_every_rank_with_the_same_error(
    tmp_path, failure, rank, ranks
):
    if MPI.COMM_WORLD.size > 1:
        pytest.skip("launches its own MPI runs")
    out = tmp_path / "failure.json"
    # a rank left waiting in a collective for one that stopped would hang: the timeout fails
    _run([str(MPIEXEC), "-n", "2"], out, "--fail", failure, "--fail-rank", str(rank),
         "--ranks", ranks, timeout=150)
    outcomes = [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(2)]
    assert [outcome["mode"] for outcome in outcomes] == [ranks, ranks]
    messages = {outcome["error"] for outcome in outcomes}
    assert len(messages) == 1 and None not in messages, messages
    (message,) = messages
    assert "\n" not in message and message.startswith("the network closure failed (MPI rank")
    if failure == "nan-velocity":
        assert "velocity holds" in message and "NaN" in message
        # the distributed closure names the rank that holds the NaN (the root mode rank 0,
        # where the whole state is gathered and checked)
        assert f"(MPI rank {rank if ranks == 'distributed' else 0})" in message
    else:
        assert f"(MPI rank {rank})" in message and "injected failure" in message


@pytest.mark.mpi
def test_the_coupled_loop_gathers_nothing_per_iteration(tmp_path):
    if MPI.COMM_WORLD.size > 1:
        pytest.skip("launches its own MPI runs")
    report = _run([str(MPIEXEC), "-n", "2"], tmp_path / "loop.json", "--count-gathers")
    assert report["mode"] == "distributed" and report["converged"]
    assert report["evaluations"] >= 3
    # no rank receives the whole field in the loop (the root mode, counted the same way,
    # gathers the state and splits tau at every evaluation)
    assert report["calls"] == 0 and report["root_calls"] >= 2


#: metrics that are differences of two runs' quantities (a run against the PDE truth): the
#: 1e-6 of their quantities is an absolute bound on them, in their units
_DIFFERENCE_TOLERANCES = {
    "tau_rel_l2_percent": 1e-4,  # percent: 1e-6 of the field's norm
    "a_priori_tau_rel_l2_percent": 1e-4,
    "velocity_rel_l2_percent": 1e-4,
    "tau_integral_rel_error": 1e-6,
    "body_force_rel_error": 1e-6,
    "reattachment_x_error": 1e-5,  # 1e-6 of the 9 h period
    "separation_x_error": 1e-5,
}
_QUANTITIES = ("tau_integral", "body_force", "reattachment_x", "separation_x")
_FIELDS = ("tau", "velocity", "tau_truth", "velocity_truth", "tau_a_priori")


def _fields_by_position(case) -> list[np.ndarray]:
    order = np.lexsort((np.round(case.points[:, 1], 9), np.round(case.points[:, 0], 9)))
    values = {"tau": case.tau, "velocity": case.velocity, **case.extra}
    return [np.asarray(values[key])[order] for key in _FIELDS]


@pytest.mark.mpi
@pytest.mark.parametrize("clouds", ["full", "quadrature"])
def test_simulate_on_two_ranks_equals_the_serial_run(tmp_path, clouds):
    """``vcnn simulate`` two-way with the shipped coupled model and --compare, end to end."""
    from vcnn.casefile import read_case
    from vcnn.cli import main as vcnn_main

    if MPI.COMM_WORLD.size > 1:
        pytest.skip("launches its own MPI runs")
    arguments = ["simulate", "--model", "coupled", "--coupling", "two-way", "--compare",
                 "--alphas", "1", "--resolution", "0.25", "--tol", "1e-7", "--clouds", clouds,
                 "--device", "cpu", "--no-plots", "--no-xdmf", "--out"]
    assert vcnn_main([*arguments, str(tmp_path / "serial")]) == 0
    command = [str(MPIEXEC), "-n", "2", sys.executable, "-m", "vcnn.cli", *arguments,
               str(tmp_path / "parallel")]
    completed = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    (serial,), (parallel,) = (
        json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("serial", "parallel")
    )
    assert serial["closure_ranks"] == "root" and parallel["closure_ranks"] == "distributed"
    assert serial["clouds"] == parallel["clouds"] == clouds
    assert parallel["converged"] and parallel["iterations"] == serial["iterations"]
    for key in _QUANTITIES:
        assert parallel[key] == pytest.approx(serial[key], rel=1e-6), key
    for key, tolerance in _DIFFERENCE_TOLERANCES.items():
        assert parallel[key] == pytest.approx(serial[key], abs=tolerance), key
    cases = [read_case(tmp_path / run / "hill_a1.000.npz") for run in ("serial", "parallel")]
    assert cases[1].meta["simulate"]["num_processes"] == 2
    for key, expected, found in zip(
        _FIELDS, *(_fields_by_position(case) for case in cases), strict=True
    ):
        assert np.linalg.norm(found - expected) <= 1e-6 * np.linalg.norm(expected), key
        assert np.abs(found - expected).max() <= 1e-6 * np.abs(expected).max(), key
