"""Running a trained network on clouds: thin callers of the backends of :mod:`vcnn.engines`.

The per-entry pass (inputs from :func:`vcnn.features.entry_inputs` -> pair kernels -> pooled
moments ``L = sum_i w_i G_i Q_i / sum_i w_i`` -> head) lives in :mod:`vcnn.engines`, one
backend per implementation, picked by one priority list (:data:`vcnn.engines.ENGINES`):

* ``"fused"`` (:mod:`vcnn.engines.fused_cpu`): generated C kernels for factorised float32 nets
  on the CPU, the default where they can be built;
* ``"sparse"`` (:mod:`vcnn.engines.sparse`): factorised nets by torch operations and sparse
  products (what runs on CUDA);
* ``"padded"`` (:mod:`vcnn.engines.reference`): the network's ``forward`` on padded clouds,
  any network.

This module keeps the functions the rest of the package calls:

* :func:`predict_full_clouds`: full (ragged) clouds of whole meshes (inference);
* :func:`predict_rows`: training and validation batches given as table rows (with
  :func:`row_kernel`, the C training kernel where it runs);
* :func:`predict_padded`: the network on a padded batch; :func:`point_embedding`: the point
  part of a factorised embedding.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from vcnn.engines import CLOUDS, ROWS, CloudSet, FullCloudResult, PassData, bind, resolve
from vcnn.engines.base import point_embedding
from vcnn.engines.fused_cpu import FusedRows
from vcnn.engines.fused_rows import TrainingKernel
from vcnn.engines.reference import gathered_rows, predict_padded
from vcnn.engines.sparse import COMPILE_MIN_ENTRIES
from vcnn.features import FeatureNormalizer, FieldTable
from vcnn.network import VectorCloudNet

__all__ = [
    "COMPILE_MIN_ENTRIES",
    "DEFAULT_CHUNK_ENTRIES",
    "FullCloudResult",
    "point_embedding",
    "predict_full_clouds",
    "predict_padded",
    "predict_rows",
    "row_kernel",
]

#: Entries per chunk of the torch passes: bounds the memory of the per-entry tensors (about
#: 100 bytes per entry) and keeps the per-point tables they touch cache-friendly.
DEFAULT_CHUNK_ENTRIES = 1 << 19


def row_kernel(
    model: nn.Module, table: FieldTable, normalizer: FeatureNormalizer | None
) -> TrainingKernel | None:
    """The C kernel of :func:`predict_rows` for a net and a data set, or None where it cannot run.

    The priority list decides (:func:`vcnn.engines.bind`): the kernel where the fused backend
    runs (a factorised float32 :class:`~vcnn.network.VectorCloudNet` on the CPU, kernels
    built; when they cannot be built the reason is logged once), otherwise None.

    Args:
        model: the network.
        table: the data set's per-point tensors.
        normalizer: the net's input normaliser, fixed while the kernel is used.
    """
    forward = bind(ROWS, model, PassData(table, normalizer))
    return forward.kernel if isinstance(forward, FusedRows) else None


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

    Training itself binds the pass once per data set
    (:class:`vcnn.engines.TrainingPass`); this function runs one batch.

    Args:
        model: the network.
        table: the per-point tensors the rows refer to.
        normalizer: the net's input normaliser (None: raw inputs).
        queries: (B,) int64 rows of the query points.
        indices: (B, n) int rows of the cloud points, -1 in padding slots.
        kernel: :func:`row_kernel` of this net, table and normaliser: the inputs, pair kernels
            and pooled sums run in C (the fused backend), each distinct point embedded once.
            None: the inputs are gathered (:func:`vcnn.features.gather_inputs`) and the net
            runs on the padded batch, each distinct point embedded once (the sparse
            backend's row pass).

    Returns:
        (B,) (or (B, d), (B, d, d)) network output, differentiable in the parameters.
    """
    data = PassData(table, normalizer)
    if kernel is None:
        return gathered_rows(model, data, queries, indices, embed_once=True)
    return FusedRows(kernel, data)(model, queries, indices)


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
    weights: np.ndarray | None = None,
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
        engine: ``"fused"`` (factorised float32 nets on the CPU: the compiled kernels),
            ``"sparse"`` (factorised nets: torch operations and sparse products),
            ``"padded"`` (any net: the reference pass over clouds bucketed by size) or
            ``"auto"`` (the first of these that can run; when the fused kernels cannot be
            built, the reason is logged once). ``"fused_cpu"`` and ``"reference"`` name the
            fused and padded backends too.
        chunk_entries: entries per chunk of the torch passes (bounds memory).
        compile: whether the sparse pass compiles its per-entry stage with
            ``torch.compile``: True, False, or ``"auto"`` (on the CPU, for passes of at least
            :data:`COMPILE_MIN_ENTRIES` entries). Compiled and eager stages agree to float32
            round-off; when compilation fails (e.g. no C++ compiler) the pass runs eagerly
            and logs why, once per process.
        image_points: (M,) int table row of every image id, or None (``indices`` are rows).
            The fused kernel reads the ids directly; the other passes map them first.
        weights: (nnz,) float pooling weights of the entries, replacing the cutoff times volume
            ratio of every backend (a quadrature cloud: :mod:`vcnn.cloud_quadrature`), or None.

    Returns:
        The outputs, the input-range counts and the backend that ran (``engine``).

    Raises:
        ValueError: an unknown engine or compile value, clouds that do not fit together, or
            a requested engine that does not apply to the net
            (:class:`vcnn.engines.EngineUnavailable`).
        KernelUnavailable: ``engine="fused"`` where the kernels cannot be built.
    """
    resolve(engine)  # an unknown engine is refused before anything else
    if compile not in (True, False, "auto"):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    clouds = CloudSet.checked(offsets, indices, queries, image_points, weights)
    forward = bind(CLOUDS, model, PassData(table, normalizer), engine=engine)
    return forward(clouds, chunk_entries=chunk_entries, compile=compile)
