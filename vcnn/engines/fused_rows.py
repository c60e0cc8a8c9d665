"""The training pass of a factorised net on row batches: inputs, pair kernels and pooled sums in C.

A training batch is B clouds given as table rows: the query rows (B,) and the rows of the
cloud points (B, n), -1 in padding slots (:class:`vcnn.datasets.CloudPlan`). A factorised net
(:class:`vcnn.network.VectorCloudNet` with ``point_scalar_columns``) evaluates, per entry, the
inputs of :func:`vcnn.features.entry_inputs` (normalised), its pair kernels ``P = 1 + MLP(x)``
and the pooling weight w, and pools

    sums[b, k, c, :] = sum_i w[b, i] P[b, i, k] c[b, i, c] A[r[b, i], k, :] / sum_i w[b, i]

with c the channels (1, the point vectors' components, the position channel's), A the point
embedding of the batch's distinct points grouped by kernel and r each entry's row of A. With
torch operations that is a gather of (B, n, ...) input tensors, (B, n, m) products and the pair
MLP's narrow matrix products, forward and backward: most of a training step.

:class:`TrainingKernel` does the forward in one C loop per cloud (``vcnn/engines/csrc/training_rows.c``), reading only the
table rows (no gathered input tensors), and keeps each entry's inputs, channels and weight
(11 floats for the default net) for the backward, another C loop that recomputes the pair MLP
per entry and accumulates the gradients of the MLP's parameters and of A in per-thread
buffers. The entry inputs come from the same C function as the inference kernel's
(``entry_values`` of ``vcnn_entry.h``), so training, validation and the closure see one computation
of the inputs.
It runs for float32 on the CPU when the kernel can be built (:mod:`vcnn.engines.kernels`); otherwise,
and on CUDA, :func:`vcnn.inference.predict_rows` gathers the inputs and runs the net's torch
operations. ``tests/test_fused_training.py`` checks values and gradients of one against the
other.
"""

from __future__ import annotations

import ctypes
import dataclasses

import torch
from torch import nn

from vcnn.engines.fused_clouds import (
    KernelSpec,
    kernel_constants,
    kernel_defines,
    kernel_spec,
    point_periods,
    point_records,
)
from vcnn.engines.kernels import bind, c_source, compiled_library, even_parts
from vcnn.features import FeatureNormalizer, FieldTable
from vcnn.network import CloudInputError, VectorCloudNet

__all__ = ["TrainingKernel"]



class TrainingKernel:
    """The training kernel bound to one net configuration, table and normaliser.

    Build it once per data set with :meth:`build` (the per-point records are computed then);
    :meth:`pooled_sums` then runs on any batch of the table's rows with the net's current
    parameters.
    """

    def __init__(
        self,
        spec: KernelSpec,
        library: ctypes.CDLL,
        *,
        table: FieldTable,
        records: torch.Tensor,
    ) -> None:
        self.spec = spec
        self._library = library
        self._coords = table.points.contiguous()
        self._periods = point_periods(table)
        self._records = records
        self._constants = kernel_constants(spec)
        self.num_points = table.num_points

    @classmethod
    def build(
        cls, model: VectorCloudNet, table: FieldTable, normalizer: FeatureNormalizer | None
    ) -> TrainingKernel:
        """Assemble the source, compile it (or load it from the cache) and bind the kernel.

        Args:
            model: a factorised net (float32); only its configuration is bound, the parameters
                are read at every call.
            table: the per-point tensors of the data set (CPU, float32).
            normalizer: the normaliser of the net's inputs (fixed while training).

        Raises:
            KernelUnavailable: the kernel cannot run here or does not cover the configuration
                (the caller then gathers the inputs and uses torch operations).
        """
        # training needs no range test: the training data define the ranges
        spec = dataclasses.replace(kernel_spec(model, table, normalizer), pair_low=(), pair_high=())
        library = compiled_library(
            training_source(spec), symbols=("vcnn_train_forward", "vcnn_train_backward")
        )
        records = point_records(
            spec, model, table, normalizer, torch.zeros(table.num_points, dtype=torch.bool)
        )
        return cls(spec, library, table=table, records=records)

    def check_rows(self, queries: torch.Tensor, indices: torch.Tensor) -> None:
        """Raise ValueError unless the queries and cloud points are rows of the table."""
        for name, rows, low in (("query", queries, 0), ("cloud point", indices, -1)):
            if rows.numel() and (int(rows.min()) < low or int(rows.max()) >= self.num_points):
                raise ValueError(f"training kernel: a {name} row is outside the table")

    def pooled_sums(
        self,
        mlp: nn.Module,
        queries: torch.Tensor,
        indices: torch.Tensor,
        embedding: torch.Tensor,
        embedding_rows: torch.Tensor,
    ) -> torch.Tensor:
        """The normalised pooled sums of B clouds (module docstring).

        Args:
            mlp: the pair kernels' MLP (its parameters are read now).
            queries: (B,) int rows of the query points.
            indices: (B, n) int rows of the cloud points, -1 in padding slots.
            embedding: (U, m) float32 point embedding A of the distinct points.
            embedding_rows: (B, n) int row of ``embedding`` of every entry (padding slots: the
                row of the cloud's query point).

        Returns:
            (B, K, C, m_k) float32 sums, differentiable in the MLP's parameters and in
            ``embedding``.

        Raises:
            ValueError: on rows outside the table or the embedding or shapes that disagree;
                :class:`vcnn.network.CloudInputError` (a ValueError) for a cloud whose pooling
                weights sum to zero.
        """
        spec = self.spec
        if embedding.dtype != torch.float32 or embedding.device.type != "cpu":
            raise ValueError("the training kernel needs a float32 CPU embedding")
        batch, count = indices.shape
        if queries.shape != (batch,) or embedding_rows.shape != (batch, count):
            raise ValueError("training kernel: queries, indices and embedding_rows disagree in shape")
        if embedding.shape[-1] != spec.kernels * spec.width:
            raise ValueError(
                f"training kernel: the embedding has {embedding.shape[-1]} columns, the net "
                f"{spec.kernels * spec.width}"
            )
        self.check_rows(queries, indices)
        if embedding_rows.numel() and (
            int(embedding_rows.min()) < 0 or int(embedding_rows.max()) >= embedding.shape[0]
        ):
            raise ValueError("training kernel: an embedding row is outside the embedding")
        parameters = torch.cat(
            [t.reshape(-1) for layer in mlp.layers for t in (layer.weight, layer.bias)]
        )
        if parameters.numel() != spec.parameters or parameters.dtype != torch.float32:
            raise ValueError("training kernel: the pair MLP does not fit the kernel")
        return _RowSums.apply(
            parameters,
            embedding.reshape(-1, spec.kernels, spec.width),
            queries.to(torch.int64).contiguous(),
            indices.to(torch.int32).contiguous(),
            embedding_rows.to(torch.int32).contiguous(),
            self,
        )

    def _call(self, name: str, batch: int, *arguments: torch.Tensor | int | None) -> None:
        """Call an entry point on ``batch`` clouds split among the threads.

        Tensors and None pass as pointers, ints as int64.
        """
        function = bind(self._library, name)
        bounds = even_parts(batch)
        values = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in arguments]
        if function(bounds.numel() - 1, bounds.data_ptr(), *values):
            raise RuntimeError(f"the training kernel's {name} failed")


class _RowSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, parameters, table, queries, indices, embedding_rows, kernel):
        spec = kernel.spec
        batch, count = indices.shape
        parameters, table = parameters.detach().contiguous(), table.detach().contiguous()
        sums = torch.empty(batch, spec.kernels, spec.channels, spec.width)
        totals = torch.empty(batch)
        # the entries' inputs, channels and weights, for the backward (value-major)
        width = -(-count // spec.entry_lanes) * spec.entry_lanes
        saved = None
        if any(ctx.needs_input_grad[:2]):
            saved = torch.empty(spec.layer_inputs + spec.channels, batch * width)
        kernel._call(
            "vcnn_train_forward", batch, count, queries, indices, embedding_rows,
            kernel._coords, kernel._periods, kernel._records, kernel._constants, parameters,
            table, sums, totals,
            saved, batch * width,
        )
        empty = ~(totals > 0)
        if bool(empty.any()):
            clouds = torch.nonzero(empty).flatten()[:10].tolist()
            raise CloudInputError(
                f"empty cloud: clouds {clouds} of the batch have no point with a positive "
                "pooling weight; drop them or widen the cloud"
            )
        if saved is not None:
            ctx.save_for_backward(parameters, table, embedding_rows, totals, saved)
            ctx.kernel = kernel
        return sums

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        parameters, table, embedding_rows, totals, saved = ctx.saved_tensors
        batch, count = embedding_rows.shape
        parts = even_parts(batch).numel() - 1
        # per part: entries of different clouds share rows of the table
        grad_parameters = torch.zeros(parts, parameters.numel())
        grad_tables = torch.zeros(parts, *table.shape)
        ctx.kernel._call(
            "vcnn_train_backward", batch, count, embedding_rows, parameters, table, totals,
            saved, saved.shape[1], grad.contiguous(), grad_parameters, grad_tables, table.numel(),
        )
        if parts > 1:
            grad_parameters, grad_tables = grad_parameters.sum(0), grad_tables.sum(0)
        else:
            grad_parameters, grad_tables = grad_parameters[0], grad_tables[0]
        return grad_parameters, grad_tables, None, None, None, None


def training_source(spec: KernelSpec) -> str:
    """The C source of the training kernel for one spec (``training_rows.c``)."""
    return c_source("training_rows.c", kernel_defines(spec))
