"""Case files: the contract between the solvers and the network (one ``.npz`` per case).

A case holds nodal data at the points where the closure lives (P1 degrees of freedom of a
finite-element solve, or cell centres of a finite-volume code):

==================  ========  ===========================================================
key                 shape     meaning
==================  ========  ===========================================================
``points``          (N, d)    coordinates
``velocity``        (N, d)    flow velocity
``tau``             (N,)      closure variable (training target)
``strain_rate``     (N,)      abs(S) = sqrt(2 S:S)
``wall_distance``   (N,)      distance to the nearest wall
``nodal_volume``    (N,)      quadrature weight of the point
``is_wall``         (N,)      bool, point on a wall
``period``          (d,)      periodic lengths, 0 where not periodic
``meta``            ()        JSON string (alpha, mesh, physics constants, statistics, ...)
==================  ========  ===========================================================

Further keys may be added (kept in :attr:`Case.extra`); none of these may change meaning.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vcnn.atomic import atomic_write

REQUIRED_KEYS: tuple[str, ...] = (
    "points",
    "velocity",
    "tau",
    "strain_rate",
    "wall_distance",
    "nodal_volume",
    "is_wall",
    "period",
    "meta",
)
_NODAL_SCALARS = ("tau", "strain_rate", "wall_distance", "nodal_volume")
#: Fewest points of a case: fewer cannot hold a cloud of neighbours and a target to learn.
MIN_POINTS = 10


class CaseFileError(ValueError):
    """A case file is missing, corrupt or violates the case-file contract."""


@dataclass
class Case:
    """One solved case: nodal fields at the closure points.

    Attributes:
        points: (N, d) float64 coordinates.
        velocity: (N, d) float64 flow velocity.
        tau: (N,) float64 closure variable.
        strain_rate: (N,) float64 abs(S).
        wall_distance: (N,) float64 distance to the nearest wall.
        nodal_volume: (N,) float64 quadrature weight per point.
        is_wall: (N,) bool, True on a wall.
        period: (d,) float64 periodic lengths, 0 where not periodic.
        meta: JSON-serialisable metadata.
        extra: further (N, ...) or global arrays stored beside the contract keys.
        name: case name (the file stem).
    """

    points: np.ndarray
    velocity: np.ndarray
    tau: np.ndarray
    strain_rate: np.ndarray
    wall_distance: np.ndarray
    nodal_volume: np.ndarray
    is_wall: np.ndarray
    period: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    name: str = "case"

    def __post_init__(self) -> None:
        validate_case(self)

    @property
    def num_points(self) -> int:
        """Number of closure points N."""
        return int(self.points.shape[0])

    @property
    def dim(self) -> int:
        """Spatial dimension d."""
        return int(self.points.shape[1])

    def tau_integral(self) -> float:
        """Integral of tau by the nodal quadrature, sum_i V_i tau_i."""
        return float(np.dot(self.nodal_volume, self.tau))


def validate_case(case: Case) -> None:
    """Check shapes, dtypes and finiteness of a case in place (arrays are normalised).

    Raises:
        CaseFileError: naming the offending key and what was expected.
    """
    points = np.asarray(case.points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] not in (2, 3):
        raise CaseFileError(f"points must have shape (N, 2) or (N, 3), got {points.shape}")
    n, d = points.shape
    if n == 0:
        raise CaseFileError("case holds no points")
    if n < MIN_POINTS:
        raise CaseFileError(f"case holds only {n} points; a case needs at least {MIN_POINTS}")
    case.points = points
    case.velocity = np.asarray(case.velocity, dtype=np.float64)
    if case.velocity.shape != (n, d):
        raise CaseFileError(f"velocity must have shape {(n, d)}, got {case.velocity.shape}")
    for key in _NODAL_SCALARS:
        value = np.asarray(getattr(case, key), dtype=np.float64)
        if value.shape != (n,):
            raise CaseFileError(f"{key} must have shape {(n,)}, got {value.shape}")
        setattr(case, key, value)
    case.is_wall = np.asarray(case.is_wall).astype(bool)
    if case.is_wall.shape != (n,):
        raise CaseFileError(f"is_wall must have shape {(n,)}, got {case.is_wall.shape}")
    case.period = np.asarray(case.period, dtype=np.float64).reshape(-1)
    if case.period.shape != (d,):
        raise CaseFileError(f"period must have shape {(d,)}, got {case.period.shape}")
    for key in ("points", "velocity", *_NODAL_SCALARS, "period"):
        value = getattr(case, key)
        if not np.all(np.isfinite(value)):
            bad = int(np.count_nonzero(~np.isfinite(value)))
            raise CaseFileError(f"{key} holds {bad} NaN/inf value(s) in case {case.name!r}")
    if np.any(case.period < 0):
        raise CaseFileError(f"period must be >= 0, got {case.period}")
    if np.any(case.nodal_volume <= 0):
        raise CaseFileError("nodal_volume must be positive at every point")
    if np.any(case.wall_distance < 0):
        raise CaseFileError("wall_distance must be non-negative")


def write_case(path: str | os.PathLike, case: Case) -> Path:
    """Write a case file atomically (temporary file in the same folder, then rename).

    Args:
        path: target ``.npz`` path; its folder is created when missing.
        case: the case to write (validated again before writing).

    Returns:
        The path written.
    """
    validate_case(case)
    path = Path(path)
    if path.suffix != ".npz":
        raise CaseFileError(f"case files end in .npz, got {path.name!r}")
    clash = set(case.extra) & set(REQUIRED_KEYS)
    if clash:
        raise CaseFileError(f"extra arrays may not reuse contract keys {sorted(clash)}")
    arrays: dict[str, np.ndarray] = {
        "points": case.points,
        "velocity": case.velocity,
        "tau": case.tau,
        "strain_rate": case.strain_rate,
        "wall_distance": case.wall_distance,
        "nodal_volume": case.nodal_volume,
        "is_wall": case.is_wall,
        "period": case.period,
        "meta": np.array(json.dumps(case.meta, sort_keys=True, default=_json_default)),
        **{key: np.asarray(value) for key, value in case.extra.items()},
    }
    atomic_write(path, lambda stream: np.savez_compressed(stream, **arrays))
    return path


def read_case(path: str | os.PathLike) -> Case:
    """Read and validate a case file.

    Raises:
        CaseFileError: when the file is missing, not a readable ``.npz``, lacks a contract
            key, or holds malformed values.
    """
    path = check_archive(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise CaseFileError(f"case file {str(path)!r} is corrupt or not an .npz: {error}") from error
    missing = [key for key in REQUIRED_KEYS if key not in arrays]
    if missing:
        raise CaseFileError(f"case file {str(path)!r} lacks keys {missing}")
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except json.JSONDecodeError as error:
        raise CaseFileError(f"meta of {str(path)!r} is not valid JSON: {error}") from error
    contract = {key: arrays.pop(key) for key in REQUIRED_KEYS if key != "meta"}
    try:
        return Case(**contract, meta=meta, extra=arrays, name=path.stem)
    except CaseFileError as error:  # the contract checks do not know the file: name it
        raise CaseFileError(f"case file {str(path)!r}: {error}") from error


def check_archive(path: str | os.PathLike) -> Path:
    """Check that ``path`` is an existing zip archive (an ``.npz``) before numpy reads it.

    numpy reads a file that is not a zip archive as a pickle and reports "pickled data";
    checking the signature first gives the message that fits.

    Returns:
        The path.

    Raises:
        CaseFileError: naming the file when it is missing, a folder, or not an ``.npz``.
    """
    path = Path(path)
    if path.is_dir():
        raise CaseFileError(f"case file {str(path)!r} is a folder, not an .npz file")
    if not path.is_file():
        raise CaseFileError(f"case file {str(path)!r} does not exist")
    if not zipfile.is_zipfile(path):
        raise CaseFileError(
            f"case file {str(path)!r} is corrupt or not an .npz archive: no zip signature "
            "(a text file, or a copy cut short?)"
        )
    return path


@dataclass(frozen=True)
class CaseHeader:
    """What a case file holds, read from the array headers only (no data is loaded).

    Attributes:
        path: the file.
        num_points: N.
        dim: d.
    """

    path: Path
    num_points: int
    dim: int


def inspect_case(path: str | os.PathLike) -> CaseHeader:
    """Check a case file's archive, keys and point array from their headers, cheaply.

    Used to refuse bad inputs before a verb writes anything; :func:`read_case` does the full
    validation when the case is used.

    Raises:
        CaseFileError: naming the file and the problem.
    """
    path = check_archive(path)
    try:
        with zipfile.ZipFile(path) as archive:
            members = {Path(n).stem for n in archive.namelist() if n.endswith(".npy")}
            missing = [key for key in REQUIRED_KEYS if key not in members]
            if missing:
                raise CaseFileError(f"case file {str(path)!r} lacks keys {missing}")
            with archive.open("points.npy") as stream:
                version = np.lib.format.read_magic(stream)
                if version == (1, 0):
                    shape, _, _ = np.lib.format.read_array_header_1_0(stream)
                else:
                    shape, _, _ = np.lib.format.read_array_header_2_0(stream)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as error:
        raise CaseFileError(f"case file {str(path)!r} is corrupt or not an .npz: {error}") from error
    if len(shape) != 2 or shape[1] not in (2, 3):
        raise CaseFileError(
            f"case file {str(path)!r}: points must have shape (N, 2) or (N, 3), got {shape}"
        )
    if shape[0] < MIN_POINTS:
        raise CaseFileError(
            f"case file {str(path)!r} holds only {shape[0]} points; a case needs at least "
            f"{MIN_POINTS}"
        )
    return CaseHeader(path=path, num_points=int(shape[0]), dim=int(shape[1]))


def case_paths(folder: str | os.PathLike) -> list[Path]:
    """Case files in a folder, sorted by name (temporary files of interrupted writes skipped)."""
    folder = Path(folder)
    if folder.is_file():
        raise CaseFileError(
            f"case folder {str(folder)!r} is a file; give the folder that holds the case files"
        )
    if not folder.is_dir():
        raise CaseFileError(f"case folder {str(folder)!r} does not exist")
    return sorted(p for p in folder.glob("*.npz") if not p.name.startswith("."))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"meta value of type {type(value).__name__} is not JSON-serialisable")
