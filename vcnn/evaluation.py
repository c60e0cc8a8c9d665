"""A-priori evaluation of a trained network on case files: metrics and figures.

For every case, tau is predicted at every point by :meth:`vcnn.closure.Closure.predict_detailed`
(the one inference path) from its full cloud (all points of the region, the default) or from a
fixed-size random subset, and compared with the case's tau:

* ``rel_l2_percent`` = 100 ||pred - tau||_2 / ||tau||_2 over the points (unweighted, as in
  training's default);
* ``max_abs_error`` = max |pred - tau|;
* ``integral_rel_error`` = |sum_i V_i pred_i - sum_i V_i tau_i| / |sum_i V_i tau_i| (V the
  nodal volumes), the error of the integral of tau;
* ``rel_l2_percent_nonnegative`` = 100 ||pred - max(tau, 0)||_2 / ||max(tau, 0)||_2, and
  ``negative_tau_points`` / ``negative_tau_share`` (:mod:`vcnn.undershoot`): where a coarse
  mesh's tau undershoots below zero (discretisation error of the reference, which the
  non-negative head does not reproduce), the error against the reference's non-negative part
  and how much of ``||tau||`` the negative values hold;
* ``out_of_range_fraction``: the fraction of cloud entries with an input outside the training
  range (the closure extrapolates there);
* ``engine``: the backend of :mod:`vcnn.engines` that ran the network (``"fused"``,
  ``"sparse"`` or ``"padded"``).

A checkpoint of the whole-discretisation integral model (:mod:`vcnn.integral`) gets the
integral report instead: the predicted and true integral of each case
(``integral_metrics.json``), its relative error as ``integral_rel_error``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vcnn.casefile import Case
from vcnn.checkpoint import load_checkpoint
from vcnn.closure import DEFAULT_CLOUDS, Closure, load_closure
from vcnn.config import atomic_write_text
from vcnn.datasets import CaseSource, as_case_sources, discover_cases
from vcnn.integral import is_integral_checkpoint
from vcnn.models import resolve_model
from vcnn.undershoot import SIGNIFICANT_SHARE, tau_undershoot

logger = logging.getLogger(__name__)


@dataclass
class CaseMetrics:
    """A-priori errors of the network on one case.

    Attributes:
        case: case name.
        alpha: ``meta["alpha"]`` or None.
        rel_l2_percent: relative L2 error of tau in percent.
        max_abs_error: largest absolute error of tau.
        integral_rel_error: relative error of the integral of tau (a fraction, not percent).
        num_points: number of points N.
        cloud_size: points per cloud (None: full clouds).
        out_of_range_fraction: fraction of cloud entries with an input outside the training
            range (NaN when the checkpoint records no ranges).
        seconds: wall time of the prediction.
        engine: the backend that ran the network (empty when not known).
        clouds: the clouds the network ran on: ``"full"``, ``"quadrature"`` or ``"sample"``.
        rel_l2_percent_nonnegative: relative L2 error in percent against ``max(tau, 0)``.
        negative_tau_points: points where the case's tau is negative (an undershoot).
        negative_tau_share: ``||min(tau, 0)|| / ||tau||`` of the case.
    """

    case: str
    alpha: float | None
    rel_l2_percent: float
    max_abs_error: float
    integral_rel_error: float
    num_points: int
    cloud_size: int | None
    out_of_range_fraction: float = math.nan
    seconds: float = math.nan
    engine: str = ""
    clouds: str = "full"
    rel_l2_percent_nonnegative: float = math.nan
    negative_tau_points: int = 0
    negative_tau_share: float = 0.0


@dataclass
class CasePrediction:
    """Network prediction of tau on one case.

    Attributes:
        case: the case (its ``tau`` is the truth).
        prediction: (N,) float64 predicted tau.
        metrics: the errors.
    """

    case: Case
    prediction: np.ndarray
    metrics: CaseMetrics


def case_metrics(
    case: Case,
    prediction: np.ndarray,
    *,
    cloud_size: int | None,
    out_of_range_fraction: float = math.nan,
    seconds: float = math.nan,
    engine: str = "",
    clouds: str = "full",
) -> CaseMetrics:
    """Errors of a prediction of tau on a case (see the module docstring).

    Args:
        case: the case (truth in ``case.tau``).
        prediction: (N,) float predicted tau.
        cloud_size: recorded in the metrics.
        out_of_range_fraction: recorded in the metrics.
        seconds: recorded in the metrics.
        engine: recorded in the metrics.
        clouds: recorded in the metrics.

    Returns:
        The metrics.
    """
    prediction = np.asarray(prediction, dtype=np.float64)
    error = prediction - case.tau
    norm = float(np.linalg.norm(case.tau))
    nonnegative = np.maximum(case.tau, 0.0)
    nonnegative_norm = float(np.linalg.norm(nonnegative))
    undershoot = tau_undershoot(case.tau)
    integral = case.tau_integral()
    predicted_integral = float(np.dot(case.nodal_volume, prediction))
    return CaseMetrics(
        case=case.name,
        alpha=None if case.meta.get("alpha") is None else float(case.meta["alpha"]),
        rel_l2_percent=100.0 * float(np.linalg.norm(error)) / norm if norm > 0 else math.nan,
        max_abs_error=float(np.abs(error).max()),
        integral_rel_error=(
            abs(predicted_integral - integral) / abs(integral) if integral != 0 else math.nan
        ),
        num_points=case.num_points,
        cloud_size=cloud_size,
        out_of_range_fraction=out_of_range_fraction,
        seconds=seconds,
        engine=engine,
        clouds=clouds,
        rel_l2_percent_nonnegative=(
            100.0 * float(np.linalg.norm(prediction - nonnegative)) / nonnegative_norm
            if nonnegative_norm > 0
            else math.nan
        ),
        negative_tau_points=undershoot.negative_points,
        negative_tau_share=undershoot.negative_share,
    )


def predict_case(
    closure: Closure,
    case: Case | CaseSource,
    *,
    cloud_size: int | None = None,
    seed: int = 0,
    frame: np.ndarray | None = None,
    clouds: str = DEFAULT_CLOUDS,
) -> CasePrediction:
    """Predict tau at every point of a case and measure the errors against its tau.

    Args:
        closure: the trained closure (:func:`vcnn.closure.load_closure`).
        case: the case, in memory or as a lazy source.
        cloud_size: None for full clouds, else this many random points per cloud.
        seed: seed of the random subsets (``cloud_size`` given).
        frame: (d, d) orthogonal matrix: present the case in a rotated/reflected frame (see
            :meth:`vcnn.closure.Closure.predict`).
        clouds: ``"full"`` or ``"quadrature"`` (see :meth:`vcnn.closure.Closure.predict`).

    Returns:
        The prediction and its metrics.
    """
    if isinstance(case, CaseSource):
        case = case.load()
    result = closure.predict_detailed(
        case, cloud_size=cloud_size, seed=seed, frame=frame, clouds=clouds
    )
    return CasePrediction(
        case=case,
        prediction=result.tau,
        metrics=case_metrics(
            case,
            result.tau,
            cloud_size=cloud_size,
            out_of_range_fraction=result.out_of_range_fraction,
            seconds=result.seconds["total"],
            engine=result.engine,
            clouds=result.clouds,
        ),
    )


def evaluate(
    model_path: str | os.PathLike,
    data: str | os.PathLike | Sequence[str | os.PathLike | CaseSource],
    out_dir: str | os.PathLike,
    *,
    cloud_size: int | None = None,
    device: str = "auto",
    seed: int = 0,
    figures: bool = True,
    clouds: str = DEFAULT_CLOUDS,
) -> list[CaseMetrics]:
    """Evaluate a trained network on case files; write ``metrics.json`` and figures.

    Args:
        model_path: checkpoint (``best.pt``).
        data: a folder of case files, or a list of case paths/sources.
        out_dir: output folder: ``metrics.json``, ``parity.png``, ``error_vs_alpha.png`` (when
            the cases have alphas), ``fields/<case>.png`` (truth, prediction and error; a 3-D
            case in its mid-span x-y plane).
        cloud_size: None for full clouds (deterministic), else this many random points per
            cloud (as in training).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        seed: seed of the random cloud subsets.
        figures: draw the figures.
        clouds: ``"full"`` or ``"quadrature"`` (see :meth:`vcnn.closure.Closure.predict`).

    Returns:
        Per-case metrics, in the order of the cases.

    Raises:
        CheckpointError: for an unusable checkpoint.
        DatasetError / CaseFileError: for missing or bad case files.
    """
    if cloud_size is not None and cloud_size < 1:
        raise ValueError(f"cloud_size must be None (full clouds) or >= 1, got {cloud_size}")
    if isinstance(data, str | os.PathLike) and Path(data).is_dir():
        sources = discover_cases(data)
    elif isinstance(data, str | os.PathLike):
        sources = as_case_sources([data])
    else:
        sources = as_case_sources(data)
    if is_integral_checkpoint(load_checkpoint(resolve_model(model_path))):
        return _evaluate_integral(resolve_model(model_path), sources, Path(out_dir))
    closure = load_closure(model_path, device=device)
    out_dir = Path(out_dir)
    results: list[CasePrediction] = []
    for source in sources:
        result = predict_case(closure, source, cloud_size=cloud_size, seed=seed, clouds=clouds)
        metrics = result.metrics
        logger.info(
            "%s: rel L2 %.3f %%, max |error| %.3e, integral rel. error %.3e, inputs out of "
            "range %.2g %%, %.2f s",
            metrics.case,
            metrics.rel_l2_percent,
            metrics.max_abs_error,
            metrics.integral_rel_error,
            100 * metrics.out_of_range_fraction,
            metrics.seconds,
        )
        if metrics.negative_tau_share > SIGNIFICANT_SHARE:
            logger.warning(
                "%s: the reference tau is negative at %d points (%.2f %% of ||tau||), a "
                "discretisation undershoot the closure does not reproduce; rel L2 against "
                "max(tau, 0): %.3f %%",
                metrics.case,
                metrics.negative_tau_points,
                100 * metrics.negative_tau_share,
                metrics.rel_l2_percent_nonnegative,
            )
        results.append(result)
    # Every case is predicted before anything is written: a case the closure refuses (absurd
    # period, velocity or cloud size, NaN fields) leaves no partial output behind.
    out_dir.mkdir(parents=True, exist_ok=True)
    if figures:
        from vcnn.plotting.training import plot_field_comparison

        for result in results:
            if result.case.dim == 3 and result.case.extra.get("cells") is None:
                # a 3-D section is cut through the cells: a case file without them has none
                logger.info("%s: no field figure (a 3-D case without cells)", result.metrics.case)
                continue
            field_path = out_dir / "fields" / f"{result.metrics.case}.png"
            plot_field_comparison(result.case, result.prediction, field_path)
    metrics_list = [r.metrics for r in results]
    text = json.dumps([asdict(m) for m in metrics_list], indent=2, allow_nan=True)
    atomic_write_text(out_dir / "metrics.json", text + "\n")
    if figures and results:
        from vcnn.plotting.training import plot_error_against_alpha, plot_parity

        plot_parity(
            [r.case.tau for r in results],
            [r.prediction for r in results],
            [r.metrics.case for r in results],
            out_dir / "parity.png",
        )
        with_alpha = [m for m in metrics_list if m.alpha is not None]
        if with_alpha:
            plot_error_against_alpha(
                [m.alpha for m in with_alpha],
                [m.rel_l2_percent for m in with_alpha],
                out_dir / "error_vs_alpha.png",
            )
    return metrics_list


def _evaluate_integral(
    model_path: Path, sources: Sequence[CaseSource], out_dir: Path
) -> list[CaseMetrics]:
    """The integral report of an integral checkpoint (:mod:`vcnn.integral`).

    Writes ``integral_metrics.json`` (true and predicted integral per case) and
    ``metrics.json`` (the pointwise metrics' layout: ``integral_rel_error`` holds the model's
    relative error, the pointwise errors are NaN: the model predicts no tau at points).
    """
    from vcnn.integral import evaluate_integral

    records = evaluate_integral(model_path, [source.load() for source in sources], out_dir)
    metrics_list = [
        CaseMetrics(
            case=r.case,
            alpha=r.alpha,
            rel_l2_percent=math.nan,
            max_abs_error=math.nan,
            integral_rel_error=r.rel_error_percent / 100,
            num_points=r.num_points,
            cloud_size=None,
            engine="integral",
        )
        for r in records
    ]
    text = json.dumps([asdict(m) for m in metrics_list], indent=2, allow_nan=True)
    atomic_write_text(out_dir / "metrics.json", text + "\n")
    return metrics_list


__all__ = ["CaseMetrics", "CasePrediction", "case_metrics", "evaluate", "predict_case"]
