"""The command line's one error path: which errors are the user's, how they are reported.

Every verb of ``vcnn`` runs through :func:`run_verb`. An error that the user can fix (a bad
config value, a missing or corrupt file, an unusable output folder, a solver that did not
converge) is reported as one line naming the problem and the file or flag, with exit code 2 and
no traceback unless ``-v`` is given. Anything else is a bug: it is reported with its traceback
and exit code 1, never disguised as a user error. An interrupt (Ctrl-C, SIGTERM) stops the run
with exit code 130 or 143; complete outputs are kept.

The user-facing error classes live in the modules that raise them; this module knows them by
name (:data:`USER_ERROR_CLASSES`) so that it imports none of them, and in particular nothing of
the FEM side: a class whose module was never imported cannot have been raised.
"""

from __future__ import annotations

import errno
import logging
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("vcnn")

#: Exit codes of the command line.
EXIT_OK = 0
EXIT_BUG = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class UserError(Exception):
    """An error whose message is the whole story for the user (reported without traceback)."""


class UsageError(UserError, ValueError):
    """Bad command-line usage: a bad flag value, conflicting flags, an unusable output path."""


class TrainingDivergedError(UserError, RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (raised in the main thread, like Ctrl-C's interrupt)."""


#: (module, class name) of the user-facing error classes defined outside this module.
USER_ERROR_CLASSES: tuple[tuple[str, str], ...] = (
    ("vcnn.config", "ConfigError"),
    ("vcnn.casefile", "CaseFileError"),
    ("vcnn.checkpoint", "CheckpointError"),
    ("vcnn.datasets", "DatasetError"),
    ("vcnn.expressions", "ExpressionError"),
    ("vcnn.network", "CloudInputError"),
    ("vcnn.physics", "PhysicsMismatchError"),
    ("meshes.tagged", "MeshError"),
    ("solvers.linalg", "SolverDivergedError"),
    ("solvers.periodic", "PeriodicPairingError"),
    ("solvers.flow_sources", "FlowSourceError"),
)

#: errno values of OS errors that are about a path or the file system, not about the code.
_PATH_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.EACCES,
        errno.EPERM,
        errno.EEXIST,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EROFS,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.ENAMETOOLONG,
        errno.ELOOP,
        errno.EXDEV,
    }
)


def user_error_types() -> tuple[type[BaseException], ...]:
    """The user-facing error classes of the modules imported so far."""
    found: list[type[BaseException]] = [UserError]
    for module_name, class_name in USER_ERROR_CLASSES:
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


def is_path_error(error: BaseException) -> bool:
    """Whether ``error`` is an OS error about a path or the file system (the user's to fix)."""
    return isinstance(error, OSError) and (
        error.errno in _PATH_ERRNOS
        or isinstance(error, FileNotFoundError | PermissionError | NotADirectoryError)
        or isinstance(error, IsADirectoryError | FileExistsError)
    )


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is reported as a one-line message (see the module docstring)."""
    return isinstance(error, user_error_types()) or is_path_error(error)


def one_line(error: BaseException) -> str:
    """The error's message on one line, with the file name of an OS error."""
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror
        if error.filename is not None:
            text += f": {str(error.filename)!r}"
        if error.filename2 is not None:
            text += f" -> {str(error.filename2)!r}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def run_verb(
    handler: Callable[[Any], int], args: Any, *, verbose: bool, report: bool = True
) -> int:
    """Run a verb's handler and turn what it raises into an exit code and a message.

    Args:
        handler: the verb, called with ``args``; returns its exit code.
        args: the parsed command line.
        verbose: show the traceback of user errors too.
        report: log the messages (False on the MPI ranks other than 0, which raise the same
            errors: one report is enough).

    Returns:
        The exit code: the handler's, 2 for a user error, 130/143 for an interrupt, 1 for a bug.
    """
    try:
        return handler(args)
    except KeyboardInterrupt as error:
        if report:
            logger.error("interrupted: complete outputs are kept; rerun the command to continue")
            if verbose:
                logger.error("%s", traceback.format_exc().rstrip())
        return EXIT_TERMINATED if isinstance(error, Terminated) else EXIT_INTERRUPTED
    except Exception as error:
        if is_user_error(error):
            if report:
                if verbose:
                    logger.error("%s", traceback.format_exc().rstrip())
                logger.error("error: %s", one_line(error))
            return EXIT_USER_ERROR
        # A bug: the full traceback, always, and never the look of a user error.
        logger.critical(
            "internal error (a bug in vcnn, please report it with this traceback):\n%s",
            traceback.format_exc().rstrip(),
        )
        _abort_other_ranks(EXIT_BUG)
        return EXIT_BUG


def _abort_other_ranks(code: int) -> None:
    """Under MPI, a bug on one rank must not leave the others waiting in a collective."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        world = mpi.COMM_WORLD
        if world.size > 1:
            world.Abort(code)


def raise_on_sigterm() -> None:
    """Turn SIGTERM into :class:`Terminated` (a KeyboardInterrupt) in the main thread.

    Call it after importing PETSc, whose own handler would otherwise abort the process: with
    this handler, a SIGTERM stops the run the way Ctrl-C does, leaving complete outputs only
    (writes are atomic).
    """

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(f"signal {signum}")

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. main() called from a worker thread)
        pass
