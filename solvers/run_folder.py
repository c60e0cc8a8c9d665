"""The output folder of a generate or simulate run: checks, lock, and a record of every run.

A folder collects the runs made into it (several ``vcnn generate`` calls adding cases, a
``simulate`` run repeated): ``config.toml`` is the resolved configuration of the latest run
(``--config`` of the folder's ``config.toml`` repeats it), ``runs/<time>_<verb>.toml`` keeps
each run's, and ``summary.md`` gets one dated section per run, the latest last.
"""

from __future__ import annotations

from mpi4py import MPI

import contextlib
import datetime
import string
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from solvers.collective import on_root
from vcnn.atomic import atomic_write_text
from vcnn.config import dumps_toml, write_resolved_config
from vcnn.outputs import check_output_dir, check_output_owner, output_lock

__all__ = [
    "RUNS_FOLDER",
    "STAMP_FORMAT",
    "CaseProgress",
    "append_summary",
    "check_run_folder",
    "locked_run",
    "run_stamp",
]

#: Sub-folder of an output folder with the resolved configuration of each run.
RUNS_FOLDER = "runs"

_FLAG = "--out"


#: :func:`run_stamp`'s format: UTC to the microsecond, so that the records of runs made one
#: after the other sort in the order of the runs (in one second they did not).
STAMP_FORMAT = "%Y%m%dT%H%M%S.%fZ"


def run_stamp() -> str:
    """The start time of a run as it names its records: UTC, ``20261204T204312.250311Z``."""
    return datetime.datetime.now(datetime.UTC).strftime(STAMP_FORMAT)


def check_run_folder(output: Path, *, verb: str, overwrite: bool, comm: MPI.Comm) -> Callable:
    """Check that the run may write into ``output`` (collective; rank 0 looks).

    Returns:
        The owner check, to repeat under the lock (:func:`locked_run`).

    Raises:
        UsageError: the folder cannot be written or holds another verb's outputs (without
            ``overwrite``).
    """
    on_root(comm, lambda: check_output_dir(output, flag=_FLAG))

    def check_owner() -> None:
        check_output_owner(output, verb=verb, overwrite=overwrite, flag=_FLAG)

    on_root(comm, check_owner)
    return check_owner


@contextlib.contextmanager
def locked_run(
    output: Path,
    *,
    verb: str,
    resolved: Mapping[str, Any],
    check_owner: Callable[[], None],
    stamp: str,
    comm: MPI.Comm,
) -> Iterator[None]:
    """Hold the folder's lock for the run and record its configuration (collective).

    The first write of a run: under the lock the owner check is repeated, then the resolved
    configuration goes to ``config.toml`` (the latest run) and ``runs/<stamp>_<verb>.toml``.

    Args:
        output: the output folder.
        verb: ``generate`` or ``simulate`` (the table of the configuration).
        resolved: the run's resolved configuration (the ``[verb]`` table).
        check_owner: from :func:`check_run_folder`.
        stamp: the run's :func:`run_stamp` (agreed by the ranks).
        comm: the run's communicator.

    Raises:
        UsageError: another run holds the lock, or the owner check fails under it.
    """
    document = {verb: dict(resolved)}

    def record() -> None:
        write_resolved_config(output, document)
        history = output / RUNS_FOLDER / f"{stamp}_{verb}.toml"
        history.parent.mkdir(parents=True, exist_ok=True)
        # two runs of one stamp: both kept, and a letter after the stamp sorts after "_"
        letters = iter(string.ascii_lowercase)
        while history.exists():
            history = history.with_name(f"{stamp}{next(letters)}_{verb}.toml")
        atomic_write_text(history, dumps_toml(document))

    with output_lock(
        output,
        verb=verb,
        flag=_FLAG,
        then=check_owner,
        on_root=lambda action: on_root(comm, action),
    ):
        on_root(comm, record)
        yield


def append_summary(output: Path, table: str, *, verb: str, stamp: str) -> Path:
    """Add a run's table to ``summary.md`` as a dated section (rank 0; atomic).

    The earlier runs' sections are kept; a ``summary.md`` of an older version (a bare table)
    becomes the first section, headed "earlier run".

    Returns:
        The path of ``summary.md``.
    """
    path = output / "summary.md"
    try:
        earlier = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        earlier = ""
    if earlier and not earlier.startswith("## "):
        earlier = f"## earlier run\n\n{earlier}"
    when = datetime.datetime.strptime(stamp, STAMP_FORMAT).strftime("%Y-%m-%d %H:%M:%S UTC")
    section = f"## vcnn {verb}, {when}\n\n{table.strip()}"
    text = f"{earlier}\n\n{section}\n" if earlier else f"{section}\n"
    return atomic_write_text(path, text)


class CaseProgress:
    """A progress bar over a run's cases on a terminal (tqdm on stderr, rank 0).

    Only when stderr is a terminal; removed when the run ends. While it shows, log lines are
    written above it (:func:`tqdm.contrib.logging.logging_redirect_tqdm`), so the per-case
    lines are kept.
    """

    def __init__(self, total: int, *, verb: str, comm: MPI.Comm) -> None:
        self.enabled = comm.rank == 0 and total > 0 and _stderr_is_terminal()
        self.total = total
        self.verb = verb
        self._bar: Any = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> CaseProgress:
        if self.enabled:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._stack.enter_context(logging_redirect_tqdm())
            self._bar = self._stack.enter_context(
                tqdm(
                    total=self.total,
                    desc=self.verb,
                    unit="case",
                    leave=False,
                    file=sys.stderr,
                    dynamic_ncols=True,
                )
            )
        return self

    def start(self, name: str) -> None:
        """Show the case now running."""
        if self._bar is not None:
            self._bar.set_postfix_str(name)

    def done(self) -> None:
        """One more case finished (written, skipped or failed)."""
        if self._bar is not None:
            self._bar.update(1)

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._bar = None


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False
