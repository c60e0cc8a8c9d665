"""Closures in the solver: the current flow state -> tau at the closure points.

A closure is anything that maps the flow held by a :class:`solvers.problem.ClosureProblem` to
tau at its closure points. Two implementations share the interface :class:`Closure`, so a
coupled run is the same code for both:

- :class:`PdeClosure`: the tau transport PDE itself (the truth), solved by Newton's method,
  warm-started from its previous solution;
- :class:`NetworkClosure`: a trained network (``vcnn.load_closure``, or any object with the
  same contract: ``.physics`` and ``.predict(case)``). Under MPI a vcnn closure is
  distributed: each rank predicts at the closure points it owns, from a case of those points
  and their halo (the points of other ranks within one cloud reach, :mod:`solvers.halo`);
  other models, and a single rank, predict on rank 0 on the state gathered as a
  :class:`vcnn.Case`.

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
from typing import Any, NamedTuple, Protocol

import numpy as np

from solvers.fields import strain_rate_expression
from solvers.halo import HaloExchange
from solvers.linalg import SolverDivergedError
from solvers.problem import ClosureProblem
from vcnn.casefile import Case
from vcnn.closure import Closure as VcnnClosure
from vcnn.cloud_quadrature import _FIT_NEIGHBOURS
from vcnn.errors import UserError, one_line
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
#: Where a network closure runs under MPI: each rank on its owned points and their halo, or
#: rank 0 on the gathered state.
CLOSURE_RANKS = ("distributed", "root")
# The cloud quadrature's values at a node come from the node's nearest points, and those
# points' fits from their own nearest points (vcnn.cloud_quadrature): its halo reaches this
# many times the largest distance from a point to the last of its fit's nearest points
# (_FIT_NEIGHBOURS, the quadrature's own count) beyond the region.
_QUADRATURE_HALO_SPACINGS = 3.0


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
    """The tau transport PDE (docs/physics.md) on the problem's current flow: the truth.

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
            supg_length=physics.supg_length,
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
    """A trained network: tau at the closure points from the flow state.

    Two ways to run under MPI (``ranks``):

    - ``"distributed"`` (the default, for a vcnn closure of an ellipse or ball region on more
      than one rank): every rank holds the model and predicts at the closure points it owns,
      from a case of those points and their halo: the points of other ranks within one cloud
      reach of an owned point, periodic images included (:class:`solvers.halo.HaloExchange`,
      rebuilt at every evaluation since the reach follows the velocity). The clouds of an
      owned point are exactly its serial clouds (full clouds, or the cloud quadrature, whose
      halo also holds the nearest points its nodes read), so tau equals the serial
      prediction to the round-off of the pooling's summation order; no rank holds the whole
      field.
    - ``"root"`` (any other model, a k-nearest region, or a single rank): the state is
      gathered on rank 0 as a :class:`vcnn.Case`, predicted there and split among the owners.

    Errors (NaN or inf in the flow or from the model, a wrong shape, an exception in the
    model), also those of one rank only, are shared by every rank and raised there as the
    same one-line :class:`ClosureError` naming the rank that failed, so all ranks stop
    together instead of waiting in a collective for one that stopped.

    Attributes:
        model: the model (on rank 0 only in the root mode).
        ranks: the mode that runs: ``"distributed"`` or ``"root"``.
        halo: the last halo (distributed mode; None before the first evaluation).
        mean_speed: mean |u| over all closure points at the last distributed evaluation (the
            cloud quadrature orients its nodes with it; None before).
        last_case: the case of the last evaluation on rank 0 (root mode only; None otherwise).
        engine: the backend of vcnn.engines that ran the last prediction (None: not reported).
    """

    kind = "network"

    def __init__(
        self,
        model: ClosureModel | None,
        comm: MPI.Comm,
        *,
        name: str = "case",
        clouds: str = "full",
        ranks: str = "distributed",
    ) -> None:
        """Wrap a model (given on rank 0) for evaluation on the state of a problem on ``comm``.

        Args:
            model: the model on rank 0 (ignored elsewhere: a distributed closure broadcasts
                it).
            comm: the problem's communicator (collective).
            name: case name of the predictions.
            clouds: ``"full"``, ``"quadrature"`` or ``"auto"`` (decided once, from the
                flow of the first evaluation: :meth:`vcnn.closure.Closure.resolve_clouds`),
                for a vcnn closure (other models ignore it).
            ranks: ``"distributed"`` (where it applies, see the class) or ``"root"``.
        """
        if ranks not in CLOSURE_RANKS:
            raise ValueError(f"ranks must be one of {CLOSURE_RANKS}, got {ranks!r}")
        distributable = comm.bcast(
            isinstance(model, VcnnClosure) and model.cloud_options.region != "knn", root=0
        )
        distributed = ranks == "distributed" and comm.size > 1 and distributable
        self.ranks = "distributed" if distributed else "root"
        if self.ranks == "distributed":
            # every rank predicts: the model (a few hundred kB) goes to each once
            self.model = comm.bcast(model if comm.rank == 0 else None, root=0)
        else:
            self.model = model if comm.rank == 0 else None
        #: the clouds a vcnn closure predicts on (``"full"`` or ``"quadrature"``; ``"auto"``
        #: until the first evaluation fixes it for the run, so the loop's map stays smooth)
        self.clouds = clouds
        self.comm = comm
        self.name = name
        self.last_case: Case | None = None
        self.halo: HaloExchange | None = None
        self.mean_speed: float | None = None
        self.engine: str | None = None

    def predict(self, case: Case | None) -> tuple[np.ndarray | None, float | None]:
        """Tau of the model on a case gathered on rank 0 (collective; the root mode).

        Args:
            case: the case on rank 0 (None elsewhere); its ``tau`` is not read.

        Returns:
            ((N,) float64 tau on rank 0 / None elsewhere, out-of-range fraction or None).

        Raises:
            ClosureError: on every rank, when the model fails or returns unusable values.
        """
        return self._predict_on_root(case, None)

    def _predict_on_root(
        self, case: Case | None, error: BaseException | None
    ) -> tuple[np.ndarray | None, float | None]:
        """:meth:`predict`, or the error rank 0 met building the case, raised on every rank."""
        tau = fraction = None
        if self.comm.rank == 0 and error is None:
            try:
                tau, fraction, _ = self._predict_on(case)
            except Exception as caught:  # shared with every rank: all must stop together
                error = caught
        self._raise_on_every_rank(error)
        fraction, self.engine = self.comm.bcast((fraction, self.engine), root=0)
        return tau, fraction

    def _raise_on_every_rank(self, error: BaseException | None) -> None:
        """Raise one :class:`ClosureError` on every rank when any rank failed (collective).

        Every rank calls this at the same point with its own error or None; the message is
        the first failing rank's, on one line, so every rank stops with the same error.
        """
        message = None if error is None else f"{type(error).__name__}: {one_line(error)}"
        failed = [
            (rank, text) for rank, text in enumerate(self.comm.allgather(message)) if text
        ]
        if not failed:
            return
        rank, text = failed[0]
        where = f" (MPI rank {rank})" if self.comm.size > 1 else ""
        raise ClosureError(f"the network closure failed{where}: {text}") from error

    def _predict_on(
        self, case: Case, queries: np.ndarray | None = None
    ) -> tuple[np.ndarray, float | None, int]:
        """Tau at the queries (None: every point) of a case on this rank.

        Returns:
            ((Q,) float64 tau, out-of-range fraction or None, cloud entries evaluated).
        """
        detailed = getattr(self.model, "predict_detailed", None)
        fraction = None
        entries = 0
        if detailed is not None:
            # a vcnn closure's out-of-range warning would repeat every outer iteration; the
            # loop reports the fraction in its progress lines and metrics instead
            if isinstance(self.model, VcnnClosure):
                extra = {} if queries is None else {"queries": queries}
                if queries is not None and self.clouds == "quadrature":
                    extra["mean_speed"] = self.mean_speed
                result = detailed(case, warn=False, clouds=self.clouds, **extra)
            else:
                result = detailed(case)
            tau = result.tau
            self.engine = getattr(result, "engine", None) or None
            fraction = getattr(result, "out_of_range_fraction", None)
            fraction = None if fraction is None else float(fraction)
            entries = int(getattr(result, "num_entries", 0) or 0)
        else:
            tau = self.model.predict(case)
        tau = np.asarray(tau, dtype=np.float64)
        expected = case.num_points if queries is None else queries.size
        if tau.shape != (expected,):
            raise ClosureError(
                f"the model returned tau of shape {tau.shape}, expected ({expected},)"
            )
        bad = ~np.isfinite(tau)
        if bad.any():
            where = np.flatnonzero(bad)[0] if queries is None else queries[np.flatnonzero(bad)[0]]
            raise ClosureError(
                f"the model predicted NaN or inf tau at {int(bad.sum())} of {tau.size} points "
                f"(e.g. at x = {case.points[where].tolist()}); the flow may "
                "have left the range the network was trained on"
            )
        return tau, fraction, entries

    def evaluate(self, problem: ClosureProblem) -> ClosureOutput:
        """Tau at the problem's owned closure points for its current flow (collective)."""
        start = time.perf_counter()
        if self.clouds == "auto":
            self._resolve_auto_clouds(problem)
        if self.ranks == "distributed":
            tau, fraction = self._evaluate_distributed(problem)
            return ClosureOutput(
                tau=tau, out_of_range_fraction=fraction, seconds=time.perf_counter() - start
            )
        zeros = np.zeros(problem.points.local_dofs.size)
        case = error = None
        try:  # collective gathers, then rank 0 validates the whole state (a NaN in the flow)
            case = problem.case(zeros, name=self.name)
        except Exception as caught:  # shared with every rank, which all stop together
            error = caught
        tau, fraction = self._predict_on_root(case, error)
        self.last_case = case
        return ClosureOutput(
            tau=problem.points.distribute(tau),
            out_of_range_fraction=fraction,
            seconds=time.perf_counter() - start,
        )

    def _resolve_auto_clouds(self, problem: ClosureProblem) -> None:
        """Fix ``clouds="auto"`` for the run from the current flow (collective).

        Rank 0 decides from every closure point's speed and volume and tells the others, so
        all ranks run the same clouds; the choice is not revisited, so the outer iteration
        never switches between two maps.
        """
        speed = np.linalg.norm(problem.velocity_values(), axis=1)
        speeds = self.comm.gather(speed, root=0)
        volumes = self.comm.gather(np.asarray(problem.point_volumes, dtype=np.float64), root=0)
        choice = "full"
        if self.comm.rank == 0 and isinstance(self.model, VcnnClosure):
            speed_all = np.concatenate(speeds)
            finite = np.isfinite(speed_all)
            if finite.all():  # a bad flow is reported by the evaluation itself
                choice = self.model.resolve_clouds(
                    dim=problem.points.local_points.shape[1], speed=speed_all,
                    nodal_volume=np.concatenate(volumes),
                )
        self.clouds = self.comm.bcast(choice, root=0)
        if self.comm.rank == 0:
            logger.info("clouds = auto: %s clouds for %s", self.clouds, self.name)

    def local_case(self, problem: ClosureProblem) -> Case | None:
        """This rank's owned closure points and their halo as a case (collective).

        The owned points come first, in global order, then the halo (:attr:`halo`, rebuilt
        for the current velocity). The nodal volumes are scaled so that their mean is the
        global mean: the ``volume`` input is the volume over the case's mean, and volume
        pooling is a ratio that a common factor leaves unchanged. The mean speed over all
        points, which the cloud quadrature reads, is kept in :attr:`mean_speed`.

        Returns:
            The case, or None on a rank that owns no closure point.

        Raises:
            ValueError: on this rank only, for a NaN or inf in its owned state (the others
                then wait in the halo's collectives: :meth:`evaluate` checks first).
        """
        state = self._exchange_halo(problem, self._owned_state(problem))
        return None if state is None else self._case_of(state, problem)

    def _owned_state(self, problem: ClosureProblem) -> _OwnedState:
        """This rank's state at its owned closure points, checked (local: no communication).

        Raises:
            ValueError: a NaN or inf in the flow at an owned point, or a volume <= 0.
        """
        points = problem.points
        velocity = problem.velocity_values()
        strain_rate = problem.values(problem.strain_rate())
        checked = {
            "velocity": velocity,
            "strain_rate": strain_rate,
            "wall_distance": problem.point_wall_distance,
            "nodal_volume": problem.point_volumes,
        }
        for key, value in checked.items():
            finite = np.isfinite(value)
            finite = finite.all(axis=1) if finite.ndim > 1 else finite
            if not finite.all():
                bad = np.flatnonzero(~finite)
                raise ValueError(
                    f"{key} holds NaN or inf at {bad.size} of {finite.size} closure points "
                    f"(e.g. at x = {points.local_points[bad[0]].tolist()}); the closure cannot "
                    "predict from it"
                )
        if np.any(problem.point_volumes <= 0):
            raise ValueError("nodal_volume is zero or negative at a closure point")
        values = np.column_stack(
            [
                points.local_points,
                velocity,
                strain_rate,
                problem.point_wall_distance,
                problem.point_volumes,
                points.local_is_wall.astype(np.float64),
            ]
        )
        reach, spacing = _cloud_reach(self.model, points.local_points, velocity, self.clouds)
        return _OwnedState(values, reach, spacing)

    def _exchange_halo(self, problem: ClosureProblem, owned: _OwnedState) -> np.ndarray | None:
        """(m, 2 d + 4) float64 owned state then halo, volumes rescaled (collective).

        Returns None on a rank that owns no closure point.
        """
        points = problem.points
        dim = points.local_points.shape[1]
        speed = np.linalg.norm(owned.values[:, dim : 2 * dim], axis=1)
        # case-wide quantities the prediction reads, over the whole field (not owned + halo)
        volume_sum, speed_sum = self.comm.allreduce(
            np.asarray([problem.point_volumes.sum(), speed.sum()]), op=MPI.SUM
        )
        spacing = self.comm.allreduce(owned.spacing, op=MPI.MAX)
        self.mean_speed = float(speed_sum / points.num_points)
        reach = owned.reach + _QUADRATURE_HALO_SPACINGS * spacing
        self.halo = HaloExchange.build(
            points.local_points, reach, points.global_ids, problem.period, self.comm
        )
        state = np.concatenate([owned.values, self.halo.exchange(owned.values)])
        logger.debug(
            "rank %d: %d owned closure points, %d halo points of %d",
            self.comm.rank, owned.values.shape[0], self.halo.num_halo, points.num_points,
        )
        if owned.values.shape[0] == 0:
            return None
        volumes = state[:, 2 * dim + 2]
        state[:, 2 * dim + 2] = volumes * ((volume_sum / points.num_points) / volumes.mean())
        return state

    def _case_of(self, state: np.ndarray, problem: ClosureProblem) -> Case:
        """The case of this rank's points: (m, 2 d + 4) state of :meth:`_exchange_halo`."""
        dim = problem.points.local_points.shape[1]
        return Case(
            points=state[:, :dim],
            velocity=state[:, dim : 2 * dim],
            tau=np.zeros(state.shape[0]),
            strain_rate=state[:, 2 * dim],
            wall_distance=state[:, 2 * dim + 1],
            nodal_volume=state[:, 2 * dim + 2],
            is_wall=state[:, 2 * dim + 3] > 0.5,
            period=problem.period,
            name=self.name,
        )

    def _evaluate_distributed(self, problem: ClosureProblem) -> tuple[np.ndarray, float | None]:
        """Owned tau from this rank's case of owned points and halo, errors shared.

        A bad state found on one rank (a NaN in its part of the flow) is shared before the
        halo's collectives, an exception of the model after them: every rank then raises the
        same :class:`ClosureError` instead of waiting for one that stopped.
        """
        num_owned = problem.points.local_dofs.size
        tau, fraction, entries = np.zeros(num_owned), None, 0
        owned = error = None
        try:
            owned = self._owned_state(problem)
        except Exception as caught:  # shared with every rank: all must stop together
            error = caught
        self._raise_on_every_rank(error)
        state = self._exchange_halo(problem, owned)
        try:
            if state is not None:
                case = self._case_of(state, problem)
                tau, fraction, entries = self._predict_on(case, np.arange(num_owned))
        except Exception as caught:  # shared with every rank: all must stop together
            error = caught
        self._raise_on_every_rank(error)
        # the fraction of all cloud entries: each rank's fraction weighted by its entries
        weighted = (fraction or 0.0) * entries
        weighted, entries, known = self.comm.allreduce(
            np.asarray([weighted, entries, float(fraction is not None)]), op=MPI.SUM
        )
        fraction = float(weighted / entries) if known and entries else None
        self.engine = self.comm.bcast(self.engine, root=0)
        return tau, fraction


class _OwnedState(NamedTuple):
    """A rank's state at its owned closure points, before the halo.

    Attributes:
        values: (n, 2 d + 4) float64 columns: points (d), velocity (d), |S|, wall distance,
            nodal volume, is_wall (0 or 1).
        reach: (n,) float64 distance each point's cloud region reaches.
        spacing: for quadrature clouds, the largest distance from an owned point to the
            farthest of its fit's nearest owned points (0 for full clouds): the halo's
            margin for the nearest points that give the values at the nodes, and their fits.
    """

    values: np.ndarray
    reach: np.ndarray
    spacing: float


def _cloud_reach(
    model: VcnnClosure, points: np.ndarray, velocity: np.ndarray, clouds: str
) -> tuple[np.ndarray, float]:
    """(n,) float64 distance the region of each owned point reaches, and the spacing margin.

    The largest semi-axis of its region; for the cloud quadrature also the largest distance
    from an owned point to the farthest of its fit's nearest owned points (a distance among
    the owned points only bounds the true one from above: a safe margin), 0 for full clouds.
    """
    along, across = model.cloud_options.semi_axes(np.linalg.norm(velocity, axis=1))
    reach = np.maximum(np.asarray(along, dtype=np.float64), float(across))
    neighbours = min(_FIT_NEIGHBOURS, points.shape[0])
    if clouds != "quadrature" or neighbours < 2:
        return reach, 0.0
    from scipy.spatial import cKDTree

    distance, _ = cKDTree(points).query(points, neighbours)
    return reach, float(distance[:, -1].max())


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
