"""PETSc helpers: a failed factorisation is a SolverDivergedError on every PETSc version."""

from mpi4py import MPI

import pytest
from petsc4py import PETSc

from solvers.linalg import (
    SolverDivergedError,
    check_linear_solve,
    create_direct_solver,
    is_interrupt,
    reason_name,
    solve_linear,
)


def _singular_system(n=6):
    matrix = PETSc.Mat().createAIJ([n, n], nnz=1, comm=MPI.COMM_SELF)
    for i in range(n):
        matrix.setValue(i, i, 0.0 if i == 2 else 1.0)  # a zero row: structurally singular LU
    matrix.assemble()
    rhs = matrix.createVecLeft()
    rhs.set(1.0)
    return matrix, rhs, rhs.duplicate()


def test_lu_of_a_singular_matrix_raises_solver_diverged_error():
    matrix, rhs, solution = _singular_system()
    ksp = create_direct_solver(MPI.COMM_SELF, name="singular")
    ksp.setOperators(matrix)
    with pytest.raises(SolverDivergedError, match="singular-test.*KSP converged reason DIVERGED_"):
        solve_linear(ksp, rhs, solution, context="singular-test")
    # the reason is named by value, whatever this PETSc version calls it
    reason = int(ksp.getConvergedReason())
    assert reason < 0
    names = {k for k, v in vars(PETSc.KSP.ConvergedReason).items() if v == reason}
    assert reason_name(PETSc.KSP.ConvergedReason, reason) == "/".join(sorted(names))
    with pytest.raises(SolverDivergedError, match="PC failure"):
        check_linear_solve(ksp, context="again")


def test_reason_names_never_raise_on_unknown_codes_or_renamed_members():
    class OldReasons:  # a version whose enum lacks today's names
        DIVERGED_PC_FAILED = -11
        CONVERGED_ITERATING = 0
        ITERATING = 0

    assert reason_name(OldReasons, -11) == "DIVERGED_PC_FAILED"
    assert reason_name(OldReasons, 0) == "CONVERGED_ITERATING/ITERATING"
    assert reason_name(OldReasons, -99) == "-99"
    assert reason_name(PETSc.KSP.ConvergedReason, -11) != "-11"


def test_interrupts_are_recognised_through_petsc_errors():
    assert is_interrupt(KeyboardInterrupt())
    assert is_interrupt(PETSc.Error(59))  # PETSC_ERR_SIG: PETSc caught a signal
    assert not is_interrupt(PETSc.Error(73))
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as error:
            raise RuntimeError("wrapped") from error
    except RuntimeError as wrapped:
        assert is_interrupt(wrapped)
    assert not is_interrupt(ValueError("x"))
