"""Shared PETSc helpers: direct solvers, converged-reason checks and the divergence error."""

from __future__ import annotations

from mpi4py import MPI

import itertools
import logging
from collections.abc import Mapping, Sequence

from petsc4py import PETSc

logger = logging.getLogger(__name__)

__all__ = [
    "SolverDivergedError",
    "check_linear_solve",
    "create_direct_solver",
    "format_history",
]

#: Defaults of :func:`create_direct_solver`: MUMPS LU with extra workspace, since the
#: fill-in estimate of saddle-point systems is often too small.
DIRECT_SOLVER_OPTIONS: dict[str, object] = {
    "ksp_type": "preonly",
    "pc_type": "lu",
    "pc_factor_mat_solver_type": "mumps",
    "mat_mumps_icntl_14": 100,
}

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
        The KSP; set its operators with ``ksp.setOperators(A)``.
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


def check_linear_solve(ksp: PETSc.KSP, *, context: str) -> None:
    """Raise when the last ``ksp.solve`` did not converge.

    Args:
        ksp: the solver just used.
        context: what was being solved (goes into the message).

    Raises:
        SolverDivergedError: for a negative converged reason (including a failed
            factorisation, which PETSc reports as ``DIVERGED_PC_FAILED``).
    """
    reason = ksp.getConvergedReason()
    if reason < 0:
        names = {v: k for k, v in vars(PETSc.KSP.ConvergedReason).items() if isinstance(v, int)}
        detail = names.get(reason, str(reason))
        pc_reason = ""
        if reason == PETSc.KSP.ConvergedReason.DIVERGED_PC_FAILED:
            pc_reason = f" (PC failure reason {ksp.getPC().getFailedReason()})"
        raise SolverDivergedError(
            f"linear solve of {context} failed: KSP converged reason {detail}{pc_reason}; "
            "the matrix may be singular (missing pressure pin or boundary condition)"
        )
