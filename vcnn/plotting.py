"""Figures of case files: triangulations of the closure points and field plots (matplotlib Agg)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.tri import LinearTriInterpolator, Triangulation
from scipy.spatial import Delaunay, cKDTree

from vcnn.atomic import atomic_write
from vcnn.casefile import Case

logger = logging.getLogger(__name__)

#: Delaunay triangles with an edge longer than this many local point spacings are dropped:
#: they bridge concave parts of the domain (the hill) or holes (a cylinder).
_EDGE_FACTOR = 4.0


class CaseTriangulation(NamedTuple):
    """A triangulation of a case's points and, for each of its nodes, the case point it shows.

    Attributes:
        triangulation: matplotlib Triangulation; its nodes are case points and periodic images.
        source: (M,) int64 index of the case point behind each triangulation node: plot
            ``values[source]``.
    """

    triangulation: Triangulation
    source: np.ndarray


def case_triangulation(case: Case) -> CaseTriangulation:
    """A triangulation of a 2-D case's points for contour plots.

    Uses the mesh cells stored under the extra key ``cells`` ((M, 3) triangles or (M, 4) quads
    of point indices) when present; cells that wrap around a periodic direction (a periodic
    case stores each point once) are drawn with periodic images of their points. Without
    ``cells``, a Delaunay triangulation with the triangles that leave the domain masked.

    Args:
        case: a 2-D case.

    Returns:
        The triangulation and the case point of each of its nodes.
    """
    if case.dim != 2:
        raise ValueError(f"field plots need a 2-D case, got dimension {case.dim}")
    points = case.points
    source = np.arange(case.num_points)
    cells = case.extra.get("cells")
    if cells is None:
        triangles = Delaunay(points).simplices
        spacing = cKDTree(points).query(points, k=2)[0][:, 1]
        edges = _edge_lengths(points, triangles)
        mask = edges.max(axis=1) > _EDGE_FACTOR * spacing[triangles].max(axis=1)
        for axis, length in enumerate(case.period):
            if length > 0:
                mask |= np.ptp(points[triangles, axis], axis=1) > 0.5 * length
        return CaseTriangulation(Triangulation(*points.T, triangles, mask=mask), source)
    # a copy: the periodic wrap below rewrites it, and the case's cells must stay as they are
    triangles = np.array(cells, dtype=np.int64)
    if triangles.shape[1] == 4:  # quadrilaterals in dolfinx's tensor-product vertex order
        triangles = np.concatenate([triangles[:, [0, 1, 3]], triangles[:, [0, 3, 2]]])
    nodes = points.copy()
    for axis, length in enumerate(case.period):
        if length <= 0:
            continue
        coordinate = nodes[triangles, axis]
        wrapped = coordinate < coordinate.max(axis=1, keepdims=True) - 0.5 * length
        # each node at a wrapped corner gets one image, one period further along the axis
        corners, inverse = np.unique(triangles[wrapped], return_inverse=True)
        images = nodes[corners]
        images[:, axis] += length
        triangles[wrapped] = len(nodes) + inverse
        source = np.concatenate([source, source[corners]])
        nodes = np.concatenate([nodes, images])
    return CaseTriangulation(Triangulation(*nodes.T, triangles), source)


def _edge_lengths(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    corners = points[triangles]
    return np.linalg.norm(corners - np.roll(corners, 1, axis=1), axis=2)


def plot_case(case: Case, path: str | os.PathLike, *, streamlines: bool = True) -> Path:
    """Two panels: speed with streamlines, and tau.

    Args:
        case: a 2-D case.
        path: PNG file to write.
        streamlines: draw streamlines of the velocity over the speed.

    Returns:
        The path written.
    """
    path = Path(path)
    triangulation, source = case_triangulation(case)
    speed = np.linalg.norm(case.velocity, axis=1)[source]
    extent = np.ptp(case.points, axis=0)
    aspect = extent[1] / max(extent[0], 1e-12)
    figure, axes = plt.subplots(2, 1, figsize=(9, 2 * 9 * aspect + 1.2), constrained_layout=True)
    image = axes[0].tricontourf(triangulation, speed, levels=40, cmap="viridis")
    figure.colorbar(image, ax=axes[0], label="|u|")
    if streamlines:
        _streamlines(axes[0], triangulation, case.velocity[source])
    image = axes[1].tricontourf(triangulation, case.tau[source], levels=40, cmap="magma")
    figure.colorbar(image, ax=axes[1], label="tau")
    title = case.name
    if case.meta.get("alpha") is not None:
        title += f"  (alpha = {case.meta['alpha']:g})"
    axes[0].set_title(f"{title}: speed and streamlines")
    axes[1].set_title(f"tau, integral {case.tau_integral():.4g}")
    for axis in axes:
        axis.set_aspect("equal")
        axis.set_xlabel("x")
        axis.set_ylabel("y")
    return save_figure(figure, path, dpi=110)


def save_figure(figure, path: str | os.PathLike, *, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically (the format from the suffix) and close it."""
    path = Path(path)
    try:
        atomic_write(path, lambda stream: figure.savefig(stream, format=path.suffix[1:], dpi=dpi))
    finally:
        plt.close(figure)
    return path


def _streamlines(axis, triangulation: Triangulation, velocity: np.ndarray) -> None:
    lower = np.array([triangulation.x.min(), triangulation.y.min()])
    upper = np.array([triangulation.x.max(), triangulation.y.max()])
    nx = 160
    ny = max(int(nx * (upper[1] - lower[1]) / (upper[0] - lower[0])), 20)
    x = np.linspace(lower[0], upper[0], nx)
    y = np.linspace(lower[1], upper[1], ny)
    grid_x, grid_y = np.meshgrid(x, y)
    u = LinearTriInterpolator(triangulation, velocity[:, 0])(grid_x, grid_y)
    v = LinearTriInterpolator(triangulation, velocity[:, 1])(grid_x, grid_y)
    axis.streamplot(x, y, u, v, color="white", linewidth=0.5, density=1.0, arrowsize=0.6)
