"""The two-way coupled solve as it was before the closure loop existed, for comparison.

A plain relaxed Picard iteration built only on the one-shot solvers ``solve_flow`` and
``solve_tau`` (each call sets up its own spaces, forms and constraints): nu_t from the relaxed
tau, a new flow, a new tau, ``tau_in <- tau_in + omega (tau - tau_in)``, until the relative
L2 changes of the velocity and of tau fall below ``tol``. It shares no code with
``solvers.problem``, ``solvers.closures`` or ``solvers.closure_loop``, so the tests can check
those against it.
"""

from mpi4py import MPI  # noqa: F401  (initialise MPI before dolfinx)

import numpy as np
import ufl
from dolfinx import fem

from solvers.fields import mixing_length, strain_rate_expression, wall_distance_function
from solvers.flow import solve_flow
from solvers.periodic import PeriodicConstraint
from solvers.problem import periodic_lengths
from solvers.transport import dirichlet_dofs, solve_tau


def _relative_change(new, old, mesh) -> float:
    dx = ufl.dx(domain=mesh)
    difference = fem.assemble_scalar(fem.form(ufl.inner(new - old, new - old) * dx))
    size = fem.assemble_scalar(fem.form(ufl.inner(new, new) * dx))
    return float(np.sqrt(mesh.comm.allreduce(difference) / mesh.comm.allreduce(size)))


def reference_coupled(mesh, facet_tags, spec, physics, *, relaxation=0.7, tol=1e-9, iterations=80):
    """(tau P1 Function, body force, Picard iterations) of the two-way coupled problem."""
    V = fem.functionspace(mesh, ("Lagrange", 1))
    constraint = PeriodicConstraint(
        V, facet_tags, spec.periodic,
        excluded_dofs=dirichlet_dofs(V, facet_tags, spec.dirichlet_tags),
    )
    distance = wall_distance_function(
        V, facet_tags, spec.walls, period=periodic_lengths(spec, mesh.geometry.dim)
    )
    length = mixing_length(distance.x.array)
    transport = dict(
        production=physics.production, diffusivity=physics.diffusivity, zeta=physics.zeta,
        reaction_exponent=physics.reaction_exponent, gamma=physics.gamma, tau_p=physics.tau_p,
    )
    tau_in = fem.Function(V)
    nu_t = fem.Function(V)
    flow = tau = None
    try:
        for iteration in range(1, iterations + 1):
            nu_t.x.array[:] = physics.c_k * length * np.sqrt(np.maximum(tau_in.x.array, 0.0))
            previous = None if flow is None else flow.u.copy()
            flow = solve_flow(mesh, facet_tags, spec, nu=physics.nu,
                              bulk_velocity=physics.bulk_velocity, nu_t=nu_t,
                              initial_guess=flow, rtol=1e-10 if flow is None else 1e-9)
            tau = solve_tau(V, flow.u, strain_rate_expression(flow.u), distance, facet_tags,
                            spec, initial_guess=None if tau is None else tau.tau,
                            constraint=constraint, **transport)
            du = 1.0 if previous is None else _relative_change(flow.u, previous, mesh)
            dtau = _relative_change(tau.tau, tau_in, mesh)
            if iteration > 1 and max(du, dtau) <= tol:
                return tau.tau, flow.body_force, iteration
            tau_in.x.array[:] += relaxation * (tau.tau.x.array - tau_in.x.array)
    finally:
        constraint.destroy()
    raise RuntimeError("the reference Picard iteration did not converge")


__all__ = ["reference_coupled"]
