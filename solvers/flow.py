"""Steady incompressible Navier-Stokes flow with Taylor-Hood elements and Newton's method.

The momentum equation is ``(u . grad) u - div(nu grad u + nu_t (grad u + grad u^T)) + grad p
= f e`` with ``div u = 0``: the molecular part in Laplacian form (so an outlet gets the usual
do-nothing condition) and the optional eddy viscosity ``nu_t`` in the symmetric form that a
variable viscosity needs. Walls carry no slip, inlets a prescribed profile, periodic pairs are
imposed with :class:`solvers.periodic.PeriodicConstraint` on the whole mixed space.

A periodic flow without inlet is driven by a uniform body force ``f e`` (``e`` along the first
pair's flow direction) whose magnitude is an extra unknown fixed by the constraint
``integral(u . e) = U_b |Omega|``. Newton's method solves the bordered system

    [ J   -b ] [du]   [ -R                          ]
    [ c^T  0 ] [df] = [ U_b |Omega| - c^T u          ]

with two solves that share one LU factorisation (``J y1 = -R``, ``J y2 = b``), so the bulk
velocity holds to round-off after every step.

Newton from rest starts from the Stokes flow, which on coarse 3-D meshes at the hill's
Re = 100 (two spanwise layers, a crest varying across the span) lies outside the basin of
attraction: the residual grows to 1e+9. When plain Newton from rest fails, a continuation in
the molecular viscosity takes over (:data:`CONTINUATION_START` times the target viscosity,
then divided by :data:`CONTINUATION_STEP` per stage down to the target, a stage that fails
retried half-way in log space), each stage started from the previous stage's solution. Only
its last stage, at the target viscosity and tolerance, defines the solution: the same discrete
equations as the plain Newton solve.
"""

from __future__ import annotations

from mpi4py import MPI

import logging
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import basix.ufl
import dolfinx
import dolfinx.fem
import dolfinx.fem.petsc
import numpy as np
import ufl
from petsc4py import PETSc

from solvers.boundaries import BoundarySpec
from solvers.linalg import (
    SolverDivergedError,
    create_direct_solver,
    default_solver_options,
    destroy_solver,
    format_history,
    solve_linear,
)
from solvers.periodic import PeriodicConstraint
from vcnn.physics import DEFAULT_PHYSICS

logger = logging.getLogger(__name__)

__all__ = ["FlowSolution", "FlowSolver", "solve_flow"]

#: A Newton step that cut the residual by this factor or more shows Newton in its quadratic
#: regime; the next step then reuses the factorised Jacobian (a chord step).
REUSE_CONTRACTION = 0.05

#: Plain Newton from rest counts as failed (and the viscosity continuation takes over) when
#: its residual exceeds this multiple of the initial residual: on the diverging 3-D hills it
#: grows to 1e+9, while converging solves stay below their initial residual.
DIVERGENCE_GROWTH = 10.0

#: First continuation stage: this multiple of the target viscosity (Re = 25 for the hill).
CONTINUATION_START = 4.0

#: Viscosity ratio between successive continuation stages.
CONTINUATION_STEP = 2.0

#: Relative tolerance of the intermediate continuation stages: they only supply the next
#: stage's initial guess (Newton's last steps are cheap chord steps, so this saves little).
CONTINUATION_RTOL = 1e-6

#: Most continuation stages (converged or failed) before the solve is declared failed.
MAX_CONTINUATION_STAGES = 10

#: How a solve from rest may use the viscosity continuation: ``"auto"`` only after plain Newton
#: failed, ``"always"`` straight away (tests, or a case known to need it), ``"never"``.
CONTINUATION_MODES = ("auto", "always", "never")


@dataclass
class FlowSolution:
    """A converged steady flow.

    Attributes:
        u: velocity, a vector Lagrange Function of degree ``degree`` (float64 dofs).
        p: pressure, a scalar Lagrange Function of degree ``degree - 1``; for a problem
            without outlet its level is fixed by one pinned dof (p = 0 there, or the initial
            guess's value).
        body_force: magnitude of the driving body force (0 when not body-force driven).
        bulk_velocity: measured area average of the velocity along the driving direction
            (of ``u_x`` when not body-force driven).
        newton_iterations: Newton steps taken, those of a failed plain Newton attempt and of
            every continuation stage included.
        residual_history: residual norm before each step and after the last one (of the
            last stage when a continuation ran).
        wall_time: seconds spent in the solve (with set-up for :func:`solve_flow`).
        num_dofs: global number of velocity + pressure dofs.
        factorizations: number of Jacobian assemblies and LU factorisations; smaller than
            ``newton_iterations`` when chord steps reused a factorisation.
        timings: seconds per phase on rank 0: ``setup`` (spaces, forms, periodic pairing;
            0 for the solves of a :class:`FlowSolver` after its construction),
            ``assembly`` (residual and Jacobian), ``restriction`` (``K^T J K``) and ``solve``
            (LU factorisation and triangular solves).
        continuation: viscosities of the converged continuation stages in order, the last the
            target viscosity; empty when plain Newton converged.
    """

    u: dolfinx.fem.Function
    p: dolfinx.fem.Function
    body_force: float
    bulk_velocity: float
    newton_iterations: int
    residual_history: list[float] = field(default_factory=list)
    wall_time: float = 0.0
    num_dofs: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    factorizations: int = 0
    continuation: list[float] = field(default_factory=list)


class _NewtonDivergedError(SolverDivergedError):
    """Newton itself failed (NaN/inf, residual growth, no convergence), no linear solve.

    Only this failure starts the viscosity continuation: a failed linear solve is reported
    as it is (the continuation's last stage would meet the same linear systems).
    """


@dataclass
class _NewtonRun:
    """What every Newton attempt of one solve shares (plain, then continuation stages).

    Attributes:
        atol: absolute residual tolerance.
        max_iterations: Newton steps per attempt.
        timings: seconds per phase, summed over the attempts.
        steps: Newton steps taken, over all attempts.
        factorizations: Jacobian factorisations, over all attempts.
    """

    atol: float
    max_iterations: int
    timings: dict[str, float]
    steps: int = 0
    factorizations: int = 0


@contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    """Add the wall time of the ``with`` block to ``timings[phase]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - start


def _log(comm: MPI.Comm, message: str, *args: object) -> None:
    """Log a solver step on rank 0 at DEBUG (``vcnn -v``): a run's summary is its caller's."""
    if comm.rank == 0:
        logger.debug(message, *args)


def _check_parameters(
    *, nu: float, bulk_velocity: float, degree: int, rtol: float, atol: float, max_iterations: int
) -> None:
    """Raise ValueError on unusable parameters (NaN, negative viscosity, bad degree)."""
    for name, value in (("nu", nu), ("bulk_velocity", bulk_velocity), ("rtol", rtol)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if nu <= 0:
        raise ValueError(f"nu must be positive, got {nu}")
    if rtol <= 0:
        raise ValueError(f"rtol must be positive, got {rtol}")
    if not atol >= 0:
        raise ValueError(f"atol must be a non-negative number, got {atol}")
    if degree < 2:
        raise ValueError(f"Taylor-Hood needs a velocity degree >= 2, got degree={degree}")
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be at least 1, got {max_iterations}")


def _check_eddy_viscosity(
    nu_t: dolfinx.fem.Function | ufl.core.expr.Expr | None,
    comm: MPI.Comm,
    square_integral: dolfinx.fem.Form | None,
) -> None:
    """Raise ValueError when nu_t has NaN/inf values or (a Function) negative dof values.

    ``square_integral`` is the compiled form of ``nu_t**2 dx``, used for a UFL expression,
    which cannot be inspected pointwise cheaply: its integral reveals NaN/inf.
    """
    if nu_t is None:
        return
    if isinstance(nu_t, dolfinx.fem.Function):
        values = nu_t.x.array
        bad = comm.allreduce(int(np.count_nonzero(~np.isfinite(values))), op=MPI.SUM)
        if bad:
            raise ValueError(f"nu_t has {bad} NaN/inf dofs; fix the closure that produced it")
        minimum = comm.allreduce(float(values.min()) if values.size else 0.0, op=MPI.MIN)
        if minimum < 0:
            raise ValueError(f"nu_t must be non-negative, its minimum dof value is {minimum}")
        return
    integral = dolfinx.fem.assemble_scalar(square_integral)
    if not math.isfinite(comm.allreduce(integral, op=MPI.SUM)):
        raise ValueError("nu_t evaluates to NaN/inf on the mesh; fix the closure that produced it")


def _velocity_bcs(
    W: dolfinx.fem.FunctionSpace,
    velocity_space: dolfinx.fem.FunctionSpace,
    facet_tags: dolfinx.mesh.MeshTags,
    spec: BoundarySpec,
) -> tuple[list[dolfinx.fem.DirichletBC], np.ndarray]:
    """Velocity Dirichlet conditions (walls and inlets) and their local dofs in ``W``."""
    fdim = W.mesh.topology.dim - 1
    bcs: list[dolfinx.fem.DirichletBC] = []
    dofs_in_w: list[np.ndarray] = []
    zero = dolfinx.fem.Function(velocity_space)
    for tag, profile in [*((tag, None) for tag in spec.walls), *spec.inlets.items()]:
        dofs = dolfinx.fem.locate_dofs_topological(
            (W.sub(0), velocity_space), fdim, facet_tags.find(tag)
        )
        if profile is None:
            value = zero
        else:
            value = dolfinx.fem.Function(velocity_space)
            value.interpolate(profile)
            if not np.all(np.isfinite(value.x.array)):
                raise ValueError(f"inlet profile of tag {tag} gives NaN/inf values")
        bcs.append(dolfinx.fem.dirichletbc(value, dofs, W.sub(0)))
        dofs_in_w.append(np.asarray(dofs[0]))
    excluded = np.unique(np.concatenate(dofs_in_w)) if dofs_in_w else np.empty(0, np.int32)
    return bcs, excluded.astype(np.int32)


def _pressure_pin(
    W: dolfinx.fem.FunctionSpace, pressure_dofs: np.ndarray, constraint: PeriodicConstraint
) -> list[int]:
    """Reduced global index of one pressure dof, on the rank that owns it (else empty)."""
    comm = W.mesh.comm
    num_owned = W.dofmap.index_map.size_local * W.dofmap.index_map_bs
    owned = pressure_dofs[pressure_dofs < num_owned]
    candidates = constraint.reduced_index[owned]
    local_min = int(candidates.min()) if candidates.size else np.iinfo(np.int64).max
    pinned = comm.allreduce(local_min, op=MPI.MIN)
    start, end = constraint.K.getOwnershipRangeColumn()
    return [pinned] if start <= pinned < end else []


class FlowSolver:
    """Steady Navier-Stokes on one mesh: set up once, solved repeatedly and warm-started.

    The Taylor-Hood space, the forms (compiled once), the Dirichlet conditions, the periodic
    constraint of the mixed space, the forcing vectors, the Jacobian's sparsity and the LU
    solver are built in the constructor and reused by every :meth:`solve`. A coupled run
    changes the eddy viscosity between solves by writing into the ``nu_t`` Function it passed
    in (its values, not its identity), then calls :meth:`solve` again: Newton starts from the
    previous solution, so late solves of a converging loop take one or two steps.

    Free the PETSc objects with :meth:`close` (or use the solver as a context manager).

    Attributes:
        mesh: the mesh.
        spec: the boundary roles.
        velocity: the current velocity, a vector Lagrange Function of degree ``degree``; its
            values change with every solve (forms built on it follow the flow).
        pressure: the current pressure (degree ``degree - 1``).
        body_force: the current driving body force (0 when not body-force driven).
        num_dofs: global number of velocity + pressure dofs.
        setup_time: seconds spent in the constructor.
        continuation: viscosities of the continuation stages of the latest solve from rest
            (:attr:`FlowSolution.continuation`); empty when plain Newton converged.
    """

    def __init__(
        self,
        mesh: dolfinx.mesh.Mesh,
        facet_tags: dolfinx.mesh.MeshTags,
        spec: BoundarySpec,
        *,
        nu: float = DEFAULT_PHYSICS.nu,
        bulk_velocity: float = DEFAULT_PHYSICS.bulk_velocity,
        nu_t: dolfinx.fem.Function | ufl.core.expr.Expr | None = None,
        degree: int = 2,
        petsc_options: Mapping[str, object] | None = None,
    ) -> None:
        """Build the spaces, forms, boundary conditions and periodic constraint.

        Args:
            mesh: the dolfinx mesh (triangles or quadrilaterals, any dimension).
            facet_tags: facet markers used by ``spec``.
            spec: walls (no slip), inlets (velocity profile), outlets (do-nothing) and
                periodic pairs. Body-force driven when periodic without inlet.
            nu: kinematic viscosity.
            bulk_velocity: target area average of the streamwise velocity (body-force driven
                flows only).
            nu_t: optional non-negative eddy viscosity, a Function or UFL expression on
                ``mesh``; the forms hold it, so new values in the same Function take effect
                at the next solve.
            degree: velocity degree; the pressure gets ``degree - 1`` (Taylor-Hood).
            petsc_options: PETSc options of the linear solver, over the MUMPS LU defaults of
                :func:`solvers.linalg.create_direct_solver`; None picks by size
                (:func:`solvers.linalg.default_solver_options`). The iterative path that
                converges at the hill's Re = 100 is
                :data:`solvers.linalg.ITERATIVE_FLOW_OPTIONS` (GMRES on a low-rank MUMPS LU).
                With ``pc_type fieldsplit`` (:data:`solvers.linalg.FIELDSPLIT_FLOW_OPTIONS`,
                low Reynolds numbers) the splits are named ``u`` (velocity, blocked per node,
                translations as near-null space) and ``p``; with Schur preconditioning
                "user" the solver supplies ``-M_p / nu``, or with ``fieldsplit_p_pc_type
                mat`` the pressure convection-diffusion approximation.

        Raises:
            ValueError: on NaN/inf or otherwise invalid parameters or inlet profiles.
        """
        start_time = time.perf_counter()
        _check_parameters(
            nu=nu,
            bulk_velocity=bulk_velocity,
            degree=degree,
            rtol=1.0,
            atol=0.0,
            max_iterations=1,
        )
        self.mesh = mesh
        self.spec = spec
        self.comm: MPI.Comm = mesh.comm
        self._nu_t = nu_t
        self._nu = nu
        self._petsc_options = petsc_options
        gdim = mesh.geometry.dim
        velocity_element = basix.ufl.element("Lagrange", mesh.basix_cell(), degree, shape=(gdim,))
        pressure_element = basix.ufl.element("Lagrange", mesh.basix_cell(), degree - 1)
        W = dolfinx.fem.functionspace(
            mesh, basix.ufl.mixed_element([velocity_element, pressure_element])
        )
        self.W = W
        self.num_dofs = W.dofmap.index_map.size_global * W.dofmap.index_map_bs

        # The translation maps a slave point onto its master (hill: right -> left, -L), so the
        # flow leaving through the slave side and re-entering at the master side runs along -t.
        self.driven = spec.body_force_driven
        direction = np.zeros(gdim)
        if self.driven:
            translation = np.asarray(spec.periodic[0].translation, dtype=float)
            direction = -translation / np.linalg.norm(translation)
        else:
            direction[0] = 1.0

        self._w = dolfinx.fem.Function(W)
        u, p = ufl.split(self._w)
        v, q = ufl.TestFunctions(W)
        # A Constant, not a float: the continuation changes it between Newton stages.
        self._viscosity = dolfinx.fem.Constant(mesh, PETSc.ScalarType(nu))
        viscous = self._viscosity * ufl.inner(ufl.grad(u), ufl.grad(v))
        self._nu_t_check_form = None
        if nu_t is not None:
            viscous += nu_t * ufl.inner(ufl.grad(u) + ufl.grad(u).T, ufl.grad(v))
            if not isinstance(nu_t, dolfinx.fem.Function):
                self._nu_t_check_form = dolfinx.fem.form(ufl.as_ufl(nu_t) ** 2 * ufl.dx(mesh))
        residual_ufl = (
            viscous + ufl.inner(ufl.dot(ufl.grad(u), u), v) - p * ufl.div(v) - q * ufl.div(u)
        ) * ufl.dx
        e = dolfinx.fem.Constant(mesh, direction)
        self._residual_form = dolfinx.fem.form(residual_ufl)
        self._jacobian_form = dolfinx.fem.form(ufl.derivative(residual_ufl, self._w))
        forcing_form = dolfinx.fem.form(ufl.inner(e, v) * ufl.dx)
        self._area = self.comm.allreduce(
            dolfinx.fem.assemble_scalar(dolfinx.fem.form(1.0 * ufl.dx(mesh))), op=MPI.SUM
        )

        # Collapsing is costly on large meshes: once per sub-space, the maps serve all later uses.
        velocity_space, velocity_maps = W.sub(0).collapse()
        pressure_space, pressure_maps = W.sub(1).collapse()
        self._velocity_dofs = np.asarray(velocity_maps[0])
        self._pressure_dofs = np.asarray(pressure_maps[0])
        self.velocity = dolfinx.fem.Function(velocity_space, name="velocity")
        self.pressure = dolfinx.fem.Function(pressure_space, name="pressure")
        self._flux_form = dolfinx.fem.form(ufl.inner(e, self.velocity) * ufl.dx)
        self._bcs, self._bc_dofs = _velocity_bcs(W, velocity_space, facet_tags, spec)
        self.constraint = PeriodicConstraint(
            W,
            facet_tags,
            spec.periodic,
            excluded_dofs=self._bc_dofs,
            collapsed_subspaces=[
                (velocity_space, self._velocity_dofs),
                (pressure_space, self._pressure_dofs),
            ],
        )
        self._pin_pressure = not spec.outlets
        self._pinned = (
            _pressure_pin(W, self._pressure_dofs, self.constraint) if self._pin_pressure else []
        )

        # Forcing vector b = integral(e . v); c = b is also the constraint's functional. The
        # copy used as right-hand side vanishes on Dirichlet rows so the increment stays zero.
        constraint = self.constraint
        self._forcing = dolfinx.fem.petsc.assemble_vector(forcing_form)
        self._forcing.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
        forcing_rhs = self._forcing.copy()
        with forcing_rhs.localForm() as local:
            local.array[self._bc_dofs] = 0.0
        self._forcing_reduced = constraint.restrict_vector(forcing_rhs)
        self._constraint_reduced = constraint.restrict_vector(self._forcing)
        forcing_rhs.destroy()
        for vec in (self._forcing_reduced, self._constraint_reduced):
            if self._pinned:
                vec.setValues(self._pinned, [0.0])
            vec.assemble()
        self._target_flux = bulk_velocity * self._area

        self._jacobian = dolfinx.fem.petsc.create_matrix(self._jacobian_form)
        self._jacobian_reduced: PETSc.Mat | None = None
        self._residual = dolfinx.fem.petsc.create_vector(W)
        self._residual_reduced = constraint.create_reduced_vector()
        self._rhs = constraint.create_reduced_vector()
        self._step_residual = constraint.create_reduced_vector()
        self._step_forcing = constraint.create_reduced_vector()
        self._increment = dolfinx.fem.petsc.create_vector(W)
        # Created at the first Newton step: a solve that starts converged leaves no options.
        self._ksp: PETSc.KSP | None = None
        self._split_objects: tuple = ()
        self._pcd: _PressureConvectionDiffusion | None = None
        # The "user" mass-matrix Schur preconditioner -M_p / (nu + nu_t): its form, pressure
        # split, matrix and assembly matrix, refreshed with the Jacobian (the continuation
        # changes nu).
        self._mass_schur: tuple[dolfinx.fem.Form, PETSc.IS, PETSc.Mat, PETSc.Mat] | None = None
        self.body_force = 0.0
        self._has_solution = False
        self.continuation: list[float] = []
        self._closed = False
        self.setup_time = time.perf_counter() - start_time

    def __enter__(self) -> FlowSolver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Destroy the PETSc objects and remove the solver's options; idempotent."""
        if self._closed:
            return
        self._closed = True
        destroy_solver(self._ksp)
        self._ksp = None
        if self._pcd is not None:
            self._pcd.free()
            self._pcd = None
        for petsc_object in (
            self._jacobian_reduced,
            self._jacobian,
            self._residual,
            self._residual_reduced,
            self._rhs,
            self._step_residual,
            self._step_forcing,
            self._increment,
            self._forcing,
            self._forcing_reduced,
            self._constraint_reduced,
        ):
            if petsc_object is not None:
                petsc_object.destroy()
        self.constraint.destroy()

    def reset(self) -> None:
        """Forget the current solution: the next solve starts from rest (a cold start)."""
        self._has_solution = False

    def solve(
        self,
        *,
        initial_guess: FlowSolution | None = None,
        rtol: float = 1e-10,
        atol: float = 1e-12,
        max_iterations: int = 30,
        reuse_factorization: bool = False,
        continuation: str = "auto",
    ) -> FlowSolution:
        """Solve for the current ``nu_t`` by Newton's method.

        Args:
            initial_guess: a solution on the same mesh to start from; by default Newton
                starts from the previous solve's solution (a warm start), or from rest before
                the first solve (so its first step is a Stokes solve).
            rtol: convergence when the residual norm (momentum, continuity and bulk
                constraint) falls below ``rtol`` times its initial value, or when a Newton step
                changes the solution by less than ``rtol`` relative (which also ends a solve
                started from an already converged state).
            atol: convergence as well when the residual norm falls below ``atol``.
            max_iterations: maximum number of Newton steps.
            reuse_factorization: take the first step with the Jacobian factorised by the
                previous solve (a chord step), refactorising only when a step cuts the
                residual by less than :data:`REUSE_CONTRACTION`. Worth it in a coupled loop,
                where nu_t changes little between solves; the converged solution is the same.
            continuation: for a solve from rest, one of :data:`CONTINUATION_MODES`: ``"auto"``
                runs the viscosity continuation (module docstring) when plain Newton fails
                (NaN/inf, no convergence in ``max_iterations``, or the residual growing past
                :data:`DIVERGENCE_GROWTH` times its initial value; not on a failed linear
                solve, which is reported as it is),
                ``"always"`` runs it straight away, ``"never"`` not at all. Warm starts always
                run plain Newton.

        Returns:
            The converged :class:`FlowSolution` (its ``u`` and ``p`` are copies: later solves
            do not change them); :attr:`FlowSolution.continuation` lists the stages that ran.

        Raises:
            ValueError: on NaN/inf or otherwise invalid inputs (nu_t included).
            SolverDivergedError: when Newton does not converge within ``max_iterations``,
                the residual becomes NaN/inf, or a linear solve fails (from rest: when the
                continuation fails as well). The solver then keeps the state it started from,
                so a later solve can start from it again.
        """
        if self._closed:
            raise RuntimeError("FlowSolver.solve called after close()")
        if continuation not in CONTINUATION_MODES:
            raise ValueError(
                f"continuation must be one of {CONTINUATION_MODES}, got {continuation!r}"
            )
        start_time = time.perf_counter()
        _check_parameters(
            nu=1.0,
            bulk_velocity=0.0,
            degree=2,
            rtol=rtol,
            atol=atol,
            max_iterations=max_iterations,
        )
        _check_eddy_viscosity(self._nu_t, self.comm, self._nu_t_check_form)
        x = self._w.x.petsc_vec
        from_rest = initial_guess is None and not self._has_solution
        if initial_guess is not None:
            self._w.sub(0).interpolate(initial_guess.u)
            self._w.sub(1).interpolate(initial_guess.p)
            self.body_force = float(initial_guess.body_force) if self.driven else 0.0
        elif not self._has_solution:
            self._w.x.array[:] = 0.0
            self.body_force = 0.0
        dolfinx.fem.petsc.set_bc(x, self._bcs)
        x.ghostUpdate(addv=PETSc.InsertMode.INSERT, mode=PETSc.ScatterMode.FORWARD)
        self.constraint.make_periodic(x)
        start_state = (self._w.x.array.copy(), self.body_force)
        timings: dict[str, float] = {"setup": 0.0}
        run = _NewtonRun(atol=atol, max_iterations=max_iterations, timings=timings)
        stages: list[float] = []
        fallback = from_rest and continuation == "auto"
        try:
            if from_rest and continuation == "always":
                history, stages = self._continuation(run, rtol=rtol)
            else:
                try:
                    history = self._newton(
                        run,
                        rtol=rtol,
                        # a start from rest is too far from the last factorised state to reuse it
                        stale_start=reuse_factorization and self._ksp is not None and not from_rest,
                        divergence_growth=DIVERGENCE_GROWTH if fallback else None,
                    )
                except _NewtonDivergedError as error:
                    if not fallback:
                        raise
                    if self.comm.rank == 0:
                        logger.info(
                            "flow: plain Newton from rest failed after %d steps (%s); "
                            "continuing in the viscosity from %g x nu",
                            run.steps,
                            str(error).split(" (")[0],
                            CONTINUATION_START,
                        )
                    self._w.x.array[:], self.body_force = start_state
                    try:
                        history, stages = self._continuation(run, rtol=rtol)
                    except SolverDivergedError as continuation_error:
                        # the plain attempt's history is the one a user compares with others
                        raise SolverDivergedError(
                            f"{error}; then: {continuation_error}", error.history
                        ) from continuation_error
        except BaseException:
            self._w.x.array[:], self.body_force = start_state
            raise
        iterations, factorizations = run.steps, run.factorizations
        if from_rest:
            self.continuation = list(stages)
        self._has_solution = True
        self.velocity.x.array[:] = self._w.x.array[self._velocity_dofs]
        self.pressure.x.array[:] = self._w.x.array[self._pressure_dofs]
        flux = self.comm.allreduce(dolfinx.fem.assemble_scalar(self._flux_form), op=MPI.SUM)
        wall_time = time.perf_counter() - start_time
        _log(
            self.comm,
            "flow converged in %d Newton steps%s, %.2f s (%s), %d dofs, body force %.8e, bulk %.8e",
            iterations,
            f" (viscosity continuation {stages})" if stages else "",
            wall_time,
            ", ".join(f"{phase} {seconds:.2f} s" for phase, seconds in timings.items()),
            self.num_dofs,
            self.body_force,
            flux / self._area,
        )
        velocity = self.velocity.copy()
        velocity.name = "velocity"
        pressure = self.pressure.copy()
        pressure.name = "pressure"
        return FlowSolution(
            u=velocity,
            p=pressure,
            body_force=self.body_force,
            bulk_velocity=flux / self._area,
            newton_iterations=iterations,
            residual_history=history,
            wall_time=wall_time,
            num_dofs=self.num_dofs,
            timings=timings,
            factorizations=factorizations,
            continuation=stages,
        )

    def _continuation(self, run: _NewtonRun, *, rtol: float) -> tuple[list[float], list[float]]:
        """Newton solves from the current state (rest) down a ladder of viscosities.

        The stages run at :data:`CONTINUATION_START` times the target viscosity, then divided
        by :data:`CONTINUATION_STEP` per stage down to the target, each started from the last
        converged stage (from rest before the first). A failed stage restarts from that state
        at the geometric mean of its viscosity and the last converged one (before any stage
        converged: at :data:`CONTINUATION_STEP` times its viscosity). Intermediate stages stop
        at :data:`CONTINUATION_RTOL`; the last one runs at the target viscosity to ``rtol``.

        Returns:
            The last stage's residual history and the viscosities of the converged stages.

        Raises:
            SolverDivergedError: after :data:`MAX_CONTINUATION_STAGES` stages without
                reaching the target viscosity.
        """
        target = self._nu
        converged: list[float] = []
        failed: list[float] = []
        good_state = (self._w.x.array.copy(), self.body_force)
        viscosity = CONTINUATION_START * target
        try:
            for _ in range(MAX_CONTINUATION_STAGES):
                final = viscosity <= target
                if final:
                    viscosity = target
                self._viscosity.value = viscosity
                steps_before = run.steps
                try:
                    history = self._newton(
                        run,
                        rtol=rtol if final else CONTINUATION_RTOL,
                        stale_start=False,
                        divergence_growth=DIVERGENCE_GROWTH,
                    )
                except _NewtonDivergedError as error:
                    failed.append(viscosity)
                    if self.comm.rank == 0:
                        logger.info(
                            "flow: continuation stage nu = %.4g failed after %d steps (%s)",
                            viscosity,
                            run.steps - steps_before,
                            str(error).split(" (")[0],
                        )
                    self._w.x.array[:], self.body_force = good_state
                    if converged:
                        viscosity = math.sqrt(viscosity * converged[-1])
                    else:
                        viscosity *= CONTINUATION_STEP
                    continue
                converged.append(viscosity)
                if self.comm.rank == 0:
                    logger.info(
                        "flow: continuation stage nu = %.4g converged in %d steps",
                        viscosity,
                        run.steps - steps_before,
                    )
                if final:
                    return history, converged
                good_state = (self._w.x.array.copy(), self.body_force)
                viscosity /= CONTINUATION_STEP
        finally:
            self._viscosity.value = target
        raise SolverDivergedError(
            f"Newton from rest with a viscosity continuation did not reach "
            f"nu = {target:g} in {MAX_CONTINUATION_STAGES} stages (converged at nu = "
            f"{[float(f'{v:.4g}') for v in converged]}, failed at "
            f"{[float(f'{v:.4g}') for v in failed]})",
            [],
        )

    def _newton(
        self,
        run: _NewtonRun,
        *,
        rtol: float,
        stale_start: bool,
        divergence_growth: float | None = None,
    ) -> list[float]:
        """Newton steps from the current state; returns the residual history.

        ``run`` is advanced by the steps and factorisations taken (also when Newton fails).
        ``stale_start``: the first step uses the factorisation of the previous solve.
        ``divergence_growth``: fail as soon as the residual exceeds this multiple of the
        initial residual (None: only NaN/inf and ``max_iterations`` end a solve).
        """
        comm = self.comm
        constraint = self.constraint
        atol, max_iterations, timings = run.atol, run.max_iterations, run.timings
        x = self._w.x.petsc_vec
        residual, residual_reduced = self._residual, self._residual_reduced
        pinned = self._pinned
        history: list[float] = []
        iterations = 0
        step_is_small = False
        while True:
            with residual.localForm() as local:
                local.set(0.0)
            with _timed(timings, "assembly"):
                dolfinx.fem.petsc.assemble_vector(residual, self._residual_form)
            residual.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
            if self.driven:
                residual.axpy(-self.body_force, self._forcing)
            # Dirichlet rows carry x - g, so the step restores the boundary values.
            dolfinx.fem.petsc.set_bc(residual, self._bcs, x, -1.0)
            constraint.restrict_vector(residual, out=residual_reduced)
            if pinned:
                residual_reduced.setValues(pinned, [0.0])
            residual_reduced.assemble()
            flux_defect = self._target_flux - self._forcing.dot(x) if self.driven else 0.0
            norm = math.hypot(residual_reduced.norm(), flux_defect)
            history.append(norm)
            _log(
                comm, "Newton %d: residual %.3e, body force %.6e", iterations, norm, self.body_force
            )
            if not math.isfinite(norm):
                raise _NewtonDivergedError(
                    f"Newton diverged: residual is {norm} (history {format_history(history)})",
                    history,
                )
            if norm <= max(rtol * history[0], atol) or step_is_small:
                return history
            if divergence_growth is not None and norm > divergence_growth * history[0]:
                raise _NewtonDivergedError(
                    f"Newton diverged: the residual grew past {divergence_growth:g} times its "
                    f"initial value (history {format_history(history)})",
                    history,
                )
            if iterations == max_iterations:
                raise _NewtonDivergedError(
                    f"Newton did not reach rtol={rtol} in {max_iterations} iterations "
                    f"(residual history {format_history(history)})",
                    history,
                )

            # Modified Newton: once Newton is in its quadratic regime (the last step cut the
            # residual by REUSE_CONTRACTION or more), the factorised Jacobian of the previous
            # step is accurate enough and the next step costs back-substitutions only. Without
            # a stale start the first two steps refactorise: the first from a new state says
            # nothing about the regime (from rest it is a Stokes step).
            if iterations == 0:
                refresh = not stale_start
            else:
                contraction = history[-1] / history[-2]
                if iterations == 1 and not stale_start:
                    contraction = 1.0
                refresh = contraction > REUSE_CONTRACTION
            if refresh:
                self._factorize(timings)
                run.factorizations += 1

            ksp = self._ksp
            residual_reduced.copy(self._rhs)
            self._rhs.scale(-1.0)
            with _timed(timings, "solve"):
                solve_linear(
                    ksp, self._rhs, self._step_residual, context=f"the Newton step {iterations}"
                )
            if self.driven:
                if refresh:
                    with _timed(timings, "solve"):
                        solve_linear(
                            ksp,
                            self._forcing_reduced,
                            self._step_forcing,
                            context=f"the body-force response {iterations}",
                        )
                force_step = (
                    flux_defect - self._constraint_reduced.dot(self._step_residual)
                ) / self._constraint_reduced.dot(self._step_forcing)
                self._step_residual.axpy(force_step, self._step_forcing)
                self.body_force += force_step
            constraint.prolong(self._step_residual, self._increment)
            x.axpy(1.0, self._increment)
            step_is_small = self._increment.norm() <= rtol * x.norm()
            x.ghostUpdate(addv=PETSc.InsertMode.INSERT, mode=PETSc.ScatterMode.FORWARD)
            iterations += 1
            run.steps += 1

    def _factorize(self, timings: dict[str, float]) -> None:
        """Assemble the Jacobian at the current state, restrict it and hand it to the solver."""
        self._jacobian_reduced = self._assemble_reduced(
            self._jacobian, self._jacobian_form, self._jacobian_reduced, timings
        )
        if self._ksp is None:
            options = self._petsc_options
            if options is None:
                options = default_solver_options(
                    kind="flow", num_dofs=self.num_dofs, tdim=self.mesh.topology.dim
                )
            self._ksp = create_direct_solver(self.comm, petsc_options=options, name="flow")
            if self._ksp.getPC().getType() == PETSc.PC.Type.FIELDSPLIT:
                self._set_field_splits(self._ksp.getPC())
        elif self._pcd is not None:
            self._pcd.update()
        elif self._mass_schur is not None:
            form, pressure_set, matrix, full = self._mass_schur
            self._pressure_block(form, pressure_set, pin_diagonal=1.0, out=matrix, full=full)
        self._ksp.setOperators(self._jacobian_reduced)

    def _assemble_reduced(
        self,
        matrix: PETSc.Mat,
        form: dolfinx.fem.Form,
        reduced: PETSc.Mat | None,
        timings: dict[str, float],
    ) -> PETSc.Mat:
        """Assemble ``form`` into ``matrix`` at the current state and restrict it (``K^T A K``).

        Returns:
            The reduced matrix, with the pinned pressure row and column replaced by the
            identity's; ``reduced`` refilled in place when given (the sparsity never changes).
        """
        with _timed(timings, "assembly"):
            matrix.zeroEntries()
            dolfinx.fem.petsc.assemble_matrix(matrix, form, bcs=self._bcs)
            matrix.assemble()
        with _timed(timings, "restriction"):
            reduced = self.constraint.restrict_matrix(matrix, out=reduced)
            if self._pin_pressure:
                # Collective: every rank calls it, only the owner names the row.
                reduced.zeroRowsColumns(self._pinned, diag=1.0)
        return reduced

    def _set_field_splits(self, pc: PETSc.PC) -> None:
        """Name the velocity ("u") and pressure ("p") dofs of the reduced system for fieldsplit.

        The velocity index set lists the components of each node together (block size d), so
        that algebraic multigrid on the velocity block aggregates nodes, and carries the d
        rigid translations as its near-null space (PCFIELDSPLIT hands both to the sub-matrix).
        """
        gdim = self.mesh.geometry.dim
        constraint = self.constraint
        num_owned = self.W.dofmap.index_map.size_local * self.W.dofmap.index_map_bs
        nodes = self._velocity_dofs.reshape(-1, gdim)
        nodes = nodes[nodes[:, 0] < num_owned]
        # The components of one node share its owner and its periodic image.
        nodes = nodes[~constraint.slave_mask[nodes[:, 0]]]
        velocity = constraint.reduced_index[nodes].ravel().astype(PETSc.IntType)
        pressure = self._pressure_dofs[self._pressure_dofs < num_owned]
        pressure = constraint.reduced_index[pressure[~constraint.slave_mask[pressure]]]
        velocity_set = PETSc.IS().createGeneral(velocity, comm=self.comm)
        velocity_set.setBlockSize(gdim)
        pressure_set = PETSc.IS().createGeneral(pressure.astype(PETSc.IntType), comm=self.comm)
        translations = []
        for component in range(gdim):
            vector = PETSc.Vec().createMPI(
                (velocity.size, PETSc.DECIDE), bsize=gdim, comm=self.comm
            )
            array = np.zeros(velocity.size)
            array[component::gdim] = 1.0
            vector.setArray(array)
            vector.normalize()
            translations.append(vector)
        near_null_space = PETSc.NullSpace().create(vectors=translations, comm=self.comm)
        velocity_set.compose("nearnullspace", near_null_space)
        pc.setFieldSplitIS(("u", velocity_set), ("p", pressure_set))
        objects = [velocity_set, pressure_set, near_null_space, *translations]
        prefix = pc.getOptionsPrefix() or ""
        options = PETSc.Options(prefix)
        if options.getString("pc_fieldsplit_schur_precondition", "") == "user":
            if options.getString("fieldsplit_p_pc_type", "") == "mat":
                self._pcd = _PressureConvectionDiffusion(self, pressure_set, prefix=prefix)
                schur_preconditioner = self._pcd.operator
            else:
                form = _inverse_viscosity_mass_form(self)
                full = dolfinx.fem.petsc.create_matrix(form)
                schur_preconditioner = self._pressure_block(
                    form, pressure_set, pin_diagonal=1.0, full=full
                )
                self._mass_schur = (form, pressure_set, schur_preconditioner, full)
                objects.extend((schur_preconditioner, full))
            pc.setFieldSplitSchurPreType(PETSc.PC.FieldSplitSchurPreType.USER, schur_preconditioner)
        self._split_objects = tuple(objects)

    def _total_viscosity(self) -> ufl.core.expr.Expr:
        """``nu + nu_t`` (UFL), read by the pressure preconditioners' forms.

        ``nu`` is the viscosity Constant (the continuation's current stage), so a reassembly
        follows it.
        """
        viscosity = ufl.as_ufl(self._viscosity)
        return viscosity if self._nu_t is None else viscosity + self._nu_t

    def _pressure_block(
        self,
        form: dolfinx.fem.Form,
        pressure_set: PETSc.IS,
        *,
        pin_diagonal: float,
        out: PETSc.Mat | None = None,
        full: PETSc.Mat | None = None,
    ) -> PETSc.Mat:
        """A pressure-pressure form assembled on the mixed space, in the reduced numbering.

        Args:
            form: a bilinear form whose trial and test functions are the pressure parts of
                ``W``'s trial and test functions.
            pressure_set: the owned reduced pressure indices (the ``p`` split).
            pin_diagonal: diagonal entry of the pinned pressure dof (its row and column are
                zeroed) when the pressure is pinned.
            out: the matrix of an earlier call with the same form, refilled in place.
            full: a matrix of ``W``'s layout with the form's sparsity to assemble into (kept
                by the caller for repeated assemblies); a temporary one when None.

        Returns:
            The (n_p, n_p) float64 pressure block (``out`` when given).
        """
        own_full = full is None
        if own_full:
            full = dolfinx.fem.petsc.create_matrix(form)
        full.zeroEntries()
        dolfinx.fem.petsc.assemble_matrix(full, form)
        full.assemble()
        reduced = self.constraint.restrict_matrix(full)
        if self._pin_pressure:
            reduced.zeroRowsColumns(self._pinned, diag=pin_diagonal)
        if out is None:
            out = reduced.createSubMatrix(pressure_set, pressure_set)
        else:
            reduced.createSubMatrix(pressure_set, pressure_set, submat=out)
        reduced.destroy()
        if own_full:
            full.destroy()
        return out


def _inverse_viscosity_mass_form(solver: FlowSolver) -> dolfinx.fem.Form:
    """``-integral(p q / (nu + nu_t))``: the Schur complement's Stokes limit, ``-M_p / nu``.

    It reads the solver's viscosity Constant (the continuation's stage, not only the target)
    and its eddy viscosity, so a reassembly follows both.
    """
    _, pressure = ufl.TrialFunctions(solver.W)
    _, test = ufl.TestFunctions(solver.W)
    return dolfinx.fem.form(-pressure * test / solver._total_viscosity() * ufl.dx)


def _pressure_mass_form(W: dolfinx.fem.FunctionSpace) -> dolfinx.fem.Form:
    """``integral(p q)`` on the pressure parts of the mixed space ``W``."""
    _, pressure = ufl.TrialFunctions(W)
    _, test = ufl.TestFunctions(W)
    return dolfinx.fem.form(pressure * test * ufl.dx)


class _PressureConvectionDiffusion:
    """The pressure convection-diffusion (PCD) approximation of the inverse Schur complement.

    For the Newton systems ``[F B^T; B 0]`` of the velocity-pressure system (``B = -div``),
    ``S = -B F^-1 B^T ~ -A_p F_p^-1 M_p``, so ``S^-1 ~ -M_p^-1 F_p A_p^-1`` with ``M_p`` the
    pressure mass matrix, ``A_p`` the pressure Laplacian and ``F_p`` the convection-diffusion
    operator ``(nu + nu_t) grad p . grad q + (u . grad p) q`` on the pressure space, with the
    current velocity ``u`` (Elman, Silvester and Wathen, *Finite Elements and Fast Iterative
    Solvers*, ch. 9). Unlike ``-M_p / nu`` (its Stokes limit, ``F_p = nu A_p``) it accounts for
    convection, which dominates at cell Reynolds numbers far above 1 (coarse 3-D hills at
    Re = 100). Walls (u = 0) and periodic pairs need no boundary terms; no inflow boundary is
    treated specially (an inlet or outlet flow gets the Neumann form, a weaker approximation).

    Applied as a shell matrix (``fieldsplit_p_pc_type mat`` applies the "user" Schur
    preconditioning matrix). ``A_p^-1`` and ``M_p^-1`` are KSPs with the option prefixes
    ``<flow prefix>pcd_laplace_`` and ``<flow prefix>pcd_mass_``. ``F_p`` is reassembled at
    every Jacobian refresh (:meth:`update`).
    """

    def __init__(self, solver: FlowSolver, pressure_set: PETSc.IS, *, prefix: str) -> None:
        """Assemble ``M_p``, ``A_p`` and ``F_p`` and set up the two inner solvers."""
        self._solver = solver
        self._pressure_set = pressure_set
        W = solver.W
        _, pressure_trial = ufl.TrialFunctions(W)
        _, pressure_test = ufl.TestFunctions(W)
        current_velocity, _ = ufl.split(solver._w)
        viscosity = solver._total_viscosity()
        gradients = ufl.inner(ufl.grad(pressure_trial), ufl.grad(pressure_test))
        self._laplace_form = dolfinx.fem.form(gradients * ufl.dx)
        self._convection_form = dolfinx.fem.form(
            (
                viscosity * gradients
                + ufl.inner(ufl.dot(current_velocity, ufl.grad(pressure_trial)), pressure_test)
            )
            * ufl.dx
        )
        self.mass = solver._pressure_block(
            _pressure_mass_form(W), pressure_set, pin_diagonal=1.0
        )
        self.laplace = solver._pressure_block(self._laplace_form, pressure_set, pin_diagonal=1.0)
        self._convection_full = dolfinx.fem.petsc.create_matrix(self._convection_form)
        # -1 on the pinned dof: the product -M_p^-1 F_p A_p^-1 is +1 there, as the Schur
        # complement (the pinned row and column of the Jacobian are the identity's).
        self.convection: PETSc.Mat | None = None
        self.update()
        comm = solver.comm
        self._solvers = []
        for name, matrix in (("laplace", self.laplace), ("mass", self.mass)):
            ksp = PETSc.KSP().create(comm)
            ksp.setOptionsPrefix(f"{prefix}pcd_{name}_")
            ksp.setOperators(matrix)
            ksp.setFromOptions()
            ksp.setUp()
            self._solvers.append(ksp)
        self._work = [self.mass.createVecLeft() for _ in range(2)]
        size = self.mass.getSizes()
        self.operator = PETSc.Mat().createPython(size, context=self, comm=comm)
        self.operator.setUp()

    def update(self) -> None:
        """Reassemble ``F_p`` with the current velocity (and eddy viscosity)."""
        self.convection = self._solver._pressure_block(
            self._convection_form,
            self._pressure_set,
            pin_diagonal=-1.0,
            out=self.convection,
            full=self._convection_full,
        )

    def mult(self, matrix: PETSc.Mat, x: PETSc.Vec, y: PETSc.Vec) -> None:
        """``y = -M_p^-1 F_p A_p^-1 x`` (the shell matrix's product)."""
        laplace_solver, mass_solver = self._solvers
        first, second = self._work
        laplace_solver.solve(x, first)
        self.convection.mult(first, second)
        mass_solver.solve(second, y)
        y.scale(-1.0)

    def free(self) -> None:
        """Free the matrices, vectors and inner solvers.

        Not named ``destroy``: PETSc calls a shell context's ``destroy(mat)`` itself.
        """
        for petsc_object in (
            self.operator,
            *self._solvers,
            *self._work,
            self.mass,
            self.laplace,
            self.convection,
            self._convection_full,
        ):
            if petsc_object is not None:
                petsc_object.destroy()


def solve_flow(
    mesh: dolfinx.mesh.Mesh,
    facet_tags: dolfinx.mesh.MeshTags,
    spec: BoundarySpec,
    *,
    nu: float = DEFAULT_PHYSICS.nu,
    bulk_velocity: float = DEFAULT_PHYSICS.bulk_velocity,
    nu_t: dolfinx.fem.Function | ufl.core.expr.Expr | None = None,
    degree: int = 2,
    initial_guess: FlowSolution | None = None,
    rtol: float = 1e-10,
    atol: float = 1e-12,
    max_iterations: int = 30,
    petsc_options: Mapping[str, object] | None = None,
    continuation: str = "auto",
) -> FlowSolution:
    """Solve the steady incompressible Navier-Stokes equations once (a :class:`FlowSolver`).

    Repeated solves on one mesh (a coupled run) should keep a :class:`FlowSolver` instead,
    which builds the spaces, forms and periodic constraint once.

    Args:
        mesh: the dolfinx mesh (triangles or quadrilaterals, any dimension).
        facet_tags: facet markers used by ``spec``.
        spec: walls (no slip), inlets (velocity profile), outlets (do-nothing) and periodic
            pairs. Body-force driven when periodic without inlet.
        nu: kinematic viscosity.
        bulk_velocity: target area average of the streamwise velocity (body-force driven
            flows only).
        nu_t: optional non-negative eddy viscosity, a Function or UFL expression on ``mesh``.
        degree: velocity degree; the pressure gets ``degree - 1`` (Taylor-Hood).
        initial_guess: a previous solution on the same mesh (e.g. before a closure update);
            by default Newton starts from rest, so its first step is a Stokes solve.
        rtol: relative tolerance, see :meth:`FlowSolver.solve`.
        atol: convergence as well when the residual norm falls below ``atol``.
        max_iterations: maximum number of Newton steps.
        petsc_options: PETSc options of the linear solver, see :class:`FlowSolver`.
        continuation: the viscosity continuation of a solve from rest, see
            :meth:`FlowSolver.solve`.

    Returns:
        The converged :class:`FlowSolution`; ``timings["setup"]`` holds the set-up time.

    Raises:
        ValueError: on NaN/inf or otherwise invalid inputs.
        SolverDivergedError: when Newton does not converge within ``max_iterations``, the
            residual becomes NaN/inf, or a linear solve fails.
    """
    start_time = time.perf_counter()
    _check_parameters(
        nu=nu,
        bulk_velocity=bulk_velocity,
        degree=degree,
        rtol=rtol,
        atol=atol,
        max_iterations=max_iterations,
    )
    with FlowSolver(
        mesh,
        facet_tags,
        spec,
        nu=nu,
        bulk_velocity=bulk_velocity,
        nu_t=nu_t,
        degree=degree,
        petsc_options=petsc_options,
    ) as solver:
        solution = solver.solve(
            initial_guess=initial_guess,
            rtol=rtol,
            atol=atol,
            max_iterations=max_iterations,
            continuation=continuation,
        )
        solution.timings["setup"] = solver.setup_time
    solution.wall_time = time.perf_counter() - start_time
    return solution
