"""Closures in the solver: the current flow state -> tau at the closure points.

A closure is anything that maps the flow held by a :class:`solvers.problem.ClosureProblem` to
tau at its closure points. Two implementations share the interface :class:`Closure`, so a
coupled run is the same code for both:

- :class:`PdeClosure`: the tau transport PDE itself (the truth), solved by Newton's method,
  warm-started from its previous solution;
- :class:`NetworkClosure`: a trained network (``vcnn.load_closure``, or any object with the
  same contract: ``.physics`` and ``.predict(case)``), evaluated on rank 0 on the state
  gathered as a :class:`vcnn.Case`.

:func:`resolve_physics` decides the physics of a simulation from the closure's record and
what the user asks for, and refuses a mismatch unless it is overridden.
"""

from __future__ import annotations

from mpi4py import MPI

import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np

from solvers.fields import strain_rate_expression
from solvers.linalg import SolverDivergedError
from solvers.problem import ClosureProblem
from vcnn.casefile import Case
from vcnn.closure import Closure as VcnnClosure
from vcnn.errors import UserError
from vcnn.physics import Physics, PhysicsMismatchError

logger = logging.getLogger(__name__)

__all__ = [
    "Closure",
    "ClosureError",
    "ClosureModel",
    "ClosureOutput",
    "NetworkClosure",
    "PdeClosure",
    "SimulationPhysics",
    "load_network_closure",
    "resolve_physics",
]

#: Keys of a closure's ``.physics`` record beyond those of :class:`vcnn.physics.Physics`.
CLOUD_KEYS = ("eps", "dimension")


class ClosureError(UserError, RuntimeError):
    """A closure could not produce a usable tau (NaN or inf, wrong shape, a failed solve).

    A user error (reported in one line by the command line): the message says what failed.
    """


class ClosureModel(Protocol):
    """What a network closure must offer (the contract of ``vcnn.load_closure``).

    ``physics`` holds the constants of :class:`vcnn.physics.Physics` plus ``eps`` (the cloud
    threshold) and ``dimension``; ``predict`` returns tau (N,) float64 at the points of the
    case (whose ``tau`` it does not read); ``predict_detailed`` (optional) returns an object
    with ``.tau`` and ``.out_of_range_fraction``.
    """

    physics: Mapping[str, Any]

    def predict(self, case: Case) -> np.ndarray:
        """Tau at the case's points."""
        ...


@dataclass
class ClosureOutput:
    """Tau from one closure evaluation.

    Attributes:
        tau: (n,) float64 tau at the closure points owned by this rank.
        newton_iterations: Newton steps of a PDE closure (0 for a network).
        out_of_range_fraction: a network's fraction of cloud entries whose inputs lie outside
            its training range (None when the closure does not report it).
        seconds: wall time of the evaluation.
    """

    tau: np.ndarray
    newton_iterations: int = 0
    out_of_range_fraction: float | None = None
    seconds: float = 0.0


class Closure(ABC):
    """The current flow of a :class:`ClosureProblem` -> tau at its closure points."""

    #: short name for logs and metrics: ``"pde"`` or ``"network"``
    kind: str = "closure"

    @abstractmethod
    def evaluate(self, problem: ClosureProblem) -> ClosureOutput:
        """Tau for the flow the problem holds now (collective).

        Raises:
            ClosureError: when no usable tau comes out.
        """

    def close(self) -> None:
        """Free what the closure holds (PETSc objects); idempotent."""

    def __enter__(self) -> Closure:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class PdeClosure(Closure):
    """The tau transport PDE (DESIGN 3.3) on the problem's current flow: the truth.

    The form is built once on the problem's velocity Function, so each evaluation solves for
    the flow the problem holds; Newton starts from the previous tau (a warm start), and, if
    that fails (a large change of the flow can take Newton out of its basin), once more from
    the cold start of :func:`solvers.transport.solve_tau`.

    Attributes:
        tau_function: the P1 Function of the last tau.
        last_solution: the last :class:`solvers.transport.TauSolution` (None before the first).
    """

    kind = "pde"

    def __init__(
        self,
        problem: ClosureProblem,
        *,
        rtol: float = 1e-10,
        atol: float = 1e-13,
        max_iterations: int = 30,
    ) -> None:
        """Build the tau solver on the problem's velocity, wall distance and constraint."""
        from solvers.transport import TauSolver

        physics = problem.physics
        self._solver = TauSolver(
            problem.V,
            problem.velocity,
            strain_rate_expression(problem.velocity),
            problem.wall_distance,
            problem.facet_tags,
            problem.spec,
            production=physics.production,
            diffusivity=physics.diffusivity,
            zeta=physics.zeta,
            reaction_exponent=physics.reaction_exponent,
            gamma=physics.gamma,
            tau_p=physics.tau_p,
            constraint=problem.constraint,
        )
        self._newton = {"rtol": rtol, "atol": atol, "max_iterations": max_iterations}
        self._solved = False
        self.tau_function = self._solver.tau
        self.last_solution = None

    def evaluate(self, problem: ClosureProblem) -> ClosureOutput:
        """Solve the tau equation for the problem's current flow."""
        start = time.perf_counter()
        try:
            solution = self._solver.solve(warm_start=self._solved, **self._newton)
        except SolverDivergedError as error:
            if not self._solved:
                raise ClosureError(f"the tau equation failed: {error}") from error
            if problem.comm.rank == 0:
                logger.warning("tau Newton from the previous tau failed (%s); cold start", error)
            try:
                solution = self._solver.solve(warm_start=False, **self._newton)
            except SolverDivergedError as cold_error:
                raise ClosureError(f"the tau equation failed: {cold_error}") from cold_error
        self._solved = True
        self.last_solution = solution
        return ClosureOutput(
            tau=problem.values(solution.tau),
            newton_iterations=solution.newton_iterations,
            seconds=time.perf_counter() - start,
        )

    def close(self) -> None:
        """Free the tau solver."""
        self._solver.close()


class NetworkClosure(Closure):
    """A trained network: the state gathered on rank 0 as a Case, tau predicted there.

    The model lives on rank 0 only (``model`` is ignored elsewhere); its tau is split among
    the owners of the closure points. Errors on rank 0 (NaN or inf from the model, a wrong
    shape, an exception in the model) are sent to every rank and raised there as
    :class:`ClosureError`, so all ranks stop together.
    """

    kind = "network"

    def __init__(self, model: ClosureModel | None, comm: MPI.Comm, *, name: str = "case") -> None:
        """Wrap a model (on rank 0) for evaluation on the state of a problem on ``comm``."""
        self.model = model if comm.rank == 0 else None
        self.comm = comm
        self.name = name
        self.last_case: Case | None = None
        #: the backend of vcnn.engines that ran the last prediction (None: not reported)
        self.engine: str | None = None

    def predict(self, case: Case | None) -> tuple[np.ndarray | None, float | None]:
        """Tau of the model on a case gathered on rank 0 (collective).

        Args:
            case: the case on rank 0 (None elsewhere); its ``tau`` is not read.

        Returns:
            ((N,) float64 tau on rank 0 / None elsewhere, out-of-range fraction or None).

        Raises:
            ClosureError: on every rank, when the model fails or returns unusable values.
        """
        tau = fraction = None
        message = None
        if self.comm.rank == 0:
            try:
                tau, fraction = self._predict_on_root(case)
            except Exception as error:  # sent to every rank: all must stop together
                message = f"{type(error).__name__}: {error}"
        message = self.comm.bcast(message, root=0)
        if message is not None:
            raise ClosureError(f"the network closure failed: {message}")
        fraction, self.engine = self.comm.bcast((fraction, self.engine), root=0)
        return tau, fraction

    def _predict_on_root(self, case: Case) -> tuple[np.ndarray, float | None]:
        detailed = getattr(self.model, "predict_detailed", None)
        fraction = None
        if detailed is not None:
            # a vcnn closure's out-of-range warning would repeat every outer iteration; the
            # loop reports the fraction in its progress lines and metrics instead
            if isinstance(self.model, VcnnClosure):
                result = detailed(case, warn=False)
            else:
                result = detailed(case)
            tau = result.tau
            self.engine = getattr(result, "engine", None) or None
            fraction = getattr(result, "out_of_range_fraction", None)
            fraction = None if fraction is None else float(fraction)
        else:
            tau = self.model.predict(case)
        tau = np.asarray(tau, dtype=np.float64)
        if tau.shape != (case.num_points,):
            raise ClosureError(
                f"the model returned tau of shape {tau.shape}, expected ({case.num_points},)"
            )
        bad = ~np.isfinite(tau)
        if bad.any():
            raise ClosureError(
                f"the model predicted NaN or inf tau at {int(bad.sum())} of {tau.size} points "
                f"(e.g. at x = {case.points[np.flatnonzero(bad)[0]].tolist()}); the flow may "
                "have left the range the network was trained on"
            )
        return tau, fraction

    def evaluate(self, problem: ClosureProblem) -> ClosureOutput:
        """Gather the problem's state, predict on rank 0, return the owned part of tau."""
        start = time.perf_counter()
        zeros = np.zeros(problem.points.local_dofs.size)
        case = problem.case(zeros, name=self.name)
        tau, fraction = self.predict(case)
        self.last_case = case
        return ClosureOutput(
            tau=problem.points.distribute(tau),
            out_of_range_fraction=fraction,
            seconds=time.perf_counter() - start,
        )


def load_network_closure(
    path: str, comm: MPI.Comm, *, device: str = "auto"
) -> tuple[ClosureModel | None, dict[str, Any]]:
    """Load a trained closure with ``vcnn.load_closure`` on rank 0 (collective).

    Returns:
        (the model on rank 0 / None elsewhere, its physics record on every rank).

    Raises:
        ClosureError: on every rank, when loading fails (the message says why).
    """
    model = physics = message = None
    if comm.rank == 0:
        try:
            from vcnn import load_closure

            model = load_closure(path, device=device)
            physics = dict(model.physics)
        except ImportError as error:
            message = (
                f"this vcnn has no load_closure ({error}); update the package to run a "
                "network closure"
            )
        except Exception as error:  # sent to every rank: all must stop together
            message = f"cannot load the closure {str(path)!r}: {type(error).__name__}: {error}"
    message = comm.bcast(message, root=0)
    if message is not None:
        raise ClosureError(message)
    return model, comm.bcast(physics, root=0)


@dataclass(frozen=True)
class SimulationPhysics:
    """The physics a simulation runs with.

    Attributes:
        physics: the constants of the flow and the tau equation, and C_k.
        eps: the cloud threshold of the network (None for the PDE closure).
        dimension: spatial dimension (None when not known before the mesh is read).
        mismatches: the constants where the simulation differs from the closure's record
            (non-empty only when a mismatch was allowed).
    """

    physics: Physics
    eps: float | None
    dimension: int | None
    mismatches: tuple[str, ...] = ()


def resolve_physics(
    requested: Mapping[str, Any],
    closure_physics: Mapping[str, Any] | None,
    *,
    dimension: int | None,
    coupling: str,
    allow_mismatch: bool = False,
) -> SimulationPhysics:
    """The physics of a simulation: the closure's record, unless the user asks otherwise.

    Args:
        requested: constants the user set (names of :class:`vcnn.physics.Physics`, and
            ``eps``); unset ones are absent or None.
        closure_physics: the closure's ``.physics`` record, or None for the PDE closure
            (then the defaults of :class:`Physics` fill what the user did not set).
        dimension: the mesh's spatial dimension (None: not known yet, not checked).
        coupling: ``"one-way"`` (C_k plays no role: the flow does not see tau, so it is not
            compared and is set to 0) or ``"two-way"``.
        allow_mismatch: run although requested constants differ from the closure's.

    Returns:
        The resolved physics.

    Raises:
        PhysicsMismatchError: naming every constant that differs (unless allowed), or a
            dimension that differs from the mesh's (never allowed).
        ValueError: invalid constants.
    """
    requested = {key: value for key, value in requested.items() if value is not None}
    known = {item.name for item in fields(Physics)} | {"eps"}
    unknown = sorted(set(requested) - known)
    if unknown:
        raise ValueError(f"unknown physics keys {unknown}; known: {sorted(known)}")
    if closure_physics is None:
        values = dict(requested)
        eps = values.pop("eps", None)
        if coupling == "one-way":
            values["c_k"] = 0.0
        return SimulationPhysics(Physics.from_dict(values), eps, dimension)
    record = dict(closure_physics)
    trained_dimension = record.get("dimension")
    if (
        trained_dimension is not None
        and dimension is not None
        and int(trained_dimension) != dimension
    ):
        raise PhysicsMismatchError(
            f"the closure was trained in {int(trained_dimension)}-D, the mesh is {dimension}-D"
        )
    trained = {key: record[key] for key in known if key in record and record[key] is not None}
    compared = sorted(known - ({"c_k"} if coupling == "one-way" else set()))
    mismatches = []
    for key in compared:
        if key not in requested or key not in trained:
            continue
        mine, theirs = requested[key], trained[key]
        same = (
            mine == theirs
            if isinstance(mine, str) or isinstance(theirs, str)
            else math.isclose(float(mine), float(theirs), rel_tol=1e-9, abs_tol=1e-15)
        )
        if not same:
            mismatches.append(f"{key}: {theirs!r} (closure) vs {mine!r} (requested)")
    if mismatches and not allow_mismatch:
        raise PhysicsMismatchError(
            "the closure was trained with other physics than this simulation asks for: "
            + "; ".join(mismatches)
            + ". Leave these settings out to run with the closure's physics, or pass "
            "--allow-physics-mismatch (allow_physics_mismatch = true) to run anyway."
        )
    values = {**{k: v for k, v in trained.items() if k != "eps"}, **requested}
    eps = values.pop("eps", trained.get("eps"))
    if coupling == "one-way":
        values["c_k"] = 0.0
    return SimulationPhysics(
        Physics.from_dict(values),
        None if eps is None else float(eps),
        dimension,
        tuple(mismatches),
    )
