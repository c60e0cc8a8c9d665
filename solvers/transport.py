"""Steady closure-transport (tau) equation, docs/physics.md.

    u . grad(tau) - div(D grad tau) + zeta |tau|^p tau = P,   P = gamma l_m sqrt(tau_P) |S|^2

(p = ``reaction_exponent``: 1 reproduces the published data, 1/2 is the published solver
source's form; see :mod:`vcnn.physics`) on P1 elements with SUPG stabilisation, solved directly by Newton's method with the exact
Jacobian (``ufl.derivative``) and MUMPS LU. tau = 0 on walls and inlets
(``spec.dirichlet_tags``), zero flux on outlets (the natural condition), periodic on
``spec.periodic`` (through :class:`solvers.periodic.PeriodicConstraint`).

Numerical choices, all explicit:

- ``|t|^p`` is regularised as ``(t^2 + eps^2)^(p/2)`` (:func:`regularized_abs_power`), smooth
  with a bounded derivative of the reaction ``|t|^p t`` at 0; it differs from ``|t|^p`` by at
  most ``eps^p`` and only where ``|t| <~ eps``, so the reaction term changes by at most
  ``eps^(1+p)``. ``eps`` is the ``regularization`` argument, 1e-8 by default. The same
  regularisation (p = 1/2) is used for ``sqrt(tau_P)`` in the coupled mode.
- The SUPG parameter is ``tau_s = ((2|u|/h)^2 + 9 (4 D / h^2)^2)^(-1/2)`` with h the cell
  diameter (``supg_length="diameter"``, the default) or the cell's extent along u,
  ``|u| / |J^-1 u|`` (``"flow"``, :func:`element_length`): the standard smooth interpolation
  of the Peclet-number formula ``h/(2|u|) (coth Pe - 1/Pe)`` between its limits ``h/(2|u|)``
  (Pe -> oo) and ``h^2/(12 D)`` (Pe -> 0). It never divides by zero for D > 0, so a zero
  velocity is a plain diffusion-reaction problem. The stabilisation is residual based (the
  full strong residual, source included), so the method stays consistent; tau_s does not
  depend on tau.
- Newton's method has a backtracking line search on the residual norm, checks the PETSc
  converged reason of each linear solve and raises :class:`SolverDivergedError` when it
  cannot converge.
"""

from __future__ import annotations

from mpi4py import MPI

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import dolfinx
import dolfinx.fem.petsc
import numpy as np
import ufl
from dolfinx import fem
from petsc4py import PETSc

from solvers.boundaries import BoundarySpec
from solvers.fields import mixing_length
from solvers.linalg import (
    SolverDivergedError,
    create_direct_solver,
    default_solver_options,
    destroy_solver,
    format_history,
    solve_linear,
)
from vcnn.physics import DEFAULT_PHYSICS, PRODUCTION_MODES, SUPG_LENGTHS

logger = logging.getLogger(__name__)

__all__ = [
    "PRODUCTION_MODES",
    "NewtonResult",
    "SolverDivergedError",
    "TauSolution",
    "TauSolver",
    "dirichlet_dofs",
    "regularized_abs_power",
    "regularized_sqrt",
    "solve_nonlinear",
    "solve_tau",
    "supg_parameter",
    "tau_residual_form",
    "transport_residual_form",
]


def _log(comm: MPI.Comm, level: int, message: str, *args) -> None:
    if comm.rank == 0:
        logger.log(level, message, *args)


def regularized_abs_power(
    value: ufl.core.expr.Expr, exponent: float, eps: float
) -> ufl.core.expr.Expr:
    """Smooth ``|value|^exponent``: ``(value^2 + eps^2)^(exponent / 2)`` (UFL)."""
    if exponent == 1.0:
        return ufl.sqrt(value * value + eps * eps)
    return (value * value + eps * eps) ** (0.5 * exponent)


def regularized_sqrt(value: ufl.core.expr.Expr, eps: float) -> ufl.core.expr.Expr:
    """Smooth ``sqrt(|value|)``: ``(value^2 + eps^2)^(1/4)`` (UFL)."""
    return regularized_abs_power(value, 0.5, eps)


def supg_parameter(
    velocity: ufl.core.expr.Expr,
    diffusivity: float | ufl.core.expr.Expr,
    cell_size: ufl.core.expr.Expr,
) -> ufl.core.expr.Expr:
    """SUPG parameter ``((2|u|/h)^2 + 9 (4 D/h^2)^2)^(-1/2)`` (UFL, cell-wise).

    Args:
        velocity: (d,) UFL vector.
        diffusivity: D > 0.
        cell_size: h, e.g. ``ufl.CellDiameter(mesh)``.

    Returns:
        Scalar UFL expression, finite for u = 0.
    """
    advective = 2.0 * ufl.sqrt(ufl.dot(velocity, velocity)) / cell_size
    diffusive = 4.0 * diffusivity / cell_size**2
    return 1.0 / ufl.sqrt(advective**2 + 9.0 * diffusive**2)


def element_length(
    mesh: dolfinx.mesh.Mesh, velocity: ufl.core.expr.Expr, kind: str
) -> ufl.core.expr.Expr:
    """The element length h of the SUPG parameter (UFL, cell-wise or per quadrature point).

    Args:
        mesh: the mesh.
        velocity: (d,) UFL vector.
        kind: ``"diameter"``: ``ufl.CellDiameter``; ``"flow"``: the cell's extent along u,
            ``|u| / |J^-1 u|`` with J the Jacobian of the map from the reference cell, and the
            diameter where ``|J^-1 u|`` vanishes (u = 0). On an extruded cell J is block
            diagonal, so for an in-plane u the flow length is the 2-D cell's: it does not
            depend on the cell size across the flow.

    Returns:
        Scalar UFL expression, positive.
    """
    if kind not in SUPG_LENGTHS:
        raise ValueError(f"unknown SUPG length {kind!r}: use one of {SUPG_LENGTHS}")
    diameter = ufl.CellDiameter(mesh)
    if kind == "diameter":
        return diameter
    reference = ufl.dot(ufl.inv(ufl.Jacobian(mesh)), velocity)
    reference_speed = ufl.sqrt(ufl.dot(reference, reference))
    speed = ufl.sqrt(ufl.dot(velocity, velocity))
    # a relative floor: below it u is zero to round-off and the quotient is 0/0
    floor = 1e-12 * speed / diameter + 1e-300
    return ufl.conditional(
        ufl.gt(reference_speed, floor), speed / ufl.max_value(reference_speed, floor), diameter
    )


def transport_residual_form(
    tau: fem.Function,
    velocity: ufl.core.expr.Expr,
    *,
    diffusivity: float,
    reaction: ufl.core.expr.Expr | float = 0.0,
    source: ufl.core.expr.Expr | float = 0.0,
    supg: bool = True,
    supg_length: str = DEFAULT_PHYSICS.supg_length,
    quadrature_degree: int = 4,
) -> ufl.Form:
    """Residual of ``u . grad(tau) - div(D grad tau) + r(tau) = f`` with SUPG (UFL form).

    ``F(tau; v) = int (u.grad tau) v + D grad tau . grad v + (r - f) v dx
    + sum_K int_K tau_s (u . grad v) (u . grad tau - div(D grad tau) + r - f) dx``.
    Boundary terms are left out: Dirichlet rows are handled by the solver, the rest of the
    boundary carries zero diffusive flux.

    Args:
        tau: unknown scalar Function (any Lagrange space; P1 in this package).
        velocity: (d,) advecting velocity, a Function or UFL expression.
        diffusivity: constant D > 0.
        reaction: reaction term r(tau), a UFL expression of ``tau`` (e.g. nonlinear).
        source: source term f (a UFL expression, e.g. a manufactured one).
        supg: add the SUPG term.
        supg_length: the element length of the SUPG parameter (:func:`element_length`).
        quadrature_degree: degree of the cell quadrature. UFL's estimate explodes for the
            fractional powers of the reaction (degree ~40); 4 integrates the P1 x P2 products
            of the tau equation exactly and the rest to well below the discretisation error.

    Returns:
        The residual form, linear in the test function.
    """
    if not diffusivity > 0:
        raise ValueError(f"diffusivity must be positive, got {diffusivity}")
    mesh = tau.function_space.mesh
    test = ufl.TestFunction(tau.function_space)
    dx = ufl.dx(domain=mesh, metadata={"quadrature_degree": quadrature_degree})
    diffusivity_constant = fem.Constant(mesh, PETSc.ScalarType(diffusivity))
    residual = (
        ufl.dot(velocity, ufl.grad(tau)) * test
        + diffusivity_constant * ufl.dot(ufl.grad(tau), ufl.grad(test))
        + (reaction - source) * test
    ) * dx
    if supg:
        strong = (
            ufl.dot(velocity, ufl.grad(tau))
            - ufl.div(diffusivity_constant * ufl.grad(tau))
            + reaction
            - source
        )
        stabilisation = supg_parameter(
            velocity, diffusivity_constant, element_length(mesh, velocity, supg_length)
        )
        residual += stabilisation * ufl.dot(velocity, ufl.grad(test)) * strong * dx
    return residual


@dataclass
class NewtonResult:
    """Outcome of :func:`solve_nonlinear`.

    Attributes:
        iterations: Newton steps taken.
        residual_history: l2 norms of the (reduced) residual, one per iterate, the initial
            guess first.
        converged: always True on return (failures raise).
    """

    iterations: int
    residual_history: list[float] = field(default_factory=list)
    converged: bool = True


def dirichlet_dofs(
    V: fem.FunctionSpace, facet_tags: dolfinx.mesh.MeshTags, tags: Sequence[int]
) -> np.ndarray:
    """Local dofs of V (owned and ghost) on the facets carrying any of ``tags``.

    Returns:
        (K,) int32 sorted local dof indices.
    """
    mesh = V.mesh
    fdim = mesh.topology.dim - 1
    mesh.topology.create_connectivity(fdim, mesh.topology.dim)
    facets = [facet_tags.find(int(tag)) for tag in tags]
    facets = np.unique(np.concatenate(facets)).astype(np.int32) if facets else np.empty(0, np.int32)
    return fem.locate_dofs_topological(V, fdim, facets)


def _average_periodic_copies(function: fem.Function, constraint) -> None:
    """Make a Function exactly periodic: every master/slave group gets its mean value."""
    space = function.function_space
    ones = fem.Function(space)
    ones.x.array[:] = 1.0
    counts = constraint.restrict_vector(ones.x.petsc_vec)
    sums = constraint.restrict_vector(function.x.petsc_vec)
    sums.pointwiseDivide(sums, counts)
    constraint.prolong(sums, function.x.petsc_vec)
    function.x.scatter_forward()
    counts.destroy()
    sums.destroy()


def _check_finite(name: str, value) -> None:
    if isinstance(value, fem.Function):
        if not np.all(np.isfinite(value.x.array)):
            raise ValueError(f"{name} contains NaN or inf values: fix the input field")
    elif isinstance(value, (float, int, np.ndarray)):
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{name} is not finite: {value}")


class _NewtonSolver:
    """Newton's method on ``F(x) = 0`` with Dirichlet rows and an optional periodic constraint."""

    def __init__(
        self,
        residual: ufl.Form,
        unknown: fem.Function,
        bcs: Sequence[fem.DirichletBC],
        *,
        constraint=None,
        options_prefix: str = "tau",
        petsc_options: Mapping[str, object] | None = None,
    ) -> None:
        self.unknown = unknown
        self.bcs = list(bcs)
        self.constraint = constraint
        increment = ufl.TrialFunction(unknown.function_space)
        self.residual_form = fem.form(residual)
        self.jacobian_form = fem.form(ufl.derivative(residual, unknown, increment))
        self.matrix = dolfinx.fem.petsc.create_matrix(self.jacobian_form)
        self.vector = dolfinx.fem.petsc.create_vector(unknown.function_space)
        self.step = fem.Function(unknown.function_space)
        space = unknown.function_space
        if petsc_options is None:
            petsc_options = default_solver_options(
                kind="scalar",
                num_dofs=space.dofmap.index_map.size_global * space.dofmap.index_map_bs,
                tdim=space.mesh.topology.dim,
            )
        self.ksp = create_direct_solver(
            space.mesh.comm, petsc_options=petsc_options, name=options_prefix
        )
        self.reduced_matrix: PETSc.Mat | None = None
        self.history: list[float] = []

    def destroy(self) -> None:
        destroy_solver(self.ksp)
        if self.reduced_matrix is not None:
            self.reduced_matrix.destroy()
        self.matrix.destroy()
        self.vector.destroy()

    def _residual(self) -> tuple[PETSc.Vec, float]:
        """Assemble F(x) with zero Dirichlet rows; return (reduced residual, its norm)."""
        with self.vector.localForm() as local:
            local.set(0.0)
        dolfinx.fem.petsc.assemble_vector(self.vector, self.residual_form)
        self.vector.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
        # x already equals g on the Dirichlet dofs, so the residual there is x - g = 0.
        dolfinx.fem.petsc.set_bc(self.vector, self.bcs, self.unknown.x.petsc_vec, -1.0)
        if self.constraint is None:
            reduced = self.vector
        else:
            reduced = self.constraint.restrict_vector(self.vector)
        norm = reduced.norm()
        return reduced, float(norm)

    def _solve_linear(self, rhs: PETSc.Vec) -> None:
        """Solve J dx = rhs into self.step (full space)."""
        self.matrix.zeroEntries()
        dolfinx.fem.petsc.assemble_matrix(self.matrix, self.jacobian_form, bcs=self.bcs)
        self.matrix.assemble()
        operator = self.matrix
        if self.constraint is not None:
            # Same sparsity every iteration: refill the reduced matrix in place.
            self.reduced_matrix = self.constraint.restrict_matrix(
                self.matrix, out=self.reduced_matrix
            )
            operator = self.reduced_matrix
        solution = rhs.duplicate()
        self.ksp.setOperators(operator)
        try:
            solve_linear(self.ksp, rhs, solution, context="the tau Newton Jacobian")
        except SolverDivergedError as error:
            raise SolverDivergedError(f"tau Newton: {error}", self.history) from error
        if self.constraint is None:
            solution.copy(self.step.x.petsc_vec)
        else:
            self.constraint.prolong(solution, self.step.x.petsc_vec)
        self.step.x.scatter_forward()
        solution.destroy()

    def solve(
        self, *, rtol: float, atol: float, max_iterations: int, step_tol: float = 1e-12
    ) -> NewtonResult:
        comm = self.unknown.function_space.mesh.comm
        for bc in self.bcs:
            bc.set(self.unknown.x.array)
        self.unknown.x.scatter_forward()
        reduced, norm = self._residual()
        # A fresh history per solve: the solver is reused across the solves of a coupled run.
        self.history = history = [norm]
        target = max(rtol * norm, atol)
        iterations = 0
        while not norm <= target:
            if not np.isfinite(norm):
                raise SolverDivergedError("tau Newton: the residual is NaN or inf", history)
            if iterations >= max_iterations:
                raise SolverDivergedError(
                    f"tau Newton did not converge in {max_iterations} iterations: residual "
                    f"{norm:.3e} > target {target:.3e} (history {format_history(history)}); "
                    "raise max_iterations, loosen rtol or give a better initial_guess",
                    history,
                )
            rhs = reduced.copy() if reduced is self.vector else reduced
            self._solve_linear(rhs)
            rhs.destroy()
            previous = self.unknown.x.array.copy()
            step_norm = self.step.x.petsc_vec.norm()
            if step_norm <= step_tol * self.unknown.x.petsc_vec.norm():
                # The residual is at its round-off floor (e.g. a warm start from a converged
                # state): a relative step this small cannot improve the solution.
                self.unknown.x.array[:] = previous - self.step.x.array
                reduced, norm = self._residual()
                iterations += 1
                history.append(norm)
                break
            step_length = 1.0
            # Backtracking: halve the step until the residual norm decreases (Armijo-like).
            for _ in range(12):
                self.unknown.x.array[:] = previous - step_length * self.step.x.array
                reduced, trial_norm = self._residual()
                if np.isfinite(trial_norm) and trial_norm <= (1.0 - 1e-4 * step_length) * norm:
                    break
                if reduced is not self.vector:
                    reduced.destroy()
                step_length *= 0.5
            else:
                raise SolverDivergedError(
                    f"tau Newton: the line search found no decrease of the residual "
                    f"{norm:.3e} at iteration {iterations + 1} (history "
                    f"{format_history(history)}); give a better initial_guess",
                    history,
                )
            norm = trial_norm
            iterations += 1
            history.append(norm)
            _log(
                comm,
                logging.DEBUG,
                "Newton %d: residual %.3e (step %.3g)",
                iterations,
                norm,
                step_length,
            )
        if reduced is not self.vector:
            reduced.destroy()
        return NewtonResult(iterations=iterations, residual_history=list(history))


def solve_nonlinear(
    residual: ufl.Form,
    unknown: fem.Function,
    bcs: Sequence[fem.DirichletBC] = (),
    *,
    constraint=None,
    rtol: float = 1e-10,
    atol: float = 1e-13,
    max_iterations: int = 30,
) -> NewtonResult:
    """Solve ``F(unknown) = 0`` by Newton's method (exact Jacobian, MUMPS LU).

    Args:
        residual: UFL residual form, linear in a test function of ``unknown``'s space.
        unknown: the unknown Function; holds the initial guess and, on return, the solution.
        bcs: Dirichlet conditions (their values are imposed on the initial guess).
        constraint: optional :class:`solvers.periodic.PeriodicConstraint` on the space; the
            initial guess should be periodic (the increments are).
        rtol: stop when the residual norm is below rtol times the initial one,
        atol: or below atol, or when a Newton step is below 1e-12 relative to the solution
            (round-off floor).
        max_iterations: at most this many Newton steps.

    Returns:
        NewtonResult with the iteration count and residual history.

    Raises:
        SolverDivergedError: no convergence, a failed linear solve, or a NaN residual.
    """
    solver = _NewtonSolver(residual, unknown, bcs, constraint=constraint)
    try:
        return solver.solve(rtol=rtol, atol=atol, max_iterations=max_iterations)
    finally:
        solver.destroy()


@dataclass
class TauSolution:
    """Solution of the tau equation.

    Attributes:
        tau: P1 Function of tau.
        newton_iterations: Newton steps (for production="coupled" without an initial guess,
            including those of the frozen solve that provides the initial guess).
        residual_history: residual norms of the final Newton solve.
        integral: int tau dx over the domain.
        wall_time: seconds spent in :func:`solve_tau`.
    """

    tau: fem.Function
    newton_iterations: int
    residual_history: list[float]
    integral: float
    wall_time: float


def tau_residual_form(
    tau: fem.Function,
    velocity: ufl.core.expr.Expr,
    strain_rate: ufl.core.expr.Expr,
    wall_distance: ufl.core.expr.Expr,
    *,
    production: str = DEFAULT_PHYSICS.production,
    diffusivity: float = DEFAULT_PHYSICS.diffusivity,
    zeta: float = DEFAULT_PHYSICS.zeta,
    reaction_exponent: float = DEFAULT_PHYSICS.reaction_exponent,
    gamma: float = DEFAULT_PHYSICS.gamma,
    tau_p: float = DEFAULT_PHYSICS.tau_p,
    supg_length: str = DEFAULT_PHYSICS.supg_length,
    regularization: float = 1e-8,
) -> ufl.Form:
    """Residual form of the tau equation of docs/physics.md (see :func:`solve_tau`)."""
    if production not in PRODUCTION_MODES:
        raise ValueError(f"unknown production mode {production!r}: use one of {PRODUCTION_MODES}")
    if not regularization > 0:
        raise ValueError(f"regularization must be positive, got {regularization}")
    length = mixing_length(wall_distance)
    if production == "frozen":
        production_sqrt = float(np.sqrt(tau_p))
    else:
        production_sqrt = regularized_sqrt(tau, regularization)
    source = gamma * length * production_sqrt * strain_rate**2
    reaction = zeta * regularized_abs_power(tau, reaction_exponent, regularization) * tau
    return transport_residual_form(
        tau, velocity, diffusivity=diffusivity, reaction=reaction, source=source,
        supg_length=supg_length,
    )


def _check_coefficients(
    production: str,
    *,
    diffusivity: float,
    zeta: float,
    reaction_exponent: float,
    gamma: float,
    tau_p: float,
) -> None:
    """Raise ValueError on an unknown production mode or unusable coefficients."""
    if production not in PRODUCTION_MODES:
        raise ValueError(f"unknown production mode {production!r}: use one of {PRODUCTION_MODES}")
    for name, value in (
        ("diffusivity", diffusivity),
        ("zeta", zeta),
        ("reaction_exponent", reaction_exponent),
        ("gamma", gamma),
        ("tau_p", tau_p),
    ):
        _check_finite(name, value)
        strictly = name in ("diffusivity", "reaction_exponent")
        if value < 0 or (strictly and value == 0):
            raise ValueError(
                f"{name} must be {'positive' if strictly else 'non-negative'}, got {value}"
            )


class TauSolver:
    """The steady tau equation on one P1 space: set up once, solved repeatedly.

    The residual form is built on the given velocity, strain rate and wall distance (their
    Functions, not their values), so a coupled run that updates the velocity in place solves
    the new problem with the same compiled forms, Jacobian sparsity and LU solver. The
    equation and its numerics are those of :func:`solve_tau`.

    Free the PETSc objects with :meth:`close` (or use it as a context manager).

    Attributes:
        tau: the P1 Function of tau; holds the last solution (the warm start of the next).
        V: the P1 space.
    """

    def __init__(
        self,
        V: fem.FunctionSpace,
        u: fem.Function | ufl.core.expr.Expr,
        strain_rate: fem.Function | ufl.core.expr.Expr,
        wall_distance: fem.Function | ufl.core.expr.Expr,
        facet_tags: dolfinx.mesh.MeshTags,
        spec: BoundarySpec,
        *,
        production: str = DEFAULT_PHYSICS.production,
        diffusivity: float = DEFAULT_PHYSICS.diffusivity,
        zeta: float = DEFAULT_PHYSICS.zeta,
        reaction_exponent: float = DEFAULT_PHYSICS.reaction_exponent,
        gamma: float = DEFAULT_PHYSICS.gamma,
        tau_p: float = DEFAULT_PHYSICS.tau_p,
        supg_length: str = DEFAULT_PHYSICS.supg_length,
        regularization: float = 1e-8,
        constraint=None,
        petsc_options: Mapping[str, object] | None = None,
    ) -> None:
        """Build the form, the boundary condition and the Newton solver.

        Args: as :func:`solve_tau` (``constraint``: a PeriodicConstraint on V, which the
        caller keeps ownership of; built, owned and freed here when None and the spec is
        periodic).
        """
        _check_coefficients(
            production,
            diffusivity=diffusivity,
            zeta=zeta,
            reaction_exponent=reaction_exponent,
            gamma=gamma,
            tau_p=tau_p,
        )
        if V.dofmap.index_map_bs != 1 or V.element.basix_element.degree != 1:
            raise ValueError("tau lives in a scalar P1 space: functionspace(mesh, ('Lagrange', 1))")
        self.V = V
        self._inputs = {"velocity": u, "strain_rate": strain_rate, "wall_distance": wall_distance}
        for name, value in self._inputs.items():
            _check_finite(name, value)
        self._facet_tags = facet_tags
        self._spec = spec
        self._coefficients = dict(
            diffusivity=diffusivity,
            zeta=zeta,
            reaction_exponent=reaction_exponent,
            gamma=gamma,
            supg_length=supg_length,
            regularization=regularization,
        )
        self.production = production
        self.tau_p = tau_p
        boundary_dofs = dirichlet_dofs(V, facet_tags, spec.dirichlet_tags)
        zero = fem.Constant(V.mesh, PETSc.ScalarType(0.0))
        self._bcs = [fem.dirichletbc(zero, boundary_dofs, V)]
        self._owns_constraint = constraint is None and bool(spec.periodic)
        if self._owns_constraint:
            from solvers.periodic import PeriodicConstraint

            constraint = PeriodicConstraint(
                V, facet_tags, spec.periodic, excluded_dofs=boundary_dofs
            )
        self.constraint = constraint
        self.tau = fem.Function(V, name="tau")
        residual = tau_residual_form(
            self.tau,
            u,
            strain_rate,
            wall_distance,
            production=production,
            tau_p=tau_p,
            **self._coefficients,
        )
        self._petsc_options = petsc_options
        self._newton = _NewtonSolver(
            residual, self.tau, self._bcs, constraint=constraint, petsc_options=petsc_options
        )
        self._integral_form = fem.form(self.tau * ufl.dx)
        self._frozen_solver: TauSolver | None = None
        self._closed = False

    def __enter__(self) -> TauSolver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Destroy the PETSc objects and remove the solver's options; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._newton.destroy()
        if self._frozen_solver is not None:
            self._frozen_solver.close()
        if self._owns_constraint:
            self.constraint.destroy()

    def solve(
        self,
        *,
        initial_guess: fem.Function | None = None,
        warm_start: bool = False,
        rtol: float = 1e-10,
        atol: float = 1e-13,
        max_iterations: int = 30,
    ) -> TauSolution:
        """Solve for the current velocity, strain rate and wall distance.

        Args:
            initial_guess: starting tau (interpolated when not on V; periodic copies are
                averaged).
            warm_start: without ``initial_guess``, start from the last solution held in
                :attr:`tau`. Otherwise the cold start of :func:`solve_tau`: zero for
                ``frozen``, the local-equilibrium scaling of a frozen solution for ``coupled``.
            rtol: relative tolerance on the residual norm.
            atol: absolute tolerance on the residual norm.
            max_iterations: Newton iterations at most (per Newton solve).

        Returns:
            TauSolution; its ``tau`` is :attr:`tau` (the solver's Function).

        Raises:
            ValueError: NaN/inf inputs.
            SolverDivergedError: Newton failed.
        """
        if self._closed:
            raise RuntimeError("TauSolver.solve called after close()")
        start = time.perf_counter()
        for name, value in (*self._inputs.items(), ("initial_guess", initial_guess)):
            _check_finite(name, value)
        tau = self.tau
        iterations = 0
        if initial_guess is not None:
            if initial_guess.function_space is not self.V:
                tau.interpolate(initial_guess)
            else:
                tau.x.array[:] = initial_guess.x.array
            tau.x.scatter_forward()
            if self.constraint is not None:
                _average_periodic_copies(tau, self.constraint)
        elif not warm_start:
            iterations += self._cold_start(rtol=rtol, atol=atol, max_iterations=max_iterations)
        result = self._newton.solve(rtol=rtol, atol=atol, max_iterations=max_iterations)
        iterations += result.iterations
        comm = self.V.mesh.comm
        integral = comm.allreduce(fem.assemble_scalar(self._integral_form), op=MPI.SUM)
        wall_time = time.perf_counter() - start
        _log(
            comm,
            logging.DEBUG,
            "tau (%s): %d Newton iterations, integral %.6g, %.2f s",
            self.production,
            iterations,
            integral,
            wall_time,
        )
        return TauSolution(
            tau=tau,
            newton_iterations=iterations,
            residual_history=result.residual_history,
            integral=float(integral),
            wall_time=wall_time,
        )

    def _cold_start(self, *, rtol: float, atol: float, max_iterations: int) -> int:
        """Write the cold-start guess into :attr:`tau`; returns the Newton steps it took."""
        if self.production == "frozen":
            self.tau.x.array[:] = 0.0
            return 0
        # tau = 0 solves the coupled equation too, and Newton started near it stalls or lands
        # on that trivial branch. Where production balances destruction locally, frozen gives
        # tau_f^(1+p) ~ c sqrt(tau_p) and coupled tau_c^(1+p) ~ c sqrt(tau_c), hence
        # tau_c^(p+1/2) ~ tau_f^(1+p) / sqrt(tau_p). tau_p plays no role in the coupled
        # equation; it only sets the level of the frozen solve.
        guess_level = self.tau_p if self.tau_p > 0 else 0.001
        if self._frozen_solver is None:
            self._frozen_solver = TauSolver(
                self.V,
                self._inputs["velocity"],
                self._inputs["strain_rate"],
                self._inputs["wall_distance"],
                self._facet_tags,
                self._spec,
                production="frozen",
                tau_p=guess_level,
                constraint=self.constraint,
                petsc_options=self._petsc_options,
                **self._coefficients,
            )
        frozen = self._frozen_solver.solve(rtol=rtol, atol=atol, max_iterations=max_iterations)
        exponent = self._coefficients["reaction_exponent"]
        level = np.maximum(frozen.tau.x.array, 0.0) ** (1.0 + exponent)
        self.tau.x.array[:] = (level / np.sqrt(guess_level)) ** (1.0 / (exponent + 0.5))
        return frozen.newton_iterations


def solve_tau(
    V: fem.FunctionSpace,
    u: fem.Function | ufl.core.expr.Expr,
    strain_rate: fem.Function | ufl.core.expr.Expr,
    wall_distance: fem.Function | ufl.core.expr.Expr,
    facet_tags: dolfinx.mesh.MeshTags,
    spec: BoundarySpec,
    *,
    production: str = DEFAULT_PHYSICS.production,
    diffusivity: float = DEFAULT_PHYSICS.diffusivity,
    zeta: float = DEFAULT_PHYSICS.zeta,
    reaction_exponent: float = DEFAULT_PHYSICS.reaction_exponent,
    gamma: float = DEFAULT_PHYSICS.gamma,
    tau_p: float = DEFAULT_PHYSICS.tau_p,
    initial_guess: fem.Function | None = None,
    rtol: float = 1e-10,
    atol: float = 1e-13,
    max_iterations: int = 30,
    supg_length: str = DEFAULT_PHYSICS.supg_length,
    regularization: float = 1e-8,
    constraint=None,
    petsc_options: Mapping[str, object] | None = None,
) -> TauSolution:
    """Solve the steady tau equation of docs/physics.md on a scalar P1 space, once.

    ``u . grad(tau) - div(D grad tau) + zeta |tau|^p tau = gamma l_m sqrt(tau_P) |S|^2``,
    ``l_m = min(0.41 d, 0.135)``; tau = 0 on ``spec.dirichlet_tags``, zero flux on outlets,
    periodic on ``spec.periodic``. Repeated solves on one space (a coupled run) should keep a
    :class:`TauSolver` instead, which compiles the form and sets up the solver once.

    Args:
        V: scalar P1 space of tau.
        u: velocity, a (d,) vector Function (any space on V.mesh, e.g. P2) or UFL expression.
        strain_rate: |S|, a scalar Function (e.g. from
            :func:`solvers.fields.strain_rate_magnitude`) or UFL expression.
        wall_distance: d, a scalar Function (e.g. from
            :func:`solvers.fields.wall_distance_function`) or UFL expression.
        facet_tags: facet markers of V.mesh.
        spec: boundary roles of the tags.
        production: ``"frozen"`` (tau_P = tau_p) or ``"coupled"`` (tau_P = tau).
        diffusivity: D > 0.
        zeta: destruction coefficient.
        reaction_exponent: p of the destruction term (1: published data; 0.5 available).
        gamma: production coefficient.
        tau_p: frozen production level.
        initial_guess: starting tau (a Function; interpolated when not on V; periodic copies
            are averaged). Default: zero for "frozen". For "coupled" the default is built from
            the frozen solution tau_f as ``(tau_f^(1+p) / sqrt(tau_p))^(1/(p+1/2))`` (the
            local-equilibrium scaling between the two modes): tau = 0 solves the coupled
            problem too, and Newton started near it stalls or lands on that trivial branch.
        rtol: relative tolerance on the residual norm.
        atol: absolute tolerance on the residual norm.
        max_iterations: Newton iterations at most (per Newton solve).
        supg_length: element length of the SUPG parameter, ``"diameter"`` or ``"flow"``
            (:func:`element_length`).
        regularization: eps of :func:`regularized_sqrt`.
        constraint: a prebuilt PeriodicConstraint on V (built from spec when None and the spec
            is periodic); pass it when solving repeatedly on the same space.
        petsc_options: PETSc options of the Newton steps' linear solver, over the MUMPS LU
            defaults; None picks by size (:func:`solvers.linalg.default_solver_options`:
            GMRES with GAMG for large 3-D problems).

    Returns:
        TauSolution (its wall time includes the set-up).

    Raises:
        ValueError: NaN/inf inputs, unknown production mode, bad coefficients.
        SolverDivergedError: Newton failed.
    """
    start = time.perf_counter()
    with TauSolver(
        V,
        u,
        strain_rate,
        wall_distance,
        facet_tags,
        spec,
        production=production,
        diffusivity=diffusivity,
        zeta=zeta,
        reaction_exponent=reaction_exponent,
        gamma=gamma,
        tau_p=tau_p,
        supg_length=supg_length,
        regularization=regularization,
        constraint=constraint,
        petsc_options=petsc_options,
    ) as solver:
        solution = solver.solve(
            initial_guess=initial_guess, rtol=rtol, atol=atol, max_iterations=max_iterations
        )
    solution.wall_time = time.perf_counter() - start
    return solution
