"""The sparse backend (``engine="sparse"``): factorised nets by torch operations, on any device.

This is what runs on CUDA today (a GPU-specific backend would come before it in
:data:`vcnn.engines.registry.ENGINES`).

Full clouds. For a factorised net with K pair kernels, ``G[e, a] = A[i_e, a] P[e, k(a)]``, so
with ``s[e, k] = w_e P[e, k]``

    L[q, a, v] = sum_{e in q} s[e, k(a)] (A[i_e, a] V[i_e, v])        (point vectors v)
    L[q, a, x] = sum_{e in q} (s[e, k(a)] r_e) A[i_e, a]              (position channel)

are sparse (queries x points) matrices with one value per entry times dense per-point tables:
1 + d sparse-dense products per kernel and chunk of queries do all the per-entry work that is
m wide. Per entry only the inputs, the pair kernels (a tiny MLP of a few invariants) and the
pooling weights are evaluated, in one function that ``torch.compile`` fuses on large meshes.

Training rows: the row batch is gathered and the net's ``forward`` runs on it with each
distinct point of the batch embedded once (:func:`vcnn.engines.reference.gathered_rows`);
sparse products pay off only on whole meshes.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vcnn.engines.base import (
    CloudSet,
    FullCloudResult,
    PassData,
    RangeCounter,
    chunks,
    factorised_on_point_scalars,
    point_embedding,
)
from vcnn.engines.reference import GatheredRows
from vcnn.features import FeatureNormalizer, FieldTable, entry_inputs, normalized_point_scalars
from vcnn.network import VectorCloudNet

logger = logging.getLogger(__name__)

__all__ = ["COMPILE_MIN_ENTRIES", "ENGINE", "SparseEngine"]

#: With ``compile="auto"``, passes over at least this many cloud entries (on the CPU) compile
#: their per-entry stage with ``torch.compile``: fusing the gathers, the input formulas and the
#: pair kernels into a few loops made it 3x faster on the published mesh (28 M entries), which
#: repays the compilation (5-10 s once per process, cached on disk between processes); smaller
#: passes run eagerly.
COMPILE_MIN_ENTRIES = 4_000_000


class SparseEngine:
    """Factorised nets by torch operations and sparse products (module docstring)."""

    name = "sparse"

    def supports(self, model: nn.Module, data: PassData, device: torch.device) -> str | None:
        """A factorised net whose point columns are the feature spec's point scalars."""
        return factorised_on_point_scalars(model, data)

    def full_clouds(self, model: nn.Module, data: PassData) -> _SparseClouds:
        """The sparse full-cloud pass."""
        return _SparseClouds(model, data)

    def training_rows(self, model: nn.Module, data: PassData) -> GatheredRows:
        """The gathered row pass, each distinct point of a batch embedded once."""
        return GatheredRows(data, embed_once=True, engine=self.name)


class _SparseClouds:
    engine = "sparse"

    def __init__(self, model: VectorCloudNet, data: PassData) -> None:
        self.model = model
        self.data = data

    def __call__(
        self, clouds: CloudSet, *, chunk_entries: int, compile: bool | str = "auto"
    ) -> FullCloudResult:
        model, table, normalizer = self.model, self.data.table, self.data.normalizer
        device = self.data.device
        counter = RangeCounter(table, normalizer)
        offsets, queries, indices = clouds.offsets, clouds.queries, clouds.table_rows()
        if compile == "auto":
            compile = device.type == "cpu" and clouds.num_entries >= COMPILE_MIN_ENTRIES
        output = torch.empty(queries.size, dtype=torch.float64, device=device)
        seconds = {"entries": 0.0, "products": 0.0}
        with torch.no_grad():
            start = time.perf_counter()
            tables = _point_tables(model, table, normalizer)
            constants = _StageConstants.build(
                table, normalizer, counter, dtype=tables.point_part.dtype
            )
            stage = _entry_stage_function(bool(compile))
            seconds["products"] += time.perf_counter() - start
            for rows in chunks(offsets, chunk_entries):
                chunk_offsets = offsets[rows.start : rows.stop + 1]
                local_offsets = torch.as_tensor(chunk_offsets - chunk_offsets[0], device=device)
                sizes = torch.diff(local_offsets)
                entry_points = torch.as_tensor(
                    np.asarray(indices[chunk_offsets[0] : chunk_offsets[-1]], dtype=np.int64),
                    device=device,
                )
                chunk_queries = torch.as_tensor(queries[rows], device=device)
                start = time.perf_counter()
                entry_queries = torch.repeat_interleave(chunk_queries, sizes)
                entry_weights = None
                if clouds.weights is not None:
                    entry_weights = torch.as_tensor(
                        clouds.weights[chunk_offsets[0] : chunk_offsets[-1]], device=device
                    )
                values = stage(
                    model, table, normalizer, constants, entry_queries, entry_points,
                    entry_weights,
                )
                counter.add_counts(
                    values.outside_entries, values.outside_by_pair_column, entry_points
                )
                seconds["entries"] += time.perf_counter() - start
                start = time.perf_counter()
                output[rows] = _sparse_products(
                    model, table, values, entry_points, local_offsets, tables
                ).to(torch.float64)
                seconds["products"] += time.perf_counter() - start
        return FullCloudResult.counted(
            output, clouds, counter, seconds=seconds, engine=self.engine
        )


@dataclass
class _PointTables:
    """Per-point tables of the sparse pass (see :func:`_point_tables`)."""

    point_part: torch.Tensor  # (K, N, m_k)
    vector_part: torch.Tensor  # (K, N, m_k (1 + k d))


def _point_tables(
    model: VectorCloudNet, table: FieldTable, normalizer: FeatureNormalizer | None
) -> _PointTables:
    """Per-point tables of the sparse pass, one per kernel.

    A of every kernel's channels (K, N, m_k), and [A, A x V] per kernel (K, N, m_k (1 + k d)),
    V the normalised point vectors.
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
    return _PointTables(grouped.contiguous(), vector_part.contiguous())


@dataclass
class _StageConstants:
    """Per-point tensors the per-entry stage reads besides the table and the normaliser."""

    point_scalars: torch.Tensor  # (N, s_point) normalised point scalars
    point_outside: torch.Tensor  # (N,) bool: some point scalar outside the training range

    @classmethod
    def build(
        cls,
        table: FieldTable,
        normalizer: FeatureNormalizer | None,
        counter: RangeCounter,
        *,
        dtype: torch.dtype,
    ) -> _StageConstants:
        return cls(
            point_scalars=normalized_point_scalars(table, normalizer).to(dtype),
            point_outside=counter.point_any.to(table.points.device),
        )


@dataclass
class _EntryValues:
    """Per-entry values of one chunk of the sparse pass.

    Attributes:
        scaled: (K, E) pooling weight times pair kernel, per kernel.
        positioned: (K, d, E) ``scaled`` times each component of the position channel.
        weight: (E,) pooling weight.
        outside_entries: () int64, entries with some raw input outside the training range.
        outside_by_pair_column: (s_pair,) int64, entries outside per pair scalar.
    """

    scaled: torch.Tensor
    positioned: torch.Tensor
    weight: torch.Tensor
    outside_entries: torch.Tensor
    outside_by_pair_column: torch.Tensor


def _entry_stage(
    model: VectorCloudNet,
    table: FieldTable,
    normalizer: FeatureNormalizer | None,
    constants: _StageConstants,
    entry_queries: torch.Tensor,
    entry_points: torch.Tensor,
    entry_weights: torch.Tensor | None = None,
) -> _EntryValues:
    """Everything of the sparse pass that is computed per cloud entry.

    Inputs, pair kernels, pooling weights and the range test: a pure function of tensors,
    which ``torch.compile`` fuses into a few loops. ``entry_weights`` (E,), when given,
    replace the pooling weights (cutoff times volume ratio).
    """
    config = model.config
    raw = entry_inputs(
        table, entry_queries, entry_points, point_scalars=False, vectors=config.use_angle_feature
    )
    dtype = constants.point_scalars.dtype
    point_count = table.point_scalars.shape[-1]
    pos, vec, pair_scalars = raw.pos, raw.vec, raw.scal
    if normalizer is not None:
        pos = normalizer.positions(pos)
        vec = None if vec is None else normalizer.vectors(vec)
        pair_scalars = normalizer.scalars(pair_scalars, slice(point_count, None))
    point_scalars = None
    if config.point_scalars_in_kernels:
        point_scalars = constants.point_scalars.index_select(0, entry_points)
    pair = model.pair_kernels(model.pair_inputs(pair_scalars, pos, vec, point_scalars))  # (E, K)
    valid = torch.ones_like(entry_points, dtype=torch.bool)
    if entry_weights is None:
        weight = model.pooling_weights(
            valid[None], _row(raw.weight), _row(raw.volume), dtype=dtype
        )[0]
    else:
        weight = entry_weights.to(dtype)
    # Kernel-major (K, E) and component-major (K, d, E): every row a product reads is contiguous.
    scaled = pair.T * weight[None, :]
    position = model.position_channel(pos).T  # (d, E)
    positioned = scaled[:, None, :] * position[None, :, :]
    outside = (
        normalizer.outside_range(raw.scal, slice(point_count, None))
        if normalizer is not None
        else torch.zeros_like(raw.scal, dtype=torch.bool)
    )  # (E, s_pair)
    any_outside = outside.any(dim=1) | constants.point_outside.index_select(0, entry_points)
    return _EntryValues(
        scaled=scaled.contiguous(),
        positioned=positioned.contiguous(),
        weight=weight,
        outside_entries=any_outside.sum(),
        outside_by_pair_column=outside.sum(dim=0),
    )


_COMPILED_STAGE = None
_COMPILE_FAILED = False


def _entry_stage_function(compiled: bool):
    """The per-entry stage, compiled (once per process) or eager."""
    global _COMPILED_STAGE
    if not compiled or _COMPILE_FAILED:
        return _entry_stage
    if _COMPILED_STAGE is None:
        # dynamic: one compilation serves chunks, cases and meshes of every size
        _COMPILED_STAGE = torch.compile(_entry_stage, dynamic=True)
    return _run_compiled


def _run_compiled(*args) -> _EntryValues:
    """The compiled stage; on a compilation failure, the eager stage from then on."""
    global _COMPILE_FAILED
    if _COMPILE_FAILED:
        return _entry_stage(*args)
    try:
        return _COMPILED_STAGE(*args)
    except Exception as error:  # noqa: BLE001 - any failure of the compiler stack
        # A genuine input error is raised again by the eager stage; only a compiler that
        # failed on valid input turns compilation off.
        values = _entry_stage(*args)
        _COMPILE_FAILED = True
        logger.warning(
            "torch.compile of the closure's per-entry stage failed (%s: %s); running it "
            "eagerly (same results, about 3x slower on large meshes)",
            type(error).__name__,
            str(error).splitlines()[0] if str(error) else "",
        )
        return values


def _sparse_products(
    model: VectorCloudNet,
    table: FieldTable,
    values: _EntryValues,
    entry_points: torch.Tensor,
    local_offsets: torch.Tensor,
    tables: _PointTables,
) -> torch.Tensor:
    """Network output of one chunk of full clouds by sparse-dense products (module docstring)."""
    config = model.config
    kernels, dim = config.num_kernels, table.dim
    width = config.embedding[-1] // kernels
    count = table.num_points
    num_queries = local_offsets.numel() - 1
    device = entry_points.device
    entry_query = torch.repeat_interleave(
        torch.arange(num_queries, device=device), torch.diff(local_offsets)
    )
    total = torch.zeros(num_queries, dtype=values.weight.dtype, device=device).index_add_(
        0, entry_query, values.weight
    )
    if bool((total <= 0).any()):
        raise ValueError("a cloud has no point with a positive weight: widen the cloud region")

    # One sparsity pattern (queries x points) serves every product of the chunk.
    crow = local_offsets.to(torch.int32)
    columns = entry_points.to(torch.int32)

    def product(entry_values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """(Q, width): sum over each cloud of entry_values[e] dense[i_e], over the weight."""
        with warnings.catch_warnings():
            # torch flags its CSR layout as beta on creation; the products are tested here.
            warnings.simplefilter("ignore", UserWarning)
            matrix = torch.sparse_csr_tensor(
                crow, columns, entry_values, size=(num_queries, count), check_invariants=False
            )
        return torch.sparse.mm(matrix, dense) / total[:, None]

    # Per kernel k (channels k m_k to (k + 1) m_k): the scalar channel and the point vectors
    # from [A, A x V], the position channel from A, one product per position component.
    mean_parts, vector_parts, position_parts = [], [], []
    for kernel in range(kernels):
        moments = product(values.scaled[kernel], tables.vector_part[kernel])
        mean_parts.append(moments[:, :width])
        vector_parts.append(moments[:, width:].reshape(num_queries, width, -1))
        components = [
            product(values.positioned[kernel, axis], tables.point_part[kernel])
            for axis in range(dim)
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


#: The backend's instance in the priority list.
ENGINE = SparseEngine()
