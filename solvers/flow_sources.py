"""Read a velocity field written by another code: case files, meshio files, OpenFOAM cases.

:func:`read_flow_source` turns a path into a :class:`FlowSource`: scattered sample points and
the velocity at them, with what the source says about itself (kind, field, time, period). It
knows nothing of the project's mesh; :mod:`solvers.flow_import` interpolates the samples onto
it. Kinds of source:

- ``case``: a case file (``.npz``, docs/design.md) of nodal points or cell centres. Only ``points``
  and ``velocity`` (or the named field) are needed; ``period`` is used when present.
- ``meshio-points`` / ``meshio-cells``: any file meshio reads (``.vtu``, ``.vtk``, ``.xdmf``,
  ``.msh`` ...) with a vector field in its point data (sampled at the mesh nodes) or, when no
  point field of that name exists, in its cell data (sampled at the cell centroids).
- ``openfoam``: an OpenFOAM case directory, read with ``foamlib`` (the ``openfoam`` extra);
  see :mod:`solvers.openfoam`.

The velocity field is ``field`` when given, otherwise the first of :data:`VELOCITY_NAMES` the
source holds.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from solvers.flow_source_types import (
    SOURCE_KINDS,
    VELOCITY_NAMES,
    FlowSource,
    FlowSourceError,
    malformed_source,
)
from vcnn.inputs import check_regular_input

#: Fewest samples a source must have per point (vertex) of the project's mesh by default (one
#: per ten: fewer means a subsampled or cropped source, or the wrong file); the configs' key
#: ``flow_min_samples_per_point`` lowers it for a deliberately coarser source.
MIN_SAMPLES_PER_MESH_POINT = 0.1

__all__ = [
    "SOURCE_KINDS",
    "VELOCITY_NAMES",
    "FlowSource",
    "FlowSourceError",
    "malformed_source",
    "read_flow_source",
]

# Cell types whose centroid is computed exactly; other cells use the mean of their vertices.
_SIMPLICES = ("line", "triangle", "tetra")
_POLYGONS = ("quad", "polygon")
_TOPOLOGICAL_DIMENSION = {
    "vertex": 0,
    "line": 1,
    "triangle": 2,
    "quad": 2,
    "polygon": 2,
    "tetra": 3,
    "hexahedron": 3,
    "wedge": 3,
    "pyramid": 3,
    "polyhedron": 3,
}


def read_flow_source(
    path: str | os.PathLike[str], *, field: str | None = None, time: str = "latest"
) -> FlowSource:
    """Read the velocity samples of a case file, a meshio file or an OpenFOAM case.

    Args:
        path: a ``.npz`` case file, a file meshio reads, or an OpenFOAM case directory.
        field: name of the velocity field; default: the first of :data:`VELOCITY_NAMES` found.
        time: OpenFOAM only: ``"latest"`` (the latest time directory holding the field) or a
            time (``"341"``, ``"0.5"``).

    Returns:
        The samples.

    Raises:
        FlowSourceError: missing path, neither a regular file nor a folder (a FIFO, a device:
            refused before anything is opened), unreadable or malformed file (naming it), no
            velocity field, NaN/inf values, an OpenFOAM case with no solved time.
    """
    path = check_regular_input(path, what="flow source", allow_dir=True, error=FlowSourceError)
    with malformed_source(f"flow source {str(path)!r}"):
        if path.is_dir():
            from solvers.openfoam import is_openfoam_case, read_openfoam_velocity

            if not is_openfoam_case(path):
                raise FlowSourceError(
                    f"flow source {str(path)!r} is a directory but not an OpenFOAM case "
                    f"(no system/controlDict or constant/polyMesh)"
                )
            return read_openfoam_velocity(path, field=field, time=time)
        if time != "latest":
            raise FlowSourceError(f"a flow time ({time!r}) applies to OpenFOAM cases only")
        if path.suffix.lower() == ".npz":
            return _read_case_file(path, field)
        return _read_meshio(path, field)


def _pick_field(available: list[str], field: str | None) -> str | None:
    """The requested field, or the first default velocity name present (None if none is)."""
    if field is not None:
        return field if field in available else None
    return next((name for name in VELOCITY_NAMES if name in available), None)


def _read_case_file(path: Path, field: str | None) -> FlowSource:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as error:  # zipfile, pickle and format errors alike
        raise FlowSourceError(f"cannot read case file {str(path)!r}: {error}") from None
    name = _pick_field([k for k in arrays if k != "points"], field or "velocity")
    if name is None or "points" not in arrays:
        missing = "points" if "points" not in arrays else f"velocity field {field or 'velocity'!r}"
        raise FlowSourceError(
            f"case file {str(path)!r} has no {missing}; it holds {sorted(arrays)}"
        )
    meta: dict[str, Any] = {}
    if "meta" in arrays:
        with contextlib.suppress(ValueError, TypeError):
            meta = json.loads(str(arrays["meta"]))
    return FlowSource(
        points=arrays["points"],
        velocity=arrays[name],
        kind="case",
        path=str(path),
        field=name,
        period=arrays.get("period"),
        details={"source_case": meta.get("case")} if meta.get("case") else {},
    )


def _read_meshio(path: Path, field: str | None) -> FlowSource:
    from meshes.io import read_meshio

    data = read_meshio(path, error=FlowSourceError, what="flow source ")
    points = np.asarray(data.points, dtype=np.float64)
    name = _pick_field(list(data.point_data), field)
    if name is not None:
        return FlowSource(
            points=points,
            velocity=np.asarray(data.point_data[name], dtype=np.float64),
            kind="meshio-points",
            path=str(path),
            field=name,
        )
    name = _pick_field(list(data.cell_data), field)
    if name is None:
        wanted = repr(field) if field else f"any of {list(VELOCITY_NAMES)}"
        raise FlowSourceError(
            f"{str(path)!r} has no velocity field {wanted}: point data "
            f"{sorted(data.point_data)}, cell data {sorted(data.cell_data)} (choose one with "
            f"--flow-field)"
        )
    blocks = [
        (block, np.asarray(values, dtype=np.float64))
        for block, values in zip(data.cells, data.cell_data[name], strict=True)
        if block.type in _TOPOLOGICAL_DIMENSION
    ]
    top = max((_TOPOLOGICAL_DIMENSION[block.type] for block, _ in blocks), default=-1)
    # Facet blocks (boundary lines of a 2-D mesh, say) are not sample cells of the flow.
    blocks = [
        (block, values) for block, values in blocks if _TOPOLOGICAL_DIMENSION[block.type] == top
    ]
    if not blocks or top < 1:
        raise FlowSourceError(
            f"{str(path)!r}: cell field {name!r} is on no cells of dimension >= 1"
        )
    centres = np.concatenate(
        [cell_centroids(points, block.type, block.data) for block, _ in blocks]
    )
    velocity = np.concatenate([values.reshape(values.shape[0], -1) for _, values in blocks])
    return FlowSource(
        points=centres,
        velocity=velocity,
        kind="meshio-cells",
        path=str(path),
        field=name,
        details={"cell_types": sorted({block.type for block, _ in blocks})},
    )


def cell_centroids(points: np.ndarray, cell_type: str, cells: Any) -> np.ndarray:
    """Centroids of the cells of one meshio block.

    Simplices and polygons (quads included, planar, possibly in 3-D) get their exact
    centroid, by a fan of triangles for polygons; other 3-D cells (hexahedra, wedges,
    pyramids) the mean of their vertices, which is their centroid when they are
    parallelepipeds or prisms with parallel faces.

    Args:
        points: (P, g) float64 node coordinates.
        cell_type: meshio cell type name.
        cells: (C, k) int node indices (or a list of index arrays for polygons/polyhedra).

    Returns:
        (C, g) float64 centroids.
    """
    if isinstance(cells, np.ndarray) and cells.ndim == 2:
        groups = [np.asarray(cells, dtype=np.int64)]
        order = None
    else:
        # Ragged polygons: centroids per vertex count, put back in the block's order.
        sizes = np.array([len(c) for c in cells])
        order = np.concatenate([np.flatnonzero(sizes == n) for n in np.unique(sizes)])
        groups = [
            np.array([cells[i] for i in np.flatnonzero(sizes == n)]) for n in np.unique(sizes)
        ]
    result = []
    for group in groups:
        corners = points[group]  # (C, k, g)
        if cell_type in _POLYGONS and group.shape[1] > 3:
            result.append(_polygon_centroids(corners))
        else:
            result.append(corners.mean(axis=1))
    centroids = np.concatenate(result)
    if order is not None:
        unsorted = np.empty_like(centroids)
        unsorted[order] = centroids
        centroids = unsorted
    return centroids


def _polygon_centroids(corners: np.ndarray) -> np.ndarray:
    """Area-weighted centroids of planar polygons (C, k, g) by a fan from the vertex mean.

    The fan's triangle areas are signed (in the polygon's plane), so the result is exact for
    non-convex simple polygons as well.
    """
    centre = corners.mean(axis=1, keepdims=True)
    following = np.roll(corners, -1, axis=1)
    a, b = corners - centre, following - centre
    if corners.shape[2] == 2:
        areas = 0.5 * (a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0])
    else:
        normals = np.cross(a, b)
        total_normal = normals.sum(axis=1, keepdims=True)
        unit = total_normal / np.maximum(
            np.linalg.norm(total_normal, axis=-1, keepdims=True), 1e-300
        )
        areas = 0.5 * np.einsum("ckg,ckg->ck", normals, np.broadcast_to(unit, normals.shape))
    triangle_centres = (corners + following + centre) / 3.0
    total = areas.sum(axis=1)
    # Clockwise polygons have a negative total: the ratio is the same. Degenerate ones (zero
    # area) fall back to the vertex mean.
    degenerate = np.abs(total) <= 1e-300
    safe = np.where(degenerate, 1.0, total)[:, None]
    weighted = np.einsum("ck,ckg->cg", areas, triangle_centres) / safe
    return np.where(degenerate[:, None], centre[:, 0], weighted)
