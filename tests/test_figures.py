"""Every figure kind the toolkit draws: rendered from small synthetic inputs and inspected.

The ``*_figure`` functions return the matplotlib figure that the ``plot_*`` functions write;
the tests check its objects (labels, colour bars, markers, legends) and that the files exist.
"""

import dataclasses

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.contour import ContourSet

from tests.ddp_scripts.synthetic_cases import channel_case
from vcnn.plotting.cases import case_figure, field_levels, plot_case
from vcnn.plotting.simulation import plot_simulation, simulation_figure
from vcnn.plotting.training import (
    error_against_alpha_figure,
    field_comparison_figure,
    learning_curve_figure,
    parity_figure,
    plot_error_against_alpha,
    plot_field_comparison,
    plot_learning_curves,
    plot_parity,
)
from vcnn.training import EpochRecord

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def case():
    return channel_case(0.5, nx=24, ny=10)


def colorbar_axes(figure):
    return [axis for axis in figure.axes if axis.get_label() == "<colorbar>"]


def plot_axes(figure):
    return [axis for axis in figure.axes if axis.get_label() != "<colorbar>"]


def axis_titled(figure, start):
    (axis,) = [a for a in plot_axes(figure) if a.get_title().startswith(start)]
    return axis


def assert_round(values):
    """Evenly spaced by 1, 2, 2.5 or 5 times a power of ten, and multiples of that step."""
    values = np.asarray(values)
    steps = np.diff(values)
    assert len(values) >= 2 and np.allclose(steps, steps[0])
    mantissa = steps[0] / 10.0 ** np.floor(np.log10(steps[0]))
    assert np.isclose(mantissa, [1.0, 2.0, 2.5, 5.0]).any(), values
    assert np.allclose(values / steps[0], np.round(values / steps[0]), atol=1e-6), values


def assert_colorbars_labelled_and_round(figure):
    bars = colorbar_axes(figure)
    assert bars
    for bar in bars:
        assert bar.get_ylabel(), "a colour bar without a label"
        low, high = bar.get_ylim()
        ticks = [t for t in bar.get_yticks() if low - 1e-12 <= t <= high + 1e-12]
        assert_round(ticks)


def assert_axes_labelled(figure):
    for axis in plot_axes(figure):
        if axis.get_xticklabels() and any(t.get_visible() for t in axis.get_xticklabels()):
            assert axis.get_xlabel(), axis.get_title()
        assert axis.get_ylabel(), axis.get_title()


def drawn(figure):
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return canvas.get_renderer()


def assert_png(path, *, min_bytes=15_000):
    assert path.exists() and path.read_bytes()[:8] == PNG
    assert path.stat().st_size > min_bytes


def simulated(case, tau_factor=1.05, velocity_factor=1.01):
    """A closure run whose truth differs from it by the given factors."""
    return dataclasses.replace(
        case,
        tau=case.tau * tau_factor,
        extra={"tau_truth": case.tau.copy(), "velocity_truth": case.velocity / velocity_factor},
    )


def history(epochs=60, best=42, decades=True):
    """Synthetic learning curves; the validation error is smallest at epoch ``best``."""
    epoch = np.arange(1, epochs + 1)
    if decades:
        train = 20.0 * np.exp(-epoch / 10) + 0.5
    else:
        train = 2.0 - epoch / epochs
    validation = train * 1.1 + 0.05 * np.maximum(epoch - best, 0)
    return [
        EpochRecord(int(e), t**2, v**2, t, v, 1e-3, float(e))
        for e, t, v in zip(epoch, train, validation, strict=True)
    ]


def test_field_levels_are_round_and_cover_the_values():
    values = np.array([0.0132, 1.7, 3.871])
    levels = field_levels(values)
    assert_round(levels)
    assert levels[0] <= values.min() and levels[-1] >= values.max()
    assert 10 <= len(levels) - 1 <= 40
    constant = field_levels(np.full(5, 2.5))
    assert constant[0] < 2.5 < constant[-1]


def test_case_figure(case, tmp_path):
    figure = case_figure(case)
    assert_colorbars_labelled_and_round(figure)
    assert sorted(a.get_ylabel() for a in colorbar_axes(figure)) == ["tau", "|u|"]
    assert_axes_labelled(figure)
    assert plot_axes(figure)[-1].get_xlabel() == "x"
    assert_png(plot_case(case, tmp_path / "case.png"))


def test_simulation_figure_against_the_truth(case, tmp_path):
    figure = simulation_figure(simulated(case))
    assert_colorbars_labelled_and_round(figure)
    labels = {a.get_ylabel() for a in colorbar_axes(figure)}
    assert {"tau", "|u|", "tau - tau_truth", "|u| - |u_truth|"} <= labels
    assert_axes_labelled(figure)
    for title in ("tau difference", "|u| difference"):
        (contours,) = [
            c for c in axis_titled(figure, title).collections if isinstance(c, ContourSet)
        ]
        # a diverging scale centred at zero
        assert contours.levels[0] == pytest.approx(-contours.levels[-1])
        assert contours.levels[-1] > 0
        assert contours.get_cmap().name == "RdBu_r"
    # the difference of tau is 5 % of tau: its scale is a round bound just above that
    tau_levels = axis_titled(figure, "tau difference").collections[0].levels
    bound = 0.05 * case.tau.max()
    assert bound <= tau_levels[-1] <= 2 * bound
    # the profiles' legends lie outside their axes, above the data
    renderer = drawn(figure)
    for title in ("u_x at", "tau at"):
        axis = axis_titled(figure, title)
        legend = axis.get_legend().get_window_extent(renderer)
        assert legend.y0 >= axis.get_window_extent(renderer).y1 - 1
    assert_png(plot_simulation(simulated(case), tmp_path / "sim.png"), min_bytes=40_000)


@pytest.mark.parametrize("relative", [0.0, 1e-15])
def test_a_difference_at_round_off_has_no_colour_scale(case, relative):
    figure = simulation_figure(simulated(case, 1.0 + relative, 1.0 + relative))
    labels = [a.get_ylabel() for a in colorbar_axes(figure)]
    assert "tau - tau_truth" not in labels and "|u| - |u_truth|" not in labels
    for title in ("tau difference", "|u| difference"):
        axis = axis_titled(figure, title)
        assert any("identical to round-off" in t.get_text() for t in axis.texts)
    for contours in (c for a in plot_axes(figure) for c in a.collections):
        if isinstance(contours, ContourSet) and contours.get_cmap().name == "RdBu_r":
            pytest.fail("a diverging colour scale for a round-off difference")
    for bar in colorbar_axes(figure):  # no colour bar spans a meaningless range
        low, high = bar.get_ylim()
        assert high - low > 1e-6


def test_simulation_figure_without_the_truth(case):
    figure = simulation_figure(case)
    assert {a.get_ylabel() for a in colorbar_axes(figure)} == {"tau", "|u|"}
    assert_colorbars_labelled_and_round(figure)
    assert_axes_labelled(figure)


def test_learning_curve_marks_the_best_epoch(tmp_path):
    records = history(best=42)
    figure = learning_curve_figure(records)
    loss_axis, error_axis = plot_axes(figure)
    assert_axes_labelled(figure)
    assert error_axis.get_xlabel() == "epoch" and "%" in error_axis.get_ylabel()
    (marker,) = [line for line in error_axis.get_lines() if line.get_gid() == "best-epoch"]
    best = min(records, key=lambda r: r.validation_rel_l2_percent)
    assert best.epoch == 42
    assert marker.get_xdata()[0] == 42
    assert marker.get_ydata()[0] == pytest.approx(best.validation_rel_l2_percent)
    (note,) = error_axis.texts
    assert (
        "epoch 42" in note.get_text() and f"{best.validation_rel_l2_percent:.3g}" in note.get_text()
    )
    # the curves span decades: log scale
    assert loss_axis.get_yscale() == "log" and error_axis.get_yscale() == "log"
    # nothing overlaps: the legend is below both panels, the labels inside the figure
    renderer = drawn(figure)
    legend = figure.legends[0].get_window_extent(renderer)
    for axis in (loss_axis, error_axis):
        box = axis.get_tightbbox(renderer)
        assert legend.y1 <= box.y0 + 1
        assert box.x0 >= 0 and box.x1 <= figure.bbox.x1 + 1
    assert loss_axis.get_tightbbox(renderer).x1 <= error_axis.get_tightbbox(renderer).x0 + 1
    assert_png(plot_learning_curves(records, tmp_path / "lcurve.png"))


def test_learning_curve_without_validation_and_without_decades():
    records = [
        dataclasses.replace(r, validation_loss=np.nan, validation_rel_l2_percent=np.nan)
        for r in history(epochs=20, decades=False)
    ]
    figure = learning_curve_figure(records)
    _, error_axis = plot_axes(figure)
    assert error_axis.get_yscale() == "linear"
    (marker,) = [line for line in error_axis.get_lines() if line.get_gid() == "best-epoch"]
    assert marker.get_xdata()[0] == 20  # the training error falls to the last epoch
    assert "train" in marker.get_label()
    chosen = learning_curve_figure(records, best_epoch=7)
    (marker,) = [line for line in plot_axes(chosen)[1].get_lines() if line.get_gid()]
    assert marker.get_xdata()[0] == 7
    with pytest.raises(ValueError, match="best epoch 99"):
        learning_curve_figure(records, best_epoch=99)


def test_parity_plot(tmp_path):
    rng = np.random.default_rng(3)
    truths = [rng.random(400) * (k + 1) for k in range(3)]
    predictions = [t + 0.05 * rng.standard_normal(t.size) for t in truths]
    labels = ["a", "b", "c"]
    figure = parity_figure(truths, predictions, labels)
    (axis,) = plot_axes(figure)
    (points,) = [c for c in axis.collections if isinstance(c, PathCollection)]
    assert points.get_alpha() < 1
    assert np.all(points.get_sizes() <= 12)
    # the cases are interleaved: the last points drawn are not all of the last case
    colours = points.get_facecolors()
    assert len(np.unique(colours[-200:].round(3), axis=0)) == 3
    # the error over all points is written on the plot
    truth, prediction = np.concatenate(truths), np.concatenate(predictions)
    rel_l2 = 100 * np.linalg.norm(prediction - truth) / np.linalg.norm(truth)
    text = " ".join(t.get_text() for t in axis.texts)
    assert f"{rel_l2:.3g} %" in text
    assert f"{np.abs(prediction - truth).max():.3g}" in text
    # y = x, equal aspect, the same limits on both axes
    assert any(line.get_label() == "y = x" for line in axis.get_lines())
    assert axis.get_aspect() == 1.0 and axis.get_xlim() == axis.get_ylim()
    assert axis.get_xlabel() and axis.get_ylabel()
    # the legend lies beside the axes, off the data
    renderer = drawn(figure)
    legend = axis.get_legend()
    assert [t.get_text() for t in legend.get_texts()][:3] == labels
    assert legend.get_window_extent(renderer).x0 >= axis.get_window_extent(renderer).x1
    # more points, more transparency
    many = parity_figure(
        [np.repeat(t, 50) for t in truths], [np.repeat(p, 50) for p in predictions], labels
    )
    (dense,) = [c for c in plot_axes(many)[0].collections if isinstance(c, PathCollection)]
    assert dense.get_alpha() < points.get_alpha()
    assert_png(plot_parity(truths, predictions, labels, tmp_path / "parity.png"))


def test_error_against_alpha(tmp_path):
    figure = error_against_alpha_figure([1.0, 0.5, 1.5], [0.9, 1.2, 1.4])
    (axis,) = plot_axes(figure)
    assert axis.get_xlabel() == "alpha" and "%" in axis.get_ylabel()
    (line,) = axis.get_lines()
    np.testing.assert_array_equal(line.get_xdata(), [0.5, 1.0, 1.5])
    assert_png(
        plot_error_against_alpha([1.0, 0.5], [0.9, 1.2], tmp_path / "alpha.png"), min_bytes=8000
    )


def test_field_comparison(case, tmp_path):
    prediction = case.tau * (1 + 0.02 * np.sin(case.points[:, 0]))
    figure = field_comparison_figure(case, prediction)
    assert_colorbars_labelled_and_round(figure)
    assert "tau_network - tau_truth" in {a.get_ylabel() for a in colorbar_axes(figure)}
    assert_axes_labelled(figure)
    identical = field_comparison_figure(case, case.tau.copy())
    assert len(colorbar_axes(identical)) == 2
    assert "identical to round-off" in plot_axes(identical)[2].texts[0].get_text()
    assert_png(plot_field_comparison(case, prediction, tmp_path / "fields.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fields.png"]
