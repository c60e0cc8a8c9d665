"""Wall distance on 3-D meshes: hexahedra (quadrilateral wall facets) and tetrahedra."""

from mpi4py import MPI

import numpy as np
import pytest
from dolfinx import fem
from dolfinx import mesh as dmesh

from meshes.hills3d import SPAN_LENGTH, structured_hill3d_mesh
from meshes.structured import structured_hill_mesh
from solvers.fields import wall_distance, wall_distance_function, wall_segments

COMM = MPI.COMM_WORLD
CELL_TYPES = [dmesh.CellType.hexahedron, dmesh.CellType.tetrahedron]


def _channel3d(cell_type: dmesh.CellType, height: float):
    """A box channel ``[0, 2] x [0, height] x [0, 1.5]`` with walls at y = 0 and y = height.

    The wall-normal rows are graded and the nodes sheared in z, so the wall facets are
    neither squares nor aligned with the coordinate diagonals (a facet missing half its
    area would show).
    """
    mesh = dmesh.create_box(COMM, [[0, 0, 0], [2.0, height, 1.5]], [5, 6, 4], cell_type=cell_type)
    x = mesh.geometry.x
    x[:, 1] = height * (x[:, 1] / height) ** 1.3
    x[:, 0] += 0.2 * x[:, 2] * np.sin(np.pi * x[:, 1] / height) * np.sin(np.pi * x[:, 0] / 2.0)
    fdim = 2
    facets = dmesh.locate_entities_boundary(
        mesh, fdim, lambda p: np.isclose(p[1], 0.0) | np.isclose(p[1], height)
    )
    tags = dmesh.meshtags(mesh, fdim, facets, np.full(facets.size, 3, dtype=np.int32))
    return mesh, tags


@pytest.mark.parametrize("cell_type", CELL_TYPES, ids=lambda c: c.name)
def test_wall_distance_exact_in_a_3d_channel(cell_type):
    height = 1.2
    mesh, tags = _channel3d(cell_type, height)
    segments = wall_segments(mesh, tags, [3])
    assert segments.shape[1:] == (3, 3)
    # Both walls are covered: the triangles' areas add up to twice the wall area.
    areas = 0.5 * np.linalg.norm(
        np.cross(segments[:, 1] - segments[:, 0], segments[:, 2] - segments[:, 0]), axis=1
    )
    if COMM.size == 1:
        np.testing.assert_allclose(areas.sum(), 2 * 2.0 * 1.5, rtol=1e-12)
    rng = np.random.default_rng(5)
    points = rng.uniform([0.3, 0.0, 0.0], [1.7, height, 1.5], size=(3000, 3))
    exact = np.minimum(points[:, 1], height - points[:, 1])
    np.testing.assert_allclose(wall_distance(points, mesh, tags, [3]), exact, atol=1e-13)
    V = fem.functionspace(mesh, ("Lagrange", 1))
    y = V.tabulate_dof_coordinates()[:, 1]
    distance = wall_distance_function(V, tags, [3])
    np.testing.assert_allclose(distance.x.array, np.minimum(y, height - y), atol=1e-13)


def test_extruded_hill_wall_distance_is_the_2d_one():
    """On the extruded hill (a = 0) the distance at (x, y, z) is the 2-D distance at (x, y)."""
    resolution = 0.1
    tagged = structured_hill3d_mesh(1.0, resolution=resolution, span_cells=3, comm=COMM)
    section = structured_hill_mesh(1.0, resolution=resolution, comm=COMM)
    walls = [tagged.boundaries["bottom"], tagged.boundaries["top"]]
    walls2d = [section.boundaries["bottom"], section.boundaries["top"]]
    V = fem.functionspace(tagged.mesh, ("Lagrange", 1))
    points = V.tabulate_dof_coordinates()
    rng = np.random.default_rng(6)
    # the nodes and points between them (inside the domain: convex combinations of nodes of
    # one cell column would need the cells; the nodes shifted along z stay inside)
    shifted = points + np.column_stack(
        [np.zeros(len(points)), np.zeros(len(points)), rng.uniform(0, SPAN_LENGTH, len(points))]
    )
    shifted[:, 2] %= SPAN_LENGTH
    queries = np.concatenate([points, shifted])
    distance3d = wall_distance(queries, tagged.mesh, tagged.facet_tags, walls, period=tagged.period)
    distance2d = wall_distance(
        queries[:, :2], section.mesh, section.facet_tags, walls2d, period=section.period
    )
    np.testing.assert_allclose(distance3d, distance2d, rtol=0, atol=1e-12)
