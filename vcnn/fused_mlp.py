"""An MLP on rows (the point embedding of a factorised net), forward and backward, in C.

The point embedding of a factorised net (:meth:`vcnn.network.VectorCloudNet.embed_points`) is
an MLP of a few point scalars to m channels, evaluated on every distinct point of a training
batch (about ten thousand per step). With torch operations each layer is a matrix product and
two or three elementwise passes (bias, activation, residual) over freshly allocated
(rows, width) tensors, forward and again backward: on two cores this took more time than the
products themselves.

:func:`mlp_rows` runs the forward as one generated C loop over tiles of rows: per tile a
register-blocked product (outputs in SIMD lanes, a few rows at a time), then activation, its
slope and the residual in registers, and the rows stored once. The backward's input gradients
run the same way from the stored slopes; the weight gradients, products over all rows, are
BLAS matrix products (``torch.mm``), which run them near the machine's peak. Same arithmetic
as :class:`vcnn.network.MLP` up to float32 round-off; ``tests/test_fused_mlp.py`` compares them.
It runs for float32 CPU tensors when the kernel can be built (:mod:`vcnn.kernels`); otherwise
:class:`KernelUnavailable` says why and the caller runs the module.
"""

from __future__ import annotations

import ctypes
import functools
import re
from dataclasses import dataclass

import torch
from torch import nn

from vcnn.kernels import (
    C_HELPERS,
    C_INCLUDES,
    KernelUnavailable,
    MlpShape,
    c_activation_slope,
    c_parallel_driver,
    c_reciprocal,
    compiled_library,
    even_parts,
    mlp_layers,
)

__all__ = ["mlp_rows"]

#: Rows per register block and the widest SIMD vector along a layer's outputs: four rows of a
#: 64-wide layer hold 16 vectors of sums, leaving registers for the weights. Measured on the
#: default embedding (3-32-64-64, 10,500 rows, 2-core AMD EPYC): forward and backward 5.6-6.2 ms
#: with 16 lanes and 4 rows, 6.9-9.8 ms with 8 lanes and 2-3 rows, torch 6.6-8.8 ms.
_ROWS_PER_BLOCK = 4
_MAX_LANES = 16



@dataclass(frozen=True)
class _RowShape(MlpShape):
    """The MLP's shape and the SIMD width along a layer's outputs."""

    lanes: int

    @classmethod
    def build(cls, mlp: nn.Module, activation: str) -> _RowShape:
        shape = MlpShape.of(mlp, activation)
        # every vector load stays inside a row: the lanes divide every width a load reads
        widths = (*shape.layers, *((shape.layer_inputs,) if shape.residual[0] else ()))
        lanes = next(
            lanes for lanes in (16, 8, 4, 2, 1) if lanes <= _MAX_LANES and all(w % lanes == 0 for w in widths)
        )
        return cls(lanes=lanes, **shape.fields())


def mlp_rows(mlp: nn.Module, activation: str, x: torch.Tensor) -> torch.Tensor:
    """``mlp(x)`` for an :class:`vcnn.network.MLP` on rows, in C (module docstring).

    Args:
        mlp: the MLP (float32 parameters).
        activation: its activation's name.
        x: (R, in_features) float32 CPU rows (data: no gradient).

    Returns:
        (R, out_features) float32, differentiable in the MLP's parameters.

    Raises:
        KernelUnavailable: not float32 CPU tensors, an input that needs a gradient, or no
            kernel can be built; the caller then runs ``mlp(x)``.
    """
    parameters = [t for layer in mlp.layers for t in (layer.weight, layer.bias)]
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2 or any(
        p.dtype != torch.float32 or p.device.type != "cpu" for p in parameters
    ):
        raise KernelUnavailable("the row MLP kernel runs on 2-D float32 CPU tensors only")
    if x.requires_grad:
        raise KernelUnavailable("the row MLP kernel gives no gradient of its input")
    shape = _RowShape.build(mlp, activation)
    library = compiled_library(_source(shape), symbols=("vcnn_rows_forward", "vcnn_rows_backward"))
    # (inside the Function's forward, gradients are always off: decide here)
    keep = torch.is_grad_enabled() and any(p.requires_grad for p in parameters)
    return _RowMlp.apply(x.contiguous(), (shape, library, keep), *parameters)


class _RowMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, compiled, *parameters):
        shape, library, keep = compiled
        rows = x.shape[0]
        layers = mlp_layers(shape)
        flat = torch.cat([p.detach().reshape(-1) for p in parameters])
        # the same layout with each weight transposed (in, out): a row of it holds one vector
        # per group of output lanes
        transposed = torch.cat(
            [(p.detach().T if p.dim() == 2 else p.detach()).reshape(-1) for p in parameters]
        )
        outputs = [torch.empty(rows, width) for width in shape.layers]
        slopes = [torch.empty(rows, width) for width in shape.layers] if keep else []
        function = library.vcnn_rows_forward
        function.argtypes = [ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_void_p] * (
            3 + 2 * len(layers)
        )
        bounds = even_parts(rows)
        function(
            bounds.numel() - 1, bounds.data_ptr(), x.data_ptr(), flat.data_ptr(),
            transposed.data_ptr(),
            *[t.data_ptr() for t in outputs],
            *([t.data_ptr() for t in slopes] if keep else [None] * len(layers)),
        )
        if keep:
            ctx.save_for_backward(x, flat, *outputs[:-1], *slopes)
            ctx.compiled = compiled
        return outputs[-1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        shape, library, _ = ctx.compiled
        count = len(shape.layers)
        x, flat, *saved = ctx.saved_tensors
        hidden, slopes = saved[: count - 1], saved[count - 1 :]
        rows = x.shape[0]
        # the gradients of the layers' pre-activations, from the C backward
        pre = [torch.empty(rows, width) for width in shape.layers]
        function = library.vcnn_rows_backward
        function.argtypes = [ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_void_p] * (
            2 + 2 * count
        )
        bounds, grad = even_parts(rows), grad.contiguous()
        function(
            bounds.numel() - 1, bounds.data_ptr(), flat.data_ptr(), grad.data_ptr(),
            *[t.data_ptr() for t in slopes], *[t.data_ptr() for t in pre],
        )
        inputs = [x, *hidden]
        grads = []
        for index in range(count):
            grads += [torch.mm(pre[index].T, inputs[index]), pre[index].sum(0)]
        return None, None, *grads


@functools.lru_cache(maxsize=32)
def _source(shape: _RowShape) -> str:
    lanes = shape.lanes
    layers = mlp_layers(shape)
    count = len(layers)
    lines = [
        *C_INCLUDES,
        f"typedef float vo __attribute__((vector_size({4 * lanes})));",
        f"typedef float vou __attribute__((vector_size({4 * lanes}), aligned(4)));",
        f"typedef int32_t voi __attribute__((vector_size({4 * lanes})));",
        f"#define LANES {lanes}",
        f"#define P {_ROWS_PER_BLOCK}",
        re.sub(r"\bvf\b", "vo", re.sub(r"\bvi\b", "voi", C_HELPERS)),
        c_reciprocal("vo", 4 * lanes),
        c_activation_slope(shape.activation, vector="vo"),
    ]
    # forward: per layer, rows r..r+p-1 (p <= P) from `in` to `out` (and `slope`)
    for index, _, size, width, weights, bias, activated in layers:
        kind = shape.residual[index]
        vectors = width // lanes
        lines += [
            f"static inline void forward{index}(int p, const float* in, const float* params,",
            "                                 const float* wt, float* out, float* slope) {",
            "  const vo zero = {};",
            "  (void)zero;",
            f"  vo acc[P][{vectors}];",
            f"  const vou* b = (const vou*)(params + {bias});",
            f"  for (int r = 0; r < P; ++r) for (int v = 0; v < {vectors}; ++v) acc[r][v] = b[v];",
            f'  _Pragma("GCC unroll 4") for (int i = 0; i < {size}; ++i) {{',
            f"    const vou* w = (const vou*)(wt + {weights} + i * {width});",
            "    for (int r = 0; r < P; ++r) {",
            f"      const float h = r < p ? in[r * {size} + i] : 0.0f;",
            f"      for (int v = 0; v < {vectors}; ++v) acc[r][v] += h * w[v];",
            "    }",
            "  }",
            "  for (int r = 0; r < p; ++r) {",
            f"    for (int v = 0; v < {vectors}; ++v) {{",
            "      vo y = acc[r][v], s = zero + 1.0f;",
        ]
        if activated:
            lines.append("      y = act_slope(y, &s);")
        if kind == 1:
            lines.append(f"      y += *(const vou*)(in + r * {size} + v * LANES);")
        elif kind == 2:
            lines.append(f"      y += *(const vou*)(in + r * {size} + (v * LANES) % {size});")
        lines += [
            f"      *(vou*)(out + r * {width} + v * LANES) = y;",
            f"      if (slope) *(vou*)(slope + r * {width} + v * LANES) = s;",
            "    }",
            "  }",
            "}",
        ]
    # backward: per layer, the pre-activation gradient dz = d * slope (stored) and the
    # gradient of the layer's input d_in = dz W (+ the residual's d)
    for index, _, size, width, weights, _, _ in layers:
        kind = shape.residual[index]
        in_vectors = size // lanes if size % lanes == 0 else 0
        lines += [
            f"static inline void backward{index}(int p, const float* d, const float* slope,",
            "                                  const float* params, float* dz, float* d_in) {",
            "  const vo zero = {};",
            "  (void)zero;",
            "  for (int r = 0; r < p; ++r)",
            f"    for (int v = 0; v < {width // lanes}; ++v)",
            f"      *(vou*)(dz + r * {width} + v * LANES) =",
            f"          *(const vou*)(d + r * {width} + v * LANES) * *(const vou*)(slope + r * {width} + v * LANES);",
        ]
        if index > 0:
            if in_vectors:
                lines += [
                    f"  vo acc[P][{in_vectors}];",
                    f"  for (int r = 0; r < P; ++r) for (int v = 0; v < {in_vectors}; ++v) acc[r][v] = zero;",
                    f'  _Pragma("GCC unroll 4") for (int j = 0; j < {width}; ++j) {{',
                    f"    const vou* w = (const vou*)(params + {weights} + j * {size});",
                    "    for (int r = 0; r < P; ++r) {",
                    f"      const float g = r < p ? dz[r * {width} + j] : 0.0f;",
                    f"      for (int v = 0; v < {in_vectors}; ++v) acc[r][v] += g * w[v];",
                    "    }",
                    "  }",
                    f"  for (int r = 0; r < p; ++r) for (int v = 0; v < {in_vectors}; ++v)",
                    f"    *(vou*)(d_in + r * {size} + v * LANES) = acc[r][v];",
                ]
            else:
                lines += [
                    "  for (int r = 0; r < p; ++r)",
                    f"    for (int i = 0; i < {size}; ++i) {{",
                    "      float sum = 0.0f;",
                    f"      for (int j = 0; j < {width}; ++j) sum += dz[r * {width} + j] * params[{weights} + j * {size} + i];",
                    f"      d_in[r * {size} + i] = sum;",
                    "    }",
                ]
            if kind == 1:
                lines.append(
                    f"  for (int r = 0; r < p; ++r) for (int i = 0; i < {size}; ++i) "
                    f"d_in[r * {size} + i] += d[r * {width} + i];"
                )
            elif kind == 2:
                lines.append(
                    f"  for (int r = 0; r < p; ++r) for (int j = 0; j < {width}; ++j) "
                    f"d_in[r * {size} + j % {size}] += d[r * {width} + j];"
                )
        lines.append("}")
    outs = ", ".join(f"float* out{i}" for i in range(count))
    slopes = ", ".join(f"float* slope{i}" for i in range(count))
    forward_calls = []
    for index, _, size, width, _, _, _ in layers:
        source = "x" if index == 0 else f"out{index - 1}"
        source_width = size
        forward_calls.append(
            f"    forward{index}(p, {source} + r * {source_width}, params, wt, out{index} + r * {width}, "
            f"slope{index} ? slope{index} + r * {width} : 0);"
        )
    lines += _c_row_blocks(
        "forward_part", f"const float* x, const float* params, const float* wt, {outs}, {slopes}",
        [], forward_calls,
    )
    dzs = ", ".join(f"float* dz{i}" for i in range(count))
    slope_args = ", ".join(f"const float* slope{i}" for i in range(count))
    widest = max((shape.layer_inputs, *shape.layers))
    backward_calls = []
    for index, _, size, width, _, _, _ in reversed(layers):
        source = "grad + r * " + str(width) if index == count - 1 else f"d{index}"
        target = f"d{index - 1}" if index > 0 else "0"
        backward_calls.append(
            f"    backward{index}(p, {source}, slope{index} + r * {width}, params, "
            f"dz{index} + r * {width}, {target});"
        )
    lines += _c_row_blocks(
        "backward_part", f"const float* params, const float* grad, {slope_args}, {dzs}",
        [f"  float d{i}[P * {widest}];" for i in range(count - 1)], backward_calls,
    )
    lines += [
        c_parallel_driver(
            "vcnn_rows_forward", "forward_part",
            f"const float* x, const float* params, const float* wt, {outs}, {slopes}",
            "x, params, wt, " + ", ".join(f"out{i}" for i in range(count)) + ", "
            + ", ".join(f"slope{i}" for i in range(count)),
        ),
        c_parallel_driver(
            "vcnn_rows_backward", "backward_part",
            f"const float* params, const float* grad, {slope_args}, {dzs}",
            "params, grad, " + ", ".join(f"slope{i}" for i in range(count)) + ", "
            + ", ".join(f"dz{i}" for i in range(count)),
        ),
    ]
    return "\n".join(lines) + "\n"


def _c_row_blocks(name: str, parameters: str, locals_: list[str], calls: list[str]) -> list[str]:
    """C part function ``name`` for rows first..last-1: ``calls`` on each block of p <= P rows."""
    return [
        f"static int {name}(int64_t first, int64_t last, int64_t part, {parameters}) {{",
        "  (void)part;",
        *locals_,
        "  for (int64_t r = first; r < last; r += P) {",
        "    const int p = last - r < P ? (int)(last - r) : P;",
        *calls,
        "  }",
        "  return 0;",
        "}",
    ]
