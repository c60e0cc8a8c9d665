"""Read the velocity of an OpenFOAM case (cell centres and ``U`` at one time) with foamlib.

``foamlib`` is an optional dependency (``pip install 'vcnn-closures[openfoam]'``); it is
imported only when an OpenFOAM case is read. The samples are the cell centres:

- the ``C`` field of the selected time directory when present (written by
  ``postProcess -func writeCellCentres``), otherwise
- computed from ``constant/polyMesh`` exactly as OpenFOAM computes them: face centres and
  area vectors from a triangle fan about each face's vertex mean, then cell centres as the
  volume-weighted centroids of the pyramids from a cell's estimated centre to its faces.

The periodic lengths come from the cyclic patch pairs of ``constant/polyMesh/boundary`` (the
mean distance between their face centres, or the ``separationVector`` when the file gives one),
when the mesh is there. Uncompressed and ``.gz`` files are both read; decomposed cases must
be reconstructed first.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from solvers.flow_source_types import (
    VELOCITY_NAMES,
    FlowSource,
    FlowSourceError,
    malformed_source,
)

__all__ = [
    "cyclic_period",
    "is_openfoam_case",
    "polymesh_cell_centres",
    "read_openfoam_velocity",
    "read_polymesh",
]

logger = logging.getLogger(__name__)

OPENFOAM_HINT = "install the OpenFOAM reader with `pip install 'vcnn-closures[openfoam]'` (foamlib)"


def is_openfoam_case(path: Path) -> bool:
    """True for a directory that looks like an OpenFOAM case."""
    path = Path(path)
    return (path / "system" / "controlDict").is_file() or (path / "constant" / "polyMesh").is_dir()


def _foamlib() -> Any:
    try:
        import foamlib
    except ImportError as error:
        raise FlowSourceError(
            f"reading an OpenFOAM case needs foamlib: {OPENFOAM_HINT} ({error})"
        ) from None
    return foamlib


def _file(path: Path) -> Path | None:
    """``path`` or its ``.gz`` twin, whichever exists (None if neither)."""
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _time_directories(case: Path) -> list[tuple[float, Path]]:
    times = []
    for entry in case.iterdir():
        if not entry.is_dir():
            continue
        try:
            value = float(entry.name)
        except ValueError:
            continue
        if math.isfinite(value):
            times.append((value, entry))
    return sorted(times, key=lambda item: item[0])


def _select_time(case: Path, time: str, field: str | None) -> tuple[Path, str]:
    """The time directory to read and the velocity field name found there."""
    times = _time_directories(case)
    if not times:
        decomposed = sorted(p.name for p in case.glob("processor*"))
        hint = " (it is decomposed: run reconstructPar first)" if decomposed else ""
        raise FlowSourceError(f"OpenFOAM case {str(case)!r} has no time directories{hint}")

    def velocity_name(directory: Path) -> str | None:
        names = [field] if field else list(VELOCITY_NAMES)
        return next((n for n in names if _file(directory / n) is not None), None)

    if time == "latest":
        for value, directory in reversed(times):
            name = velocity_name(directory)
            if name is None:
                continue
            if value == 0.0:
                # The initial field (a guess, often uniform): no solver has run on this case.
                raise FlowSourceError(
                    f"OpenFOAM case {str(case)!r} has no solved time: the latest time holding "
                    f"{name} is 0, the initial field (times: {[d.name for _, d in times]}); run "
                    "the solver first, or ask for the initial field with --flow-time 0"
                )
            return directory, name
        wanted = repr(field) if field else f"any of {list(VELOCITY_NAMES)}"
        raise FlowSourceError(
            f"no time directory of OpenFOAM case {str(case)!r} holds a velocity field {wanted} "
            f"(times: {[d.name for _, d in times]})"
        )
    try:
        wanted_time = float(time)
    except ValueError:
        raise FlowSourceError(f"flow time must be 'latest' or a number, got {time!r}") from None
    matches = [
        d for value, d in times if math.isclose(value, wanted_time, rel_tol=1e-9, abs_tol=1e-12)
    ]
    if not matches:
        raise FlowSourceError(
            f"OpenFOAM case {str(case)!r} has no time {time!r}; times: {[d.name for _, d in times]}"
        )
    name = velocity_name(matches[0])
    if name is None:
        present = sorted(p.name.removesuffix(".gz") for p in matches[0].iterdir() if p.is_file())
        raise FlowSourceError(
            f"time {matches[0].name} of OpenFOAM case {str(case)!r} has no velocity field "
            f"{[field] if field else list(VELOCITY_NAMES)}; it holds {present} (choose one with "
            f"--flow-field)"
        )
    return matches[0], name


def _internal_field(path: Path, count: int | None) -> np.ndarray:
    """The internal field of a volVectorField file as (N, 3) float64."""
    foamlib = _foamlib()
    try:
        values = foamlib.FoamFieldFile(path).internal_field
    except Exception as error:  # foamlib's parse errors and missing entries alike
        raise FlowSourceError(f"cannot read the internal field of {str(path)!r}: {error}") from None
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1 and values.shape[0] == 3:
        if count is None:
            raise FlowSourceError(f"{str(path)!r} is uniform and the number of cells is unknown")
        values = np.tile(values, (count, 1))
    if values.ndim != 2 or values.shape[1] != 3:
        raise FlowSourceError(
            f"{str(path)!r} is not a vector field (internal field {values.shape})"
        )
    return values


def read_polymesh(polymesh: Path) -> dict[str, Any]:
    """The arrays of an OpenFOAM ``polyMesh`` directory.

    Returns:
        ``points`` (P, 3) float64, ``faces`` list of (k,) int64 arrays, ``owner`` (F,) int64,
        ``neighbour`` (F_internal,) int64 and ``boundary`` [(name, dict), ...].

    Raises:
        FlowSourceError: a file is missing or unreadable.
    """
    foamlib = _foamlib()
    arrays: dict[str, Any] = {}
    for name in ("points", "faces", "owner", "neighbour", "boundary"):
        path = _file(polymesh / name)
        if path is None:
            raise FlowSourceError(f"OpenFOAM mesh {str(polymesh)!r} has no {name!r} file")
        try:
            arrays[name] = foamlib.FoamFile(path)[None]
        except Exception as error:
            raise FlowSourceError(f"cannot read {str(path)!r}: {error}") from None
    arrays["points"] = np.asarray(arrays["points"], dtype=np.float64).reshape(-1, 3)
    arrays["faces"] = [np.asarray(face, dtype=np.int64) for face in arrays["faces"]]
    arrays["owner"] = np.asarray(arrays["owner"], dtype=np.int64)
    arrays["neighbour"] = np.asarray(arrays["neighbour"], dtype=np.int64)
    boundary = arrays["boundary"]
    arrays["boundary"] = list(boundary.items()) if hasattr(boundary, "items") else list(boundary)
    return arrays


def _face_geometry(points: np.ndarray, faces: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Face centres and area vectors, as OpenFOAM's ``primitiveMesh`` computes them.

    Each face is a fan of triangles about the mean of its vertices; the centre is the
    area-weighted mean of the triangles' centroids, the area vector half the sum of their
    normals (a triangle is taken exactly).

    Returns:
        (F, 3) centres and (F, 3) area vectors, float64.
    """
    centres = np.empty((len(faces), 3))
    areas = np.empty((len(faces), 3))
    sizes = np.array([face.size for face in faces])
    for size in np.unique(sizes):
        index = np.flatnonzero(sizes == size)
        corners = points[np.stack([faces[i] for i in index])]  # (n, size, 3)
        if size == 3:
            centres[index] = corners.mean(axis=1)
            areas[index] = 0.5 * np.cross(
                corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
            )
            continue
        estimate = corners.mean(axis=1, keepdims=True)
        following = np.roll(corners, -1, axis=1)
        normals = np.cross(following - corners, estimate - corners)
        magnitudes = np.linalg.norm(normals, axis=-1)
        total = magnitudes.sum(axis=1)
        weighted = np.einsum("nk,nkg->ng", magnitudes, corners + following + estimate)
        degenerate = total < 1e-300
        centres[index] = np.where(
            degenerate[:, None],
            estimate[:, 0],
            weighted / (3.0 * np.where(degenerate, 1.0, total))[:, None],
        )
        areas[index] = np.where(degenerate[:, None], 0.0, 0.5 * normals.sum(axis=1))
    return centres, areas


def polymesh_cell_centres(mesh: dict[str, Any]) -> np.ndarray:
    """Cell centres of a polyMesh (see :func:`read_polymesh`), as OpenFOAM computes them.

    The centre of a cell is the volume-weighted mean of the centroids of the pyramids from an
    estimate (the mean of its face centres) to each face; a pyramid's centroid lies 3/4 of the
    way from the apex to the face centre.

    Returns:
        (C, 3) float64 cell centres.
    """
    owner, neighbour = mesh["owner"], mesh["neighbour"]
    num_cells = int(max(owner.max(), neighbour.max() if neighbour.size else -1)) + 1
    face_centres, face_areas = _face_geometry(mesh["points"], mesh["faces"])
    internal = np.arange(neighbour.size)
    counts = np.bincount(owner, minlength=num_cells) + np.bincount(neighbour, minlength=num_cells)
    estimate = np.zeros((num_cells, 3))
    np.add.at(estimate, owner, face_centres)
    np.add.at(estimate, neighbour, face_centres[internal])
    estimate /= counts[:, None]
    # Face areas point out of the owner: a pyramid's (3x) volume is positive from either side.
    owner_volume = np.einsum("fg,fg->f", face_areas, face_centres - estimate[owner])
    neighbour_volume = np.einsum(
        "fg,fg->f", face_areas[internal], estimate[neighbour] - face_centres[internal]
    )
    owner_volume = np.maximum(owner_volume, 1e-300)
    neighbour_volume = np.maximum(neighbour_volume, 1e-300)
    moments = np.zeros((num_cells, 3))
    volumes = np.zeros(num_cells)
    np.add.at(
        moments, owner, owner_volume[:, None] * (0.75 * face_centres + 0.25 * estimate[owner])
    )
    np.add.at(volumes, owner, owner_volume)
    np.add.at(
        moments,
        neighbour,
        neighbour_volume[:, None] * (0.75 * face_centres[internal] + 0.25 * estimate[neighbour]),
    )
    np.add.at(volumes, neighbour, neighbour_volume)
    return moments / volumes[:, None]


def cyclic_period(mesh: dict[str, Any]) -> np.ndarray | None:
    """Periodic lengths along the axes from the mesh's translational cyclic patch pairs.

    Returns:
        (3,) float64 lengths (0 where not periodic), or None when the mesh has no cyclic
        pair; a pair whose translation is not along an axis is ignored (logged).
    """
    boundary = dict(mesh["boundary"])
    face_centres: np.ndarray | None = None
    period = np.zeros(3)
    found = False
    for name, patch in boundary.items():
        if patch.get("type") != "cyclic" or "neighbourPatch" not in patch:
            continue
        if str(patch.get("transform", "unknown")) == "rotational":
            logger.warning("cyclic patch %s is rotational: its period is not used", name)
            continue
        if "separationVector" in patch:
            separation = np.abs(np.asarray(patch["separationVector"], dtype=np.float64))
        else:
            if face_centres is None:
                face_centres, _ = _face_geometry(mesh["points"], mesh["faces"])
            other = boundary[patch["neighbourPatch"]]

            def mean_centre(entry: dict[str, Any]) -> np.ndarray:
                start, count = int(entry["startFace"]), int(entry["nFaces"])
                return face_centres[start : start + count].mean(axis=0)

            separation = np.abs(mean_centre(other) - mean_centre(patch))
        scale = max(float(separation.max()), 1e-300)
        axes = np.flatnonzero(separation > 1e-6 * scale)
        if axes.size != 1:
            logger.warning("cyclic patch %s is not translated along an axis: ignored", name)
            continue
        period[axes[0]] = separation[axes[0]]
        found = True
    return period if found else None


def read_openfoam_velocity(
    case: Path, *, field: str | None = None, time: str = "latest"
) -> FlowSource:
    """Cell centres and velocity of an OpenFOAM case at one time.

    Args:
        case: the case directory.
        field: velocity field name (default ``U``).
        time: ``"latest"`` (the latest time directory holding the field) or a time value.

    Returns:
        A :class:`FlowSource` of kind ``openfoam`` with 3-D points and velocities.

    Raises:
        FlowSourceError: no foamlib, no time or field, no solved time (``latest`` is the
            initial time 0; ask for ``time="0"`` to read it), no cell centres (neither ``C``
            nor a ``constant/polyMesh``), sizes that do not match, or a malformed mesh.
    """
    case = Path(case)
    _foamlib()
    directory, name = _select_time(case, time, field)
    polymesh_dir = case / "constant" / "polyMesh"
    mesh = read_polymesh(polymesh_dir) if _file(polymesh_dir / "owner") is not None else None
    mesh_file = f"OpenFOAM mesh {str(polymesh_dir)!r}"
    centres_file = _file(directory / "C")
    if centres_file is not None:
        centres = _internal_field(centres_file, None)
        origin = f"{directory.name}/C"
    elif mesh is not None:
        with malformed_source(mesh_file):
            centres = polymesh_cell_centres(mesh)
        origin = "constant/polyMesh"
    else:
        raise FlowSourceError(
            f"OpenFOAM case {str(case)!r} has neither cell centres {directory.name}/C "
            f"(postProcess -func writeCellCentres) nor a constant/polyMesh to compute them from"
        )
    velocity = _internal_field(_file(directory / name), centres.shape[0])
    if velocity.shape[0] != centres.shape[0]:
        raise FlowSourceError(
            f"OpenFOAM case {str(case)!r}: {name} has {velocity.shape[0]} values but there are "
            f"{centres.shape[0]} cells"
        )
    period = None
    if mesh is not None:
        with malformed_source(mesh_file):
            period = cyclic_period(mesh)
    return FlowSource(
        points=centres,
        velocity=velocity,
        kind="openfoam",
        path=str(case),
        field=name,
        time=directory.name,
        period=period,
        details={"cell_centres": origin},
    )
