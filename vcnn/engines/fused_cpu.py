"""The fused CPU backend (``engine="fused"``): the per-entry pass in generated C kernels.

For a factorised float32 net on the CPU:

* the point embedding ``A`` runs in the row-MLP kernel of :mod:`vcnn.engines.fused_mlp` (forward, and
  backward in the parameters);
* full clouds: :class:`vcnn.engines.fused_clouds.FusedPass` computes inputs, pair kernels, pooling weights,
  moments and range counts in one C loop per cloud; the head runs in torch on the moments;
* training rows: :class:`vcnn.engines.fused_rows.TrainingKernel` computes the pooled sums of a
  row batch (forward and backward) reading only table rows, each distinct point of the
  batch embedded once.

:meth:`FusedCpuEngine.supports` checks what the kernels cover; binding compiles (or loads
from the cache) the kernels and raises :class:`vcnn.engines.kernels.KernelUnavailable` where that
fails (no C compiler, ``VCNN_KERNELS=0``), which :func:`vcnn.engines.registry.bind` reports.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from vcnn.engines import fused_clouds, fused_mlp, fused_rows, kernels
from vcnn.engines.base import (
    CloudSet,
    FullCloudResult,
    PassData,
    RangeCounter,
    factorised_on_point_scalars,
)
from vcnn.features import FeatureNormalizer, FieldTable, normalized_point_scalars
from vcnn.network import VectorCloudNet

__all__ = ["ENGINE", "FusedCpuEngine", "FusedRows", "embed_points"]

#: Queries per call of the fitting net in the fused pass (bounds its activations' memory).
_HEAD_QUERIES = 1 << 12


def embed_points(
    model: VectorCloudNet,
    table: FieldTable,
    normalizer: FeatureNormalizer | None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The point embedding ``A`` at some rows of a table, by the C row-MLP kernel.

    Args:
        model: a factorised float32 net whose point columns are the table's point scalars.
        table: the per-point tensors (CPU, float32).
        normalizer: the net's input normaliser (None: raw inputs).
        rows: (R,) int64 rows of the table; None for every row.

    Returns:
        (R, m) (or (N, m)) float32, differentiable in the embedding's parameters.

    Raises:
        KernelUnavailable: the kernel cannot be built or does not cover the inputs.
    """
    scalars = normalized_point_scalars(table, normalizer, rows)
    return fused_mlp.mlp_rows(model.embedding, model.config.activation, scalars)


class FusedCpuEngine:
    """The C kernels on the CPU (module docstring)."""

    name = "fused"

    def supports(self, model: nn.Module, data: PassData, device: torch.device) -> str | None:
        """A factorised float32 net on the CPU whose configuration the kernels cover."""
        reason = factorised_on_point_scalars(model, data)
        if reason is not None:
            return reason
        if device.type != "cpu":
            return "the C kernels run on the CPU only"
        try:
            fused_clouds.kernel_spec(model, data.table, data.normalizer)
        except kernels.KernelUnavailable as error:
            return str(error)
        return None

    def full_clouds(self, model: nn.Module, data: PassData) -> _FusedClouds:
        """Embed every point in C and bind the fused full-cloud kernel."""
        start = time.perf_counter()
        table, normalizer = data.table, data.normalizer
        with torch.no_grad():
            embedded = embed_points(model, table, normalizer)
        bound = fused_clouds.FusedPass.build(
            model,
            table,
            normalizer,
            point_outside=RangeCounter(table, normalizer).point_any,
            embedded=embedded,
        )
        return _FusedClouds(model, data, bound, time.perf_counter() - start)

    def training_rows(self, model: nn.Module, data: PassData) -> FusedRows:
        """Build the training kernel for the data set (and load the embedding kernel)."""
        kernel = fused_rows.TrainingKernel.build(model, data.table, data.normalizer)
        with torch.no_grad():  # the row-MLP kernel: built (or found) now, not at the first batch
            embed_points(model, data.table, data.normalizer, torch.zeros(1, dtype=torch.int64))
        return FusedRows(kernel, data)


class FusedRows:
    """The training-rows forward of a :class:`~vcnn.engines.fused_rows.TrainingKernel`.

    Args:
        kernel: the kernel built for the data set.
        data: the same data set.
    """

    engine = "fused"

    def __init__(self, kernel: fused_rows.TrainingKernel, data: PassData) -> None:
        self.kernel = kernel
        self.data = data

    def __call__(
        self, model: nn.Module, queries: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        """The pooled sums in C, each distinct point embedded once, then the head in torch.

        Args:
            model: a net of the kernel's configuration (its parameters are read now).
            queries: (B,) int64 rows of the query points.
            indices: (B, n) int rows of the cloud points, -1 in padding slots.

        Returns:
            (B,) (or (B, d), (B, d, d)) output, differentiable in the parameters.
        """
        self.kernel.check_rows(queries, indices)
        indices = indices.to(torch.int64)
        safe = torch.where(indices >= 0, indices, queries[:, None])
        unique, rows = torch.unique(safe, return_inverse=True)
        embedding = embed_points(model, self.data.table, self.data.normalizer, unique)  # (U, m)
        sums = self.kernel.pooled_sums(model.pair_embedding, queries, indices, embedding, rows)
        return model.head_from_sums(sums)


class _FusedClouds:
    engine = "fused"

    def __init__(
        self, model: VectorCloudNet, data: PassData, bound: fused_clouds.FusedPass, seconds: float
    ) -> None:
        self.model = model
        self.data = data
        self.bound = bound
        self.tables_seconds = seconds

    def __call__(
        self, clouds: CloudSet, *, chunk_entries: int = 0, compile: bool | str = False
    ) -> FullCloudResult:
        """The kernel's moments, then the network's head."""
        counter = RangeCounter(self.data.table, self.data.normalizer)
        start = time.perf_counter()
        moments = self.bound(
            clouds.offsets, clouds.indices, clouds.queries, image_points=clouds.image_points,
            weights=clouds.weights,
        )
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
                sums = moments.sums[rows] / moments.totals[rows, None, None, None]  # (Q,K,C,m_k)
                output[rows] = self.model.head_from_sums(sums).to(torch.float64)
        seconds = {
            "tables": self.tables_seconds,
            "kernel": kernel_seconds,
            "head": time.perf_counter() - start,
        }
        return FullCloudResult.counted(
            output, clouds, counter, seconds=seconds, engine=self.engine
        )


#: The backend's instance in the priority list.
ENGINE = FusedCpuEngine()
