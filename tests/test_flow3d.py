"""3-D Taylor-Hood flow: manufactured rates on both cell types, the extruded hill against the
2-D hill, the iterative paths against MUMPS (low-rank LU + GMRES at the hill's Re = 100,
fieldsplit at Re = 10), serial against two ranks."""

from mpi4py import MPI

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import solvers.flow
from experiments.verification3d.cases import hill_section_comparison, kovasznay3d_errors
from meshes.hills3d import structured_hill3d_mesh, unstructured_hill3d_mesh
from solvers.boundaries import hill_boundary_spec
from solvers.flow import CONTINUATION_START, FlowSolver, solve_flow
from solvers.linalg import (
    FIELDSPLIT_FLOW_OPTIONS,
    ITERATIVE_FLOW_OPTIONS,
    ITERATIVE_SCALAR_OPTIONS,
    SolverDivergedError,
    default_solver_options,
)
from vcnn.physics import DEFAULT_PHYSICS

COMM = MPI.COMM_WORLD
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).parent / "mpi_scripts" / "hill3d.py"
ITERATIVE_SCRIPT = Path(__file__).parent / "mpi_scripts" / "hill3d_iterative.py"
MPIEXEC = Path(sys.executable).parent / "mpiexec"


@pytest.mark.parametrize("cell_type", ["hexahedron", "tetrahedron"])
def test_kovasznay_3d_converges_at_taylor_hood_rates(cell_type):
    errors = np.array([kovasznay3d_errors(n, cell_type) for n in (2, 4)])
    velocity_rate, pressure_rate = np.log2(errors[0] / errors[1])
    assert velocity_rate > 2.7, errors
    assert pressure_rate > 1.8, errors


@pytest.mark.slow
@pytest.mark.parametrize("cell_type", ["hexahedron", "tetrahedron"])
def test_kovasznay_3d_rates_on_finer_meshes(cell_type):
    errors = np.array([kovasznay3d_errors(n, cell_type) for n in (4, 8)])
    velocity_rate, pressure_rate = np.log2(errors[0] / errors[1])
    assert velocity_rate == pytest.approx(3.0, abs=0.3), errors
    assert pressure_rate > 1.8, errors


def test_extruded_hill_reproduces_the_two_dimensional_flow():
    if COMM.size > 1:
        pytest.skip("serial comparison")
    result = hill_section_comparison(resolution=0.05, span_cells=2)
    assert result["velocity_rel_l2"] < 5e-3
    assert result["spanwise_velocity"] < 1e-6
    assert result["body_force_rel"] < 1e-8
    # the flow-aligned SUPG length does not see the spanwise cell size: tau is the 2-D tau
    assert result["tau_rel_l2_flow_length"] < 5e-3
    # the cell diameter does (spanwise cells 2.25 long here against about 0.9 in-plane)
    assert result["tau_rel_l2"] > 10 * result["tau_rel_l2_flow_length"]


def _coarse_hill(cell_type: str):
    if cell_type == "hexahedron":
        return structured_hill3d_mesh(1.0, crest_amplitude=0.2, resolution=0.05, span_cells=2)
    return unstructured_hill3d_mesh(1.0, crest_amplitude=0.2, size=1.2, wall_size=0.6)


def _relative_velocity_difference(first, second) -> float:
    difference = COMM.allreduce(np.sum((first.u.x.array - second.u.x.array) ** 2), op=MPI.SUM)
    reference = COMM.allreduce(np.sum(second.u.x.array**2), op=MPI.SUM)
    return float(np.sqrt(difference / reference))


@pytest.mark.parametrize(("cell_type", "nu"), [("hexahedron", 0.01), ("tetrahedron", 0.03)])
def test_iterative_path_matches_the_direct_solver_at_high_cell_reynolds_number(cell_type, nu):
    # Hexahedra at the hill's Re = 100 (cell Reynolds number ~ 90), where the fieldsplit path
    # fails. On these coarse tetrahedra Newton itself (with either linear solver) diverges at
    # Re = 100, from rest and from Re = 33: they run at Re = 33.
    tagged = _coarse_hill(cell_type)
    spec = hill_boundary_spec(tagged.boundaries, tagged.period)
    direct = solve_flow(tagged.mesh, tagged.facet_tags, spec, nu=nu, petsc_options={})
    iterative = solve_flow(
        tagged.mesh, tagged.facet_tags, spec, nu=nu, petsc_options=ITERATIVE_FLOW_OPTIONS
    )
    tolerance = 10 * ITERATIVE_FLOW_OPTIONS["ksp_rtol"]
    assert iterative.body_force == pytest.approx(direct.body_force, rel=tolerance)
    assert _relative_velocity_difference(iterative, direct) <= tolerance


@pytest.mark.parametrize("schur", ["mass", "pcd"])
def test_fieldsplit_path_matches_the_direct_solver_at_low_reynolds_number(schur):
    # Re = 10: both Schur approximations converge; at Re = 100 on this coarse mesh neither does.
    tagged = _coarse_hill("hexahedron")
    spec = hill_boundary_spec(tagged.boundaries, tagged.period)
    options = dict(FIELDSPLIT_FLOW_OPTIONS)
    if schur == "pcd":
        options["fieldsplit_p_pc_type"] = "mat"
    direct = solve_flow(tagged.mesh, tagged.facet_tags, spec, nu=0.1, petsc_options={})
    iterative = solve_flow(tagged.mesh, tagged.facet_tags, spec, nu=0.1, petsc_options=options)
    assert iterative.body_force == pytest.approx(direct.body_force, rel=1e-8)
    assert _relative_velocity_difference(iterative, direct) <= 1e-7


def test_the_mass_schur_preconditioner_follows_the_continuation_viscosity():
    # -M_p / nu approximates the Schur complement at the viscosity being solved for: each
    # continuation stage (4 nu, 2 nu, nu) gets its own, refreshed with the Jacobian.
    tagged = _coarse_hill("hexahedron")
    spec = hill_boundary_spec(tagged.boundaries, tagged.period)
    nu = 0.1
    direct = solve_flow(tagged.mesh, tagged.facet_tags, spec, nu=nu, petsc_options={})
    with FlowSolver(
        tagged.mesh, tagged.facet_tags, spec, nu=nu, petsc_options=dict(FIELDSPLIT_FLOW_OPTIONS)
    ) as solver:
        solution = solver.solve(continuation="always")
        assert solution.continuation[0] == pytest.approx(CONTINUATION_START * nu)
        assert _relative_velocity_difference(solution, direct) <= 1e-7
        schur = solver._mass_schur[2]
        at_target = schur.copy()
        solver._viscosity.value = CONTINUATION_START * nu
        solver._factorize({})
        # at_target - 4 * at_4nu vanishes but for the pinned pressure dof's unit diagonal
        at_target.axpy(-CONTINUATION_START, schur)
        pinned = abs(1.0 - CONTINUATION_START) if solver._pin_pressure else 0.0
        assert at_target.norm() == pytest.approx(pinned, abs=1e-12 * schur.norm())
        at_target.destroy()


def test_an_unconverged_iterative_solve_is_an_error_naming_the_reason():
    tagged = _coarse_hill("hexahedron")
    spec = hill_boundary_spec(tagged.boundaries, tagged.period)
    options = {**FIELDSPLIT_FLOW_OPTIONS, "ksp_max_it": 3}
    with pytest.raises(SolverDivergedError, match="DIVERGED_MAX_IT"):
        solve_flow(tagged.mesh, tagged.facet_tags, spec, petsc_options=options)


def _coarsest_crest_hill():
    return structured_hill3d_mesh(1.25, crest_amplitude=0.15, resolution=0.03, span_cells=2)


def test_newton_from_rest_falls_back_to_a_viscosity_continuation(caplog):
    # Re = 300 on 2 spanwise layers: plain Newton from the Stokes flow leaves its basin of
    # attraction (the residual grows past 10x its initial value within 7 steps), as at the
    # hill's Re = 100 on the crest-varying meshes r = 0.075 and 0.1 with 2 layers.
    tagged = _coarsest_crest_hill()
    spec = hill_boundary_spec(tagged.boundaries, tagged.period)
    nu = 0.0033
    with FlowSolver(tagged.mesh, tagged.facet_tags, spec, nu=nu) as solver:
        with pytest.raises(ValueError, match="continuation must be one of"):
            solver.solve(continuation="sometimes")
        with caplog.at_level(logging.INFO, logger="solvers.flow"):
            solution = solver.solve()
        assert "plain Newton from rest failed" in caplog.text
        assert solution.continuation[0] == pytest.approx(CONTINUATION_START * nu)
        assert solution.continuation[-1] == nu
        assert solver.continuation == solution.continuation
        history = solution.residual_history
        assert history[-1] <= max(1e-10 * history[0], 1e-12)
        assert solution.bulk_velocity == pytest.approx(DEFAULT_PHYSICS.bulk_velocity, rel=1e-12)
        # The last stage solved the target's discrete equations (the viscosity is back at nu):
        # plain Newton started from its solution finds a residual below the from-rest
        # tolerance (1e-10 x the residual at rest, U_b |Omega| = 90) and moves nowhere.
        again = solver.solve(continuation="never")
        assert again.residual_history[0] <= 1e-9
        assert again.newton_iterations <= 1
        assert again.continuation == []
        assert again.body_force == pytest.approx(solution.body_force, rel=1e-10)
        assert _relative_velocity_difference(again, solution) <= 1e-10


def test_a_failed_continuation_is_an_error_naming_its_stages(monkeypatch):
    monkeypatch.setattr(solvers.flow, "MAX_CONTINUATION_STAGES", 2)
    tagged = _coarsest_crest_hill()
    spec = hill_boundary_spec(tagged.boundaries, tagged.period)
    # two Newton steps per stage cannot converge: both stages (4 nu, then 8 nu) fail
    with pytest.raises(SolverDivergedError, match=r"did not reach nu = 0.01 in 2 stages"):
        solve_flow(tagged.mesh, tagged.facet_tags, spec, max_iterations=2, continuation="always")


def test_default_solver_options_keep_two_dimensional_systems_direct():
    assert default_solver_options(kind="flow", num_dofs=10**9, tdim=2) == {}
    assert default_solver_options(kind="scalar", num_dofs=10**9, tdim=2) == {}
    assert default_solver_options(kind="scalar", num_dofs=10**3, tdim=3) == {}
    assert default_solver_options(kind="scalar", num_dofs=10**6, tdim=3) == ITERATIVE_SCALAR_OPTIONS
    assert default_solver_options(kind="flow", num_dofs=10**4, tdim=3) == {}
    assert default_solver_options(kind="flow", num_dofs=10**6, tdim=3) == ITERATIVE_FLOW_OPTIONS
    with pytest.raises(ValueError, match="kind"):
        default_solver_options(kind="pressure", num_dofs=1, tdim=3)


def _run(command: list[str]) -> dict:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=environment
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.mpi
def test_three_dimensional_hill_agrees_in_serial_and_on_two_ranks():
    if COMM.size > 1:
        pytest.skip("launches its own MPI runs")
    serial = _run([sys.executable, str(SCRIPT)])
    parallel = _run([str(MPIEXEC), "-n", "2", sys.executable, str(SCRIPT)])
    assert serial["ranks"] == 1 and parallel["ranks"] == 2
    assert serial["num_dofs"] == parallel["num_dofs"]
    for key in ("body_force", "bulk_velocity", "tau_integral", "max_velocity", "max_tau"):
        assert parallel[key] == pytest.approx(serial[key], rel=1e-10), key


@pytest.mark.mpi
def test_iterative_path_agrees_in_serial_and_on_two_ranks():
    if COMM.size > 1:
        pytest.skip("launches its own MPI runs")
    serial = _run([sys.executable, str(ITERATIVE_SCRIPT)])
    parallel = _run([str(MPIEXEC), "-n", "2", sys.executable, str(ITERATIVE_SCRIPT)])
    assert serial["ranks"] == 1 and parallel["ranks"] == 2
    tolerance = 10 * ITERATIVE_FLOW_OPTIONS["ksp_rtol"]
    for key in ("body_force", "bulk_velocity", "tau_integral", "max_velocity", "max_tau"):
        assert parallel[key] == pytest.approx(serial[key], rel=tolerance), key
