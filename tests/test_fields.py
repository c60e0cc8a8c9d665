from mpi4py import MPI

import numpy as np
import pytest
import ufl
from dolfinx import fem
from dolfinx import mesh as dmesh

from solvers.boundaries import hill_boundary_spec
from solvers.fields import (
    distance_to_facets,
    mixing_length,
    nodal_values,
    nodal_volumes,
    strain_rate_magnitude,
    wall_distance,
    wall_distance_function,
    wall_segments,
)
from solvers.periodic import PeriodicConstraint
from tests.mpi_scripts.tau_channel import BOUNDARIES, channel

COMM = MPI.COMM_WORLD


def _owned(function: fem.Function) -> np.ndarray:
    size = function.function_space.dofmap.index_map.size_local
    return function.x.array[:size]


def _brute_force(points: np.ndarray, segments: np.ndarray) -> np.ndarray:
    start = segments[None, :, 0, :]
    edge = segments[None, :, 1, :] - start
    t = np.clip(
        np.einsum("psi,psi->ps", points[:, None, :] - start, edge)
        / np.einsum("psi,psi->ps", edge, edge),
        0.0,
        1.0,
    )
    closest = start + t[..., None] * edge
    return np.linalg.norm(points[:, None, :] - closest, axis=-1).min(axis=1)


def test_wall_distance_exact_on_rectangle():
    height = 1.5
    mesh, tags = channel(COMM, 3.0, height, 12, 10)
    V = fem.functionspace(mesh, ("Lagrange", 1))
    distance = wall_distance_function(V, tags, [BOUNDARIES["bottom"], BOUNDARIES["top"]])
    y = V.tabulate_dof_coordinates()[:, 1]
    np.testing.assert_allclose(distance.x.array, np.minimum(y, height - y), atol=1e-14)
    # Off-node points as well (the distance is exact, not an interpolant).
    points = np.random.default_rng(1).uniform([0, 0], [3.0, height], size=(500, 2))
    exact = np.minimum(points[:, 1], height - points[:, 1])
    computed = wall_distance(points, mesh, tags, [1, 2])
    np.testing.assert_allclose(computed, exact, atol=1e-14)


def _bumpy_channel(length: float, height: float):
    """A channel whose bottom wall has a periodic bump centred at x = 0.9 L (and -0.1 L)."""
    mesh, tags = channel(COMM, length, height, 40, 12)
    x = mesh.geometry.x
    bump = 0.6 * np.exp(-((np.sin(np.pi * (x[:, 0] - 0.9 * length) / length) / 0.25) ** 2))
    x[:, 1] += bump * (1.0 - x[:, 1] / height)
    return mesh, tags


def test_wall_distance_matches_brute_force_with_periodic_images():
    length, height = 4.0, 1.0
    mesh, tags = _bumpy_channel(length, height)
    walls = [BOUNDARIES["bottom"], BOUNDARIES["top"]]
    segments = wall_segments(mesh, tags, walls)
    images = np.concatenate([segments + [shift, 0.0] for shift in (-length, 0.0, length)])
    rng = np.random.default_rng(2)
    points = rng.uniform([0.0, 0.1], [length, height - 0.01], size=(2000, 2))
    periodic = wall_distance(points, mesh, tags, walls, period=(length, 0.0))
    np.testing.assert_allclose(periodic, _brute_force(points, images), rtol=0, atol=1e-13)
    plain = wall_distance(points, mesh, tags, walls)
    np.testing.assert_allclose(plain, _brute_force(points, segments), rtol=0, atol=1e-13)
    # Near x = 0 the bump's periodic image (centred at x = -0.1 L) is the nearest wall.
    near_left = points[:, 0] < 0.1 * length
    assert np.any(periodic[near_left] < plain[near_left] - 0.05)
    assert np.all(periodic <= plain + 1e-15)


def test_distance_to_triangles_in_3d():
    rng = np.random.default_rng(3)
    triangles = rng.uniform(-1, 1, size=(30, 3, 3))
    points = rng.uniform(-1.5, 1.5, size=(100, 3))
    computed = distance_to_facets(points, triangles, neighbours=2)
    # A barycentric grid (vertices and edges included) of spacing edge/80 bounds the exact
    # distance from above, and closely.
    n = 80
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    keep = i + j <= n
    weights = np.column_stack([i[keep], j[keep], n - i[keep] - j[keep]]) / n
    samples = np.einsum("sv,tvi->tsi", weights, triangles).reshape(-1, 3)
    sampled = np.array([np.linalg.norm(samples - point, axis=1).min() for point in points])
    longest_edge = np.max(np.linalg.norm(triangles - np.roll(triangles, 1, axis=1), axis=-1))
    assert np.all(computed <= sampled + 1e-12)
    np.testing.assert_allclose(computed, sampled, atol=longest_edge / n)


def test_wall_distance_in_a_box():
    height = 2.0
    mesh = dmesh.create_box(COMM, [[0, 0, 0], [1, 1, height]], [3, 3, 4])
    fdim = 2
    facets = dmesh.locate_entities_boundary(
        mesh, fdim, lambda x: np.isclose(x[2], 0) | np.isclose(x[2], height)
    )
    tags = dmesh.meshtags(mesh, fdim, facets, np.full(facets.size, 7, dtype=np.int32))
    points = np.random.default_rng(4).uniform([0, 0, 0], [1, 1, height], size=(300, 3))
    computed = wall_distance(points, mesh, tags, [7])
    np.testing.assert_allclose(
        computed, np.minimum(points[:, 2], height - points[:, 2]), atol=1e-14
    )


def test_wall_distance_rejects_bad_input():
    mesh, tags = channel(COMM, 1.0, 1.0, 4, 4)
    with pytest.raises(ValueError, match="shape"):
        wall_distance(np.zeros((5,)), mesh, tags, [1])
    with pytest.raises(ValueError, match="NaN"):
        wall_distance(np.full((2, 2), np.nan), mesh, tags, [1])
    with pytest.raises(ValueError, match="wall tags"):
        wall_distance(np.zeros((2, 2)), mesh, tags, [99])
    with pytest.raises(ValueError, match="period"):
        wall_distance(np.zeros((2, 2)), mesh, tags, [1], period=(-1.0, 0.0))


def test_nodal_volumes_sum_to_area_and_join_periodic_copies():
    length, height = 2.0, 1.0
    mesh, tags = _bumpy_channel(length, height)
    area = COMM.allreduce(fem.assemble_scalar(fem.form(1.0 * ufl.dx(domain=mesh))), op=MPI.SUM)
    V = fem.functionspace(mesh, ("Lagrange", 1))
    volumes = nodal_volumes(V)
    assert np.all(_owned(volumes) > 0)
    assert COMM.allreduce(_owned(volumes).sum(), op=MPI.SUM) == pytest.approx(area, rel=1e-13)

    spec = hill_boundary_spec(BOUNDARIES, (length, 0.0))
    constraint = PeriodicConstraint(V, tags, spec.periodic)
    joined = nodal_volumes(V, constraint=constraint)
    reduced = constraint.restrict_vector(volumes.x.petsc_vec)
    assert reduced.sum() == pytest.approx(area, rel=1e-13)
    coordinates = V.tabulate_dof_coordinates()
    left = np.isclose(coordinates[:, 0], 0.0)
    right = np.isclose(coordinates[:, 0], length)
    # Same heights on both sides; each copy carries the sum of the two one-sided patches.
    left_order = np.argsort(coordinates[left, 1])
    right_order = np.argsort(coordinates[right, 1])
    np.testing.assert_allclose(
        joined.x.array[left][left_order], joined.x.array[right][right_order], rtol=1e-13
    )
    np.testing.assert_allclose(
        joined.x.array[left][left_order],
        volumes.x.array[left][left_order] + volumes.x.array[right][right_order],
        rtol=1e-13,
    )
    interior = ~(left | right)
    np.testing.assert_allclose(joined.x.array[interior], volumes.x.array[interior])


def test_strain_rate_of_couette_flow_is_exact():
    mesh = dmesh.create_unit_square(COMM, 6, 5)
    V = fem.functionspace(mesh, ("Lagrange", 1))
    W = fem.functionspace(mesh, ("Lagrange", 2, (2,)))
    velocity = fem.Function(W)
    velocity.interpolate(lambda x: np.vstack([x[1], np.zeros_like(x[0])]))
    np.testing.assert_allclose(strain_rate_magnitude(velocity, V).x.array, 1.0, atol=1e-12)


def test_strain_rate_of_poiseuille_flow_converges():
    errors = []
    for n in (8, 16, 32):
        mesh = dmesh.create_unit_square(COMM, n, n)
        V = fem.functionspace(mesh, ("Lagrange", 1))
        W = fem.functionspace(mesh, ("Lagrange", 2, (2,)))
        velocity = fem.Function(W)
        velocity.interpolate(lambda x: np.vstack([4 * x[1] * (1 - x[1]), np.zeros_like(x[0])]))
        strain = strain_rate_magnitude(velocity, V)
        y = ufl.SpatialCoordinate(mesh)[1]
        exact = abs(4 - 8 * y)
        error = fem.assemble_scalar(fem.form((strain - exact) ** 2 * ufl.dx))
        errors.append(np.sqrt(COMM.allreduce(error, op=MPI.SUM)))
    rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all(rates > 0.9), (errors, rates)


def test_nodal_values_of_p2_velocity():
    mesh = dmesh.create_unit_square(COMM, 5, 7)
    V = fem.functionspace(mesh, ("Lagrange", 1))
    W = fem.functionspace(mesh, ("Lagrange", 2, (2,)))
    velocity = fem.Function(W)
    velocity.interpolate(lambda x: np.vstack([x[0] ** 2 + x[1], np.sin(x[0]) * x[1] ** 2]))
    values = nodal_values(velocity, V)
    owned = V.dofmap.index_map.size_local
    x = V.tabulate_dof_coordinates()[:owned]
    assert values.shape == (owned, 2)
    expected = np.column_stack([x[:, 0] ** 2 + x[:, 1], np.sin(x[:, 0]) * x[:, 1] ** 2])
    # Interpolated P2 at its own nodes: exact for the quadratic component.
    np.testing.assert_allclose(values[:, 0], expected[:, 0], atol=1e-13)
    np.testing.assert_allclose(values[:, 1], expected[:, 1], atol=1e-12)
    scalar = fem.Function(V)
    scalar.x.array[:] = np.arange(scalar.x.array.size)
    assert nodal_values(scalar, V).shape == (owned, 1)
    with pytest.raises(ValueError, match="scalar P1"):
        nodal_values(velocity, W)


def test_mixing_length():
    distance = np.array([0.0, 0.1, 0.3, 5.0])
    np.testing.assert_allclose(mixing_length(distance), [0.0, 0.041, 0.123, 0.135])
    np.testing.assert_allclose(mixing_length(distance, kappa=1.0, cap=0.2), [0, 0.1, 0.2, 0.2])
    mesh = dmesh.create_unit_square(COMM, 3, 7)
    V = fem.functionspace(mesh, ("Lagrange", 1))
    y = ufl.SpatialCoordinate(mesh)[1]
    as_ufl = fem.Function(V)
    as_ufl.interpolate(fem.Expression(mixing_length(y), V.element.interpolation_points))
    nodes_y = V.tabulate_dof_coordinates()[:, 1]
    np.testing.assert_allclose(as_ufl.x.array, np.minimum(0.41 * nodes_y, 0.135), atol=1e-15)
    with pytest.raises(ValueError):
        mixing_length(distance, kappa=0.0)
