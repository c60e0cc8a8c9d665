"""Shared PETSc helpers: direct solvers, converged-reason checks and the divergence error."""

from __future__ import annotations

from mpi4py import MPI

import itertools
import logging
from collections.abc import Mapping, Sequence

from petsc4py import PETSc

from vcnn.errors import received_signal

logger = logging.getLogger(__name__)

__all__ = [
    "SolverDivergedError",
    "check_linear_solve",
    "create_direct_solver",
    "default_solver_options",
    "destroy_solver",
    "format_history",
    "is_interrupt",
    "reason_name",
    "release_options",
    "solve_linear",
]

#: PETSc's error code for "signal received" (PETSC_ERR_SIG): its signal handler turned an
#: interrupt into an error, which must stop the run like Ctrl-C, not fail one case.
PETSC_ERR_SIG = 59

#: Defaults of :func:`create_direct_solver`: MUMPS LU with extra workspace, since the
#: fill-in estimate of saddle-point systems is often too small.
DIRECT_SOLVER_OPTIONS: dict[str, object] = {
    "ksp_type": "preonly",
    "pc_type": "lu",
    "pc_factor_mat_solver_type": "mumps",
    "mat_mumps_icntl_14": 100,
}

#: Iterative path of the Taylor-Hood (velocity-pressure) Newton systems: GMRES preconditioned
#: by a block low-rank (BLR) MUMPS LU of the same matrix, whose off-diagonal blocks are
#: compressed to the relative accuracy ``mat_mumps_cntl_7`` (ICNTL(35) = 2: compressed
#: factors in the solves too). GMRES restores the exact Newton step, so the discrete
#: solution is the direct solver's (to ``ksp_rtol``); the approximate factorisation is
#: insensitive to the cell Reynolds number, unlike the Schur-complement preconditioners
#: measured on the 3-D hill at Re = 100 (:data:`FIELDSPLIT_FLOW_OPTIONS`). Measured on the
#: hex hill (experiments/bench_solvers3d.py): 1-10 GMRES iterations per solve, and less time
#: and memory than plain MUMPS from about 60 k unknowns on (:data:`ITERATIVE_THRESHOLD_3D`).
ITERATIVE_FLOW_OPTIONS: dict[str, object] = {
    "ksp_type": "gmres",
    "ksp_gmres_restart": 100,
    "ksp_rtol": 1e-10,
    "ksp_atol": 1e-14,
    "ksp_max_it": 200,
    "pc_type": "lu",
    "pc_factor_mat_solver_type": "mumps",
    "mat_mumps_icntl_35": 2,
    "mat_mumps_cntl_7": 1e-3,
}

#: Fieldsplit path of the Taylor-Hood Newton systems, for low Reynolds numbers: FGMRES on a
#: lower Schur-complement fieldsplit, the velocity block by smoothed-aggregation AMG (GAMG;
#: the FEniCSx wheel's PETSc has no hypre) with the velocity dofs blocked per node and the
#: rigid translations as near-null space, the Schur complement preconditioned by the pressure
#: mass matrix ``-M_p / nu`` ("user": :class:`solvers.flow.FlowSolver` supplies it) with
#: Jacobi; with ``fieldsplit_p_pc_type mat`` it supplies the pressure convection-diffusion
#: (PCD) approximation instead (inner solvers under ``pcd_laplace_`` and ``pcd_mass_``).
#: Split names: ``u``, ``p``. Measured on the coarse 3-D hill (7 k unknowns): at Re = 10
#: it matches MUMPS to 1e-15 (73-139 iterations per solve; with exact blocks 125 for the
#: mass matrix, 45 for PCD); at Re = 100 (cell Reynolds number ~ 90) neither Schur
#: approximation converges in 1000 iterations even with exact velocity and pressure
#: solves (PCD: 339 and 944 in the first Newton steps; 540 at 48 k unknowns), nor does
#: ``selfp``, LSC, an augmented-Lagrangian grad-div velocity block or the Picard operator
#: as preconditioning matrix.
FIELDSPLIT_FLOW_OPTIONS: dict[str, object] = {
    "ksp_type": "fgmres",
    "ksp_gmres_restart": 200,
    "ksp_rtol": 1e-9,
    "ksp_atol": 1e-14,
    "ksp_max_it": 1000,
    "pc_type": "fieldsplit",
    "pc_fieldsplit_type": "schur",
    "pc_fieldsplit_schur_fact_type": "lower",
    "pc_fieldsplit_schur_precondition": "user",
    "fieldsplit_u_ksp_type": "preonly",
    "fieldsplit_u_pc_type": "gamg",
    "fieldsplit_u_pc_gamg_threshold": 0.02,
    "fieldsplit_u_mg_levels_ksp_type": "richardson",
    "fieldsplit_u_mg_levels_pc_type": "sor",
    "fieldsplit_p_ksp_type": "preonly",
    "fieldsplit_p_pc_type": "jacobi",
    "pcd_laplace_ksp_type": "preonly",
    "pcd_laplace_pc_type": "gamg",
    "pcd_mass_ksp_type": "preonly",
    "pcd_mass_pc_type": "jacobi",
}

#: Iterative path of scalar (tau) Newton systems: GMRES with GAMG.
ITERATIVE_SCALAR_OPTIONS: dict[str, object] = {
    "ksp_type": "gmres",
    "ksp_gmres_restart": 100,
    "ksp_rtol": 1e-10,
    "ksp_atol": 1e-15,
    "ksp_max_it": 1000,
    "pc_type": "gamg",
    "mg_levels_ksp_type": "richardson",
    "mg_levels_pc_type": "sor",
}

#: Global unknowns above which a 3-D system gets the iterative path by default (2-D systems
#: always get MUMPS: their LU fill stays moderate); None: never by default. Measured by
#: experiments/bench_solvers3d.py on the hex hill at Re = 100 (2 shared cores, serial unless
#: said): the flow's low-rank LU + GMRES path (:data:`ITERATIVE_FLOW_OPTIONS`) is slower
#: than plain MUMPS at 7-48 k unknowns (48 k: 213 s against 153 s, 1.01 GB against 1.07 GB;
#: two ranks 81 s against 82 s) and faster at 90 k (150 s against 240 s, 1.96 GB against
#: 2.23 GB): the flow switches at 60 k. The tau systems (GMRES with GAMG,
#: :data:`ITERATIVE_SCALAR_OPTIONS`) cost about the same as MUMPS at 1-4 k unknowns and less
#: from 15 k on (6.6 s against 12.4 s at 15 k, 12 s against 17 s at 48 k, 70 s against
#: 195 s at 157 k): tau switches at 10 k.
ITERATIVE_THRESHOLD_3D: dict[str, int | None] = {"flow": 60_000, "scalar": 10_000}

_prefix_counter = itertools.count()


class SolverDivergedError(RuntimeError):
    """A nonlinear or linear solve failed to converge.

    Attributes:
        history: residual norms of the iterations that ran (may be empty).
    """

    def __init__(self, message: str, history: Sequence[float] = ()) -> None:
        super().__init__(message)
        self.history = list(history)


def format_history(history: Sequence[float]) -> str:
    """One-line rendering of a residual history, e.g. ``0: 1.2e+01, 1: 3.4e-02``."""
    return ", ".join(f"{i}: {value:.3e}" for i, value in enumerate(history))


def create_direct_solver(
    comm: MPI.Comm,
    *,
    petsc_options: Mapping[str, object] | None = None,
    name: str = "direct",
) -> PETSc.KSP:
    """A KSP for LU with MUMPS, configured through a private options prefix.

    Args:
        comm: communicator of the operators it will solve.
        petsc_options: PETSc options (without prefix) that override the defaults
            :data:`DIRECT_SOLVER_OPTIONS`, e.g. ``{"mat_mumps_icntl_7": 5}``.
        name: readable part of the options prefix (the prefix gets a unique suffix).

    Returns:
        The KSP; set its operators with ``ksp.setOperators(A)``. Free it with
        :func:`destroy_solver`, which also removes its entries from the options table.
    """
    prefix = f"{name}_{next(_prefix_counter)}_"
    options = PETSc.Options()
    merged = {**DIRECT_SOLVER_OPTIONS, **(petsc_options or {})}
    for key, value in merged.items():
        options[f"{prefix}{key}"] = value
    ksp = PETSc.KSP().create(comm)
    ksp.setOptionsPrefix(prefix)
    # The entries stay in the options table: MUMPS reads its ICNTLs only at factorisation.
    ksp.setFromOptions()
    return ksp


def default_solver_options(*, kind: str, num_dofs: int, tdim: int) -> dict[str, object]:
    """The PETSc options a solver gets when its caller names none.

    Args:
        kind: "flow" (Taylor-Hood saddle point) or "scalar" (tau).
        num_dofs: global number of unknowns of the system.
        tdim: topological dimension of the mesh.

    Returns:
        ``{}`` (MUMPS LU, :data:`DIRECT_SOLVER_OPTIONS`) unless the mesh is 3-D and the system
        is larger than its :data:`ITERATIVE_THRESHOLD_3D` (when that is set: 60 k unknowns
        for the flow, 10 k for tau, as measured there); then :data:`ITERATIVE_FLOW_OPTIONS`
        or :data:`ITERATIVE_SCALAR_OPTIONS` (they override the direct defaults in
        :func:`create_direct_solver`).
    """
    if kind not in ITERATIVE_THRESHOLD_3D:
        raise ValueError(f"kind must be one of {sorted(ITERATIVE_THRESHOLD_3D)}, got {kind!r}")
    threshold = ITERATIVE_THRESHOLD_3D[kind]
    if tdim < 3 or threshold is None or num_dofs <= threshold:
        return {}
    return dict(ITERATIVE_FLOW_OPTIONS if kind == "flow" else ITERATIVE_SCALAR_OPTIONS)


def reason_name(enum: type, code: int) -> str:
    """The name of a PETSc enum value, found by scanning the enum (names change between versions).

    Names differ between versions (``DIVERGED_PC_FAILED`` is ``DIVERGED_PCSETUP_FAILED`` in
    PETSc 3.25); looking names up by value never refers to a name that a version may lack.

    Args:
        enum: e.g. ``PETSc.KSP.ConvergedReason`` or ``PETSc.PC.FailedReason``.
        code: the value.

    Returns:
        The names with that value joined by ``/`` (aliases exist), or the number as text.
    """
    names = sorted(
        name
        for name, value in vars(enum).items()
        if not name.startswith("_") and isinstance(value, int) and value == code
    )
    return "/".join(names) if names else str(code)


def release_options(prefix: str) -> None:
    """Remove every entry of the global PETSc options table that starts with ``prefix``.

    Solvers configured through a private prefix leave their entries in the table (MUMPS reads
    its ICNTLs at factorisation, so they must stay while the solver lives); their owner calls
    this when it destroys them, so that repeated solves do not grow the table.
    """
    if not prefix:
        return
    options = PETSc.Options()
    for key in list(options.getAll()):
        if key.startswith(prefix):
            options.delValue(key)


def destroy_solver(solver: PETSc.KSP | PETSc.SNES | None) -> None:
    """Destroy a KSP or SNES and remove its options (those under its prefix) from the table."""
    if solver is None:
        return
    prefix = solver.getOptionsPrefix() or ""
    solver.destroy()
    release_options(prefix)


def check_linear_solve(ksp: PETSc.KSP, *, context: str) -> None:
    """Raise when the last ``ksp.solve`` did not converge.

    Args:
        ksp: the solver just used.
        context: what was being solved (goes into the message).

    Raises:
        SolverDivergedError: for a negative converged reason, including a failed
            factorisation (``DIVERGED_PC_FAILED``, ``DIVERGED_PCSETUP_FAILED`` in PETSc 3.25),
            whose PC failure reason (e.g. a zero pivot) is named too.
    """
    reason = int(ksp.getConvergedReason())
    if reason >= 0:
        return
    detail = reason_name(PETSc.KSP.ConvergedReason, reason)
    pc_reason = ""
    failed = int(ksp.getPC().getFailedReason())
    if failed != 0:
        pc_reason = f" (PC failure {reason_name(PETSc.PC.FailedReason, failed)})"
    raise SolverDivergedError(
        f"linear solve of {context} failed: KSP converged reason {detail}{pc_reason}; "
        "the matrix may be singular (missing pressure pin or boundary condition)"
    )


def is_interrupt(error: BaseException) -> bool:
    """Whether an exception stands for an interrupt (Ctrl-C, SIGTERM) and must stop the run.

    True for a KeyboardInterrupt, a PETSc error with code PETSC_ERR_SIG (PETSc's signal
    handler caught the signal inside a PETSc call), an error caused by either (petsc4py turns
    a KeyboardInterrupt raised in a Python callback, e.g. a SNES residual, into a
    ``PETSc.Error`` whose cause it is), and any error once the process received SIGINT or
    SIGTERM (:func:`vcnn.errors.received_signal`): whatever it became on the way up, the run
    was interrupted and must stop, not fail one case.
    """
    if received_signal() is not None:
        return True
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, KeyboardInterrupt):
            return True
        if isinstance(error, PETSc.Error) and getattr(error, "ierr", None) == PETSC_ERR_SIG:
            return True
        error = error.__cause__ or error.__context__
    return False


def case_failure_message(error: Exception, case: str) -> str:
    """The one-line failure of one case of a run, unless ``error`` must end the whole run.

    Generate and simulate go on with the next case after a failed one; an interrupt
    (:func:`is_interrupt`) and a full disk (:func:`vcnn.outputs.is_disk_full`) end the run
    instead. Call it in the handler of the case's exception.

    Raises:
        KeyboardInterrupt: the run was interrupted (from ``error``).
        OSError: ``error`` itself, for a full disk or quota.
    """
    from vcnn.outputs import is_disk_full

    if is_interrupt(error):
        raise KeyboardInterrupt(f"interrupted in case {case}") from error
    if is_disk_full(error):
        raise error  # the run's end: one line naming the file; earlier outputs are kept
    return f"{type(error).__name__}: {error}"


def solve_linear(ksp: PETSc.KSP, rhs: PETSc.Vec, solution: PETSc.Vec, *, context: str) -> None:
    """``ksp.solve(rhs, solution)`` with the failures turned into :class:`SolverDivergedError`.

    A PETSc error inside the solve (e.g. MUMPS refusing a singular matrix) and a negative
    converged reason both raise SolverDivergedError; an interrupt raises KeyboardInterrupt.

    Raises:
        SolverDivergedError: the solve failed.
        KeyboardInterrupt: the process was interrupted during the solve.
    """
    try:
        ksp.solve(rhs, solution)
    except PETSc.Error as error:
        if is_interrupt(error):
            raise KeyboardInterrupt(f"interrupted during the linear solve of {context}") from error
        raise SolverDivergedError(f"linear solve of {context} failed: {error}") from error
    check_linear_solve(ksp, context=context)
