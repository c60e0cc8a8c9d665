"""C kernels: compiled once per source and machine, cached on disk, loaded with ctypes.

The kernels of :mod:`vcnn.engines.fused_clouds` (inference), :mod:`vcnn.engines.fused_rows` (training) and
:mod:`vcnn.engines.fused_mlp` (point embedding) are C files in ``vcnn/engines/csrc`` (:data:`CSRC`);
:func:`c_source` puts a header of ``#define``s (the sizes and options of one net
architecture) in front of one of them, with the folder's headers inlined. Per-model numbers
(weights, normaliser statistics, region and cutoff constants) are arguments at run time, so one
library serves every model of one architecture. This module compiles a source with the system C
compiler (``$CC``, else ``cc``), keeps the shared library in a per-user cache and loads it once
per process. Any failure raises :class:`KernelUnavailable`, whose message says why, and is
remembered for the process; callers then use their torch implementation and warn once
(:func:`warn_unavailable`). ``VCNN_KERNELS=0`` turns the kernels off everywhere.

What the cache guarantees:

* **Location.** ``$VCNN_CACHE_DIR/kernels``, else ``$XDG_CACHE_HOME/vcnn/kernels``, else
  ``~/.cache/vcnn/kernels``. The toolkit's own folders (``kernels``, and ``vcnn`` in the last
  two cases) are created with mode 0700.
* **Checks before anything is loaded.** The toolkit's folders are examined with ``os.lstat``:
  each must be a real directory (not a symbolic link), owned by the effective user and not
  writable by group or others; the folders above them (resolved) must be owned by the user or
  root and, when writable by group or others, sticky. A library and its integrity record must be
  regular files (not links), owned by the user and not writable by group or others. A folder that
  fails is never used and never repaired (no chmod): a warning names it and says why.
* **No shared fallback.** When the cache folder is unusable, the kernels are built into a fresh
  private folder made by :func:`tempfile.mkdtemp` for this process (mode 0700, unpredictable
  name) and removed at exit; when that fails too, :class:`KernelUnavailable` (torch runs).
* **Key.** A library is named after the sha256 of the source, the compiler flags, the link
  libraries (``-lm``, the OpenMP flag), the compiler's absolute path (as found and resolved), its
  identity (the output of ``--version`` and ``-dumpmachine``, asked once per process) and the
  CPU's instruction-set flags (the code is built with ``-march=native``).
* **Integrity.** A library is compiled in a private scratch folder inside the cache, checked (not
  empty, a shared library's magic bytes, ELF on Linux), and moved into place atomically next to
  ``<name>.sha256``, the sha256 of its bytes. Before ``ctypes`` maps a cached library, its bytes
  must match that record, so a truncated, empty, foreign or modified file is never mapped (no
  SIGBUS).
* **Rebuild once.** A cached library of ours that fails a check, does not match its record, does
  not load (serial build) or lacks a symbol the caller needs is deleted (with its record) and
  rebuilt once; if the rebuild fails too, :class:`KernelUnavailable`. A file owned by someone
  else is neither loaded nor deleted (the private folder is used instead). An OpenMP build that
  the process cannot load falls back to the serial build (no rebuild).
* **Bounded.** At most ``VCNN_CACHE_MAX_ENTRIES`` libraries (default 64) are kept: each load
  touches the library's times, and the least recently used beyond the bound are deleted with
  their records (best effort, never failing a load).
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import importlib.resources
import logging
import os
import platform
import re
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "ACTIVATIONS",
    "CSRC",
    "C_FUNCTIONS",
    "ENTRY_LANES",
    "GROUP",
    "KernelUnavailable",
    "MlpShape",
    "activation_define",
    "bind",
    "c_file",
    "c_source",
    "cache_key",
    "compiled_library",
    "even_parts",
    "kernel_cache_dir",
    "library_path",
    "mlp_layers",
    "mlp_layer_defines",
    "split_queries",
    "warn_unavailable",
]

#: Compiler flags. No -ffast-math: NaN and inf must propagate. OpenMP: the kernels' threads
#: come from the OpenMP runtime torch has loaded (the same libgomp.so.1), so they never compete
#: with torch's spinning threads; without OpenMP support the kernels are built serial.
_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-shared", "-fPIC")
_OPENMP = ("-fopenmp",)
_LINK = ("-lm",)

#: Default bound on the cached libraries (``VCNN_CACHE_MAX_ENTRIES``).
MAX_ENTRIES = 64


class KernelUnavailable(RuntimeError):
    """A C kernel cannot run on this machine or for this net (the message says why)."""


_LIBRARIES: dict[str, ctypes.CDLL | KernelUnavailable] = {}
_LOCK = threading.Lock()


def compiled_library(source: str, *, symbols: Sequence[str] = ()) -> ctypes.CDLL:
    """The loaded library of a C source, built once per process (and cached on disk).

    Args:
        source: the C source.
        symbols: the functions the caller looks up; a cached library without them is rebuilt.

    Raises:
        KernelUnavailable: no C compiler, the build failed, or the library lacks ``symbols``
            (remembered for the process).
    """
    if os.environ.get("VCNN_KERNELS", "").strip().lower() in ("0", "off", "no", "false"):
        raise KernelUnavailable("the C kernels are turned off (VCNN_KERNELS)")
    with _LOCK:
        known = _LIBRARIES.get(source)
        if known is None:
            try:
                known = _build(source, tuple(symbols))
            except KernelUnavailable as error:
                known = error
            _LIBRARIES[source] = known
    if isinstance(known, KernelUnavailable):
        raise known
    missing = _missing(known, symbols)
    if missing:
        raise KernelUnavailable(f"the kernel has no {', '.join(missing)}")
    return known


_WARNED: set[tuple[str, str]] = set()


def warn_unavailable(log: logging.Logger, what: str, error: KernelUnavailable) -> None:
    """Warn once per process and reason that a kernel does not run and torch takes over."""
    key = (what, str(error))
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning("%s unavailable (%s); using torch operations", what, error)


def split_queries(offsets: torch.Tensor, parts: int) -> torch.Tensor:
    """(P + 1,) int64 bounds of P ranges of rows (queries) of about equal entry counts.

    Args:
        offsets: (Q + 1,) int64 row offsets.
        parts: at most this many ranges.
    """
    queries = offsets.numel() - 1
    parts = max(1, min(parts, queries))
    targets = np.linspace(0, int(offsets[-1]), parts + 1)[1:-1]
    cuts = np.searchsorted(offsets.numpy(), targets)
    bounds = [0, *sorted({int(c) for c in cuts} - {0, queries}), max(queries, 0)]
    return torch.tensor(bounds, dtype=torch.int64)


def even_parts(count: int, parts: int | None = None) -> torch.Tensor:
    """(P + 1,) int64 bounds of P about equal ranges of ``count`` items (P: torch's threads)."""
    parts = max(1, min(parts or torch.get_num_threads(), max(count, 1)))
    return torch.tensor([round(count * p / parts) for p in range(parts + 1)], dtype=torch.int64)


class _Unsafe(OSError):
    """A path that fails the ownership or mode checks and is not ours to repair or delete."""


class _Broken(Exception):
    """A cached library of ours that must be deleted and rebuilt (the message says why)."""


#: The first bytes of a shared library: ELF (Linux), Mach-O 64-bit (macOS).
_MAGIC = (b"\x7fELF", b"\xcf\xfa\xed\xfe")
#: Scratch folders of interrupted builds older than this (seconds) are removed.
_STALE_SCRATCH = 86400.0


def _cache_layout() -> tuple[Path, list[Path]]:
    """The folder the user chose (or the cache home), and the toolkit's folders in it."""
    if os.environ.get("VCNN_CACHE_DIR"):
        root = Path(os.path.abspath(os.environ["VCNN_CACHE_DIR"]))
        return root, [root / "kernels"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = Path(os.path.abspath(base))
    return root, [root / "vcnn", root / "vcnn" / "kernels"]


def kernel_cache_dir() -> Path:
    """Where compiled kernels are kept between processes (module docstring)."""
    return _cache_layout()[1][-1]


_NOTED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _NOTED:
        _NOTED.add(message)
        logger.warning("%s", message)


def _check_private(path: Path, info: os.stat_result, *, folder: bool) -> None:
    """Raise :class:`_Unsafe` unless ``info`` (``os.lstat`` of ``path``) is private to this user.

    Private: a real directory (``folder``) or regular file, not a symbolic link, owned by the
    effective user and not writable by group or others.
    """
    kind = "directory" if folder else "regular file"
    if stat.S_ISLNK(info.st_mode):
        raise _Unsafe(f"{path} is a symbolic link, not a {kind}")
    if not (stat.S_ISDIR if folder else stat.S_ISREG)(info.st_mode):
        raise _Unsafe(f"{path} is not a {kind}")
    if info.st_uid != os.geteuid():
        raise _Unsafe(f"{path} is owned by uid {info.st_uid}, not by this user ({os.geteuid()})")
    if info.st_mode & 0o022:
        raise _Unsafe(
            f"{path} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o}; "
            "make it private with chmod go-w, or set VCNN_CACHE_DIR)"
        )


def _check_ancestors(folder: Path) -> None:
    """Raise :class:`_Unsafe` when another user could replace ``folder`` or its parents."""
    real = Path(os.path.realpath(folder))
    for path in (real, *real.parents):
        info = os.stat(path)
        if info.st_uid not in (os.geteuid(), 0):
            raise _Unsafe(f"{path} (holding the kernel cache) is owned by uid {info.st_uid}")
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            raise _Unsafe(
                f"{path} (holding the kernel cache) is writable by group or others and not sticky"
            )


def _cache_folder() -> Path:
    """The per-user cache folder, its toolkit folders created 0700 and all checked.

    Raises:
        OSError: the folder cannot be made, or fails a check (:class:`_Unsafe`).
    """
    root, owned = _cache_layout()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_ancestors(root)
    for folder in owned:
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
        _check_private(folder, os.lstat(folder), folder=True)
    return owned[-1]


_PRIVATE: list[Path] = []  # this process's private build folder, once made


def _private_folder() -> Path:
    """A fresh private folder for this process (``mkdtemp``: 0700), removed at exit."""
    if not _PRIVATE:
        folder = Path(tempfile.mkdtemp(prefix="vcnn-build-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _PRIVATE.append(folder)
    folder = _PRIVATE[0]
    _check_ancestors(folder.parent)
    _check_private(folder, os.lstat(folder), folder=True)
    return folder


def _compiler() -> str:
    """The C compiler's absolute path (``$CC``, else ``cc``, ``gcc`` or ``clang``)."""
    compiler = os.environ.get("CC")
    if not compiler:
        compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    found = shutil.which(compiler) if compiler else None
    if found is None:
        raise KernelUnavailable(f"no C compiler found ({compiler or 'cc'}; install gcc or set CC)")
    return os.path.abspath(found)


@functools.cache
def _compiler_identity(compiler: str) -> str:
    """The output of ``compiler --version`` and ``-dumpmachine`` (asked once per process)."""
    lines = []
    for option in ("--version", "-dumpmachine"):
        try:
            result = subprocess.run([compiler, option], capture_output=True, text=True, timeout=60)
            output = result.stdout.strip() or result.stderr.strip()
            lines.append(f"{option}: {result.returncode} {output}")
        except (OSError, subprocess.SubprocessError) as error:
            lines.append(f"{option}: {error}")
    return "\n".join(lines)


def _machine_key() -> str:
    """The CPU's instruction-set flags (the kernel is built with -march=native)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def cache_key(source: str, *, compiler: str | None = None) -> str:
    """The cache key of a C source: 32 hex digits of a sha256 (module docstring says over what).

    Raises:
        KernelUnavailable: no C compiler (when ``compiler`` is not given).
    """
    compiler = compiler or _compiler()
    parts = [
        source, " ".join(_FLAGS), " ".join(_LINK), " ".join(_OPENMP), compiler,
        os.path.realpath(compiler), _compiler_identity(compiler), _machine_key(),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _library_name(key: str, *, threaded: bool) -> str:
    return f"kernel_{key}_omp.so" if threaded else f"kernel_{key}.so"


def library_path(source: str, *, threaded: bool = True) -> Path:
    """Where the library of ``source`` is cached (its OpenMP build, or its serial build).

    Raises:
        KernelUnavailable: no C compiler (the key covers the compiler).
    """
    return kernel_cache_dir() / _library_name(cache_key(source), threaded=threaded)


def _record(library: Path) -> Path:
    """The integrity record next to a library: the sha256 of its bytes, in hex."""
    return library.with_name(library.name + ".sha256")


def _missing(library: ctypes.CDLL, symbols: Sequence[str]) -> list[str]:
    return [name for name in symbols if not hasattr(library, name)]


def _build(source: str, symbols: tuple[str, ...]) -> ctypes.CDLL:
    compiler = _compiler()
    key = cache_key(source, compiler=compiler)
    try:
        return _load_or_compile(compiler, source, _cache_folder(), key, symbols)
    except OSError as error:  # an unusable cache folder, a file of someone else's in it
        reason = f"kernel cache not used: {error}"
    _warn_once(f"{reason}; building the kernels in a private temporary folder removed at exit")
    try:
        return _load_or_compile(compiler, source, _private_folder(), key, symbols)
    except OSError as error:
        raise KernelUnavailable(f"{reason}; private temporary folder: {error}") from error


def _load_or_compile(
    compiler: str, source: str, folder: Path, key: str, symbols: tuple[str, ...]
) -> ctypes.CDLL:
    """The library in a checked ``folder`` (OpenMP build, else serial build), built when missing.

    Raises:
        OSError: the folder cannot be written, or holds someone else's file under the name.
        KernelUnavailable: the compiler fails, or the rebuilt library does not work.
    """
    path = folder / _library_name(key, threaded=True)
    try:
        library = _cached_or_built(compiler, source, path, symbols, extra=_OPENMP)
    except KernelUnavailable as error:
        # no OpenMP for this compiler, or a runtime the process cannot bind: a serial build
        logger.info("using the kernel without OpenMP (%s)", error)
        path = folder / _library_name(key, threaded=False)
        library = _cached_or_built(compiler, source, path, symbols)
    _touch_and_evict(path)
    return library


def _cached_or_built(
    compiler: str,
    source: str,
    library: Path,
    symbols: tuple[str, ...],
    *,
    extra: tuple[str, ...] = (),
) -> ctypes.CDLL:
    """Load ``library`` when it passes every check; else delete it (ours), rebuild once, load."""
    try:
        return _load_checked(library, symbols, threaded=bool(extra))
    except FileNotFoundError:
        pass
    except _Broken as error:
        logger.warning("rebuilding the cached kernel %s (%s)", library, error)
        _remove(library)
    _compile(compiler, source, library, extra=extra)
    try:
        return _load_checked(library, symbols, threaded=bool(extra))
    except (_Broken, FileNotFoundError) as error:
        _remove(library)
        raise KernelUnavailable(f"the kernel built as {library} does not work ({error})") from error


def _load_checked(library: Path, symbols: tuple[str, ...], *, threaded: bool) -> ctypes.CDLL:
    """``ctypes.CDLL`` of a cached library, after the checks of the module docstring.

    Raises:
        FileNotFoundError: no library under the name.
        _Unsafe: the library or its record is someone else's (not deleted, not loaded).
        _Broken: ours but unusable (to be deleted and rebuilt).
        KernelUnavailable: an intact OpenMP build that this process cannot load.
    """
    info = os.lstat(library)
    record = _record(library)
    try:
        record_info = os.lstat(record)
    except FileNotFoundError:
        record_info = None
    for path, found in ((library, info), (record, record_info)):
        if found is not None and found.st_uid != os.geteuid():
            raise _Unsafe(f"{path} is owned by uid {found.st_uid}, not by this user")
    if record_info is None:
        raise _Broken("no integrity record")
    try:
        _check_private(library, info, folder=False)
        _check_private(record, record_info, folder=False)
    except _Unsafe as error:
        raise _Broken(str(error)) from error
    digest, head = _digest(library, info)
    if not head:
        raise _Broken("empty file")
    if not head.startswith(_MAGIC):
        raise _Broken("not a shared library")
    if digest != record.read_text().strip():
        raise _Broken("its bytes do not match its integrity record (truncated or modified)")
    try:
        loaded = ctypes.CDLL(str(library))
    except OSError as error:
        if threaded:
            raise KernelUnavailable(f"the OpenMP build does not load: {error}") from error
        raise _Broken(f"does not load: {error}") from error
    missing = _missing(loaded, symbols)
    if missing:
        _unload(loaded)
        raise _Broken(f"has no {', '.join(missing)}")
    return loaded


def _digest(library: Path, info: os.stat_result) -> tuple[str, bytes]:
    """The sha256 (hex) and first 4 bytes of the file ``info`` describes (no links followed)."""
    descriptor = os.open(library, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(descriptor, "rb") as stream:
        opened = os.fstat(stream.fileno())
        if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
            raise _Broken("replaced while being checked")
        data = stream.read()
    return hashlib.sha256(data).hexdigest(), data[:4]


def _unload(library: ctypes.CDLL) -> None:
    """Close (dlclose) a library not to be used, so that a rebuild under its name loads anew."""
    try:
        import _ctypes

        _ctypes.dlclose(library._handle)
    except (ImportError, AttributeError, OSError):
        pass


def _remove(library: Path) -> None:
    """Delete a library of ours and its record (best effort)."""
    for path in (library, _record(library)):
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            logger.debug("could not delete %s: %s", path, error)


def _max_entries() -> int:
    """The bound on cached libraries: ``VCNN_CACHE_MAX_ENTRIES`` (at least 1), else 64."""
    value = os.environ.get("VCNN_CACHE_MAX_ENTRIES", "").strip()
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            _warn_once(f"VCNN_CACHE_MAX_ENTRIES={value!r} is not a number; using {MAX_ENTRIES}")
    return MAX_ENTRIES


def _touch_and_evict(used: Path) -> None:
    """Mark ``used`` as just used; delete the least recently used libraries beyond the bound.

    Best effort: a failure is logged (debug) and never fails the load.
    """
    folder = used.parent
    try:
        os.utime(used, follow_symlinks=os.utime not in os.supports_follow_symlinks)
        libraries, now = [], os.path.getmtime(used)
        with os.scandir(folder) as entries:
            for entry in entries:
                info = entry.stat(follow_symlinks=False)
                if info.st_uid != os.geteuid():
                    continue
                if entry.name.startswith("kernel_") and entry.name.endswith(".so"):
                    if stat.S_ISREG(info.st_mode):
                        libraries.append((info.st_mtime_ns, entry.name))
                elif entry.name.startswith(".build-") and stat.S_ISDIR(info.st_mode):
                    if now - info.st_mtime > _STALE_SCRATCH:  # left by an interrupted build
                        shutil.rmtree(entry.path, ignore_errors=True)
        libraries.sort(reverse=True)
        for _, name in libraries[_max_entries():]:
            if name != used.name:
                _remove(folder / name)
    except OSError as error:
        logger.debug("kernel cache eviction skipped: %s", error)


def _compile(compiler: str, source: str, library: Path, *, extra: tuple[str, ...] = ()) -> None:
    """Compile ``source`` into ``library`` and its integrity record.

    The build happens in a private scratch folder next to ``library`` and both files are moved
    into place atomically (the record first): concurrent builders write the same files.
    """
    with tempfile.TemporaryDirectory(dir=library.parent, prefix=".build-") as scratch:
        source_path = Path(scratch) / "kernel.c"
        source_path.write_text(source)
        built = Path(scratch) / "kernel.so"
        try:
            result = subprocess.run(
                [compiler, *_FLAGS, *extra, str(source_path), "-o", str(built), *_LINK],
                capture_output=True,
                text=True,
                timeout=300,
            )
        except subprocess.SubprocessError as error:
            raise KernelUnavailable(f"compiling a kernel with {compiler}: {error}") from error
        if result.returncode != 0:
            message = (result.stderr or result.stdout).strip().splitlines()
            raise KernelUnavailable(
                f"compiling a kernel with {compiler} failed: "
                + (message[0] if message else f"exit status {result.returncode}")
            )
        data = built.read_bytes() if built.exists() else b""
        if not data.startswith(_MAGIC):
            raise KernelUnavailable(f"compiling a kernel with {compiler} gave no shared library")
        os.chmod(built, 0o700)
        record = Path(scratch) / "kernel.sha256"
        descriptor = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as stream:
            stream.write(hashlib.sha256(data).hexdigest() + "\n")
        os.replace(record, _record(library))
        os.replace(built, library)


#: Entries per step of the per-entry arithmetic (KernelSpec.entry_lanes), and hidden units
#: whose activations are evaluated together (KernelSpec.group). Measured on the published
#: model (2-core AMD EPYC, AVX-512): 8 x 2 took 0.64 s where 8 x 1 took 0.78 s, 16 x 1 0.65 s,
#: 8 x 4 and 32 x 1 over 1 s (register spills).
ENTRY_LANES = 8
GROUP = 2


@dataclass(frozen=True)
class MlpShape:
    """The shape of a pair-kernel MLP (:class:`vcnn.network.MLP`) as the C kernels see it.

    Attributes:
        layers: output width of each layer; the last is the number of kernels K.
        layer_inputs: input width of the first layer.
        residual: per layer, 0 (none), 1 (add the input) or 2 (add the input twice over).
        activate_last: whether the last layer is activated.
        activation: activation name.
        entry_lanes: entries per SIMD step (:data:`ENTRY_LANES`).
        group: hidden units whose activations run together (:data:`GROUP`): the exp is a long
            chain of dependent operations, and GROUP independent chains in program order keep
            the floating-point units busy.
    """

    layers: tuple[int, ...]
    layer_inputs: int
    residual: tuple[int, ...]
    activate_last: bool
    activation: str
    entry_lanes: int
    group: int

    @property
    def kernels(self) -> int:
        """Number of pair kernels K (the last layer's width)."""
        return self.layers[-1]

    @property
    def parameters(self) -> int:
        """Weights and biases of all layers (the flat layout: per layer, weight then bias)."""
        inputs = (self.layer_inputs, *self.layers[:-1])
        return sum(out * (size + 1) for size, out in zip(inputs, self.layers, strict=True))

    @classmethod
    def of(cls, mlp, activation: str) -> MlpShape:
        """The shape of an MLP with ``layers``, ``residual`` and ``activate_last``."""
        layers = tuple(layer.out_features for layer in mlp.layers)
        residual, previous = [], mlp.layers[0].in_features
        for index, out in enumerate(layers):
            activated = index < len(layers) - 1 or mlp.activate_last
            kind = 0
            if mlp.residual and activated:
                kind = 1 if out == previous else 2 if out == 2 * previous else 0
            residual.append(kind)
            previous = out
        return cls(
            layers=layers,
            layer_inputs=mlp.layers[0].in_features,
            residual=tuple(residual),
            activate_last=bool(mlp.activate_last),
            activation=activation,
            entry_lanes=ENTRY_LANES,
            group=GROUP,
        )

    def fields(self) -> dict:
        """The fields by name (to build a subclass instance from this shape)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def mlp_layers(shape: MlpShape) -> list[tuple[int, int, int, int, int, bool]]:
    """Per layer: index, input width, width, weight offset, bias offset, activated.

    The flat parameters hold, per layer, the weight (row-major) and then the bias.
    """
    layers, offset, size = [], 0, shape.layer_inputs
    for index, width in enumerate(shape.layers):
        bias = offset + width * size
        activated = index < len(shape.layers) - 1 or shape.activate_last
        layers.append((index, size, width, offset, bias, activated))
        offset, size = bias + width, width
    return layers


#: Activations with a C form (``vcnn_activation.h``).
ACTIVATIONS = ("silu", "tanh", "relu", "gelu", "softplus")

#: The kernels' C sources: ``.c`` files and the ``.h`` files they include.
CSRC = importlib.resources.files("vcnn") / "engines" / "csrc"

_INCLUDE = re.compile(r'^#include "([A-Za-z0-9_]+\.h)"[ \t]*$', re.MULTILINE)


@functools.cache
def c_file(name: str) -> str:
    """The text of a file of :data:`CSRC`, its ``#include "<header>"`` lines inlined.

    Each include of one of the folder's headers is replaced by the header's text (recursively;
    a header may be included more than once), so the source text covers every header.
    """
    text = (CSRC / name).read_text()
    return _INCLUDE.sub(lambda match: c_file(match.group(1)).rstrip("\n"), text)


def c_source(name: str, defines: Mapping[str, object]) -> str:
    """The C source of a kernel: ``#define``s (name -> value, None: no value), then ``name``.

    Args:
        name: a ``.c`` file of :data:`CSRC`.
        defines: what the file needs (its comments say which), in a fixed order, so that the
            text (the cache key of the library) is the same for the same defines.
    """
    lines = [f"#define {key}" + ("" if value is None else f" {value}") for key, value in defines.items()]
    return "\n".join(lines) + "\n" + c_file(name)


def activation_define(activation: str) -> str:
    """The ``VCNN_ACTIVATION_<NAME>`` that selects an activation in ``vcnn_activation.h``.

    Raises:
        KernelUnavailable: for an activation without a C form.
    """
    if activation not in ACTIVATIONS:
        raise KernelUnavailable(f"activation {activation!r} has no kernel form")
    return f"VCNN_ACTIVATION_{activation.upper()}"


def mlp_layer_defines(shape: MlpShape) -> dict[str, object]:
    """The layers of an MLP as ``vcnn_pair_mlp.h`` and ``mlp_rows.c`` read them (X-macro lists)."""
    entries = [
        f"X({index}, {'x' if index == 0 else f'h{index - 1}'}, {0 if index == 0 else f'd{index - 1}'}, "
        f"{size}, {width}, {weights}, {bias}, {int(activated)}, {shape.residual[index]})"
        for index, size, width, weights, bias, activated in mlp_layers(shape)
    ]
    return {
        "VCNN_MLP_LAYERS(X)": " ".join(entries),
        "VCNN_MLP_LAYERS_REVERSED(X)": " ".join(reversed(entries)),
        "VCNN_MLP_LAST": len(entries) - 1,
    }


_I64, _PTR = ctypes.c_int64, ctypes.c_void_p

#: The kernels' entry points: name -> (C file, argument types; int64_t: c_int64, pointers:
#: c_void_p). Each returns an int status (0: done). ``tests/test_csrc.py`` checks this table
#: against the prototypes in the files.
C_FUNCTIONS: dict[str, tuple[str, tuple[type, ...]]] = {
    "vcnn_fused_moments": ("fused_moments.c", (_I64, *[_PTR] * 16, _I64)),
    "vcnn_probe_exp": ("fused_moments.c", (_PTR, _PTR, _I64)),
    "vcnn_probe_activation": ("fused_moments.c", (_PTR, _PTR, _I64)),
    "vcnn_train_forward": ("training_rows.c", (_I64, _PTR, _I64, *[_PTR] * 12, _I64)),
    "vcnn_train_backward": (
        "training_rows.c", (_I64, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _I64)
    ),
    "vcnn_rows_forward": ("mlp_rows.c", (_I64, *[_PTR] * 6)),
    "vcnn_rows_backward": ("mlp_rows.c", (_I64, *[_PTR] * 5)),
    "vcnn_grid_nearest": ("cloud_quadrature.c", (_I64, *[_PTR] * 7, _I64, *[_PTR] * 3)),
    "vcnn_quadrature_clouds": (
        "cloud_quadrature.c", (_I64, *[_PTR] * 7, _I64, *[_PTR] * 7, _I64, *[_PTR] * 5)
    ),
}


def bind(library: ctypes.CDLL, name: str):
    """The entry point ``name`` of a library, its types set from :data:`C_FUNCTIONS`."""
    function = getattr(library, name)
    function.restype = ctypes.c_int
    function.argtypes = list(C_FUNCTIONS[name][1])
    return function
