"""Errors of a coupled run against the PDE truth, and the summary table of ``vcnn simulate``.

Pure numpy on gathered (rank 0) arrays. The relative L2 errors are those of
``vcnn evaluate`` (:func:`vcnn.evaluation.case_metrics`): unweighted over the closure points,
so the a-priori and a-posteriori errors of a network are directly comparable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "METRIC_KEYS",
    "periodic_distance",
    "relative_error",
    "relative_l2_percent",
    "summary_table",
]

#: Keys of every entry of ``metrics.json`` (null where they do not apply).
METRIC_KEYS = (
    "case",
    "alpha",
    "crest_amplitude",
    "closure",
    "coupling",
    "outer",
    "converged",
    "iterations",
    "num_points",
    "tau_rel_l2_percent",
    "a_priori_tau_rel_l2_percent",
    "velocity_rel_l2_percent",
    "tau_integral_rel_error",
    "body_force_rel_error",
    "reattachment_x_error",
    "separation_x_error",
    "tau_integral",
    "body_force",
    "reattachment_x",
    "separation_x",
    "out_of_range_fraction",
    "wall_seconds",
    "truth_wall_seconds",
    "truth_iterations",
    "setup_seconds",
    "error",
)


def relative_l2_percent(value: np.ndarray, truth: np.ndarray) -> float:
    """100 ||value - truth|| / ||truth|| over all entries (points, and components).

    Args:
        value: (N,) or (N, d) float64.
        truth: same shape.

    Returns:
        The error in percent (NaN when the truth is zero).
    """
    value = np.asarray(value, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    norm = float(np.linalg.norm(truth))
    return 100.0 * float(np.linalg.norm(value - truth)) / norm if norm > 0 else math.nan


def relative_error(value: float | None, truth: float | None) -> float | None:
    """|value - truth| / |truth| (None when either is missing, NaN when the truth is zero)."""
    if value is None or truth is None:
        return None
    return abs(value - truth) / abs(truth) if truth != 0 else math.nan


def periodic_distance(a: float | None, b: float | None, period: float) -> float | None:
    """|a - b|, the shorter way round a period > 0 (None when either is missing or NaN)."""
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return None
    distance = abs(a - b)
    return min(distance, period - distance) if period > 0 else distance


def _cell(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec)


def summary_table(entries: Sequence[Mapping[str, Any]]) -> str:
    """The metrics of a run as a Markdown table (one row per case)."""
    columns = [
        ("case", "case", "s"),
        ("alpha", "alpha", "g"),
        ("closure", "closure", "s"),
        ("coupling", "coupling", "s"),
        ("outer", "outer", "s"),
        ("converged", "converged", ""),
        ("its", "iterations", "d"),
        ("tau err %", "tau_rel_l2_percent", ".3f"),
        ("a priori %", "a_priori_tau_rel_l2_percent", ".3f"),
        ("u err %", "velocity_rel_l2_percent", ".3f"),
        ("int tau err", "tau_integral_rel_error", ".2e"),
        ("body force err", "body_force_rel_error", ".2e"),
        ("reattach. err", "reattachment_x_error", ".3f"),
        ("wall s", "wall_seconds", ".1f"),
        ("truth its", "truth_iterations", "d"),
        ("truth s", "truth_wall_seconds", ".1f"),
    ]
    lines = [
        "| " + " | ".join(title for title, _, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for entry in entries:
        cells = [_cell(entry.get(key), spec) for _, key, spec in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
