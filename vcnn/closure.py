"""A trained closure: tau at the points of a case, from the flow of the case.

:func:`load_closure` reads a checkpoint into a :class:`Closure`, which holds everything a
prediction needs: the network, its input normaliser and target scale, the feature spec, the
cloud options and the physics of the data it was trained on. :meth:`Closure.predict` works on
any in-memory :class:`vcnn.casefile.Case` (a case file, cell-centred data of another code, or
the live state of a coupled solver): it builds the clouds of every point, their inputs
(:mod:`vcnn.features`) and runs the network (:mod:`vcnn.inference`). It is the one inference
path: ``vcnn evaluate`` and ``vcnn simulate`` are built on it.

Full clouds (the default) are deterministic, and with the smooth cutoff of the default cloud
options the prediction is a smooth function of the flow, as a fixed-point solver needs.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vcnn.casefile import Case, CaseFileError
from vcnn.checkpoint import CheckpointError, load_model
from vcnn.clouds import CloudOptions
from vcnn.config import ConfigError
from vcnn.features import FeatureNormalizer, FeatureSpec, FieldTable
from vcnn.inference import predict_full_clouds
from vcnn.physics import Physics
from vcnn.system import TooLargeError

logger = logging.getLogger(__name__)

__all__ = [
    "DEVICE_REQUEST",
    "Closure",
    "ClosurePrediction",
    "check_prediction_input",
    "load_closure",
    "resolve_device",
]

#: A prediction warns when more than this fraction of its cloud entries have an input outside
#: the training range.
OUT_OF_RANGE_WARNING = 0.01


#: The device requests a user may write (config files, flags, ``load_closure``).
DEVICE_REQUEST = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def resolve_device(request: str | torch.device, *, local_rank: int = 0) -> torch.device:
    """Turn a device request into a device (one GPU per rank under torchrun).

    Args:
        request: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` (GPU ``local_rank``
            modulo the GPU count), ``"cuda:N"`` (N a non-negative integer) or a
            ``torch.device`` of type cpu or cuda.
        local_rank: the process's rank on its node (``"cuda"`` under torchrun).

    Returns:
        The device.

    Raises:
        ConfigError: for anything else, and when a CUDA device is requested that torch does
            not see.
    """
    if isinstance(request, torch.device):
        device = request
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"device must be a cpu or cuda torch.device, got {device}")
    elif isinstance(request, str) and DEVICE_REQUEST.fullmatch(request):
        if request == "auto":
            request = "cuda" if torch.cuda.is_available() else "cpu"
        if request == "cuda" and torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        device = torch.device(request)
    else:
        raise ConfigError(
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' (N >= 0) or a torch.device, "
            f"got {request!r}"
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(device)!r} requested but torch sees no CUDA device")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"device {str(device)!r} requested but torch sees {count} CUDA device(s) "
                f"(cuda:0 to cuda:{count - 1})"
            )
    return device


@dataclass
class ClosurePrediction:
    """tau predicted at every point of a case, with diagnostics.

    Attributes:
        tau: (N,) float64 predicted tau.
        out_of_range_fraction: fraction of the cloud entries with at least one invariant
            input outside the training range (NaN when the checkpoint has no ranges).
        out_of_range_by_input: per input name, the fraction of entries outside its range.
        num_entries: cloud entries (query, point) evaluated.
        cloud_size: points per cloud (None: full clouds).
        seconds: wall time per stage: ``clouds``, ``total`` and those of
            :attr:`vcnn.inference.FullCloudResult.seconds`.
        engine: the backend of :mod:`vcnn.engines` that ran (``"fused"``, ``"sparse"`` or
            ``"padded"``).
    """

    tau: np.ndarray
    out_of_range_fraction: float
    out_of_range_by_input: dict[str, float] = field(default_factory=dict)
    num_entries: int = 0
    cloud_size: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    engine: str = ""


class Closure:
    """A trained vector-cloud closure, ready to predict tau from a flow.

    Build it with :func:`load_closure`.

    Attributes:
        model: the network, eval mode, on ``device``.
        normalizer: its input normaliser (None when trained without one).
        target_scale: the network predicts tau / target_scale.
        spec: the input features.
        cloud_options: the cloud region and cutoff (operator coefficients resolved).
        physics_constants: the :class:`vcnn.physics.Physics` of the training data, or None for
            a checkpoint that did not record it.
        dimension: spatial dimension of the training data.
        device: where the network runs.
        metadata: the rest of the checkpoint's records (epoch, seed, split, versions, ...).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        normalizer: FeatureNormalizer | None,
        target_scale: float,
        spec: FeatureSpec,
        cloud_options: CloudOptions,
        physics_constants: Physics | None,
        dimension: int,
        device: torch.device,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.normalizer = normalizer
        self.target_scale = float(target_scale)
        self.spec = spec
        self.cloud_options = cloud_options
        self.physics_constants = physics_constants
        self.dimension = int(dimension)
        self.device = device
        self.metadata = dict(metadata or {})

    @property
    def physics(self) -> dict[str, Any]:
        """The constants the closure was trained with, under the names of the generate config.

        Keys: those of :class:`vcnn.physics.Physics` (``nu``, ``bulk_velocity``,
        ``diffusivity``, ``zeta``, ``reaction_exponent``, ``gamma``, ``tau_p``,
        ``production``, ``c_k``; None each when the checkpoint did not record them), the cloud
        threshold ``eps`` and the spatial ``dimension``.
        """
        names = Physics.__dataclass_fields__
        values = (
            self.physics_constants.to_dict()
            if self.physics_constants is not None
            else dict.fromkeys(names)
        )
        return {**values, "eps": self.cloud_options.eps, "dimension": self.dimension}

    def predict(
        self,
        case: Case,
        *,
        cloud_size: int | None = None,
        seed: int = 0,
        frame: np.ndarray | None = None,
    ) -> np.ndarray:
        """Tau at every point of a case (its ``tau`` is neither needed nor read).

        Args:
            case: the flow state: points, velocity, strain_rate, wall_distance,
                nodal_volume, period (and the fields of user features).
            cloud_size: None for full clouds (deterministic, the default), else this many
                random points per cloud as in training.
            seed: seed of the random cloud subsets (``cloud_size`` given).
            frame: (d, d) orthogonal matrix: present the case in a rotated or reflected frame
                (relative positions and vectors multiplied by it); a frame-independent closure
                predicts the same tau in every frame.

        Returns:
            (N,) float64 predicted tau.
        """
        return self.predict_detailed(case, cloud_size=cloud_size, seed=seed, frame=frame).tau

    def predict_detailed(
        self,
        case: Case,
        *,
        cloud_size: int | None = None,
        seed: int = 0,
        frame: np.ndarray | None = None,
        engine: str = "auto",
        compile: bool | str = "auto",
        warn: bool = True,
    ) -> ClosurePrediction:
        """:meth:`predict` with the input-range diagnostics and stage timings.

        Args:
            case: see :meth:`predict`.
            cloud_size: see :meth:`predict`.
            seed: see :meth:`predict`.
            frame: see :meth:`predict`.
            engine: ``"auto"`` (the first backend of the priority list
                :data:`vcnn.engines.ENGINES` that runs: the C kernels on the CPU where they
                can), or one backend: ``"fused"``, ``"sparse"`` or ``"padded"`` (see
                :func:`vcnn.inference.predict_full_clouds`); one that cannot run is refused.
            compile: compile the per-entry stage of the sparse pass: True, False or
                ``"auto"`` (large meshes on the CPU; see
                :func:`vcnn.inference.predict_full_clouds`).
            warn: log a warning when much of the input lies outside the training range (a
                caller that reports the fraction itself, e.g. every iteration of a coupled
                run, turns it off).

        Returns:
            The prediction and its diagnostics.

        Raises:
            CaseFileError: for a case whose fields hold NaN/inf or whose nodal volumes are not
                all positive (the in-memory state of a solver is checked here; a case file is
                already checked when it is read).
            ValueError: for a case of another dimension, or a bad cloud size or frame.
        """
        start = time.perf_counter()
        check_prediction_input(case)
        if case.dim != self.dimension:
            raise ValueError(
                f"case {case.name!r} is {case.dim}-D but the closure was trained on "
                f"{self.dimension}-D data"
            )
        if cloud_size is not None and (isinstance(cloud_size, bool) or cloud_size < 1):
            raise ValueError(f"cloud_size must be None (full clouds) or >= 1, got {cloud_size}")
        rotation = _checked_frame(frame, case.dim)
        images = None
        try:
            sampler = self.cloud_options.sampler(case.points, case.velocity, case.period)
            if cloud_size is None:
                clouds = sampler.full_clouds()
                offsets, queries = clouds.offsets, clouds.queries
                # image ids where the clouds have them: the fused kernel maps them itself
                indices, images = (
                    (clouds.indices, None) if clouds.image_ids is None
                    else (clouds.image_ids, clouds.image_points)
                )
            else:
                sample = sampler.sample(cloud_size, seed=seed)
                mask = sample.mask
                offsets = np.concatenate([[0], np.cumsum(mask.sum(axis=1))]).astype(np.int64)
                indices, queries = sample.indices[mask], sample.queries
        except TooLargeError as error:  # the sampler does not know the case: name it
            raise TooLargeError(f"case {case.name!r}: {error}") from error
        clouds_seconds = time.perf_counter() - start
        table = FieldTable.from_cases(
            [case], spec=self.spec, options=self.cloud_options, device=self.device, frame=rotation
        )
        result = predict_full_clouds(
            self.model,
            table,
            self.normalizer,
            offsets,
            indices,
            queries,
            engine=engine,
            compile=compile,
            image_points=images,
        )
        tau = np.empty(case.num_points)
        tau[queries] = result.output * self.target_scale
        known = self.normalizer is not None and self.normalizer.has_ranges
        entries = max(result.num_entries, 1)
        fraction = result.out_of_range_entries / entries if known else math.nan
        by_input = {name: count / entries for name, count in result.out_of_range_by_input.items()}
        if warn and known and fraction > OUT_OF_RANGE_WARNING:
            worst = sorted(by_input.items(), key=lambda item: -item[1])[:3]
            logger.warning(
                "case %s: %.1f %% of the cloud entries have an input outside the training range "
                "(%s): the closure extrapolates",
                case.name,
                100 * fraction,
                ", ".join(f"{name} {100 * value:.1f} %" for name, value in worst),
            )
        seconds = {"clouds": clouds_seconds, **result.seconds}
        seconds["total"] = time.perf_counter() - start
        return ClosurePrediction(
            tau=tau,
            out_of_range_fraction=fraction,
            out_of_range_by_input=by_input,
            num_entries=result.num_entries,
            cloud_size=cloud_size,
            seconds=seconds,
            engine=result.engine,
        )


#: Fields a prediction reads: each must be finite, and the nodal volumes positive.
_PREDICTION_FIELDS = ("points", "velocity", "strain_rate", "wall_distance", "nodal_volume")


def check_prediction_input(case: Case) -> None:
    """Refuse a case the closure cannot predict from, before any work is done.

    A :class:`vcnn.casefile.Case` is validated when it is built, but a solver may change its
    arrays afterwards; a NaN or a zero volume would otherwise give all-NaN predictions.

    Args:
        case: the flow state; its ``points`` (N, d), ``velocity`` (N, d), ``strain_rate``,
            ``wall_distance``, ``nodal_volume`` (N,) and ``period`` (d,) are checked.

    Raises:
        CaseFileError: one line naming the case, the field and how many entries are bad.
    """
    for key in (*_PREDICTION_FIELDS, "period"):
        value = np.asarray(getattr(case, key))
        finite = np.isfinite(value) if value.dtype.kind in "fc" else np.ones(value.shape, bool)
        if not finite.all():
            bad = int(value.size - np.count_nonzero(finite))
            raise CaseFileError(
                f"case {case.name!r}: {key} holds {bad} NaN/inf value(s) of {value.size}; the "
                "closure cannot predict from it"
            )
    volume = np.asarray(case.nodal_volume)
    if np.any(volume <= 0):
        bad = int(np.count_nonzero(volume <= 0))
        raise CaseFileError(
            f"case {case.name!r}: nodal_volume is zero or negative at {bad} of {volume.size} "
            "points; the closure cannot predict from it"
        )


def _checked_frame(frame: np.ndarray | None, dim: int) -> np.ndarray | None:
    if frame is None:
        return None
    frame = np.asarray(frame, dtype=np.float64)
    if frame.shape != (dim, dim) or not np.allclose(frame @ frame.T, np.eye(dim), atol=1e-10):
        raise ValueError(f"frame must be a ({dim}, {dim}) orthogonal matrix")
    return frame


def load_closure(path: str | os.PathLike, *, device: str | torch.device = "auto") -> Closure:
    """Load a trained closure from a checkpoint (``best.pt``, ``last.pt`` or an export).

    Args:
        path: the checkpoint.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a
            ``torch.device`` (see :func:`resolve_device`).

    Returns:
        The closure.

    Raises:
        CheckpointError: when the file is unusable or lacks what inference needs.
        ConfigError: for a device other than those above, or a CUDA device torch does not
            see.
    """
    torch_device = resolve_device(device)
    loaded = load_model(path, device=torch_device)
    metadata = loaded.metadata
    missing = [key for key in ("feature_spec", "cloud_options") if key not in metadata]
    if missing:
        raise CheckpointError(
            f"checkpoint {str(path)!r} lacks {missing}: was it written by vcnn training?"
        )
    try:
        spec = FeatureSpec.from_dict(metadata["feature_spec"])
        options = CloudOptions.from_dict(dict(metadata["cloud_options"]))
        physics = None if metadata.get("physics") is None else Physics.from_dict(metadata["physics"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} has unreadable records: {error}") from error
    if options.region == "ellipse" and (options.diffusivity is None or options.zeta is None):
        if physics is None:
            raise CheckpointError(
                f"checkpoint {str(path)!r} records neither the cloud's operator coefficients "
                "nor the physics of its data"
            )
        options = options.resolved(diffusivity=physics.diffusivity, zeta=physics.zeta)
    normalizer = None
    if loaded.feature_normalizer_state is not None:
        normalizer = FeatureNormalizer()
        try:
            normalizer.load_state_dict(loaded.feature_normalizer_state)
        except ValueError as error:
            raise CheckpointError(f"checkpoint {str(path)!r}: {error}") from error
    dimension = metadata.get("dimension") or loaded.model.to_config().get("dim")
    return Closure(
        loaded.model,
        normalizer=normalizer,
        target_scale=loaded.target_scale,
        spec=spec,
        cloud_options=options,
        physics_constants=physics,
        dimension=int(dimension),
        device=torch_device,
        metadata=metadata,
    )
