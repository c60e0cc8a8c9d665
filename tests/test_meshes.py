"""Periodic-hill geometry, structured and unstructured hill meshes."""


import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from meshes.hills import (
    TOP_WALL_HEIGHT,
    hill_flank_length,
    hill_period,
    hill_profile,
    hill_profile_derivative,
)
from meshes.structured import (
    DEFAULT_WALL_GRADING,
    first_cell_centre_distance,
    structured_hill_grid,
    structured_hill_mesh,
    wall_normal_coordinates,
)
from meshes.tagged import HILL_BOUNDARIES, MeshError
from tests.mesh_measures import boundary_lengths, mesh_area

# Native-unit junctions of the profile pieces and the tabulated heights there (h = 28).
JUNCTIONS = [(9.0, 27.0), (14.0, 24.0), (20.0, 19.0), (30.0, 11.0), (40.0, 4.0), (54.0, 0.0)]


def exact_area(alpha: float) -> float:
    x = np.linspace(0.0, hill_period(alpha), 400_001)
    return float(np.trapezoid(TOP_WALL_HEIGHT - hill_profile(x, alpha), x))


def exact_wall_length(alpha: float) -> float:
    x = np.linspace(0.0, hill_period(alpha), 400_001)
    return float(np.trapezoid(np.hypot(1.0, hill_profile_derivative(x, alpha)), x))


# ---------------------------------------------------------------- profile


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.5, 2.0])
def test_period_formula(alpha):
    assert hill_period(alpha) == pytest.approx((252 - 108 * (1 - alpha)) / 28, rel=1e-14)


def test_period_and_top_wall_at_alpha_one():
    assert hill_period(1.0) == pytest.approx(9.0, rel=1e-14)
    assert TOP_WALL_HEIGHT == pytest.approx(85 / 28)
    assert hill_flank_length(1.0) == pytest.approx(54 / 28)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_crests_and_flat_floor(alpha):
    period = hill_period(alpha)
    assert hill_profile(0.0, alpha) == pytest.approx(1.0, abs=1e-15)
    assert hill_profile(period, alpha) == pytest.approx(1.0, abs=1e-15)
    flank = hill_flank_length(alpha)
    floor = np.linspace(flank, period - flank, 101)
    np.testing.assert_array_equal(hill_profile(floor, alpha), 0.0)
    assert np.all(hill_profile(np.linspace(0.0, period, 1001), alpha) >= 0.0)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_junction_values_and_continuity(alpha):
    for native_x, native_height in JUNCTIONS:
        x = native_x * alpha / 28.0
        below, at = hill_profile([x - 1e-9, x], alpha)
        assert at == pytest.approx(native_height / 28.0, abs=1e-3)
        assert below == pytest.approx(at, abs=1e-3)
        # Mirrored junction on the right flank.
        assert hill_profile(hill_period(alpha) - x, alpha) == pytest.approx(at, abs=1e-12)


def test_profile_is_uncapped_as_written():
    # The first cubic rises slightly above the crest before descending (max near x = 2.13/28).
    x = np.linspace(0.0, 0.2, 20001)
    assert hill_profile(x, 1.0).max() == pytest.approx(1.0 + 0.0102 / 28, abs=2e-6)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_symmetry_and_periodic_wrap(alpha):
    period = hill_period(alpha)
    x = np.linspace(0.0, period, 5001)
    np.testing.assert_allclose(hill_profile(x, alpha), hill_profile(period - x, alpha), atol=1e-13)
    np.testing.assert_allclose(hill_profile(x, alpha), hill_profile(x + 3 * period, alpha), atol=1e-12)
    np.testing.assert_allclose(hill_profile(-x, alpha), hill_profile(period - x, alpha), atol=1e-12)


def test_profile_keeps_shape():
    x = np.linspace(0.0, 9.0, 12).reshape(3, 4)
    assert hill_profile(x).shape == (3, 4)
    assert hill_profile_derivative(x).shape == (3, 4)


def test_stretching_maps_flanks():
    # A flank point at native x moves to alpha x: same height as the unstretched profile.
    x = np.linspace(0.0, 54.0, 200) / 28.0
    np.testing.assert_allclose(hill_profile(2.0 * x, 2.0), hill_profile(x, 1.0), atol=1e-14)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_derivative_matches_finite_differences(alpha):
    period = hill_period(alpha)
    x = np.linspace(0.013, period - 0.013, 3001)
    step = 1e-6
    numeric = (hill_profile(x + step, alpha) - hill_profile(x - step, alpha)) / (2 * step)
    np.testing.assert_allclose(hill_profile_derivative(x, alpha), numeric, atol=1e-5)
    assert hill_profile_derivative(period / 2, alpha) == 0.0


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        hill_profile(1.0, alpha)
    with pytest.raises(ValueError, match="alpha"):
        hill_period(alpha)


# ---------------------------------------------------------------- structured grid (numpy)


def test_wall_normal_coordinates():
    eta = wall_normal_coordinates(40)
    assert eta.shape == (41,)
    assert eta[0] == 0.0 and eta[-1] == 1.0
    assert np.all(np.diff(eta) > 0)
    np.testing.assert_allclose(eta, 1.0 - eta[::-1], atol=1e-15)
    # Graded: smaller rows at the walls than in the middle.
    assert np.diff(eta)[0] < 0.5 * np.diff(eta)[20]
    np.testing.assert_allclose(wall_normal_coordinates(10, 0.0), np.linspace(0, 1, 11))
    with pytest.raises(ValueError, match="wall_grading"):
        wall_normal_coordinates(10, -1.0)
    with pytest.raises(ValueError, match="ny"):
        wall_normal_coordinates(0)


def test_first_cell_centre_distance_matches_published_mesh():
    distance = first_cell_centre_distance(1.0, resolution=1.0)
    assert distance == pytest.approx(0.0022, rel=0.01)
    # From the eta spacing directly.
    eta = wall_normal_coordinates(200, DEFAULT_WALL_GRADING)
    assert 0.5 * eta[1] * (TOP_WALL_HEIGHT - 1.0) == pytest.approx(distance, rel=1e-12)


@pytest.mark.parametrize(("alpha", "resolution"), [(0.5, 0.1), (1.0, 0.1), (2.0, 0.15)])
def test_structured_grid_counts_and_matched_sides(alpha, resolution):
    grid = structured_hill_grid(alpha, resolution=resolution)
    assert grid.nx == round(200 * alpha * resolution)
    assert grid.ny == round(200 * resolution)
    assert grid.cells.shape == (grid.nx * grid.ny, 4)
    assert grid.points.shape == ((grid.nx + 1) * (grid.ny + 1), 2)
    x, y = grid.points.T
    left, right = np.sort(y[x == 0.0]), np.sort(y[x == grid.period])
    assert left.size == right.size == grid.ny + 1
    np.testing.assert_array_equal(left, right)
    # Column nodes follow the wall: bottom row on the profile, top row on the flat top wall.
    bottom_row = grid.points[: grid.nx + 1]
    np.testing.assert_allclose(bottom_row[:, 1], hill_profile(bottom_row[:, 0], alpha), atol=1e-14)
    np.testing.assert_array_equal(grid.points[-(grid.nx + 1) :, 1], TOP_WALL_HEIGHT)
    triangles = structured_hill_grid(alpha, resolution=resolution, cell_type="triangle")
    assert triangles.cells.shape == (2 * grid.nx * grid.ny, 3)


def test_structured_grid_rejects_bad_input():
    with pytest.raises(ValueError, match="cell_type"):
        structured_hill_grid(1.0, cell_type="hexagon")
    with pytest.raises(ValueError, match="resolution"):
        structured_hill_grid(1.0, resolution=0.0)
    with pytest.raises(ValueError, match="alpha"):
        structured_hill_grid(-0.5)


# ---------------------------------------------------------------- dolfinx meshes


@pytest.mark.parametrize(
    ("alpha", "cell_type"), [(1.0, "quadrilateral"), (0.5, "triangle"), (2.0, "quadrilateral")]
)
def test_structured_hill_mesh(alpha, cell_type):
    resolution = 0.1
    tagged = structured_hill_mesh(alpha, resolution=resolution, cell_type=cell_type)
    grid = structured_hill_grid(alpha, resolution=resolution, cell_type=cell_type)
    period = hill_period(alpha)

    assert tagged.kind == "structured"
    assert tagged.boundaries == HILL_BOUNDARIES
    np.testing.assert_array_equal(tagged.period, [period, 0.0])
    assert tagged.info["num_cells"] == grid.cells.shape[0]
    assert tagged.mesh.topology.index_map(2).size_global == grid.cells.shape[0]
    json.dumps(tagged.info)

    # P1 area is the trapezoid rule over the node columns, and close to the exact integral.
    x_columns = np.linspace(0.0, period, grid.nx + 1)
    column_area = np.trapezoid(TOP_WALL_HEIGHT - hill_profile(x_columns, alpha), x_columns)
    area = mesh_area(tagged.mesh)
    assert area == pytest.approx(column_area, rel=1e-12)
    assert area == pytest.approx(exact_area(alpha), rel=2e-3)

    lengths = boundary_lengths(tagged)
    crest_gap = TOP_WALL_HEIGHT - 1.0
    assert lengths["left"] == pytest.approx(crest_gap, rel=1e-12)
    assert lengths["right"] == pytest.approx(crest_gap, rel=1e-12)
    assert lengths["top"] == pytest.approx(period, rel=1e-12)
    bottom = hill_profile(x_columns, alpha)
    polygon_length = np.hypot(np.diff(x_columns), np.diff(bottom)).sum()
    assert lengths["bottom"] == pytest.approx(polygon_length, rel=1e-12)
    assert lengths["bottom"] == pytest.approx(exact_wall_length(alpha), rel=3e-2)
    # Every exterior facet is tagged with one of the four roles.
    local_values = np.unique(tagged.facet_tags.values)
    assert set(local_values) <= set(HILL_BOUNDARIES.values())
    assert tagged.facets("left").size > 0
    with pytest.raises(MeshError, match="inlet"):
        tagged.tag("inlet")


def test_unstructured_hill_mesh(tmp_path):
    from meshes.io import read_mesh
    from meshes.unstructured import unstructured_hill_mesh

    alpha = 1.0
    msh_path = tmp_path / "hill.msh"
    tagged = unstructured_hill_mesh(alpha, size=0.25, msh_path=msh_path)
    period = hill_period(alpha)
    assert tagged.kind == "unstructured"
    assert tagged.mesh.topology.cell_name() == "triangle"
    np.testing.assert_array_equal(tagged.period, [period, 0.0])
    json.dumps(tagged.info)
    assert set(np.unique(tagged.facet_tags.values)) == set(HILL_BOUNDARIES.values())
    assert tagged.cell_tags is not None

    # Wall nodes lie on the exact profile, so the area is the exact one up to the chord error.
    assert mesh_area(tagged.mesh) == pytest.approx(exact_area(alpha), rel=1e-5)
    lengths = boundary_lengths(tagged)
    assert lengths["left"] == pytest.approx(TOP_WALL_HEIGHT - 1.0, rel=1e-12)
    assert lengths["right"] == pytest.approx(TOP_WALL_HEIGHT - 1.0, rel=1e-12)
    assert lengths["top"] == pytest.approx(period, rel=1e-12)
    assert lengths["bottom"] == pytest.approx(exact_wall_length(alpha), rel=1e-4)

    x = tagged.mesh.geometry.x
    left = np.sort(x[np.abs(x[:, 0]) < 1e-10, 1])
    right = np.sort(x[np.abs(x[:, 0] - period) < 1e-10, 1])
    assert left.size == right.size > 5
    np.testing.assert_allclose(left, right, atol=1e-10)
    # Refined towards the walls: the side's first spacing is much smaller than the largest.
    spacing = np.diff(left)
    assert spacing[0] < 0.5 * spacing.max()

    reread = read_mesh(msh_path)
    assert reread.boundaries == HILL_BOUNDARIES
    assert reread.info["num_cells"] == tagged.info["num_cells"]


def test_unstructured_rejects_bad_sizes():
    from meshes.unstructured import unstructured_hill_mesh

    with pytest.raises(ValueError, match="wall_size"):
        unstructured_hill_mesh(1.0, size=0.1, wall_size=0.2)
    with pytest.raises(ValueError, match="growth"):
        unstructured_hill_mesh(1.0, size=0.1, growth=1.0)
    with pytest.raises(ValueError, match="alpha"):
        unstructured_hill_mesh(0.0)


MPI_SCRIPT = textwrap.dedent(
    """
    from mpi4py import MPI

    import json
    import sys

    import ufl
    from dolfinx import fem

    from meshes.channel import channel_with_cylinder_msh
    from meshes.io import read_mesh
    from meshes.structured import structured_hill_grid, structured_hill_mesh
    from meshes.unstructured import unstructured_hill_mesh

    comm = MPI.COMM_WORLD
    results = {}
    for name, tagged in [
        ("structured", structured_hill_mesh(1.0, resolution=0.15)),
        ("unstructured", unstructured_hill_mesh(1.0, size=0.3)),
    ]:
        mesh = tagged.mesh
        area = comm.allreduce(fem.assemble_scalar(fem.form(1.0 * ufl.dx(domain=mesh))))
        ds = ufl.Measure("ds", domain=mesh, subdomain_data=tagged.facet_tags)
        lengths = {
            key: comm.allreduce(fem.assemble_scalar(fem.form(1.0 * ds(tag))))
            for key, tag in tagged.boundaries.items()
        }
        results[name] = {
            "area": area,
            "lengths": lengths,
            "cells": mesh.topology.index_map(2).size_global,
            "local_cells": comm.allgather(mesh.topology.index_map(2).size_local),
        }
    results["grid_cells"] = int(structured_hill_grid(1.0, resolution=0.15).cells.shape[0])

    # A .msh written by one rank, read back collectively.
    msh_path = sys.argv[1]
    if comm.rank == 0:
        channel_with_cylinder_msh(msh_path, size=0.08)
    comm.barrier()
    channel = read_mesh(msh_path)
    results["channel"] = {
        "area": comm.allreduce(fem.assemble_scalar(fem.form(1.0 * ufl.dx(domain=channel.mesh)))),
        "boundaries": channel.boundaries,
        "local_cells": comm.allgather(channel.mesh.topology.index_map(2).size_local),
    }
    results["size"] = comm.size
    if comm.rank == 0:
        print("RESULT" + json.dumps(results))
    """
)


@pytest.mark.mpi
def test_hill_meshes_under_mpi(tmp_path):
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which(
        "mpiexec"
    )
    if mpiexec is None:
        pytest.skip("mpiexec not found")
    script = tmp_path / "hill_mpi.py"
    script.write_text(MPI_SCRIPT)
    completed = subprocess.run(
        [mpiexec, "-n", "2", sys.executable, str(script), str(tmp_path / "channel.msh")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = next(row for row in completed.stdout.splitlines() if row.startswith("RESULT"))
    results = json.loads(line.removeprefix("RESULT"))
    assert results["size"] == 2

    structured = results["structured"]
    assert structured["cells"] == results["grid_cells"]
    assert all(count > 0 for count in structured["local_cells"])
    assert sum(structured["local_cells"]) == results["grid_cells"]
    grid = structured_hill_grid(1.0, resolution=0.15)
    x_columns = np.linspace(0.0, 9.0, grid.nx + 1)
    column_area = np.trapezoid(TOP_WALL_HEIGHT - hill_profile(x_columns), x_columns)
    assert structured["area"] == pytest.approx(column_area, rel=1e-12)
    assert structured["lengths"]["left"] == pytest.approx(TOP_WALL_HEIGHT - 1.0, rel=1e-12)
    assert structured["lengths"]["top"] == pytest.approx(9.0, rel=1e-12)

    unstructured = results["unstructured"]
    assert all(count > 0 for count in unstructured["local_cells"])
    assert unstructured["area"] == pytest.approx(exact_area(1.0), rel=1e-5)
    assert unstructured["lengths"]["right"] == pytest.approx(TOP_WALL_HEIGHT - 1.0, rel=1e-12)

    channel = results["channel"]
    assert channel["boundaries"] == {"inlet": 1, "outlet": 2, "walls": 3, "cylinder": 4}
    assert all(count > 0 for count in channel["local_cells"])
    assert channel["area"] == pytest.approx(2.2 * 0.41 - np.pi * 0.05**2, rel=2e-3)
