"""Network inputs of vector clouds: relative positions, per-point vectors, invariant scalars.

The contract with :mod:`vcnn.network` is :class:`CloudBatch`:

* ``pos`` (B, n, d): relative positions x_i - x0 (the image inside the cloud),
* ``vec`` (B, n, k, d): per-point vectors that rotate with the frame (velocity u_i, user vectors),
* ``scal`` (B, n, s): invariant scalars, the per-point ones first, then the pair ones,
* ``mask`` (B, n) bool and ``weight`` (B, n) smooth cutoff weights or None.

Scalars are split explicitly into **point** scalars, which depend on the mesh point only
(|S|_i, a wall-distance feature, the relative nodal volume, |u_i|, the wall flag, user fields)
and can be embedded once per mesh point, and **pair** scalars, which depend on the query too
(a proximity feature of |x_i - x0|, the normalised region radius, the cosine between
x_i - x0 and u_i). Every scalar is built from norms and dot products of vectors that rotate
together, so it is invariant under rotations and reflections of the input field.

Normalisation (:class:`FeatureNormalizer`) standardises each scalar column and divides each
vector type (and the positions) by one positive number, never per component: a per-component
scaling would not commute with rotations and would break frame independence.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

from vcnn.clouds import Clouds, PaddedClouds
from vcnn.physics import wall_feature_cap

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_PAIR_SCALARS",
    "BUILTIN_POINT_SCALARS",
    "CloudBatch",
    "FeatureNormalizer",
    "FeatureSpec",
    "PointFeatures",
    "build_batch",
    "pair_features",
    "point_features",
]

BUILTIN_POINT_SCALARS = ("strain_rate", "wall_feature", "volume", "speed", "is_wall")
BUILTIN_PAIR_SCALARS = ("proximity", "distance", "normalized_radius", "upstream_cosine")
# Saturation of the mixing length l_m = min(kappa d, cap) of the closure (DESIGN 3.3).
_DEFAULT_WALL_CAP = wall_feature_cap()
# b = sqrt(D / zeta) |ln eps| of the default ellipse (D = 0.1, zeta = 3, eps = 0.2).
_DEFAULT_PROXIMITY_LENGTH = math.sqrt(0.1 / 3.0) * abs(math.log(0.2))


@dataclass(frozen=True)
class FeatureSpec:
    """Which inputs the network sees; JSON-serialisable (store it beside the checkpoint).

    Attributes:
        point_scalars: per-point invariant scalars: built-in names
            ("strain_rate", "wall_feature", "volume", "speed", "is_wall") or the name of any
            (N,) field of the case (a user scalar).
        pair_scalars: query-dependent invariant scalars: "proximity" (exp(-|x_i - x0| / L)),
            "distance" (|x_i - x0|), "normalized_radius" (1 on the region boundary),
            "upstream_cosine" (cos of the angle between x_i - x0 and u_i, 0 if either is 0).
        vectors: per-point vectors, names of (N, d) fields; "velocity" is u_i.
        wall_distance_cap: wall feature = min(d, cap) / cap (the mixing-length saturation).
        proximity_length: length L of the proximity feature.
    """

    point_scalars: tuple[str, ...] = BUILTIN_POINT_SCALARS
    pair_scalars: tuple[str, ...] = ("proximity", "upstream_cosine")
    vectors: tuple[str, ...] = ("velocity",)
    wall_distance_cap: float = _DEFAULT_WALL_CAP
    proximity_length: float = _DEFAULT_PROXIMITY_LENGTH

    def __post_init__(self) -> None:
        for name in ("point_scalars", "pair_scalars", "vectors"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"{name} must be a sequence of names, got the string {value!r}")
            object.__setattr__(self, name, tuple(str(v) for v in value))
        unknown = [n for n in self.pair_scalars if n not in BUILTIN_PAIR_SCALARS]
        if unknown:
            raise ValueError(
                f"unknown pair scalars {unknown}; choose from {BUILTIN_PAIR_SCALARS}"
            )
        names = self.scalar_names
        if len(set(names)) != len(names) or len(set(self.vectors)) != len(self.vectors):
            raise ValueError(f"feature names must be distinct, got {names} and {self.vectors}")
        for name in ("wall_distance_cap", "proximity_length"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")

    @property
    def scalar_names(self) -> tuple[str, ...]:
        """Names of the scalar columns of ``CloudBatch.scal``: point scalars, then pair."""
        return self.point_scalars + self.pair_scalars

    @property
    def num_scalars(self) -> int:
        """Number of scalar columns s."""
        return len(self.point_scalars) + len(self.pair_scalars)

    @property
    def num_vectors(self) -> int:
        """Number of vector types k."""
        return len(self.vectors)

    @property
    def point_scalar_columns(self) -> tuple[int, ...]:
        """Columns of ``scal`` that depend on the mesh point only (for a factorised embedding)."""
        return tuple(range(len(self.point_scalars)))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dictionary."""
        data = asdict(self)
        for name in ("point_scalars", "pair_scalars", "vectors"):
            data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureSpec:
        """Inverse of :meth:`to_dict`; unknown keys are an error.

        Args:
            data: as written by :meth:`to_dict` (or JSON-decoded).

        Returns:
            The spec.
        """
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown FeatureSpec keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(data))

    def to_json(self) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass(frozen=True)
class CloudBatch:
    """A batch of clouds as network inputs (torch tensors).

    Attributes:
        pos: (B, n, d) float relative positions x_i - x0 (0 in padding slots).
        vec: (B, n, k, d) float per-point vectors (0 in padding slots).
        scal: (B, n, s) float invariant scalars, point columns first (0 in padding slots).
        mask: (B, n) bool, True for real points.
        weight: (B, n) float smooth cutoff weights in [0, 1], or None.
        queries: (B,) int64 indices of the query points in their case.
    """

    pos: torch.Tensor
    vec: torch.Tensor
    scal: torch.Tensor
    mask: torch.Tensor
    weight: torch.Tensor | None
    queries: torch.Tensor

    def to(self, device: str | torch.device) -> CloudBatch:
        """The batch on another device."""
        moved = {
            name: (value.to(device) if isinstance(value, torch.Tensor) else value)
            for name, value in ((f.name, getattr(self, f.name)) for f in fields(self))
        }
        return CloudBatch(**moved)


@dataclass(frozen=True)
class PointFeatures:
    """Features that depend on the mesh point only.

    Attributes:
        scalars: (N, s_point) float64 point scalars in the spec's order.
        vectors: (N, k, d) float64 point vectors in the spec's order.
        velocity: (N, d) float64 velocity (for the upstream cosine).
    """

    scalars: np.ndarray
    vectors: np.ndarray
    velocity: np.ndarray


def _field(fields_: Any, name: str) -> np.ndarray:
    """A named field of a mapping, a Case (attribute or ``extra``), or an npz file."""
    if isinstance(fields_, Mapping) or hasattr(fields_, "files"):
        if name in fields_:
            return np.asarray(fields_[name])
    else:
        if hasattr(fields_, name):
            return np.asarray(getattr(fields_, name))
        extra = getattr(fields_, "extra", None)
        if isinstance(extra, Mapping) and name in extra:
            return np.asarray(extra[name])
    raise ValueError(
        f"the case fields have no {name!r}: add it to the case file or drop it from the "
        "FeatureSpec"
    )


def point_features(fields_: Any, spec: FeatureSpec) -> PointFeatures:
    """Per-point scalars and vectors of one case.

    Args:
        fields_: case fields (mapping, :class:`vcnn.casefile.Case` or npz) with points (N, d),
            velocity (N, d), and the fields the spec names (strain_rate, wall_distance,
            nodal_volume, is_wall for the built-ins).
        spec: which features.

    Returns:
        The point features.
    """
    points = _field(fields_, "points")
    if points.ndim != 2:
        raise ValueError(f"points must be (N, d), got shape {points.shape}")
    num_points, dim = points.shape
    velocity = _field(fields_, "velocity").astype(np.float64)
    if velocity.shape != points.shape:
        raise ValueError(f"velocity must be {points.shape} like points, got {velocity.shape}")
    columns = []
    for name in spec.point_scalars:
        if name == "strain_rate":
            value = _field(fields_, "strain_rate")
        elif name == "wall_feature":
            distance = _field(fields_, "wall_distance").astype(np.float64)
            value = np.minimum(distance, spec.wall_distance_cap) / spec.wall_distance_cap
        elif name == "volume":
            volume = _field(fields_, "nodal_volume").astype(np.float64)
            mean = volume.mean()
            if not mean > 0:
                raise ValueError(f"nodal_volume must have a positive mean, got {mean}")
            value = volume / mean
        elif name == "speed":
            value = np.linalg.norm(velocity, axis=1)
        elif name == "is_wall":
            value = _field(fields_, "is_wall").astype(np.float64)
        else:
            value = _field(fields_, name)
        value = np.asarray(value, dtype=np.float64)
        if value.shape != (num_points,):
            raise ValueError(f"scalar {name!r} must have shape ({num_points},), got {value.shape}")
        columns.append(value)
    scalars = np.stack(columns, axis=1) if columns else np.zeros((num_points, 0))
    vectors = np.zeros((num_points, spec.num_vectors, dim))
    for column, name in enumerate(spec.vectors):
        value = velocity if name == "velocity" else _field(fields_, name).astype(np.float64)
        if value.shape != (num_points, dim):
            raise ValueError(f"vector {name!r} must have shape {(num_points, dim)}, got {value.shape}")
        vectors[:, column] = value
    for name, array in (("scalars", scalars), ("vectors", vectors)):
        if not np.all(np.isfinite(array)):
            raise ValueError(f"point {name} contain NaN or inf; clean the case fields first")
    return PointFeatures(scalars=scalars, vectors=vectors, velocity=velocity)


def pair_features(
    relative: np.ndarray,
    velocity: np.ndarray,
    radius: np.ndarray,
    spec: FeatureSpec,
) -> np.ndarray:
    """Query-dependent invariant scalars.

    Args:
        relative: (Q, n, d) float relative positions x_i - x0.
        velocity: (Q, n, d) float velocity u_i of the cloud points.
        radius: (Q, n) float normalised region radius.
        spec: which features.

    Returns:
        (Q, n, s_pair) float64.
    """
    relative = relative.astype(np.float64, copy=False)
    distance = np.linalg.norm(relative, axis=-1)
    columns = []
    for name in spec.pair_scalars:
        if name == "proximity":
            columns.append(np.exp(-distance / spec.proximity_length))
        elif name == "distance":
            columns.append(distance)
        elif name == "normalized_radius":
            columns.append(radius.astype(np.float64))
        else:
            speed = np.linalg.norm(velocity, axis=-1)
            denominator = distance * speed
            dot = np.einsum("...i,...i->...", relative, velocity)
            with np.errstate(invalid="ignore", divide="ignore"):
                columns.append(np.where(denominator > 0, dot / denominator, 0.0))
    if not columns:
        return np.zeros(relative.shape[:2] + (0,))
    return np.stack(columns, axis=-1)


def build_batch(
    fields_: Any,
    clouds: Clouds | PaddedClouds,
    *,
    spec: FeatureSpec,
    normalizer: FeatureNormalizer | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    point: PointFeatures | None = None,
) -> CloudBatch:
    """Network inputs of a set of clouds of one case (vectorised gathers, no per-cloud loop).

    Args:
        fields_: the case's fields (see :func:`point_features`).
        clouds: full clouds (padded to their largest) or padded/sampled clouds of the case.
        spec: which features.
        normalizer: fitted normaliser, or None for raw features.
        dtype: floating dtype of the tensors.
        device: torch device.
        point: precomputed :func:`point_features` of the case (saves their cost per batch).

    Returns:
        The batch; padding slots are 0 in pos, vec and scal, False in mask.
    """
    if isinstance(clouds, Clouds):
        clouds = clouds.to_padded()
    if point is None:
        point = point_features(fields_, spec)
    mask = clouds.mask
    if clouds.indices.size and clouds.indices.max() >= point.scalars.shape[0]:
        raise ValueError("the clouds index points beyond the case: were they built on another case?")
    dim = point.vectors.shape[2]
    if clouds.relative_positions.shape[-1] != dim:
        raise ValueError(
            f"clouds are {clouds.relative_positions.shape[-1]}-D but the case is {dim}-D"
        )
    gather = np.where(mask, clouds.indices, 0)
    point_scalars = point.scalars[gather]
    vectors = point.vectors[gather]
    pair = pair_features(clouds.relative_positions, point.velocity[gather], clouds.radius, spec)
    scalars = np.concatenate([point_scalars, pair], axis=-1)
    scalars[~mask] = 0.0
    vectors[~mask] = 0.0

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(array)).to(device=device, dtype=dtype)

    batch = CloudBatch(
        pos=tensor(clouds.relative_positions),
        vec=tensor(vectors),
        scal=tensor(scalars),
        mask=torch.as_tensor(mask, device=device),
        weight=None if clouds.weights is None else tensor(clouds.weights),
        queries=torch.as_tensor(clouds.queries, dtype=torch.int64, device=device),
    )
    if normalizer is not None:
        batch = normalizer.apply(batch)
    return batch


@dataclass
class FeatureNormalizer:
    """Standardises scalars per column; scales positions and each vector type by one number.

    Attributes:
        scalar_mean: (s,) per-column means.
        scalar_std: (s,) per-column standard deviations (floored at min_std).
        vector_scale: (k,) root-mean-square norm of each vector type.
        position_scale: root-mean-square norm of the relative positions.
    """

    scalar_mean: list[float] = field(default_factory=list)
    scalar_std: list[float] = field(default_factory=list)
    vector_scale: list[float] = field(default_factory=list)
    position_scale: float = 1.0

    @classmethod
    def fit(
        cls, batches: CloudBatch | Iterable[CloudBatch], *, min_std: float = 1e-8
    ) -> FeatureNormalizer:
        """Statistics over the real (masked-in) points of raw batches.

        Args:
            batches: one raw (unnormalised) batch or an iterable of them.
            min_std: floor of standard deviations and scales (constant columns stay finite).

        Returns:
            The fitted normaliser.
        """
        if isinstance(batches, CloudBatch):
            batches = [batches]
        count = 0.0
        scalar_sum = scalar_sq = vector_sq = None
        position_sq = 0.0
        for batch in batches:
            mask = batch.mask.reshape(-1).cpu()
            scal = batch.scal.detach().cpu().double().reshape(-1, batch.scal.shape[-1])[mask]
            vec = batch.vec.detach().cpu().double()
            vec = vec.reshape(-1, vec.shape[-2], vec.shape[-1])[mask]
            pos = batch.pos.detach().cpu().double().reshape(-1, batch.pos.shape[-1])[mask]
            if scalar_sum is None:
                scalar_sum = torch.zeros(scal.shape[1], dtype=torch.float64)
                scalar_sq = torch.zeros_like(scalar_sum)
                vector_sq = torch.zeros(vec.shape[1], dtype=torch.float64)
            scalar_sum += scal.sum(0)
            scalar_sq += (scal * scal).sum(0)
            vector_sq += (vec * vec).sum(dim=(0, 2))
            position_sq += float((pos * pos).sum())
            count += float(mask.sum())
        if scalar_sum is None or count == 0:
            raise ValueError("FeatureNormalizer.fit needs at least one batch with real points")
        mean = scalar_sum / count
        variance = torch.clamp(scalar_sq / count - mean * mean, min=0.0)
        std = torch.clamp(variance.sqrt(), min=min_std)
        vector_scale = torch.clamp((vector_sq / count).sqrt(), min=min_std)
        position_scale = max(math.sqrt(position_sq / count), min_std)
        return cls(
            scalar_mean=mean.tolist(),
            scalar_std=std.tolist(),
            vector_scale=vector_scale.tolist(),
            position_scale=position_scale,
        )

    def apply(self, batch: CloudBatch) -> CloudBatch:
        """Normalised copy of a raw batch (padding slots stay 0).

        Args:
            batch: raw batch with s scalar columns and k vector types matching the fit.

        Returns:
            The normalised batch.
        """
        num_scalars, num_vectors = batch.scal.shape[-1], batch.vec.shape[-2]
        if num_scalars != len(self.scalar_mean) or num_vectors != len(self.vector_scale):
            raise ValueError(
                f"normaliser fitted on {len(self.scalar_mean)} scalars and "
                f"{len(self.vector_scale)} vectors, batch has {num_scalars} and {num_vectors}"
            )
        options = {"dtype": batch.scal.dtype, "device": batch.scal.device}
        mean = torch.tensor(self.scalar_mean, **options)
        std = torch.tensor(self.scalar_std, **options)
        keep = batch.mask.unsqueeze(-1).to(batch.scal.dtype)
        scal = (batch.scal - mean) / std * keep
        scale = torch.tensor(self.vector_scale, **options)
        vec = batch.vec / scale[:, None]
        pos = batch.pos / self.position_scale
        return replace(batch, pos=pos, vec=vec, scal=scal)

    def state_dict(self) -> dict[str, Any]:
        """Plain floats and lists (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "scalar_mean": [float(v) for v in self.scalar_mean],
            "scalar_std": [float(v) for v in self.scalar_std],
            "vector_scale": [float(v) for v in self.vector_scale],
            "position_scale": float(self.position_scale),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`.

        Args:
            state: the dictionary.
        """
        expected = {"scalar_mean", "scalar_std", "vector_scale", "position_scale"}
        if set(state) != expected:
            raise ValueError(f"normaliser state must have keys {sorted(expected)}, got {sorted(state)}")
        if len(state["scalar_mean"]) != len(state["scalar_std"]):
            raise ValueError("normaliser state: scalar_mean and scalar_std differ in length")
        values = list(state["scalar_std"]) + list(state["vector_scale"]) + [state["position_scale"]]
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError("normaliser state: standard deviations and scales must be finite and > 0")
        self.scalar_mean = [float(v) for v in state["scalar_mean"]]
        self.scalar_std = [float(v) for v in state["scalar_std"]]
        self.vector_scale = [float(v) for v in state["vector_scale"]]
        self.position_scale = float(state["position_scale"])
