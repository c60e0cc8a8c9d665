"""Unstructured triangle meshes of the periodic hill, made with gmsh.

The bottom wall is two splines through :func:`meshes.hills.hill_profile` (one per flank) joined
by the flat floor; mesh nodes on the flanks are then moved exactly onto the profile. Cells are
refined towards both walls with a distance/threshold size field, and the sides x = 0 and x = L
are node-matched with ``gmsh.model.mesh.setPeriodic`` (translation by L).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from meshes.hills import TOP_WALL_HEIGHT, hill_flank_length, hill_period, hill_profile
from meshes.tagged import HILL_BOUNDARIES, MeshError, TaggedMesh

if TYPE_CHECKING:
    from mpi4py import MPI

__all__ = [
    "DEFAULT_GROWTH",
    "FLUID_CELL_TAG",
    "build_hill_gmsh_model",
    "gmsh_session",
    "unstructured_hill_mesh",
    "write_msh_atomic",
]

logger = logging.getLogger(__name__)

#: Default ratio of the sizes of neighbouring cells moving away from a wall.
DEFAULT_GROWTH: float = 1.15

#: Spline control points per hill flank; the flank nodes are snapped to the exact profile
#: afterwards, so this only needs to make the spline a close guide for the mesher.
_FLANK_CONTROL_POINTS = 80

#: Cell tag of the fluid surface (physical group "fluid").
FLUID_CELL_TAG = 1


@contextlib.contextmanager
def gmsh_session(model_name: str) -> Iterator[Any]:
    """Run gmsh quietly in a fresh model, leaving any caller's gmsh state as it was.

    Initialises gmsh (without reading user configuration files and without a SIGINT handler)
    unless it already is, adds a new model, and on exit removes that model and finalises gmsh
    only if this call initialised it.

    Args:
        model_name: name of the temporary gmsh model.

    Yields:
        The ``gmsh`` module, with ``model_name`` as the current model.
    """
    import gmsh

    started_here = not gmsh.isInitialized()
    if started_here:
        gmsh.initialize(readConfigFiles=False, interruptible=False)
    previous_model = gmsh.model.getCurrent() if not started_here else None
    previous_terminal = gmsh.option.getNumber("General.Terminal")
    gmsh.option.setNumber("General.Terminal", 0)
    gmsh.model.add(model_name)
    try:
        yield gmsh
    finally:
        gmsh.model.setCurrent(model_name)
        gmsh.model.remove()
        if started_here:
            gmsh.finalize()
        else:
            gmsh.option.setNumber("General.Terminal", previous_terminal)
            if previous_model:
                with contextlib.suppress(Exception):
                    gmsh.model.setCurrent(previous_model)


def _check_sizes(size: float, wall_size: float, growth: float) -> None:
    if not np.isfinite(size) or size <= 0.0:
        raise ValueError(f"size (target cell size away from the walls) must be > 0, got {size!r}")
    if not np.isfinite(wall_size) or not 0.0 < wall_size <= size:
        raise ValueError(
            f"wall_size must satisfy 0 < wall_size <= size (={size}), got {wall_size!r}"
        )
    if not np.isfinite(growth) or growth <= 1.0:
        raise ValueError(
            f"growth (size ratio of neighbouring cells away from a wall) must be > 1, "
            f"got {growth!r}; try {DEFAULT_GROWTH}"
        )


class HillOutline(NamedTuple):
    """The gmsh curves of the hill's section (z = 0) and their loop (gmsh tags)."""

    left_flank: int
    floor: int
    right_flank: int
    right_side: int
    top: int
    left_side: int
    loop: int


def hill_outline(gmsh: Any, alpha: float) -> HillOutline:
    """Add the outline of the periodic hill's section to the current gmsh ``geo`` model.

    The flanks are splines through the profile, the right one the mirror image of the left
    (so both crests get exactly the same height). ``left_side`` runs upwards, in the same
    direction as ``right_side`` (a periodic pair); the loop uses it reversed.

    Args:
        gmsh: the initialised ``gmsh`` module.
        alpha: slope factor (> 0).
    """
    period = hill_period(alpha)
    geo = gmsh.model.geo
    left_x = np.linspace(0.0, hill_flank_length(alpha), _FLANK_CONTROL_POINTS + 1)
    left_y = hill_profile(left_x, alpha)
    left_y[0], left_y[-1] = 1.0, 0.0
    left_points = [geo.addPoint(x, y, 0.0) for x, y in zip(left_x, left_y, strict=True)]
    right_points = [
        geo.addPoint(period - x, y, 0.0) for x, y in zip(left_x[::-1], left_y[::-1], strict=True)
    ]
    top_right = geo.addPoint(period, TOP_WALL_HEIGHT, 0.0)
    top_left = geo.addPoint(0.0, TOP_WALL_HEIGHT, 0.0)
    left_flank = geo.addSpline(left_points)
    floor = geo.addLine(left_points[-1], right_points[0])
    right_flank = geo.addSpline(right_points)
    right_side = geo.addLine(right_points[-1], top_right)
    top = geo.addLine(top_right, top_left)
    left_side = geo.addLine(left_points[0], top_left)
    loop = geo.addCurveLoop([left_flank, floor, right_flank, right_side, top, -left_side])
    return HillOutline(left_flank, floor, right_flank, right_side, top, left_side, loop)


def grade_from_walls(
    gmsh: Any,
    walls_key: str,
    walls: list[int],
    *,
    period: float,
    size: float,
    wall_size: float,
    growth: float,
) -> None:
    """Cell sizes from ``wall_size`` at the walls growing by ``growth`` to ``size`` (gmsh fields).

    Args:
        gmsh: the initialised ``gmsh`` module, its model synchronised.
        walls_key: ``"CurvesList"`` (2-D) or ``"SurfacesList"`` (3-D).
        walls: the gmsh tags of the wall curves or surfaces.
        period: the hill's period (the longest wall's length).
        size: cell size away from the walls.
        wall_size: cell size at the walls.
        growth: size ratio of neighbouring cells moving away from a wall (> 1).
    """
    fields = gmsh.model.mesh.field
    distance = fields.add("Distance")
    fields.setNumbers(distance, walls_key, walls)
    # About two samples per wall cell along the longest wall (the top, length L).
    fields.setNumber(distance, "Sampling", int(np.ceil(2 * period / wall_size)))
    threshold = fields.add("Threshold")
    fields.setNumber(threshold, "InField", distance)
    fields.setNumber(threshold, "SizeMin", wall_size)
    fields.setNumber(threshold, "SizeMax", size)
    fields.setNumber(threshold, "DistMin", 0.0)
    # Size grows linearly with distance at slope growth - 1: a geometric progression of cells.
    fields.setNumber(threshold, "DistMax", (size - wall_size) / (growth - 1.0))
    fields.setAsBackgroundMesh(threshold)
    for option in ("MeshSizeExtendFromBoundary", "MeshSizeFromPoints", "MeshSizeFromCurvature"):
        gmsh.option.setNumber(f"Mesh.{option}", 0)


def build_hill_gmsh_model(
    gmsh: Any, alpha: float, *, size: float, wall_size: float, growth: float
) -> None:
    """Define and mesh the periodic-hill geometry in the current gmsh model.

    Physical groups: curves "bottom", "top", "left", "right" with the values of
    :data:`meshes.tagged.HILL_BOUNDARIES`, and the surface "fluid" (tag 1).

    Args:
        gmsh: the initialised ``gmsh`` module (see :func:`gmsh_session`).
        alpha: slope factor (> 0).
        size: cell size away from the walls.
        wall_size: cell size at both walls.
        growth: size ratio of neighbouring cells moving away from a wall (> 1).
    """
    period = hill_period(alpha)
    outline = hill_outline(gmsh, alpha)
    left_flank, floor, right_flank, right_side, top, left_side, _ = outline
    surface = gmsh.model.geo.addPlaneSurface([outline.loop])
    gmsh.model.geo.synchronize()

    bottom_curves = [left_flank, floor, right_flank]
    model = gmsh.model
    model.addPhysicalGroup(1, bottom_curves, HILL_BOUNDARIES["bottom"], name="bottom")
    model.addPhysicalGroup(1, [top], HILL_BOUNDARIES["top"], name="top")
    model.addPhysicalGroup(1, [left_side], HILL_BOUNDARIES["left"], name="left")
    model.addPhysicalGroup(1, [right_side], HILL_BOUNDARIES["right"], name="right")
    model.addPhysicalGroup(2, [surface], FLUID_CELL_TAG, name="fluid")

    translation = [1, 0, 0, period, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]
    model.mesh.setPeriodic(1, [right_side], [left_side], translation)

    grade_from_walls(
        gmsh, "CurvesList", [*bottom_curves, top],
        period=period, size=size, wall_size=wall_size, growth=growth,
    )
    model.mesh.generate(2)
    for curve in (left_flank, right_flank):
        _snap_curve_nodes_to_profile(gmsh, curve, alpha)


def _snap_curve_nodes_to_profile(gmsh: Any, curve: int, alpha: float) -> None:
    """Move interior mesh nodes of a flank spline vertically onto the exact hill profile."""
    node_tags, coords, parametric = gmsh.model.mesh.getNodes(1, curve, includeBoundary=False)
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 3)
    coords[:, 1] = hill_profile(coords[:, 0], alpha)
    for index, node_tag in enumerate(node_tags):
        gmsh.model.mesh.setNode(int(node_tag), coords[index].tolist(), [parametric[index]])


def write_msh_atomic(gmsh: Any, path: str | os.PathLike[str]) -> Path:
    """Write the current gmsh model's mesh to ``path`` through a temporary file.

    Args:
        gmsh: the initialised ``gmsh`` module.
        path: destination, must end in ``.msh``.

    Returns:
        The destination path.

    Raises:
        MeshError: if the path does not end in ``.msh``.
    """
    path = Path(path)
    if path.suffix != ".msh":
        raise MeshError(f"gmsh mesh files must end in '.msh', got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # gmsh picks the format from the extension, so the temporary name keeps '.msh'.
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp.msh")
    try:
        gmsh.write(str(temporary))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def mesh_on_root(
    build: Callable[[Any], None],
    *,
    comm: MPI.Comm,
    model_name: str,
    gdim: int,
    msh_path: str | os.PathLike[str] | None,
    what: str,
) -> Any:
    """Run gmsh on rank 0 only and let dolfinx distribute the mesh it makes.

    Args:
        build: makes the gmsh model (geometry, physical groups, meshing) given the gmsh module.
        comm: the communicator the mesh is distributed over.
        model_name: the gmsh model's name.
        gdim: geometric dimension of the mesh (2 or 3).
        msh_path: if given, the gmsh mesh is also written there (atomically).
        what: the mesh in the error message, e.g. ``"the periodic hill (alpha=1.0)"``.

    Returns:
        dolfinx's ``MeshData`` (mesh, cell and facet tags) on every rank.

    Raises:
        MeshError: if gmsh fails (on every rank: the ranks agree before the collective call).
    """
    import dolfinx.io.gmsh

    with contextlib.ExitStack() as stack:
        error = None
        gmsh = None
        if comm.rank == 0:
            try:
                gmsh = stack.enter_context(gmsh_session(model_name))
                build(gmsh)
                if msh_path is not None:
                    write_msh_atomic(gmsh, msh_path)
            except Exception as exc:  # gmsh raises plain Exception
                error = f"gmsh failed to mesh {what}: {exc}"
        # Ranks must agree before the collective mesh creation, or the others would hang.
        error = comm.bcast(error, root=0)
        if error is not None:
            raise MeshError(error)
        return dolfinx.io.gmsh.model_to_mesh(
            gmsh.model if gmsh is not None else None, comm, 0, gdim=gdim
        )


def unstructured_hill_mesh(
    alpha: float,
    *,
    size: float = 0.05,
    wall_size: float | None = None,
    growth: float = DEFAULT_GROWTH,
    comm: MPI.Comm | None = None,
    msh_path: str | os.PathLike[str] | None = None,
) -> TaggedMesh:
    """Unstructured triangle mesh of the periodic hill with hill facet tags.

    Only rank 0 runs gmsh; dolfinx distributes the mesh.

    Args:
        alpha: slope factor (> 0).
        size: cell size away from the walls, in hill heights.
        wall_size: cell size at both walls; defaults to ``size / 5``.
        growth: size ratio of neighbouring cells moving away from a wall (> 1).
        comm: MPI communicator; defaults to ``MPI.COMM_WORLD``.
        msh_path: if given, the gmsh mesh is also written there (atomically).

    Returns:
        The tagged mesh, ``kind="unstructured"``, ``period = (L, 0)``, cell tags "fluid" = 1.

    Raises:
        ValueError: on invalid parameters.
        MeshError: if gmsh fails.
    """
    from mpi4py import MPI


    comm = MPI.COMM_WORLD if comm is None else comm
    period = hill_period(alpha)
    wall_size = size / 5.0 if wall_size is None else wall_size
    _check_sizes(size, wall_size, growth)

    mesh_data = mesh_on_root(
        lambda gmsh: build_hill_gmsh_model(
            gmsh, alpha, size=size, wall_size=wall_size, growth=growth
        ),
        comm=comm,
        model_name="periodic_hill",
        gdim=2,
        msh_path=msh_path,
        what=f"the periodic hill (alpha={alpha})",
    )
    mesh = mesh_data.mesh
    info = {
        "alpha": float(alpha),
        "size": float(size),
        "wall_size": float(wall_size),
        "growth": float(growth),
        "num_cells": int(mesh.topology.index_map(2).size_global),
        "num_vertices": int(mesh.topology.index_map(0).size_global),
        "period": period,
        "msh_path": None if msh_path is None else str(msh_path),
    }
    if comm.rank == 0:
        logger.debug(
            "unstructured hill mesh alpha=%g: %d triangles", alpha, info["num_cells"]
        )
    return TaggedMesh(
        mesh=mesh,
        facet_tags=mesh_data.facet_tags,
        boundaries=dict(HILL_BOUNDARIES),
        period=np.array([period, 0.0]),
        kind="unstructured",
        info=info,
        cell_tags=mesh_data.cell_tags,
    )
