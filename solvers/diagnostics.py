"""Flow diagnostics: point evaluation and separation/reattachment on a wall."""

from __future__ import annotations

from mpi4py import MPI  # noqa: F401  (initialise MPI before dolfinx)

import math
from typing import NamedTuple

import numpy as np


def evaluate_at_points(function, points: np.ndarray) -> np.ndarray:
    """Values of a Function at arbitrary points, on every rank (collective).

    Args:
        function: a dolfinx Function of value size b.
        points: (M, d) float64 points, the same on every rank.

    Returns:
        (M, b) float64 values; NaN for points outside the mesh.
    """
    from dolfinx import geometry

    mesh = function.function_space.mesh
    points = np.asarray(points, dtype=np.float64)
    padded = np.zeros((points.shape[0], 3))
    padded[:, : points.shape[1]] = points
    tree = geometry.bb_tree(mesh, mesh.topology.dim)
    candidates = geometry.compute_collisions_points(tree, padded)
    colliding = geometry.compute_colliding_cells(mesh, candidates, padded)
    size = int(np.prod(function.function_space.value_shape)) or 1
    values = np.full((points.shape[0], size), np.nan)
    found = np.array([len(colliding.links(i)) > 0 for i in range(points.shape[0])], dtype=bool)
    if found.any():
        cells = np.array([colliding.links(i)[0] for i in np.flatnonzero(found)], dtype=np.int32)
        values[found] = function.eval(padded[found], cells).reshape(-1, size)
    # a point on a partition boundary is found by several ranks: any of their values will do
    gathered = mesh.comm.allgather(values)
    result = np.full_like(values, np.nan)
    for part in gathered:
        missing = np.isnan(result[:, 0]) & ~np.isnan(part[:, 0])
        result[missing] = part[missing]
    return result


class FlowReversal(NamedTuple):
    """Where the near-wall flow reverses along a wall.

    Attributes:
        separation: (S,) float64 abscissas where the tangential velocity turns negative.
        reattachment: (R,) float64 abscissas where it turns positive again.
        abscissa: (M,) the sampled abscissas; tangential: (M,) the sampled tangential velocity.
    """

    separation: np.ndarray
    reattachment: np.ndarray
    abscissa: np.ndarray
    tangential: np.ndarray


def flow_reversal(
    velocity, wall_points: np.ndarray, tangents: np.ndarray, *, offset: float
) -> FlowReversal:
    """Separation and reattachment points from the sign of the near-wall tangential velocity.

    The velocity is sampled at ``offset`` from the wall along the inward normal (the tangent
    turned by +90 degrees); sign changes are located by linear interpolation. For a wall with
    tangents along +x (a bottom wall), positive tangential velocity is attached flow.

    Args:
        velocity: (d,) vector Function, d = 2.
        wall_points: (M, 2) float64 points along the wall, ordered by abscissa.
        tangents: (M, 2) float64 unit tangents, oriented with the main flow.
        offset: distance from the wall of the samples (well inside the first cells).

    Returns:
        The separation and reattachment abscissas (x of the wall points).
    """
    normals = np.stack([-tangents[:, 1], tangents[:, 0]], axis=1)
    samples = evaluate_at_points(velocity, wall_points + offset * normals)
    tangential = np.einsum("ij,ij->i", samples[:, :2], tangents)
    x = wall_points[:, 0]
    valid = ~np.isnan(tangential)
    x, tangential = x[valid], tangential[valid]
    sign = np.sign(tangential)
    change = np.flatnonzero(sign[:-1] * sign[1:] < 0)
    t = tangential[change] / (tangential[change] - tangential[change + 1])
    crossing = x[change] + t * (x[change + 1] - x[change])
    turning_negative = tangential[change] > 0
    return FlowReversal(crossing[turning_negative], crossing[~turning_negative], x, tangential)


def hill_flow_reversal(velocity, alpha: float, *, samples: int = 4000) -> FlowReversal:
    """Separation and reattachment on the bottom wall of a periodic hill (serial or MPI).

    Samples at 1e-3 from the wall, below the first cell centre of the published mesh (2.2e-3).
    """
    from meshes.hills import hill_period, hill_profile, hill_profile_derivative

    length = hill_period(alpha)
    x = np.linspace(0.0, length, samples)
    points = np.stack([x, hill_profile(x, alpha)], axis=1)
    slope = hill_profile_derivative(x, alpha)
    tangents = np.stack([np.ones_like(x), slope], axis=1) / np.hypot(1.0, slope)[:, None]
    return flow_reversal(velocity, points, tangents, offset=1e-3)


def main_recirculation(
    separation, reattachment, *, period: float, min_length: float = 1e-2
) -> tuple[float, float]:
    """The longest reversed-flow interval along a periodic wall.

    Crossings closer than ``min_length`` (sign flickers where the near-wall velocity is
    practically zero) are dropped in pairs first.

    Args:
        separation: abscissas where the flow turns negative.
        reattachment: abscissas where it turns positive again.
        period: length of the periodic wall; an interval may wrap around it.
        min_length: shortest attached or reversed stretch that counts.

    Returns:
        (separation, reattachment) of the main bubble, NaN for both without reversal.
    """
    crossings = sorted([(x, -1) for x in separation] + [(x, +1) for x in reattachment])
    merged = True
    while merged and len(crossings) > 1:
        merged = False
        for i in range(len(crossings)):
            (x0, kind0), (x1, kind1) = crossings[i], crossings[(i + 1) % len(crossings)]
            gap = (x1 - x0) % period
            if kind0 != kind1 and gap < min_length:
                for j in sorted({i, (i + 1) % len(crossings)}, reverse=True):
                    crossings.pop(j)
                merged = True
                break
    best = (math.nan, math.nan)
    longest = 0.0
    for i, (x, kind) in enumerate(crossings):
        if kind == -1:
            x_end = crossings[(i + 1) % len(crossings)][0]
            length = (x_end - x) % period
            if length > longest:
                best, longest = (x, x_end), length
    return best


class WallReversal(NamedTuple):
    """Where the flow reverses along one connected stretch of a named wall (2-D).

    The wall's tangent is oriented with the main flow: the mean wall shear along the stretch
    is positive (attached flow), so separation is where it turns negative.

    Attributes:
        separation: (S, 2) float64 points where the wall shear turns negative.
        reattachment: (R, 2) float64 points where it turns positive again.
        separation_s: (S,) float64 their arc lengths from the stretch's start.
        reattachment_s: (R,) float64 likewise.
        arc_length: (M,) float64 arc length of the samples, increasing; points: (M, 2)
            float64 their wall points; tangential: (M,) float64 the tangential velocity just
            off the wall there (the sign of the wall shear).
        length: total arc length of the stretch.
        closed: the stretch is a loop (e.g. a cylinder): its arc length wraps around.
    """

    separation: np.ndarray
    reattachment: np.ndarray
    separation_s: np.ndarray
    reattachment_s: np.ndarray
    arc_length: np.ndarray
    points: np.ndarray
    tangential: np.ndarray
    length: float
    closed: bool


def wall_chains(mesh, facet_tags, tags) -> list[tuple[np.ndarray, bool]]:
    """The facets of the given boundary tags as ordered chains of points (2-D, collective).

    Args:
        mesh: a 2-D dolfinx mesh.
        facet_tags: its facet MeshTags.
        tags: facet tag values (the wall groups).

    Returns:
        One (points (K, 2) float64, closed) per connected stretch, the points ordered along it
        (a closed loop does not repeat its first point); the same on every rank.
    """
    from dolfinx.mesh import entities_to_geometry

    fdim = mesh.topology.dim - 1
    mesh.topology.create_connectivity(fdim, 0)
    facets = np.unique(np.concatenate([facet_tags.find(int(t)) for t in tags] or [[]]))
    facets = facets.astype(np.int32)
    nodes = entities_to_geometry(mesh, fdim, facets)[:, :2] if facets.size else np.zeros((0, 2))
    local = mesh.geometry.x[nodes.astype(np.int64), :2].reshape(-1, 2, 2)
    segments = np.concatenate(mesh.comm.allgather(local))
    if segments.shape[0] == 0:
        return []
    # Vertices are matched by position: the same point owned by two ranks has one key.
    scale = float(np.ptp(segments.reshape(-1, 2), axis=0).max()) or 1.0
    keys = np.round(segments / scale, 9)
    index: dict[tuple[float, float], int] = {}
    points: list[np.ndarray] = []
    edges = set()
    for segment, key_pair in zip(segments, keys, strict=True):
        ends = []
        for point, key in zip(segment, key_pair, strict=True):
            key = (float(key[0]), float(key[1]))
            if key not in index:
                index[key] = len(points)
                points.append(point)
            ends.append(index[key])
        if ends[0] != ends[1]:
            edges.add((min(ends), max(ends)))
    neighbours: dict[int, list[int]] = {i: [] for i in range(len(points))}
    for a, b in sorted(edges):
        neighbours[a].append(b)
        neighbours[b].append(a)
    unvisited = set(neighbours)
    chains = []
    # open stretches from an end first, then the loops
    starts = [i for i in sorted(neighbours) if len(neighbours[i]) == 1]
    while unvisited:
        start = next((i for i in starts if i in unvisited), min(unvisited))
        order = [start]
        unvisited.discard(start)
        while True:
            following = [n for n in neighbours[order[-1]] if n in unvisited]
            if not following:
                break
            order.append(following[0])
            unvisited.discard(following[0])
        closed = len(order) > 2 and start in neighbours[order[-1]]
        if len(order) > 1:
            chains.append((np.asarray([points[i] for i in order]), closed))
    return chains


def wall_flow_reversal(
    velocity, facet_tags, tags, *, samples_per_facet: int = 4, offset_fraction: float = 0.01
) -> list[WallReversal]:
    """Separation and reattachment along the named walls of any 2-D geometry (collective).

    The sign of the wall shear is that of the tangential velocity sampled just off the wall,
    at ``offset_fraction`` of the local facet length along the normal into the fluid,
    ``samples_per_facet`` times per facet; sign changes are located by linear interpolation
    in arc length.

    Args:
        velocity: (2,) vector Function.
        facet_tags: the facet MeshTags of its mesh.
        tags: the facet tag values of the walls.
        samples_per_facet: samples along each wall facet.
        offset_fraction: distance of the samples from the wall, in facet lengths.

    Returns:
        One :class:`WallReversal` per connected stretch of wall (the same on every rank).
    """
    results = []
    mesh = velocity.function_space.mesh
    for chain, closed in wall_chains(mesh, facet_tags, tags):
        ends = np.concatenate([chain, chain[:1]]) if closed else chain
        starts, stops = ends[:-1], ends[1:]
        lengths = np.linalg.norm(stops - starts, axis=1)
        tangents = (stops - starts) / lengths[:, None]
        normals = np.stack([-tangents[:, 1], tangents[:, 0]], axis=1)
        fractions = (np.arange(samples_per_facet) + 0.5) / samples_per_facet
        where = starts[:, None, :] + fractions[None, :, None] * (stops - starts)[:, None, :]
        offset = (offset_fraction * lengths)[:, None, None] * normals[:, None, :]
        cumulative = np.concatenate([[0.0], np.cumsum(lengths)])
        s = (cumulative[:-1, None] + fractions[None, :] * lengths[:, None]).reshape(-1)
        tangent = np.repeat(tangents, samples_per_facet, axis=0)
        # the fluid side: where the samples fall in the mesh
        sides = []
        for sign in (1.0, -1.0):
            values = evaluate_at_points(velocity, (where + sign * offset).reshape(-1, 2))
            sides.append(values)
        inside = [np.count_nonzero(~np.isnan(v[:, 0])) for v in sides]
        values = sides[0] if inside[0] >= inside[1] else sides[1]
        tangential = np.einsum("ij,ij->i", values[:, :2], tangent)
        valid = ~np.isnan(tangential)
        s, tangential, points = s[valid], tangential[valid], where.reshape(-1, 2)[valid]
        if tangential.size and tangential.mean() < 0:  # orient the stretch with the flow
            tangential = -tangential
            s = cumulative[-1] - s
            s, tangential, points = s[::-1], tangential[::-1], points[::-1]
        sign = np.sign(tangential)
        change = np.flatnonzero(sign[:-1] * sign[1:] < 0)
        t = tangential[change] / (tangential[change] - tangential[change + 1])
        crossing_s = s[change] + t * (s[change + 1] - s[change])
        crossing = points[change] + t[:, None] * (points[change + 1] - points[change])
        negative = tangential[change] > 0
        results.append(
            WallReversal(
                separation=crossing[negative],
                reattachment=crossing[~negative],
                separation_s=crossing_s[negative],
                reattachment_s=crossing_s[~negative],
                arc_length=s,
                points=points,
                tangential=tangential,
                length=float(cumulative[-1]),
                closed=bool(closed),
            )
        )
    return results


def main_wall_recirculation(
    reversals: list[WallReversal], *, min_length: float = 1e-2
) -> tuple[np.ndarray, np.ndarray] | None:
    """The separation and reattachment points of the longest reversed stretch of any wall.

    A stretch that separates and does not reattach before the wall ends reattaches at its end
    (an open wall; a loop wraps around). Crossings closer than ``min_length`` are dropped in
    pairs first (see :func:`main_recirculation`).

    Returns:
        ((2,) separation point, (2,) reattachment point), or None without reversed flow.
    """
    best, longest = None, 0.0
    for wall in reversals:
        period = wall.length if wall.closed else 10.0 * wall.length + 1.0
        start, end = main_recirculation(
            wall.separation_s, wall.reattachment_s, period=period, min_length=min_length
        )
        if math.isnan(start):
            continue
        if not wall.closed and end < start:  # no reattachment before the wall's end
            end = wall.length
        length = (end - start) % period
        if length > longest:
            best, longest = (wall, start, end), length
    if best is None:
        return None
    wall, start, end = best
    return _point_at(wall, start), _point_at(wall, end)


def _point_at(wall: WallReversal, s: float) -> np.ndarray:
    """The wall point at arc length ``s`` (interpolated between the samples)."""
    return np.asarray(
        [np.interp(s, wall.arc_length, wall.points[:, axis]) for axis in range(2)]
    )


__all__ = [
    "FlowReversal",
    "WallReversal",
    "evaluate_at_points",
    "flow_reversal",
    "hill_flow_reversal",
    "main_recirculation",
    "main_wall_recirculation",
    "wall_chains",
    "wall_flow_reversal",
]
