"""Figures of case files: triangulations of the closure points and field plots (matplotlib Agg).

Also the conventions every figure of the toolkit shares (:mod:`vcnn.plotting.training`,
:mod:`vcnn.plotting.simulation`): round contour levels (:func:`field_levels`), labelled colour
bars with round ticks (:func:`add_colorbar`), labelled plane axes (:func:`label_plane`) and
difference panels on a symmetric diverging scale centred at zero that say "identical to
round-off" instead of drawing a colour scale for a difference that is round-off
(:func:`draw_difference`). Figures are built as :class:`matplotlib.figure.Figure` objects
(``*_figure`` functions, no pyplot state) and written by the ``plot_*`` functions.

A 3-D case is drawn through plane sections of its cells (:func:`plane_section`): the mid-span
x-y plane, x-z planes at a few heights, and profiles across the channel.
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

    def values(self, field: np.ndarray) -> np.ndarray:
        """A nodal field of the case at the triangulation's nodes (as :class:`PlaneSection`).

        Args:
            field: (N,) or (N, k) values at the case points.

        Returns:
            (M,) or (M, k): ``field[source]``.
        """
        return np.asarray(field)[self.source]


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


#: A hexahedron in dolfinx's tensor-product vertex order as six tetrahedra around its 0-7
#: diagonal (neighbouring cells of a structured grid split their shared faces alike).
_HEXAHEDRON_TETRAHEDRA = np.array(
    [[0, 1, 3, 7], [0, 1, 5, 7], [0, 2, 3, 7], [0, 2, 6, 7], [0, 4, 5, 7], [0, 4, 6, 7]]
)

#: The six edges of a tetrahedron, as pairs of its vertices.
_TETRAHEDRON_EDGES = np.array([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])


class PlaneSection(NamedTuple):
    """A plane section of a 3-D case: a triangulation whose nodes interpolate case points.

    Each node lies on an edge of a cell, between the case points ``ends[:, 0]`` and
    ``ends[:, 1]`` at ``fraction`` from the first, so a nodal field ``f`` is
    ``f[ends[:, 0]] + fraction * (f[ends[:, 1]] - f[ends[:, 0]])`` there (:meth:`values`):
    the piecewise-linear field of the cells (hexahedra split into tetrahedra), sectioned.

    Attributes:
        triangulation: matplotlib Triangulation in the plane's two other coordinates (x-y for
            a z plane, x-z for a y plane).
        ends: (M, 2) int64 case points at both ends of each node's edge.
        fraction: (M,) float64 position of each node along its edge.
        axes: the two case coordinates of the triangulation's x and y, e.g. ``(0, 2)``.
    """

    triangulation: Triangulation
    ends: np.ndarray
    fraction: np.ndarray
    axes: tuple[int, int]

    def values(self, field: np.ndarray) -> np.ndarray:
        """A nodal field of the case at the section's nodes.

        Args:
            field: (N,) or (N, k) float values at the case points.

        Returns:
            (M,) or (M, k) float64.
        """
        field = np.asarray(field, dtype=np.float64)
        first, second = field[self.ends[:, 0]], field[self.ends[:, 1]]
        weight = self.fraction.reshape((-1,) + (1,) * (field.ndim - 1))
        return first + weight * (second - first)


def case_tetrahedra(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """The cells of a 3-D case as tetrahedra, with their corners unwrapped across periods.

    Args:
        case: a 3-D case whose extra key ``cells`` holds (M, 4) tetrahedra or (M, 8)
            hexahedra (dolfinx vertex order) of point indices.

    Returns:
        (T, 4) int64 point indices and (T, 4, 3) float64 corner coordinates; a cell that wraps
        around a periodic direction has its corners on one side, one period apart.

    Raises:
        ValueError: not a 3-D case, no volume cells, or tetrahedra exactly half a period long
            (two cells across a period: which side they lie on is ambiguous).
    """
    cells = case.extra.get("cells")
    if case.dim != 3 or cells is None or cells.ndim != 2 or cells.shape[1] not in (4, 8):
        raise ValueError(
            "3-D figures section the case's cells: a 3-D case with (M, 4) tetrahedra or (M, 8) "
            "hexahedra under the extra key 'cells' is needed"
        )
    cells = np.asarray(cells, dtype=np.int64)
    corners = case.points[cells]
    for axis, length in enumerate(case.period):
        if length <= 0:
            continue
        coordinate = corners[..., axis]
        top = coordinate.max(axis=1, keepdims=True)
        # more than half a period below the cell's top: a corner across the periodic side
        coordinate[coordinate < top - 0.5 * length * (1.0 + 1e-9)] += length
        if cells.shape[1] == 8:
            _unwrap_half_period_hexahedra(corners, axis, length)
        elif np.any(np.abs(np.ptp(coordinate, axis=1) - 0.5 * length) <= 1e-9 * length):
            raise ValueError(
                "a tetrahedral case with two cells across a period cannot be sectioned: its "
                "cells half a period long are the same on both sides of the periodic boundary"
            )
    if cells.shape[1] == 8:
        split = _HEXAHEDRON_TETRAHEDRA
        return cells[:, split].reshape(-1, 4), corners[:, split].reshape(-1, 4, 3)
    return cells, corners


def _unwrap_half_period_hexahedra(corners: np.ndarray, axis: int, length: float) -> None:
    """Unwrap, in place, the hexahedra exactly half a period long along ``axis``.

    With two cells across a period, a cell and its neighbour across the periodic side have
    the same corner coordinates; only the vertex order tells them apart. Cells are taken as
    positively oriented in dolfinx's tensor-product order (as :mod:`meshes.hills3d` builds
    them): the corners half a period below are moved up when that makes the cell positive.
    """
    coordinate = corners[..., axis]
    tie = np.abs(np.ptp(coordinate, axis=1) - 0.5 * length) <= 1e-9 * length
    if not tie.any():
        return
    candidate = corners[tie].copy()
    low = candidate[..., axis] < candidate[..., axis].max(axis=1, keepdims=True) - 0.25 * length
    candidate[..., axis] += low * length
    flip = (_hexahedron_orientation(corners[tie]) < 0) & (_hexahedron_orientation(candidate) > 0)
    corners[np.flatnonzero(tie)[flip]] = candidate[flip]


def _hexahedron_orientation(corners: np.ndarray) -> np.ndarray:
    """Sign of the Jacobian at vertex 0 of hexahedra (M, 8, 3) in tensor-product order."""
    edges = corners[:, [1, 2, 4]] - corners[:, [0]]
    return np.sign(np.linalg.det(edges.transpose(0, 2, 1)))


def plane_section(case: Case, axis: int, position: float) -> PlaneSection:
    """The section of a 3-D case's cells by the plane ``x[axis] = position``.

    Nodes within 1e-9 of the case's extent of the plane are taken as on it: a plane through a
    layer of nodes (the mid-span plane of an even number of layers) shows their values.

    Args:
        case: a 3-D case with cells (see :func:`case_tetrahedra`).
        axis: 0, 1 or 2: the coordinate the plane is normal to.
        position: where the plane cuts that coordinate.

    Returns:
        The section (see :class:`PlaneSection`).

    Raises:
        ValueError: the case has no volume cells, or the plane misses every cell.
    """
    tetrahedra, corners = case_tetrahedra(case)
    extent = float(np.ptp(case.points[:, axis])) or 1.0
    offset = corners[..., axis] - position
    on_plane = np.abs(offset) < 1e-9 * extent
    for side in (1.0, -1.0):  # the plane passes just below such nodes, or above at the top
        offset[on_plane] = side * 1e-9 * extent
        crossed = (offset.min(axis=1) < 0) & (offset.max(axis=1) > 0)
        if crossed.any():
            break
    tetrahedra, corners, offset = tetrahedra[crossed], corners[crossed], offset[crossed]
    on_plane = on_plane[crossed]
    if not len(tetrahedra):
        raise ValueError(f"the plane x[{axis}] = {position:g} misses every cell of the case")
    start, end = _TETRAHEDRON_EDGES[:, 0], _TETRAHEDRON_EDGES[:, 1]
    cut = np.sign(offset[:, start]) != np.sign(offset[:, end])  # (T, 6): 3 or 4 edges each
    rise = offset[:, start] - offset[:, end]
    fraction = np.where(cut, offset[:, start] / np.where(cut, rise, 1.0), 0.0)
    # a node on the plane is a node of the section: the slivers next to it collapse to
    # nothing (and are dropped) instead of leaving near-duplicate nodes
    fraction = np.where(on_plane[:, start], 0.0, np.where(on_plane[:, end], 1.0, fraction))
    plane_axes = tuple(a for a in range(3) if a != axis)
    nodes = corners[:, start][..., plane_axes] + fraction[..., None] * (
        corners[:, end][..., plane_axes] - corners[:, start][..., plane_axes]
    )  # (T, 6, 2)
    # the cut edges of each tetrahedron first, in order of angle around their centre
    centre = (nodes * cut[..., None]).sum(axis=1) / cut.sum(axis=1, keepdims=True)
    angle = np.arctan2(*(nodes - centre[:, None, :]).transpose(2, 0, 1)[::-1])
    order = np.argsort(np.where(cut, angle, np.inf), axis=1)
    count = cut.sum(axis=1)
    rows = np.arange(len(tetrahedra))[:, None]
    first = np.stack([order[:, 0], order[:, 1], order[:, 2]], axis=1)
    quads = count == 4
    second = np.stack([order[quads, 0], order[quads, 2], order[quads, 3]], axis=1)
    corner_edges = np.concatenate([first, second])  # (K, 3) edge of each triangle corner
    owners = np.concatenate([rows[:, 0], rows[quads, 0]])
    coordinates = nodes[owners[:, None], corner_edges].reshape(-1, 2)
    ends = np.stack(
        [tetrahedra[owners[:, None], start[corner_edges]],
         tetrahedra[owners[:, None], end[corner_edges]]],
        axis=-1,
    ).reshape(-1, 2)
    weights = fraction[owners[:, None], corner_edges].reshape(-1)
    # one node per place: matplotlib's interpolators need a triangulation without duplicates
    scale = float(np.ptp(coordinates, axis=0).max()) or 1.0
    _, unique, inverse = np.unique(
        np.round(coordinates / (1e-9 * scale)), axis=0, return_index=True, return_inverse=True
    )
    triangles = inverse.reshape(-1, 3)
    keep = (triangles[:, 0] != triangles[:, 1]) & (triangles[:, 1] != triangles[:, 2])
    keep &= triangles[:, 0] != triangles[:, 2]
    triangulation = Triangulation(*coordinates[unique].T, triangles[keep])
    return PlaneSection(triangulation, ends[unique], weights[unique], plane_axes)


def mid_span(case: Case) -> float:
    """The z of the mid-span x-y plane of a 3-D case (half its period, or extent, along z)."""
    low, high = case.points[:, 2].min(), case.points[:, 2].max()
    span = case.period[2] if case.period[2] > 0 else high - low
    return float(low + 0.5 * span)


def field_plane(case: Case) -> CaseTriangulation | PlaneSection:
    """The x-y plane where a case's fields are drawn: the case itself (2-D) or its mid-span.

    Both kinds have a ``triangulation`` and ``values(field)`` (nodal values of the case at
    its nodes), so a figure of fields in the plane is drawn alike in 2-D and 3-D.

    Args:
        case: a 2-D case, or a 3-D case with cells (see :func:`case_tetrahedra`).

    Returns:
        :func:`case_triangulation` in 2-D; in 3-D the section of the mid-span plane
        (:func:`plane_section` at :func:`mid_span`).
    """
    if case.dim == 3:
        return plane_section(case, 2, mid_span(case))
    return case_triangulation(case)


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


#: Heights of the x-z sections of a 3-D case, as fractions of its extent across (y).
SECTION_HEIGHTS = (0.25, 0.5, 0.75)

#: Streamwise stations of the profiles of a 3-D case, as fractions of its extent along x.
PROFILE_STATIONS = (0.0, 0.25, 0.5, 0.75)


def case3d_figure(case: Case, *, streamlines: bool = True) -> Figure:
    """Sections and profiles of a 3-D case.

    Panels: the mid-span x-y plane (speed with in-plane streamlines, and tau), tau in x-z
    planes at :data:`SECTION_HEIGHTS` of the height, and profiles of u_x and tau across the
    channel (along y, at mid-span) at :data:`PROFILE_STATIONS` along x.

    Args:
        case: a 3-D case with cells (see :func:`case_tetrahedra`).
        streamlines: draw streamlines of the in-plane velocity over the speed.

    Returns:
        The figure (not saved).
    """
    low, high = case.points.min(axis=0), case.points.max(axis=0)
    span = case.period[2] if case.period[2] > 0 else high[2] - low[2]
    middle = mid_span(case)
    mid_plane = plane_section(case, 2, middle)
    figure = Figure(figsize=(10, 13), layout="constrained")
    panels = figure.subplot_mosaic(
        [["speed"] * 6, ["tau"] * 6, ["xz0", "xz0", "xz1", "xz1", "xz2", "xz2"],
         ["ux", "ux", "ux", "profile", "profile", "profile"]],
        height_ratios=[1.2, 1.2, 1.0, 1.2],
    )
    triangulation = mid_plane.triangulation
    speed = mid_plane.values(np.linalg.norm(case.velocity, axis=1))
    image = panels["speed"].tricontourf(
        triangulation, speed, levels=field_levels(speed), cmap="viridis"
    )
    add_colorbar(figure, image, panels["speed"], "|u|")
    if streamlines:
        _streamlines(panels["speed"], triangulation, mid_plane.values(case.velocity[:, :2]))
    tau = mid_plane.values(case.tau)
    image = panels["tau"].tricontourf(triangulation, tau, levels=field_levels(tau), cmap="magma")
    add_colorbar(figure, image, panels["tau"], "tau")
    panels["speed"].set_title(f"{case_title(case)}: speed, mid-span plane z = {middle:.3g}")
    integral = case.tau_integral()
    panels["tau"].set_title(f"tau, mid-span plane (integral over the case {integral:.4g})")
    for name in ("speed", "tau"):
        axis = panels[name]
        axis.set_xlim(triangulation.x.min(), triangulation.x.max())
        axis.set_ylim(triangulation.y.min(), triangulation.y.max())
        label_plane(axis)
    levels = field_levels(case.tau)
    for number, fraction in enumerate(SECTION_HEIGHTS):
        axis = panels[f"xz{number}"]
        height = low[1] + fraction * (high[1] - low[1])
        section = plane_section(case, 1, height)
        image = axis.tricontourf(
            section.triangulation, section.values(case.tau), levels=levels, cmap="magma"
        )
        axis.set_xlim(low[0], low[0] + (case.period[0] or high[0] - low[0]))
        axis.set_ylim(low[2], low[2] + span)
        axis.set_title(f"tau at y = {height:.3g}", fontsize=9)
        axis.set_xlabel("x")
        axis.set_ylabel("z")
        axis.set_aspect("equal")
    add_colorbar(figure, image, [panels[f"xz{n}"] for n in range(3)], "tau", shrink=0.8)
    _draw_profiles(panels["ux"], panels["profile"], case, mid_plane, low, high)
    return figure


def _draw_profiles(velocity_axis, tau_axis, case: Case, mid_plane: PlaneSection, low, high):
    """u_x and tau along y at a few stations x of the mid-span plane."""
    interpolate_velocity = LinearTriInterpolator(
        mid_plane.triangulation, mid_plane.values(case.velocity[:, 0])
    )
    interpolate_tau = LinearTriInterpolator(mid_plane.triangulation, mid_plane.values(case.tau))
    y = np.linspace(low[1], high[1], 400)
    length = case.period[0] or high[0] - low[0]
    for fraction in PROFILE_STATIONS:
        station = low[0] + fraction * length
        label = f"x = {station:.3g}"
        # just inside the first column of cells, not on the periodic side itself
        x = np.full_like(y, station + (1e-9 * length if fraction == 0 else 0.0))
        velocity_axis.plot(np.ma.filled(interpolate_velocity(x, y), np.nan), y, label=label)
        tau_axis.plot(np.ma.filled(interpolate_tau(x, y), np.nan), y, label=label)
    velocity_axis.set_xlabel("u_x")
    tau_axis.set_xlabel("tau")
    for axis in (velocity_axis, tau_axis):
        axis.set_ylabel("y")
        axis.grid(alpha=0.3)
    velocity_axis.set_title("profiles at mid-span", fontsize=9)
    tau_axis.legend(fontsize=8)


def plot_case(case: Case, path: str | os.PathLike, *, streamlines: bool = True) -> Path:
    """Write :func:`case_figure` (2-D) or :func:`case3d_figure` (3-D) to a PNG file.

    Args:
        case: a 2-D case, or a 3-D case with cells.
        path: PNG file to write.
        streamlines: draw streamlines of the (in-plane) velocity over the speed.

    Returns:
        The path written.
    """
    if case.dim == 3:
        return save_figure(case3d_figure(case, streamlines=streamlines), path, dpi=100)
    return save_figure(case_figure(case, streamlines=streamlines), path, dpi=110)


def case_title(case: Case) -> str:
    """The case name, with its alpha (and a 3-D hill's crest amplitude) when it has one."""
    title = case.name
    if case.meta.get("alpha") is not None:
        title += f"  (alpha = {case.meta['alpha']:g}"
        if case.meta.get("crest_amplitude") is not None:
            title += f", crest amplitude {case.meta['crest_amplitude']:g}"
        title += ")"
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
