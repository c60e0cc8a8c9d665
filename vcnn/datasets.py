"""Training data: lazily loaded case files, splits by case, per-epoch cloud draws, batch gathering.

Memory model. Every case's nodal fields live once on the training device as tensors,
concatenated over the cases of a split (``points`` (N, d), ``velocity`` (N, d), normalised point
scalars (N, s), the scaled target (N,)). A cloud is only a row of point indices: per epoch each
case's clouds are redrawn (:meth:`CloudDataset.draw`, a seed derived from the base seed and the
epoch), kept as an (M, n) int32 index array (O(N n) integers), and a batch of clouds is gathered
from the fields on the fly (:meth:`CloudDataset.gather`). The dense (clouds x n x features)
tensor of a whole data set is never built.

Everything the network needs is computed from the case-file contract keys of DESIGN section 4
(``points``, ``velocity``, ``tau``, ``strain_rate``, ``wall_distance``, ``nodal_volume``,
``is_wall``, ``period``), so case files written by other codes work as they are.

The inputs are exactly those of :func:`vcnn.features.build_batch` followed by
:meth:`vcnn.features.FeatureNormalizer.apply` (same :class:`~vcnn.features.FeatureSpec`, same
formulas), but gathered with torch on the training device instead of numpy on the CPU; a test
checks that both paths agree, so a network trained here can be used by any code that builds
its inputs with :mod:`vcnn.features`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from vcnn.casefile import Case, CaseFileError, case_paths, read_case
from vcnn.features import CloudBatch, FeatureNormalizer, FeatureSpec, point_features

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A data set, split or case selection is inconsistent."""


# ------------------------------------------------------------------------------ case sources
class CaseSource:
    """A case file that is read on first use and then cached.

    Creating a source only records the path; :attr:`meta` reads only the small ``meta`` member
    of the ``.npz``; :meth:`load` reads and validates the arrays once.

    Args:
        path: the case file (``.npz``).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._case: Case | None = None
        self._meta: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"CaseSource({str(self.path)!r})"

    @property
    def name(self) -> str:
        """Case name (the file stem)."""
        return self.path.stem

    @property
    def key(self) -> str:
        """Resolved absolute path, the identity of a case in split checks."""
        return str(self.path.resolve())

    @property
    def meta(self) -> dict[str, Any]:
        """The case's metadata, read without loading the arrays.

        Raises:
            CaseFileError: when the file is missing, corrupt or its meta is not JSON.
        """
        if self._meta is None:
            if self._case is not None:
                self._meta = self._case.meta
            else:
                self._meta = _read_meta(self.path)
        return self._meta

    @property
    def alpha(self) -> float | None:
        """The slope factor ``meta["alpha"]``, or None when the case has none."""
        value = self.meta.get("alpha")
        return None if value is None else float(value)

    @property
    def is_loaded(self) -> bool:
        """Whether the arrays are cached."""
        return self._case is not None

    def load(self) -> Case:
        """Read (once) and return the case."""
        if self._case is None:
            self._case = read_case(self.path)
            self._meta = self._case.meta
        return self._case

    def release(self) -> None:
        """Drop the cached arrays (they are read again on the next :meth:`load`)."""
        self._case = None


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CaseFileError(f"case file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "meta" not in data.files:
                raise CaseFileError(f"case file {str(path)!r} lacks keys ['meta']")
            text = str(data["meta"])
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise CaseFileError(f"case file {str(path)!r} is corrupt or not an .npz: {error}") from error
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise CaseFileError(f"meta of {str(path)!r} is not valid JSON: {error}") from error


def discover_cases(folder: str | os.PathLike) -> list[CaseSource]:
    """Lazy sources for every case file of a folder, sorted by name.

    Raises:
        CaseFileError: when the folder does not exist.
        DatasetError: when it holds no case file.
    """
    paths = case_paths(folder)
    if not paths:
        raise DatasetError(f"no case files (*.npz) in {str(folder)!r}")
    return [CaseSource(path) for path in paths]


def as_case_sources(
    items: Iterable[str | os.PathLike | CaseSource], *, data_dir: str | os.PathLike | None = None
) -> list[CaseSource]:
    """Turn case names, paths or sources into sources.

    Args:
        items: sources, paths, or names; a relative path or a bare name (``"hill_a1.000"``,
            with or without ``.npz``) is looked up in ``data_dir`` first.
        data_dir: folder of the case files.

    Raises:
        DatasetError: naming a case that is not found.
    """
    sources: list[CaseSource] = []
    for item in items:
        if isinstance(item, CaseSource):
            sources.append(item)
            continue
        path = Path(item)
        candidates = [path]
        if data_dir is not None and not path.is_absolute():
            candidates = [Path(data_dir) / path, Path(data_dir) / f"{path}.npz", path]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise DatasetError(
                f"case {str(item)!r} not found (looked at {[str(c) for c in candidates]})"
            )
        sources.append(CaseSource(found))
    return sources


def select_by_alpha(
    sources: Sequence[CaseSource], alphas: Iterable[float], *, tolerance: float = 1e-6
) -> list[CaseSource]:
    """The cases whose ``meta["alpha"]`` matches one of ``alphas``, in the order of ``alphas``.

    Args:
        sources: candidate cases.
        alphas: wanted slope factors.
        tolerance: absolute tolerance of the match.

    Raises:
        DatasetError: when an alpha matches no case or several cases.
    """
    known = [(source, source.alpha) for source in sources]
    selected: list[CaseSource] = []
    for alpha in alphas:
        matches = [s for s, a in known if a is not None and abs(a - float(alpha)) <= tolerance]
        if not matches:
            available = sorted(a for _, a in known if a is not None)
            raise DatasetError(f"no case with alpha = {alpha}; available alphas: {available}")
        if len(matches) > 1:
            raise DatasetError(
                f"alpha = {alpha} matches several cases {[m.name for m in matches]}; "
                "select them by name instead"
            )
        selected.append(matches[0])
    return selected


@dataclass
class CaseSplit:
    """Cases for training, validation (early stopping) and testing. Splits are by case.

    Attributes:
        train: training cases (fit the normalisers and the weights).
        validation: cases for early stopping and model selection.
        test: held-out cases, only evaluated after training.
    """

    train: list[CaseSource]
    validation: list[CaseSource] = field(default_factory=list)
    test: list[CaseSource] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.train:
            raise DatasetError("the training split holds no case")
        seen: dict[str, str] = {}
        for split_name in ("train", "validation", "test"):
            for source in getattr(self, split_name):
                previous = seen.get(source.key)
                if previous is not None:
                    raise DatasetError(
                        f"case {source.name!r} is in both the {previous} and the {split_name} "
                        "split; splits must not share a case"
                    )
                seen[source.key] = split_name

    def names(self) -> dict[str, list[str]]:
        """Case names per split (for the run's records)."""
        return {
            "train": [s.name for s in self.train],
            "validation": [s.name for s in self.validation],
            "test": [s.name for s in self.test],
        }


def make_split(
    sources: Sequence[CaseSource],
    *,
    train: Sequence[str] | None = None,
    validation: Sequence[str] | None = None,
    test: Sequence[str] | None = None,
    train_alphas: Sequence[float] | None = None,
    validation_alphas: Sequence[float] | None = None,
    test_alphas: Sequence[float] | None = None,
    data_dir: str | os.PathLike | None = None,
) -> CaseSplit:
    """Split cases by name/path or by alpha; the training split defaults to the remaining cases.

    Each split is given either by case names/paths or by alphas, not both.

    Args:
        sources: all available cases (e.g. :func:`discover_cases`).
        train: names or paths of the training cases (default: the cases in no other split).
        validation: names or paths of the validation cases.
        test: names or paths of the test cases.
        train_alphas: alphas of the training cases.
        validation_alphas: alphas of the validation cases.
        test_alphas: alphas of the test cases.
        data_dir: folder in which bare names are looked up.

    Raises:
        DatasetError: for a split given both ways, an unknown case or alpha, or a shared case.
    """
    by_key = {source.key: source for source in sources}

    def pick(names: Sequence[str] | None, alphas: Sequence[float] | None, what: str):
        if names is not None and alphas is not None:
            raise DatasetError(f"give the {what} split by names or by alphas, not both")
        if names is not None:
            picked = as_case_sources(names, data_dir=data_dir)
            # Reuse the already-created source so that cached arrays are shared.
            return [by_key.get(p.key, p) for p in picked]
        if alphas is not None:
            return select_by_alpha(sources, alphas)
        return None

    validation_sources = pick(validation, validation_alphas, "validation") or []
    test_sources = pick(test, test_alphas, "test") or []
    train_sources = pick(train, train_alphas, "train")
    if train_sources is None:
        taken = {s.key for s in (*validation_sources, *test_sources)}
        train_sources = [s for s in sources if s.key not in taken]
    return CaseSplit(train=train_sources, validation=validation_sources, test=test_sources)


# ------------------------------------------------------------------------------ normalisers
@dataclass
class TargetScaler:
    """Scale of the target: the network learns ``tau / scale``.

    The scale is the root mean square of tau over all points of the training cases, so the
    learnt target is O(1) whatever the units of tau.

    Attributes:
        scale: positive float.
    """

    scale: float = 1.0

    @classmethod
    def fit(cls, cases: Iterable[Case]) -> TargetScaler:
        """Fit on the training cases.

        Raises:
            DatasetError: when tau is zero everywhere (nothing to learn).
        """
        total = 0.0
        count = 0
        for case in cases:
            total += float(np.dot(case.tau, case.tau))
            count += case.num_points
        scale = math.sqrt(total / max(count, 1))
        if not scale > 0:
            raise DatasetError("tau is zero at every training point: nothing to learn")
        return cls(scale=scale)

    def state_dict(self) -> dict[str, float]:
        """Checkpointable state."""
        return {"scale": float(self.scale)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TargetScaler:
        """Rebuild from :meth:`state_dict`."""
        return cls(scale=float(state["scale"]))


# ------------------------------------------------------------------------------ clouds
def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. base seed, epoch, case index), well mixed."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


class CloudPlan(NamedTuple):
    """The clouds of one epoch: rows of global point indices, no features.

    Attributes:
        queries: (M,) int64 global index of each cloud's query point.
        indices: (M, n) int32 global indices of the cloud points, -1 for padding.
        weights: (M, n) float32 cutoff weights, or None when the clouds have no cutoff.
    """

    queries: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor | None = None


class TrainingBatch(NamedTuple):
    """Inputs and targets of a batch of clouds.

    Attributes:
        inputs: the padded clouds (a :class:`vcnn.features.CloudBatch`, normalised unless
            gathered with ``normalize=False``; ``queries`` are global point indices).
        target: (B,) float32 scaled target ``tau / scale`` at the query points.
        volume: (B,) float32 nodal volume of the query points (for weighted metrics).
    """

    inputs: CloudBatch
    target: torch.Tensor
    volume: torch.Tensor


@dataclass(frozen=True)
class CloudOptions:
    """Options of the cloud sampler (DESIGN section 5), forwarded to ``vcnn.clouds``.

    Attributes:
        region: ``"ellipse"`` (the paper's velocity-aligned ellipse) or another region the
            sampler supports.
        diffusivity: D of the transport operator that shapes the ellipse.
        zeta: decay coefficient of the operator.
        eps: decay threshold defining the ellipse boundary.
        radius: ball radius (``region="ball"`` only).
        k: neighbours per cloud (``region="knn"`` only).
        cutoff_start: normalised radius where a smooth cutoff weight starts to fall (in
            [0, 1)); None (default, as in the paper) gives every cloud point weight 1.
        volume_weighted: weight every cloud point by its nodal volume in the network's
            pooling, so that the descriptor is a quadrature of an integral over the cloud
            region rather than a mean over points: it then does not depend on how densely a
            mesh samples the region (the paper's mean over points does). Off by default.
    """

    region: str = "ellipse"
    diffusivity: float = 0.1
    zeta: float = 3.0
    eps: float = 0.2
    radius: float | None = None
    k: int | None = None
    cutoff_start: float | None = None
    volume_weighted: bool = False

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> CloudOptions:
        """Build from a config table; unknown keys raise ConfigError."""
        from vcnn.config import check_keys

        check_keys(options, {f.name for f in fields(cls)}, "[cloud]")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        """TOML-friendly dictionary (None values left out, as TOML has no null)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def make_sampler(case: Case, options: CloudOptions) -> Any:
    """A ``vcnn.clouds.CloudSampler`` over a case's points."""
    from vcnn.clouds import CloudSampler

    period = case.period if np.any(case.period > 0) else None
    return CloudSampler(
        case.points,
        case.velocity,
        period=period,
        region=options.region,
        diffusivity=options.diffusivity,
        zeta=options.zeta,
        eps=options.eps,
        radius=options.radius,
        k=options.k,
        cutoff_start=options.cutoff_start,
        dtype=np.float64,
    )


class CloudDataset:
    """The fields of a list of cases on one device, with per-epoch cloud draws and gathering.

    Args:
        sources: the cases (read on construction).
        spec: which network inputs (see :class:`vcnn.features.FeatureSpec`).
        target_scaler: the target scale (fit on the training cases).
        cloud_options: sampler options.
        normalizer: input normaliser fitted on the training cases (None: raw inputs, e.g. to
            fit one with :func:`fit_feature_normalizer`).
        device: device of the field tensors and the batches.
        dtype: floating dtype of the batches (float32).
    """

    def __init__(
        self,
        sources: Sequence[CaseSource],
        *,
        spec: FeatureSpec,
        target_scaler: TargetScaler,
        cloud_options: CloudOptions,
        normalizer: FeatureNormalizer | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not sources:
            raise DatasetError("a CloudDataset needs at least one case")
        self.sources = list(sources)
        self.spec = spec
        self.normalizer = normalizer
        self.cloud_options = cloud_options
        self.device = torch.device(device)
        self.dtype = dtype
        self._samplers: dict[int, Any] = {}
        cases = [source.load() for source in self.sources]
        dims = {case.dim for case in cases}
        if len(dims) != 1:
            raise DatasetError(f"cases mix spatial dimensions {sorted(dims)}")
        self.dim = dims.pop()
        sizes = [case.num_points for case in cases]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        features = [point_features(case, spec) for case in cases]

        def put(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(array), dtype=dtype, device=self.device)

        # Positions stay in float64: relative positions are differences of nearby coordinates.
        self.points = put(np.concatenate([c.points for c in cases]), torch.float64)
        self.velocity = put(np.concatenate([f.velocity for f in features]), dtype)
        self.vectors = put(np.concatenate([f.vectors for f in features]), dtype)
        self.point_scalars = put(np.concatenate([f.scalars for f in features]), dtype)
        self.tau = np.concatenate([c.tau for c in cases])
        self.target = put(self.tau / target_scaler.scale, dtype)
        self.volume = put(np.concatenate([c.nodal_volume for c in cases]), dtype)
        case_of_point = np.repeat(np.arange(len(cases)), sizes)
        periods = np.stack([c.period for c in cases])
        self.point_period = put(periods[case_of_point], torch.float64)
        self.case_of_point = case_of_point
        self._along: torch.Tensor | None = None
        self._across: torch.Tensor | None = None
        if "normalized_radius" in spec.pair_scalars:
            self._region_axes()

    def _region_axes(self) -> None:
        """Per-point region semi-axes, for the normalised-radius pair feature."""
        if self.cloud_options.region == "knn":
            raise DatasetError(
                "the 'normalized_radius' feature needs an ellipse or ball region, not knn"
            )
        along, across = [], []
        for case_index in range(self.num_cases):
            case_along, case_across = self.sampler(case_index).semi_axes
            along.append(case_along)
            across.append(np.full(case_along.shape, case_across))
        self._along = torch.as_tensor(np.concatenate(along), dtype=self.dtype, device=self.device)
        self._across = torch.as_tensor(
            np.concatenate(across), dtype=self.dtype, device=self.device
        )

    @property
    def num_cases(self) -> int:
        """Number of cases."""
        return len(self.sources)

    @property
    def num_points(self) -> int:
        """Total number of points over the cases."""
        return int(self.offsets[-1])

    @property
    def num_scalars(self) -> int:
        """Number s of scalar inputs per cloud point (point and pair scalars)."""
        return self.spec.num_scalars

    @property
    def num_vectors(self) -> int:
        """Number k of vector inputs per cloud point."""
        return self.spec.num_vectors

    def case_slice(self, case_index: int) -> slice:
        """Global point range of a case."""
        return slice(int(self.offsets[case_index]), int(self.offsets[case_index + 1]))

    def sampler(self, case_index: int) -> Any:
        """The (cached) cloud sampler of a case."""
        if case_index not in self._samplers:
            self._samplers[case_index] = make_sampler(
                self.sources[case_index].load(), self.cloud_options
            )
        return self._samplers[case_index]

    def draw(
        self, cloud_size: int, *, seed: int, queries_per_case: int | None = None
    ) -> CloudPlan:
        """Draw ``cloud_size`` random points of the cloud of every (or a random subset of) query.

        Args:
            cloud_size: points per cloud n (clouds with fewer points are padded).
            seed: seed of this draw (derive it from the base seed and the epoch).
            queries_per_case: query points drawn per case (None: every point).

        Returns:
            The global query indices and (M, n) int32 cloud indices on the device.
        """
        if cloud_size < 1:
            raise DatasetError(f"cloud_size must be >= 1, got {cloud_size}")
        all_queries: list[np.ndarray] = []
        all_indices: list[np.ndarray] = []
        all_weights: list[np.ndarray] = []
        for case_index in range(self.num_cases):
            offset = int(self.offsets[case_index])
            count = int(self.offsets[case_index + 1]) - offset
            rng = np.random.default_rng(derive_seed(seed, case_index, 0))
            queries = None
            if queries_per_case is not None and queries_per_case < count:
                queries = np.sort(rng.choice(count, size=queries_per_case, replace=False))
            clouds = self.sampler(case_index).sample(
                cloud_size, queries=queries, seed=derive_seed(seed, case_index, 1)
            )
            local = np.asarray(clouds.indices, dtype=np.int64)
            local_queries = np.arange(count) if queries is None else queries
            if local.shape != (len(local_queries), cloud_size):
                raise DatasetError(
                    f"sampler returned clouds of shape {local.shape}, expected "
                    f"{(len(local_queries), cloud_size)}"
                )
            self._check_minimum_image(case_index, local_queries, local, clouds)
            all_queries.append(local_queries + offset)
            all_indices.append(np.where(local >= 0, local + offset, -1))
            if clouds.weights is not None:
                all_weights.append(np.asarray(clouds.weights, dtype=np.float32))
        queries_array = np.concatenate(all_queries)
        indices_array = np.concatenate(all_indices)
        if self.num_points >= np.iinfo(np.int32).max:
            raise DatasetError("more than 2^31 points in a split: split the data set further")
        return CloudPlan(
            queries=torch.as_tensor(queries_array, dtype=torch.int64, device=self.device),
            indices=torch.as_tensor(
                indices_array.astype(np.int32), dtype=torch.int32, device=self.device
            ),
            weights=(
                torch.as_tensor(np.concatenate(all_weights), device=self.device)
                if all_weights
                else None
            ),
        )

    def _check_minimum_image(
        self, case_index: int, queries: np.ndarray, local: np.ndarray, clouds: Any
    ) -> None:
        """Relative positions are rebuilt as periodic minimum images: check they are right."""
        relative = getattr(clouds, "relative_positions", None)
        if relative is None:
            return
        case = self.sources[case_index].load()
        rows = min(len(queries), 256)  # a sample of clouds is enough to catch a wide cloud
        sample_local = local[:rows]
        safe = np.where(sample_local >= 0, sample_local, queries[:rows, None])
        rebuilt = _minimum_image(case.points[safe] - case.points[queries[:rows], None], case.period)
        expected = np.asarray(relative)[:rows]
        mask = sample_local >= 0
        if not np.allclose(rebuilt[mask], expected[mask], atol=1e-8, rtol=0):
            raise DatasetError(
                f"case {case.name!r}: clouds reach further than half a period, so relative "
                "positions are not minimum images; use a smaller cloud region"
            )

    def gather(
        self,
        queries: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor | None = None,
        *,
        normalize: bool = True,
    ) -> TrainingBatch:
        """Gather a batch of padded clouds and their targets from the field tensors.

        Mirrors :func:`vcnn.features.build_batch` (then ``FeatureNormalizer.apply``): padding
        slots are 0 in ``pos``, ``vec`` and ``scal`` and False in ``mask``.

        Args:
            queries: (B,) int64 global query indices.
            indices: (B, n) int global cloud indices, -1 for padding.
            weights: (B, n) float cutoff weights, or None.
            normalize: apply the dataset's normaliser (when it has one).

        Returns:
            The batch on the dataset's device.
        """
        indices = indices.to(device=self.device, dtype=torch.int64)
        queries = queries.to(device=self.device, dtype=torch.int64)
        mask = indices >= 0
        safe = torch.where(mask, indices, queries[:, None])
        relative = self.points[safe] - self.points[queries][:, None, :]
        period = self.point_period[queries][:, None, :]
        periodic = period > 0
        wrapped = relative - period * torch.round(relative / torch.where(periodic, period, 1.0))
        relative = torch.where(periodic, wrapped, relative)
        keep = mask[..., None]
        pair = self._pair_scalars(relative, self.velocity[safe], queries)
        scal = torch.cat([self.point_scalars[safe], pair], dim=-1)
        scal = torch.where(keep, scal, 0.0)
        vec = torch.where(keep[..., None], self.vectors[safe], 0.0)
        pos = torch.where(keep, relative, 0.0).to(self.dtype)
        weight = None
        if weights is not None:
            weight = torch.where(mask, weights.to(device=self.device, dtype=self.dtype), 0.0)
        if self.cloud_options.volume_weighted:
            # relative to the query's own volume: a scale the pooling's normalisation cancels
            volume = (self.volume[safe] / self.volume[queries][:, None]).to(self.dtype)
            volume = torch.where(mask, volume, 0.0)
            weight = volume if weight is None else weight * volume
        batch = CloudBatch(pos=pos, vec=vec, scal=scal, mask=mask, weight=weight, queries=queries)
        if normalize and self.normalizer is not None:
            batch = self.normalizer.apply(batch)
        return TrainingBatch(inputs=batch, target=self.target[queries], volume=self.volume[queries])

    def _pair_scalars(
        self, relative: torch.Tensor, velocity: torch.Tensor, queries: torch.Tensor
    ) -> torch.Tensor:
        """Query-dependent scalars, same formulas as :func:`vcnn.features.pair_features`."""
        distance = torch.linalg.vector_norm(relative, dim=-1)
        columns = []
        for name in self.spec.pair_scalars:
            if name == "proximity":
                columns.append(torch.exp(-distance / self.spec.proximity_length))
            elif name == "distance":
                columns.append(distance)
            elif name == "normalized_radius":
                assert self._along is not None and self._across is not None
                speed0 = torch.linalg.vector_norm(self.velocity[queries], dim=-1, keepdim=True)
                direction = torch.where(
                    speed0 > 0, self.velocity[queries] / speed0.clamp_min(1e-300), 0.0
                ).to(relative.dtype)
                parallel = (relative * direction[:, None, :]).sum(-1)
                perpendicular = torch.clamp(distance * distance - parallel * parallel, min=0.0)
                along = self._along[queries][:, None].to(relative.dtype)
                across = self._across[queries][:, None].to(relative.dtype)
                columns.append(
                    torch.sqrt(parallel**2 / along**2 + perpendicular / across**2)
                )
            else:  # upstream_cosine
                velocity = velocity.to(relative.dtype)
                denominator = distance * torch.linalg.vector_norm(velocity, dim=-1)
                dot = (relative * velocity).sum(-1)
                columns.append(
                    torch.where(denominator > 0, dot / denominator.clamp_min(1e-300), 0.0)
                )
        if not columns:
            return relative.new_zeros((*relative.shape[:2], 0)).to(self.dtype)
        return torch.stack(columns, dim=-1).to(self.dtype)

    def fit_normalizer(
        self, plan: CloudPlan, *, chunk_size: int = 4096, min_std: float = 1e-8
    ) -> FeatureNormalizer:
        """Fit a :class:`vcnn.features.FeatureNormalizer` on raw batches of the given clouds.

        Args:
            plan: clouds of the (training) cases.
            chunk_size: clouds per raw batch (bounds memory).
            min_std: floor of the standard deviations.

        Returns:
            The fitted normaliser (also stored as this dataset's normaliser).
        """
        count = plan.queries.numel()

        def raw_batches() -> Iterable[CloudBatch]:
            for start in range(0, count, chunk_size):
                rows = slice(start, start + chunk_size)
                weights = None if plan.weights is None else plan.weights[rows]
                yield self.gather(
                    plan.queries[rows], plan.indices[rows], weights, normalize=False
                ).inputs

        self.normalizer = FeatureNormalizer.fit(raw_batches(), min_std=min_std)
        return self.normalizer


def _minimum_image(relative: np.ndarray, period: np.ndarray) -> np.ndarray:
    out = np.array(relative, dtype=np.float64)
    for axis, length in enumerate(period):
        if length > 0:
            out[..., axis] -= length * np.round(out[..., axis] / length)
    return out


__all__ = [
    "CaseSource",
    "CaseSplit",
    "CloudDataset",
    "CloudOptions",
    "CloudPlan",
    "DatasetError",
    "TargetScaler",
    "TrainingBatch",
    "as_case_sources",
    "derive_seed",
    "discover_cases",
    "make_split",
    "select_by_alpha",
]
