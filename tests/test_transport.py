from mpi4py import MPI

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ufl
from dolfinx import fem
from dolfinx import mesh as dmesh

from experiments.verification3d.cases import manufactured_tau
from solvers.boundaries import BoundarySpec, hill_boundary_spec
from solvers.fields import strain_rate_magnitude, wall_distance_function
from solvers.linalg import SolverDivergedError
from solvers.transport import (
    solve_tau,
)
from tests.mpi_scripts.tau_channel import BOUNDARIES, channel
from vcnn.physics import Physics

COMM = MPI.COMM_WORLD
SCRIPT = Path(__file__).parent / "mpi_scripts" / "tau_channel.py"
MPIEXEC = Path(sys.executable).parent / "mpiexec"


def _l2(expression, mesh) -> float:
    value = fem.assemble_scalar(fem.form(expression**2 * ufl.dx(domain=mesh)))
    return float(np.sqrt(COMM.allreduce(value, op=MPI.SUM)))


def _mms_error(
    n: int, diffusivity: float, exponent: float, supg_length: str = "diameter"
) -> float:
    mesh = dmesh.create_unit_square(COMM, n, n)
    x = ufl.SpatialCoordinate(mesh)
    exact = 1.0 + 0.5 * ufl.sin(2 * ufl.pi * x[0]) * ufl.cos(ufl.pi * x[1]) + x[0] * x[1]
    velocity = ufl.as_vector([ufl.cos(x[1]), ufl.sin(x[0]) + 0.5])
    result = manufactured_tau(
        mesh, exact, velocity, diffusivity=diffusivity, exponent=exponent,
        supg_length=supg_length,
    )
    history = result.residual_history
    assert history[-1] <= 1e-10 * history[0] + 1e-13
    return result.error


@pytest.mark.parametrize("exponent", [1.0, 0.5])
@pytest.mark.parametrize(("diffusivity", "min_rate"), [(0.1, 1.9), (0.01, 1.7)])
def test_manufactured_solution_converges_at_second_order(diffusivity, min_rate, exponent):
    # Cell Peclet numbers |u| h / (2 D) are 0.1-0.6 for D = 0.1 and 1-6 for D = 0.01 on these
    # meshes: SUPG is active, and its L2 rate lies between 1.5 and 2 in the advective regime.
    # Both destruction exponents: p = 1 (published data) and p = 1/2.
    errors = np.array([_mms_error(n, diffusivity, exponent) for n in (8, 16, 32)])
    rates = np.log2(errors[:-1] / errors[1:])
    assert np.all(rates > min_rate), (errors, rates)


def test_flow_aligned_supg_length_keeps_the_rate_and_stays_consistent():
    # The flow-aligned element length (physics.supg_length = "flow") changes only the amount
    # of (consistent) stabilisation: the same rates, and an error of the same size.
    flow = np.array([_mms_error(n, 0.01, 1.0, "flow") for n in (8, 16, 32)])
    diameter = np.array([_mms_error(n, 0.01, 1.0) for n in (8, 16, 32)])
    rates = np.log2(flow[:-1] / flow[1:])
    assert np.all(rates > 1.7), (flow, rates)
    assert not np.allclose(flow, diameter, rtol=1e-6)
    assert np.all(flow < 2 * diameter)


def test_unknown_supg_length_is_refused():
    with pytest.raises(ValueError, match="supg_length must be one of"):
        Physics(supg_length="cell")
    with pytest.raises(ValueError, match="unknown SUPG length"):
        _mms_error(4, 0.1, 1.0, "cell")


def _poiseuille_tau(ny: int, *, production: str = "frozen", velocity_scale: float = 1.0):
    length, height = 1.0, 2.0
    mesh, tags = channel(COMM, length, height, max(ny // 4, 2), ny)
    spec = hill_boundary_spec(BOUNDARIES, (length, 0.0))
    V = fem.functionspace(mesh, ("Lagrange", 1))
    W = fem.functionspace(mesh, ("Lagrange", 2, (2,)))
    velocity = fem.Function(W)
    velocity.interpolate(
        lambda x: np.vstack([1.5 * velocity_scale * x[1] * (height - x[1]), np.zeros_like(x[0])])
    )
    # |S| of the Poiseuille profile given analytically: |dU/dy|.
    y = ufl.SpatialCoordinate(mesh)[1]
    strain_rate = abs(1.5 * (height - 2 * y))
    distance = wall_distance_function(V, tags, spec.walls)
    solution = solve_tau(V, velocity, strain_rate, distance, tags, spec, production=production)
    return solution, V


def test_channel_tau_positive_zero_on_walls_and_converging():
    integrals = []
    for ny in (8, 16, 32):
        solution, V = _poiseuille_tau(ny)
        y = V.tabulate_dof_coordinates()[:, 1]
        wall = np.isclose(y, 0.0) | np.isclose(y, 2.0)
        assert np.all(solution.tau.x.array[wall] == 0.0)
        assert np.all(solution.tau.x.array[~wall] > 0.0)
        assert solution.residual_history[-1] <= 1e-10 * solution.residual_history[0]
        integrals.append(solution.integral)
    differences = np.abs(np.diff(integrals))
    assert differences[1] < 0.4 * differences[0], integrals
    assert integrals[-1] > 0


def test_channel_tau_is_x_independent_and_periodic():
    solution, V = _poiseuille_tau(12)
    coordinates = V.tabulate_dof_coordinates()
    values = solution.tau.x.array
    for height in np.unique(np.round(coordinates[:, 1], 12)):
        row = values[np.isclose(coordinates[:, 1], height)]
        np.testing.assert_allclose(row, row[0], rtol=1e-9, atol=1e-12)


def test_periodic_sides_agree_with_cross_flow():
    length, height = 2.0, 2.0
    mesh, tags = channel(COMM, length, height, 10, 10)
    spec = hill_boundary_spec(BOUNDARIES, (length, 0.0))
    V = fem.functionspace(mesh, ("Lagrange", 1))
    x = ufl.SpatialCoordinate(mesh)
    # A velocity that is not mirror-symmetric, so tau varies along x.
    velocity = ufl.as_vector(
        [1.5 * x[1] * (height - x[1]), 0.3 * ufl.sin(ufl.pi * x[0]) * x[1] * (height - x[1])]
    )
    distance = wall_distance_function(V, tags, spec.walls)
    # A strain rate with the period of the channel: tau varies along x.
    strain_rate = 1.0 + 0.5 * ufl.sin(ufl.pi * x[0])
    solution = solve_tau(V, velocity, strain_rate, distance, tags, spec)
    coordinates = V.tabulate_dof_coordinates()
    left = np.flatnonzero(np.isclose(coordinates[:, 0], 0.0))
    right = np.flatnonzero(np.isclose(coordinates[:, 0], length))
    left = left[np.argsort(coordinates[left, 1])]
    right = right[np.argsort(coordinates[right, 1])]
    np.testing.assert_allclose(solution.tau.x.array[left], solution.tau.x.array[right], rtol=1e-12)
    interior_column = np.isclose(coordinates[:, 0], 0.6)
    assert np.ptp(solution.tau.x.array[interior_column]) > 0.01
    # Non-trivial variation along x: otherwise periodicity would be checked trivially.
    middle = np.isclose(coordinates[:, 1], 1.0)
    assert np.ptp(solution.tau.x.array[middle]) > 1e-3


def test_zero_velocity_is_a_diffusion_reaction_problem():
    mesh, tags = channel(COMM, 1.0, 1.0, 6, 6)
    spec = BoundarySpec(walls=(1, 2, 3, 4))
    V = fem.functionspace(mesh, ("Lagrange", 1))
    velocity = ufl.as_vector([0.0, 0.0])
    distance = wall_distance_function(V, tags, spec.walls)
    solution = solve_tau(V, velocity, fem.Constant(mesh, 2.0), distance, tags, spec)
    values = solution.tau.x.array
    assert np.all(np.isfinite(values))
    assert values.max() > 0
    # Symmetric problem, symmetric solution (crossed diagonals keep the mesh symmetric).
    coordinates = V.tabulate_dof_coordinates()
    mirrored = np.lexsort((coordinates[:, 1], 1.0 - coordinates[:, 0]))
    original = np.lexsort((coordinates[:, 1], coordinates[:, 0]))
    np.testing.assert_allclose(values[original], values[mirrored], atol=1e-12)


def test_coupled_production_converges_above_frozen():
    frozen, _ = _poiseuille_tau(16)
    coupled, _ = _poiseuille_tau(16, production="coupled")
    assert coupled.residual_history[-1] <= 1e-10 * coupled.residual_history[0]
    assert coupled.newton_iterations > frozen.newton_iterations
    # sqrt(tau) >> sqrt(0.001) wherever tau is O(1): far more production.
    assert coupled.integral > 5 * frozen.integral


def _solve_args():
    mesh, tags = channel(COMM, 1.0, 1.0, 4, 4)
    spec = hill_boundary_spec(BOUNDARIES, (1.0, 0.0))
    V = fem.functionspace(mesh, ("Lagrange", 1))
    W = fem.functionspace(mesh, ("Lagrange", 1, (2,)))
    velocity = fem.Function(W)
    velocity.interpolate(lambda x: np.vstack([x[1] * (1 - x[1]), np.zeros_like(x[0])]))
    strain_rate = strain_rate_magnitude(velocity, V)
    distance = wall_distance_function(V, tags, spec.walls)
    return V, velocity, strain_rate, distance, tags, spec


def test_bad_input_is_rejected():
    V, velocity, strain_rate, distance, tags, spec = _solve_args()
    with pytest.raises(ValueError, match="production"):
        solve_tau(V, velocity, strain_rate, distance, tags, spec, production="frozen-ish")
    with pytest.raises(ValueError, match="diffusivity"):
        solve_tau(V, velocity, strain_rate, distance, tags, spec, diffusivity=0.0)
    broken = velocity.copy()
    broken.x.array[3] = np.nan
    with pytest.raises(ValueError, match="velocity contains NaN"):
        solve_tau(V, broken, strain_rate, distance, tags, spec)
    broken_distance = distance.copy()
    broken_distance.x.array[0] = np.inf
    with pytest.raises(ValueError, match="wall_distance"):
        solve_tau(V, velocity, strain_rate, broken_distance, tags, spec)
    W = fem.functionspace(V.mesh, ("Lagrange", 2))
    with pytest.raises(ValueError, match="P1"):
        solve_tau(W, velocity, strain_rate, distance, tags, spec)


def test_newton_failure_raises_a_clear_error():
    V, velocity, strain_rate, distance, tags, spec = _solve_args()
    with pytest.raises(SolverDivergedError, match="did not converge in 1 iterations") as info:
        solve_tau(V, velocity, strain_rate, distance, tags, spec, max_iterations=1)
    assert len(info.value.history) == 2
    # tau = 0 solves the coupled equation; Newton started there cannot leave it.
    with pytest.raises(SolverDivergedError, match="initial_guess"):
        solve_tau(
            V,
            velocity,
            strain_rate,
            distance,
            tags,
            spec,
            production="coupled",
            initial_guess=fem.Function(V),
        )


@pytest.mark.mpi
def test_serial_and_parallel_tau_integrals_agree():
    def run(ranks: int) -> float:
        command = [sys.executable, str(SCRIPT), "--nx", "10", "--ny", "12"]
        if ranks > 1:
            command = [str(MPIEXEC), "-n", str(ranks), *command]
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=300, check=False
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        lines = [line for line in completed.stdout.splitlines() if "TAU_INTEGRAL" in line]
        assert len(lines) == 1, completed.stdout
        return float(lines[0].split()[1])

    serial = run(1)
    parallel = run(2)
    assert serial > 0
    assert parallel == pytest.approx(serial, rel=1e-8)
