"""The command line's one error path: which errors are the user's, how they are reported.

Every verb of ``vcnn`` runs through :func:`run_verb`. An error that the user can fix (a bad
config value, a missing or corrupt file, an unusable output folder, a solver that did not
converge) is reported as one line naming the problem and the file or flag, with exit code 2 and
no traceback unless ``-v`` is given. Anything else is a bug: it is reported with its traceback
and exit code 1, never disguised as a user error. An interrupt (Ctrl-C, SIGTERM) stops the run
with exit code 130 or 143; complete outputs are kept.

Under ``mpiexec -n N`` (N > 1) an interrupt does not unwind the ranks: a rank that unwinds runs
collective cleanup (PETSc destructors, MPI_Finalize) while another rank, still blocked in a
collective that the signal did not interrupt, waits for it, and the job hangs. There the handler
of :func:`handle_interrupts` reports the one line and ends the whole job at once with
``MPI_Abort`` and the exit code 130 or 143 (see :func:`_end_every_rank`).

The user-facing error classes live in the modules that raise them; this module knows them by
name (:data:`USER_ERROR_CLASSES`) so that it imports none of them, and in particular nothing of
the FEM side: a class whose module was never imported cannot have been raised.
"""

from __future__ import annotations

import _thread
import errno
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger("vcnn")

#: Exit codes of the command line.
EXIT_OK = 0
EXIT_BUG = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

#: The one line an interrupted run prints.
INTERRUPTED_MESSAGE = "interrupted: complete outputs are kept; rerun the command to continue"

#: Under MPI, how long a rank other than 0 waits in its signal handler for rank 0 to report the
#: interrupt and end the job before it does so itself (rank 0 may be blocked in a collective
#: that waits for this rank, and then it cannot run its handler).
MPI_REPORT_GRACE_SECONDS = 1.0


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
            logger.error(INTERRUPTED_MESSAGE)
            if verbose:
                logger.error("%s", traceback.format_exc().rstrip())
        return interrupt_exit_code(error)
    except Exception as error:
        if received_signal() is not None:
            # a signal arrived and the code on the way wrapped its KeyboardInterrupt (a PETSc
            # callback turns it into a PETSc.Error): still an interrupt, not a failure
            if report:
                logger.error(INTERRUPTED_MESSAGE)
            return interrupt_exit_code(error)
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
    world = _mpi_world()
    if world is not None:
        world.Abort(code)


_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
_received_signal: int | None = None
_ending = False
_watching = False


def received_signal() -> int | None:
    """The first SIGINT/SIGTERM that :func:`handle_interrupts`' handler received, else None."""
    return _received_signal


def interrupt_exit_code(error: BaseException | None = None) -> int:
    """143 for SIGTERM, 130 for Ctrl-C: from the signal received, else from ``error``'s type.

    The signal decides when there was one: code on the way may have turned the handler's
    :class:`Terminated` into a plain KeyboardInterrupt (``raise KeyboardInterrupt(...) from``).
    """
    if _received_signal is not None:
        return EXIT_TERMINATED if _received_signal == signal.SIGTERM else EXIT_INTERRUPTED
    return EXIT_TERMINATED if isinstance(error, Terminated) else EXIT_INTERRUPTED


def handle_interrupts() -> None:
    """Install the handler of SIGINT (Ctrl-C) and SIGTERM in the main thread.

    Call it again after importing PETSc, whose own handler would otherwise abort the process
    on SIGTERM. In a serial run (or a single MPI rank) the handler raises KeyboardInterrupt for
    Ctrl-C and :class:`Terminated` for SIGTERM: the run stops like Ctrl-C, keeping complete
    outputs (writes are atomic), and :func:`run_verb` exits with 130 or 143. Under MPI with
    more than one rank it ends the whole job instead (:func:`_end_every_rank`).
    """
    try:
        for signum in _SIGNALS:
            signal.signal(signum, _on_interrupt)
    except ValueError:  # not the main thread (e.g. main() called from a worker thread)
        return
    if _mpi_world() is not None:
        _watch_signals()


def _watch_signals() -> None:
    """Under MPI: take SIGINT/SIGTERM in a thread of their own, never inside MPI or MUMPS.

    A signal delivered while a rank is inside a MUMPS factorization crashed it (SIGSEGV in
    MUMPS's analysis, 1 in 5 trials), whatever the handler did. So the signals are blocked in
    every thread (threads started later inherit the mask; those MPI started were started
    under :func:`interrupts_deferred`) and a watcher thread takes them with ``sigwait`` and
    hands them to the main thread's handler (``_thread.interrupt_main``), which runs it when
    the main thread next runs Python code.
    """
    global _watching
    if _watching:
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)

    def watch() -> None:
        while True:
            _thread.interrupt_main(signal.sigwait(_SIGNALS))

    threading.Thread(target=watch, name="vcnn-signals", daemon=True).start()
    _watching = True


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Block SIGINT and SIGTERM in the ``with`` body; a signal that arrives is delivered after.

    Import MPI, PETSc and dolfinx in such a block and call :func:`handle_interrupts` at its
    end: the threads they start (MPI's progress thread) inherit the blocked mask and never
    receive these signals, and a signal that arrived meanwhile reaches this module's handler,
    not PETSc's (which aborts the process). They go to the main thread or, under MPI, to the
    watcher thread of :func:`_watch_signals`.
    """
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    except (AttributeError, OSError, ValueError):  # no pthread_sigmask on this platform
        yield
        return
    try:
        yield
    finally:
        if not _watching:  # else they stay blocked here: the watcher thread takes them
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def reset_interrupts() -> None:
    """Forget a received signal (for a second run in the same process, e.g. in tests)."""
    global _received_signal, _ending
    _received_signal = None
    _ending = False


def _on_interrupt(signum: int, frame: Any) -> None:
    """The handler of SIGINT and SIGTERM (see :func:`handle_interrupts`)."""
    global _received_signal
    if _received_signal is None:
        _received_signal = signum
    world = _mpi_world()
    if world is not None:
        _end_every_rank(world, signum)
    if signum == signal.SIGTERM:
        raise Terminated(f"signal {signum}")
    raise KeyboardInterrupt


def _mpi_world() -> Any:
    """MPI_COMM_WORLD when mpi4py is initialized and the job has more than one rank, else None."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
        return None
    return mpi.COMM_WORLD if mpi.COMM_WORLD.size > 1 else None


def _end_every_rank(world: Any, signum: int) -> None:
    """Report an interrupt once and end every rank of the MPI job with 130 or 143.

    ``mpiexec`` forwards SIGINT and SIGTERM to every rank, but a rank blocked in a collective
    runs its Python handler only when the collective returns, which may be never: unwinding the
    ranks that did run it (raising KeyboardInterrupt) deadlocks. So nothing unwinds: rank 0
    reports and calls ``MPI_Abort``, which makes ``mpiexec`` kill every rank at once and exit
    with this code. The other ranks wait :data:`MPI_REPORT_GRACE_SECONDS` for that (rank 0 may
    be blocked in a collective waiting for them) and then report and abort themselves. MPI's
    own abort message is silenced; our one line is printed before it. Complete outputs are
    kept (writes are atomic; an interrupted write may leave its hidden temporary file).
    """
    global _ending
    if _ending:
        return  # a second signal while waiting for rank 0: the first handler ends this rank
    _ending = True
    code = EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED
    if world.rank != 0:
        time.sleep(MPI_REPORT_GRACE_SECONDS)  # rank 0's abort normally kills this rank here
    logger.error(INTERRUPTED_MESSAGE)
    for handler in logging.getLogger().handlers + logger.handlers:
        handler.flush()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:  # MPI_Abort prints its own line: not ours to show
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, 2)
    except OSError:
        pass
    try:
        world.Abort(code)
    finally:
        os._exit(code)
