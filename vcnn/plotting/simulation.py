"""Figure of a coupled run: the closure in the loop against the PDE truth (matplotlib Agg).

:func:`plot_simulation` draws a case written by ``vcnn simulate``: the fields of tau and of
the speed (closure run, truth, difference) and profiles of the streamwise velocity and of tau
at ten stations across the domain (closure solid, truth dashed); a 3-D case in its mid-span
x-y plane (:func:`vcnn.plotting.cases.field_plane`). Without the truth (a run without
``--compare``) only the closure run's fields and profiles are drawn.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
from matplotlib.figure import Figure
from matplotlib.tri import LinearTriInterpolator

from vcnn.casefile import Case
from vcnn.plotting.cases import (
    CaseTriangulation,
    PlaneSection,
    add_colorbar,
    case_aspect,
    case_title,
    draw_difference,
    field_levels,
    field_plane,
    label_plane,
    mid_span,
    save_figure,
)

__all__ = ["NUM_STATIONS", "plot_simulation", "simulation_figure", "station_profiles"]

#: Profile stations across the domain.
NUM_STATIONS = 10


def station_profiles(
    case: Case,
    values: np.ndarray,
    *,
    num_stations: int = NUM_STATIONS,
    samples: int = 120,
    triangulation: CaseTriangulation | PlaneSection | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A field sampled along vertical lines at evenly spaced stations.

    The stations are ``x_k = x_min + (k + 1/2) (x_max - x_min) / num_stations``; each line
    runs over the points' y range, and samples outside the domain are NaN. A 3-D case is
    sampled in its mid-span x-y plane.

    Args:
        case: a 2-D case (with ``cells`` for an exact triangulation), or a 3-D case with cells.
        values: (N,) float64 nodal values at the case's points.
        num_stations: number of stations.
        samples: samples per line.
        triangulation: the case's :func:`vcnn.plotting.cases.field_plane` (built when None).

    Returns:
        (stations (S,), y (samples,), profiles (S, samples)) float64.
    """
    plane = triangulation or field_plane(case)
    interpolator = LinearTriInterpolator(plane.triangulation, plane.values(values))
    x_min, y_min = case.points[:, :2].min(axis=0)
    x_max, y_max = case.points[:, :2].max(axis=0)
    if case.period[0] > 0:
        x_max = x_min + case.period[0]
    stations = x_min + (np.arange(num_stations) + 0.5) * (x_max - x_min) / num_stations
    y = np.linspace(y_min, y_max, samples)
    profiles = np.empty((num_stations, samples))
    for k, x in enumerate(stations):
        sampled = interpolator(np.full_like(y, x), y)
        profiles[k] = np.ma.filled(sampled.astype(np.float64), np.nan)
    return stations, y, profiles


def simulation_figure(case: Case, *, title: str | None = None) -> Figure:
    """Fields and station profiles of a coupled run, against the truth when the case has it.

    Args:
        case: a case from ``vcnn simulate`` (2-D, or 3-D with cells: drawn in its mid-span
            x-y plane); the truth is read from its extra keys ``tau_truth`` and
            ``velocity_truth`` when present.
        title: figure title (default: the case name and its alpha).

    Returns:
        The figure (not saved).
    """
    truth_tau = case.extra.get("tau_truth")
    truth_velocity = case.extra.get("velocity_truth")
    has_truth = truth_tau is not None and truth_velocity is not None
    shared = field_plane(case)
    triangulation = shared.triangulation
    speed = np.linalg.norm(case.velocity, axis=1)
    columns = 3 if has_truth else 1
    width = 15 if has_truth else 8
    field_height = width / columns * case_aspect(case) + 0.8
    figure = Figure(figsize=(width, 2 * field_height + 2 * 2.8), layout="constrained")
    grid = figure.add_gridspec(4, columns, height_ratios=[field_height] * 2 + [2.8, 2.8])

    rows = [("tau", case.tau, "magma"), ("|u|", speed, "viridis")]
    truths = [truth_tau, np.linalg.norm(truth_velocity, axis=1)] if has_truth else [None, None]
    for row, ((label, values, colormap), truth) in enumerate(zip(rows, truths, strict=True)):
        levels = field_levels(values if truth is None else np.concatenate([values, truth]))
        panels = [(f"{label}, closure in the loop", values)]
        if has_truth:
            panels.append((f"{label}, PDE truth", truth))
        for column, (name, field) in enumerate(panels):
            axis = figure.add_subplot(grid[row, column])
            image = axis.tricontourf(
                triangulation, shared.values(field), levels=levels, cmap=colormap
            )
            add_colorbar(figure, image, axis, label, shrink=0.9)
            _field_axis(axis, name)
        if has_truth:
            axis = figure.add_subplot(grid[row, 2])
            difference = shared.values(values - truth)
            name = f"{label} - " + ("|u_truth|" if label == "|u|" else f"{label}_truth")
            draw_difference(figure, axis, triangulation, difference, truth, name, shrink=0.9)
            _field_axis(axis, f"{label} difference (closure - truth)")

    profile_rows = [
        ("u_x", case.velocity[:, 0], None if not has_truth else truth_velocity[:, 0]),
        ("tau", case.tau, truth_tau),
    ]
    for row, (label, values, truth) in enumerate(profile_rows, start=2):
        axis = figure.add_subplot(grid[row, :])
        stations, y, profiles = station_profiles(case, values, triangulation=shared)
        reference = profiles
        if truth is not None:
            _, _, truth_profiles = station_profiles(case, truth, triangulation=shared)
            reference = truth_profiles
        spacing = stations[1] - stations[0] if stations.size > 1 else 1.0
        peak = np.nanmax(np.abs(reference)) if np.isfinite(reference).any() else 1.0
        scale = _round_down(0.8 * spacing / max(peak, 1e-30))
        for k, x in enumerate(stations):
            axis.axvline(x, color="0.85", linewidth=0.6)
            axis.plot(
                x + scale * profiles[k],
                y,
                color="C0",
                linewidth=1.2,
                label="closure in the loop" if k == 0 else None,
            )
            if truth is not None:
                axis.plot(
                    x + scale * truth_profiles[k],
                    y,
                    "--",
                    color="C3",
                    linewidth=1.0,
                    label="PDE truth" if k == 0 else None,
                )
        axis.set_xlabel(f"x + {label}" if scale == 1 else f"x + {scale:g} {label}", fontsize=8)
        axis.set_ylabel("y", fontsize=8)
        axis.set_title(f"{label} at {stations.size} stations", fontsize=9)
        # above the axes at the right, never over a profile
        axis.legend(
            fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=2, frameon=False
        )
        axis.tick_params(labelsize=7)
    if title is None:
        title = case_title(case)
        if case.dim == 3:
            title += f": mid-span plane z = {mid_span(case):.3g}"
    figure.suptitle(title, fontsize=11)
    return figure


def plot_simulation(case: Case, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Write :func:`simulation_figure` (fields and station profiles) to a PNG file.

    Args:
        case: a case from ``vcnn simulate`` (2-D, or 3-D with cells); the truth is read from
            its extra keys ``tau_truth`` and ``velocity_truth`` when present.
        path: PNG file to write.
        title: figure title (default: the case name and its alpha).

    Returns:
        The path written.
    """
    return save_figure(simulation_figure(case, title=title), path, dpi=110)


def _field_axis(axis, title: str) -> None:
    axis.set_title(title, fontsize=9)
    label_plane(axis, fontsize=8)
    axis.tick_params(labelsize=7)


def _round_down(value: float) -> float:
    """The largest of 1, 2, 5 times a power of ten that is at most ``value`` (> 0)."""
    power = 10.0 ** np.floor(np.log10(value))
    for factor in (5.0, 2.0, 1.0):
        if factor * power <= value:
            return float(factor * power)
    return float(power)
