"""Figures of training and a-priori evaluation (matplotlib Agg, written atomically).

* :func:`plot_learning_curves`: losses and relative L2 errors against the epoch;
* :func:`plot_parity`: predicted against true tau;
* :func:`plot_error_against_alpha`: relative L2 error per case against the slope factor;
* :func:`plot_field_comparison`: truth, prediction and error fields of a 2-D case.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from vcnn.casefile import Case
from vcnn.plotting import case_triangulation, save_figure

logger = logging.getLogger(__name__)


def plot_learning_curves(history: Sequence[Any], path: str | os.PathLike) -> Path:
    """Training/validation loss and relative L2 error (percent) against the epoch, log scale.

    Args:
        history: records with ``epoch``, ``train_loss``, ``validation_loss``,
            ``train_rel_l2_percent``, ``validation_rel_l2_percent`` attributes
            (:class:`vcnn.training.EpochRecord`).
        path: PNG file to write.

    Returns:
        The path written.
    """
    if not history:
        raise ValueError("no epochs to plot")
    epochs = np.array([r.epoch for r in history])
    figure, (loss_axis, error_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for attribute, label in (("train_loss", "train"), ("validation_loss", "validation")):
        values = np.array([getattr(r, attribute) for r in history], dtype=float)
        if np.isfinite(values).any():
            loss_axis.semilogy(epochs, values, label=label)
    loss_axis.set(xlabel="epoch", ylabel="MSE of tau / scale", title="loss")
    for attribute, label in (
        ("train_rel_l2_percent", "train"),
        ("validation_rel_l2_percent", "validation"),
    ):
        values = np.array([getattr(r, attribute) for r in history], dtype=float)
        if np.isfinite(values).any():
            error_axis.semilogy(epochs, values, label=label)
    error_axis.set(xlabel="epoch", ylabel="relative L2 error of tau (%)", title="error")
    for axis in (loss_axis, error_axis):
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    return save_figure(figure, path)


def plot_parity(
    truths: Sequence[np.ndarray],
    predictions: Sequence[np.ndarray],
    labels: Sequence[str],
    path: str | os.PathLike,
    *,
    max_points_per_case: int = 20000,
) -> Path:
    """Predicted against true tau, one colour per case, with the identity line.

    Args:
        truths: per case (N_c,) float true tau.
        predictions: per case (N_c,) float predicted tau.
        labels: per case legend label.
        path: PNG file to write.
        max_points_per_case: points drawn per case (an evenly strided subset beyond that).

    Returns:
        The path written.
    """
    figure, axis = plt.subplots(figsize=(5, 5))
    low, high = np.inf, -np.inf
    for truth, prediction, label in zip(truths, predictions, labels, strict=True):
        stride = max(1, len(truth) // max_points_per_case)
        axis.scatter(truth[::stride], prediction[::stride], s=2, alpha=0.5, label=label)
        low = min(low, float(np.min(truth)), float(np.min(prediction)))
        high = max(high, float(np.max(truth)), float(np.max(prediction)))
    axis.plot([low, high], [low, high], "k--", linewidth=1)
    axis.set(xlabel="tau (truth)", ylabel="tau (network)", title="parity")
    axis.set_aspect("equal")
    if len(labels) <= 12:
        axis.legend(markerscale=4, fontsize="small")
    return save_figure(figure, path)


def plot_error_against_alpha(
    alphas: Sequence[float], errors_percent: Sequence[float], path: str | os.PathLike
) -> Path:
    """Relative L2 error (percent) of every case against its slope factor alpha.

    Args:
        alphas: per case alpha.
        errors_percent: per case relative L2 error in percent.
        path: PNG file to write.

    Returns:
        The path written.
    """
    order = np.argsort(alphas)
    figure, axis = plt.subplots(figsize=(5, 4))
    axis.plot(np.asarray(alphas)[order], np.asarray(errors_percent)[order], "o-")
    axis.set(xlabel="alpha", ylabel="relative L2 error of tau (%)", title="error against alpha")
    axis.grid(True, alpha=0.3)
    return save_figure(figure, path)


def plot_field_comparison(
    case: Case, prediction: np.ndarray, path: str | os.PathLike, *, levels: int = 40
) -> Path:
    """Three panels on the case's points: true tau, predicted tau, and prediction - truth.

    The triangulation is :func:`vcnn.plotting.case_triangulation` (the ``cells`` extra key
    when present, else Delaunay with the triangles that leave the domain masked).

    Args:
        case: a 2-D case (its ``tau`` is the truth).
        prediction: (N,) float predicted tau.
        path: PNG file to write.
        levels: contour levels.

    Returns:
        The path written.

    Raises:
        ValueError: for a 3-D case or a prediction of the wrong length.
    """
    prediction = np.asarray(prediction, dtype=float)
    if prediction.shape != (case.num_points,):
        raise ValueError(f"prediction must have shape ({case.num_points},), got {prediction.shape}")
    # Nodes of the triangulation are case points and periodic images: values[source].
    triangulation, source = case_triangulation(case)
    low = min(float(case.tau.min()), float(prediction.min()))
    high = max(float(case.tau.max()), float(prediction.max()))
    shared = np.linspace(low, high if high > low else low + 1.0, levels)
    error = prediction - case.tau
    bound = float(np.abs(error).max()) or 1.0
    extent = np.ptp(case.points, axis=0)
    aspect = extent[1] / max(extent[0], 1e-12)
    figure, axes = plt.subplots(
        3, 1, figsize=(9, 3 * 9 * aspect + 1.5), sharex=True, constrained_layout=True
    )
    panels = (
        (case.tau, shared, "viridis", "tau (truth)"),
        (prediction, shared, "viridis", "tau (network)"),
        (error, np.linspace(-bound, bound, levels), "RdBu_r", "network - truth"),
    )
    for axis, (values, value_levels, colormap, title) in zip(axes, panels, strict=True):
        filled = axis.tricontourf(
            triangulation, values[source], levels=value_levels, cmap=colormap
        )
        figure.colorbar(filled, ax=axis)
        axis.set_title(f"{case.name}: {title}")
        axis.set_aspect("equal")
    axes[-1].set_xlabel("x")
    return save_figure(figure, path)


__all__ = [
    "plot_error_against_alpha",
    "plot_field_comparison",
    "plot_learning_curves",
    "plot_parity",
    "save_figure",
]
