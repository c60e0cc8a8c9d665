"""The 3-D hill family: volumes, crest scaling, boundary tags and periodic node matching."""

from mpi4py import MPI

import numpy as np
import pytest
import ufl
from dolfinx import fem

from meshes.hills import TOP_WALL_HEIGHT, hill_period, hill_profile
from meshes.hills3d import (
    HILL3D_BOUNDARIES,
    SPAN_LENGTH,
    default_span_cells,
    map_to_crest_variant,
    structured_hill3d_grid,
    structured_hill3d_mesh,
    unstructured_hill3d_mesh,
)
from meshes.structured import structured_hill_grid, structured_hill_mesh
from solvers.boundaries import hill_boundary_spec
from solvers.periodic import PeriodicConstraint

COMM = MPI.COMM_WORLD


def _integral(expression, mesh) -> float:
    value = fem.assemble_scalar(fem.form(expression * ufl.dx(domain=mesh)))
    return COMM.allreduce(value, op=MPI.SUM)


def _profile_integral(alpha: float) -> float:
    """Integral of the hill profile over one period (fine trapezoid rule)."""
    x = np.linspace(0.0, hill_period(alpha), 200_001)
    return float(np.trapezoid(hill_profile(x, alpha), x))


def test_default_span_cells_keeps_r_quarter_under_half_a_million_unknowns():
    nz = default_span_cells(0.25)
    grid = structured_hill_grid(1.0, resolution=0.25)
    # Q2 velocity (3 components) and Q1 pressure after the x and z periodic reductions.
    q2_nodes = (2 * grid.nx) * (2 * grid.ny + 1) * (2 * nz)
    q1_nodes = grid.nx * (grid.ny + 1) * nz
    assert 3 * q2_nodes + q1_nodes < 500_000
    assert default_span_cells(1.0) == 28


def test_extruded_section_is_the_two_dimensional_grid_bit_for_bit():
    grid3d = structured_hill3d_grid(1.5, resolution=0.05, span_cells=3)
    grid2d = structured_hill_grid(1.5, resolution=0.05)
    layer = grid3d.points.reshape(grid3d.nz + 1, -1, 3)
    for k in range(grid3d.nz + 1):
        np.testing.assert_array_equal(layer[k, :, :2], grid2d.points)
        assert np.all(layer[k, :, 2] == k * SPAN_LENGTH / grid3d.nz)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_extruded_volume_is_the_section_area_times_the_span(alpha):
    tagged = structured_hill3d_mesh(alpha, resolution=0.05, span_cells=2, comm=COMM)
    section = structured_hill_mesh(alpha, resolution=0.05, comm=COMM)
    volume = _integral(1.0, tagged.mesh)
    area = _integral(1.0, section.mesh)
    assert volume == pytest.approx(area * SPAN_LENGTH, rel=1e-12)
    assert tagged.info["num_cells"] == 2 * section.info["num_cells"]
    np.testing.assert_array_equal(tagged.period, [hill_period(alpha), 0.0, SPAN_LENGTH])


@pytest.mark.parametrize("kind", ["structured", "unstructured"])
def test_crest_variation_scales_the_profile_by_h_of_z(kind):
    amplitude, alpha = 0.3, 1.0
    if kind == "structured":
        tagged = structured_hill3d_mesh(
            alpha, crest_amplitude=amplitude, resolution=0.1, span_cells=16, comm=COMM
        )
    else:
        tagged = unstructured_hill3d_mesh(alpha, crest_amplitude=amplitude, size=0.5, comm=COMM)
    mesh = tagged.mesh
    z = ufl.SpatialCoordinate(mesh)[2]
    profile_area = _profile_integral(alpha)
    # Volume = T L L_z - integral of h(z) b(x) = T L L_z - L_z B (cos averages out), and the
    # cos(2 pi z / L_z) moment is -a B L_z / 2: it measures the crest amplitude.
    exact_volume = SPAN_LENGTH * (TOP_WALL_HEIGHT * hill_period(alpha) - profile_area)
    moment = _integral(ufl.cos(2 * ufl.pi * z / SPAN_LENGTH), mesh)
    assert _integral(1.0, mesh) == pytest.approx(exact_volume, rel=2e-3)
    assert moment == pytest.approx(-amplitude * profile_area * SPAN_LENGTH / 2, rel=2e-2)


def test_crest_map_moves_walls_exactly_and_is_the_identity_at_zero():
    points = np.array(
        [[0.0, 1.0, 0.0], [0.0, TOP_WALL_HEIGHT, 1.0], [4.5, 0.0, 2.0], [0.5, 2.0, 2.25]]
    )
    np.testing.assert_array_equal(map_to_crest_variant(points, 1.0, 0.0), points)
    mapped = map_to_crest_variant(points, 1.0, 0.2)
    assert mapped[0, 1] == 1.2  # crest at z = 0 rises by a
    assert mapped[1, 1] == TOP_WALL_HEIGHT
    assert mapped[2, 1] == 0.0  # flat floor stays
    assert hill_profile(0.5) < mapped[3, 1] < TOP_WALL_HEIGHT
    with pytest.raises(ValueError, match="crest amplitude"):
        map_to_crest_variant(points, 1.0, 0.5)


@pytest.mark.parametrize("kind", ["structured", "unstructured"])
def test_tags_and_periodic_pairs_match_nodes_in_x_and_z(kind):
    if kind == "structured":
        tagged = structured_hill3d_mesh(
            1.0, crest_amplitude=0.1, resolution=0.05, span_cells=3, comm=COMM
        )
    else:
        tagged = unstructured_hill3d_mesh(1.0, crest_amplitude=0.1, size=0.6, comm=COMM)
    assert tagged.boundaries == HILL3D_BOUNDARIES
    tags = COMM.allreduce(set(np.unique(tagged.facet_tags.values).tolist()), op=MPI.BOR)
    assert tags == set(HILL3D_BOUNDARIES.values())
    mesh = tagged.mesh
    x = ufl.SpatialCoordinate(mesh)
    ds = ufl.Measure("ds", domain=mesh, subdomain_data=tagged.facet_tags)
    names = HILL3D_BOUNDARIES
    areas = {
        name: COMM.allreduce(fem.assemble_scalar(fem.form(1.0 * ds(tag))), op=MPI.SUM)
        for name, tag in names.items()
    }
    assert areas["left"] == pytest.approx(areas["right"], rel=1e-9)
    assert areas["front"] == pytest.approx(areas["back"], rel=1e-9)
    assert areas["top"] == pytest.approx(hill_period(1.0) * SPAN_LENGTH, rel=1e-12)
    top_height = COMM.allreduce(fem.assemble_scalar(fem.form(x[1] * ds(names["top"]))), op=MPI.SUM)
    assert top_height / areas["top"] == pytest.approx(TOP_WALL_HEIGHT, rel=1e-12)

    V = fem.functionspace(mesh, ("Lagrange", 1))
    spec = hill_boundary_spec(tagged.boundaries, tagged.period)
    assert len(spec.periodic) == 2
    constraint = PeriodicConstraint(V, tagged.facet_tags, spec.periodic)
    if kind == "structured":
        info = tagged.info
        nx, ny, nz = info["nx"], info["ny"], info["nz"]
        # right side, back side, minus their shared edge (a slave of both pairs)
        expected = (ny + 1) * (nz + 1) + (nx + 1) * (ny + 1) - (ny + 1)
        assert constraint.num_slaves == expected
    assert constraint.num_reduced_dofs == V.dofmap.index_map.size_global - constraint.num_slaves
    # A periodic function survives the prolongation: K (K^T f / multiplicity) = f.
    f = fem.Function(V)
    period = tagged.period
    f.interpolate(
        lambda p: np.sin(2 * np.pi * p[0] / period[0]) * np.cos(2 * np.pi * p[2] / period[2]) + p[1]
    )
    before = f.x.array.copy()
    constraint.make_periodic(f.x.petsc_vec)
    np.testing.assert_allclose(f.x.array, before, atol=1e-9)
    constraint.destroy()
