"""The pooled moments of a factorised net in one fused kernel (Triton), with a torch fallback.

For a factorised net, entry e of cloud q (table row i_e) contributes
``G[e, a] = A[i_e, a] coef[e, k(a)]`` (A the point embedding, coef the pooling weight times the
pair kernel k(a) of channel a) times each channel value ``ch[e, c]`` (a constant 1, the point
vectors' components, the position channel's components). The pooled moments are

    S[q, c, a] = sum_{e in q} ch[e, c] A[i_e, a] coef[e, k(a)].

In torch this is a gather of A per entry ((E, m) in memory), a product and a segmented sum:
three passes over E x m values and many small kernels. :func:`pooled_moments` runs it as one
Triton kernel where Triton runs (a CUDA device, or CPU tensors under ``TRITON_INTERPRET=1``):
one program per cloud reads A rows by index and accumulates the (C, m) moments in registers,
so G is never stored. Elsewhere the torch form runs (same values to round-off).

Gradients: :class:`PooledMoments` recomputes G in torch in its backward (the kernel is the
forward only), so the fused forward serves training too and agrees with the reference's
gradients.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["PooledMoments", "pooled_moments", "pooled_moments_torch", "triton_runs"]

#: Entries per block of the fused kernel.
_BLOCK_ENTRIES = 32


def _interpreting() -> bool:
    """Whether Triton runs its interpreter (``TRITON_INTERPRET=1``), read at call time."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs(device: torch.device) -> str | None:
    """Why the fused kernel cannot run on ``device``, or None.

    It runs on CUDA devices where Triton is importable, and on CPU tensors under Triton's
    interpreter (``TRITON_INTERPRET=1``: slow, for tests).
    """
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _interpreting():
        return _interpreter_unready()
    return f"triton does not run on {device.type} tensors (set TRITON_INTERPRET=1 to test on the CPU)"


def _interpreter_unready() -> str | None:
    """Why Triton's interpreter cannot run here, or None.

    ``triton.language`` decides at its import whether its library functions (``tl.sum``, ...)
    are interpreted: imported before ``TRITON_INTERPRET=1`` was set (by torch, for example),
    a kernel calling them fails inside the interpreter.
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(tl.sum, InterpretedFunction):
        return None
    return (
        "triton.language was imported before TRITON_INTERPRET=1 was set: set it before "
        "Python starts"
    )


@functools.cache
def _kernel(interpreted: bool):
    """The Triton kernel, built on first use (the interpreter flag is read when it is built)."""
    del interpreted  # part of the cache key only: triton.jit reads TRITON_INTERPRET itself
    import triton
    import triton.language as tl

    @triton.jit
    def pooled_moments_kernel(
        coef_ptr,  # (E, K)
        channel_ptr,  # (E, C)
        row_ptr,  # (E,) int64
        table_ptr,  # (N, M)
        offset_ptr,  # (Q + 1,) int64
        out_ptr,  # (Q, C, M)
        K: tl.constexpr,
        C: tl.constexpr,
        M: tl.constexpr,
        WIDTH: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        cloud = tl.program_id(0)
        start = tl.load(offset_ptr + cloud)
        stop = tl.load(offset_ptr + cloud + 1)
        columns = tl.arange(0, BLOCK_M)
        column_ok = columns < M
        kernel_of = columns // WIDTH
        channels = tl.arange(0, BLOCK_C)
        channel_ok = channels < C
        accumulator = tl.zeros((BLOCK_C, BLOCK_M), dtype=table_ptr.dtype.element_ty)
        for base in range(start, stop, BLOCK_E):
            entries = base + tl.arange(0, BLOCK_E)
            entry_ok = entries < stop
            rows = tl.load(row_ptr + entries, mask=entry_ok, other=0)
            both = entry_ok[:, None] & column_ok[None, :]
            embedded = tl.load(table_ptr + rows[:, None] * M + columns[None, :], mask=both, other=0.0)
            coefficient = tl.load(coef_ptr + entries[:, None] * K + kernel_of[None, :], mask=both, other=0.0)
            product = embedded * coefficient  # (BLOCK_E, BLOCK_M): G of the block
            value = tl.load(
                channel_ptr + entries[:, None] * C + channels[None, :],
                mask=entry_ok[:, None] & channel_ok[None, :],
                other=0.0,
            )  # (BLOCK_E, BLOCK_C)
            accumulator += tl.sum(value[:, :, None] * product[:, None, :], axis=0)
        tl.store(
            out_ptr + cloud * C * M + channels[:, None] * M + columns[None, :],
            accumulator,
            mask=channel_ok[:, None] & column_ok[None, :],
        )

    return pooled_moments_kernel


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is, else float32 (bf16 inputs are accumulated in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def pooled_moments_torch(
    coef: torch.Tensor,
    channels: torch.Tensor,
    rows: torch.Tensor,
    table: torch.Tensor,
    offsets: torch.Tensor,
) -> torch.Tensor:
    """The pooled moments by torch operations (see :func:`pooled_moments`; differentiable)."""
    kernels, width = coef.shape[1], table.shape[1] // coef.shape[1]
    dtype = _compute_dtype(coef, channels, table)
    count = offsets.numel() - 1
    sizes = torch.diff(offsets)
    # output_size: the entry count is known, so the device is not waited for
    entry_cloud = torch.repeat_interleave(
        torch.arange(count, device=rows.device), sizes, output_size=rows.numel()
    )
    embedded = table.to(dtype).index_select(0, rows)  # (E, m)
    product = embedded * coef.to(dtype).repeat_interleave(width, dim=1)  # (E, m)
    terms = channels.to(dtype)[:, :, None] * product[:, None, :]  # (E, C, m)
    out = torch.zeros((count, channels.shape[1], kernels * width), dtype=dtype, device=rows.device)
    return out.index_add(0, entry_cloud, terms)


def _fused_forward(
    coef: torch.Tensor,
    channels: torch.Tensor,
    rows: torch.Tensor,
    table: torch.Tensor,
    offsets: torch.Tensor,
) -> torch.Tensor:
    import triton

    dtype = _compute_dtype(coef, channels, table)
    coef, channels, table = (t.to(dtype).contiguous() for t in (coef, channels, table))
    rows = rows.to(torch.int64).contiguous()
    offsets = offsets.to(torch.int64).contiguous()
    count, width_all = offsets.numel() - 1, table.shape[1]
    kernels, channel_count = coef.shape[1], channels.shape[1]
    out = torch.empty((count, channel_count, width_all), dtype=dtype, device=table.device)
    if count == 0:
        return out
    _kernel(_interpreting())[(count,)](
        coef, channels, rows, table, offsets, out,
        K=kernels, C=channel_count, M=width_all, WIDTH=width_all // kernels,
        BLOCK_E=_BLOCK_ENTRIES,
        BLOCK_C=triton.next_power_of_2(channel_count),
        BLOCK_M=triton.next_power_of_2(width_all),
    )
    return out


class PooledMoments(torch.autograd.Function):
    """The fused kernel forward, a torch recomputation backward (module docstring)."""

    @staticmethod
    def forward(ctx, coef, channels, rows, table, offsets):  # noqa: D102 - see the class
        ctx.save_for_backward(coef, channels, rows, table, offsets)
        return _fused_forward(coef, channels, rows, table, offsets)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102 - see the class
        coef, channels, rows, table, offsets = ctx.saved_tensors
        kernels, width = coef.shape[1], table.shape[1] // coef.shape[1]
        sizes = torch.diff(offsets)
        entry_cloud = torch.repeat_interleave(
            torch.arange(offsets.numel() - 1, device=rows.device), sizes, output_size=rows.numel()
        )
        grad_entry = grad_out.index_select(0, entry_cloud)  # (E, C, m)
        grad_product = (grad_entry * channels.to(grad_out.dtype)[:, :, None]).sum(1)  # (E, m)
        embedded = table.to(grad_out.dtype).index_select(0, rows)  # (E, m)
        expanded = coef.to(grad_out.dtype).repeat_interleave(width, dim=1)  # (E, m)
        grad_coef = grad_channels = grad_table = None
        if ctx.needs_input_grad[0]:
            grad_coef = (grad_product * embedded).reshape(-1, kernels, width).sum(-1)
            grad_coef = grad_coef.to(coef.dtype)
        if ctx.needs_input_grad[1]:
            grad_channels = (grad_entry * (embedded * expanded)[:, None, :]).sum(-1)
            grad_channels = grad_channels.to(channels.dtype)
        if ctx.needs_input_grad[3]:
            grad_table = torch.zeros_like(table, dtype=grad_out.dtype).index_add(
                0, rows, grad_product * expanded
            ).to(table.dtype)
        return grad_coef, grad_channels, None, grad_table, None


def pooled_moments(
    coef: torch.Tensor,
    channels: torch.Tensor,
    rows: torch.Tensor,
    table: torch.Tensor,
    offsets: torch.Tensor,
    *,
    fused: bool | None = None,
) -> torch.Tensor:
    """Pooled moments ``S[q, c, a] = sum_{e in q} ch[e, c] A[i_e, a] coef[e, k(a)]``.

    Args:
        coef: (E, K) float per-entry factor of each pair kernel (pooling weight times kernel).
        channels: (E, C) float per-entry channel values.
        rows: (E,) int64 table row of every entry.
        table: (N, m) float point embedding A; channel a belongs to kernel ``a // (m / K)``.
        offsets: (Q + 1,) int64 compressed-row offsets of the clouds.
        fused: True: the Triton kernel (raises where it cannot run); False: torch; None: the
            kernel where :func:`triton_runs` allows it.

    Returns:
        (Q, C, m) float64 if any input is float64, else float32; differentiable in coef,
        channels and table.
    """
    if fused is None:
        fused = triton_runs(table.device) is None
    if not fused:
        return pooled_moments_torch(coef, channels, rows, table, offsets)
    reason = triton_runs(table.device)
    if reason is not None:
        raise RuntimeError(f"the fused pooled-moments kernel cannot run: {reason}")
    return PooledMoments.apply(coef, channels, rows, table, offsets)
