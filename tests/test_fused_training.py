"""The training kernel (pair kernels and pooled sums, forward and backward) against torch."""

import logging
import shutil

import pytest
import torch

from vcnn import kernels
from vcnn.network import VectorCloudNet

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="needs a C compiler"
)


def _net(activation: str, pair_embedding: tuple[int, ...], **options) -> VectorCloudNet:
    config = {
        "dim": 2, "num_scalars": 6, "num_vectors": 1, "embedding": (8, 32), "fitting": (16,),
        "point_scalar_columns": (0, 1, 2), "kernels": 8, "point_scalars_in_kernels": True,
        "pooling": "volume", "activation": activation, "pair_embedding": pair_embedding,
        "use_angle_feature": False, "use_position_scalar_feature": False,
    }
    config.update(options)
    net = VectorCloudNet(**config)
    with torch.no_grad():  # kernels that vary visibly between entries
        for layer in net.pair_embedding.layers:
            layer.weight.mul_(3.0)
            layer.bias.normal_(0.0, 0.5)
    return net


def _batch(seed: int = 0, *, batch: int = 6, points: int = 37, table_rows: int = 20):
    generator = torch.Generator().manual_seed(seed)
    pos = torch.randn(batch, points, 2, generator=generator)
    vec = torch.randn(batch, points, 1, 2, generator=generator)
    scal = torch.randn(batch, points, 6, generator=generator)
    mask = torch.rand(batch, points, generator=generator) > 0.2
    mask[:, 0] = True
    weight = torch.rand(batch, points, generator=generator)
    volume = torch.rand(batch, points, generator=generator) + 0.5
    rows = torch.randint(0, table_rows, (batch, points), generator=generator)
    table = torch.randn(table_rows, 32, generator=generator).requires_grad_()
    return pos, vec, scal, mask, weight, volume, rows, table


def _value_and_gradients(net, *, by_rows: bool, seed: int = 0):
    pos, vec, scal, mask, weight, volume, rows, table = _batch(seed)
    if by_rows:
        out = net(pos, vec, scal, mask, weight, volume=volume, point_embedding=table, point_rows=rows)
    else:
        out = net(pos, vec, scal, mask, weight, volume=volume, point_embedding=table[rows])
    loss = (out * torch.linspace(0.5, 1.5, out.numel())).sum()
    grads = torch.autograd.grad(loss, [table, *net.parameters()], allow_unused=True)
    return out, grads


@pytest.mark.parametrize(
    ("activation", "pair_embedding", "options"),
    [
        ("silu", (16,), {}),
        ("silu", (16, 16), {"position_vector": "direction"}),  # residual layer
        ("tanh", (12,), {"use_angle_feature": True, "use_position_scalar_feature": True}),
        ("relu", (16,), {"point_scalars_in_kernels": False}),
        ("gelu", (8,), {"kernels": 4}),
        ("softplus", (4, 8), {"kernels": 16}),  # residual layer twice the input's width
    ],
)
def test_forward_and_gradients_equal_the_torch_path(activation, pair_embedding, options):
    net = _net(activation, pair_embedding, **options)
    fused_out, fused_grads = _value_and_gradients(net, by_rows=True)
    torch_out, torch_grads = _value_and_gradients(net, by_rows=False)
    torch.testing.assert_close(fused_out, torch_out, rtol=1e-5, atol=1e-6)
    checked = 0
    for fused, reference in zip(fused_grads, torch_grads, strict=True):
        if reference is None:
            continue
        scale = reference.abs().max().clamp_min(1e-12)
        assert float((fused - reference).abs().max() / scale) < 2e-5
        checked += 1
    assert checked >= 6  # the table and the pair MLP's weights and biases at least


def test_padding_contributes_nothing():
    net = _net("silu", (16,))
    pos, vec, scal, mask, weight, volume, rows, table = _batch(1)
    out = net(pos, vec, scal, mask, weight, volume=volume, point_embedding=table, point_rows=rows)
    garbage = torch.where(mask[..., None], scal, torch.full_like(scal, 1e6))
    moved = torch.where(mask, rows, 0)
    again = net(pos, vec, garbage, mask, weight, volume=volume, point_embedding=table, point_rows=moved)
    torch.testing.assert_close(again, out, rtol=1e-6, atol=1e-7)


def test_one_thread_and_several_agree():
    net = _net("silu", (16,))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _value_and_gradients(net, by_rows=True, seed=2)
        torch.set_num_threads(max(2, threads))
        several = _value_and_gradients(net, by_rows=True, seed=2)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(several[0], one[0], rtol=1e-6, atol=1e-7)  # the head: BLAS
    for a, b in zip(several[1], one[1], strict=True):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_without_a_compiler_training_uses_torch_and_says_so(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(kernels, "_LIBRARIES", {})
    monkeypatch.setattr(kernels, "_WARNED", set())
    net = _net("silu", (16,))
    with caplog.at_level(logging.WARNING, logger="vcnn.network"):
        out, _ = _value_and_gradients(net, by_rows=True)
    assert "training kernel unavailable" in caplog.text and "no C compiler" in caplog.text
    monkeypatch.undo()
    reference, _ = _value_and_gradients(net, by_rows=False)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)


def test_bad_rows_are_refused():
    net = _net("silu", (16,))
    pos, vec, scal, mask, weight, volume, rows, table = _batch()
    rows[0, 3] = table.shape[0]
    with pytest.raises(ValueError, match="outside the table"):
        net(pos, vec, scal, mask, weight, volume=volume, point_embedding=table, point_rows=rows)
