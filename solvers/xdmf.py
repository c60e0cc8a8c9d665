"""XDMF output of generate and simulate: mesh and named fields, written atomically as a pair."""

from __future__ import annotations

from mpi4py import MPI

import contextlib
import errno
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from solvers.collective import on_root
from vcnn.outputs import disk_full_error

logger = logging.getLogger(__name__)

__all__ = ["write_xdmf"]


def write_xdmf(path: Path, mesh, functions: Mapping[str, Any]) -> None:
    """Mesh and named fields in one XDMF file for ParaView (fields interpolated to P1).

    Atomic, as a pair (collective over ``mesh.comm``): dolfinx writes ``<name>.xdmf`` and the
    ``<name>.h5`` it names, so both are written under their final names into a private
    temporary folder beside them (``.<name>.*.xdmf-tmp``, made by rank 0, written by every
    rank), checked (the .xdmf must reference ``<name>.h5``), flushed to disk, and renamed into
    place by rank 0, the .h5 first. After the call the folder holds the new pair, or (on a
    failure before the renames) what it held before, or (a failure between the two renames)
    neither; never a partial .h5 and never the temporary folder. HDF5's own error stack is
    kept off the terminal (it is logged at debug level).

    Args:
        path: the ``.xdmf`` file to write.
        mesh: the dolfinx mesh.
        functions: field name -> dolfinx Function.

    Raises:
        OSError: ENOSPC/EDQUOT naming ``path`` when the disk (or quota) is full.
    """
    from dolfinx import fem, io

    comm = mesh.comm
    outputs = []
    for name, function in functions.items():
        shape = function.function_space.value_shape
        space = fem.functionspace(mesh, ("Lagrange", 1, shape))
        p1 = fem.Function(space, name=name)
        p1.interpolate(function)
        outputs.append(p1)
    h5 = path.with_suffix(".h5")

    def make_folder() -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return tempfile.mkdtemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".xdmf-tmp")
        except OSError as error:
            full = disk_full_error(error, path)
            if full is None:
                raise
            raise full from error

    folder = Path(on_root(comm, make_folder, share_result=True))
    staged, staged_h5 = folder / path.name, folder / h5.name
    try:
        failure: Exception | None = None
        with _captured_stderr() as captured:
            try:
                with io.XDMFFile(comm, str(staged), "w") as stream:
                    stream.write_mesh(mesh)
                    for function in outputs:
                        stream.write_function(function)
            except Exception as error:  # decided together below: every rank raises or none
                failure = error
        full = disk_full_error(failure, path) if failure is not None else None
        if comm.allreduce(full is not None, op=MPI.LOR):
            if comm.rank == 0:
                logger.debug("HDF5 reported:\n%s", captured.text())
            raise full or OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        if comm.allreduce(failure is not None, op=MPI.LOR):
            if comm.rank == 0:
                logger.debug("HDF5 reported:\n%s", captured.text())
            raise failure or RuntimeError(f"writing {str(path)!r} failed on another rank")
        captured.replay()

        def publish() -> None:
            text = staged.read_text(encoding="utf-8")
            if f">{h5.name}:/" not in text or not staged_h5.is_file():
                raise RuntimeError(f"the XDMF file {str(staged)!r} does not reference {h5.name}")
            try:
                for written in (staged_h5, staged):
                    descriptor = os.open(written, os.O_RDONLY)
                    try:
                        os.fsync(descriptor)
                    finally:
                        os.close(descriptor)
            except OSError as error:
                full = disk_full_error(error, path)
                if full is None:
                    raise
                raise full from error
            os.replace(staged_h5, h5)
            try:
                os.replace(staged, path)
            except BaseException:
                try:  # finish the pair (an interrupt between the renames) ...
                    os.replace(staged, path)
                except OSError:  # ... or take the new .h5 away with the .xdmf it would break
                    h5.unlink(missing_ok=True)
                    path.unlink(missing_ok=True)
                raise

        on_root(comm, publish)
    finally:
        if comm.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)


class _CapturedStderr:
    """What was written to file descriptor 2 while it was captured (see below)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def text(self) -> str:
        if self.stream is None:
            return ""
        self.stream.seek(0)
        return self.stream.read().decode(errors="replace")

    def replay(self) -> None:
        """Write what was captured to stderr (a successful write's warnings stay visible)."""
        text = self.text()
        if text:
            sys.stderr.write(text)
        if self.stream is not None:
            self.stream.close()


@contextlib.contextmanager
def _captured_stderr() -> Iterator[_CapturedStderr]:
    """Send file descriptor 2 to a temporary file (HDF5 prints dozens of lines per error)."""
    try:
        stream = tempfile.TemporaryFile()
        saved = os.dup(2)
    except OSError:  # no room for it: let HDF5 print
        yield _CapturedStderr(None)
        return
    sys.stderr.flush()
    os.dup2(stream.fileno(), 2)
    try:
        yield _CapturedStderr(stream)
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
