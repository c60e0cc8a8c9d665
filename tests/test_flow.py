from mpi4py import MPI

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ufl
from dolfinx import fem

from solvers.boundaries import BoundarySpec
from solvers.flow import solve_flow
from solvers.linalg import SolverDivergedError
from tests.mpi_scripts.flow_channel import (
    BOTTOM,
    LEFT,
    RIGHT,
    TOP,
    periodic_channel_spec,
    tagged_rectangle,
)

COMM = MPI.COMM_WORLD
SCRIPT = Path(__file__).parent / "mpi_scripts" / "flow_channel.py"
MPIEXEC = Path(sys.executable).parent / "mpiexec"

KOVASZNAY_NU = 1.0 / 40.0
KOVASZNAY_LAMBDA = 1 / (2 * KOVASZNAY_NU) - np.sqrt(1 / (4 * KOVASZNAY_NU**2) + 4 * np.pi**2)


def _l2(expression, mesh) -> float:
    value = fem.assemble_scalar(fem.form(expression**2 * ufl.dx(domain=mesh)))
    return float(np.sqrt(COMM.allreduce(value, op=MPI.SUM)))


def _kovasznay_velocity(x: np.ndarray) -> np.ndarray:
    lam = KOVASZNAY_LAMBDA
    return np.vstack(
        [
            1 - np.exp(lam * x[0]) * np.cos(2 * np.pi * x[1]),
            lam / (2 * np.pi) * np.exp(lam * x[0]) * np.sin(2 * np.pi * x[1]),
        ]
    )


def _kovasznay(n: int, **options):
    """Kovasznay flow (an exact Navier-Stokes solution) with Dirichlet data everywhere."""
    mesh, tags = tagged_rectangle(COMM, (-0.5, -0.5), (1.0, 1.5), (n, n))
    spec = BoundarySpec(inlets={tag: _kovasznay_velocity for tag in (BOTTOM, TOP, LEFT, RIGHT)})
    solution = solve_flow(mesh, tags, spec, nu=KOVASZNAY_NU, **options)
    return mesh, solution


def _kovasznay_errors(n: int) -> tuple[float, float]:
    mesh, solution = _kovasznay(n)
    x = ufl.SpatialCoordinate(mesh)
    lam = KOVASZNAY_LAMBDA
    exact_u = ufl.as_vector(
        [
            1 - ufl.exp(lam * x[0]) * ufl.cos(2 * ufl.pi * x[1]),
            lam / (2 * ufl.pi) * ufl.exp(lam * x[0]) * ufl.sin(2 * ufl.pi * x[1]),
        ]
    )
    exact_p = 0.5 * (1 - ufl.exp(2 * lam * x[0]))
    area = 1.5 * 2.0
    # The pinned pressure level is arbitrary: compare mean-free pressures.
    mean_h = COMM.allreduce(fem.assemble_scalar(fem.form(solution.p * ufl.dx)), op=MPI.SUM)
    mean_exact = COMM.allreduce(fem.assemble_scalar(fem.form(exact_p * ufl.dx)), op=MPI.SUM)
    velocity_error = _l2(solution.u - exact_u, mesh)
    pressure_error = _l2((solution.p - mean_h / area) - (exact_p - mean_exact / area), mesh)
    return velocity_error, pressure_error


def test_kovasznay_converges_at_taylor_hood_rates():
    errors = np.array([_kovasznay_errors(n) for n in (8, 16, 32)])
    rates = np.log2(errors[:-1] / errors[1:])
    velocity_rates, pressure_rates = rates[:, 0], rates[:, 1]
    assert velocity_rates[-1] == pytest.approx(3.0, abs=0.25), velocity_rates
    assert pressure_rates[-1] == pytest.approx(2.0, abs=0.3), pressure_rates
    assert errors[-1, 0] < 1e-3


@pytest.mark.parametrize("quadrilateral", [False, True])
def test_periodic_poiseuille_is_reproduced_to_round_off(quadrilateral):
    length, height, nu, bulk = 2.0, 1.0, 0.01, 0.7
    mesh, tags = tagged_rectangle(
        COMM, (0.0, 0.0), (length, height), (6, 5), quadrilateral=quadrilateral
    )
    solution = solve_flow(mesh, tags, periodic_channel_spec(length), nu=nu, bulk_velocity=bulk)
    exact_force = 12 * nu * bulk / height**2
    assert solution.body_force == pytest.approx(exact_force, rel=1e-8)
    assert solution.bulk_velocity == pytest.approx(bulk, rel=1e-8)
    x = ufl.SpatialCoordinate(mesh)
    exact_u = ufl.as_vector([exact_force / (2 * nu) * x[1] * (height - x[1]), 0.0])
    assert _l2(solution.u - exact_u, mesh) < 1e-12
    assert _l2(solution.p, mesh) < 1e-11  # pinned to zero, and uniform
    assert solution.num_dofs > 0 and solution.wall_time > 0
    assert solution.newton_iterations <= 2


def test_eddy_viscosity_adds_to_the_molecular_viscosity():
    length, height, nu, bulk = 2.0, 1.0, 0.01, 0.7
    mesh, tags = tagged_rectangle(COMM, (0.0, 0.0), (length, height), (4, 4))
    V = fem.functionspace(mesh, ("Lagrange", 1))
    eddy = fem.Function(V)
    eddy.x.array[:] = 0.03
    spec = periodic_channel_spec(length)
    for nu_t in (eddy, 0.03 + 0.0 * ufl.SpatialCoordinate(mesh)[0]):
        solution = solve_flow(mesh, tags, spec, nu=nu, bulk_velocity=bulk, nu_t=nu_t)
        assert solution.body_force == pytest.approx(12 * (nu + 0.03) * bulk / height**2, rel=1e-8)


def test_inlet_and_do_nothing_outlet_give_poiseuille_with_a_pressure_drop():
    length, height, nu, peak = 2.0, 1.0, 0.05, 1.0
    mesh, tags = tagged_rectangle(COMM, (0.0, 0.0), (length, height), (6, 4))

    def inlet(x: np.ndarray) -> np.ndarray:
        return np.vstack([4 * peak * x[1] * (height - x[1]) / height**2, 0.0 * x[0]])

    spec = BoundarySpec(walls=(BOTTOM, TOP), inlets={LEFT: inlet}, outlets=(RIGHT,))
    solution = solve_flow(mesh, tags, spec, nu=nu)
    gradient = 8 * nu * peak / height**2
    x = ufl.SpatialCoordinate(mesh)
    exact_u = ufl.as_vector([4 * peak * x[1] * (height - x[1]) / height**2, 0.0])
    assert _l2(solution.u - exact_u, mesh) < 1e-11
    assert _l2(solution.p - gradient * (length - x[0]), mesh) < 1e-10
    assert solution.body_force == 0.0
    assert solution.bulk_velocity == pytest.approx(2 / 3 * peak, rel=1e-10)


def test_restart_from_a_converged_solution_needs_no_newton_step():
    mesh, tags = tagged_rectangle(COMM, (0.0, 0.0), (2.0, 1.0), (8, 6), wave_amplitude=0.15)
    spec = periodic_channel_spec(2.0)
    first = solve_flow(mesh, tags, spec, bulk_velocity=0.5)
    assert first.newton_iterations >= 3  # the wavy channel is genuinely nonlinear
    again = solve_flow(mesh, tags, spec, bulk_velocity=0.5, initial_guess=first)
    assert again.newton_iterations <= 1
    assert again.body_force == pytest.approx(first.body_force, rel=1e-9)


def test_invalid_inputs_raise_value_errors():
    mesh, tags = tagged_rectangle(COMM, (0.0, 0.0), (2.0, 1.0), (2, 2))
    spec = periodic_channel_spec(2.0)
    V = fem.functionspace(mesh, ("Lagrange", 1))
    bad_eddy = fem.Function(V)
    bad_eddy.x.array[:] = np.nan
    negative_eddy = fem.Function(V)
    negative_eddy.x.array[:] = -1.0
    x = ufl.SpatialCoordinate(mesh)
    with pytest.raises(ValueError, match="nu_t has"):
        solve_flow(mesh, tags, spec, nu_t=bad_eddy)
    with pytest.raises(ValueError, match="non-negative"):
        solve_flow(mesh, tags, spec, nu_t=negative_eddy)
    with pytest.raises(ValueError, match="NaN/inf"):
        solve_flow(mesh, tags, spec, nu_t=ufl.sqrt(x[0] - 10.0))
    with pytest.raises(ValueError, match="nu must be finite"):
        solve_flow(mesh, tags, spec, nu=float("nan"))
    with pytest.raises(ValueError, match="bulk_velocity"):
        solve_flow(mesh, tags, spec, bulk_velocity=float("inf"))
    with pytest.raises(ValueError, match="degree"):
        solve_flow(mesh, tags, spec, degree=1)

    def nan_profile(points: np.ndarray) -> np.ndarray:
        return np.full((2, points.shape[1]), np.nan)

    nan_inlet = BoundarySpec(walls=(BOTTOM, TOP), inlets={LEFT: nan_profile}, outlets=(RIGHT,))
    with pytest.raises(ValueError, match="inlet profile"):
        solve_flow(mesh, tags, nan_inlet)


def test_forced_newton_failure_reports_the_history():
    with pytest.raises(SolverDivergedError, match="did not reach rtol") as info:
        _kovasznay(8, max_iterations=1, rtol=1e-14)
    assert len(info.value.history) == 2
    assert "0: " in str(info.value) and "1: " in str(info.value)


def _run_channel(command: list[str]) -> dict:
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.mpi
@pytest.mark.parametrize("quadrilateral", [False, True])
def test_wavy_channel_agrees_in_serial_and_on_two_ranks(quadrilateral):
    if COMM.size > 1:
        pytest.skip("launches its own MPI runs")
    arguments = [str(SCRIPT), "--n", "10"] + (["--quadrilateral"] if quadrilateral else [])
    serial = _run_channel([sys.executable, *arguments])
    parallel = _run_channel([str(MPIEXEC), "-n", "2", sys.executable, *arguments])
    assert serial["ranks"] == 1 and parallel["ranks"] == 2
    assert serial["num_dofs"] == parallel["num_dofs"]
    assert parallel["body_force"] == pytest.approx(serial["body_force"], rel=1e-8)
    assert parallel["bulk_velocity"] == pytest.approx(serial["bulk_velocity"], rel=1e-8)
    assert serial["bulk_velocity"] == pytest.approx(0.5, rel=1e-10)
    assert parallel["max_velocity_component"] == pytest.approx(
        serial["max_velocity_component"], rel=1e-8
    )


def test_coarse_periodic_hill_flow_meets_the_bulk_velocity():
    from meshes.structured import structured_hill_mesh
    from solvers.boundaries import hill_boundary_spec

    tagged = structured_hill_mesh(1.0, resolution=0.1, comm=COMM)
    spec = hill_boundary_spec(tagged.boundaries, tagged.period)
    solution = solve_flow(tagged.mesh, tagged.facet_tags, spec)
    assert solution.bulk_velocity == pytest.approx(0.721039, rel=1e-10)
    assert solution.body_force > 0
    assert solution.residual_history[-1] <= 1e-10 * solution.residual_history[0]
    # Recirculation behind the hill: some streamwise velocity is negative.
    minimum = COMM.allreduce(float(solution.u.x.array[0::2].min()), op=MPI.MIN)
    assert minimum < 0
