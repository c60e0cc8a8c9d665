"""A-priori evaluation of a trained network on case files: metrics and figures.

For every case, tau is predicted at every point from its full cloud (all points of the region,
the default) or from a fixed-size random subset, and compared with the case's tau:

* ``rel_l2_percent`` = 100 ||pred - tau||_2 / ||tau||_2 over the points (unweighted, as in
  training's default);
* ``max_abs_error`` = max |pred - tau|;
* ``integral_rel_error`` = |sum_i V_i pred_i - sum_i V_i tau_i| / |sum_i V_i tau_i| (V the
  nodal volumes), the error of the integral of tau.

Full clouds are ragged (hundreds to thousands of points); they are sorted by size and cut into
batches whose padded size (clouds x widest cloud) stays under ``max_entries_per_batch``, so the
padding stays small and memory is bounded whatever the mesh size.
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
import torch

from vcnn.casefile import Case
from vcnn.checkpoint import CheckpointError, LoadedModel, load_model
from vcnn.config import atomic_write_text
from vcnn.datasets import (
    CaseSource,
    CloudDataset,
    CloudOptions,
    TargetScaler,
    as_case_sources,
    derive_seed,
    discover_cases,
)
from vcnn.features import FeatureNormalizer, FeatureSpec

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
    """

    case: str
    alpha: float | None
    rel_l2_percent: float
    max_abs_error: float
    integral_rel_error: float
    num_points: int
    cloud_size: int | None


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


def case_metrics(case: Case, prediction: np.ndarray, *, cloud_size: int | None) -> CaseMetrics:
    """Errors of a prediction of tau on a case (see the module docstring).

    Args:
        case: the case (truth in ``case.tau``).
        prediction: (N,) float predicted tau.
        cloud_size: recorded in the metrics.

    Returns:
        The metrics.
    """
    prediction = np.asarray(prediction, dtype=np.float64)
    error = prediction - case.tau
    norm = float(np.linalg.norm(case.tau))
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
    )


def predict_case(
    loaded: LoadedModel,
    source: CaseSource,
    *,
    cloud_size: int | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 1024,
    max_entries_per_batch: int = 2_000_000,
    seed: int = 0,
    frame: np.ndarray | None = None,
) -> CasePrediction:
    """Predict tau at every point of a case.

    Args:
        loaded: the model and its normalisers (:func:`vcnn.checkpoint.load_model`).
        source: the case.
        cloud_size: None for full clouds, else this many random points per cloud.
        device: inference device.
        batch_size: most clouds per forward pass.
        max_entries_per_batch: most padded point slots (clouds x width) per forward pass.
        seed: seed of the random subsets (``cloud_size`` given).
        frame: (d, d) orthogonal matrix: present the case in a rotated/reflected frame, i.e.
            every relative position and input vector is multiplied by it (the invariant
            scalars and the clouds do not change). A frame-independent model predicts the
            same tau in every frame.

    Returns:
        The prediction and its metrics.
    """
    metadata = loaded.metadata
    spec = FeatureSpec.from_dict(metadata["feature_spec"])
    normalizer = FeatureNormalizer()
    if loaded.feature_normalizer_state is not None:
        normalizer.load_state_dict(loaded.feature_normalizer_state)
    dataset = CloudDataset(
        [source],
        spec=spec,
        target_scaler=TargetScaler(scale=loaded.target_scale),
        cloud_options=CloudOptions.from_dict(dict(metadata["cloud_options"])),
        normalizer=normalizer if loaded.feature_normalizer_state is not None else None,
        device=device,
    )
    case = source.load()
    prediction = np.empty(case.num_points)
    model = loaded.model
    rotation = None
    if frame is not None:
        frame = np.asarray(frame, dtype=np.float64)
        if frame.shape != (case.dim, case.dim) or not np.allclose(
            frame @ frame.T, np.eye(case.dim), atol=1e-10
        ):
            raise ValueError(f"frame must be a ({case.dim}, {case.dim}) orthogonal matrix")
        rotation = torch.as_tensor(frame.T, dtype=torch.float32, device=device)
    with torch.no_grad():
        for queries, indices, weights in _batches(
            dataset,
            cloud_size=cloud_size,
            batch_size=batch_size,
            max_entries=max_entries_per_batch,
            seed=seed,
        ):
            batch = dataset.gather(queries, indices, weights).inputs
            pos, vec = batch.pos, batch.vec
            if rotation is not None:
                pos, vec = pos @ rotation.to(pos.dtype), vec @ rotation.to(vec.dtype)
            output = model(pos, vec, batch.scal, batch.mask, batch.weight)
            prediction[queries.cpu().numpy()] = output.double().cpu().numpy()
    prediction *= loaded.target_scale
    return CasePrediction(
        case=case,
        prediction=prediction,
        metrics=case_metrics(case, prediction, cloud_size=cloud_size),
    )


def _batches(
    dataset: CloudDataset, *, cloud_size: int | None, batch_size: int, max_entries: int, seed: int
):
    """Yield (queries (B,), indices (B, n), weights (B, n) | None) of one case's clouds."""
    if cloud_size is not None:
        plan = dataset.draw(cloud_size, seed=derive_seed(seed, 1))
        rows = max(1, min(batch_size, max_entries // cloud_size))
        for start in range(0, plan.queries.numel(), rows):
            part = slice(start, start + rows)
            weights = None if plan.weights is None else plan.weights[part]
            yield plan.queries[part], plan.indices[part], weights
        return
    clouds = dataset.sampler(0).full_clouds()
    sizes = clouds.sizes
    order = np.argsort(sizes, kind="stable")
    start = 0
    while start < order.size:
        width = int(sizes[order[start]])
        stop = start
        # Grow the batch while the widest (last, sorted) cloud keeps it under the budget.
        while stop < order.size and stop - start < batch_size:
            width = int(sizes[order[stop]])
            if (stop - start + 1) * width > max_entries and stop > start:
                break
            stop += 1
        chosen = order[start:stop]
        width = int(sizes[chosen].max())
        counts = sizes[chosen]
        rows = np.repeat(np.arange(chosen.size), counts)
        columns = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        entries = np.concatenate(
            [np.arange(clouds.offsets[q], clouds.offsets[q + 1]) for q in chosen]
        )
        indices = np.full((chosen.size, width), -1, dtype=np.int64)
        indices[rows, columns] = clouds.indices[entries]
        weights = None
        if clouds.weights is not None:
            weights_array = np.zeros((chosen.size, width), dtype=np.float32)
            weights_array[rows, columns] = clouds.weights[entries]
            weights = torch.as_tensor(weights_array)
        yield (
            torch.as_tensor(clouds.queries[chosen], dtype=torch.int64),
            torch.as_tensor(indices),
            weights,
        )
        start = stop


def evaluate(
    model_path: str | os.PathLike,
    data: str | os.PathLike | Sequence[str | os.PathLike | CaseSource],
    out_dir: str | os.PathLike,
    *,
    cloud_size: int | None = None,
    device: str = "auto",
    batch_size: int = 1024,
    max_entries_per_batch: int = 2_000_000,
    seed: int = 0,
    figures: bool = True,
) -> list[CaseMetrics]:
    """Evaluate a trained network on case files; write ``metrics.json`` and figures.

    Args:
        model_path: checkpoint (``best.pt``).
        data: a folder of case files, or a list of case paths/sources.
        out_dir: output folder: ``metrics.json``, ``parity.png``, ``error_vs_alpha.png`` (when
            the cases have alphas), ``fields/<case>.png`` (2-D cases).
        cloud_size: None for full clouds (deterministic), else this many random points per
            cloud (as in training).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        batch_size: most clouds per forward pass.
        max_entries_per_batch: most padded point slots per forward pass (bounds memory).
        seed: seed of the random cloud subsets.
        figures: draw the figures.

    Returns:
        Per-case metrics, in the order of the cases.

    Raises:
        CheckpointError: for an unusable checkpoint.
        DatasetError / CaseFileError: for missing or bad case files.
    """
    from vcnn.training import resolve_device

    if cloud_size is not None and cloud_size < 1:
        raise ValueError(f"cloud_size must be None (full clouds) or >= 1, got {cloud_size}")
    torch_device = resolve_device(device)
    loaded = load_model(model_path, device=torch_device)
    if "feature_spec" not in loaded.metadata or "cloud_options" not in loaded.metadata:
        raise CheckpointError(
            f"checkpoint {str(model_path)!r} lacks the feature spec or the cloud options: "
            "was it written by vcnn.training?"
        )
    if isinstance(data, str | os.PathLike) and Path(data).is_dir():
        sources = discover_cases(data)
    elif isinstance(data, str | os.PathLike):
        sources = as_case_sources([data])
    else:
        sources = as_case_sources(data)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[CasePrediction] = []
    for source in sources:
        result = predict_case(
            loaded,
            source,
            cloud_size=cloud_size,
            device=torch_device,
            batch_size=batch_size,
            max_entries_per_batch=max_entries_per_batch,
            seed=seed,
        )
        metrics = result.metrics
        logger.info(
            "%s: rel L2 %.3f %%, max |error| %.3e, integral rel. error %.3e",
            metrics.case,
            metrics.rel_l2_percent,
            metrics.max_abs_error,
            metrics.integral_rel_error,
        )
        if figures and result.case.dim == 2:
            from vcnn.plotting_training import plot_field_comparison

            field_path = out_dir / "fields" / f"{metrics.case}.png"
            plot_field_comparison(result.case, result.prediction, field_path)
        results.append(result)
    metrics_list = [r.metrics for r in results]
    text = json.dumps([asdict(m) for m in metrics_list], indent=2, allow_nan=True)
    atomic_write_text(out_dir / "metrics.json", text + "\n")
    if figures and results:
        from vcnn.plotting_training import plot_error_against_alpha, plot_parity

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


__all__ = ["CaseMetrics", "CasePrediction", "case_metrics", "evaluate", "predict_case"]
