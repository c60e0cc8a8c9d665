"""Figures of case files: triangulations of the closure points and field plots (matplotlib Agg).

Also the conventions every figure of the toolkit shares (:mod:`vcnn.plotting.training`,
:mod:`vcnn.plotting.simulation`): round contour levels (:func:`field_levels`), labelled colour
bars with round ticks (:func:`add_colorbar`), labelled plane axes (:func:`label_plane`) and
difference panels on a symmetric diverging scale centred at zero that say "identical to
round-off" instead of drawing a colour scale for a difference that is round-off
(:func:`draw_difference`). Figures are built as :class:`matplotlib.figure.Figure` objects
(``*_figure`` functions, no pyplot state) and written by the ``plot_*`` functions.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colorbar import Colorbar
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.tri import LinearTriInterpolator, Triangulation
from scipy.spatial import Delaunay, cKDTree

from vcnn.atomic import atomic_write
from vcnn.casefile import Case

logger = logging.getLogger(__name__)

#: Delaunay triangles with an edge longer than this many local point spacings are dropped:
#: they bridge concave parts of the domain (the hill) or holes (a cylinder).
_EDGE_FACTOR = 4.0

#: A difference whose largest magnitude is at most this fraction of the largest magnitude of
#: the compared field is round-off: it is written as text, not drawn on a colour scale.
ROUND_OFF = 1e-12

#: Colour-bar ticks (at most; round values chosen by :func:`round_locator`).
COLORBAR_TICKS = 6

#: Steps of round ticks and levels: 1, 2, 2.5 or 5 times a power of ten.
_ROUND_STEPS = (1.0, 2.0, 2.5, 5.0, 10.0)


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


def case_figure(case: Case, *, streamlines: bool = True) -> Figure:
    """Two panels of a 2-D case: the speed with streamlines, and tau.

    Args:
        case: a 2-D case.
        streamlines: draw streamlines of the velocity over the speed.

    Returns:
        The figure (not saved).
    """
    triangulation, source = case_triangulation(case)
    speed = np.linalg.norm(case.velocity, axis=1)[source]
    aspect = case_aspect(case)
    figure = Figure(figsize=(9, 2 * 7.4 * aspect + 1.5), layout="constrained")
    axes = figure.subplots(2, 1, sharex=True)
    image = axes[0].tricontourf(triangulation, speed, levels=field_levels(speed), cmap="viridis")
    add_colorbar(figure, image, axes[0], "|u|")
    if streamlines:
        _streamlines(axes[0], triangulation, case.velocity[source])
    tau = case.tau[source]
    image = axes[1].tricontourf(triangulation, tau, levels=field_levels(tau), cmap="magma")
    add_colorbar(figure, image, axes[1], "tau")
    for axis in axes:  # the domain, not the streamlines' overshoot
        axis.set_xlim(triangulation.x.min(), triangulation.x.max())
        axis.set_ylim(triangulation.y.min(), triangulation.y.max())
    axes[0].set_title(f"{case_title(case)}: speed and streamlines")
    axes[1].set_title(f"tau, integral {case.tau_integral():.4g}")
    for axis in axes:
        label_plane(axis)
        axis.label_outer()  # the shared x axis is labelled once, at the bottom
    return figure


def plot_case(case: Case, path: str | os.PathLike, *, streamlines: bool = True) -> Path:
    """Write :func:`case_figure` (speed with streamlines, and tau) to a PNG file.

    Args:
        case: a 2-D case.
        path: PNG file to write.
        streamlines: draw streamlines of the velocity over the speed.

    Returns:
        The path written.
    """
    return save_figure(case_figure(case, streamlines=streamlines), path, dpi=110)


def case_title(case: Case) -> str:
    """The case name, with its alpha when the case has one."""
    title = case.name
    if case.meta.get("alpha") is not None:
        title += f"  (alpha = {case.meta['alpha']:g})"
    return title


def field_levels(values: np.ndarray, *, levels: int = 40) -> np.ndarray:
    """Round contour levels (at most ``levels`` bands) spanning the finite values.

    A constant field gets a small range around its value, so that it still has levels.

    Args:
        values: field values (any shape; NaN and inf are ignored).
        levels: the most bands.

    Returns:
        Increasing levels; the first is at most the smallest value, the last at least the
        largest.
    """
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.linspace(0.0, 1.0, levels + 1)
    low, high = float(finite.min()), float(finite.max())
    if high - low <= 1e-12 * max(abs(low), abs(high)):  # constant: 5 % around the value
        pad = 0.05 * abs(low) if low != 0 else 0.05
        low, high = low - pad, high + pad
    return round_locator(levels).tick_values(low, high)


def round_locator(bins: int) -> MaxNLocator:
    """At most ``bins`` intervals between ticks 1, 2, 2.5 or 5 times a power of ten apart."""
    return MaxNLocator(nbins=bins, steps=_ROUND_STEPS)


def add_colorbar(figure: Figure, mappable, axis, label: str, **options) -> Colorbar:
    """A colour bar beside ``axis``, labelled, with round ticks (not the contour levels).

    Args:
        figure: the figure of ``axis``.
        mappable: what the bar shows (a contour set, an image).
        axis: the axes the bar goes beside.
        label: the quantity, e.g. ``tau`` or ``tau - tau_truth``.
        **options: passed to :meth:`matplotlib.figure.Figure.colorbar` (e.g. ``shrink``).

    Returns:
        The colour bar.
    """
    colorbar = figure.colorbar(mappable, ax=axis, **options)
    colorbar.locator = round_locator(COLORBAR_TICKS)
    colorbar.update_ticks()
    colorbar.set_label(label)
    return colorbar


def draw_difference(
    figure: Figure,
    axis,
    triangulation: Triangulation,
    difference: np.ndarray,
    reference: np.ndarray,
    label: str,
    *,
    levels: int = 40,
    **options,
) -> Colorbar | None:
    """A difference field on a symmetric diverging scale centred at zero, or a note.

    When the largest ``|difference|`` is at most :data:`ROUND_OFF` times the largest
    ``|reference|`` (a zero difference included), no colour scale is drawn: the domain is
    filled in light grey and the panel says "identical to round-off" with the largest
    ``|difference|``.

    Args:
        figure: the figure of ``axis``.
        axis: the axes to draw in.
        triangulation: the triangulation of the field.
        difference: values at the triangulation's nodes.
        reference: the compared field (its magnitude sets what is round-off).
        label: the quantity, e.g. ``tau - tau_truth`` (the colour bar's label).
        levels: contour bands.
        **options: passed to :func:`add_colorbar`.

    Returns:
        The colour bar, or None when the difference is round-off.
    """
    difference = np.asarray(difference, dtype=np.float64)
    magnitude = np.abs(difference[np.isfinite(difference)])
    bound = float(magnitude.max()) if magnitude.size else 0.0
    reference = np.abs(np.asarray(reference, dtype=np.float64))
    scale = float(np.nanmax(reference)) if reference.size else 0.0
    if bound <= ROUND_OFF * scale:
        axis.tricontourf(triangulation, np.zeros_like(difference), levels=[-1, 1], colors=["0.93"])
        axis.text(
            0.5,
            0.5,
            f"{label}: identical to round-off\n(max |difference| = {bound:.2g})",
            transform=axis.transAxes,
            ha="center",
            va="center",
            fontsize=9,
        )
        return None
    top = round_locator(4).tick_values(0.0, bound)[-1]  # a round bound >= max |d|
    image = axis.tricontourf(
        triangulation, difference, levels=np.linspace(-top, top, levels + 1), cmap="RdBu_r"
    )
    return add_colorbar(figure, image, axis, label, **options)


def label_plane(axis, *, fontsize: float | None = None) -> None:
    """Label the axes of a field panel (``x``, ``y``, in the mesh's length unit), equal aspect."""
    axis.set_xlabel("x", fontsize=fontsize)
    axis.set_ylabel("y", fontsize=fontsize)
    axis.set_aspect("equal")


def case_aspect(case: Case) -> float:
    """Height over width of a case's bounding box."""
    extent = np.ptp(case.points, axis=0)
    return float(extent[1] / max(extent[0], 1e-12))


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
