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

:class:`TrainingKernel` does the forward in one generated C loop per cloud, reading only the
table rows (no gathered input tensors), and keeps each entry's inputs, channels and weight
(11 floats for the default net) for the backward, another C loop that recomputes the pair MLP
per entry and accumulates the gradients of the MLP's parameters and of A in per-thread
buffers. The entry inputs come from the same generated function as the inference kernel's
(:func:`vcnn.fused.entry_source`), so training, validation and the closure see one computation
of the inputs.
It runs for float32 on the CPU when the kernel can be built (:mod:`vcnn.kernels`); otherwise,
and on CUDA, :func:`vcnn.inference.predict_rows` gathers the inputs and runs the net's torch
operations. ``tests/test_fused_training.py`` checks values and gradients of one against the
other.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools

import torch
from torch import nn

from vcnn.features import FeatureNormalizer, FieldTable
from vcnn.fused import (
    KernelSpec,
    c_header,
    c_pair_kernels,
    c_pooled_sums,
    entry_source,
    kernel_spec,
    point_periods,
    point_records,
)
from vcnn.kernels import (
    MlpShape,
    c_activation_slope,
    c_mlp_forward,
    c_parallel_driver,
    c_widened,
    compiled_library,
    even_parts,
    mlp_layers,
)
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
        self.num_points = table.num_points

    @classmethod
    def build(
        cls, model: VectorCloudNet, table: FieldTable, normalizer: FeatureNormalizer | None
    ) -> TrainingKernel:
        """Generate, compile (or load from the cache) and bind the kernel.

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
        function = getattr(self._library, name)
        function.restype = ctypes.c_int
        bounds = even_parts(batch)
        function.argtypes = [ctypes.c_int64, ctypes.c_void_p] + [
            ctypes.c_int64 if isinstance(a, int) else ctypes.c_void_p for a in arguments
        ]
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
            kernel._coords, kernel._periods, kernel._records, parameters, table, sums, totals,
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


@functools.lru_cache(maxsize=64)
def training_source(spec: KernelSpec) -> str:
    """The C source of the training kernel for one spec (generated once per spec)."""
    slope = c_activation_slope(spec.activation)
    lines = [
        *c_header(spec),
        slope,
        c_widened(slope).replace("act_slope", "act_slope_g"),
        *c_pair_kernels(spec),
        *entry_source(spec),
        *_mlp_macros(spec),
        _ROWS,
        _MAIN.replace("POOLED_SUMS", c_pooled_sums("block_rows", "table", "size")),
        c_parallel_driver(
            "vcnn_train_forward", "forward_part",
            "int64_t n, const int64_t* queries, const int32_t* points, const int32_t* erows, "
            "const double* coords, const double* periods, const float* records, "
            "const float* params, const float* table, float* sums, float* totals, "
            "float* saved, int64_t saved_stride",
            "n, queries, points, erows, coords, periods, records, params, table, sums, totals, "
            "saved, saved_stride",
        ),
        c_parallel_driver(
            "vcnn_train_backward", "backward_part",
            "int64_t n, const int32_t* erows, const float* params, const float* table, "
            "const float* totals, const float* saved, int64_t saved_stride, const float* grad, "
            "float* grad_params, float* grad_table, int64_t table_size",
            "n, erows, params, table, totals, saved, saved_stride, grad, grad_params, "
            "grad_table, table_size",
        ),
    ]
    return "\n".join(lines) + "\n"


def _mlp_macros(shape: MlpShape) -> list[str]:
    """MLP forward (keeping inputs and slopes of every layer) and backward on one vector."""
    forward = c_mlp_forward(shape, slopes=True)
    backward = []
    # backward: d{index} is the gradient of layer index's output
    for index, previous, size, width, weights, bias, _ in reversed(mlp_layers(shape)):
        backward += [
            f"  for (int j = 0; j < {width}; ++j) {{",
            f"    const vf dz = d{index}[j] * s{index}[j];",
            f"    grads[{bias} + j] += dz;",
            f'    _Pragma("GCC unroll 64") for (int i = 0; i < {size}; ++i)',
            f"      grads[{weights} + j * {size} + i] += dz * {previous}[i];",
            "  }",
        ]
        if index > 0:
            kind = shape.residual[index]
            backward += [
                f"  for (int i = 0; i < {size}; ++i) {{",
                "    vf sum = zero;",
                f'    _Pragma("GCC unroll 64") for (int j = 0; j < {width}; ++j)',
                f"      sum += params[{weights} + j * {size} + i] * (d{index}[j] * s{index}[j]);",
                f"    d{index - 1}[i] = sum;",
                "  }",
            ]
            if kind == 1:
                backward.append(f"  for (int j = 0; j < {width}; ++j) d{index - 1}[j] += d{index}[j];")
            elif kind == 2:
                backward.append(
                    f"  for (int j = 0; j < {width}; ++j) d{index - 1}[j % {size}] += d{index}[j];"
                )
    declarations = [f"  vf h{i}[{w}], s{i}[{w}], d{i}[{w}];" for i, w in enumerate(shape.layers)]
    last = len(shape.layers) - 1
    return [
        "#define MLP_STATE \\",
        *[line + " \\" for line in declarations],
        "  (void)0",
        "#define MLP_FORWARD() do { \\",
        *[line + " \\" for line in forward],
        "} while (0)",
        f"#define MLP_OUT h{last}",
        f"#define MLP_DOUT d{last}",
        "#define MLP_BACKWARD() do { \\",
        *[line + " \\" for line in backward],
        "} while (0)",
    ]


_ROWS = r"""
/* The query's origin, periods and record. */
#define CLOUD_SETUP(query) \
  const float* own = records + (query) * RECORD; \
  double origin[DIM], length[DIM], inverse[DIM]; \
  for (int a = 0; a < DIM; ++a) { \
    origin[a] = coords[(query) * DIM + a]; \
    length[a] = periods[(query) * 2 * DIM + 2 * a]; \
    inverse[a] = periods[(query) * 2 * DIM + 2 * a + 1]; \
  }

/* Entries e..e+LANES-1 of a cloud ending at `end`: table rows (padding and lanes past the end
   read the query's own row and are not valid) and rows of the embedding. */
static inline vi entry_rows(const int32_t* points, const int32_t* erows, int64_t query,
                            int64_t e, int64_t end, int32_t* row, int32_t* embedding_row) {
  vi valid;
  for (int l = 0; l < LANES; ++l) {
    const int64_t at = e + l < end ? e + l : end - 1;
    const int32_t point = points[at];
    row[l] = point >= 0 ? point : (int32_t)query;
    valid[l] = e + l < end && point >= 0 ? -1 : 0;
    embedding_row[l] = erows[at];
  }
  return valid;
}
"""

_MAIN = r"""
/* Per-entry values kept for the backward (when `saved` is given): the pair kernels' inputs,
   the other channels and the pooling weight, value-major, each cloud padded to whole vectors. */
#define SAVED_VALUES (INPUTS + CHANNELS)
static inline int64_t padded_width(int64_t n) { return (n + LANES - 1) / LANES * LANES; }

/* Forward: normalised sums and total weights of the clouds first..last-1 (n entries each). */
static int forward_part(int64_t first, int64_t last, int64_t part, int64_t n,
                        const int64_t* queries, const int32_t* points, const int32_t* erows,
                        const double* coords, const double* periods, const float* records,
                        const float* params, const float* table, float* sums, float* totals,
                        float* saved, int64_t saved_stride) {
  (void)part;
  const vf zero = {};
  const int64_t width = padded_width(n);
  float scaled[KERNELS][CHANNELS][BLOCK] __attribute__((aligned(128)));
  int32_t block_rows[BLOCK];
  for (int64_t q = first; q < last; ++q) {
    const int64_t query = queries[q];
    CLOUD_SETUP(query);
    vr acc[KERNELS][CHANNELS][WIDTH / ROW];
    memset(acc, 0, sizeof acc);
    vf total = zero;
    const int64_t begin = q * n, end = begin + n;
    for (int64_t block = begin; block < end; block += BLOCK) {
      const int64_t size = end - block < BLOCK ? end - block : BLOCK;
      for (int64_t v = 0; v < size; v += LANES) {
        int32_t row[LANES];
        const vi valid = entry_rows(points, erows, query, block + v, end, row, block_rows + v);
        vf x[INPUTS], extra[CHANNELS - 1], raw[PAIRS + 1], point_outside;
        const vf w = entry_values(row, valid, origin, length, inverse, own, coords, records,
                                  x, extra, raw, &point_outside);
        if (saved) {
          float* keep = saved + q * width + (block - begin) + v;
          for (int i = 0; i < INPUTS; ++i) *(vfu*)(keep + i * saved_stride) = x[i];
          for (int c = 0; c < CHANNELS - 1; ++c) *(vfu*)(keep + (INPUTS + c) * saved_stride) = extra[c];
          *(vfu*)(keep + (SAVED_VALUES - 1) * saved_stride) = w;
        }
        vf out[KERNELS];
        pair_kernels(x, params, out);
        total += w;
        for (int k = 0; k < KERNELS; ++k) {
          const vf s = w + w * out[k];
          *(vfu*)(scaled[k][0] + v) = s;
          for (int c = 1; c < CHANNELS; ++c) *(vfu*)(scaled[k][c] + v) = s * extra[c - 1];
        }
      }
POOLED_SUMS
    }
    float whole = 0.0f;
    for (int b = 0; b < LANES; ++b) whole += total[b];
    /* an empty cloud (total 0 or NaN) is reported by the caller from totals */
    const float scale = whole > 0.0f ? 1.0f / whole : 0.0f;
    for (int k = 0; k < KERNELS; ++k)
      for (int c = 0; c < CHANNELS; ++c)
        for (int j = 0; j < WIDTH / ROW; ++j) acc[k][c][j] *= scale;
    totals[q] = whole;
    memcpy(sums + q * KERNELS * CHANNELS * WIDTH, acc, sizeof acc);
  }
  return 0;
}

/* Backward: gradients of the MLP's parameters and of the table from the clouds first..last-1,
   added into this part's own grad_params and grad_table. */
static int backward_part(int64_t first, int64_t last, int64_t part, int64_t n,
                         const int32_t* erows, const float* params, const float* table,
                         const float* totals, const float* saved, int64_t saved_stride,
                         const float* grad, float* grad_params, float* grad_table,
                         int64_t table_size) {
  grad_params += part * PARAMETERS;
  grad_table += part * table_size;
  const vf zero = {};
  const int64_t width = padded_width(n);
  vf grads[PARAMETERS];
  for (int p = 0; p < PARAMETERS; ++p) grads[p] = zero;
  for (int64_t q = first; q < last; ++q) {
    /* the sums were divided by the total weight: so is their gradient */
    vr g[KERNELS * CHANNELS * (WIDTH / ROW)];
    const vru* given = (const vru*)(grad + q * KERNELS * CHANNELS * WIDTH);
    const float scale = 1.0f / totals[q];
    for (int j = 0; j < KERNELS * CHANNELS * (WIDTH / ROW); ++j) g[j] = given[j] * scale;
    const int64_t begin = q * n, end = begin + n;
    for (int64_t e = begin; e < end; e += LANES) {
      int32_t embedding_row[LANES];
      for (int l = 0; l < LANES; ++l) embedding_row[l] = erows[e + l < end ? e + l : end - 1];
      const float* kept = saved + q * width + (e - begin);
      vf x[INPUTS], extra[CHANNELS - 1];
      for (int i = 0; i < INPUTS; ++i) x[i] = *(const vfu*)(kept + i * saved_stride);
      for (int c = 0; c < CHANNELS - 1; ++c) extra[c] = *(const vfu*)(kept + (INPUTS + c) * saved_stride);
      const vf w = *(const vfu*)(kept + (SAVED_VALUES - 1) * saved_stride);
      MLP_STATE;
      MLP_FORWARD();
      for (int k = 0; k < KERNELS; ++k) MLP_DOUT[k] = zero;
      for (int l = 0; l < LANES; ++l) {
        if (w[l] == 0.0f) continue;
        float placed[CHANNELS];
        placed[0] = w[l];
        for (int c = 1; c < CHANNELS; ++c) placed[c] = w[l] * extra[c - 1][l];
        const int64_t offset = (int64_t)embedding_row[l] * KERNELS * WIDTH;
        const vru* a = (const vru*)(table + offset);
        vru* da = (vru*)(grad_table + offset);
        for (int k = 0; k < KERNELS; ++k) {
          vr dot = {};
          const float kernel = 1.0f + MLP_OUT[k][l];
          for (int j = 0; j < WIDTH / ROW; ++j) {
            vr seen = placed[0] * g[(k * CHANNELS) * (WIDTH / ROW) + j];
            for (int c = 1; c < CHANNELS; ++c) seen += placed[c] * g[(k * CHANNELS + c) * (WIDTH / ROW) + j];
            dot += seen * a[k * (WIDTH / ROW) + j];
            da[k * (WIDTH / ROW) + j] += kernel * seen;
          }
          float sum = 0.0f;
          for (int r = 0; r < ROW; ++r) sum += dot[r];
          MLP_DOUT[k][l] = sum;
        }
      }
      MLP_BACKWARD();
    }
  }
  for (int p = 0; p < PARAMETERS; ++p) {
    float sum = 0.0f;
    for (int l = 0; l < LANES; ++l) sum += grads[p][l];
    grad_params[p] += sum;
  }
  return 0;
}
"""
