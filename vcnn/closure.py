"""A trained closure: tau at the points of a case, from the flow of the case.

:func:`load_closure` reads a checkpoint into a :class:`Closure`, which holds everything a
prediction needs: the network, its input normaliser and target scale, the feature spec, the
cloud options and the physics of the data it was trained on. :meth:`Closure.predict` works on
any in-memory :class:`vcnn.casefile.Case` (a case file, cell-centred data of another code, or
the live state of a coupled solver): it builds the clouds of every point, their inputs
(:mod:`vcnn.features`) and runs the network (:mod:`vcnn.inference`). It is the one inference
path: ``vcnn evaluate`` and ``vcnn simulate`` are built on it. On a CUDA device, full clouds are
searched on the device and run there (:func:`vcnn.engines.device.searched_full_clouds`): only
the prediction comes back to the host.

Full clouds and the cloud quadrature (:mod:`vcnn.cloud_quadrature`; the default ``"auto"``
picks one per case, :data:`DEFAULT_CLOUDS`) are deterministic, and with the smooth cutoff of
the default cloud options the prediction is a smooth function of the flow, as a fixed-point
solver needs.
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
from vcnn.checkpoint import CheckpointError, load_checkpoint, load_model
from vcnn.cloud_quadrature import (
    CLOUD_MODES,
    CloudQuadrature,
    QuadratureOptions,
    auto_clouds,
    quadrature_unavailable,
)
from vcnn.clouds import CloudOptions
from vcnn.config import ConfigError
from vcnn.engines import PassData
from vcnn.engines.device import searched_full_clouds
from vcnn.features import FeatureNormalizer, FeatureSpec, FieldTable
from vcnn.inference import predict_full_clouds
from vcnn.models import resolve_model
from vcnn.physics import Physics
from vcnn.system import TooLargeError

logger = logging.getLogger(__name__)

__all__ = [
    "DEVICE_REQUEST",
    "Closure",
    "CHECKPOINT_KIND_KEY",
    "DEFAULT_CLOUDS",
    "CLOSURE_KIND",
    "ClosurePrediction",
    "check_closure_kind",
    "check_prediction_input",
    "load_closure",
    "resolve_device",
]

#: A prediction warns when more than this fraction of its cloud entries have an input outside
#: the training range.
OUT_OF_RANGE_WARNING = 0.01
#: The clouds of a prediction unless asked otherwise (:meth:`Closure.predict`): ``"auto"``,
#: the cloud quadrature where a case's full clouds would hold more than
#: :data:`vcnn.cloud_quadrature.AUTO_QUADRATURE_CLOUD_SIZE` points on average (from about the
#: published resolution of the hills up: it matches full clouds within 0.2 points of rel L2
#: there and costs less, about linearly in the mesh), full clouds on coarser meshes (cheaper
#: there), on CUDA devices and where the quadrature does not apply
#: (:func:`vcnn.cloud_quadrature.auto_clouds`; docs/results.md, ``make bench``).
DEFAULT_CLOUDS = "auto"


#: Checkpoint key naming what the model predicts; absent or :data:`CLOSURE_KIND` for a
#: pointwise closure (tau at a point from its cloud), ``"integral"`` for the integral of tau
#: of a whole discretisation (:mod:`vcnn.integral`), ``"atoms"`` for a per-atom energy model.
CHECKPOINT_KIND_KEY = "checkpoint_kind"
#: The ``checkpoint_kind`` of a pointwise closure, the only kind :func:`load_closure` takes.
CLOSURE_KIND = "closure"
_KIND_HINTS = {
    "integral": "it predicts the integral of tau of a whole case: `vcnn evaluate` reports that "
    "integral, `vcnn simulate` needs a pointwise closure",
    "atoms": "it predicts the energy of atoms (experiments/atoms), not tau",
}


def check_closure_kind(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse a checkpoint that holds no pointwise closure (an integral or atoms model).

    Args:
        payload: the checkpoint (:func:`vcnn.checkpoint.load_checkpoint`).
        path: its file, named in the error.

    Raises:
        CheckpointError: one line naming the file, its kind and what to do with it.
    """
    kind = payload.get(CHECKPOINT_KIND_KEY, CLOSURE_KIND)
    if kind == CLOSURE_KIND:
        return
    hint = _KIND_HINTS.get(str(kind), "only pointwise closures predict tau at points")
    raise CheckpointError(
        f"checkpoint {str(path)!r} holds a model of kind {kind!r}, not a pointwise "
        f"closure: {hint}"
    )


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
        cloud_size: points per cloud (None: full or quadrature clouds).
        clouds: which clouds ran: ``"full"``, ``"quadrature"`` (the cloud quadrature of
            :mod:`vcnn.cloud_quadrature`, with its rule in ``quadrature``) or ``"sample"``
            (``cloud_size`` random points).
        quadrature: the quadrature rule (radial, angular, neighbours; in 3-D shells, polar,
            azimuthal, neighbours), or None.
        seconds: wall time per stage: ``clouds``, ``total`` and those of
            :attr:`vcnn.inference.FullCloudResult.seconds`.
        engine: the backend of :mod:`vcnn.engines` that ran (``"device"``, ``"fused"``,
            ``"sparse"`` or ``"padded"``).
    """

    tau: np.ndarray
    out_of_range_fraction: float
    out_of_range_by_input: dict[str, float] = field(default_factory=dict)
    num_entries: int = 0
    cloud_size: int | None = None
    clouds: str = "full"
    quadrature: dict[str, int] | None = None
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
        #: The rule of ``clouds="quadrature"`` predictions.
        self.quadrature_options = QuadratureOptions()

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
        clouds: str = DEFAULT_CLOUDS,
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
            clouds: ``"full"`` (every point of each cloud region), ``"quadrature"`` (a
                bounded number of weighted points per cloud, :mod:`vcnn.cloud_quadrature`;
                refused, with the reason, for a closure or case it does not apply to) or
                ``"auto"`` (the quadrature where the case's mean full cloud would hold more
                than :data:`vcnn.cloud_quadrature.AUTO_QUADRATURE_CLOUD_SIZE` points, on the
                CPU, where it applies; else full clouds: :func:`vcnn.cloud_quadrature.auto_clouds`).
                The mode that ran is the prediction's ``clouds``. Ignored when ``cloud_size``
                is given.

        Returns:
            (N,) float64 predicted tau.
        """
        return self.predict_detailed(
            case, cloud_size=cloud_size, seed=seed, frame=frame, clouds=clouds
        ).tau

    def resolve_clouds(self, *, dim: int, speed: np.ndarray, nodal_volume: np.ndarray) -> str:
        """What ``clouds="auto"`` runs on a case: ``"quadrature"`` or ``"full"``.

        Args:
            dim: the case's spatial dimension.
            speed: (N,) float |u| at the case's points.
            nodal_volume: (N,) float the points' volumes.

        Returns:
            The mode (:func:`vcnn.cloud_quadrature.auto_clouds`).
        """
        return auto_clouds(
            self.cloud_options, dim=dim, pooling=self.model.config.pooling, speed=speed,
            nodal_volume=nodal_volume, device_type=self.device.type,
        )

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
        clouds: str = DEFAULT_CLOUDS,
        queries: np.ndarray | None = None,
        mean_speed: float | None = None,
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
            clouds: see :meth:`predict`.
            queries: (Q,) int indices of the case's points to predict at (None: every
                point); the clouds are drawn from all the case's points. A distributed
                closure passes its owned points here and their halo as the rest of the case
                (:mod:`solvers.halo`).
            mean_speed: quadrature clouds only: the mean |u| over the points of the whole
                field when the case holds part of it (a distributed closure's owned points
                and halo); None: the case's own mean (see
                :class:`vcnn.cloud_quadrature.CloudQuadrature`).

        Returns:
            The prediction and its diagnostics (``tau`` of shape (Q,) in the order of
            ``queries`` when they are given).

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
        if clouds not in CLOUD_MODES:
            raise ValueError(f"clouds must be one of {CLOUD_MODES}, got {clouds!r}")
        mode = "sample" if cloud_size is not None else clouds
        if mode == "auto":
            mode = self.resolve_clouds(
                dim=case.dim, speed=np.linalg.norm(case.velocity, axis=1),
                nodal_volume=case.nodal_volume,
            )
        if mode == "quadrature":
            reason = quadrature_unavailable(
                self.cloud_options, dim=case.dim, pooling=self.model.config.pooling
            )
            if reason is not None:
                raise ValueError(f"quadrature clouds do not apply: {reason}; use full clouds")
        table = FieldTable.from_cases(
            [case], spec=self.spec, options=self.cloud_options, device=self.device, frame=rotation
        )
        clouds_start = time.perf_counter()
        images = weights = searched = None
        subset = queries
        if subset is not None:
            subset = np.asarray(subset, dtype=np.int64).reshape(-1)
        try:
            # on a CUDA device: every point's clouds searched and run there, or None
            if mode == "full" and subset is None:
                searched = searched_full_clouds(
                    self.model, PassData(table, self.normalizer), self.cloud_options,
                    case.points, case.velocity, case.period, engine=engine,
                )
            if searched is not None:
                queries = np.arange(case.num_points)
            elif mode == "quadrature":
                quadrature = CloudQuadrature(
                    case.points, case.velocity, case.period, case.wall_distance,
                    self.cloud_options, options=self.quadrature_options, mean_speed=mean_speed,
                ).clouds(subset)
                offsets, indices, queries = (
                    quadrature.offsets, quadrature.indices, quadrature.queries
                )
                weights = quadrature.weights
            elif mode == "full":
                sampler = self.cloud_options.sampler(case.points, case.velocity, case.period)
                full = sampler.full_clouds(subset)
                offsets, queries = full.offsets, full.queries
                # image ids where the clouds have them: the fused kernel maps them itself
                indices, images = (
                    (full.indices, None) if full.image_ids is None
                    else (full.image_ids, full.image_points)
                )
            else:
                sampler = self.cloud_options.sampler(case.points, case.velocity, case.period)
                sample = sampler.sample(cloud_size, queries=subset, seed=seed)
                mask = sample.mask
                offsets = np.concatenate([[0], np.cumsum(mask.sum(axis=1))]).astype(np.int64)
                indices, queries = sample.indices[mask], sample.queries
        except TooLargeError as error:  # the sampler does not know the case: name it
            raise TooLargeError(f"case {case.name!r}: {error}") from error
        clouds_seconds = time.perf_counter() - clouds_start
        result = searched if searched is not None else predict_full_clouds(
            self.model,
            table,
            self.normalizer,
            offsets,
            indices,
            queries,
            engine=engine,
            compile=compile,
            image_points=images,
            weights=weights,
        )
        tau = np.empty(case.num_points)
        tau[queries] = result.output * self.target_scale
        if subset is not None:
            tau = tau[subset]
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
            clouds=mode,
            quadrature=(
                self.quadrature_options.to_dict(case.dim) if mode == "quadrature" else None
            ),
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
        path: the checkpoint, or a shipped model's name (``"published"``, ``"coupled"``: see
            :mod:`vcnn.models`; an existing file of that name wins).
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
    path = resolve_model(path)
    check_closure_kind(load_checkpoint(path), path)
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
