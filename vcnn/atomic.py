"""Atomic file writes: a temporary file in the target folder, fsync, then a rename.

An interrupted run never leaves a half-written file under the target name: readers see the old
file or the new one. A full disk (or quota) is reported as an OSError with errno ENOSPC/EDQUOT
that names the target file, whatever the writing library raised; the old file is kept.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from vcnn.outputs import disk_full_error


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[BinaryIO], object],
    *,
    validate: Callable[[Path], object] | None = None,
) -> Path:
    """Write a file atomically.

    Args:
        path: target path; its folder is created when missing.
        write: called with a binary stream to the temporary file.
        validate: called with the path of the complete temporary file before it replaces the
            target; when it raises, the temporary file is removed, the target is left as it
            was, and the error propagates.

    Returns:
        The target path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
    except OSError as error:
        _raise_if_disk_full(error, path)
        raise
    try:
        try:
            with os.fdopen(descriptor, "wb") as stream:
                write(stream)
                stream.flush()
                os.fsync(stream.fileno())
        except Exception as error:
            # before the temporary file is removed: its bytes are what filled the disk
            _raise_if_disk_full(error, path)
            raise
        if validate is not None:
            validate(Path(temporary))
        # mkstemp creates 0600 files; give the result the permissions of an ordinary new file
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _raise_if_disk_full(error: Exception, path: Path) -> None:
    """Raise an OSError (ENOSPC/EDQUOT) naming ``path`` when ``error`` is a full disk.

    A plain write reports it without a file name, torch and HDF5 as a RuntimeError; the
    run must end with one line naming the file (see :func:`vcnn.outputs.disk_full_error`).
    """
    full = disk_full_error(error, path)
    if full is not None:
        raise full from error


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda stream: stream.write(text.encode()))
