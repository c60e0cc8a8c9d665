"""Running a trained network on clouds: the reference padded pass and the fast sparse pass.

Both passes take their inputs from :func:`vcnn.features.entry_inputs` (the one input path) and
share the network's stages (:meth:`~vcnn.network.VectorCloudNet.embed_points`,
:meth:`~vcnn.network.VectorCloudNet.pair_kernels`, :meth:`~vcnn.network.VectorCloudNet.head`);
they differ only in how the moments ``L = sum_i w_i G_i Q_i / sum_i w_i`` are summed.

* :func:`predict_padded`: clouds padded to a common width, ``G`` formed for every entry and
  ``L`` by a batched matrix product (``VectorCloudNet.forward``); for a factorised net the
  point part of ``G`` is evaluated once per distinct point of the batch.
* :func:`predict_rows`: training and validation batches given as table rows. For a factorised
  net on the CPU the inputs, pair kernels and moments run in one C kernel forward and backward
  (:mod:`vcnn.fused_training`, the same generated input code as the fused full-cloud kernel);
  otherwise the inputs are gathered and :func:`predict_padded` runs.
* :func:`predict_full_clouds`: full (ragged) clouds of whole meshes. For a factorised net with
  K pair kernels, ``G[e, a] = A[i_e, a] P[e, k(a)]``, so with ``s[e, k] = w_e P[e, k]``

      L[q, a, v] = sum_{e in q} s[e, k(a)] (A[i_e, a] V[i_e, v])        (point vectors v)
      L[q, a, x] = sum_{e in q} (s[e, k(a)] r_e) A[i_e, a]              (position channel)

  are sparse (queries x points) matrices with one value per entry times dense per-point
  tables: 1 + d sparse-dense products per kernel and chunk of queries do all the per-entry
  work that is m wide. Per entry only the inputs, the pair kernels (a tiny MLP of a few
  invariants) and the pooling weights are evaluated. On the CPU the fused kernel of
  :mod:`vcnn.fused` does all of it in one C loop per cloud (``engine="fused"``, the default
  where it can be built); the torch version (``engine="sparse"``, what runs on CUDA) evaluates
  the per-entry stage in one function that ``torch.compile`` fuses on large meshes and the sums
  as sparse-dense products. Other nets fall back to the padded pass over clouds bucketed by
  size.
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

from vcnn.clouds import map_images
from vcnn.features import (
    CloudBatch,
    FeatureNormalizer,
    FieldTable,
    entry_inputs,
    gather_inputs,
    normalized_point_scalars,
)
from vcnn.fused import FusedPass
from vcnn.fused_training import TrainingKernel
from vcnn.kernels import KernelUnavailable, warn_unavailable
from vcnn.network import VectorCloudNet

logger = logging.getLogger(__name__)

__all__ = [
    "FullCloudResult",
    "point_embedding",
    "predict_full_clouds",
    "predict_padded",
    "predict_rows",
    "row_kernel",
]

#: Entries per chunk of the sparse pass: bounds the memory of the per-entry tensors
#: (about 100 bytes per entry) and keeps the per-point tables they touch cache-friendly.
DEFAULT_CHUNK_ENTRIES = 1 << 19

#: With ``compile="auto"``, passes over at least this many cloud entries (on the CPU) compile
#: their per-entry stage with ``torch.compile``: fusing the gathers, the input formulas and the
#: pair kernels into a few loops made it 3x faster on the published mesh (28 M entries), which
#: repays the compilation (5-10 s once per process, cached on disk between processes); smaller
#: passes run eagerly.
COMPILE_MIN_ENTRIES = 4_000_000


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
    return model.embed_points(normalized_point_scalars(table, normalizer, rows))


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
            (``point_rows``). Batches given as table rows run faster through
            :func:`predict_rows`.
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


def row_kernel(
    model: nn.Module, table: FieldTable, normalizer: FeatureNormalizer | None
) -> TrainingKernel | None:
    """The C kernel of :func:`predict_rows` for a net and a data set, or None where it cannot run.

    It runs for a factorised :class:`~vcnn.network.VectorCloudNet` (not wrapped for
    distributed training) in float32 on the CPU; otherwise, or when it cannot be built (the
    reason is logged once), :func:`predict_rows` gathers the inputs and uses torch operations.

    Args:
        model: the network.
        table: the data set's per-point tensors.
        normalizer: the net's input normaliser, fixed while the kernel is used.
    """
    if not isinstance(model, VectorCloudNet) or not model.is_factorised:
        return None
    if table.points.device.type != "cpu":  # the kernel is CPU-only: no warning on CUDA
        return None
    try:
        return TrainingKernel.build(model, table, normalizer)
    except KernelUnavailable as error:
        warn_unavailable(logger, "training kernel", error)
        return None


def predict_rows(
    model: nn.Module,
    table: FieldTable,
    normalizer: FeatureNormalizer | None,
    queries: torch.Tensor,
    indices: torch.Tensor,
    *,
    kernel: TrainingKernel | None = None,
) -> torch.Tensor:
    """The network on B clouds given as table rows: the pass of training and validation.

    Args:
        model: the network.
        table: the per-point tensors the rows refer to.
        normalizer: the net's input normaliser (None: raw inputs).
        queries: (B,) int64 rows of the query points.
        indices: (B, n) int rows of the cloud points, -1 in padding slots.
        kernel: :func:`row_kernel` of this net, table and normaliser: the inputs, pair kernels
            and pooled sums run in C (:mod:`vcnn.fused_training`), each distinct point
            embedded once. None: the inputs are gathered (:func:`vcnn.features.gather_inputs`)
            and the net runs on the padded batch (:func:`predict_padded`).

    Returns:
        (B,) (or (B, d), (B, d, d)) network output, differentiable in the parameters.
    """
    if kernel is None:
        batch = gather_inputs(table, queries, indices, normalizer=normalizer)
        return predict_padded(model, batch, table=table, normalizer=normalizer)
    kernel.check_rows(queries, indices)
    indices = indices.to(torch.int64)
    safe = torch.where(indices >= 0, indices, queries[:, None])
    unique, rows = torch.unique(safe, return_inverse=True)
    embedding = point_embedding(model, table, normalizer, unique)  # (U, m)
    sums = kernel.pooled_sums(model.pair_embedding, queries, indices, embedding, rows)
    return model.head_from_sums(sums)


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
        engine: the pass that ran: ``"fused"``, ``"sparse"`` or ``"padded"``.
    """

    output: np.ndarray
    num_entries: int
    out_of_range_entries: int
    out_of_range_by_input: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    engine: str = ""


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
    compile: bool | str = "auto",
    image_points: np.ndarray | None = None,
) -> FullCloudResult:
    """The network on ragged clouds given in compressed-row form.

    Args:
        model: the network (eval mode).
        table: the per-point tensors of the clouds' case.
        normalizer: the network's input normaliser (None: raw inputs).
        offsets: (Q + 1,) int64 row offsets of the clouds.
        indices: (nnz,) int table rows of the cloud entries, or with ``image_points`` their
            ids in a set of point images (:attr:`vcnn.clouds.Clouds.image_ids`).
        queries: (Q,) int table rows of the query points.
        engine: ``"fused"`` (factorised nets on the CPU: the compiled kernel of
            :mod:`vcnn.fused`), ``"sparse"`` (factorised nets: torch operations and sparse
            products), ``"padded"`` (any net: the reference pass over clouds bucketed by size)
            or ``"auto"`` (the first of these that can run; when the fused kernel cannot, the
            reason is logged once).
        chunk_entries: entries per chunk (bounds memory).
        compile: whether the sparse pass compiles its per-entry stage with
            ``torch.compile``: True, False, or ``"auto"`` (on the CPU, for passes of at least
            :data:`COMPILE_MIN_ENTRIES` entries). Compiled and eager stages agree to float32
            round-off; when compilation fails (e.g. no C++ compiler) the pass runs eagerly
            and logs why, once per process.
        image_points: (M,) int table row of every image id, or None (``indices`` are rows).
            The fused kernel reads the ids directly; the other passes map them first.

    Returns:
        The outputs and the input-range counts.
    """
    if engine not in ("auto", "fused", "sparse", "padded"):
        raise ValueError(f"engine must be 'auto', 'fused', 'sparse' or 'padded', got {engine!r}")
    if compile not in (True, False, "auto"):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    point_count = table.point_scalars.shape[-1]
    factorised = (
        isinstance(model, VectorCloudNet)
        and model.is_factorised
        # the sparse pass feeds the spec's pair columns, which follow the point columns
        and model.config.point_scalar_columns == tuple(range(point_count))
    )
    if engine in ("fused", "sparse") and not factorised:
        raise ValueError(
            f"the {engine} engine needs a factorised network whose point columns are the "
            "feature spec's point scalars"
        )
    offsets = np.asarray(offsets, dtype=np.int64)
    queries = np.asarray(queries, dtype=np.int64)

    if offsets.shape != (queries.size + 1,) or offsets[-1] != len(indices):
        raise ValueError("offsets, indices and queries do not describe the same clouds")
    if np.any(np.diff(offsets) < 1):
        raise ValueError("every cloud needs at least one point (the query itself)")
    device = table.points.device
    counter = _RangeCounter(table, normalizer)
    if factorised and (engine == "fused" or (engine == "auto" and device.type == "cpu")):
        start = time.perf_counter()
        try:
            with torch.no_grad():
                embedded = point_embedding(model, table, normalizer)
            fused = FusedPass.build(
                model, table, normalizer, point_outside=counter.point_any, embedded=embedded
            )
        except KernelUnavailable as error:
            if engine == "fused":
                raise
            warn_unavailable(logger, "fused closure kernel", error)
        else:
            return _predict_fused(
                model, fused, counter, offsets, indices, queries, image_points,
                time.perf_counter() - start,
            )
    if image_points is not None:  # the other passes read table rows
        indices = map_images(np.asarray(image_points), np.asarray(indices))
    if engine in ("auto", "fused"):
        engine = "sparse" if factorised else "padded"
    if compile == "auto":
        compile = device.type == "cpu" and int(offsets[-1]) >= COMPILE_MIN_ENTRIES
    output = torch.empty(queries.size, dtype=torch.float64, device=device)
    seconds = (
        {"entries": 0.0, "products": 0.0} if engine == "sparse" else {"inputs": 0.0, "network": 0.0}
    )
    with torch.no_grad():
        if engine == "sparse":
            start = time.perf_counter()
            tables = _point_tables(model, table, normalizer)
            constants = _StageConstants.build(
                table, normalizer, counter, dtype=tables.point_part.dtype
            )
            stage = _entry_stage_function(bool(compile))
            seconds["products"] += time.perf_counter() - start
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
                values = stage(model, table, normalizer, constants, entry_queries, entry_points)
                counter.add_counts(
                    values.outside_entries, values.outside_by_pair_column, entry_points
                )
                seconds["entries"] += time.perf_counter() - start
                start = time.perf_counter()
                output[rows] = _sparse_products(
                    model, table, values, entry_points, local_offsets, tables
                ).to(torch.float64)
                seconds["products"] += time.perf_counter() - start
            else:
                output[rows] = _padded_chunk(
                    model, table, normalizer, chunk_queries, entry_points, sizes, counter, seconds
                ).to(torch.float64)
    return FullCloudResult(
        output=output.cpu().numpy(),
        num_entries=int(offsets[-1]),
        out_of_range_entries=counter.entries,
        out_of_range_by_input=counter.by_input(),
        seconds=seconds,
        engine=engine,
    )


#: Queries per call of the fitting net in the fused pass (bounds its activations' memory).
_HEAD_QUERIES = 1 << 12

def _predict_fused(
    model: VectorCloudNet,
    fused: FusedPass,
    counter: _RangeCounter,
    offsets: np.ndarray,
    indices: np.ndarray,
    queries: np.ndarray,
    image_points: np.ndarray | None,
    tables_seconds: float,
) -> FullCloudResult:
    """The fused pass: the kernel's moments, then the network's head."""
    start = time.perf_counter()
    moments = fused(offsets, indices, queries, image_points=image_points)
    kernel_seconds = time.perf_counter() - start
    if bool((moments.totals <= 0).any()):
        raise ValueError("a cloud has no point with a positive weight: widen the cloud region")
    counter.add_totals(moments.outside_entries, moments.outside_by_pair_column, moments.uses)
    start = time.perf_counter()
    count = moments.totals.shape[0]
    output = torch.empty(count, dtype=torch.float64)
    with torch.no_grad():
        for first in range(0, count, _HEAD_QUERIES):
            rows = slice(first, min(first + _HEAD_QUERIES, count))
            sums = moments.sums[rows] / moments.totals[rows, None, None, None]  # (Q, K, C, m_k)
            output[rows] = model.head_from_sums(sums).to(torch.float64)
    return FullCloudResult(
        output=output.numpy(),
        num_entries=int(offsets[-1]),
        out_of_range_entries=counter.entries,
        out_of_range_by_input=counter.by_input(),
        seconds={
            "tables": tables_seconds,
            "kernel": kernel_seconds,
            "head": time.perf_counter() - start,
        },
        engine="fused",
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
        counter: _RangeCounter,
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
) -> _EntryValues:
    """Everything of the sparse pass that is computed per cloud entry.

    Inputs, pair kernels, pooling weights and the range test: a pure function of tensors,
    which ``torch.compile`` fuses into a few loops.
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
    weight = model.pooling_weights(valid[None], _row(raw.weight), _row(raw.volume), dtype=dtype)[0]
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
