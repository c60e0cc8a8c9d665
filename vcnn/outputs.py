"""Checks of output paths before a verb computes anything: one clear message, nothing written.

A verb checks its output folder (or file) first, so that a typo in ``--out``, a path that is a
file, or a folder it may not write fails at once with a message naming the flag and the path,
instead of as a traceback after minutes of work. The checks create nothing: writability is
probed with a temporary file in the nearest existing folder, which is removed at once (the only
reliable test on read-only mounts and for the root user, for whom permission bits say nothing).

The module is also the one home of the rules that keep one run from destroying another's
results:

* ownership (:func:`check_output_owner`): a verb refuses a folder that holds another verb's
  primary outputs unless ``--overwrite`` is given;
* the lock (:class:`OutputLock`, :func:`output_lock`): one run at a time per output folder;
* full disks (:func:`is_disk_full`, :func:`disk_full_error`): a full disk ends the run with
  one line naming the file, never as one case's failure.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from vcnn.errors import UsageError

logger = logging.getLogger(__name__)


def check_output_dir(path: str | os.PathLike, *, flag: str) -> Path:
    """Check that ``path`` is, or can be created as, a writable folder.

    Args:
        path: the output folder.
        flag: how the user gave it (``"--out"``, ``"the case folder"`` ...), named in messages.

    Returns:
        The path.

    Raises:
        UsageError: when the path or one of its parents is a file, or the folder cannot be
            written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {str(path)!r} is a file, not a folder")
    _check_writable(_nearest_existing(path, flag=flag), path, flag=flag)
    return path


def check_output_file(
    path: str | os.PathLike, *, flag: str, not_same_as: str | os.PathLike | None = None
) -> Path:
    """Check that a file can be written at ``path`` (its folder may still be missing).

    Args:
        path: the output file.
        flag: how the user gave it, named in messages.
        not_same_as: an input file that must not be overwritten by this output.

    Returns:
        The path.

    Raises:
        UsageError: when the path is a folder, equals ``not_same_as``, or cannot be written.
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {str(path)!r} is a folder; give a file name")
    if not_same_as is not None and _same_file(path, Path(not_same_as)):
        raise UsageError(
            f"{flag} {str(path)!r} is the input file itself; write to another file"
        )
    _check_writable(_nearest_existing(path.parent, flag=flag), path, flag=flag)
    return path


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _nearest_existing(path: Path, *, flag: str) -> Path:
    """The path itself or its nearest existing parent; a parent that is a file is an error."""
    for candidate in (path, *path.absolute().parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise UsageError(
                    f"{flag} {str(path)!r} cannot be created: {str(candidate)!r} is a file"
                )
            return candidate
    return Path("/")  # pragma: no cover - the root always exists


def _check_writable(folder: Path, path: Path, *, flag: str) -> None:
    try:
        descriptor, probe = tempfile.mkstemp(dir=folder, prefix=".vcnn-write-test-")
    except OSError as error:
        reason = error.strerror or type(error).__name__
        where = "" if folder == path else f" (in {str(folder)!r})"
        raise UsageError(f"{flag} {str(path)!r} is not writable{where}: {reason}") from error
    os.close(descriptor)
    os.unlink(probe)


# ------------------------------------------------------------------------------ ownership
#: The verbs whose outputs mark a folder as theirs (``plot`` and ``export`` own no folder).
OWNING_VERBS = ("generate", "simulate", "train", "evaluate")
#: The largest ``meta`` of a case file or ``metrics.json`` read to tell whose it is (bytes).
_MAX_RECORD_BYTES = 16 * 2**20


def output_owners(folder: str | os.PathLike) -> dict[str, Path]:
    """Which verbs' primary outputs ``folder`` holds, each with one file that shows it.

    The evidence, read from the folder's top level only (nothing is written):

    * ``config.toml``: the resolved config every verb but evaluate writes has one top-level
      table named after the verb (``[generate]``, ``[simulate]``, ``[train]``);
    * case files (``*.npz``): their ``meta`` has a ``simulate`` key when ``vcnn simulate``
      wrote them, else they are generate's (training data);
    * ``last.pt`` / ``best.pt`` / ``lcurve.tsv``: a training run (as :mod:`vcnn.training.resume`);
    * ``metrics.json``: simulate's entries have ``coupling``, evaluate's ``rel_l2_percent``.

    Files that cannot be read or classified are nobody's (they are not vcnn outputs).

    Args:
        folder: the output folder; a missing one holds nothing.

    Returns:
        Verb name -> a file of that verb (the first found), in no particular order.
    """
    from vcnn.training.resume import RUN_FILES  # torch: imported only when a folder is inspected

    folder = Path(folder)
    if not folder.is_dir():
        return {}
    owners: dict[str, Path] = {}
    for name in RUN_FILES:
        if (folder / name).is_file():
            owners.setdefault("train", folder / name)
            break
    metrics = folder / "metrics.json"
    verb = _metrics_verb(metrics)
    if verb is not None:
        owners.setdefault(verb, metrics)
    for path in sorted(folder.glob("*.npz")):
        if "generate" in owners and "simulate" in owners:
            break
        if path.name.startswith(".") or not path.is_file():
            continue
        meta = _case_meta(path)
        if meta is not None:
            owners.setdefault("simulate" if "simulate" in meta else "generate", path)
    config = folder / "config.toml"  # the record of a run that may have written nothing else
    verb = _config_verb(config)
    if verb is not None:
        owners.setdefault(verb, config)
    return owners


def check_output_owner(
    folder: str | os.PathLike,
    *,
    verb: str,
    overwrite: bool,
    flag: str = "--out",
    continuing: bool = False,
) -> None:
    """Refuse a folder with another verb's primary outputs unless ``--overwrite`` is given.

    The outputs are found by :func:`output_owners`. A verb adding to its own folder is allowed
    (generate adds cases, simulate replaces its cases, evaluate its metrics; train's own rules
    are :func:`vcnn.training.resume.check_run_folder`).

    Args:
        folder: the output folder.
        verb: the verb that is about to write there.
        overwrite: the user's ``--overwrite`` (or config key): write there anyway.
        flag: how the user gave the folder, named in the message.
        continuing: the run continues this verb's earlier run in the folder (train's
            ``--resume``): when the folder holds that run, what else it holds was accepted when
            the run began.

    Raises:
        UsageError: one line naming the folder, the other verb, a file of it and
            ``--overwrite``.
    """
    if overwrite:
        return
    owners = output_owners(folder)
    if continuing and verb in owners:
        return
    others = {name: path for name, path in owners.items() if name != verb}
    if not others:
        return
    other, evidence = next(iter(sorted(others.items())))
    raise UsageError(
        f"{flag} {str(folder)!r} holds the outputs of vcnn {other} ({evidence.name}); vcnn "
        f"{verb} would write over them: give another {flag}, or --overwrite to write there anyway"
    )


def _config_verb(path: Path) -> str | None:
    import tomllib

    try:
        if not path.is_file() or path.stat().st_size > _MAX_RECORD_BYTES:
            return None
        tables = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    found = [name for name in OWNING_VERBS if isinstance(tables.get(name), dict)]
    return found[0] if len(found) == 1 else None


def _metrics_verb(path: Path) -> str | None:
    import json

    try:
        if not path.is_file() or path.stat().st_size > _MAX_RECORD_BYTES:
            return None
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
        return None
    if "coupling" in entries[0]:
        return "simulate"
    if "rel_l2_percent" in entries[0]:
        return "evaluate"
    return None


def _case_meta(path: Path) -> dict | None:
    """The ``meta`` of a case file, read alone (bounded); None when it is not one."""
    import json
    import zipfile

    import numpy as np

    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("meta.npy")
            if info.file_size > _MAX_RECORD_BYTES:
                return None
            with archive.open(info) as stream:
                meta = json.loads(str(np.lib.format.read_array(stream, allow_pickle=False)))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    return meta if isinstance(meta, dict) else None


# ------------------------------------------------------------------------------ the lock
#: The lock file of a run in its output folder (removed when the run ends).
LOCK_NAME = ".vcnn.lock"
#: errno values of file systems that do not lock (some network mounts): run unlocked, warned.
_NO_LOCKS_ERRNOS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS})


class OutputLock:
    """An exclusive ``flock`` on ``<folder>/.vcnn.lock`` for the length of a run.

    The lock file records the holder (``pid``, verb, host) once the lock is held; a second
    run into the folder is refused at once with the holder's pid. The kernel releases the
    lock when the process ends in any way; :meth:`release` also removes the file (and the
    folder, when this lock created it and nothing else was written there). Taking the lock
    creates the folder: take it after the run's input is validated, right before its first
    write, so that a refused run leaves nothing behind.

    Args:
        folder: the output folder.
        verb: the verb of the run (recorded for the message of a refused run).
        flag: how the user gave the folder, named in messages.
        then: called once the lock is held (e.g. :func:`check_output_owner` again, now that
            no other run can write); when it raises, the lock is released.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        verb: str,
        flag: str = "--out",
        then: Callable[[], object] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.verb = verb
        self.flag = flag
        self.then = then
        self._descriptor: int | None = None
        self._created: list[Path] = []

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._descriptor is not None

    def acquire(self) -> None:
        """Create the folder when missing and take the lock.

        Raises:
            UsageError: another run holds the lock (naming the folder and its pid).
            OSError: the folder or the lock file cannot be created.
        """
        if self.held:
            return
        self._created = _make_folders(self.folder)
        try:
            descriptor = self._lock()
            if descriptor >= 0:  # else a file system without locks (warned)
                self._descriptor = descriptor
                record = f"pid={os.getpid()} verb={self.verb} host={socket.gethostname()}\n"
                os.ftruncate(descriptor, 0)
                os.pwrite(descriptor, record.encode(), 0)
            if self.then is not None:
                self.then()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Remove the lock file and release the lock (a no-op when it is not held)."""
        descriptor, self._descriptor = self._descriptor, None
        if descriptor is not None:
            try:
                self.path.unlink(missing_ok=True)  # while held: nobody can be using it
            finally:
                os.close(descriptor)
        for folder in reversed(self._created):
            try:
                folder.rmdir()  # only when this run wrote nothing there
            except OSError:
                break
        self._created = []

    def _lock(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW  # never a planted link
        while True:
            descriptor = os.open(self.path, flags, 0o644)
            try:
                if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                    raise UsageError(
                        f"{self.flag} {str(self.folder)!r}: {LOCK_NAME} is not a regular file; "
                        "remove it"
                    )
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                raise UsageError(
                    f"{self.flag} {str(self.folder)!r} is in use by another run "
                    f"({_holder(self.path)}); wait for it to end, or give another {self.flag}"
                ) from None
            except OSError as error:
                os.close(descriptor)
                if error.errno not in _NO_LOCKS_ERRNOS:
                    raise
                logger.warning(
                    "cannot lock %s (%s): running without the lock; make sure no other run "
                    "writes there",
                    self.folder,
                    error.strerror,
                )
                return -1
            except BaseException:
                os.close(descriptor)
                raise
            # The previous holder removes the file on release: make sure we locked the file
            # that is there now, not one that was unlinked between our open and our flock.
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            opened = os.fstat(descriptor)
            if current is not None and (current.st_dev, current.st_ino) == (
                opened.st_dev,
                opened.st_ino,
            ):
                return descriptor
            os.close(descriptor)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


@contextmanager
def output_lock(
    folder: str | os.PathLike,
    *,
    verb: str,
    flag: str = "--out",
    then: Callable[[], object] | None = None,
    on_root: Callable[[Callable[[], object]], object] | None = None,
) -> Iterator[OutputLock]:
    """Hold an :class:`OutputLock` on ``folder`` for the ``with`` block.

    Args:
        folder: the output folder.
        verb: the verb of the run.
        flag: how the user gave the folder, named in messages.
        then: called once the lock is held (see :class:`OutputLock`).
        on_root: under MPI, runs the acquisition on rank 0 and raises its errors on every
            rank (``lambda action: solvers.collective.on_root(comm, action)``); the other
            ranks hold nothing.
    """
    lock = OutputLock(folder, verb=verb, flag=flag, then=then)
    (on_root or _call)(lock.acquire)
    try:
        yield lock
    finally:
        lock.release()


def _call(action: Callable[[], object]) -> object:
    return action()


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those created, outermost first."""
    missing = []
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    folder.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def _holder(path: Path, *, attempts: int = 20) -> str:
    """Who holds the lock, from its file (written just after the holder took it)."""
    for _ in range(attempts):
        try:
            fields = dict(
                part.split("=", 1) for part in path.read_text().split() if "=" in part
            )
        except OSError:
            fields = {}
        if "pid" in fields:
            where = f" on {fields['host']}" if fields.get("host") else ""
            return f"vcnn {fields.get('verb', '?')}, pid {fields['pid']}{where}"
        time.sleep(0.05)
    return "pid unknown"


# ------------------------------------------------------------------------------ full disks
#: errno values of a full disk or an exhausted quota.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: Free space (bytes) below which a failed write is taken for a full disk.
_NEARLY_FULL_BYTES = 1 << 20


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) is a full disk or quota.

    Such an error ends the run (one line naming the file): it is never one case's failure.
    """
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False


def disk_full_error(error: BaseException, path: str | os.PathLike) -> OSError | None:
    """The full-disk error that ``error`` stands for while writing ``path``, or None.

    Libraries report a full disk in their own words (HDF5 and torch raise a RuntimeError;
    a plain ``write`` gives an OSError without a file name). This returns an OSError with
    errno ENOSPC/EDQUOT that names ``path`` (``one_line`` prints
    ``No space left on device: '<path>'``) when ``error`` is one, or when any error
    happened on a file system that has (next to) no space left.

    Args:
        error: what the write raised.
        path: the file being written (named in the message).
    """
    code = next(
        (e.errno for e in _chain(error) if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS),
        None,
    )
    if code is None and _nearly_full(Path(path).parent):
        code = errno.ENOSPC
    if code is None:
        return None
    return OSError(code, os.strerror(code), str(path))


def _chain(error: BaseException) -> Iterator[BaseException]:
    for _ in range(10):
        if error is None:
            return
        yield error
        error = error.__cause__ or error.__context__


def _nearly_full(folder: Path) -> bool:
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    blocks = stats.f_bfree if os.geteuid() == 0 else stats.f_bavail
    return blocks * stats.f_frsize < _NEARLY_FULL_BYTES
