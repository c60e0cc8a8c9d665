"""The row MLP kernel (the point embedding in C) against the torch MLP it replaces."""

import logging
import shutil

import pytest
import torch

from vcnn.engines import kernels
from vcnn.engines.fused_mlp import mlp_rows
from vcnn.engines.kernels import KernelUnavailable
from vcnn.network import MLP, VectorCloudNet

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="needs a C compiler"
)


@pytest.mark.parametrize(
    ("in_features", "widths", "activation", "activate_last", "residual"),
    [
        (3, (32, 64, 64), "silu", True, True),  # the default preset: residual x1 and x2
        (5, (12, 24, 24, 8), "tanh", False, True),  # four lanes; last layer not activated
        (2, (7, 14), "relu", True, True),  # odd widths: one lane
        (4, (8, 8), "gelu", True, False),
        (4, (16, 16), "softplus", True, True),
    ],
)
def test_forward_and_gradients_equal_the_torch_mlp(
    in_features, widths, activation, activate_last, residual
):
    torch.manual_seed(0)
    mlp = MLP(in_features, widths, activation=activation, activate_last=activate_last, residual=residual)
    x = torch.randn(301, in_features)  # not a multiple of any block
    weights = torch.randn(301, widths[-1])
    fused = mlp_rows(mlp, activation, x)
    reference = mlp(x)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    fused_grads = torch.autograd.grad((fused * weights).sum(), list(mlp.parameters()))
    torch_grads = torch.autograd.grad((reference * weights).sum(), list(mlp.parameters()))
    for (name, _), a, b in zip(mlp.named_parameters(), fused_grads, torch_grads, strict=True):
        scale = b.abs().max().clamp_min(1e-12)
        assert float((a - b).abs().max() / scale) < 2e-5, name


def test_without_gradients_nothing_is_kept_and_the_values_agree():
    torch.manual_seed(1)
    mlp = MLP(3, (32, 64, 64), activation="silu", activate_last=True, residual=True)
    x = torch.randn(50, 3)
    with torch.no_grad():
        out = mlp_rows(mlp, "silu", x)
    assert out.grad_fn is None
    torch.testing.assert_close(out, mlp(x).detach(), rtol=1e-5, atol=1e-5)
    assert mlp_rows(mlp, "silu", x[:0]).shape == (0, 64)


def test_what_the_kernel_does_not_cover_is_refused():
    mlp = MLP(3, (8,), activation="silu", activate_last=True)
    with pytest.raises(KernelUnavailable, match="float32"):
        mlp_rows(mlp, "silu", torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(KernelUnavailable, match="gradient of its input"):
        mlp_rows(mlp, "silu", torch.randn(4, 3, requires_grad=True))


def test_the_net_embeds_in_torch_and_the_kernel_agrees(monkeypatch, tmp_path, caplog):
    # the network is plain torch (which backend embeds in C is vcnn.engines' choice): no
    # compiler needed, nothing to warn about; the kernel gives the same embedding
    net = VectorCloudNet.from_preset(
        "default", dim=2, num_scalars=6, num_vectors=1, point_scalar_columns=(0, 1, 2)
    )
    scalars = torch.randn(40, 3)
    with_kernel = mlp_rows(net.embedding, net.config.activation, scalars)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(kernels, "_LIBRARIES", {})
    monkeypatch.setattr(kernels, "_WARNED", set())
    with caplog.at_level(logging.WARNING):
        in_torch = net.embed_points(scalars)
    assert not caplog.text
    torch.testing.assert_close(in_torch, with_kernel, rtol=1e-5, atol=1e-5)
