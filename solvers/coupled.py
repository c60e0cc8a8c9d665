"""Two-way coupled flow and tau with the tau PDE as the closure (docs/physics.md, docs/design.md).

:func:`solve_coupled` is the PDE-coupled solve in one call: it builds a
:class:`solvers.problem.ClosureProblem`, closes it with the tau PDE
(:class:`solvers.closures.PdeClosure`) and runs the outer iteration of
:func:`solvers.closure_loop.solve_two_way` (relaxed Picard by default, the scheme this
function has always used: ``tau <- tau + omega (tau_new - tau)`` until the relative changes
of the velocity and of the unrelaxed tau fall below ``tol``; ``outer="anderson"`` or
``"ngmres"`` accelerate it). With ``c_k = 0`` the flow does not see tau: one flow solve and
one tau solve. A network closure runs through the same loop (``vcnn simulate``).
"""

from __future__ import annotations

from mpi4py import MPI

import time
from dataclasses import dataclass, field

import dolfinx
import numpy as np
import ufl
from dolfinx import fem

from solvers.boundaries import BoundarySpec, periodic_lengths
from solvers.flow import FlowSolution
from solvers.transport import TauSolution
from vcnn.physics import DEFAULT_PHYSICS, PRODUCTION_MODES, Physics

__all__ = ["CoupledSolution", "CoupledStep", "periodic_lengths", "solve_coupled"]


@dataclass(frozen=True)
class CoupledStep:
    """One outer iteration (one flow solve and one tau solve).

    Attributes:
        velocity_change: relative L2 change of the velocity from the previous flow (1.0 on
            the first iteration).
        tau_change: ||tau_new - tau_in|| / ||tau_new|| (L2), tau_in the tau that set nu_t for
            this iteration's flow: the fixed-point residual.
        flow_iterations: Newton steps of the flow solve.
        tau_iterations: Newton steps of the tau solve.
        body_force: the flow's driving body force.
        tau_integral: integral of tau_new (nodal quadrature).
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
        iterations: outer iterations (flow solves; 1 when c_k = 0).
        history: one :class:`CoupledStep` per iteration.
        wall_time: seconds spent in :func:`solve_coupled`.
        method: the outer iteration that ran (``"one-way"`` when c_k = 0).
    """

    flow: FlowSolution
    tau: TauSolution
    iterations: int
    history: list[CoupledStep] = field(default_factory=list)
    wall_time: float = 0.0
    method: str = "picard"


def solve_coupled(
    mesh: dolfinx.mesh.Mesh,
    facet_tags: dolfinx.mesh.MeshTags,
    spec: BoundarySpec,
    *,
    c_k: float,
    nu: float = DEFAULT_PHYSICS.nu,
    bulk_velocity: float = DEFAULT_PHYSICS.bulk_velocity,
    production: str = DEFAULT_PHYSICS.production,
    relaxation: float = 0.7,
    tol: float = 1e-8,
    max_iterations: int = 60,
    diffusivity: float = DEFAULT_PHYSICS.diffusivity,
    zeta: float = DEFAULT_PHYSICS.zeta,
    reaction_exponent: float = DEFAULT_PHYSICS.reaction_exponent,
    gamma: float = DEFAULT_PHYSICS.gamma,
    tau_p: float = DEFAULT_PHYSICS.tau_p,
    warm_rtol: float = 1e-6,
    outer: str = "picard",
    period: np.ndarray | None = None,
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
        relaxation: omega in (0, 1] of the relaxed Picard update of the tau that feeds nu_t.
        tol: stop when both relative L2 changes (velocity, unrelaxed tau) are below tol.
        max_iterations: outer iterations (flow solves) at most.
        diffusivity: D of the tau equation.
        zeta: destruction coefficient of the tau equation.
        reaction_exponent: p of the destruction term zeta |tau|^p tau.
        gamma: production coefficient of the tau equation.
        tau_p: frozen production level.
        warm_rtol: relative Newton tolerance of the warm-started flow solves.
        outer: ``"picard"``, ``"anderson"`` or ``"ngmres"``
            (see :mod:`solvers.closure_loop`).
        period: (d,) periodic lengths for the wall distance (default: from the spec).

    Returns:
        CoupledSolution; ``tau.tau`` is a P1 Function.

    Raises:
        ValueError: invalid options.
        SolverDivergedError: a sub-solve failed, or no fixed point within max_iterations
            (a :class:`solvers.closure_loop.CoupledDivergedError`).
    """
    from solvers.closure_loop import OuterOptions, solve_one_way, solve_two_way
    from solvers.closures import ClosureError, PdeClosure
    from solvers.linalg import SolverDivergedError
    from solvers.problem import ClosureProblem

    start = time.perf_counter()
    if not (np.isfinite(c_k) and c_k >= 0):
        raise ValueError(f"c_k must be a finite non-negative number, got {c_k}")
    if production not in PRODUCTION_MODES:
        raise ValueError(f"unknown production mode {production!r}: use one of {PRODUCTION_MODES}")
    options = OuterOptions(
        method=outer,
        relaxation=relaxation,
        tol=tol,
        max_iterations=max_iterations,
        warm_rtol=warm_rtol,
        negative_tolerance=None,
    )
    physics = Physics(
        nu=nu,
        bulk_velocity=bulk_velocity,
        diffusivity=diffusivity,
        zeta=zeta,
        reaction_exponent=reaction_exponent,
        gamma=gamma,
        tau_p=tau_p,
        production=production,
        c_k=c_k,
    )
    with (
        ClosureProblem(mesh, facet_tags, spec, physics, period=period) as problem,
        PdeClosure(problem) as closure,
    ):
        try:
            if c_k == 0:
                result = solve_one_way(problem, closure)
            else:
                result = solve_two_way(problem, closure, options)
        except ClosureError as error:
            raise SolverDivergedError(str(error)) from error
        tau = problem.to_function(result.tau, fem.Function(problem.V, name="tau"))
    integral = mesh.comm.allreduce(fem.assemble_scalar(fem.form(tau * ufl.dx)), op=MPI.SUM)
    history = [
        CoupledStep(
            velocity_change=step.velocity_change,
            tau_change=step.tau_change,
            flow_iterations=step.flow_iterations,
            tau_iterations=step.closure_iterations,
            body_force=step.body_force,
            tau_integral=step.tau_integral,
        )
        for step in result.history
    ]
    if not history:  # one-way
        history = [
            CoupledStep(
                1.0,
                1.0,
                result.flow.newton_iterations,
                result.closure_iterations,
                result.flow.body_force,
                float(integral),
            )
        ]
    return CoupledSolution(
        flow=result.flow,
        tau=TauSolution(
            tau=tau,
            newton_iterations=result.closure_iterations,
            residual_history=[],
            integral=float(integral),
            wall_time=0.0,
        ),
        iterations=result.evaluations,
        history=history,
        wall_time=time.perf_counter() - start,
        method=result.method,
    )
