"""Figures of training and a-priori evaluation (matplotlib Agg, written atomically).

* :func:`plot_learning_curves`: losses and relative L2 errors against the epoch, the best
  epoch marked;
* :func:`plot_parity`: predicted against true tau, with the error written on the plot;
* :func:`plot_error_against_alpha`: relative L2 error per case against the slope factor;
* :func:`plot_field_comparison`: truth, prediction and error fields of a 2-D case.

Each ``plot_*`` function writes the figure that its ``*_figure`` twin returns.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from vcnn.casefile import Case
from vcnn.plotting.cases import (
    add_colorbar,
    case_aspect,
    draw_difference,
    field_levels,
    field_plane,
    label_plane,
    mid_span,
    save_figure,
)

logger = logging.getLogger(__name__)

#: A curve is drawn on a log scale when its largest positive value exceeds its smallest
#: this many times.
LOG_SCALE_SPAN = 10.0


def learning_curve_figure(history: Sequence[Any], *, best_epoch: int | None = None) -> Figure:
    """Training/validation loss and relative L2 error (percent) against the epoch.

    The best epoch is marked on both panels (a dotted line) and, on the error panel, by a
    marker annotated with its error. A panel is on a log scale when its curves span more than
    :data:`LOG_SCALE_SPAN`. The legend is below the panels, off the curves.

    Args:
        history: records with ``epoch``, ``train_loss``, ``validation_loss``,
            ``train_rel_l2_percent``, ``validation_rel_l2_percent`` attributes
            (:class:`vcnn.training.EpochRecord`).
        best_epoch: the epoch of ``best.pt``; None: the epoch of the smallest validation
            error (the training error without validation).

    Returns:
        The figure (not saved).

    Raises:
        ValueError: for an empty history or a best epoch that is not in it.
    """
    if not history:
        raise ValueError("no epochs to plot")
    epochs = np.array([r.epoch for r in history])
    figure = Figure(figsize=(10, 4.4), layout="constrained")
    loss_axis, error_axis = figure.subplots(1, 2)
    panels = (
        (loss_axis, "train_loss", "validation_loss", "MSE of tau / scale", "loss"),
        (
            error_axis,
            "train_rel_l2_percent",
            "validation_rel_l2_percent",
            "relative L2 error of tau (%)",
            "error",
        ),
    )
    curves = {}
    for axis, train_key, validation_key, ylabel, title in panels:
        drawn = []
        for key, label in ((train_key, "train"), (validation_key, "validation")):
            values = np.array([getattr(r, key) for r in history], dtype=float)
            curves[key] = values
            if np.isfinite(values).any():
                axis.plot(epochs, values, label=label, color="C0" if label == "train" else "C1")
                drawn.append(values)
        positive = np.concatenate(drawn) if drawn else np.array([])
        positive = positive[np.isfinite(positive) & (positive > 0)]
        if positive.size and positive.max() > LOG_SCALE_SPAN * positive.min():
            axis.set_yscale("log")
        axis.set(xlabel="epoch", ylabel=ylabel, title=title)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        axis.grid(True, which="both", alpha=0.3)
    error = curves["validation_rel_l2_percent"]
    which = "validation"
    if not np.isfinite(error).any():
        error, which = curves["train_rel_l2_percent"], "train"
    if best_epoch is None and np.isfinite(error).any():
        best_epoch = int(epochs[np.nanargmin(error)])
    if best_epoch is not None:
        matches = np.flatnonzero(epochs == best_epoch)
        if matches.size == 0:
            raise ValueError(f"best epoch {best_epoch} is not in the history")
        value = float(error[matches[-1]])
        for axis in (loss_axis, error_axis):
            axis.axvline(best_epoch, color="0.4", linestyle=":", linewidth=1)
        error_axis.plot(
            [best_epoch],
            [value],
            marker="*",
            markersize=12,
            color="C3",
            linestyle="none",
            label=f"best: epoch {best_epoch}, {which} {value:.3g} %",
            gid="best-epoch",
        )
        x_text, y_text = _emptiest_corner(error_axis)
        error_axis.annotate(
            f"best: epoch {best_epoch}\n{value:.3g} %",
            xy=(best_epoch, value),
            xytext=(x_text, y_text),
            textcoords="axes fraction",
            ha="right" if x_text > 0.5 else "left",
            va="top" if y_text > 0.5 else "bottom",
            fontsize=9,
            bbox={"facecolor": "white", "edgecolor": "0.8", "alpha": 0.9},
            arrowprops={"arrowstyle": "->", "color": "0.3", "linewidth": 0.8},
        )
    handles, labels = error_axis.get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=len(handles))
    return figure


def plot_learning_curves(
    history: Sequence[Any], path: str | os.PathLike, *, best_epoch: int | None = None
) -> Path:
    """Write :func:`learning_curve_figure` (loss and error against the epoch) to a PNG file.

    Args:
        history: records of :class:`vcnn.training.EpochRecord`'s attributes.
        path: PNG file to write.
        best_epoch: the epoch of ``best.pt``; None: the epoch of the smallest validation
            error (the training error without validation).

    Returns:
        The path written.
    """
    return save_figure(learning_curve_figure(history, best_epoch=best_epoch), path)


def parity_figure(
    truths: Sequence[np.ndarray],
    predictions: Sequence[np.ndarray],
    labels: Sequence[str],
    *,
    max_points_per_case: int = 20000,
    seed: int = 0,
) -> Figure:
    """Predicted against true tau, one colour per case, with the line y = x.

    The points of all cases are drawn in one shuffled layer, so that no case hides another;
    their transparency and size fall with the number of points. The relative L2 error and
    the largest absolute error over all points are written in the upper left corner (above
    the diagonal); the legend is beside the axes.

    Args:
        truths: per case (N_c,) float true tau.
        predictions: per case (N_c,) float predicted tau.
        labels: per case legend label (no legend beyond 12 cases).
        max_points_per_case: points drawn per case (an evenly strided subset beyond that;
            the errors written are over all points).
        seed: seed of the drawing order.

    Returns:
        The figure (not saved).

    Raises:
        ValueError: without cases, or with a truth and prediction of different lengths.
    """
    if len(truths) == 0:
        raise ValueError("no cases to plot")
    truths = [np.asarray(t, dtype=float).ravel() for t in truths]
    predictions = [np.asarray(p, dtype=float).ravel() for p in predictions]
    for truth, prediction, label in zip(truths, predictions, labels, strict=True):
        if truth.shape != prediction.shape:
            raise ValueError(f"{label}: {truth.size} true and {prediction.size} predicted values")
    all_truth, all_prediction = np.concatenate(truths), np.concatenate(predictions)
    error = all_prediction - all_truth
    rel_l2 = 100.0 * np.linalg.norm(error) / max(float(np.linalg.norm(all_truth)), 1e-300)
    max_abs = float(np.abs(error).max())

    colours = _case_colours(len(truths))
    xs, ys, case_index = [], [], []
    for index, (truth, prediction) in enumerate(zip(truths, predictions, strict=True)):
        stride = max(1, -(-len(truth) // max_points_per_case))
        xs.append(truth[::stride])
        ys.append(prediction[::stride])
        case_index.append(np.full(len(xs[-1]), index))
    x, y, case_index = np.concatenate(xs), np.concatenate(ys), np.concatenate(case_index)
    order = np.random.default_rng(seed).permutation(len(x))
    count = len(x)
    alpha = float(np.clip(4000.0 / max(count, 1), 0.1, 0.8))
    size = float(np.clip(6000.0 / max(count, 1), 1.5, 12.0))

    figure = Figure(figsize=(6.6 if len(labels) <= 12 else 5.2, 5.0), layout="constrained")
    axis = figure.subplots()
    axis.scatter(
        x[order],
        y[order],
        s=size,
        c=colours[case_index[order]],
        alpha=alpha,
        linewidths=0,
        rasterized=True,
    )
    low = min(float(x.min()), float(y.min()))
    high = max(float(x.max()), float(y.max()))
    pad = 0.04 * (high - low) if high > low else max(abs(high), 1.0) * 0.05
    limits = (low - pad, high + pad)
    axis.plot(limits, limits, "k--", linewidth=0.8, label="y = x")
    axis.set(xlim=limits, ylim=limits, xlabel="tau (truth)", ylabel="tau (network)")
    axis.set_title(f"parity, {len(truths)} case{'s' if len(truths) != 1 else ''}")
    axis.set_aspect("equal")
    axis.grid(True, alpha=0.3)
    axis.text(
        0.03,
        0.97,
        f"relative L2 error {rel_l2:.3g} %\nmax |error| {max_abs:.3g}",
        transform=axis.transAxes,
        ha="left",
        va="top",
        fontsize=9,
        bbox={"facecolor": "white", "edgecolor": "0.8", "alpha": 0.9},
    )
    if len(labels) <= 12:
        handles = [
            Line2D([], [], marker="o", linestyle="none", color=colours[i], label=label)
            for i, label in enumerate(labels)
        ]
        handles.append(Line2D([], [], color="k", linestyle="--", linewidth=0.8, label="y = x"))
        axis.legend(
            handles=handles,
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            borderaxespad=0,
            fontsize="small",
        )
    return figure


def plot_parity(
    truths: Sequence[np.ndarray],
    predictions: Sequence[np.ndarray],
    labels: Sequence[str],
    path: str | os.PathLike,
    *,
    max_points_per_case: int = 20000,
) -> Path:
    """Write :func:`parity_figure` (predicted against true tau) to a PNG file.

    Args:
        truths: per case (N_c,) float true tau.
        predictions: per case (N_c,) float predicted tau.
        labels: per case legend label.
        path: PNG file to write.
        max_points_per_case: points drawn per case (an evenly strided subset beyond that).

    Returns:
        The path written.
    """
    figure = parity_figure(truths, predictions, labels, max_points_per_case=max_points_per_case)
    return save_figure(figure, path, dpi=150)


def error_against_alpha_figure(
    alphas: Sequence[float], errors_percent: Sequence[float]
) -> Figure:
    """Relative L2 error (percent) of every case against its slope factor alpha.

    Args:
        alphas: per case alpha.
        errors_percent: per case relative L2 error in percent.

    Returns:
        The figure (not saved).
    """
    order = np.argsort(alphas)
    figure = Figure(figsize=(5, 4), layout="constrained")
    axis = figure.subplots()
    axis.plot(np.asarray(alphas)[order], np.asarray(errors_percent)[order], "o-", markersize=4)
    axis.set(xlabel="alpha", ylabel="relative L2 error of tau (%)", title="error against alpha")
    axis.set_ylim(bottom=0)
    axis.grid(True, alpha=0.3)
    return figure


def plot_error_against_alpha(
    alphas: Sequence[float], errors_percent: Sequence[float], path: str | os.PathLike
) -> Path:
    """Write :func:`error_against_alpha_figure` to a PNG file.

    Args:
        alphas: per case alpha.
        errors_percent: per case relative L2 error in percent.
        path: PNG file to write.

    Returns:
        The path written.
    """
    return save_figure(error_against_alpha_figure(alphas, errors_percent), path)


def field_comparison_figure(case: Case, prediction: np.ndarray, *, levels: int = 40) -> Figure:
    """Three panels: true tau, predicted tau, and prediction - truth.

    A 2-D case is drawn on :func:`vcnn.plotting.case_triangulation` (the ``cells`` extra key
    when present, else Delaunay with the triangles that leave the domain masked), a 3-D case
    in its mid-span x-y plane (:func:`vcnn.plotting.cases.field_plane`); the difference is
    drawn by :func:`vcnn.plotting.draw_difference`.

    Args:
        case: a 2-D case, or a 3-D case with cells (its ``tau`` is the truth).
        prediction: (N,) float predicted tau.
        levels: the most contour bands.

    Returns:
        The figure (not saved).

    Raises:
        ValueError: for a prediction of the wrong length, or a 3-D case without cells.
    """
    prediction = np.asarray(prediction, dtype=float)
    if prediction.shape != (case.num_points,):
        raise ValueError(f"prediction must have shape ({case.num_points},), got {prediction.shape}")
    # The plane's nodes are case points and periodic images (2-D) or points on cell edges
    # (a 3-D section): plane.values maps nodal fields onto them.
    plane = field_plane(case)
    where = f" (mid-span plane z = {mid_span(case):.3g})" if case.dim == 3 else ""
    shared = field_levels(np.concatenate([case.tau, prediction]), levels=levels)
    figure = Figure(figsize=(9, 3 * 7.4 * case_aspect(case) + 2.0), layout="constrained")
    axes = figure.subplots(3, 1, sharex=True)
    panels = ((case.tau, "tau (truth)", "tau"), (prediction, "tau (network)", "tau"))
    for axis, (values, title, label) in zip(axes, panels, strict=False):
        filled = axis.tricontourf(
            plane.triangulation, plane.values(values), levels=shared, cmap="viridis"
        )
        add_colorbar(figure, filled, axis, label)
        axis.set_title(f"{case.name}: {title}{where}")
    draw_difference(
        figure,
        axes[2],
        plane.triangulation,
        plane.values(prediction - case.tau),
        case.tau,
        "tau_network - tau_truth",
        levels=levels,
    )
    axes[2].set_title(f"{case.name}: network - truth{where}")
    for axis in axes:
        label_plane(axis)
        axis.label_outer()  # the shared x axis is labelled once, at the bottom
    return figure


def plot_field_comparison(
    case: Case, prediction: np.ndarray, path: str | os.PathLike, *, levels: int = 40
) -> Path:
    """Write :func:`field_comparison_figure` (truth, prediction, difference) to a PNG file.

    Args:
        case: a 2-D case, or a 3-D case with cells (its ``tau`` is the truth).
        prediction: (N,) float predicted tau.
        path: PNG file to write.
        levels: the most contour bands.

    Returns:
        The path written.

    Raises:
        ValueError: for a prediction of the wrong length, or a 3-D case without cells.
    """
    return save_figure(field_comparison_figure(case, prediction, levels=levels), path)


def _emptiest_corner(axis) -> tuple[float, float]:
    """The corner (axes fraction, inset) whose neighbourhood holds the fewest curve points."""
    axis.get_xlim(), axis.get_ylim()  # settle the autoscaled limits before transforming
    points = [  # the curves, not the vertical line of the best epoch (in axes coordinates)
        line.get_xydata() for line in axis.get_lines() if line.get_transform() == axis.transData
    ]
    data = np.concatenate(points) if points else np.empty((0, 2))
    data = data[np.isfinite(data).all(axis=1)]
    inside = axis.transAxes.inverted().transform(axis.transData.transform(data))
    corners = ((0.96, 0.94), (0.04, 0.06), (0.96, 0.06), (0.04, 0.94))
    counts = [
        int(np.sum((np.abs(inside[:, 0] - x) < 0.35) & (np.abs(inside[:, 1] - y) < 0.25)))
        for x, y in corners
    ]
    return corners[int(np.argmin(counts))]


def _case_colours(count: int) -> np.ndarray:
    """(count, 4) RGBA: the tab10 cycle up to 10 cases, evenly spaced viridis beyond."""
    if count <= 10:
        return np.array([to_rgba(f"C{i}") for i in range(count)])
    return colormaps["viridis"](np.linspace(0.0, 0.95, count))


__all__ = [
    "error_against_alpha_figure",
    "field_comparison_figure",
    "learning_curve_figure",
    "parity_figure",
    "plot_error_against_alpha",
    "plot_field_comparison",
    "plot_learning_curves",
    "plot_parity",
    "save_figure",
]
