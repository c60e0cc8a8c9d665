"""Synthetic case files for the training tests: a periodic 2-D channel with a nonlocal target.

The flow is a wavy channel flow u = (U(y) (1 + A sin(2 pi x / L)), V(x, y)) whose amplitude A
and period L vary with a slope-like parameter alpha. The target is a genuinely NONLOCAL
functional of the flow: at every point x0,

    tau(x0) = w(d0) * sum_j K(x_j - x0; u0) |S|_j V_j / sum_j K(x_j - x0; u0) V_j,

a smoothed, upstream-biased average of the strain rate, with K an anisotropic Gaussian aligned
with the local velocity u0 and damped downstream, and w(d) a wall factor that makes tau vanish
on the walls. K is narrower than the paper's cloud ellipse (D = 0.1, zeta = 3, eps = 0.2), so
the information that determines tau(x0) lies inside the cloud of x0 and learning is meaningful.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vcnn.casefile import Case, write_case
from vcnn.physics import Physics

CHANNEL_HEIGHT = 1.0


def channel_case(alpha: float, *, nx: int = 36, ny: int = 14, seed: int = 0) -> Case:
    """A synthetic periodic channel case for slope factor ``alpha`` (about nx * ny points).

    Args:
        alpha: shape parameter (period L = 2 + alpha, wave amplitude 0.2 alpha).
        nx: points along x.
        ny: points across the channel (walls included).
        seed: jitter seed of the interior points.

    Returns:
        A valid case with meta ``{"alpha": alpha, ...}``.
    """
    length = 2.0 + alpha
    amplitude = 0.2 * alpha
    rng = np.random.default_rng(seed)
    x = (np.arange(nx) + 0.5) * length / nx
    y = np.linspace(0.0, CHANNEL_HEIGHT, ny)
    grid_x, grid_y = np.meshgrid(x, y, indexing="ij")
    grid_x = grid_x + (rng.random(grid_x.shape) - 0.5) * 0.3 * length / nx
    interior = (grid_y > 0) & (grid_y < CHANNEL_HEIGHT)
    jitter = (rng.random(grid_y.shape) - 0.5) * 0.3 * CHANNEL_HEIGHT / (ny - 1)
    grid_y = np.where(interior, grid_y + jitter, grid_y)
    points = np.stack([grid_x.ravel() % length, grid_y.ravel()], axis=1)
    px, py = points[:, 0], points[:, 1]
    phase = 2.0 * np.pi * px / length
    profile = 4.0 * py * (CHANNEL_HEIGHT - py)
    u = 1.5 * profile * (1.0 + amplitude * np.sin(phase))
    # dv/dy = -du/dx keeps the field divergence free with v = 0 on both walls.
    du_dx = 1.5 * profile * amplitude * np.cos(phase) * 2.0 * np.pi / length
    integral = 4.0 * (py**2 / 2 - py**3 / 3)
    v = -1.5 * integral * amplitude * np.cos(phase) * 2.0 * np.pi / length
    velocity = np.stack([u, v], axis=1)
    du_dy = 1.5 * 4.0 * (CHANNEL_HEIGHT - 2 * py) * (1.0 + amplitude * np.sin(phase))
    strain = np.sqrt(2.0 * du_dx**2 * 2 + (du_dy) ** 2)
    wall_distance = np.minimum(py, CHANNEL_HEIGHT - py)
    volume = np.full(len(points), length * CHANNEL_HEIGHT / len(points))
    volume[~interior.ravel()] *= 0.5
    tau = _nonlocal_target(points, velocity, strain, volume, wall_distance, length)
    is_wall = ~interior.ravel()
    # The target is synthetic, but its clouds follow the default operator (D, zeta).
    meta = {
        "alpha": float(alpha),
        "mesh": "synthetic-channel",
        "target": "synthetic",
        "physics": Physics().to_dict(),
    }
    return Case(
        points=points,
        velocity=velocity,
        tau=tau,
        strain_rate=strain,
        wall_distance=wall_distance,
        nodal_volume=volume,
        is_wall=is_wall,
        period=np.array([length, 0.0]),
        meta=meta,
        name=f"channel_a{alpha:.3f}",
    )


def _nonlocal_target(
    points: np.ndarray,
    velocity: np.ndarray,
    strain: np.ndarray,
    volume: np.ndarray,
    wall_distance: np.ndarray,
    length: float,
) -> np.ndarray:
    relative = points[None, :, :] - points[:, None, :]
    relative[..., 0] -= length * np.round(relative[..., 0] / length)
    speed = np.linalg.norm(velocity, axis=1)
    direction = velocity / np.maximum(speed, 1e-12)[:, None]
    along = np.einsum("qjd,qd->qj", relative, direction)
    across = relative[..., 0] * direction[:, None, 1] - relative[..., 1] * direction[:, None, 0]
    # Upstream bias: points behind the query (along < 0) weigh more than points ahead.
    kernel = np.exp(-0.5 * (along / 0.3) ** 2 - 0.5 * (across / 0.12) ** 2)
    kernel *= 1.0 / (1.0 + np.exp(6.0 * along))
    weighted = kernel * volume[None, :]
    average = weighted @ strain / weighted.sum(axis=1)
    wall_factor = np.tanh(wall_distance / 0.1)
    return wall_factor * average


def write_channel_cases(folder: Path, alphas: list[float], **options: int) -> list[Path]:
    """Write one synthetic case file per alpha into ``folder``; return their paths."""
    paths = []
    for index, alpha in enumerate(alphas):
        case = channel_case(alpha, seed=index, **options)
        paths.append(write_case(folder / f"{case.name}.npz", case))
    return paths


def describe(folder: Path) -> str:
    """One JSON line per case (for debugging a failing test)."""
    lines = []
    for path in sorted(folder.glob("*.npz")):
        with np.load(path) as data:
            lines.append(json.dumps({"case": path.stem, "points": int(data["points"].shape[0])}))
    return "\n".join(lines)
