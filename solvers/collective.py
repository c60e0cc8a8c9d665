"""Collective error handling: where rank 0 alone does I/O, every rank raises or none does.

Under ``mpiexec -n N`` the ranks run the same code, and a rank that raises while the others
wait in a collective (a barrier, a broadcast, a solve) deadlocks the run. Errors of collective
code are raised on every rank already (the solvers decide on global norms). The exceptions are
the places where rank 0 alone touches the file system: checking and writing the output folder,
reading an existing case file, writing a case file or a figure. :func:`on_root` runs such an
action on rank 0 and broadcasts its outcome, so that a failure there is raised on every rank.

Before the collective work starts, every rank parses its own command line and config file:
:func:`config_agreement` is the point where the ranks compare what they resolved (a hash of the
configuration) and share a user error that only some ranks raised (one rank's ``--config`` file
missing), so that a bad input on any rank ends every rank with exit code 2 and one message.
"""

from __future__ import annotations

from mpi4py import MPI

import hashlib
import json
import pickle
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from vcnn.errors import UsageError, is_user_error, one_line

__all__ = ["ConfigAgreement", "RootError", "config_agreement", "config_digest", "on_root"]


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


def config_digest(document: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a resolved configuration (sorted keys, hex).

    Args:
        document: the configuration as a dict (``config.to_dict()``); values that JSON does not
            know (paths) are written as their ``str``.
    """
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class ConfigAgreement:
    """The agreement point of a run under MPI (see :func:`config_agreement`).

    Attributes:
        reached: whether :meth:`agree` or :meth:`fail` ran (the ranks have met).
    """

    def __init__(self, comm: MPI.Comm, *, verb: str) -> None:
        self.comm = comm
        self.verb = verb
        self.reached = False

    def agree(self, config: Mapping[str, Any]) -> None:
        """Compare this rank's resolved configuration with the other ranks' (collective).

        Args:
            config: the resolved configuration (``config.to_dict()``).

        Raises:
            UsageError: on every rank, when another rank failed before this point or the ranks
                resolved different configurations (naming the first keys that differ).
        """
        document = {"verb": self.verb, **config}
        self._meet(config_digest(document), None, document)

    def fail(self, error: BaseException) -> None:
        """Join the agreement with this rank's user error (collective); always raises.

        Raises:
            BaseException: ``error`` itself on the ranks that raised it; a UsageError with its
                message on the others.
        """
        self._meet(None, error, None)
        raise error  # not reached: _meet raised

    def _meet(
        self, digest: str | None, error: BaseException | None, document: dict | None
    ) -> None:
        self.reached = True
        if self.comm.size == 1:
            if error is not None:
                raise error
            return
        message = None if error is None else one_line(error)
        shared = self.comm.allgather((digest, message))
        failed = [(rank, text) for rank, (_, text) in enumerate(shared) if text is not None]
        if failed:
            if error is not None:
                raise error  # this rank's own error (and its traceback under -v)
            rank, text = failed[0]
            others = f" (and {len(failed) - 1} other ranks)" if len(failed) > 1 else ""
            raise UsageError(f"MPI rank {rank}{others}: {text}")
        digests = {value for value, _ in shared}
        if len(digests) > 1:
            documents = self.comm.allgather(document)
            raise UsageError(
                "the MPI ranks were given different configurations: "
                f"{_differences(documents)}; give every rank the same command line and config"
            )


@contextmanager
def config_agreement(comm: MPI.Comm, *, verb: str) -> Iterator[ConfigAgreement]:
    """Where the ranks of a run agree on their configuration before any collective work.

    Every rank parses its own command line and config file, so a bad input may fail on some
    ranks only, while the others go on into a collective and wait forever. Resolve the
    configuration inside the ``with`` block and end it with ``agreement.agree(config)``:
    every rank reaches that allgather, with its configuration's hash or with the user error it
    raised in the block, and every rank then raises the same user error (exit code 2, reported
    once by rank 0): the first failing rank's message, or "the MPI ranks were given different
    configurations". Errors that are not user errors (bugs) are not caught: the bug path of
    :func:`vcnn.errors.run_verb` aborts every rank.

    Usage::

        with config_agreement(MPI.COMM_WORLD, verb="generate") as agreement:
            config = GenerateConfig.from_dict(...)
            agreement.agree(config.to_dict())

    Args:
        comm: the communicator of the run (collective over it).
        verb: the command's verb; part of what the ranks compare.

    Raises:
        UserError: see above (on every rank).
    """
    agreement = ConfigAgreement(comm, verb=verb)
    try:
        yield agreement
    except Exception as error:
        if agreement.reached or not is_user_error(error):
            raise
        agreement.fail(error)
    if not agreement.reached:
        raise RuntimeError("config_agreement: the block ended without agreement.agree()")


def _differences(documents: list[dict]) -> str:
    """The first keys in which a rank's document differs from rank 0's, as one phrase."""
    reference = _flatten(documents[0])
    for rank, document in enumerate(documents[1:], start=1):
        flat = _flatten(document)
        keys = sorted(key for key in reference.keys() | flat.keys()
                      if reference.get(key) != flat.get(key))
        if keys:
            shown = ", ".join(
                f"{key} = {flat.get(key)!r} (rank 0: {reference.get(key)!r})" for key in keys[:3]
            )
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            return f"rank {rank} differs from rank 0 in {shown}{more}"
    return "the ranks' configurations hash differently"


def _flatten(document: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}`` (values compared as JSON would write them)."""
    flat: dict[str, Any] = {}
    for key, value in document.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = json.loads(json.dumps(value, default=str))
    return flat
