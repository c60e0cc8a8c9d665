"""Three-dimensional periodic hills: the 2-D hill extruded across the span, and a 3-D variant.

See ``docs/physics.md`` (geometry) and ``docs/design.md`` (three dimensions).

The domain is ``0 <= x <= L`` (the 2-D period), ``bottom(x, z) <= y <= 85/28`` and
``0 <= z <= L_z`` with the spanwise period ``L_z = 4.5`` hill heights. Periodic in x and z,
no-slip walls at the bottom and at the flat top. The crest-varying variant scales the hill profile
vertically by ``h(z) = 1 + a cos(2 pi z / L_z)`` (``0 <= a <= 0.3``): ``bottom(x, z) =
h(z) hill_profile(x)``; ``a = 0`` is the extruded 2-D hill.

Two mesh kinds:

- :func:`structured_hill3d_mesh`: hexahedra. The in-plane grid is exactly the 2-D structured
  grid of :func:`meshes.structured.structured_hill_grid` at the same resolution (so at ``a = 0``
  every ``z = const`` section is the 2-D mesh to the last bit), repeated over ``span_cells`` uniform
  layers; with ``a > 0`` each node column follows ``h(z) bottom(x)`` with the same wall-normal
  grading.
- :func:`unstructured_hill3d_mesh`: tetrahedra from gmsh (the 2-D hill section extruded as a
  geometry, meshed in 3-D with walls refined by a distance field), x and z sides node-matched
  with ``setPeriodic``; nodes are then mapped vertically onto the crest-varying wall.

Facet tags are :data:`HILL3D_BOUNDARIES`: those of the 2-D hill plus ``front`` (z = 0) and
``back`` (z = L_z), a second periodic pair.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from meshes.hills import TOP_WALL_HEIGHT, hill_period, hill_profile
from meshes.structured import DEFAULT_WALL_GRADING, structured_hill_grid, wall_normal_coordinates
from meshes.tagged import HILL_BOUNDARIES, TaggedMesh
from meshes.unstructured import DEFAULT_GROWTH

if TYPE_CHECKING:
    from mpi4py import MPI

    import dolfinx.mesh

__all__ = [
    "HILL3D_BOUNDARIES",
    "MAX_CREST_AMPLITUDE",
    "SPAN_CELLS_PER_RESOLUTION",
    "SPAN_LENGTH",
    "StructuredHill3dGrid",
    "crest_height",
    "default_span_cells",
    "hill3d_bottom",
    "map_to_crest_variant",
    "structured_hill3d_grid",
    "structured_hill3d_mesh",
    "tag_hill3d_facets",
    "unstructured_hill3d_mesh",
]

logger = logging.getLogger(__name__)

#: Spanwise period L_z of the 3-D hills, in hill heights.
SPAN_LENGTH: float = 4.5

#: Largest crest amplitude a of ``h(z) = 1 + a cos(2 pi z / L_z)`` in the family.
MAX_CREST_AMPLITUDE: float = 0.3

#: Default spanwise layers per unit of resolution: ``span_cells = round(28 r)``. At r = 0.25
#: (alpha = 1: 50 x 50 cells in-plane) it gives 7 layers, a Taylor-Hood (Q2/Q1) problem of
#: 442 k unknowns after the periodic reduction (under the 0.5 M a case at r = 0.25 should stay
#: within); at r = 1 it gives 28 layers, a spanwise spacing of 0.16 (the in-plane spacing
#: along x is 0.045 there). Pass ``span_cells`` to choose another count.
SPAN_CELLS_PER_RESOLUTION: float = 28.0

#: Facet tags of the 3-D hill meshes: the 2-D ones, then the spanwise periodic sides.
HILL3D_BOUNDARIES: dict[str, int] = {**HILL_BOUNDARIES, "front": 5, "back": 6}

#: Cell tag of the fluid volume of the unstructured meshes (physical group "fluid").
FLUID_CELL_TAG = 1


class StructuredHill3dGrid(NamedTuple):
    """Nodes and hexahedra of a structured 3-D hill grid (numpy only, before distribution).

    Attributes:
        points: ``(num_nodes, 3)`` float64; node ``(i, j, k)`` (column i along x, row j across,
            layer k along z) has index ``(k * (ny + 1) + j) * (nx + 1) + i``.
        cells: ``(num_cells, 8)`` int64 hexahedra in dolfinx (tensor-product) vertex order.
        nx: cell columns along x.
        ny: cell rows across the channel.
        nz: cell layers along z.
        period: ``(L, L_z)`` streamwise and spanwise periods.
    """

    points: np.ndarray
    cells: np.ndarray
    nx: int
    ny: int
    nz: int
    period: tuple[float, float]


def _check_crest_amplitude(crest_amplitude: float) -> float:
    amplitude = float(crest_amplitude)
    if not np.isfinite(amplitude) or not 0.0 <= amplitude <= MAX_CREST_AMPLITUDE:
        raise ValueError(
            f"crest amplitude a of h(z) = 1 + a cos(2 pi z / L_z) must lie in "
            f"[0, {MAX_CREST_AMPLITUDE}] (0 = the extruded 2-D hill), got {crest_amplitude!r}"
        )
    return amplitude


def default_span_cells(resolution: float) -> int:
    """Default number of spanwise layers at a resolution: ``max(2, round(28 r))``.

    Args:
        resolution: the in-plane resolution factor (1 = the published 200 rows).

    Returns:
        The number of layers (7 at r = 0.25, 28 at r = 1).
    """
    if not np.isfinite(resolution) or resolution <= 0.0:
        raise ValueError(f"resolution must be > 0 (1 = 200 rows across), got {resolution!r}")
    return max(2, round(SPAN_CELLS_PER_RESOLUTION * resolution))


def crest_height(z: np.ndarray, crest_amplitude: float) -> np.ndarray:
    """Crest height ``h(z) = 1 + a cos(2 pi z / L_z)``.

    Args:
        z: spanwise positions, any shape, float.
        crest_amplitude: a in [0, 0.3].

    Returns:
        float64, same shape as ``z`` (exactly 1 everywhere for a = 0).
    """
    amplitude = _check_crest_amplitude(crest_amplitude)
    z = np.asarray(z, dtype=np.float64)
    if amplitude == 0.0:
        return np.ones_like(z)
    return 1.0 + amplitude * np.cos(2.0 * np.pi * z / SPAN_LENGTH)


def hill3d_bottom(x: np.ndarray, z: np.ndarray, alpha: float, crest_amplitude: float) -> np.ndarray:
    """Height of the bottom wall ``h(z) hill_profile(x, alpha)``.

    Args:
        x: streamwise positions (wrapped periodically), float, broadcastable with ``z``.
        z: spanwise positions, float.
        alpha: slope factor (> 0).
        crest_amplitude: a in [0, 0.3].

    Returns:
        float64 heights of the broadcast shape.
    """
    return crest_height(z, crest_amplitude) * hill_profile(x, alpha)


def map_to_crest_variant(points: np.ndarray, alpha: float, crest_amplitude: float) -> np.ndarray:
    """Move nodes of an extruded-hill (a = 0) mesh vertically onto the crest-varying geometry.

    Each vertical line keeps its relative position between the walls:
    ``(y - b) / (T - b)`` with ``b = hill_profile(x)`` is preserved while the bottom becomes
    ``h(z) b``. Bottom nodes land exactly on the new wall, top nodes stay exactly at T. The map
    is pointwise, so each rank can apply it to its own nodes.

    Args:
        points: ``(n, 3)`` float64 node coordinates of the a = 0 mesh.
        alpha: slope factor.
        crest_amplitude: a in [0, 0.3].

    Returns:
        ``(n, 3)`` float64 mapped coordinates (a copy; equal to ``points`` for a = 0).
    """
    mapped = np.array(points, dtype=np.float64, copy=True)
    if _check_crest_amplitude(crest_amplitude) == 0.0:
        return mapped
    x, y, z = mapped[:, 0], mapped[:, 1], mapped[:, 2]
    base = hill_profile(x, alpha)
    height = crest_height(z, crest_amplitude) * base
    relative = (y - base) / (TOP_WALL_HEIGHT - base)
    new_y = height + (TOP_WALL_HEIGHT - height) * relative
    new_y = np.where(y == base, height, np.where(y == TOP_WALL_HEIGHT, TOP_WALL_HEIGHT, new_y))
    mapped[:, 1] = new_y
    return mapped


def structured_hill3d_grid(
    alpha: float,
    *,
    crest_amplitude: float = 0.0,
    resolution: float = 1.0,
    span_cells: int | None = None,
    wall_grading: float = DEFAULT_WALL_GRADING,
) -> StructuredHill3dGrid:
    """Build the nodes and hexahedra of the structured 3-D hill grid with numpy.

    Args:
        alpha: slope factor (> 0).
        crest_amplitude: a in [0, 0.3].
        resolution: in-plane resolution, exactly as :func:`meshes.structured.structured_hill_grid`.
        span_cells: uniform layers along z; :func:`default_span_cells` when None.
        wall_grading: tanh stretching parameter of the wall-normal rows.

    Returns:
        The grid (see :class:`StructuredHill3dGrid`).

    Raises:
        ValueError: on invalid parameters.
    """
    amplitude = _check_crest_amplitude(crest_amplitude)
    nz = default_span_cells(resolution) if span_cells is None else span_cells
    if int(nz) != nz or nz < 1:
        raise ValueError(f"span_cells must be a positive integer number of layers, got {nz!r}")
    nz = int(nz)
    section = structured_hill_grid(
        alpha, resolution=resolution, cell_type="quadrilateral", wall_grading=wall_grading
    )
    nx, ny = section.nx, section.ny
    x_columns = section.points[: nx + 1, 0]
    eta = wall_normal_coordinates(ny, wall_grading)
    bottom = hill_profile(x_columns, alpha)
    bottom[-1] = bottom[0]
    z_layers = np.linspace(0.0, SPAN_LENGTH, nz + 1)
    # The same column formula as in 2-D, so that h(z) = 1 reproduces the section bit for bit.
    layer_bottom = crest_height(z_layers, amplitude)[:, None] * bottom[None, :]  # (nz+1, nx+1)
    y_nodes = (
        layer_bottom[:, None, :] + (TOP_WALL_HEIGHT - layer_bottom[:, None, :]) * eta[None, :, None]
    )
    y_nodes[:, -1, :] = TOP_WALL_HEIGHT
    shape = y_nodes.shape  # (nz + 1, ny + 1, nx + 1)
    points = np.column_stack(
        [
            np.broadcast_to(x_columns[None, None, :], shape).ravel(),
            y_nodes.ravel(),
            np.broadcast_to(z_layers[:, None, None], shape).ravel(),
        ]
    )
    node = np.arange(points.shape[0], dtype=np.int64).reshape(shape)
    corners = [
        node[k0 : nz + k0, j0 : ny + j0, i0 : nx + i0].ravel()
        for k0 in (0, 1)
        for j0 in (0, 1)
        for i0 in (0, 1)
    ]
    cells = np.column_stack(corners)
    return StructuredHill3dGrid(
        points=points, cells=cells, nx=nx, ny=ny, nz=nz, period=(section.period, SPAN_LENGTH)
    )


def structured_hill3d_mesh(
    alpha: float,
    *,
    crest_amplitude: float = 0.0,
    resolution: float = 1.0,
    span_cells: int | None = None,
    comm: MPI.Comm | None = None,
    wall_grading: float = DEFAULT_WALL_GRADING,
) -> TaggedMesh:
    """Structured hexahedral 3-D hill mesh, distributed by dolfinx, with facet tags.

    Args:
        alpha: slope factor (> 0).
        crest_amplitude: a in [0, 0.3] (0 = extruded 2-D hill).
        resolution: in-plane resolution (the 2-D mesh at this resolution is the section).
        span_cells: spanwise layers; :func:`default_span_cells` when None.
        comm: MPI communicator; defaults to ``MPI.COMM_WORLD``.
        wall_grading: tanh stretching parameter.

    Returns:
        The tagged mesh, ``kind="structured"``, ``period = (L, 0, L_z)``, boundaries
        :data:`HILL3D_BOUNDARIES`.

    Raises:
        ValueError: on invalid parameters.
    """
    from mpi4py import MPI

    import basix.ufl
    import dolfinx.mesh
    import ufl

    comm = MPI.COMM_WORLD if comm is None else comm
    # Every rank validates (and builds the small numpy grid) so a bad argument fails everywhere.
    grid = structured_hill3d_grid(
        alpha,
        crest_amplitude=crest_amplitude,
        resolution=resolution,
        span_cells=span_cells,
        wall_grading=wall_grading,
    )
    if comm.rank == 0:
        cells, points = grid.cells, grid.points
    else:
        cells = np.empty((0, 8), dtype=np.int64)
        points = np.empty((0, 3), dtype=np.float64)
    domain = ufl.Mesh(basix.ufl.element("Lagrange", "hexahedron", 1, shape=(3,)))
    mesh = dolfinx.mesh.create_mesh(comm, cells, domain, points)
    period, span = grid.period
    facet_tags = tag_hill3d_facets(mesh, period)
    info = {
        "alpha": float(alpha),
        "crest_amplitude": float(crest_amplitude),
        "resolution": float(resolution),
        "cell_type": "hexahedron",
        "nx": grid.nx,
        "ny": grid.ny,
        "nz": grid.nz,
        "span_cells": grid.nz,
        "wall_grading": float(wall_grading),
        "num_cells": int(mesh.topology.index_map(3).size_global),
        "num_vertices": int(mesh.topology.index_map(0).size_global),
        "period": period,
        "span_length": span,
    }
    if comm.rank == 0:
        logger.info(
            "structured 3-D hill mesh alpha=%g a=%g: %d x %d x %d hexahedra",
            alpha,
            crest_amplitude,
            grid.nx,
            grid.ny,
            grid.nz,
        )
    return TaggedMesh(
        mesh=mesh,
        facet_tags=facet_tags,
        boundaries=dict(HILL3D_BOUNDARIES),
        period=np.array([period, 0.0, span]),
        kind="structured",
        info=info,
    )


def tag_hill3d_facets(mesh: dolfinx.mesh.Mesh, period: float) -> dolfinx.mesh.MeshTags:
    """Tag exterior facets by position: x and z sides, the top, and the rest as the hill wall.

    Args:
        mesh: a 3-D hill mesh (any cell type) with sides at x = 0, L and z = 0, L_z.
        period: the streamwise period L.

    Returns:
        Facet MeshTags with the values of :data:`HILL3D_BOUNDARIES`.
    """
    import dolfinx.mesh

    tdim = mesh.topology.dim
    mesh.topology.create_connectivity(tdim - 1, tdim)
    exterior = np.sort(dolfinx.mesh.exterior_facet_indices(mesh.topology)).astype(np.int32)
    midpoints = dolfinx.mesh.compute_midpoints(mesh, tdim - 1, exterior)
    tolerance = 1e-9 * max(period, TOP_WALL_HEIGHT, SPAN_LENGTH)
    tags = HILL3D_BOUNDARIES
    values = np.full(exterior.shape, tags["bottom"], dtype=np.int32)
    values[np.abs(midpoints[:, 1] - TOP_WALL_HEIGHT) < tolerance] = tags["top"]
    values[np.abs(midpoints[:, 0]) < tolerance] = tags["left"]
    values[np.abs(midpoints[:, 0] - period) < tolerance] = tags["right"]
    values[np.abs(midpoints[:, 2]) < tolerance] = tags["front"]
    values[np.abs(midpoints[:, 2] - SPAN_LENGTH) < tolerance] = tags["back"]
    facet_tags = dolfinx.mesh.meshtags(mesh, tdim - 1, exterior, values)
    facet_tags.name = "facet_tags"
    return facet_tags


def _build_hill3d_gmsh_model(
    gmsh: Any, alpha: float, *, size: float, wall_size: float, growth: float
) -> None:
    """Define and mesh the extruded hill (a = 0) with tetrahedra in the current gmsh model.

    Physical groups: surfaces "bottom", "top", "left", "right", "front", "back" with the values
    of :data:`HILL3D_BOUNDARIES` and the volume "fluid" (tag 1).
    """
    from meshes.unstructured import grade_from_walls, hill_outline

    period = hill_period(alpha)
    geo = gmsh.model.geo
    front = geo.addPlaneSurface([hill_outline(gmsh, alpha).loop])
    extruded = geo.extrude([(2, front)], 0.0, 0.0, SPAN_LENGTH)
    geo.synchronize()
    # extrude returns the opposite surface, the volume, then one surface per loop curve.
    back, volume = extruded[0][1], extruded[1][1]
    lateral = [tag for dim, tag in extruded[2:] if dim == 2]
    bottom_surfaces = lateral[:3]
    right_surface, top_surface, left_surface = lateral[3], lateral[4], lateral[5]

    model = gmsh.model
    tags = HILL3D_BOUNDARIES
    for name, surfaces in (
        ("bottom", bottom_surfaces),
        ("top", [top_surface]),
        ("left", [left_surface]),
        ("right", [right_surface]),
        ("front", [front]),
        ("back", [back]),
    ):
        model.addPhysicalGroup(2, surfaces, tags[name], name=name)
    model.addPhysicalGroup(3, [volume], FLUID_CELL_TAG, name="fluid")

    def translation(dx: float, dz: float) -> list[float]:
        return [1, 0, 0, dx, 0, 1, 0, 0, 0, 0, 1, dz, 0, 0, 0, 1]

    model.mesh.setPeriodic(2, [right_surface], [left_surface], translation(period, 0.0))
    model.mesh.setPeriodic(2, [back], [front], translation(0.0, SPAN_LENGTH))

    grade_from_walls(
        gmsh, "SurfacesList", [*bottom_surfaces, top_surface],
        period=period, size=size, wall_size=wall_size, growth=growth,
    )
    model.mesh.generate(3)
    # gmsh re-projects the periodic copies onto their (spline) surfaces, which moves them by up
    # to ~1e-7: put every slave node exactly at its master plus the translation.
    for slave, shift in ((right_surface, (period, 0.0)), (back, (0.0, SPAN_LENGTH))):
        _, slave_nodes, master_nodes, _ = model.mesh.getPeriodicNodes(
            2, slave, includeHighOrderNodes=False
        )
        for slave_node, master_node in zip(slave_nodes, master_nodes, strict=True):
            point, _, _, _ = model.mesh.getNode(int(master_node))
            moved = [point[0] + shift[0], point[1], point[2] + shift[1]]
            model.mesh.setNode(int(slave_node), moved, [])
    # Nodes on the flank surfaces (and their edges) move vertically onto the exact profile.
    flanks = [(2, bottom_surfaces[0]), (2, bottom_surfaces[2])]
    # The edges too: a surface's own node list may leave out nodes of its boundary curves, and
    # the copies at z = 0 and z = L_z must move alike to stay periodic.
    for dim, entity in flanks + model.getBoundary(flanks, combined=False, oriented=False):
        node_tags, coords, _ = model.mesh.getNodes(
            dim, entity, includeBoundary=True, returnParametricCoord=False
        )
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, 3)
        coords[:, 1] = hill_profile(coords[:, 0], alpha)
        for node_tag, point in zip(node_tags, coords, strict=True):
            model.mesh.setNode(int(node_tag), point.tolist(), [])


def unstructured_hill3d_mesh(
    alpha: float,
    *,
    crest_amplitude: float = 0.0,
    size: float = 0.3,
    wall_size: float | None = None,
    growth: float = DEFAULT_GROWTH,
    comm: MPI.Comm | None = None,
    msh_path: str | os.PathLike[str] | None = None,
) -> TaggedMesh:
    """Unstructured tetrahedral 3-D hill mesh (gmsh on rank 0, distributed by dolfinx).

    Args:
        alpha: slope factor (> 0).
        crest_amplitude: a in [0, 0.3]; nodes of the extruded mesh are moved by
            :func:`map_to_crest_variant`.
        size: cell size away from the walls, in hill heights.
        wall_size: cell size at both walls; ``size / 3`` when None.
        growth: size ratio of neighbouring cells moving away from a wall (> 1).
        comm: MPI communicator; defaults to ``MPI.COMM_WORLD``.
        msh_path: if given, the gmsh mesh of the extruded (a = 0) hill is also written there.

    Returns:
        The tagged mesh, ``kind="unstructured"``, ``period = (L, 0, L_z)``, boundaries
        :data:`HILL3D_BOUNDARIES`, cell tags "fluid" = 1.

    Raises:
        ValueError: on invalid parameters.
        MeshError: if gmsh fails.
    """
    from mpi4py import MPI

    from meshes.unstructured import _check_sizes, mesh_on_root

    comm = MPI.COMM_WORLD if comm is None else comm
    amplitude = _check_crest_amplitude(crest_amplitude)
    period = hill_period(alpha)
    wall_size = size / 3.0 if wall_size is None else wall_size
    _check_sizes(size, wall_size, growth)
    mesh_data = mesh_on_root(
        lambda gmsh: _build_hill3d_gmsh_model(
            gmsh, alpha, size=size, wall_size=wall_size, growth=growth
        ),
        comm=comm,
        model_name="periodic_hill_3d",
        gdim=3,
        msh_path=msh_path,
        what=f"the 3-D periodic hill (alpha={alpha})",
    )
    mesh = mesh_data.mesh
    if amplitude:
        mesh.geometry.x[:] = map_to_crest_variant(mesh.geometry.x, alpha, amplitude)
    info = {
        "alpha": float(alpha),
        "crest_amplitude": amplitude,
        "cell_type": "tetrahedron",
        "size": float(size),
        "wall_size": float(wall_size),
        "growth": float(growth),
        "num_cells": int(mesh.topology.index_map(3).size_global),
        "num_vertices": int(mesh.topology.index_map(0).size_global),
        "period": period,
        "span_length": SPAN_LENGTH,
        "msh_path": None if msh_path is None else str(msh_path),
    }
    if comm.rank == 0:
        logger.info(
            "unstructured 3-D hill mesh alpha=%g a=%g: %d tetrahedra",
            alpha,
            amplitude,
            info["num_cells"],
        )
    return TaggedMesh(
        mesh=mesh,
        facet_tags=mesh_data.facet_tags,
        boundaries=dict(HILL3D_BOUNDARIES),
        period=np.array([period, 0.0, SPAN_LENGTH]),
        kind="unstructured",
        info=info,
        cell_tags=mesh_data.cell_tags,
    )
