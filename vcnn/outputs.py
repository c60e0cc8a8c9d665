"""Checks of output paths before a verb computes anything: one clear message, nothing written.

A verb checks its output folder (or file) first, so that a typo in ``--out``, a path that is a
file, or a folder it may not write fails at once with a message naming the flag and the path,
instead of as a traceback after minutes of work. The checks create nothing: writability is
probed with a temporary file in the nearest existing folder, which is removed at once (the only
reliable test on read-only mounts and for the root user, for whom permission bits say nothing).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from vcnn.errors import UsageError


def check_output_dir(path: str | os.PathLike, *, flag: str) -> Path:
    """Check that ``path`` is, or can be created as, a writable folder.

    Args:
        path: the output folder.
        flag: how the user gave it (``"--out"``, ``"out_dir"`` ...), named in messages.

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
