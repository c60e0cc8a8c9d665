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


__all__ = [
    "FlowReversal",
    "evaluate_at_points",
    "flow_reversal",
    "hill_flow_reversal",
    "main_recirculation",
]
