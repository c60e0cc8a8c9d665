"""The interface of a backend of the per-entry pass, and what every backend shares.

A backend (:class:`Engine`) runs the per-entry pass of a network (inputs -> pair kernels ->
pooled moments -> head) in two forms:

* the full-cloud forward (:meth:`Engine.full_clouds`): ragged clouds of whole meshes in
  compressed-row form, no gradients (inference: :meth:`vcnn.closure.Closure.predict_detailed`);
* the training-rows forward (:meth:`Engine.training_rows`): B clouds given as table rows
  (queries (B,), cloud points (B, n) with -1 in padding slots), differentiable in the
  network's parameters (training and validation).

Both first bind the backend to a network and a data set (a table and its normaliser): what
costs a compilation or a pass over the table happens there, once, and may raise
:class:`vcnn.engines.kernels.KernelUnavailable`. :meth:`Engine.supports` says beforehand, without
building anything, whether the backend applies at all. Which backend runs is decided in one
place, :func:`vcnn.engines.registry.bind`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from vcnn.clouds import map_images
from vcnn.features import FeatureNormalizer, FieldTable, normalized_point_scalars
from vcnn.network import VectorCloudNet

__all__ = [
    "CLOUDS",
    "ROWS",
    "CloudForward",
    "CloudSet",
    "Engine",
    "EngineUnavailable",
    "FullCloudResult",
    "PassData",
    "PassKind",
    "RangeCounter",
    "RowForward",
    "chunks",
    "factorised_on_point_scalars",
    "point_embedding",
]

#: The two forms of the pass.
PassKind = Literal["clouds", "rows"]
CLOUDS: PassKind = "clouds"
ROWS: PassKind = "rows"


class EngineUnavailable(ValueError):
    """A requested backend does not apply to this network, data or device (says why)."""


@dataclass(frozen=True)
class PassData:
    """The data set a pass is bound to.

    Attributes:
        table: the per-point tensors the clouds refer to.
        normalizer: the network's input normaliser (None: raw inputs), fixed while bound.
    """

    table: FieldTable
    normalizer: FeatureNormalizer | None

    @property
    def device(self) -> torch.device:
        """Where the table lives (and so where the pass runs)."""
        return self.table.points.device


@dataclass(frozen=True)
class CloudSet:
    """Ragged clouds in compressed-row form (validated by :meth:`checked`).

    Attributes:
        offsets: (Q + 1,) int64 row offsets of the clouds.
        indices: (nnz,) int table rows of the entries, or with ``image_points`` their ids in
            a set of point images (:attr:`vcnn.clouds.Clouds.image_ids`).
        queries: (Q,) int64 table rows of the query points.
        image_points: (M,) int table row of every image id, or None (``indices`` are rows).
        weights: (nnz,) float32 pooling weights of the entries, or None. Given, they replace
            the weight each backend computes (cutoff times volume ratio): a quadrature cloud
            (:mod:`vcnn.cloud_quadrature`) is a cloud with fewer entries and its own weights.
    """

    offsets: np.ndarray
    indices: np.ndarray
    queries: np.ndarray
    image_points: np.ndarray | None = None
    weights: np.ndarray | None = None

    @classmethod
    def checked(
        cls,
        offsets: np.ndarray,
        indices: np.ndarray,
        queries: np.ndarray,
        image_points: np.ndarray | None = None,
        weights: np.ndarray | None = None,
    ) -> CloudSet:
        """The clouds, with offsets and queries as int64 arrays (weights as float32).

        Raises:
            ValueError: when offsets, indices, queries and weights disagree, a cloud is empty,
                or a weight is negative or not finite.
        """
        offsets = np.asarray(offsets, dtype=np.int64)
        queries = np.asarray(queries, dtype=np.int64)
        if offsets.shape != (queries.size + 1,) or offsets[-1] != len(indices):
            raise ValueError("offsets, indices and queries do not describe the same clouds")
        if np.any(np.diff(offsets) < 1):
            raise ValueError("every cloud needs at least one point (the query itself)")
        if weights is not None:
            weights = np.ascontiguousarray(weights, dtype=np.float32)
            if weights.shape != (len(indices),):
                raise ValueError("weights must hold one value per cloud entry")
            if not np.all(np.isfinite(weights)) or np.any(weights < 0):
                raise ValueError("entry weights must be finite and >= 0")
        return cls(offsets, indices, queries, image_points, weights)

    @property
    def num_entries(self) -> int:
        """Cloud entries in all."""
        return int(self.offsets[-1])

    def table_rows(self) -> np.ndarray:
        """(nnz,) the entries' table rows: :attr:`indices`, image ids mapped to their points.

        The torch passes read table rows; the fused kernel reads image ids itself.
        """
        if self.image_points is None:
            return self.indices
        return map_images(np.asarray(self.image_points), np.asarray(self.indices))


@dataclass
class FullCloudResult:
    """Network output on the full clouds of a set of queries.

    Attributes:
        output: (Q,) float64 network output (scaled target units) per query, in query order.
        num_entries: cloud entries summed over.
        out_of_range_entries: entries with at least one scalar input outside the training
            range (0 when the ranges are unknown).
        out_of_range_by_input: per scalar input name, entries outside its range.
        seconds: wall time per stage. Fused pass: ``tables`` (point embedding and records,
            kernel build or cache lookup), ``kernel`` (everything per cloud entry) and ``head``
            (fitting net); sparse pass: ``entries`` (everything per cloud entry: inputs, pair
            kernels, pooling weights, range test) and ``products`` (point tables, sparse
            products, fitting net); padded pass: ``inputs`` and ``network``.
        engine: the backend that ran: ``"fused"``, ``"sparse"`` or ``"padded"``.
    """

    output: np.ndarray
    num_entries: int
    out_of_range_entries: int
    out_of_range_by_input: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    engine: str = ""

    @classmethod
    def counted(
        cls,
        output: torch.Tensor,
        clouds: CloudSet,
        counter: RangeCounter,
        *,
        seconds: dict[str, float],
        engine: str,
    ) -> FullCloudResult:
        """The result of a pass: its output (Q,) on any device, the counts of ``counter``."""
        return cls(
            output=output.cpu().numpy(),
            num_entries=clouds.num_entries,
            out_of_range_entries=counter.entries,
            out_of_range_by_input=counter.by_input(),
            seconds=seconds,
            engine=engine,
        )


class CloudForward(Protocol):
    """A full-cloud forward bound to a network and a data set (see :meth:`Engine.full_clouds`)."""

    engine: str

    def __call__(
        self, clouds: CloudSet, *, chunk_entries: int, compile: bool | str
    ) -> FullCloudResult:
        """The network output on ``clouds`` and the input-range counts (no gradients).

        Args:
            clouds: the clouds, of the bound table's points.
            chunk_entries: entries per chunk of the torch passes (bounds memory).
            compile: whether the sparse pass compiles its per-entry stage (True, False or
                ``"auto"``); other backends ignore it.
        """
        ...


class RowForward(Protocol):
    """A training-rows forward bound to a data set (see :meth:`Engine.training_rows`)."""

    engine: str

    def __call__(
        self, model: nn.Module, queries: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        """The network on B clouds given as table rows, differentiable in its parameters.

        Args:
            model: the network bound (or one of the same configuration: the parameters are
                read at every call).
            queries: (B,) int64 rows of the query points.
            indices: (B, n) int rows of the cloud points, -1 in padding slots.

        Returns:
            (B,) (or (B, d), (B, d, d)) network output.
        """
        ...


@runtime_checkable
class Engine(Protocol):
    """A backend of the per-entry pass.

    Attributes:
        name: what ``engine=`` requests it by and what results record.
    """

    name: str

    def supports(self, model: nn.Module, data: PassData, device: torch.device) -> str | None:
        """Why the backend cannot run this network on this data and device, or None.

        Cheap (nothing is built); a backend that passes may still fail to bind (e.g. no C
        compiler), which :func:`vcnn.engines.registry.bind` reports once.
        """
        ...

    def full_clouds(self, model: nn.Module, data: PassData) -> CloudForward:
        """Bind the full-cloud forward (may raise :class:`vcnn.engines.kernels.KernelUnavailable`)."""
        ...

    def training_rows(self, model: nn.Module, data: PassData) -> RowForward:
        """Bind the training-rows forward (may raise :class:`vcnn.engines.kernels.KernelUnavailable`)."""
        ...


# ------------------------------------------------------------------ shared by the backends
def factorised_on_point_scalars(model: nn.Module, data: PassData) -> str | None:
    """Why a net is not a factorised one fed the table's point scalars, or None.

    The sparse and fused passes embed the table's point scalars once per point and feed the
    pair kernels the feature spec's pair columns, which follow the point columns.
    """
    if not isinstance(model, VectorCloudNet) or not model.is_factorised:
        return "the network is not factorised"
    point_count = data.table.point_scalars.shape[-1]
    if model.config.point_scalar_columns != tuple(range(point_count)):
        return "the network's point columns are not the feature spec's point scalars"
    return None


def point_embedding(
    model: VectorCloudNet,
    table: FieldTable,
    normalizer: FeatureNormalizer | None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The point part ``A`` of a factorised embedding at some rows of a field table (torch).

    Args:
        model: a factorised network.
        table: the per-point tensors.
        normalizer: the network's input normaliser (None: raw inputs).
        rows: (R,) int64 rows of the table; None for every row.

    Returns:
        (R, m) float, or (N, m) for every row.
    """
    return model.embed_points(normalized_point_scalars(table, normalizer, rows))


def chunks(offsets: np.ndarray, chunk_entries: int) -> Iterator[slice]:
    """Consecutive query ranges of at most ``chunk_entries`` entries (at least one query)."""
    count = offsets.size - 1
    start = 0
    while start < count:
        stop = int(np.searchsorted(offsets, offsets[start] + chunk_entries, side="right")) - 1
        stop = min(max(stop, start + 1), count)
        yield slice(start, stop)
        start = stop


class RangeCounter:
    """Counts cloud entries whose raw scalar inputs lie outside the training range.

    Point scalars are tested once per point; an entry's point columns are counted at the end
    through the number of entries of each point (a bincount per chunk, skipped when every point
    is inside), and only the pair columns are tested per entry.
    """

    def __init__(self, table: FieldTable, normalizer: FeatureNormalizer | None) -> None:
        self.names = table.spec.scalar_names
        self.point_columns = table.point_scalars.shape[-1]
        self.enabled = normalizer is not None and normalizer.has_ranges
        self.normalizer = normalizer
        self.entries = 0
        self.per_input = torch.zeros(len(self.names), dtype=torch.int64)
        outside = torch.zeros_like(table.point_scalars, dtype=torch.bool)
        if self.enabled:
            outside = normalizer.outside_range(table.point_scalars, slice(0, self.point_columns))
        self.point_outside = outside.to(torch.int64)  # (N, s_point)
        self.point_any = outside.any(dim=1)  # (N,)
        # entries per point, summed over the chunks: only needed when some point is outside
        self.uses = None
        if bool(self.point_any.any()):
            self.uses = torch.zeros(outside.shape[0], dtype=torch.int64, device=outside.device)

    def add(self, raw_scalars: torch.Tensor, entry_points: torch.Tensor) -> None:
        """Count entries of raw scalars ``raw_scalars`` (E, s) at table rows ``entry_points``."""
        if not self.enabled:
            return
        pair_scalars = raw_scalars[:, self.point_columns :]
        pair = self.normalizer.outside_range(pair_scalars, slice(self.point_columns, None))
        any_outside = pair.any(dim=1) | self.point_any.index_select(0, entry_points)
        self.add_counts(any_outside.sum(), pair.sum(dim=0), entry_points)

    def add_counts(
        self, entries: torch.Tensor, by_pair_column: torch.Tensor, entry_points: torch.Tensor
    ) -> None:
        """Add the counts of a chunk: entries outside, per pair column, and its entries' rows."""
        if not self.enabled:
            return
        self.entries += int(entries)
        self.per_input[self.point_columns :] += by_pair_column.cpu()
        if self.uses is not None:
            self.uses += torch.bincount(entry_points, minlength=self.uses.shape[0])

    def add_totals(
        self, entries: int, by_pair_column: torch.Tensor, uses: torch.Tensor | None
    ) -> None:
        """Add counts made elsewhere (the fused kernel): entries, per pair column, per point."""
        if not self.enabled:
            return
        self.entries += int(entries)
        self.per_input[self.point_columns :] += by_pair_column.cpu()
        if self.uses is not None and uses is not None:
            self.uses += uses.to(self.uses.device)

    def by_input(self) -> dict[str, int]:
        """Entries outside the range, per scalar input name (empty without ranges)."""
        if not self.enabled:
            return {}
        counts = self.per_input.clone()
        if self.uses is not None:
            counts[: self.point_columns] = (self.uses[:, None] * self.point_outside).sum(0).cpu()
        return {name: int(count) for name, count in zip(self.names, counts, strict=True)}
