"""Geometry of cloud regions: ellipse semi-axes, shape matrices, chord bounds, smooth cutoff.

Private helpers of :mod:`vcnn.clouds`. Every function is vectorised over query points; nothing
here loops in Python over queries or cloud entries.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "ellipse_semi_axes",
    "region_covariance",
    "normalized_radius_squared",
    "chord_bounds",
    "inner_chord_bounds",
    "smooth_switch",
]


def ellipse_semi_axes(
    speed: np.ndarray, *, diffusivity: float, zeta: float, eps: float
) -> tuple[np.ndarray, float]:
    """Semi-axes of the velocity-aligned cloud ellipse of an advection-diffusion-decay operator.

    a = 2 D |ln eps| / (sqrt(|u|^2 + 4 D zeta) - |u|) along the flow and
    b = sqrt(D / zeta) |ln eps| across it. The along-flow axis is evaluated in the
    algebraically equal form |ln eps| (sqrt(|u|^2 + 4 D zeta) + |u|) / (2 zeta), which has no
    cancellation for large |u| and no division at |u| = 0 (where a = b).

    Args:
        speed: (Q,) float64, |u| at the query points.
        diffusivity: D > 0.
        zeta: decay coefficient > 0.
        eps: decay threshold in (0, 1).

    Returns:
        a: (Q,) float64 along-flow semi-axes (a >= b), and b: the across-flow semi-axis.
    """
    log_eps = abs(np.log(eps))
    along = log_eps * (np.sqrt(speed * speed + 4.0 * diffusivity * zeta) + speed) / (2.0 * zeta)
    across = float(np.sqrt(diffusivity / zeta) * log_eps)
    return along, across


def region_covariance(direction: np.ndarray, along: np.ndarray, across: float) -> np.ndarray:
    """Shape matrices C = a^2 e e^T + b^2 (I - e e^T) of ellipses {r: r^T C^-1 r <= 1}.

    Args:
        direction: (Q, d) float64 unit flow directions (rows of zeros where |u| = 0; then
            a = b and the ellipse is a ball whatever the direction).
        along: (Q,) float64 semi-axes along the direction.
        across: semi-axis in every transverse direction.

    Returns:
        (Q, d, d) float64 symmetric positive definite matrices.
    """
    dim = direction.shape[1]
    outer = direction[:, :, None] * direction[:, None, :]
    eye = np.eye(dim)[None]
    return (along**2)[:, None, None] * outer + across**2 * (eye - outer)


def normalized_radius_squared(
    relative: np.ndarray, direction: np.ndarray, along: np.ndarray, across: float
) -> np.ndarray:
    """Squared normalised ellipse radius (r_par / a)^2 + (r_perp / b)^2 (1 on the boundary).

    Args:
        relative: (M, d) float64 relative positions x_i - x0.
        direction: (M, d) float64 unit flow direction of each entry's query (zeros allowed).
        along: (M,) float64 semi-axis a of each entry's query.
        across: semi-axis b.

    Returns:
        (M,) float64.
    """
    parallel = np.einsum("ij,ij->i", relative, direction)
    total = np.einsum("ij,ij->i", relative, relative)
    parallel_sq = parallel * parallel
    # Round-off can make |r|^2 - r_par^2 slightly negative for points on the axis.
    perpendicular_sq = np.maximum(total - parallel_sq, 0.0)
    return parallel_sq / (along * along) + perpendicular_sq / (across * across)


def chord_bounds(
    covariance: np.ndarray, sweep_axis: int, cell_lower: np.ndarray, cell_upper: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of the sweep coordinate of an ellipsoid inside a transverse cell.

    For each (ellipsoid, cell) pair returns [low, high] such that every point of the
    ellipsoid whose transverse coordinates lie in the cell has its sweep coordinate in
    [low, high]. In 2-D the bound is exact (the chord end x_+(y) is concave in y, so its
    maximum over a band is at the clipped maximiser). In 3-D it is the tightest of the exact
    bounds of the ellipsoid's projections on each (sweep, transverse) plane, a superset.
    Empty pairs get low > high.

    Args:
        covariance: (P, d, d) float64 shape matrices (see :func:`region_covariance`).
        sweep_axis: index of the sweep coordinate.
        cell_lower: (P, d - 1) float64 lower corners of the cells relative to the centres,
            transverse coordinates in increasing axis order without the sweep axis.
        cell_upper: (P, d - 1) float64 upper corners, same layout.

    Returns:
        low, high: (P,) float64 relative sweep-coordinate bounds.
    """
    dim = covariance.shape[1]
    transverse = [axis for axis in range(dim) if axis != sweep_axis]
    var_sweep = covariance[:, sweep_axis, sweep_axis]
    low = np.full(covariance.shape[0], -np.inf)
    high = np.full(covariance.shape[0], np.inf)
    for column, axis in enumerate(transverse):
        var_t = covariance[:, axis, axis]
        cov = covariance[:, sweep_axis, axis]
        slope = cov / var_t
        schur = np.maximum(var_sweep - cov * slope, 0.0)
        reach = np.sqrt(var_t)
        # The rightmost point of the projected ellipse sits at t = cov / sqrt(var_sweep).
        t_star = cov / np.sqrt(var_sweep)
        lower = np.maximum(cell_lower[:, column], -reach)
        upper = np.minimum(cell_upper[:, column], reach)
        empty = lower > upper

        def chord_end(t: np.ndarray) -> np.ndarray:
            return slope * t + np.sqrt(schur * np.maximum(1.0 - t * t / var_t, 0.0))

        hi = chord_end(np.clip(t_star, lower, upper))
        # Central symmetry: x_-(t) = -x_+(-t), so the band minimum of x_- mirrors a maximum.
        lo = -chord_end(np.clip(t_star, -upper, -lower))
        hi = np.where(empty, -np.inf, hi)
        lo = np.where(empty, np.inf, lo)
        high = np.minimum(high, hi)
        low = np.maximum(low, lo)
    return low, high


def inner_chord_bounds(
    direction: np.ndarray,
    along: np.ndarray,
    across: float,
    sweep_axis: int,
    cell_lower: np.ndarray,
    cell_upper: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Sweep-coordinate range that lies inside an ellipsoid for every point of a cell.

    For each (ellipsoid, cell) pair returns [low, high] such that every point whose
    transverse coordinates lie in the cell and whose sweep coordinate lies in [low, high] is
    inside the ellipsoid, so such points need no exact test. The chord's upper end x_+(t) is
    concave over the (convex) projection of the ellipsoid and the lower end x_-(t) convex, so
    over a box they reach their worst values at its corners: high is the smallest x_+ and low
    the largest x_- over the 2^(d-1) corners. A corner outside the projection leaves no such
    range (low = inf, high = -inf).

    The ellipsoid is r^T M r <= 1 with M = e e^T (1/a^2 - 1/b^2) + I / b^2.

    Args:
        direction: (P, d) float64 unit flow directions (zero rows allowed: a ball).
        along: (P,) float64 semi-axes a along the direction.
        across: semi-axis b across it.
        sweep_axis: index of the sweep coordinate.
        cell_lower: (P, d - 1) float64 lower corners of the cells relative to the centres,
            transverse coordinates in increasing axis order without the sweep axis.
        cell_upper: (P, d - 1) float64 upper corners, same layout.

    Returns:
        low, high: (P,) float64 relative sweep-coordinate bounds; low > high where empty.
    """
    dim = direction.shape[1]
    transverse = [axis for axis in range(dim) if axis != sweep_axis]
    inverse_across_sq = 1.0 / (across * across)
    anisotropy = 1.0 / (along * along) - inverse_across_sq  # <= 0
    direction_sweep = direction[:, sweep_axis]
    quadratic = direction_sweep * direction_sweep * anisotropy + inverse_across_sq
    low = np.full(direction.shape[0], -np.inf)
    high = np.full(direction.shape[0], np.inf)
    for corner in range(1 << (dim - 1)):
        projection = np.zeros(direction.shape[0])
        norm_sq = np.zeros(direction.shape[0])
        for column, axis in enumerate(transverse):
            t = cell_upper[:, column] if (corner >> column) & 1 else cell_lower[:, column]
            projection += direction[:, axis] * t
            norm_sq += t * t
        # M_ss x^2 + 2 x (M_st . t) + (t^T M_tt t - 1) <= 0, solved for the sweep coordinate x.
        linear = direction_sweep * anisotropy * projection
        constant = anisotropy * projection * projection + norm_sq * inverse_across_sq - 1.0
        discriminant = linear * linear - quadratic * constant
        root = np.sqrt(np.maximum(discriminant, 0.0))
        upper_end = np.where(discriminant >= 0, (root - linear) / quadratic, -np.inf)
        lower_end = np.where(discriminant >= 0, (-root - linear) / quadratic, np.inf)
        high = np.minimum(high, upper_end)
        low = np.maximum(low, lower_end)
    return low, high


def smooth_switch(radius, *, start: float, out=None):
    """C^2 cutoff: 1 for r <= start, 1 - t^3 (6 t^2 - 15 t + 10) between, 0 for r >= 1.

    Here t = (r - start) / (1 - start). The first and second derivatives vanish at both ends,
    so a point entering or leaving a cloud contributes continuously. The result is clipped to
    [0, 1]: near t = 1 the polynomial rounds to slightly above 1 in float32, and a weight must
    never be negative.

    Args:
        radius: (...) float normalised radius (1 on the region boundary), a numpy array or a
            torch tensor (then computed with torch, differentiably).
        start: where the switch starts to fall, in [0, 1).
        out: numpy only: (...) float array of radius's shape to write the weights into (may be
            radius itself); None for a new array.

    Returns:
        (...) float weights in [0, 1], same dtype as radius (or out), same kind (numpy/torch).
    """
    if not 0.0 <= start < 1.0:
        raise ValueError(f"the cutoff start must lie in [0, 1), got {start}")
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of vcnn
        torch = None
    if torch is not None and isinstance(radius, torch.Tensor):
        t = ((radius - start) / (1.0 - start)).clamp(0.0, 1.0)
        return (1.0 - t * t * t * (t * (6.0 * t - 15.0) + 10.0)).clamp(0.0, 1.0)
    radius = np.asarray(radius)
    if out is None:
        out = np.empty(radius.shape, dtype=np.result_type(radius, 0.0))
    # In place on one array (Horner form): no temporaries of the input's size.
    t = np.subtract(radius, start, out=out)
    t *= 1.0 / (1.0 - start)
    np.clip(t, 0.0, 1.0, out=t)
    polynomial = t * 6.0
    polynomial -= 15.0
    polynomial *= t
    polynomial += 10.0
    polynomial *= t
    polynomial *= t
    polynomial *= t
    weights = np.subtract(1.0, polynomial, out=t)
    return np.clip(weights, 0.0, 1.0, out=weights)
