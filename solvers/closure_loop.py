"""The closure in the loop: one-way and two-way coupled runs of a flow and a closure.

One-way (:func:`solve_one_way`): the flow is solved once (or given), the closure gives tau.

Two-way (:func:`solve_two_way`): the closure's tau sets the eddy viscosity
nu_t = C_k l_m sqrt(max(tau, 0)) of the momentum equation (implicit there, as in
:class:`solvers.flow.FlowSolver`), the new flow gives a new tau, and so on to a fixed point of

    G(x) = closure(flow(nu_t(x))),   x = tau at the closure points.

The outer iteration is a PETSc nonlinear solver on the fixed-point residual
F(x) = x - G(x): ``anderson`` (Anderson mixing) or ``ngmres`` (nonlinear GMRES) accelerate
it, ``picard`` is relaxed Picard, x <- x - omega F(x) (SNES ``nrichardson`` with a basic line
search damped by omega), and also the fallback when an accelerated run's change grows.

The unknown is tau at the closure points, not the P1 dofs: each point of the (periodic)
domain once, the vector the network predicts, distributed over the ranks that own the points
(:class:`solvers.closure_points.ClosurePoints`), so the solver's vector operations are local
and a periodic duplicate never counts twice in a norm.

Convergence: the relative changes of tau, ||x - G(x)|| / ||G(x)||, and of the velocity
between consecutive flows (discrete L2 norms with the nodal volumes) are both below ``tol``.
The run stops with :class:`CoupledDivergedError` on NaN/inf or a failed solve, on a change
that grows beyond ``growth_factor`` times its smallest value, on negative tau where it feeds
nu_t, or after ``max_iterations`` closure evaluations. The error carries the last tau; the
problem keeps the last flow.
"""

from __future__ import annotations

from mpi4py import MPI

import itertools
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from petsc4py import PETSc

from solvers.closures import Closure, ClosureError
from solvers.flow import FlowSolution
from solvers.linalg import SolverDivergedError, destroy_solver
from solvers.problem import ClosureProblem

logger = logging.getLogger(__name__)

__all__ = [
    "OUTER_METHODS",
    "CoupledDivergedError",
    "LoopResult",
    "OuterOptions",
    "OuterStep",
    "solve_one_way",
    "solve_two_way",
]

#: Outer iterations of a two-way run.
OUTER_METHODS = ("picard", "anderson", "ngmres")

_SNES_TYPES = {"picard": "nrichardson", "anderson": "anderson", "ngmres": "ngmres"}
_prefix_counter = itertools.count()
_Reason = PETSc.SNES.ConvergedReason


class CoupledDivergedError(SolverDivergedError):
    """A coupled run stopped without reaching its fixed point.

    Attributes:
        history: the relative changes of tau of the evaluations that ran.
        tau: (n,) float64 the last tau the closure produced (owned closure points), or None
            when it produced none; the problem holds the last flow.
        steps: the :class:`OuterStep` records of the evaluations that ran.
    """

    def __init__(
        self,
        message: str,
        history: list[float],
        *,
        tau: np.ndarray | None,
        steps: list[OuterStep],
    ) -> None:
        super().__init__(message, history)
        self.tau = tau
        self.steps = list(steps)


@dataclass(frozen=True)
class OuterOptions:
    """Settings of the outer (fixed-point) iteration of a two-way run.

    Attributes:
        method: ``anderson``, ``ngmres`` or ``picard``.
        relaxation: omega in (0, 1] of relaxed Picard (the ``picard`` method and the fallback).
        tol: converged when the relative changes of tau and of the velocity are below it.
        max_iterations: closure evaluations at most (each one flow solve and one closure
            evaluation), over the method and its fallback together.
        history_size: past iterates mixed by ``anderson`` and ``ngmres``.
        mixing: Anderson's damping of the mixed update (``-snes_anderson_beta``).
        fallback: when an accelerated run's change grows, continue with relaxed Picard from
            the iterate with the smallest change.
        growth_factor: the change growing beyond this factor times its smallest value so far
            is divergence.
        negative_tolerance: tau below ``-negative_tolerance * max(tau)`` at a point where the
            mixing length is positive (where tau feeds nu_t) is divergence; less negative
            values are clipped by nu_t's max(tau, 0). None: no check (for the tau PDE, whose
            undershoots on coarse meshes are discretisation error, not divergence: the
            coupled-production hill at 20 x 20 cells dips to -9 % of its maximum behind the
            crest). The default leaves room for a network's error near such undershoots.
        warm_rtol: relative Newton tolerance of the warm-started flow solves (kept above the
            round-off floor, see :class:`WarmStartTolerance`).
    """

    method: str = "anderson"
    relaxation: float = 0.7
    tol: float = 1e-8
    max_iterations: int = 60
    history_size: int = 10
    mixing: float = 1.0
    fallback: bool = True
    growth_factor: float = 100.0
    negative_tolerance: float | None = 0.05
    warm_rtol: float = 1e-6

    def __post_init__(self) -> None:
        if self.method not in OUTER_METHODS:
            raise ValueError(f"outer method must be one of {OUTER_METHODS}, got {self.method!r}")
        if not 0 < self.relaxation <= 1:
            raise ValueError(f"relaxation must lie in (0, 1], got {self.relaxation}")
        if not self.tol > 0:
            raise ValueError(f"tol must be positive, got {self.tol}")
        if self.max_iterations < 1:
            raise ValueError(f"max_iterations must be at least 1, got {self.max_iterations}")
        if self.history_size < 1:
            raise ValueError(f"history_size must be at least 1, got {self.history_size}")
        if not 0 < self.mixing <= 1:
            raise ValueError(f"mixing must lie in (0, 1], got {self.mixing}")
        if not self.growth_factor > 1:
            raise ValueError(f"growth_factor must exceed 1, got {self.growth_factor}")
        if self.negative_tolerance is not None and not self.negative_tolerance >= 0:
            raise ValueError(f"negative_tolerance must be >= 0, got {self.negative_tolerance}")


@dataclass(frozen=True)
class OuterStep:
    """One evaluation of the fixed-point map G (one flow solve and one closure evaluation).

    Attributes:
        evaluation: 1-based count.
        method: the outer method that asked for it.
        tau_change: ||x - G(x)|| / ||G(x)|| (discrete L2): the fixed-point residual.
        velocity_change: relative L2 change of the velocity from the previous flow (1.0 at
            the first evaluation).
        flow_iterations: Newton steps of the flow solve.
        closure_iterations: Newton steps of a PDE closure (0 for a network).
        body_force: the flow's driving body force.
        tau_integral: integral of G(x) by the nodal quadrature.
        min_tau: smallest G(x) where the mixing length is positive.
        out_of_range_fraction: the network's fraction of out-of-range cloud inputs, or None.
        seconds: wall time of the evaluation.
    """

    evaluation: int
    method: str
    tau_change: float
    velocity_change: float
    flow_iterations: int
    closure_iterations: int
    body_force: float
    tau_integral: float
    min_tau: float
    out_of_range_fraction: float | None
    seconds: float

    @property
    def change(self) -> float:
        """The larger of the two relative changes (compared with ``tol``)."""
        return max(self.tau_change, self.velocity_change)


@dataclass
class LoopResult:
    """Outcome of a one-way or two-way run.

    Attributes:
        tau: (n,) float64 tau of the closure at the final flow (owned closure points).
        flow: the final flow: a :class:`solvers.flow.FlowSolution` (copies of the velocity
            and pressure), or the given flow of a one-way run (e.g. an imported one).
        converged: True when the fixed point was reached (always True one-way).
        evaluations: closure evaluations (= flow solves of a two-way run).
        method: the outer method, ``"one-way"``, or e.g. ``"anderson, then picard"``.
        history: one :class:`OuterStep` per evaluation (two-way).
        wall_time: seconds.
        out_of_range_fraction: the network's fraction at the final flow, or None.
        closure_iterations: Newton steps of a PDE closure at the final flow.
    """

    tau: np.ndarray
    flow: FlowSolution | Any
    converged: bool
    evaluations: int
    method: str
    history: list[OuterStep] = field(default_factory=list)
    wall_time: float = 0.0
    out_of_range_fraction: float | None = None
    closure_iterations: int = 0


class WarmStartTolerance:
    """Relative Newton tolerances for warm-started flow solves that stay above round-off.

    A warm start begins with a residual r0 proportional to the change of nu_t. Relative to
    it, ``warm_rtol`` leaves an error far below that change; but once the outer iteration has
    nearly converged, ``warm_rtol * r0`` falls under the round-off floor of the residual and
    Newton could never meet it. So the absolute target is also kept above ``1e-11 R0`` (R0:
    initial residual of the cold first solve, which itself converged to 1e-10 R0), with r0
    predicted from the last warm solve's ratio r0 / |delta nu_t|.
    """

    def __init__(self, warm_rtol: float) -> None:
        self.warm_rtol = warm_rtol
        self.cold_residual: float | None = None
        self.residual_per_change: float | None = None

    def next_rtol(self, viscosity_change: float) -> float:
        """Relative tolerance of the next flow solve."""
        if self.cold_residual is None:
            return 1e-10
        if self.residual_per_change is None or viscosity_change == 0.0:
            return self.warm_rtol
        predicted = self.residual_per_change * viscosity_change
        floor = 1e-11 * self.cold_residual
        return float(min(0.5, max(self.warm_rtol, floor / predicted)))

    def record(self, initial_residual: float, viscosity_change: float) -> None:
        """Learn from a finished solve: its initial residual and the nu_t change before it."""
        if self.cold_residual is None:
            self.cold_residual = initial_residual
        elif viscosity_change > 0.0:
            self.residual_per_change = initial_residual / viscosity_change


def _flow_if_needed(problem: ClosureProblem, flow: FlowSolution | None) -> FlowSolution:
    return flow if flow is not None else problem.solve_flow()


def solve_one_way(
    problem: ClosureProblem, closure: Closure, *, flow: FlowSolution | Any | None = None
) -> LoopResult:
    """Tau from the closure on a fixed flow (collective).

    Args:
        problem: the problem; its flow is solved first unless ``flow`` says it holds one.
        closure: the closure.
        flow: the flow the problem holds already (solved, or imported and given to the
            problem with :meth:`ClosureProblem.set_velocity`).

    Returns:
        The result (one evaluation).

    Raises:
        ClosureError: the closure failed.
        SolverDivergedError: the flow solve failed.
    """
    start = time.perf_counter()
    flow = _flow_if_needed(problem, flow)
    output = closure.evaluate(problem)
    return LoopResult(
        tau=output.tau,
        flow=flow,
        converged=True,
        evaluations=1,
        method="one-way",
        wall_time=time.perf_counter() - start,
        out_of_range_fraction=output.out_of_range_fraction,
        closure_iterations=output.newton_iterations,
    )


class _FixedPointMap:
    """G(x): nu_t from x, one warm-started flow solve, one closure evaluation; records steps."""

    def __init__(self, problem: ClosureProblem, closure: Closure, options: OuterOptions) -> None:
        self.problem = problem
        self.closure = closure
        self.options = options
        self.tolerances = WarmStartTolerance(options.warm_rtol)
        self.steps: list[OuterStep] = []
        self.method = options.method
        self.flow: FlowSolution | None = None
        self.last_tau: np.ndarray | None = None
        self.last_fraction: float | None = None
        self.last_closure_iterations = 0
        # (input x, step) of the latest evaluations: the convergence test finds the step of
        # the solver's current solution among them (a line search evaluates trial points).
        self.recent: deque[tuple[np.ndarray, OuterStep, np.ndarray, FlowSolution]] = deque(maxlen=4)
        self._previous_velocity: np.ndarray | None = None
        self._feeds_nu_t = problem.point_mixing_length > 0

    @property
    def evaluations(self) -> int:
        return len(self.steps)

    def fail(self, message: str, *, tau: np.ndarray | None = None) -> CoupledDivergedError:
        return CoupledDivergedError(
            message,
            [step.tau_change for step in self.steps],
            tau=self.last_tau if tau is None else tau,
            steps=self.steps,
        )

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """G(x) for the owned part x of tau (collective); returns the owned part of G(x)."""
        start = time.perf_counter()
        problem = self.problem
        comm = problem.comm
        evaluation = self.evaluations + 1
        try:
            viscosity_change = problem.set_eddy_viscosity(x)
            flow = problem.solve_flow(
                rtol=self.tolerances.next_rtol(viscosity_change), reuse_factorization=True
            )
            self.tolerances.record(flow.residual_history[0], viscosity_change)
            output = self.closure.evaluate(problem)
        except (SolverDivergedError, ClosureError, ValueError) as error:
            raise self.fail(
                f"coupled run stopped at outer evaluation {evaluation} ({self.method}): {error}"
            ) from error
        tau = output.tau
        velocity = problem.velocity_values()
        tau_norm = problem.weighted_norm(tau)
        tau_change = problem.weighted_norm(x - tau) / tau_norm if tau_norm > 0 else math.inf
        if self._previous_velocity is None:
            velocity_change = 1.0
        else:
            size = problem.weighted_norm(velocity)
            velocity_change = problem.weighted_norm(velocity - self._previous_velocity) / size
        self._previous_velocity = velocity
        feeding = tau[self._feeds_nu_t]
        local_min = float(feeding.min()) if feeding.size else math.inf
        local_max = float(np.abs(tau).max()) if tau.size else 0.0
        min_tau = comm.allreduce(local_min, op=MPI.MIN)
        max_tau = comm.allreduce(local_max, op=MPI.MAX)
        step = OuterStep(
            evaluation=evaluation,
            method=self.method,
            tau_change=tau_change,
            velocity_change=velocity_change,
            flow_iterations=flow.newton_iterations,
            closure_iterations=output.newton_iterations,
            body_force=flow.body_force,
            tau_integral=problem.tau_integral(tau),
            min_tau=min_tau,
            out_of_range_fraction=output.out_of_range_fraction,
            seconds=time.perf_counter() - start,
        )
        self.steps.append(step)
        self.flow = flow
        self.last_tau = tau
        self.last_fraction = output.out_of_range_fraction
        self.last_closure_iterations = output.newton_iterations
        self.recent.append((x.copy(), step, tau, flow))
        if comm.rank == 0:
            fraction = (
                ""
                if step.out_of_range_fraction is None
                else f", out of range {100 * step.out_of_range_fraction:.2f} %"
            )
            logger.debug(
                "outer %d (%s): change tau %.3e u %.3e, Newton flow %d tau %d, "
                "integral tau %.6g, body force %.6e, %.2f s%s",
                evaluation,
                self.method,
                step.tau_change,
                step.velocity_change,
                step.flow_iterations,
                step.closure_iterations,
                step.tau_integral,
                step.body_force,
                step.seconds,
                fraction,
            )
        if not math.isfinite(tau_change) or not math.isfinite(velocity_change):
            raise self.fail(
                f"coupled run diverged: the change is {tau_change} at evaluation {evaluation}",
                tau=tau,
            )
        tolerance = self.options.negative_tolerance
        if tolerance is not None and min_tau < -tolerance * max_tau:
            raise self.fail(
                f"coupled run stopped at outer evaluation {evaluation}: the closure's tau is "
                f"negative where it feeds nu_t (min {min_tau:.4g}, below "
                f"-{tolerance:g} x max {max_tau:.4g})",
                tau=tau,
            )
        return tau

    def step_at(self, x: np.ndarray) -> tuple[OuterStep, np.ndarray, FlowSolution] | None:
        """The recorded evaluation whose input equals x on every rank (collective)."""
        for recorded, step, tau, flow in reversed(self.recent):
            same = recorded.shape == x.shape and bool(np.array_equal(recorded, x))
            if self.problem.comm.allreduce(same, op=MPI.LAND):
                return step, tau, flow
        return None


def solve_two_way(
    problem: ClosureProblem,
    closure: Closure,
    options: OuterOptions | None = None,
    *,
    initial_tau: np.ndarray | None = None,
) -> LoopResult:
    """Solve flow and closure together to a fixed point (collective).

    Args:
        problem: a two-way problem (``problem.two_way``).
        closure: the closure.
        options: the outer iteration's settings.
        initial_tau: (n,) starting tau at the owned closure points; default zero (the
            first flow is then the laminar one).

    Returns:
        The converged result.

    Raises:
        CoupledDivergedError: no fixed point (see the module docstring); it carries the last
            tau, and the problem holds the last flow.
    """
    options = options or OuterOptions()
    if not problem.two_way:
        raise ValueError("two-way coupling needs a problem built with two_way (c_k > 0)")
    start = time.perf_counter()
    fixed_point = _FixedPointMap(problem, closure, options)
    x = problem.points.create_vector()
    if initial_tau is not None:
        x.array[:] = initial_tau
    methods = [options.method]
    try:
        reason = _run_snes(fixed_point, x, options, options.method, options.max_iterations)
        if (
            reason == _Reason.DIVERGED_DTOL
            and options.fallback
            and options.method != "picard"
            and fixed_point.evaluations < options.max_iterations
        ):
            best = min(fixed_point.steps, key=lambda step: step.change)
            if problem.comm.rank == 0:
                logger.warning(
                    "%s: the change grew (%.3e, smallest %.3e at evaluation %d); continuing "
                    "with relaxed Picard (omega %g) from the last iterate",
                    options.method,
                    fixed_point.steps[-1].change,
                    best.change,
                    best.evaluation,
                    options.relaxation,
                )
            methods.append("picard")
            fixed_point.method = "picard"
            x.array[:] = fixed_point.last_tau
            remaining = options.max_iterations - fixed_point.evaluations
            reason = _run_snes(fixed_point, x, options, "picard", remaining)
        converged = reason > 0
        if not converged:
            what = {
                _Reason.DIVERGED_DTOL: f"the change grew beyond {options.growth_factor:g} "
                "times its smallest value",
                _Reason.DIVERGED_FUNCTION_COUNT: f"no fixed point in {options.max_iterations} "
                "evaluations",
                _Reason.DIVERGED_MAX_IT: f"no fixed point in {options.max_iterations} evaluations",
            }.get(reason, f"PETSc SNES reason {reason}")
            changes = ", ".join(f"{step.change:.2e}" for step in fixed_point.steps[-8:])
            smallest = min(step.change for step in fixed_point.steps)
            hint = "lower --relaxation, try --outer picard, or raise --max-iterations"
            if smallest < 1e3 * options.tol:
                # A network evaluates in single precision: its tau carries round-off of
                # about 1e-7 relative, below which the change cannot fall.
                hint = (
                    f"the change came within {smallest / options.tol:.0f}x of tol: a "
                    "network's single-precision round-off (about 1e-7 relative) may keep it "
                    "there; raise --tol"
                )
            raise fixed_point.fail(
                f"coupled run ({' then '.join(methods)}) did not converge: {what} (last "
                f"changes {changes}; smallest {smallest:.2e}, tol {options.tol:g}); {hint}"
            )
        solution = x.getArray(readonly=True).copy()
        evaluated_last = bool(np.array_equal(fixed_point.recent[-1][0], solution))
        if not problem.comm.allreduce(evaluated_last, op=MPI.LAND):
            # The solver accepted a point it did not evaluate last (a line search's trial
            # came after it): evaluate G there, so the problem holds the final flow.
            fixed_point(solution)
        step, tau, flow = fixed_point.steps[-1], fixed_point.last_tau, fixed_point.flow
    finally:
        x.destroy()
    return LoopResult(
        tau=tau,
        flow=flow,
        converged=True,
        evaluations=fixed_point.evaluations,
        method=", then ".join(methods),
        history=fixed_point.steps,
        wall_time=time.perf_counter() - start,
        out_of_range_fraction=step.out_of_range_fraction,
        closure_iterations=step.closure_iterations,
    )


def _run_snes(
    fixed_point: _FixedPointMap, x: PETSc.Vec, options: OuterOptions, method: str, budget: int
) -> int:
    """Run one SNES on F(x) = x - G(x) from x; returns its converged reason."""
    comm = fixed_point.problem.comm
    prefix = f"outer_{next(_prefix_counter)}_"
    settings: dict[str, Any] = {}
    if method == "picard":
        settings = {
            "snes_linesearch_type": "basic",
            "snes_linesearch_damping": options.relaxation,
        }
    elif method == "anderson":
        settings = {
            "snes_anderson_m": options.history_size,
            "snes_anderson_beta": options.mixing,
        }
    else:
        settings = {"snes_ngmres_m": options.history_size}
    petsc_options = PETSc.Options()
    for key, value in settings.items():
        petsc_options[f"{prefix}{key}"] = value
    snes = PETSc.SNES().create(comm)
    residual = x.duplicate()
    first_evaluation = fixed_point.evaluations
    changes: list[float] = []

    def evaluate(snes: PETSc.SNES, point: PETSc.Vec, out: PETSc.Vec) -> None:
        values = point.getArray(readonly=True).copy()
        out.array[:] = values - fixed_point(values)

    def converged(snes: PETSc.SNES, iteration: int, norms: tuple[float, float, float]) -> int:
        found = fixed_point.step_at(snes.getSolution().getArray(readonly=True))
        if found is not None:
            step = found[0]
            if step.evaluation > 1 and step.change <= options.tol:
                return _Reason.CONVERGED_FNORM_RELATIVE
            if not changes or changes[-1] != step.change:
                changes.append(step.change)
            if len(changes) >= 3 and step.change > options.growth_factor * min(changes):
                return _Reason.DIVERGED_DTOL
        if fixed_point.evaluations - first_evaluation >= budget:
            return _Reason.DIVERGED_FUNCTION_COUNT
        return _Reason.ITERATING

    try:
        snes.setOptionsPrefix(prefix)
        snes.setFunction(evaluate, residual)
        snes.setType(_SNES_TYPES[method])
        snes.setTolerances(max_it=budget)
        snes.setConvergenceTest(converged)
        snes.setFromOptions()
        try:
            snes.solve(None, x)
        except PETSc.Error as error:
            # An exception in a callback comes back as a PETSc error with it as the cause.
            cause = error.__cause__
            if isinstance(cause, Exception):
                raise cause from cause.__cause__
            raise
        return int(snes.getConvergedReason())
    finally:
        destroy_solver(snes)
        residual.destroy()
