"""Training data: lazily loaded case files, splits by case, per-epoch cloud draws, batch gathering.

Memory model. Every case's nodal fields live once on the training device as tensors,
concatenated over the cases of a split (``points`` (N, d), ``velocity`` (N, d), normalised point
scalars (N, s), the scaled target (N,)). A cloud is only a row of point indices: per epoch each
case's clouds are redrawn (:meth:`CloudDataset.draw`, a seed derived from the base seed and the
epoch), kept as an (M, n) int32 index array (O(N n) integers), and a batch of clouds is gathered
from the fields on the fly (:meth:`CloudDataset.gather`). The dense (clouds x n x features)
tensor of a whole data set is never built.

Everything the network needs is computed from the case-file contract keys of docs/design.md
(``points``, ``velocity``, ``tau``, ``strain_rate``, ``wall_distance``, ``nodal_volume``,
``is_wall``, ``period``), so case files written by other codes work as they are.

The inputs are built by :func:`vcnn.features.gather_inputs` on a
:class:`vcnn.features.FieldTable` of the cases, the one input path that evaluation and
coupled simulations use too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from vcnn.casefile import Case, CaseFileError, case_paths, check_archive, read_case
from vcnn.clouds import CloudOptions
from vcnn.features import CloudBatch, FeatureNormalizer, FeatureSpec, FieldTable, gather_inputs

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
    check_archive(path)  # a text file named .npz is "not an .npz", not "pickled data"
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


#: Tag of the seed that chooses the held-out validation cases (see :func:`hold_out_cases`).
_HOLD_OUT_STREAM = 2**31 - 3


def hold_out_cases(
    sources: Sequence[CaseSource], *, fraction: float, seed: int
) -> tuple[list[CaseSource], list[CaseSource]]:
    """Hold out whole cases: ``round(fraction * n)`` of them, at least one, chosen by the seed.

    The choice depends only on the seed and the case names (not on the order of discovery),
    so a resumed run holds out the same cases.

    Args:
        sources: the cases to split (at least two).
        fraction: share of the cases held out, in (0, 1).
        seed: the run's seed.

    Returns:
        The kept cases and the held-out cases, each in the order of ``sources``.

    Raises:
        DatasetError: for fewer than two cases (nothing would be left on one side).
    """
    if len(sources) < 2:
        raise DatasetError(f"cannot hold out a case from {len(sources)} case(s): need two or more")
    count = min(max(1, math.floor(fraction * len(sources) + 0.5)), len(sources) - 1)
    by_name = sorted(range(len(sources)), key=lambda index: sources[index].name)
    order = np.random.default_rng(derive_seed(seed, _HOLD_OUT_STREAM)).permutation(len(sources))
    held = {by_name[int(position)] for position in order[:count]}
    kept = [source for index, source in enumerate(sources) if index not in held]
    return kept, [source for index, source in enumerate(sources) if index in held]


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
    """

    queries: torch.Tensor
    indices: torch.Tensor


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


class CloudDataset:
    """The fields of a list of cases on one device, with per-epoch cloud draws and gathering.

    Args:
        sources: the cases (read on construction).
        spec: which network inputs (see :class:`vcnn.features.FeatureSpec`).
        target_scaler: the target scale (fit on the training cases).
        cloud_options: cloud options, resolved against the data's physics
            (:meth:`vcnn.clouds.CloudOptions.resolved`).
        normalizer: input normaliser fitted on the training cases (None: raw inputs, e.g. to
            fit one with :meth:`fit_normalizer`).
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
        self._checked_images: set[int] = set()
        cases = [source.load() for source in self.sources]
        try:
            self.table = FieldTable.from_cases(
                cases, spec=spec, options=cloud_options, device=self.device, dtype=dtype
            )
        except ValueError as error:
            raise DatasetError(str(error)) from error
        self.dim = self.table.dim
        self.offsets = self.table.offsets
        self.tau = np.concatenate([c.tau for c in cases])
        self.target = torch.as_tensor(
            self.tau / target_scaler.scale, dtype=dtype, device=self.device
        )
        self.volume = self.table.volume.to(dtype)
        self.case_of_point = np.repeat(np.arange(len(cases)), np.diff(self.offsets))

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
            case = self.sources[case_index].load()
            self._samplers[case_index] = self.cloud_options.sampler(
                case.points, case.velocity, case.period
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
        for case_index in range(self.num_cases):
            offset = int(self.offsets[case_index])
            count = int(self.offsets[case_index + 1]) - offset
            rng = np.random.default_rng(derive_seed(seed, case_index, 0))
            queries = None
            if queries_per_case is not None and queries_per_case < count:
                queries = np.sort(rng.choice(count, size=queries_per_case, replace=False))
            sampler, cloud_seed = self.sampler(case_index), derive_seed(seed, case_index, 1)
            local_queries = np.arange(count) if queries is None else queries
            clouds = None
            if case_index in self._checked_images:
                # the indices of the draw below, without positions the batches rebuild anyway
                local = sampler.sample_points(cloud_size, queries=queries, seed=cloud_seed)
            else:
                # The first draw of a case also checks the sampler's relative positions: the
                # clouds' reach is a property of the case and the region, not of the draw.
                clouds = sampler.sample(cloud_size, queries=queries, seed=cloud_seed)
                local = clouds.indices
            local = np.asarray(local, dtype=np.int64)
            if local.shape != (len(local_queries), cloud_size):
                raise DatasetError(
                    f"sampler returned clouds of shape {local.shape}, expected "
                    f"{(len(local_queries), cloud_size)}"
                )
            if clouds is not None:
                self._check_minimum_image(case_index, local_queries, local, clouds)
                self._checked_images.add(case_index)
            all_queries.append(local_queries + offset)
            all_indices.append(np.where(local >= 0, local + offset, -1))
        queries_array = np.concatenate(all_queries)
        indices_array = np.concatenate(all_indices)
        if self.num_points >= np.iinfo(np.int32).max:
            raise DatasetError("more than 2^31 points in a split: split the data set further")
        return CloudPlan(
            queries=torch.as_tensor(queries_array, dtype=torch.int64, device=self.device),
            indices=torch.as_tensor(
                indices_array.astype(np.int32), dtype=torch.int32, device=self.device
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
        *,
        normalize: bool = True,
    ) -> TrainingBatch:
        """Gather a batch of padded clouds and their targets (:func:`gather_inputs`).

        Args:
            queries: (B,) int64 global query indices.
            indices: (B, n) int global cloud indices, -1 for padding.
            normalize: apply the dataset's normaliser (when it has one).

        Returns:
            The batch on the dataset's device.
        """
        batch = gather_inputs(
            self.table,
            queries,
            indices,
            normalizer=self.normalizer if normalize else None,
        )
        queries = batch.queries
        return TrainingBatch(inputs=batch, target=self.target[queries], volume=self.volume[queries])

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
                yield self.gather(plan.queries[rows], plan.indices[rows], normalize=False).inputs

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
    "CloudPlan",
    "DatasetError",
    "TargetScaler",
    "TrainingBatch",
    "as_case_sources",
    "derive_seed",
    "discover_cases",
    "hold_out_cases",
    "make_split",
    "select_by_alpha",
]
