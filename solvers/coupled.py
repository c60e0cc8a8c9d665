"""Two-way coupled flow and tau (DESIGN 3.2, 3.3, 7) by relaxed Picard iteration.

The eddy viscosity ``nu_t = C_k l_m sqrt(max(tau, 0))`` of the current tau feeds the momentum
equation; the new flow gives a new tau; tau is relaxed, ``tau <- tau + omega (tau_new - tau)``,
and the loop repeats until the relative L2 changes of both the velocity and the unrelaxed
tau (``tau_new`` against the tau that produced the flow) fall below ``tol``. Every sub-solve
is a Newton solve warm-started from the previous iterate, so late iterations cost one or two
Newton steps each. With ``c_k = 0`` the flow does not see tau: one flow solve and one tau
solve.
"""

from __future__ import annotations

from mpi4py import MPI

import logging
import time
from dataclasses import dataclass, field

import dolfinx
import numpy as np
import ufl
from dolfinx import fem

from solvers.boundaries import BoundarySpec
from solvers.fields import (
    mixing_length,
    strain_rate_expression,
    wall_distance_function,
)
from solvers.flow import FlowSolution, solve_flow
from solvers.linalg import SolverDivergedError, format_history
from solvers.transport import TauSolution, dirichlet_dofs, solve_tau
from vcnn.physics import PRODUCTION_MODES

logger = logging.getLogger(__name__)

__all__ = ["CoupledSolution", "CoupledStep", "periodic_lengths", "solve_coupled"]


@dataclass(frozen=True)
class CoupledStep:
    """One Picard iteration.

    Attributes:
        velocity_change: ||u_k - u_{k-1}|| / ||u_k|| (L2; 1.0 on the first iteration).
        tau_change: ||tau_new - tau_in|| / ||tau_new|| (L2), tau_in the relaxed tau that set
            nu_t for this iteration's flow: the fixed-point residual.
        flow_iterations: Newton steps of the flow solve.
        tau_iterations: Newton steps of the tau solve.
        body_force: the flow's driving body force.
        tau_integral: int tau_new dx.
    """

    velocity_change: float
    tau_change: float
    flow_iterations: int
    tau_iterations: int
    body_force: float
    tau_integral: float

    @property
    def change(self) -> float:
        """The larger of the two relative changes (compared with ``tol``)."""
        return max(self.velocity_change, self.tau_change)


@dataclass
class CoupledSolution:
    """Converged two-way coupled flow and tau.

    Attributes:
        flow: the last flow solve (its nu_t from the converged tau).
        tau: the last tau solve.
        iterations: Picard iterations (1 when c_k = 0).
        history: one :class:`CoupledStep` per iteration.
        wall_time: seconds spent in :func:`solve_coupled`.
    """

    flow: FlowSolution
    tau: TauSolution
    iterations: int
    history: list[CoupledStep] = field(default_factory=list)
    wall_time: float = 0.0


def periodic_lengths(spec: BoundarySpec, gdim: int) -> tuple[float, ...]:
    """Periodic length along each axis from the spec's axis-aligned periodic pairs.

    Returns:
        (gdim,) lengths, 0 where not periodic. A pair whose translation is not along an axis
        contributes nothing (its wall images are then not included in the wall distance).
    """
    lengths = np.zeros(gdim)
    for pair in spec.periodic:
        translation = np.abs(np.asarray(pair.translation, dtype=float))
        nonzero = np.flatnonzero(translation > 0)
        if nonzero.size == 1:
            lengths[nonzero[0]] = translation[nonzero[0]]
    return tuple(float(length) for length in lengths)


def _relative_change(new, old, mesh: dolfinx.mesh.Mesh) -> float:
    comm = mesh.comm
    dx = ufl.dx(domain=mesh)
    difference = comm.allreduce(
        fem.assemble_scalar(fem.form(ufl.inner(new - old, new - old) * dx)), op=MPI.SUM
    )
    size = comm.allreduce(fem.assemble_scalar(fem.form(ufl.inner(new, new) * dx)), op=MPI.SUM)
    if size == 0.0:
        return 0.0 if difference == 0.0 else float("inf")
    return float(np.sqrt(difference / size))


def _global_norm(values: np.ndarray, V: fem.FunctionSpace) -> float:
    owned = V.dofmap.index_map.size_local
    return float(np.sqrt(V.mesh.comm.allreduce(float(values[:owned] @ values[:owned]))))


class _WarmStartTolerance:
    """Relative Newton tolerances for warm-started flow solves that stay above round-off.

    A warm start begins with a residual r0 proportional to the change of nu_t. Relative to
    it, ``warm_rtol`` leaves an error far below that change; but once the Picard iteration
    has nearly converged, ``warm_rtol * r0`` falls under the round-off floor of the residual
    and Newton could never meet it. So the absolute target is also kept above
    ``1e-11 R0`` (R0: initial residual of the cold first solve, which itself converged to
    1e-10 R0), with r0 predicted from the last warm solve's ratio r0 / |delta nu_t|.
    """

    def __init__(self, warm_rtol: float) -> None:
        self.warm_rtol = warm_rtol
        self.cold_residual: float | None = None
        self.residual_per_change: float | None = None

    def next_rtol(self, viscosity_change: float) -> float:
        if self.cold_residual is None:
            return 1e-10
        if self.residual_per_change is None or viscosity_change == 0.0:
            return self.warm_rtol
        predicted = self.residual_per_change * viscosity_change
        floor = 1e-11 * self.cold_residual
        return float(min(0.5, max(self.warm_rtol, floor / predicted)))

    def record(self, initial_residual: float, viscosity_change: float) -> None:
        if self.cold_residual is None:
            self.cold_residual = initial_residual
        elif viscosity_change > 0.0:
            self.residual_per_change = initial_residual / viscosity_change


def solve_coupled(
    mesh: dolfinx.mesh.Mesh,
    facet_tags: dolfinx.mesh.MeshTags,
    spec: BoundarySpec,
    *,
    c_k: float,
    nu: float = 0.01,
    bulk_velocity: float = 0.721039,
    production: str = "frozen",
    relaxation: float = 0.7,
    tol: float = 1e-8,
    max_iterations: int = 60,
    diffusivity: float = 0.1,
    zeta: float = 3.0,
    reaction_exponent: float = 1.0,
    gamma: float = 200.0,
    tau_p: float = 0.001,
    warm_rtol: float = 1e-6,
) -> CoupledSolution:
    """Solve flow and tau with two-way coupling through ``nu_t = C_k l_m sqrt(max(tau, 0))``.

    Args:
        mesh: the mesh.
        facet_tags: facet markers used by ``spec``.
        spec: boundary roles (walls, inlets, outlets, periodic pairs).
        c_k: coupling constant C_k >= 0; 0 gives one-way coupling (flow, then tau).
        nu: molecular viscosity.
        bulk_velocity: target bulk velocity of a body-force driven flow.
        production: tau production mode, ``"frozen"`` or ``"coupled"``.
        relaxation: omega in (0, 1] of the tau update that feeds nu_t.
        tol: stop when both relative L2 changes (velocity, unrelaxed tau) are below tol.
        max_iterations: Picard iterations at most.
        diffusivity: D of the tau equation.
        zeta: destruction coefficient of the tau equation.
        reaction_exponent: p of the destruction term zeta |tau|^p tau.
        gamma: production coefficient of the tau equation.
        tau_p: frozen production level.
        warm_rtol: relative Newton tolerance of the warm-started flow solves.

    Returns:
        CoupledSolution; ``tau.tau`` is a P1 Function.

    Raises:
        ValueError: invalid options.
        SolverDivergedError: a sub-solve failed, or no fixed point within max_iterations.
    """
    start = time.perf_counter()
    if not (np.isfinite(c_k) and c_k >= 0):
        raise ValueError(f"c_k must be a finite non-negative number, got {c_k}")
    if not 0 < relaxation <= 1:
        raise ValueError(f"relaxation must lie in (0, 1], got {relaxation}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be at least 1, got {max_iterations}")
    if production not in PRODUCTION_MODES:
        raise ValueError(f"unknown production mode {production!r}: use one of {PRODUCTION_MODES}")
    comm = mesh.comm
    V = fem.functionspace(mesh, ("Lagrange", 1))
    constraint = None
    if spec.periodic:
        from solvers.periodic import PeriodicConstraint

        constraint = PeriodicConstraint(
            V,
            facet_tags,
            spec.periodic,
            excluded_dofs=dirichlet_dofs(V, facet_tags, spec.dirichlet_tags),
        )
    if spec.walls:
        distance = wall_distance_function(
            V, facet_tags, spec.walls, period=periodic_lengths(spec, mesh.geometry.dim)
        )
    else:
        # Without walls there is no wall distance: the mixing length takes its cap.
        distance = fem.Function(V, name="wall_distance")
        distance.x.array[:] = np.inf
    length = mixing_length(distance.x.array)

    tau_options = dict(
        production=production,
        diffusivity=diffusivity,
        zeta=zeta,
        reaction_exponent=reaction_exponent,
        gamma=gamma,
        tau_p=tau_p,
    )
    tolerances = _WarmStartTolerance(warm_rtol)
    tau_in = fem.Function(V, name="tau_relaxed")
    eddy_viscosity = fem.Function(V, name="nu_t")
    flow: FlowSolution | None = None
    tau: TauSolution | None = None
    history: list[CoupledStep] = []
    try:
        for iteration in range(1, max_iterations + 1):
            new_viscosity = c_k * length * np.sqrt(np.maximum(tau_in.x.array, 0.0))
            viscosity_change = _global_norm(new_viscosity - eddy_viscosity.x.array, V)
            eddy_viscosity.x.array[:] = new_viscosity
            previous_velocity = None if flow is None else flow.u.copy()
            flow_rtol = tolerances.next_rtol(viscosity_change)
            flow = solve_flow(
                mesh,
                facet_tags,
                spec,
                nu=nu,
                bulk_velocity=bulk_velocity,
                nu_t=eddy_viscosity if c_k > 0 else None,
                initial_guess=flow,
                rtol=flow_rtol,
            )
            tolerances.record(flow.residual_history[0], viscosity_change)
            tau = solve_tau(
                V,
                flow.u,
                strain_rate_expression(flow.u),
                distance if spec.walls else ufl.as_ufl(1e300),
                facet_tags,
                spec,
                initial_guess=None if tau is None else tau.tau,
                constraint=constraint,
                **tau_options,
            )
            velocity_change = (
                1.0
                if previous_velocity is None
                else _relative_change(flow.u, previous_velocity, mesh)
            )
            step = CoupledStep(
                velocity_change=velocity_change,
                tau_change=_relative_change(tau.tau, tau_in, mesh),
                flow_iterations=flow.newton_iterations,
                tau_iterations=tau.newton_iterations,
                body_force=flow.body_force,
                tau_integral=tau.integral,
            )
            history.append(step)
            if comm.rank == 0:
                logger.info(
                    "Picard %d: du %.3e, dtau %.3e, Newton %d + %d, tau integral %.6g",
                    iteration,
                    step.velocity_change,
                    step.tau_change,
                    step.flow_iterations,
                    step.tau_iterations,
                    step.tau_integral,
                )
            if c_k == 0:
                break
            if iteration > 1 and step.change <= tol:
                break
            tau_in.x.array[:] += relaxation * (tau.tau.x.array - tau_in.x.array)
        else:
            changes = [s.change for s in history]
            raise SolverDivergedError(
                f"coupled Picard iteration did not reach tol={tol} in {max_iterations} "
                f"iterations (changes {format_history(changes)}); lower the relaxation or "
                "raise max_iterations",
                changes,
            )
    finally:
        if constraint is not None:
            constraint.destroy()
    return CoupledSolution(
        flow=flow,
        tau=tau,
        iterations=len(history),
        history=history,
        wall_time=time.perf_counter() - start,
    )
