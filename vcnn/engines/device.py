"""The device backend (``engine="device"``): a pass that stays on the GPU, clouds and batches too.

What keeps a GPU busy is that nothing waits for the host:

* clouds: the full clouds of a case are searched on the device
  (:class:`vcnn.engines.radius_search.DeviceCloudSearch`, the same members as the CPU sampler);
  :func:`searched_full_clouds` is how the closure (:mod:`vcnn.closure`) predicts on a CUDA
  device: the case's points and velocity go up, only the prediction comes back;
* training batches: :class:`DeviceDraws` keeps every training point's full cloud on the device
  once and draws each epoch's subsamples there with a torch generator (query first, the rest a
  uniform sample without replacement), so no batch crosses from the host;
* the per-entry pass: inputs and pair kernels by torch operations over the entries, the
  point embedding once per table point, and the pooled moments by one fused kernel
  (:func:`vcnn.engines.triton_kernels.pooled_moments`: Triton on CUDA, torch elsewhere), with
  no host synchronisation per chunk (range counts are summed on the device).

:data:`ENGINE` applies to data on a CUDA device only (what ``engine="auto"`` tries first there);
``DeviceEngine(cuda_only=False)`` runs the same code on CPU tensors, which is how it is tested.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vcnn.clouds import CloudOptions
from vcnn.engines.base import (
    CLOUDS,
    CloudSet,
    FullCloudResult,
    PassData,
    RangeCounter,
    factorised_on_point_scalars,
    point_embedding,
)
from vcnn.engines.radius_search import DeviceClouds, DeviceCloudSearch
from vcnn.engines.triton_kernels import pooled_moments
from vcnn.features import entry_inputs, normalized_point_scalars
from vcnn.network import VectorCloudNet

__all__ = [
    "DEFAULT_CHUNK_ENTRIES",
    "DeviceDraws",
    "DeviceEngine",
    "ENGINE",
    "sample_cloud_rows",
    "searched_full_clouds",
]

#: Entries per chunk of the full-cloud pass on a device (bounds memory: ~100 bytes each).
DEFAULT_CHUNK_ENTRIES = 1 << 23


class DeviceEngine:
    """The device-resident pass (module docstring).

    Args:
        cuda_only: refuse data that is not on a CUDA device (the registered instance); False
            runs on any device (tests on CPU tensors).
        fused: use the fused pooled-moments kernel: None where Triton runs, True or False.
    """

    name = "device"

    def __init__(self, *, cuda_only: bool = True, fused: bool | None = None) -> None:
        self.cuda_only = cuda_only
        self.fused = fused

    def supports(self, model: nn.Module, data: PassData, device: torch.device) -> str | None:
        """A factorised net on its point scalars, with data on a CUDA device."""
        if self.cuda_only and device.type != "cuda":
            return f"the data is on {device.type}, not a CUDA device"
        return factorised_on_point_scalars(model, data)

    def full_clouds(self, model: nn.Module, data: PassData) -> DeviceFullClouds:
        """The full-cloud pass (clouds given, or searched on the device)."""
        return DeviceFullClouds(model, data, fused=self.fused)

    def training_rows(self, model: nn.Module, data: PassData) -> DeviceRows:
        """The row pass with the fused pooled moments (differentiable)."""
        return DeviceRows(data, fused=self.fused)


# ------------------------------------------------------------------ the per-entry stage
@dataclass
class _Entries:
    """Per-entry values of a set of entries, ready for the pooled moments.

    Attributes:
        coef: (E, K) pooling weight times pair kernel.
        channels: (E, 1 + k d + d) the channel values: 1, point vectors, position channel.
        weight: (E,) pooling weight (its sum over a cloud normalises the moments).
        raw_pair: (E, s_pair) raw pair scalars (for the range counts).
    """

    coef: torch.Tensor
    channels: torch.Tensor
    weight: torch.Tensor
    raw_pair: torch.Tensor


def _entry_values(
    model: VectorCloudNet,
    data: PassData,
    queries: torch.Tensor,
    points: torch.Tensor,
    given_weight: torch.Tensor | None = None,
) -> _Entries:
    """Inputs, pair kernels, pooling weights and channels of (query, point) entries (any shape).

    ``given_weight`` (the entries' shape), when given, replaces the pooling weights (cutoff
    times volume): the cloud quadrature's weights (:mod:`vcnn.cloud_quadrature`).
    """
    table, normalizer, config = data.table, data.normalizer, model.config
    raw = entry_inputs(table, queries, points, point_scalars=False, vectors=True)
    dtype = model._parameter_dtype()
    point_count = table.point_scalars.shape[-1]
    pos, vec, pair_scalars = raw.pos, raw.vec, raw.scal
    if normalizer is not None:
        pos = normalizer.positions(pos)
        vec = normalizer.vectors(vec)
        pair_scalars = normalizer.scalars(pair_scalars, slice(point_count, None))
    pos, vec, pair_scalars = pos.to(dtype), vec.to(dtype), pair_scalars.to(dtype)
    point_scalars = None
    if config.point_scalars_in_kernels:
        point_scalars = normalized_point_scalars(table, normalizer).to(dtype)[points]
    kernel_values = model.pair_kernels(model.pair_inputs(pair_scalars, pos, vec, point_scalars))
    valid = torch.ones_like(points, dtype=torch.bool)
    if given_weight is None:
        weight = model.pooling_weights(valid, raw.weight, raw.volume, dtype=dtype)
    else:
        weight = given_weight.to(dtype)
    ones = torch.ones_like(pos[..., :1])
    channels = torch.cat([ones, vec.flatten(-2), model.position_channel(pos)], dim=-1)
    return _Entries(
        coef=kernel_values * weight[..., None],
        channels=channels,
        weight=weight,
        raw_pair=raw.scal,
    )


def _head(model: VectorCloudNet, sums: torch.Tensor) -> torch.Tensor:
    """The head from pooled moments (Q, C, m) already divided by the cloud weights."""
    kernels = model.config.num_kernels
    count, channels, width = sums.shape
    grouped = sums.reshape(count, channels, kernels, width // kernels).transpose(1, 2)
    return model.head_from_sums(grouped.to(model._parameter_dtype()))


def _embedding(model: VectorCloudNet, data: PassData) -> torch.Tensor:
    """(N, m) the point embedding of every table row (no host sync, unlike a unique())."""
    return point_embedding(model, data.table, data.normalizer)


class DeviceRows:
    """The row forward of the device backend (see :class:`vcnn.engines.base.RowForward`)."""

    engine = "device"

    def __init__(self, data: PassData, *, fused: bool | None) -> None:
        self.data = data
        self.fused = fused

    def __call__(
        self, model: nn.Module, queries: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        """See :class:`vcnn.engines.base.RowForward`."""
        core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        device = self.data.device
        queries = queries.to(device=device, dtype=torch.int64)
        indices = indices.to(device=device, dtype=torch.int64)
        batch, width = indices.shape
        mask = indices >= 0
        safe = torch.where(mask, indices, queries[:, None])
        values = _entry_values(core, self.data, queries[:, None].expand_as(safe), safe)
        weight = torch.where(mask, values.weight, 0.0)
        total = weight.sum(dim=1)
        coef = torch.where(mask[..., None], values.coef, 0.0)
        offsets = torch.arange(batch + 1, device=device) * width
        sums = pooled_moments(
            coef.reshape(batch * width, -1),
            values.channels.reshape(batch * width, -1),
            safe.reshape(-1),
            _embedding(core, self.data),
            offsets,
            fused=self.fused,
        )
        return _head(core, sums / total[:, None, None].to(sums.dtype))


class DeviceFullClouds:
    """The full-cloud forward of the device backend (see :class:`vcnn.engines.base.CloudForward`).

    Besides clouds built elsewhere (:meth:`__call__`), :meth:`case` searches a case's clouds
    on the device and runs the pass on them.
    """

    engine = "device"

    def __init__(self, model: VectorCloudNet, data: PassData, *, fused: bool | None) -> None:
        self.model = model
        self.data = data
        self.fused = fused

    def __call__(
        self, clouds: CloudSet, *, chunk_entries: int = DEFAULT_CHUNK_ENTRIES, compile=False
    ) -> FullCloudResult:
        """The network on clouds given in compressed-row form (``compile`` is ignored)."""
        device = self.data.device
        rows = torch.as_tensor(np.asarray(clouds.table_rows(), dtype=np.int64), device=device)
        offsets = torch.as_tensor(clouds.offsets, device=device)
        queries = torch.as_tensor(clouds.queries, device=device)
        weights = None if clouds.weights is None else torch.as_tensor(clouds.weights, device=device)
        return self.run(
            queries, offsets, rows, chunk_entries=chunk_entries, clouds=clouds, weights=weights
        )

    def case(
        self,
        search: DeviceCloudSearch,
        *,
        row_offset: int = 0,
        chunk_entries: int = DEFAULT_CHUNK_ENTRIES,
    ) -> tuple[FullCloudResult, DeviceClouds]:
        """Search the full clouds of every point of a case on the device, then run the pass.

        Args:
            search: the case's search (its points are table rows ``row_offset`` on).
            row_offset: the case's first table row.
            chunk_entries: entries per chunk (bounds memory).

        Returns:
            The result and the clouds (point indices of the case, not table rows).
        """
        start = time.perf_counter()
        clouds = search.clouds()
        searched = time.perf_counter() - start
        result = self.run(
            clouds.queries + row_offset,
            clouds.offsets,
            clouds.points + row_offset,
            chunk_entries=chunk_entries,
        )
        result.seconds["clouds"] = searched
        return result, clouds

    def run(
        self,
        queries: torch.Tensor,
        offsets: torch.Tensor,
        rows: torch.Tensor,
        *,
        chunk_entries: int = DEFAULT_CHUNK_ENTRIES,
        clouds: CloudSet | None = None,
        weights: torch.Tensor | None = None,
    ) -> FullCloudResult:
        """The pass on device clouds: queries (Q,), offsets (Q + 1,) and rows (nnz,) int64.

        ``weights`` (nnz,) float32, when given, replace the entries' pooling weights (cutoff
        times volume), as the other backends do with a :class:`CloudSet`'s weights.
        """
        model, data = self.model, self.data
        table, normalizer = data.table, data.normalizer
        counter = RangeCounter(table, normalizer)
        output = torch.empty(queries.numel(), dtype=torch.float64, device=queries.device)
        point_count = table.point_scalars.shape[-1]
        outside_entries = torch.zeros((), dtype=torch.int64, device=queries.device)
        outside_pair = torch.zeros(
            len(table.spec.pair_scalars), dtype=torch.int64, device=queries.device
        )
        seconds = {"tables": 0.0, "entries": 0.0}
        with torch.no_grad():
            start = time.perf_counter()
            embedding = _embedding(model, data)
            point_any = counter.point_any.to(queries.device)
            seconds["tables"] = time.perf_counter() - start
            start = time.perf_counter()
            for first, last, entry_start, entry_stop in _chunks(offsets, chunk_entries):
                local = offsets[first : last + 1] - entry_start
                entry_rows = rows[entry_start:entry_stop]
                entry_cloud = torch.repeat_interleave(
                    torch.arange(last - first, device=rows.device),
                    torch.diff(local),
                    output_size=entry_rows.numel(),
                )
                values = _entry_values(
                    model, data, queries[first:last][entry_cloud], entry_rows,
                    None if weights is None else weights[entry_start:entry_stop],
                )
                total = torch.zeros(last - first, dtype=values.weight.dtype, device=rows.device)
                total.index_add_(0, entry_cloud, values.weight)
                sums = pooled_moments(
                    values.coef, values.channels, entry_rows, embedding, local, fused=self.fused
                )
                output[first:last] = _head(model, sums / total[:, None, None].to(sums.dtype)).to(
                    torch.float64
                )
                if counter.enabled:
                    outside = normalizer.outside_range(values.raw_pair, slice(point_count, None))
                    any_outside = outside.any(dim=1) | point_any.index_select(0, entry_rows)
                    outside_entries += any_outside.sum()
                    outside_pair += outside.sum(dim=0)
            uses = None
            if counter.uses is not None:
                uses = torch.bincount(rows, minlength=table.num_points)
            counter.add_totals(int(outside_entries), outside_pair, uses)
            seconds["entries"] = time.perf_counter() - start
        if clouds is None:
            clouds = _CountOnly(int(rows.numel()))
        return FullCloudResult.counted(output, clouds, counter, seconds=seconds, engine=self.engine)


def searched_full_clouds(
    model: nn.Module,
    data: PassData,
    options: CloudOptions,
    points: np.ndarray,
    velocity: np.ndarray,
    period: np.ndarray | None,
    *,
    engine: str = "auto",
) -> FullCloudResult | None:
    """The full-cloud pass of every point of one case, its clouds searched on the data's device.

    This is the closure's full-cloud path where the device backend runs (data on a CUDA
    device, ``engine`` ``"auto"`` or ``"device"``): the case's points and velocity go to the
    device once and only the prediction comes back. Elsewhere it returns None and the caller
    builds the clouds on the host.

    Args:
        model: the network (eval mode).
        data: the case's table (rows = the case's points, in order) and the normaliser.
        options: the cloud options (operator coefficients resolved); a ``"knn"`` region is
            left to the host.
        points: (N, d) float64 coordinates of the case (in its own frame: cloud membership
            does not depend on the frame).
        velocity: (N, d) float64 velocity at the points.
        period: (d,) periodic lengths (0: not periodic), or None.
        engine: the backend request (:data:`vcnn.engines.REQUESTS`).

    Returns:
        The result, one output per point in point order; None where the device pass does not
        run.

    Raises:
        ValueError: an unknown ``engine``.
        EngineUnavailable: ``engine="device"`` for a net or data the backend does not take.
        TooLargeError: periods absurdly short for the clouds.
    """
    from vcnn.engines import registry  # the priority list imports this module

    requested = registry.resolve(engine)
    candidate = requested if requested is not None else registry.ENGINES[0]
    if candidate.name != DeviceEngine.name or options.region not in ("ellipse", "ball"):
        return None
    if requested is None and candidate.supports(model, data, data.device) is not None:
        return None  # "auto" on data the device backend does not take: the next backend
    forward = registry.bind(CLOUDS, model, data, engine=engine)
    if not isinstance(forward, DeviceFullClouds):
        return None

    def on_device(values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values, dtype=np.float64), device=data.device)

    search = DeviceCloudSearch(
        on_device(points),
        on_device(velocity),
        options,
        period=None if period is None else torch.as_tensor(period, dtype=torch.float64),
    )
    result, _ = forward.case(search)
    return result


@dataclass(frozen=True)
class _CountOnly:
    """What :meth:`FullCloudResult.counted` reads of device clouds: the entry count."""

    num_entries: int


def _chunks(offsets: torch.Tensor, chunk_entries: int) -> list[tuple[int, int, int, int]]:
    """Consecutive query ranges of at most ``chunk_entries`` entries (three host syncs in all).

    Returns:
        (first query, last query + 1, first entry, last entry + 1) of every chunk.
    """
    count = offsets.numel() - 1
    if count == 0:
        return []
    marks = torch.arange(1, int(offsets[-1]) // chunk_entries + 1, device=offsets.device)
    cuts = torch.searchsorted(offsets, marks * chunk_entries, right=True) - 1
    edges = sorted({0, count, *[int(cut) for cut in cuts.tolist() if 0 < cut < count]})
    entries = offsets[edges].tolist()
    return list(zip(edges[:-1], edges[1:], entries[:-1], entries[1:], strict=True))


# ------------------------------------------------------------------ batches on the device
def sample_cloud_rows(
    offsets: torch.Tensor,
    rows: torch.Tensor,
    clouds: torch.Tensor,
    size: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Subsample ``size`` members of some full clouds on their device.

    The first member (the query) is always kept, as column 0; the other ``size - 1`` columns
    are a uniform sample without replacement of the rest, in random order (random keys, one
    sort). Clouds with at most ``size`` members are taken whole, padded with -1.

    Args:
        offsets: (P + 1,) int64 compressed-row offsets of the full clouds.
        rows: (nnz,) int64 member rows.
        clouds: (Q,) int64 which clouds to sample (repeats allowed).
        size: members per sample n >= 1.
        generator: torch generator on the clouds' device (the draw is reproducible with it).

    Returns:
        (Q, n) int64 rows, -1 in padding slots.
    """
    device = rows.device
    starts = offsets[clouds]
    sizes = offsets[clouds + 1] - starts
    count = clouds.numel()
    owner = torch.repeat_interleave(torch.arange(count, device=device), sizes)
    front = torch.cumsum(sizes, 0) - sizes
    local = torch.arange(owner.numel(), device=device) - front[owner]
    keys = torch.rand(owner.numel(), generator=generator, device=device, dtype=torch.float64)
    keys = torch.where(local == 0, -1.0, keys) + owner.to(torch.float64) * 2.0
    order = torch.argsort(keys)  # by cloud, the query first, the rest in random order
    rank = torch.arange(owner.numel(), device=device) - front[owner]
    chosen = order[rank < size]
    chosen_owner = owner[rank < size]
    column = rank[rank < size]
    out = torch.full((count, size), -1, dtype=torch.int64, device=device)
    out[chosen_owner, column] = rows[starts[chosen_owner] + local[chosen]]
    return out


class DeviceDraws:
    """Per-epoch cloud draws of a training data set, on its device.

    The full clouds of every point are searched once per case on the device
    (:class:`DeviceCloudSearch`) and kept there (8 bytes per entry); each draw subsamples them
    with a device generator (:func:`sample_cloud_rows`): a draw is a few whole-array
    operations, with no host round trip per batch or per epoch.

    Args:
        dataset: the training data (a :class:`vcnn.datasets.CloudDataset`; its sources give
            the float64 points and velocities, its device the device).
    """

    def __init__(self, dataset) -> None:
        self.device = dataset.device
        offsets, rows = [torch.zeros(1, dtype=torch.int64, device=self.device)], []
        entries = 0
        for case_index, source in enumerate(dataset.sources):
            case = source.load()
            search = DeviceCloudSearch(
                torch.as_tensor(case.points, dtype=torch.float64, device=self.device),
                torch.as_tensor(case.velocity, dtype=torch.float64, device=self.device),
                dataset.cloud_options,
                period=torch.as_tensor(case.period, dtype=torch.float64),
            )
            clouds = search.clouds()
            offsets.append(clouds.offsets[1:] + entries)
            rows.append(clouds.points + int(dataset.offsets[case_index]))
            entries += clouds.num_entries
        self.offsets = torch.cat(offsets)
        self.rows = torch.cat(rows)
        self.case_offsets = [int(value) for value in dataset.offsets]

    def draw(self, cloud_size: int, *, seed: int, queries_per_case: int | None = None):
        """The clouds of one epoch, as :meth:`vcnn.datasets.CloudDataset.draw` (on the device).

        Args:
            cloud_size: points per cloud n.
            seed: seed of this draw.
            queries_per_case: query points drawn per case (None: every point).

        Returns:
            A :class:`vcnn.datasets.CloudPlan` on the device.
        """
        from vcnn.datasets import CloudPlan

        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        parts = []
        for start, stop in zip(self.case_offsets[:-1], self.case_offsets[1:], strict=True):
            count = stop - start
            if queries_per_case is None or queries_per_case >= count:
                parts.append(torch.arange(start, stop, device=self.device))
            else:
                keys = torch.rand(count, generator=generator, device=self.device)
                chosen = torch.topk(keys, queries_per_case).indices
                parts.append(torch.sort(chosen).values + start)
        queries = torch.cat(parts)
        indices = sample_cloud_rows(self.offsets, self.rows, queries, cloud_size, generator)
        return CloudPlan(queries=queries, indices=indices.to(torch.int32))


#: The backend's instance in the priority list (CUDA data only).
ENGINE = DeviceEngine()
