"""The pair kernels and pooled sums of a factorised net as one autograd operation, in C.

On a padded batch of B clouds of n points, a factorised net (:class:`vcnn.network.VectorCloudNet`
with ``point_scalar_columns``) evaluates its pair kernels ``P = 1 + MLP(x)`` on every entry and
pools

    sums[b, k, c, :] = sum_i w[b, i] P[b, i, k] c[b, i, c] A[r[b, i], k, :]

with w the normalised pooling weight, c the channels (1, the position channel's and the point
vectors' components), A the point embedding of the batch's distinct points grouped by kernel,
and r each entry's row of A. With torch operations, training moves (B, n, m) tensors (the
gathered embedding, its product with the kernels, the weighted features) and the pair MLP's
(B n, hidden) activations through memory forward and backward, and runs the MLP's narrow
matrix products at a few per cent of the machine's rate: together most of a training step.

:func:`pair_pooled_sums` does the forward in one generated C loop per cloud (the MLP on one
SIMD vector of entries at a time, as :mod:`vcnn.fused` does for inference) and the backward in
another, which recomputes the MLP per entry and accumulates the gradients of the MLP's
parameters and of A in per-thread buffers. Inputs x, w, c are data (no gradient). It runs for
float32 tensors on the CPU when the kernel can be built (:mod:`vcnn.kernels`); otherwise, and
on CUDA, :class:`vcnn.network.VectorCloudNet` computes the same sums with its torch operations
on the gathered rows. ``tests/test_fused_training.py`` checks values and gradients of one
against the other.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch
from torch import nn

from vcnn.kernels import (
    C_HELPERS,
    KernelUnavailable,
    MlpShape,
    c_mlp_forward,
    c_parallel_driver,
    c_reciprocal,
    c_widened,
    compiled_library,
    even_parts,
    mlp_layers,
)

__all__ = ["pair_pooled_sums"]

#: Activation and its derivative (slope) from the pre-activation z, vector forms.
_SLOPE_CODE = {
    "silu": [
        "  const vf sigma = reciprocal(1.0f + vexp(-z));",
        "  *slope = sigma * (1.0f + z * (1.0f - sigma));",
        "  return z * sigma;",
    ],
    "tanh": [
        "  const vf t = 1.0f - 2.0f * reciprocal(vexp(2.0f * z) + 1.0f);",
        "  *slope = 1.0f - t * t;",
        "  return t;",
    ],
    "relu": [
        "  *slope = blend(z > 0.0f, zero + 1.0f, zero);",
        "  return blend(z > 0.0f, z, zero);",
    ],
    # lane by lane through libm
    "gelu": [
        "  vf y, s;",
        "  for (int b = 0; b < LANES; ++b) {",
        "    const float v = z[b], phi = 0.5f * (1.0f + erff(v * 0.70710678118654752f));",
        "    y[b] = v * phi;",
        "    s[b] = phi + v * expf(-0.5f * v * v) * 0.39894228040143268f;",
        "  }",
        "  *slope = s;",
        "  return y;",
    ],
    "softplus": [
        "  vf y, s;",
        "  for (int b = 0; b < LANES; ++b) {",
        "    const float v = z[b];",
        "    y[b] = v > 20.0f ? v : log1pf(expf(v));",
        "    s[b] = v > 20.0f ? 1.0f : 1.0f / (1.0f + expf(-v));",
        "  }",
        "  *slope = s;",
        "  return y;",
    ],
}


@dataclass(frozen=True)
class _Shape(MlpShape):
    """What the generated source depends on: the pair MLP's shape and the following."""

    width: int
    channels: int
    lanes: int

    @classmethod
    def build(cls, mlp: nn.Module, *, width: int, channels: int, activation: str) -> _Shape:
        return cls(
            width=width,
            channels=channels,
            lanes=next(lanes for lanes in (8, 4, 2, 1) if width % lanes == 0),
            **MlpShape.of(mlp, activation).fields(),
        )

    def source(self) -> str:
        entries, lanes = self.entry_lanes, self.lanes
        slope = [
            "static inline vf act_slope(vf z, vf* slope) {",
            "  const vf zero = {};",
            "  (void)zero;",
            *_SLOPE_CODE[self.activation],
            "}",
        ]
        lines = [
            "#include <math.h>",
            "#include <stdint.h>",
            "#include <string.h>",
            "#if defined(__AVX512F__)",
            "#include <immintrin.h>",
            "#endif",
            f"typedef float vf __attribute__((vector_size({4 * entries})));",
            f"typedef float vfu __attribute__((vector_size({4 * entries}), aligned(4)));",
            f"typedef int32_t vi __attribute__((vector_size({4 * entries})));",
            f"typedef float vr __attribute__((vector_size({4 * lanes})));",
            f"typedef float vru __attribute__((vector_size({4 * lanes}), aligned(4)));",
            f"typedef float vg __attribute__((vector_size({4 * entries * self.group})));",
            f"typedef int32_t vgi __attribute__((vector_size({4 * entries * self.group})));",
            f"#define LANES {entries}",
            f"#define GLANES {entries * self.group}",
            f"#define GROUP {self.group}",
            f"#define ROW {lanes}",
            f"#define INPUTS {self.layer_inputs}",
            f"#define KERNELS {self.kernels}",
            f"#define WIDTH {self.width}",
            f"#define CHANNELS {self.channels}",
            f"#define PARAMETERS {self.parameters}",
            f"#define BLOCK {max(64, entries)}",
            C_HELPERS,
            c_reciprocal("vf", 4 * entries),
            c_widened(C_HELPERS),
            c_reciprocal("vg", 4 * entries * self.group).replace("reciprocal", "reciprocal_g"),
            "\n".join(slope),
            c_widened("\n".join(slope)).replace("act_slope", "act_slope_g"),
            *self._mlp(),
            _MAIN,
            c_parallel_driver(
                "vcnn_train_forward", "forward_part",
                "int64_t n, int64_t stride, const int32_t* rows, const float* x, "
                "const float* weight, const float* channels, const float* params, "
                "const float* table, float* sums",
                "n, stride, rows, x, weight, channels, params, table, sums",
            ),
            c_parallel_driver(
                "vcnn_train_backward", "backward_part",
                "int64_t n, int64_t stride, const int32_t* rows, const float* x, "
                "const float* weight, const float* channels, const float* params, "
                "const float* table, const float* grad, float* grad_params, float* grad_table, "
                "int64_t table_size",
                "n, stride, rows, x, weight, channels, params, table, grad, grad_params, "
                "grad_table, table_size",
            ),
        ]
        return "\n".join(lines) + "\n"

    def _mlp(self) -> list[str]:
        """MLP forward (keeping inputs and slopes of every layer) and backward on one vector."""
        forward = c_mlp_forward(self, slopes=True)
        backward = []
        blocks = mlp_layers(self)
        # backward: d{index} is the gradient of layer index's output
        for index, previous, size, width, weights, bias, _ in reversed(blocks):
            backward += [
                f"  for (int j = 0; j < {width}; ++j) {{",
                f"    const vf dz = d{index}[j] * s{index}[j];",
                f"    grads[{bias} + j] += dz;",
                f'    _Pragma("GCC unroll 64") for (int i = 0; i < {size}; ++i)',
                f"      grads[{weights} + j * {size} + i] += dz * {previous}[i];",
                "  }",
            ]
            if index > 0:
                kind = self.residual[index]
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
        declarations = [f"  vf h{i}[{w}], s{i}[{w}], d{i}[{w}];" for i, w in enumerate(self.layers)]
        last = len(self.layers) - 1
        return [
            "#define MLP_STATE \\",
            *[line + " \\" for line in declarations],
            "  (void)0",
            "#define MLP_FORWARD(x) do { \\",
            *[line + " \\" for line in forward],
            "} while (0)",
            f"#define MLP_OUT h{last}",
            f"#define MLP_DOUT d{last}",
            "#define MLP_BACKWARD(x) do { \\",
            *[line + " \\" for line in backward],
            "} while (0)",
        ]


def pair_pooled_sums(
    mlp: nn.Module,
    activation: str,
    inputs: torch.Tensor,
    table: torch.Tensor,
    rows: torch.Tensor,
    weight: torch.Tensor,
    channels: torch.Tensor,
) -> torch.Tensor:
    """Pair kernels ``1 + mlp(inputs)`` and the pooled sums (module docstring), in C.

    Args:
        mlp: the pair kernels' MLP (:class:`vcnn.network.MLP`).
        activation: its activation's name.
        inputs: (B, n, p) float pair-kernel inputs (data: no gradient).
        table: (U, K, W) float point embedding A, kernel by kernel.
        rows: (B, n) int rows of ``table``.
        weight: (B, n) float normalised pooling weights (0 at padding).
        channels: (B, n, C - 1) float channels besides the constant one: the point vectors'
            components, then the position channel's.

    Returns:
        (B, K, C, W) float sums, differentiable in the MLP's parameters and ``table``.

    Raises:
        KernelUnavailable: not float32 on the CPU, or the kernel cannot be built; the caller
            then computes the same sums with torch operations.
    """
    tensors = (inputs, table, weight, channels)
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) or not all(
        p.dtype == torch.float32 for p in mlp.parameters()
    ):
        raise KernelUnavailable("the training kernel runs on float32 CPU tensors only")
    shape = _Shape.build(
        mlp, width=table.shape[-1], channels=channels.shape[-1] + 1, activation=activation
    )
    library = compiled_library(_source(shape))
    parameters = torch.cat(
        [t.reshape(-1) for layer in mlp.layers for t in (layer.weight, layer.bias)]
    )
    return _PairPooledSums.apply(parameters, table, inputs, rows, weight, channels, (shape, library))


@functools.lru_cache(maxsize=64)
def _source(shape: _Shape) -> str:
    # generating the source takes about a millisecond: once per shape, not once per step
    return shape.source()


def _component_major(values: torch.Tensor, lanes: int) -> torch.Tensor:
    """(B, n, c) -> (c, B n + lanes) contiguous, zero-padded: whole vectors can be read."""
    flat = values.reshape(-1, values.shape[-1]).T
    return torch.nn.functional.pad(flat, (0, lanes)).contiguous()


class _PairPooledSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, parameters, table, inputs, rows, weight, channels, compiled):
        shape, library = compiled
        batch, count = rows.shape
        if inputs.shape != (batch, count, shape.layer_inputs) or weight.shape != (batch, count):
            raise ValueError("pair pooled sums: inputs, rows and weight disagree in shape")
        if channels.shape != (batch, count, shape.channels - 1):
            raise ValueError("pair pooled sums: channels disagree in shape")
        if table.shape[1:] != (shape.kernels, shape.width):
            raise ValueError("pair pooled sums: the table is not (U, kernels, width)")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= table.shape[0]):
            raise ValueError("pair pooled sums: a row is outside the table")
        lanes = shape.entry_lanes
        parameters, table = parameters.detach().contiguous(), table.detach().contiguous()
        x = _component_major(inputs.detach(), lanes)
        ch = _component_major(channels.detach(), lanes)
        w = torch.nn.functional.pad(weight.detach().reshape(-1), (0, lanes)).contiguous()
        rows32 = torch.nn.functional.pad(rows.reshape(-1).to(torch.int32), (0, lanes)).contiguous()
        sums = torch.empty(batch, shape.kernels, shape.channels, shape.width)
        function = library.vcnn_train_forward
        function.argtypes = [ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 7
        bounds = even_parts(batch)
        function(
            bounds.numel() - 1, bounds.data_ptr(), count, w.numel(),
            *[t.data_ptr() for t in (rows32, x, w, ch, parameters, table, sums)],
        )
        ctx.save_for_backward(parameters, table, x, rows32, w, ch)
        ctx.compiled, ctx.count, ctx.batch = compiled, count, batch
        return sums

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        parameters, table, x, rows32, w, ch = ctx.saved_tensors
        shape, library = ctx.compiled
        grad = grad.contiguous()
        bounds = even_parts(ctx.batch)
        parts = bounds.numel() - 1
        # per part: entries of different clouds share rows of the table
        grad_parameters = torch.zeros(parts, parameters.numel())
        grad_tables = torch.zeros(parts, *table.shape)
        function = library.vcnn_train_backward
        function.argtypes = (
            [ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 9
            + [ctypes.c_int64]
        )
        function(
            parts, bounds.data_ptr(), ctx.count, w.numel(),
            *[t.data_ptr() for t in (rows32, x, w, ch, parameters, table, grad, grad_parameters,
                                     grad_tables)],
            table.numel(),
        )
        if parts > 1:
            grad_parameters, grad_tables = grad_parameters.sum(0), grad_tables.sum(0)
        else:
            grad_parameters, grad_tables = grad_parameters[0], grad_tables[0]
        return grad_parameters, grad_tables, None, None, None, None, None


_MAIN = r"""
/* The entries e..e+LANES-1 (component-major, row stride `stride`): the MLP's inputs, the other
   channels, and the pooling weight, 0 past the cloud's end. */
static inline vf load_entries(const float* x, const float* channels, const float* weight,
                              int64_t stride, int64_t e, int64_t end, vf lane, vf* xin,
                              vf* extra) {
  const vf zero = {};
  for (int i = 0; i < INPUTS; ++i) xin[i] = *(const vfu*)(x + i * stride + e);
  for (int c = 0; c < CHANNELS - 1; ++c) extra[c] = *(const vfu*)(channels + c * stride + e);
  return blend(lane < (float)(end - e), *(const vfu*)(weight + e), zero);
}

/* Forward: sums[b] of the clouds first..last-1 (n entries each, from entry b n). */
static int forward_part(int64_t first, int64_t last, int64_t part, int64_t n, int64_t stride,
                        const int32_t* rows, const float* x, const float* weight,
                        const float* channels, const float* params, const float* table,
                        float* sums) {
  (void)part;
  const vf zero = {};
  vf lane;
  for (int b = 0; b < LANES; ++b) lane[b] = (float)b;
  float scaled[KERNELS][CHANNELS][BLOCK] __attribute__((aligned(64)));
  for (int64_t b = first; b < last; ++b) {
    const int64_t begin = b * n, end = begin + n;
    vr acc[KERNELS][CHANNELS][WIDTH / ROW];
    memset(acc, 0, sizeof acc);
    for (int64_t block = begin; block < end; block += BLOCK) {
      const int64_t size = end - block < BLOCK ? end - block : BLOCK;
      for (int64_t v = 0; v < size; v += LANES) {
        const int64_t e = block + v;
        vf xin[INPUTS], extra[CHANNELS - 1];
        const vf w = load_entries(x, channels, weight, stride, e, end, lane, xin, extra);
        MLP_STATE;
        MLP_FORWARD(xin);
        for (int k = 0; k < KERNELS; ++k) {
          const vf s = w + w * MLP_OUT[k];
          *(vfu*)(scaled[k][0] + v) = s;
          for (int c = 1; c < CHANNELS; ++c) *(vfu*)(scaled[k][c] + v) = s * extra[c - 1];
        }
      }
      for (int k = 0; k < KERNELS; ++k) {
        vr even[CHANNELS][WIDTH / ROW], odd[CHANNELS][WIDTH / ROW];
        memcpy(even, acc[k], sizeof even);
        memset(odd, 0, sizeof odd);
        const int32_t* r = rows + block;
        int64_t v = 0;
        for (; v + 1 < size; v += 2) {
          const vru* a0 = (const vru*)(table + ((int64_t)r[v] * KERNELS + k) * WIDTH);
          const vru* a1 = (const vru*)(table + ((int64_t)r[v + 1] * KERNELS + k) * WIDTH);
          for (int j = 0; j < WIDTH / ROW; ++j) {
            const vr p = a0[j], q = a1[j];
            for (int c = 0; c < CHANNELS; ++c) {
              even[c][j] += scaled[k][c][v] * p;
              odd[c][j] += scaled[k][c][v + 1] * q;
            }
          }
        }
        if (v < size) {
          const vru* a0 = (const vru*)(table + ((int64_t)r[v] * KERNELS + k) * WIDTH);
          for (int j = 0; j < WIDTH / ROW; ++j)
            for (int c = 0; c < CHANNELS; ++c) even[c][j] += scaled[k][c][v] * a0[j];
        }
        for (int c = 0; c < CHANNELS; ++c)
          for (int j = 0; j < WIDTH / ROW; ++j) acc[k][c][j] = even[c][j] + odd[c][j];
      }
    }
    memcpy(sums + b * KERNELS * CHANNELS * WIDTH, acc, sizeof acc);
  }
  return 0;
}

/* Backward: gradients of the MLP's parameters and of the table from the clouds first..last-1,
   added into this part's own grad_params and grad_table. */
static int backward_part(int64_t first, int64_t last, int64_t part, int64_t n, int64_t stride,
                         const int32_t* rows, const float* x, const float* weight,
                         const float* channels, const float* params, const float* table,
                         const float* grad, float* grad_params, float* grad_table,
                         int64_t table_size) {
  grad_params += part * PARAMETERS;
  grad_table += part * table_size;
  const vf zero = {};
  vf lane;
  for (int b = 0; b < LANES; ++b) lane[b] = (float)b;
  vf grads[PARAMETERS];
  for (int p = 0; p < PARAMETERS; ++p) grads[p] = zero;
  for (int64_t b = first; b < last; ++b) {
    const int64_t begin = b * n, end = begin + n;
    const vru* g = (const vru*)(grad + b * KERNELS * CHANNELS * WIDTH);
    for (int64_t e = begin; e < end; e += LANES) {
      vf xin[INPUTS], extra[CHANNELS - 1];
      const vf w = load_entries(x, channels, weight, stride, e, end, lane, xin, extra);
      MLP_STATE;
      MLP_FORWARD(xin);
      for (int k = 0; k < KERNELS; ++k) MLP_DOUT[k] = zero;
      const int valid = end - e < LANES ? (int)(end - e) : LANES;
      for (int l = 0; l < valid; ++l) {
        if (w[l] == 0.0f) continue;
        float placed[CHANNELS];
        placed[0] = w[l];
        for (int c = 1; c < CHANNELS; ++c) placed[c] = w[l] * extra[c - 1][l];
        const int64_t offset = (int64_t)rows[e + l] * KERNELS * WIDTH;
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
          float total = 0.0f;
          for (int r = 0; r < ROW; ++r) total += dot[r];
          MLP_DOUT[k][l] = total;
        }
      }
      MLP_BACKWARD(xin);
    }
  }
  for (int p = 0; p < PARAMETERS; ++p) {
    float total = 0.0f;
    for (int l = 0; l < LANES; ++l) total += grads[p][l];
    grad_params[p] += total;
  }
  return 0;
}
"""
