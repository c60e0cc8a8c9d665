"""The reference backend (``engine="padded"``): the network's own ``forward`` on padded clouds.

Any network runs here, on any device: the inputs of each cloud are gathered
(:func:`vcnn.features.gather_inputs`) into a padded batch, ``G`` is formed for every entry and
the moments ``L`` by a batched matrix product (``VectorCloudNet.forward``).

* Full clouds: the clouds of a chunk are bucketed by size and padded within each bucket; for a
  factorised net the point part of ``G`` is evaluated once per distinct point of a bucket.
* Training rows: the row batch is gathered and ``forward`` runs on it as it is (the point part
  of ``G`` once per entry): the definition the other backends are tested against.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from vcnn.engines.base import (
    CloudSet,
    FullCloudResult,
    PassData,
    RangeCounter,
    chunks,
    point_embedding,
)
from vcnn.features import CloudBatch, FeatureNormalizer, FieldTable, gather_inputs
from vcnn.network import VectorCloudNet

__all__ = ["ENGINE", "GatheredRows", "ReferenceEngine", "gathered_rows", "predict_padded"]


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
            points' embedding is computed once and passed with each entry's row
            (``point_rows``). None: the net embeds every entry.
        normalizer: the normaliser of the batch (needed with ``table``).

    Returns:
        (B,) (or (B, d), (B, d, d)) network output.
    """
    inputs = batch.model_inputs()
    core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if table is not None and isinstance(core, VectorCloudNet) and core.is_factorised:
        unique, inverse = torch.unique(batch.points, return_inverse=True)
        inputs["point_embedding"] = point_embedding(core, table, normalizer, unique)  # (U, m)
        inputs["point_rows"] = inverse
    if not isinstance(core, VectorCloudNet):
        inputs.pop("volume")
    return model(**inputs)


def gathered_rows(
    model: nn.Module,
    data: PassData,
    queries: torch.Tensor,
    indices: torch.Tensor,
    *,
    embed_once: bool,
) -> torch.Tensor:
    """The network on B clouds given as table rows, by gathered inputs and torch operations.

    Args:
        model: the network.
        data: the table the rows refer to and the net's normaliser.
        queries: (B,) int64 rows of the query points.
        indices: (B, n) int rows of the cloud points, -1 in padding slots.
        embed_once: for a factorised net, embed each distinct point of the batch once (see
            :func:`predict_padded`); False: every entry.

    Returns:
        (B,) (or (B, d), (B, d, d)) network output, differentiable in the parameters.
    """
    batch = gather_inputs(data.table, queries, indices, normalizer=data.normalizer)
    if not embed_once:
        return predict_padded(model, batch)
    return predict_padded(model, batch, table=data.table, normalizer=data.normalizer)


class ReferenceEngine:
    """The padded pass: any network, any device (module docstring)."""

    name = "padded"

    def supports(self, model: nn.Module, data: PassData, device: torch.device) -> str | None:
        """Always None: the reference runs everything."""
        return None

    def full_clouds(self, model: nn.Module, data: PassData) -> _PaddedClouds:
        """The padded full-cloud pass over clouds bucketed by size."""
        return _PaddedClouds(model, data)

    def training_rows(self, model: nn.Module, data: PassData) -> GatheredRows:
        """The gathered row pass, ``forward`` on every entry."""
        return GatheredRows(data, embed_once=False, engine=self.name)


class GatheredRows:
    """A row forward by :func:`gathered_rows` (also the sparse backend's)."""

    def __init__(self, data: PassData, *, embed_once: bool, engine: str) -> None:
        self.data = data
        self.embed_once = embed_once
        self.engine = engine

    def __call__(
        self, model: nn.Module, queries: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        """See :class:`vcnn.engines.base.RowForward`."""
        return gathered_rows(model, self.data, queries, indices, embed_once=self.embed_once)


class _PaddedClouds:
    engine = "padded"

    def __init__(self, model: nn.Module, data: PassData) -> None:
        self.model = model
        self.data = data

    def __call__(
        self, clouds: CloudSet, *, chunk_entries: int, compile: bool | str = False
    ) -> FullCloudResult:
        model, table, normalizer = self.model, self.data.table, self.data.normalizer
        device = self.data.device
        counter = RangeCounter(table, normalizer)
        offsets, queries, indices = clouds.offsets, clouds.queries, clouds.table_rows()
        output = torch.empty(queries.size, dtype=torch.float64, device=device)
        seconds = {"inputs": 0.0, "network": 0.0}
        with torch.no_grad():
            for rows in chunks(offsets, chunk_entries):
                chunk_offsets = offsets[rows.start : rows.stop + 1]
                local_offsets = torch.as_tensor(chunk_offsets - chunk_offsets[0], device=device)
                entry_points = torch.as_tensor(
                    np.asarray(indices[chunk_offsets[0] : chunk_offsets[-1]], dtype=np.int64),
                    device=device,
                )
                chunk_queries = torch.as_tensor(queries[rows], device=device)
                entry_weights = None
                if clouds.weights is not None:
                    entry_weights = torch.as_tensor(
                        clouds.weights[chunk_offsets[0] : chunk_offsets[-1]], device=device
                    )
                output[rows] = _padded_chunk(
                    model, table, normalizer, chunk_queries, entry_points,
                    torch.diff(local_offsets), counter, seconds, entry_weights,
                ).to(torch.float64)
        return FullCloudResult.counted(
            output, clouds, counter, seconds=seconds, engine=self.engine
        )


def _padded_chunk(
    model: nn.Module,
    table: FieldTable,
    normalizer: FeatureNormalizer | None,
    chunk_queries: torch.Tensor,
    entry_points: torch.Tensor,
    sizes: torch.Tensor,
    counter: RangeCounter,
    seconds: dict[str, float],
    entry_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference pass over one chunk: clouds padded within size buckets.

    ``entry_weights`` (E,), when given, replace the pooling weights (cutoff times volume).
    """
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
        if entry_weights is not None:
            # weight * volume is the pooling weight of either pooling: volume 1 leaves the given
            given = torch.where(inside, entry_weights[rows], 0).to(batch.pos.dtype)
            batch = replace(batch, weight=given, volume=inside.to(batch.pos.dtype))
        seconds["inputs"] += time.perf_counter() - start
        start = time.perf_counter()
        out[chosen] = predict_padded(model, batch, table=table, normalizer=normalizer).to(
            torch.float64
        )
        seconds["network"] += time.perf_counter() - start
        position = stop
    return out


#: The backend's instance in the priority list.
ENGINE = ReferenceEngine()
