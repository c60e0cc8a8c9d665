"""Collective error handling: where rank 0 alone does I/O, every rank raises or none does.

Under ``mpiexec -n N`` the ranks run the same code, and a rank that raises while the others
wait in a collective (a barrier, a broadcast, a solve) deadlocks the run. Errors of collective
code are raised on every rank already (the solvers decide on global norms). The exceptions are
the places where rank 0 alone touches the file system: checking and writing the output folder,
reading an existing case file, writing a case file or a figure. :func:`on_root` runs such an
action on rank 0 and broadcasts its outcome, so that a failure there is raised on every rank.
"""

from __future__ import annotations

from mpi4py import MPI

import pickle
from collections.abc import Callable

__all__ = ["RootError", "on_root"]


class RootError(RuntimeError):
    """Stands on the other ranks for an error of rank 0 that could not be sent as it is."""


def on_root[T](
    comm: MPI.Comm, action: Callable[[], T], *, share_result: bool = False
) -> T | None:
    """Run ``action`` on rank 0 only; raise its error on every rank (collective).

    Args:
        comm: the communicator of the ranks that must agree.
        action: what rank 0 does (I/O); not called on the other ranks.
        share_result: broadcast the action's return value (it must pickle) to every rank.

    Returns:
        The action's return value on rank 0; on the other ranks the same value when
        ``share_result`` is set, else None.

    Raises:
        BaseException: rank 0 raises the action's own exception (with its traceback); the
            other ranks raise a copy of it (or a :class:`RootError` with its message when it
            does not pickle). A KeyboardInterrupt on rank 0 interrupts every rank.
    """
    error: BaseException | None = None
    result: T | None = None
    if comm.rank == 0:
        try:
            result = action()
        except BaseException as caught:  # noqa: BLE001 - every outcome must reach the others
            error = caught
    if comm.size == 1:
        if error is not None:
            raise error
        return result
    message = None
    if comm.rank == 0:
        message = (_portable(error), result if share_result and error is None else None)
    shared_error, shared_result = comm.bcast(message, root=0)
    if comm.rank == 0:
        if error is not None:
            raise error
        return result
    if shared_error is not None:
        raise shared_error
    return shared_result if share_result else None


def _portable(error: BaseException | None) -> BaseException | None:
    """The error itself when it survives pickling, else a RootError with its text."""
    if error is None:
        return None
    try:
        copy = pickle.loads(pickle.dumps(error))
        if isinstance(copy, BaseException) and str(copy) == str(error):
            return error
    except Exception:  # noqa: BLE001 - any pickling failure means: send the text instead
        pass
    return RootError(f"{type(error).__name__} on rank 0: {error}")
