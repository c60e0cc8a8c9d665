import numpy as np
import pytest

from vcnn.casefile import Case
from vcnn.plotting.cases import case_triangulation, plot_case


def wavy_channel_case(with_cells: bool):
    nx, ny = 45, 11
    s, t = np.meshgrid(np.linspace(0, 9, nx, endpoint=False), np.linspace(0, 1, ny))
    bottom = 0.5 * (1 + np.cos(2 * np.pi * s / 9))
    points = np.c_[s.ravel(), (bottom + (3 - bottom) * t).ravel()]
    n = len(points)
    extra = {}
    if with_cells:
        # a periodic case stores x = 9 once, as x = 0: the last cell column wraps around
        index = np.arange(n).reshape(ny, nx)
        index = np.concatenate([index, index[:, :1]], axis=1)
        quads = np.stack(
            [index[:-1, :-1], index[:-1, 1:], index[1:, :-1], index[1:, 1:]], axis=-1
        ).reshape(-1, 4)
        extra["cells"] = quads
    return Case(
        points=points,
        velocity=np.c_[np.sin(np.pi * t.ravel()), np.zeros(n)],
        tau=(t * (1 - t)).ravel(),
        strain_rate=np.ones(n),
        wall_distance=np.ones(n),
        nodal_volume=np.ones(n),
        is_wall=np.zeros(n, bool),
        period=np.array([9.0, 0.0]),
        extra=extra,
    )


@pytest.mark.parametrize("with_cells", [True, False])
def test_triangulation_stays_inside_the_domain(with_cells):
    case = wavy_channel_case(with_cells)
    triangulation, source = case_triangulation(case)
    nodes = np.c_[triangulation.x, triangulation.y]
    np.testing.assert_allclose(nodes[:, 1], case.points[source, 1])
    mask = triangulation.mask
    keep = np.ones(len(triangulation.triangles), bool) if mask is None else ~mask
    centroids = nodes[triangulation.triangles[keep]].mean(axis=1)
    bottom = 0.5 * (1 + np.cos(2 * np.pi * centroids[:, 0] / 9))
    # no kept triangle lies below the wavy wall (Delaunay alone fills the concave part)
    assert np.all(centroids[:, 1] >= bottom - 0.02)
    # and the plotted area covers the domain: area = 3*9 - integral of bottom = 27 - 4.5
    corners = nodes[triangulation.triangles[keep]]
    e1, e2 = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    area = 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]).sum()
    assert area == pytest.approx(22.5, rel=0.02)


def test_plot_case_writes_png(tmp_path):
    path = plot_case(wavy_channel_case(True), tmp_path / "case.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["case.png"]
