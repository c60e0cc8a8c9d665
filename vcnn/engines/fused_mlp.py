"""An MLP on rows (the point embedding of a factorised net), forward and backward, in C.

The point embedding of a factorised net (:meth:`vcnn.network.VectorCloudNet.embed_points`) is
an MLP of a few point scalars to m channels, evaluated on every distinct point of a training
batch (about ten thousand per step). With torch operations each layer is a matrix product and
two or three elementwise passes (bias, activation, residual) over freshly allocated
(rows, width) tensors, forward and again backward: on two cores this took more time than the
products themselves.

:func:`mlp_rows` runs the forward as one C loop (``vcnn/engines/csrc/mlp_rows.c``) over tiles of rows: per tile a
register-blocked product (outputs in SIMD lanes, a few rows at a time), then activation, its
slope and the residual in registers, and the rows stored once. The backward's input gradients
run the same way from the stored slopes; the weight gradients, products over all rows, are
BLAS matrix products (``torch.mm``), which run them near the machine's peak. Same arithmetic
as :class:`vcnn.network.MLP` up to float32 round-off; ``tests/test_fused_mlp.py`` compares them.
It runs for float32 CPU tensors when the kernel can be built (:mod:`vcnn.engines.kernels`); otherwise
:class:`KernelUnavailable` says why and the caller runs the module.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import nn

from vcnn.engines.kernels import (
    KernelUnavailable,
    MlpShape,
    activation_define,
    bind,
    c_source,
    compiled_library,
    even_parts,
    mlp_layer_defines,
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
        flat = torch.cat([p.detach().reshape(-1) for p in parameters])
        # the same layout with each weight transposed (in, out): a row of it holds one vector
        # per group of output lanes
        transposed = torch.cat(
            [(p.detach().T if p.dim() == 2 else p.detach()).reshape(-1) for p in parameters]
        )
        outputs = [torch.empty(rows, width) for width in shape.layers]
        slopes = [torch.empty(rows, width) for width in shape.layers] if keep else []
        bounds = even_parts(rows)
        bind(library, "vcnn_rows_forward")(
            bounds.numel() - 1, bounds.data_ptr(), x.data_ptr(), flat.data_ptr(),
            transposed.data_ptr(), _pointers(outputs), _pointers(slopes) if keep else None,
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
        bounds, grad = even_parts(rows), grad.contiguous()
        bind(library, "vcnn_rows_backward")(
            bounds.numel() - 1, bounds.data_ptr(), flat.data_ptr(), grad.data_ptr(),
            _pointers(slopes), _pointers(pre),
        )
        inputs = [x, *hidden]
        grads = []
        for index in range(count):
            grads += [torch.mm(pre[index].T, inputs[index]), pre[index].sum(0)]
        return None, None, *grads


def _pointers(tensors: list[torch.Tensor]) -> ctypes.Array:
    """A C array of the tensors' data pointers (``float* const*``)."""
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _source(shape: _RowShape) -> str:
    """The C source of the row kernel for one shape (``mlp_rows.c``)."""
    return c_source(
        "mlp_rows.c",
        {
            "LANES": shape.lanes,
            "P": _ROWS_PER_BLOCK,
            activation_define(shape.activation): None,
            **mlp_layer_defines(shape),
        },
    )
