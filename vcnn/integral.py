"""The integral of tau as a function of the whole discretisation (one cloud per case).

The pointwise closure predicts tau at a point from the flow in a cloud around it; integrating
it gives ``I = integral of tau over the domain``. This module learns ``I`` directly, as the
seed problem of the method poses it: ``I(x_1, ..., x_n, u_1, ..., u_n)`` of the points of a
discretisation and the velocity (and invariant fields) at them, which must not change when the
points and velocities are rotated or reflected together, translated, or listed in another
order.

Every point of a case is one entry of ONE cloud: its position relative to the domain's
volume-weighted centroid, its velocity (a vector channel) and its invariant point scalars
(:class:`vcnn.features.FeatureSpec` point scalars: |S|, the wall feature, |u|), weighted by its
nodal volume. The network is :class:`vcnn.network.VectorCloudNet` with ``pooling="volume"``:
its moments ``L = sum_i V_i G_i Q_i / sum_i V_i`` are then a quadrature of an integral over the
domain, so the descriptor (and the prediction) means the same on any mesh of the domain, and
converges as the mesh is refined. The network predicts the domain average of tau, and

    I = |Omega| (offset + scale * net(points, velocity, scalars; V)),   |Omega| = sum_i V_i,

with ``offset`` and ``scale`` the mean and spread of the training cases' averages (so the
network's output is O(1)). The model is invariant under rotations and reflections (the
descriptor), translations (positions relative to the centroid, itself a function of the point
set), permutations and padding, to round-off. It is not invariant under duplicating every
point (which doubles ``|Omega|``): ``I`` is extensive.

Checkpoints of this model record ``checkpoint_kind = "integral"`` (see
:data:`vcnn.closure.CHECKPOINT_KIND_KEY`); :func:`vcnn.load_closure` (the pointwise path of
``vcnn evaluate`` and ``vcnn simulate``) refuses them, and ``vcnn evaluate`` reports the
integral instead (:func:`evaluate_integral`). Training: ``target = "integral"`` in the
``[train]`` table (:mod:`vcnn.training.integral`). The physics and the example are in
``docs/physics.md`` and ``experiments/integral/``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vcnn.casefile import Case
from vcnn.features import CloudBatch, FeatureNormalizer, FeatureSpec, point_features
from vcnn.network import VectorCloudNet
from vcnn.symmetry import check_frame_independence

logger = logging.getLogger(__name__)

#: ``checkpoint_kind`` of a whole-discretisation integral model.
INTEGRAL_KIND = "integral"
#: ``target`` of a training config that trains this model.
INTEGRAL_TARGET = "integral"
#: The network of an integral model unless the ``[model]`` table overrides a key: small (the
#: whole domain is one cloud, so each epoch embeds every point of every case), smooth (SiLU),
#: volume pooling (the quadrature), no query-point features (there is no query point).
DEFAULT_NETWORK: dict[str, Any] = {
    "embedding": (16, 32),
    "axis_neurons": 4,
    "fitting": (64, 64),
    "activation": "silu",
    "use_position_scalar_feature": False,
    "use_angle_feature": False,
    "position_vector": "raw",
    "scalar_channel": True,
    "residual": True,
    "pooling": "volume",
    "positive_output": False,
}
#: Transformations the model must be invariant under (the checker's duplication is left out:
#: duplicating every point doubles the domain volume, and ``I`` is extensive).
INVARIANCES = ("rotation", "reflection", "translation", "permutation", "padding")


def integral_feature_spec(features: Mapping[str, Any] | None = None) -> FeatureSpec:
    """The inputs of an integral model: a ``[features]`` table without pair scalars.

    Args:
        features: the ``[features]`` table (point scalars, vectors, wall cap); None: defaults.

    Returns:
        The spec, with ``pair_scalars`` empty.

    Raises:
        ValueError: when the table asks for pair scalars (they need a query point).
    """
    table = dict(features or {})
    pair = table.pop("pair_scalars", [])
    if pair:
        raise ValueError(
            f"target = 'integral' has no query point, so it takes no pair scalars; drop "
            f"pair_scalars = {list(pair)} from [features]"
        )
    return FeatureSpec.from_dict({**table, "pair_scalars": []})


@dataclass(frozen=True)
class DomainInputs:
    """One case as one cloud (raw, unnormalised).

    Attributes:
        points: (N, d) float64 absolute positions.
        vectors: (N, k, d) float64 point vectors (the velocity first).
        scalars: (N, s) float64 invariant point scalars in the spec's order.
        volume: (N,) float64 nodal volumes (quadrature weights).
        integral: the case's integral of tau, ``sum_i V_i tau_i`` (NaN when unknown).
        name: the case name.
    """

    points: np.ndarray
    vectors: np.ndarray
    scalars: np.ndarray
    volume: np.ndarray
    integral: float
    name: str

    @property
    def total_volume(self) -> float:
        """``|Omega| = sum_i V_i``."""
        return float(self.volume.sum())


def domain_inputs(case: Case, spec: FeatureSpec) -> DomainInputs:
    """The whole-discretisation inputs of a case.

    Args:
        case: the case (``tau`` is used only for the recorded integral).
        spec: the inputs (no pair scalars; :func:`integral_feature_spec`).

    Returns:
        The inputs.
    """
    features = point_features(case, spec)
    volume = np.asarray(case.nodal_volume, dtype=np.float64)
    if not (np.all(np.isfinite(volume)) and np.all(volume >= 0) and volume.sum() > 0):
        raise ValueError(f"case {case.name!r}: nodal volumes must be finite, >= 0, not all 0")
    return DomainInputs(
        points=np.asarray(case.points, dtype=np.float64),
        vectors=features.vectors,
        scalars=features.scalars,
        volume=volume,
        integral=float(case.tau_integral()),
        name=case.name,
    )


@dataclass(frozen=True)
class IntegralTarget:
    """How the network output maps to the domain average of tau: ``offset + scale * y``.

    Attributes:
        offset: mean over the training cases of ``I / |Omega|``.
        scale: their standard deviation (floored at 1e-3 of |offset| and at 1e-12).
    """

    offset: float
    scale: float

    @classmethod
    def fit(cls, cases: Sequence[DomainInputs]) -> IntegralTarget:
        """Fit on the training cases."""
        averages = np.array([c.integral / c.total_volume for c in cases], dtype=np.float64)
        offset = float(averages.mean())
        floor = max(1e-3 * abs(offset), 1e-12)
        return cls(offset=offset, scale=max(float(averages.std()), floor))


def fit_normalizer(cases: Sequence[DomainInputs]) -> FeatureNormalizer:
    """Input statistics over the points of the training cases (positions centred per case).

    Args:
        cases: the training cases.

    Returns:
        The normaliser (per-column scalar mean and spread, one scale per vector type, one
        for the positions: rotations commute with it).
    """
    batches = []
    for case in cases:
        centred = case.points - _centroid(case.points, case.volume)
        n = len(case.volume)
        batches.append(
            CloudBatch(
                pos=torch.from_numpy(centred)[None],
                vec=torch.from_numpy(case.vectors)[None],
                scal=torch.from_numpy(case.scalars)[None],
                mask=torch.ones(1, n, dtype=torch.bool),
                weight=None,
                volume=torch.from_numpy(case.volume)[None],
                queries=torch.zeros(1, dtype=torch.long),
                points=torch.arange(n)[None],
            )
        )
    return FeatureNormalizer.fit(batches)


def _centroid(points: np.ndarray, volume: np.ndarray) -> np.ndarray:
    return (volume[:, None] * points).sum(0) / volume.sum()


class IntegralModel(nn.Module):
    """``I`` of a whole discretisation: normalisation, centring, the network, the scaling.

    Args:
        net: a :class:`vcnn.network.VectorCloudNet` with ``pooling="volume"`` and a scalar
            output.
        normalizer: input statistics (:func:`fit_normalizer`).
        target: output scaling (:class:`IntegralTarget`).
    """

    def __init__(
        self, net: VectorCloudNet, normalizer: FeatureNormalizer, target: IntegralTarget
    ) -> None:
        super().__init__()
        if net.pooling != "volume" or net.output_kind != "scalar":
            raise ValueError(
                "an integral model needs a scalar VectorCloudNet with pooling = 'volume' (the "
                f"quadrature); got pooling {net.pooling!r}, output {net.output_kind!r}"
            )
        self.net = net
        self.normalizer = normalizer
        self.target = target
        self.register_buffer(
            "_scalar_mean", torch.tensor(normalizer.scalar_mean, dtype=torch.float32)
        )
        self.register_buffer("_scalar_std", torch.tensor(normalizer.scalar_std, dtype=torch.float32))
        self.register_buffer(
            "_vector_scale", torch.tensor(normalizer.vector_scale, dtype=torch.float32)
        )
        self.position_scale = float(normalizer.position_scale)

    @property
    def pooling(self) -> str:
        """``"volume"`` (read by :func:`vcnn.symmetry.check_frame_independence`)."""
        return "volume"

    @property
    def output_kind(self) -> str:
        """``"scalar"``."""
        return "scalar"

    def forward(
        self,
        pos: torch.Tensor,
        vec: torch.Tensor,
        scal: torch.Tensor,
        mask: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        *,
        volume: torch.Tensor,
    ) -> torch.Tensor:
        """Predict the integral of tau of each discretisation of a batch.

        Args:
            pos: (B, n, d) float, point positions (any origin: they are centred here).
            vec: (B, n, k, d) float, raw point vectors (velocity first).
            scal: (B, n, s) float, raw invariant point scalars.
            mask: (B, n) bool, True for real points (padding: False); None: all real.
            weight: (B, n) float in [0, 1] or None: a factor on each point's volume.
            volume: (B, n) float >= 0, nodal volumes (quadrature weights).

        Returns:
            (B,) float in the parameters' dtype: ``I`` of each discretisation.
        """
        dtype = next(self.parameters()).dtype
        batch, n = pos.shape[:2]
        valid = (
            torch.ones(batch, n, dtype=torch.bool, device=pos.device)
            if mask is None
            else mask.to(torch.bool)
        )
        # Padding may hold garbage (NaN, inf): zero it so that 0 * garbage stays 0.
        quadrature = torch.where(valid, volume.to(dtype), 0.0)
        if weight is not None:
            quadrature = quadrature * torch.where(valid, weight.to(dtype), 0.0)
        pos = torch.where(valid[..., None], pos.to(dtype), 0.0)
        total = quadrature.sum(dim=1)  # (B,) |Omega|
        centroid = (quadrature[..., None] * pos).sum(dim=1) / total[:, None]
        relative = (pos - centroid[:, None]) / self.position_scale
        vec = torch.where(valid[..., None, None], vec.to(dtype), 0.0)
        vec = vec / self._vector_scale.to(dtype)[:, None]
        scal = torch.where(valid[..., None], scal.to(dtype), 0.0)
        scal = (scal - self._scalar_mean.to(dtype)) / self._scalar_std.to(dtype)
        average = self.net(relative, vec, scal, mask=valid, volume=quadrature)
        return total * (self.target.offset + self.target.scale * average)

    def predict(self, case: Case | DomainInputs, spec: FeatureSpec) -> float:
        """``I`` of one case, computed in the parameters' dtype.

        Args:
            case: a case, or its :func:`domain_inputs`.
            spec: the model's inputs.

        Returns:
            The predicted integral.
        """
        inputs = case if isinstance(case, DomainInputs) else domain_inputs(case, spec)
        tensors = padded_batch([inputs], dtype=next(self.parameters()).dtype)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return float(self(**tensors)[0])
        finally:
            self.train(was_training)


def padded_batch(
    cases: Sequence[DomainInputs], *, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The cases as one padded batch (keyword arguments of :class:`IntegralModel`).

    Returns:
        ``pos`` (B, n, d), ``vec`` (B, n, k, d), ``scal`` (B, n, s), ``volume`` (B, n), all of
        ``dtype``, and ``mask`` (B, n) bool (False in padding slots).
    """
    if not cases:
        raise ValueError("padded_batch needs at least one case")
    batch, n_max = len(cases), max(len(c.volume) for c in cases)
    dim, k, s = cases[0].points.shape[1], cases[0].vectors.shape[1], cases[0].scalars.shape[1]
    pos = torch.zeros(batch, n_max, dim, dtype=dtype)
    vec = torch.zeros(batch, n_max, k, dim, dtype=dtype)
    scal = torch.zeros(batch, n_max, s, dtype=dtype)
    volume = torch.zeros(batch, n_max, dtype=dtype)
    mask = torch.zeros(batch, n_max, dtype=torch.bool)
    for row, case in enumerate(cases):
        n = len(case.volume)
        pos[row, :n] = torch.from_numpy(case.points)
        vec[row, :n] = torch.from_numpy(case.vectors)
        scal[row, :n] = torch.from_numpy(case.scalars)
        volume[row, :n] = torch.from_numpy(case.volume)
        mask[row, :n] = True
    return {"pos": pos, "vec": vec, "scal": scal, "mask": mask, "volume": volume}


def build_integral_network(
    *, dim: int, spec: FeatureSpec, overrides: Mapping[str, Any] | None = None
) -> VectorCloudNet:
    """The network of an integral model: :data:`DEFAULT_NETWORK` with ``overrides``.

    Raises:
        ValueError: for a bad override, or ``pooling`` other than ``"volume"``.
    """
    table = {**DEFAULT_NETWORK, **dict(overrides or {})}
    if table.get("pooling") != "volume":
        raise ValueError(
            f"target = 'integral' needs pooling = 'volume' (the quadrature over the domain), "
            f"got {table.get('pooling')!r}"
        )
    return VectorCloudNet(
        dim=dim, num_scalars=spec.num_scalars, num_vectors=spec.num_vectors, **table
    )


# ----------------------------------------------------------------------------- checkpoints
def integral_payload(
    model: IntegralModel, spec: FeatureSpec, *, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The checkpoint entries of an integral model (weights-only loadable).

    ``model_kind``/``model_config``/``model_state`` are the inner network's, so the generic
    checks of :func:`vcnn.checkpoint.load_model` apply to it; ``checkpoint_kind`` says what
    the network's output means.
    """
    from vcnn.closure import CHECKPOINT_KIND_KEY

    return {
        CHECKPOINT_KIND_KEY: INTEGRAL_KIND,
        "model_kind": type(model.net).__name__,
        "model_config": model.net.to_config(),
        "model_state": model.net.state_dict(),
        "feature_normalizer": model.normalizer.state_dict(),
        "feature_spec": spec.to_dict(),
        "integral_target": asdict(model.target),
        "dimension": model.net.config.dim,
        **dict(extra or {}),
    }


@dataclass
class LoadedIntegralModel:
    """An integral model read from a checkpoint.

    Attributes:
        model: the model (eval mode, float32, CPU).
        spec: its inputs.
        metadata: the checkpoint's records (no weights).
    """

    model: IntegralModel
    spec: FeatureSpec
    metadata: dict[str, Any]


def is_integral_checkpoint(metadata: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's records say it holds an integral model."""
    from vcnn.closure import CHECKPOINT_KIND_KEY

    return metadata.get(CHECKPOINT_KIND_KEY) == INTEGRAL_KIND


def load_integral_model(path: str | os.PathLike) -> LoadedIntegralModel:
    """Load an integral model (``best.pt``/``last.pt`` of a ``target = "integral"`` run).

    Raises:
        CheckpointError: when the file is unusable or holds another kind of model.
    """
    from vcnn.checkpoint import CheckpointError, load_model

    loaded = load_model(path, device="cpu")
    metadata = loaded.metadata
    if not is_integral_checkpoint(metadata):
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds no integral model (its checkpoint_kind is "
            f"{metadata.get('checkpoint_kind', 'closure')!r})"
        )
    try:
        spec = FeatureSpec.from_dict(metadata["feature_spec"])
        normalizer = FeatureNormalizer()
        normalizer.load_state_dict(loaded.feature_normalizer_state)
        target = IntegralTarget(**metadata["integral_target"])
        model = IntegralModel(loaded.model, normalizer, target)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} has unreadable records: {error}") from error
    return LoadedIntegralModel(model=model.eval(), spec=spec, metadata=metadata)


# ----------------------------------------------------------------------------- evaluation
@dataclass
class IntegralMetrics:
    """The integral of one case, predicted and true.

    Attributes:
        case: case name.
        alpha: ``meta["alpha"]`` or None.
        mesh: ``meta["mesh"]["kind"]`` or ``""``.
        num_points: N.
        integral: the case's ``sum_i V_i tau_i``.
        predicted: the model's ``I``.
        rel_error_percent: ``100 |predicted - integral| / |integral|``.
    """

    case: str
    alpha: float | None
    mesh: str
    num_points: int
    integral: float
    predicted: float
    rel_error_percent: float


def integral_metrics(case: Case, predicted: float) -> IntegralMetrics:
    """Compare a predicted integral with a case's."""
    truth = float(case.tau_integral())
    mesh = case.meta.get("mesh")
    kind = str(mesh.get("kind", "")) if isinstance(mesh, Mapping) else str(mesh or "")
    alpha = case.meta.get("alpha")
    return IntegralMetrics(
        case=case.name,
        alpha=None if alpha is None else float(alpha),
        mesh=kind,
        num_points=case.num_points,
        integral=truth,
        predicted=float(predicted),
        rel_error_percent=100 * abs(predicted - truth) / abs(truth) if truth else math.nan,
    )


def evaluate_integral(
    model_path: str | os.PathLike, cases: Sequence[Case], out_dir: str | os.PathLike
) -> list[IntegralMetrics]:
    """Predict ``I`` of every case; write ``integral_metrics.json`` into ``out_dir``.

    Args:
        model_path: an integral checkpoint.
        cases: the cases (their ``tau`` gives the true integral).
        out_dir: output folder (created).

    Returns:
        One record per case, in order.
    """
    from vcnn.config import atomic_write_text

    loaded = load_integral_model(model_path)
    results = []
    for case in cases:
        metrics = integral_metrics(case, loaded.model.predict(case, loaded.spec))
        logger.info(
            "%s: integral %.6g, predicted %.6g, rel. error %.3f %%",
            metrics.case,
            metrics.integral,
            metrics.predicted,
            metrics.rel_error_percent,
        )
        results.append(metrics)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps([asdict(m) for m in results], indent=2, allow_nan=True)
    atomic_write_text(out / "integral_metrics.json", text + "\n")
    return results


def invariance_report(
    model: IntegralModel,
    case: Case | DomainInputs,
    spec: FeatureSpec,
    *,
    seed: int = 0,
    num_trials: int = 3,
) -> dict[str, float]:
    """Relative deviations of ``I`` under the transformations of :data:`INVARIANCES`.

    Runs :func:`vcnn.symmetry.check_frame_independence` on the case's absolute positions
    (rotations and reflections about the origin, permutation, padding with garbage) in the
    model's dtype, and adds ``"shift"``: all points moved by a random vector of the size of the
    domain (the checker's translation only re-forms relative positions).

    Returns:
        Transformation name -> max relative deviation of ``I``.
    """
    inputs = case if isinstance(case, DomainInputs) else domain_inputs(case, spec)
    dtype = next(model.parameters()).dtype
    tensors = padded_batch([inputs], dtype=dtype)
    report = check_frame_independence(
        model,
        tensors["pos"],
        tensors["vec"],
        tensors["scal"],
        tensors["mask"],
        volume=tensors["volume"],
        num_trials=num_trials,
        seed=seed,
    )
    out = {name: report.relative[name] for name in INVARIANCES}
    rng = np.random.default_rng(seed)
    span = float(np.ptp(inputs.points, axis=0).max())
    shift = torch.as_tensor(rng.standard_normal(inputs.points.shape[1]) * span, dtype=dtype)
    with torch.no_grad():
        reference = model(**tensors)
        moved = model(**{**tensors, "pos": tensors["pos"] + shift})
    out["shift"] = float((moved - reference).abs().max() / reference.abs().max())
    return out


__all__ = [
    "DEFAULT_NETWORK",
    "INTEGRAL_KIND",
    "INTEGRAL_TARGET",
    "INVARIANCES",
    "DomainInputs",
    "IntegralMetrics",
    "IntegralModel",
    "IntegralTarget",
    "LoadedIntegralModel",
    "build_integral_network",
    "domain_inputs",
    "evaluate_integral",
    "fit_normalizer",
    "integral_feature_spec",
    "integral_metrics",
    "integral_payload",
    "invariance_report",
    "is_integral_checkpoint",
    "load_integral_model",
    "padded_batch",
]
