from mpi4py import MPI

import numpy as np
import pytest
import ufl
from dolfinx import fem

from solvers.boundaries import hill_boundary_spec
from solvers.coupled import periodic_lengths, solve_coupled
from solvers.fields import strain_rate_expression, wall_distance_function
from solvers.flow import solve_flow
from solvers.transport import solve_tau
from tests.mpi_scripts.tau_channel import BOUNDARIES, channel

COMM = MPI.COMM_WORLD
BULK_VELOCITY = 0.721039


def _channel():
    mesh, tags = channel(COMM, 1.0, 2.0, 3, 12)
    return mesh, tags, hill_boundary_spec(BOUNDARIES, (1.0, 0.0))


def _bulk_velocity(u, mesh) -> float:
    area = COMM.allreduce(fem.assemble_scalar(fem.form(1.0 * ufl.dx(domain=mesh))), op=MPI.SUM)
    flux = COMM.allreduce(fem.assemble_scalar(fem.form(u[0] * ufl.dx)), op=MPI.SUM)
    return flux / area


def test_two_way_coupling_reaches_the_fixed_point():
    mesh, tags, spec = _channel()
    tol = 1e-8
    solution = solve_coupled(mesh, tags, spec, c_k=0.1, tol=tol, relaxation=0.8)
    changes = np.array([step.change for step in solution.history])
    assert solution.iterations == len(solution.history) > 3
    assert changes[-1] <= tol
    # Linear convergence of the relaxed Picard map: the change keeps falling.
    assert np.all(np.diff(changes[1:]) < 0), changes
    assert _bulk_velocity(solution.flow.u, mesh) == pytest.approx(BULK_VELOCITY, rel=1e-9)
    assert solution.flow.bulk_velocity == pytest.approx(BULK_VELOCITY, rel=1e-9)

    # At the fixed point, a flow solved with nu_t of the returned tau reproduces the flow.
    V = solution.tau.tau.function_space
    distance = wall_distance_function(V, tags, spec.walls)
    length = np.minimum(0.41 * distance.x.array, 0.135)
    nu_t = fem.Function(V)
    nu_t.x.array[:] = 0.1 * length * np.sqrt(np.maximum(solution.tau.tau.x.array, 0.0))
    check = solve_flow(mesh, tags, spec, nu_t=nu_t)
    difference = fem.assemble_scalar(
        fem.form(ufl.inner(check.u - solution.flow.u, check.u - solution.flow.u) * ufl.dx)
    )
    size = fem.assemble_scalar(fem.form(ufl.inner(check.u, check.u) * ufl.dx))
    assert np.sqrt(COMM.allreduce(difference) / COMM.allreduce(size)) < 1e-6

    # The eddy viscosity flattens the profile: more body force for the same bulk velocity.
    laminar = solve_flow(mesh, tags, spec)
    assert solution.flow.body_force > 1.05 * laminar.body_force


def test_zero_coupling_is_one_flow_and_one_tau_solve():
    mesh, tags, spec = _channel()
    solution = solve_coupled(mesh, tags, spec, c_k=0.0)
    assert solution.iterations == 1
    flow = solve_flow(mesh, tags, spec)
    V = solution.tau.tau.function_space
    distance = wall_distance_function(V, tags, spec.walls)
    tau = solve_tau(V, flow.u, strain_rate_expression(flow.u), distance, tags, spec)
    assert solution.tau.integral == pytest.approx(tau.integral, rel=1e-10)
    assert solution.flow.body_force == pytest.approx(flow.body_force, rel=1e-10)


def test_bad_options_are_rejected():
    mesh, tags, spec = _channel()
    with pytest.raises(ValueError, match="c_k"):
        solve_coupled(mesh, tags, spec, c_k=-1.0)
    with pytest.raises(ValueError, match="relaxation"):
        solve_coupled(mesh, tags, spec, c_k=0.1, relaxation=0.0)
    with pytest.raises(ValueError, match="production"):
        solve_coupled(mesh, tags, spec, c_k=0.1, production="both")


def test_periodic_lengths():
    spec = hill_boundary_spec(BOUNDARIES, (9.0, 0.0))
    assert periodic_lengths(spec, 2) == (9.0, 0.0)
