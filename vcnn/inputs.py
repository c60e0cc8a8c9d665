"""Checks of input paths before anything opens them.

Opening a FIFO blocks until a writer appears and reading a device may never end, so a path
the user gives as an input file (a config, a mesh, a flow source) is checked with ``os.stat``
(which opens nothing) to be a regular file, or a folder where one is expected, before it is
read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from vcnn.errors import UsageError

__all__ = ["check_regular_input"]

_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "FIFO (named pipe)"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


def check_regular_input(
    path: str | os.PathLike[str],
    *,
    what: str,
    flag: str | None = None,
    allow_dir: bool = False,
    error: type[Exception] = UsageError,
) -> Path:
    """Refuse an input path that is missing or not a regular file (or folder, if allowed).

    Symbolic links are followed: a link to a regular file is a regular file.

    Args:
        path: the input path.
        what: what the path is, first words of the message (e.g. ``"flow source"``).
        flag: the flag or config key that gave it, put after the path in the message.
        allow_dir: a folder is a valid input (e.g. an OpenFOAM case).
        error: the exception class to raise (the caller's user-error class).

    Returns:
        The path, as a :class:`pathlib.Path`.

    Raises:
        error: naming the path: it does not exist, cannot be examined, is a folder (unless
            allowed), or is a FIFO, socket or device.
    """
    path = Path(path)
    where = f"{what} {str(path)!r}" + (f" ({flag})" if flag else "")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{where} does not exist") from None
    except OSError as failure:
        raise error(f"{where} cannot be examined: {failure.strerror or failure}") from None
    if stat.S_ISREG(mode) or (allow_dir and stat.S_ISDIR(mode)):
        return path
    if stat.S_ISDIR(mode):
        raise error(f"{where} is a folder, not a file")
    kind = next((name for test, name in _SPECIAL_KINDS if test(mode)), "special file")
    expected = "a regular file or a folder" if allow_dir else "a regular file"
    raise error(f"{where} is a {kind}, not {expected}: give a file that can be read")
