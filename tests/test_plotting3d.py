"""Figures of 3-D cases: plane sections of their cells, and the case figure (numpy only)."""

import numpy as np
import pytest

from vcnn.casefile import Case
from vcnn.plotting.cases import case3d_figure, plane_section, plot_case

LENGTH, HEIGHT, SPAN = 3.0, 1.0, 2.0


def box_case(nx: int, ny: int, nz: int, *, tetrahedra: bool = False) -> Case:
    """A channel periodic in x and z (each point stored once), hexahedra in dolfinx order.

    Rows are graded and the nodes sheared in x (inside the box), so sections are not
    aligned with the grid. Fields are linear in the coordinates, which the sections must
    reproduce exactly.
    """
    x = np.arange(nx) * LENGTH / nx
    y = HEIGHT * np.linspace(0.0, 1.0, ny + 1) ** 1.3
    z = np.arange(nz) * SPAN / nz
    gx, gy, gz = np.meshgrid(x, y, z, indexing="ij")
    points = np.stack([gx.ravel(), gy.ravel(), gz.ravel()], axis=1)
    points[:, 0] += 0.02 * np.sin(np.pi * points[:, 1] / HEIGHT)
    index = np.arange(len(points)).reshape(nx, ny + 1, nz)
    i, j, k = np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij")
    corners = [
        index[(i + di) % nx, j + dj, (k + dk) % nz].ravel()
        for dk in (0, 1) for dj in (0, 1) for di in (0, 1)
    ]
    cells = np.stack(corners, axis=1)
    if tetrahedra:  # the Kuhn split, a conforming tetrahedral mesh
        cells = cells[:, [[0, 1, 3, 7], [0, 1, 5, 7], [0, 2, 3, 7], [0, 2, 6, 7], [0, 4, 5, 7],
                          [0, 4, 6, 7]]].reshape(-1, 4)
    n = len(points)
    tau = 1.0 + 2.0 * points[:, 1] + 0.5 * points[:, 2]
    velocity = np.stack([points[:, 1] * (HEIGHT - points[:, 1]), np.zeros(n), 0.1 * points[:, 2]],
                        axis=1)
    return Case(
        points=points,
        velocity=velocity,
        tau=tau,
        strain_rate=np.ones(n),
        wall_distance=np.minimum(points[:, 1], HEIGHT - points[:, 1]),
        nodal_volume=np.full(n, LENGTH * HEIGHT * SPAN / n),
        is_wall=(points[:, 1] == 0) | (points[:, 1] == HEIGHT),
        period=np.array([LENGTH, 0.0, SPAN]),
        meta={"alpha": 1.0, "crest_amplitude": 0.0},
        extra={"cells": cells},
        name="box3d",
    )


def _spanwise(z: np.ndarray, nz: int) -> np.ndarray:
    """The stored z (0 to the last layer, then back to 0 at the period), linearly in z."""
    last = SPAN * (nz - 1) / nz
    return np.where(z <= last, z, last * (SPAN - z) / (SPAN - last))


def _area(section) -> float:
    tri = section.triangulation
    corners = np.stack([tri.x, tri.y], axis=1)[tri.triangles]
    one, two = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    return float(0.5 * np.abs(one[:, 0] * two[:, 1] - one[:, 1] * two[:, 0]).sum())


@pytest.mark.parametrize("nz", [2, 3])
@pytest.mark.parametrize("tetrahedra", [False, True], ids=["hexahedra", "tetrahedra"])
def test_plane_sections_tile_the_plane_and_interpolate_exactly(nz, tetrahedra):
    case = box_case(6, 4, nz, tetrahedra=tetrahedra)
    if tetrahedra and nz == 2:  # hexahedra tell the two sides apart by their vertex order
        with pytest.raises(ValueError, match="two cells across a period"):
            plane_section(case, 2, 0.3 * SPAN)
        return
    # two layers: every cell is half a period long; a plane through a node layer, and between
    for z in (SPAN / 2, 0.3 * SPAN, 0.9 * SPAN):
        section = plane_section(case, 2, z)
        assert section.axes == (0, 1)
        assert _area(section) == pytest.approx(LENGTH * HEIGHT, rel=1e-12)
        x, y = section.triangulation.x, section.triangulation.y
        stored = _spanwise(z, nz)  # the last layer's cells wrap around the period
        np.testing.assert_allclose(section.values(case.tau), 1.0 + 2.0 * y + 0.5 * stored,
                                   atol=1e-12)
        velocity = section.values(case.velocity)
        assert velocity.shape == (len(x), 3)
        np.testing.assert_allclose(velocity[:, 2], 0.1 * stored, atol=1e-12)
    section = plane_section(case, 1, 0.4)
    assert section.axes == (0, 2)
    assert _area(section) == pytest.approx(LENGTH * SPAN, rel=1e-12)
    np.testing.assert_allclose(
        section.values(case.tau), 1.8 + 0.5 * _spanwise(section.triangulation.y, nz), atol=1e-12
    )


def test_a_plane_outside_the_cells_and_a_case_without_cells_are_refused():
    case = box_case(4, 3, 3)
    with pytest.raises(ValueError, match="misses every cell"):
        plane_section(case, 1, 5.0)
    case.extra = {}
    with pytest.raises(ValueError, match="cells"):
        plane_section(case, 2, 1.0)


def test_case3d_figure(tmp_path):
    case = box_case(12, 6, 4)
    figure = case3d_figure(case)
    titles = [axis.get_title() for axis in figure.axes]
    assert any(t.startswith("box3d  (alpha = 1, crest amplitude 0): speed") for t in titles)
    assert sum(t.startswith("tau at y = ") for t in titles) == 3
    assert any(t.startswith("profiles at mid-span") for t in titles)
    profile_axes = [axis for axis in figure.axes if axis.get_xlabel() == "tau"]
    assert len(profile_axes) == 1 and len(profile_axes[0].get_lines()) == 4
    path = plot_case(case, tmp_path / "box3d.png")
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_vcnn_plot_draws_3d_cases(tmp_path, capsys):
    from vcnn.casefile import write_case
    from vcnn.cli import main as vcnn_main

    write_case(tmp_path / "cases" / "box3d.npz", box_case(8, 4, 3))
    assert vcnn_main(["-q", "plot", str(tmp_path / "cases"), "--out", str(tmp_path / "fig")]) == 0
    assert (tmp_path / "fig" / "box3d.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "box3d.png" in capsys.readouterr().out
