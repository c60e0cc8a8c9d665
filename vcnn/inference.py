"""Running a trained network on clouds: the reference padded pass and the fast sparse pass.

Both passes take their inputs from :func:`vcnn.features.entry_inputs` (the one input path) and
share the network's stages (:meth:`~vcnn.network.VectorCloudNet.embed_points`,
:meth:`~vcnn.network.VectorCloudNet.pair_kernels`, :meth:`~vcnn.network.VectorCloudNet.head`);
they differ only in how the moments ``L = sum_i w_i G_i Q_i / sum_i w_i`` are summed.

* :func:`predict_padded`: clouds padded to a common width, ``G`` formed for every entry and
  ``L`` by a batched matrix product (``VectorCloudNet.forward``). Training uses it; for a
  factorised net the point part of ``G`` is evaluated once per distinct point of the batch.
* :func:`predict_full_clouds`: full (ragged) clouds of whole meshes. For a factorised net with
  K pair kernels, ``G[e, a] = A[i_e, a] P[e, k(a)]``, so with ``s[e, k] = w_e P[e, k]``

      L[q, a, v] = sum_{e in q} s[e, k(a)] (A[i_e, a] V[i_e, v])        (point vectors v)
      L[q, a, x] = sum_{e in q} (s[e, k(a)] r_e) A[i_e, a]              (position channel)

  are sparse (queries x points) matrices with one value per entry times dense per-point
  tables: two sparse-dense products per chunk of queries do all the per-entry work that is
  m wide. Per entry only the pair kernels (a tiny MLP of a few invariants) are evaluated.
  Other nets fall back to the padded pass over clouds bucketed by size.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from vcnn.features import CloudBatch, FeatureNormalizer, FieldTable, entry_inputs, gather_inputs
from vcnn.network import VectorCloudNet

logger = logging.getLogger(__name__)

__all__ = [
    "FullCloudResult",
    "point_embedding",
    "predict_full_clouds",
    "predict_padded",
]

#: Entries per chunk of the sparse pass: bounds the memory of the per-entry tensors
#: (about 100 bytes per entry) and keeps the per-point tables they touch cache-friendly.
DEFAULT_CHUNK_ENTRIES = 1 << 19


def point_embedding(
    model: VectorCloudNet,
    table: FieldTable,
    normalizer: FeatureNormalizer | None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The point part ``A`` of a factorised embedding at some rows of a field table.

    Args:
        model: a factorised network.
        table: the per-point tensors.
        normalizer: the network's input normaliser (None: raw inputs).
        rows: (R,) int64 rows of the table; None for every row.

    Returns:
        (R, m) float, or (N, m) for every row.
    """
    scalars = table.point_scalars if rows is None else table.point_scalars[rows]
    if normalizer is not None:
        scalars = normalizer.scalars(scalars, slice(0, scalars.shape[-1]))
    return model.embed_points(scalars)


def predict_padded(
    model: nn.Module,
    batch: CloudBatch,
    *,
    table: FieldTable | None = None,
    normalizer: FeatureNormalizer | None = None,
) -> torch.Tensor:
    """The network on a padded batch (``model.forward``), point embedding once per point.

    Args:
        model: the network (any model with the ``forward`` contract of
            :class:`~vcnn.network.VectorCloudNet`).
        batch: normalised inputs (:func:`vcnn.features.gather_inputs`).
        table: the table the batch was gathered from; with a factorised net, its distinct
            points' embedding is computed once and gathered (instead of once per entry).
        normalizer: the normaliser of the batch (needed with ``table``).

    Returns:
        (B,) (or (B, d), (B, d, d)) network output.
    """
    inputs = batch.model_inputs()
    core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if table is not None and isinstance(core, VectorCloudNet) and core.is_factorised:
        unique, inverse = torch.unique(batch.points, return_inverse=True)
        embedded = point_embedding(core, table, normalizer, unique)
        # index_select: its backward is an index_add, far cheaper than indexing's index_put
        gathered = embedded.index_select(0, inverse.reshape(-1))
        inputs["point_embedding"] = gathered.reshape(*inverse.shape, embedded.shape[-1])
    if not isinstance(core, VectorCloudNet):
        inputs.pop("volume")
    return model(**inputs)


@dataclass
class FullCloudResult:
    """Network output on the full clouds of a set of queries.

    Attributes:
        output: (Q,) float64 network output (scaled target units) per query, in query order.
        num_entries: cloud entries summed over.
        out_of_range_entries: entries with at least one scalar input outside the training
            range (0 when the ranges are unknown).
        out_of_range_by_input: per scalar input name, entries outside its range.
        seconds: wall time per stage (``inputs``, ``network``).
    """

    output: np.ndarray
    num_entries: int
    out_of_range_entries: int
    out_of_range_by_input: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def predict_full_clouds(
    model: VectorCloudNet,
    table: FieldTable,
    normalizer: FeatureNormalizer | None,
    offsets: np.ndarray,
    indices: np.ndarray,
    queries: np.ndarray,
    *,
    engine: str = "auto",
    chunk_entries: int = DEFAULT_CHUNK_ENTRIES,
) -> FullCloudResult:
    """The network on ragged clouds given in compressed-row form.

    Args:
        model: the network (eval mode).
        table: the per-point tensors of the clouds' case.
        normalizer: the network's input normaliser (None: raw inputs).
        offsets: (Q + 1,) int64 row offsets of the clouds.
        indices: (nnz,) int table rows of the cloud entries.
        queries: (Q,) int table rows of the query points.
        engine: ``"sparse"`` (factorised nets only), ``"padded"`` (any net: the reference
            pass over clouds bucketed by size) or ``"auto"`` (sparse when possible).
        chunk_entries: entries per chunk (bounds memory).

    Returns:
        The outputs and the input-range counts.
    """
    if engine not in ("auto", "sparse", "padded"):
        raise ValueError(f"engine must be 'auto', 'sparse' or 'padded', got {engine!r}")
    point_count = table.point_scalars.shape[-1]
    factorised = (
        isinstance(model, VectorCloudNet)
        and model.is_factorised
        # the sparse pass feeds the spec's pair columns, which follow the point columns
        and model.config.point_scalar_columns == tuple(range(point_count))
    )
    if engine == "sparse" and not factorised:
        raise ValueError(
            "the sparse engine needs a factorised network whose point columns are the "
            "feature spec's point scalars"
        )
    if engine == "auto":
        engine = "sparse" if factorised else "padded"
    offsets = np.asarray(offsets, dtype=np.int64)
    queries = np.asarray(queries, dtype=np.int64)
    if offsets.shape != (queries.size + 1,) or offsets[-1] != len(indices):
        raise ValueError("offsets, indices and queries do not describe the same clouds")
    if np.any(np.diff(offsets) < 1):
        raise ValueError("every cloud needs at least one point (the query itself)")
    device = table.points.device
    counter = _RangeCounter(table, normalizer)
    output = torch.empty(queries.size, dtype=torch.float64, device=device)
    seconds = {"inputs": 0.0, "network": 0.0}
    with torch.no_grad():
        point_part = tables = None
        if engine == "sparse":
            start = time.perf_counter()
            point_part, tables, point_scalars = _point_tables(model, table, normalizer)
            seconds["network"] += time.perf_counter() - start
        for rows in _chunks(offsets, chunk_entries):
            chunk_offsets = offsets[rows.start : rows.stop + 1]
            local_offsets = torch.as_tensor(chunk_offsets - chunk_offsets[0], device=device)
            sizes = torch.diff(local_offsets)
            entry_points = torch.as_tensor(
                np.asarray(indices[chunk_offsets[0] : chunk_offsets[-1]], dtype=np.int64),
                device=device,
            )
            chunk_queries = torch.as_tensor(queries[rows], device=device)
            if engine == "sparse":
                start = time.perf_counter()
                entry_queries = torch.repeat_interleave(chunk_queries, sizes)
                raw = entry_inputs(
                    table,
                    entry_queries,
                    entry_points,
                    point_scalars=False,
                    vectors=model.config.use_angle_feature,
                )
                counter.add(raw.scal, entry_points, pair_only=True)
                seconds["inputs"] += time.perf_counter() - start
                start = time.perf_counter()
                values = _sparse_chunk(
                    model,
                    table,
                    normalizer,
                    raw,
                    entry_points,
                    local_offsets,
                    point_part,
                    tables,
                    point_scalars,
                )
                seconds["network"] += time.perf_counter() - start
            else:
                values = _padded_chunk(
                    model, table, normalizer, chunk_queries, entry_points, sizes, counter, seconds
                )
            output[rows] = values.to(torch.float64)
    return FullCloudResult(
        output=output.cpu().numpy(),
        num_entries=int(offsets[-1]),
        out_of_range_entries=counter.entries,
        out_of_range_by_input=counter.by_input(),
        seconds=seconds,
    )


def _chunks(offsets: np.ndarray, chunk_entries: int) -> Iterator[slice]:
    """Consecutive query ranges of at most ``chunk_entries`` entries (at least one query)."""
    count = offsets.size - 1
    start = 0
    while start < count:
        stop = int(np.searchsorted(offsets, offsets[start] + chunk_entries, side="right")) - 1
        stop = min(max(stop, start + 1), count)
        yield slice(start, stop)
        start = stop


class _RangeCounter:
    """Counts cloud entries whose raw scalar inputs lie outside the training range.

    Point scalars are tested once per point; an entry's point columns are then counted through
    the number of entries of each point (a bincount), and only the pair columns are tested per
    entry.
    """

    def __init__(self, table: FieldTable, normalizer: FeatureNormalizer | None) -> None:
        self.names = table.spec.scalar_names
        self.point_columns = table.point_scalars.shape[-1]
        self.enabled = normalizer is not None and normalizer.has_ranges
        self.normalizer = normalizer
        self.entries = 0
        self.per_input = torch.zeros(len(self.names), dtype=torch.int64)
        if self.enabled:
            outside = normalizer.outside_range(table.point_scalars, slice(0, self.point_columns))
            self.point_outside = outside.to(torch.int64)  # (N, s_point)
            self.point_any = outside.any(dim=1)  # (N,)
            # entries per point, summed over the chunks (the point columns are counted once)
            self.uses = torch.zeros(outside.shape[0], dtype=torch.int64, device=outside.device)

    def add(
        self, raw_scalars: torch.Tensor, entry_points: torch.Tensor, *, pair_only: bool = False
    ) -> None:
        """Count entries: ``raw_scalars`` (E, s), or (E, s_pair) with ``pair_only``."""
        if not self.enabled:
            return
        pair_scalars = raw_scalars if pair_only else raw_scalars[:, self.point_columns :]
        pair = self.normalizer.outside_range(pair_scalars, slice(self.point_columns, None))
        any_outside = pair.any(dim=1) | self.point_any.index_select(0, entry_points)
        self.entries += int(any_outside.sum())
        self.uses += torch.bincount(entry_points, minlength=self.uses.shape[0])
        self.per_input[self.point_columns :] += pair.sum(dim=0).cpu()

    def by_input(self) -> dict[str, int]:
        """Entries outside the range, per scalar input name (empty without ranges)."""
        if not self.enabled:
            return {}
        counts = self.per_input.clone()
        counts[: self.point_columns] = (self.uses[:, None] * self.point_outside).sum(dim=0).cpu()
        return {name: int(count) for name, count in zip(self.names, counts, strict=True)}


def _point_tables(
    model: VectorCloudNet, table: FieldTable, normalizer: FeatureNormalizer | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-point tables of the sparse pass, one per kernel.

    Returns:
        ``point_part`` (K, N, m_k): A of every kernel's channels, ``vector_part``
        (K, N, m_k (1 + k d)): [A, A x V] per kernel (V the normalised point vectors), and
        the normalised point scalars (N, s_point) that the pair kernels may read.
    """
    config = model.config
    kernels = config.num_kernels
    width = config.embedding[-1] // kernels
    embedded = point_embedding(model, table, normalizer)  # (N, m)
    vectors = table.vectors if normalizer is None else normalizer.vectors(table.vectors)
    vectors = vectors.to(embedded.dtype)
    count = embedded.shape[0]
    grouped = embedded.reshape(count, kernels, width).transpose(0, 1)  # (K, N, m_k)
    outer = grouped[..., None] * vectors.reshape(count, -1)[None, :, None, :]  # (K, N, m_k, kd)
    vector_part = torch.cat([grouped, outer.reshape(kernels, count, -1)], dim=-1)
    scalars = table.point_scalars
    if normalizer is not None:
        scalars = normalizer.scalars(scalars, slice(0, scalars.shape[-1]))
    return grouped.contiguous(), vector_part.contiguous(), scalars.to(embedded.dtype)


def _sparse_chunk(
    model: VectorCloudNet,
    table: FieldTable,
    normalizer: FeatureNormalizer | None,
    raw,
    entry_points: torch.Tensor,
    local_offsets: torch.Tensor,
    point_part: torch.Tensor,
    vector_part: torch.Tensor,
    point_scalar_table: torch.Tensor,
) -> torch.Tensor:
    """Network output of one chunk of full clouds by sparse-dense products (module docstring)."""
    config = model.config
    kernels, dim = config.num_kernels, table.dim
    width = config.embedding[-1] // kernels
    count = table.num_points
    num_queries = local_offsets.numel() - 1
    num_entries = entry_points.numel()
    dtype = point_part.dtype
    point_count = table.point_scalars.shape[-1]
    pos, vec, pair_scalars = raw.pos, raw.vec, raw.scal
    point_scalars = None
    if config.point_scalars_in_kernels:
        point_scalars = point_scalar_table.index_select(0, entry_points)
    if normalizer is not None:
        pos = normalizer.positions(pos)
        vec = None if vec is None else normalizer.vectors(vec)
        pair_scalars = normalizer.scalars(pair_scalars, slice(point_count, None))
    pair = model.pair_kernels(model.pair_inputs(pair_scalars, pos, vec, point_scalars))  # (E, K)
    valid = torch.ones(num_entries, dtype=torch.bool, device=pos.device)
    weight = model.pooling_weights(valid[None], _row(raw.weight), _row(raw.volume), dtype=dtype)[0]
    entry_query = torch.repeat_interleave(
        torch.arange(num_queries, device=pos.device), torch.diff(local_offsets)
    )
    total = torch.zeros(num_queries, dtype=dtype, device=pos.device).index_add_(
        0, entry_query, weight
    )
    if bool((total <= 0).any()):
        raise ValueError("a cloud has no point with a positive weight: widen the cloud region")
    # Kernel-major (K, E) and component-major (d, E): every row below is contiguous.
    scaled = pair.T * weight[None, :]
    position = model.position_channel(pos).T

    # One sparsity pattern (queries x points) serves every product of the chunk.
    crow = local_offsets.to(torch.int32)
    columns = entry_points.to(torch.int32)

    def product(values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """(Q, width): sum over each cloud of values[e] dense[i_e], over the total weight."""
        with warnings.catch_warnings():
            # torch flags its CSR layout as beta on creation; the products are tested here.
            warnings.simplefilter("ignore", UserWarning)
            matrix = torch.sparse_csr_tensor(
                crow,
                columns,
                values.contiguous(),
                size=(num_queries, count),
                check_invariants=False,
            )
        return torch.sparse.mm(matrix, dense) / total[:, None]

    # Per kernel k (channels k m_k to (k + 1) m_k): the scalar channel and the point vectors
    # from [A, A x V], the position channel from A, one product per position component.
    mean_parts, vector_parts, position_parts = [], [], []
    for kernel in range(kernels):
        values = scaled[kernel]
        moments = product(values, vector_part[kernel])
        mean_parts.append(moments[:, :width])
        vector_parts.append(moments[:, width:].reshape(num_queries, width, -1))
        components = [
            product(values * position[axis], point_part[kernel]) for axis in range(dim)
        ]
        position_parts.append(torch.stack(components, dim=-1))  # (Q, m_k, d)
    mean_features = torch.cat(mean_parts, dim=1)  # (Q, m)
    point_vectors = torch.cat(vector_parts, dim=1).reshape(
        num_queries, kernels * width, config.num_vectors, dim
    )
    position_moment = torch.cat(position_parts, dim=1)[:, :, None, :]  # (Q, m, 1, d)
    moments = torch.cat([position_moment, point_vectors], dim=2)  # (Q, m, q, d)
    return model.head(moments, mean_features if config.scalar_channel else None)


def _row(values: torch.Tensor | None) -> torch.Tensor | None:
    return None if values is None else values[None]


def _padded_chunk(
    model: nn.Module,
    table: FieldTable,
    normalizer: FeatureNormalizer | None,
    chunk_queries: torch.Tensor,
    entry_points: torch.Tensor,
    sizes: torch.Tensor,
    counter: _RangeCounter,
    seconds: dict[str, float],
) -> torch.Tensor:
    """The reference pass over one chunk: clouds padded within size buckets."""
    device = entry_points.device
    order = torch.argsort(sizes, stable=True)
    starts = torch.cumsum(sizes, 0) - sizes
    out = torch.empty(chunk_queries.numel(), dtype=torch.float64, device=device)
    bucket_entries = 1 << 17
    position = 0
    while position < order.numel():
        width = int(sizes[order[position]])
        stop = position + 1
        while stop < order.numel() and (stop - position + 1) * int(sizes[order[stop]]) <= max(
            bucket_entries, width
        ):
            stop += 1
        chosen = order[position:stop]
        width = int(sizes[chosen].max())
        columns = torch.arange(width, device=device)
        inside = columns[None, :] < sizes[chosen][:, None]
        rows = torch.where(inside, starts[chosen][:, None] + columns[None, :], 0)
        indices = torch.where(inside, entry_points[rows], -1)
        start = time.perf_counter()
        raw_batch = gather_inputs(table, chunk_queries[chosen], indices)
        counter.add(raw_batch.scal[raw_batch.mask], raw_batch.points[raw_batch.mask])
        batch = raw_batch if normalizer is None else normalizer.apply(raw_batch)
        seconds["inputs"] += time.perf_counter() - start
        start = time.perf_counter()
        out[chosen] = predict_padded(model, batch, table=table, normalizer=normalizer).to(
            torch.float64
        )
        seconds["network"] += time.perf_counter() - start
        position = stop
    return out
