"""Figures (matplotlib, Agg): case fields, coupled simulations, and training and evaluation.

:mod:`vcnn.plotting.cases` draws case files and holds the shared helpers (rounded colour-bar
ticks, labelled axes, difference scales); :mod:`vcnn.plotting.simulation` the two-way coupled
comparison; :mod:`vcnn.plotting.training` learning curves, parity plots, error against alpha
and field comparisons.
"""

from vcnn.plotting.cases import case_figure, case_triangulation, plot_case
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

__all__ = [
    "case_figure",
    "case_triangulation",
    "error_against_alpha_figure",
    "field_comparison_figure",
    "learning_curve_figure",
    "parity_figure",
    "plot_case",
    "plot_error_against_alpha",
    "plot_field_comparison",
    "plot_learning_curves",
    "plot_parity",
    "plot_simulation",
    "simulation_figure",
]
