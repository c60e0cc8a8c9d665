"""The training kernel (inputs, pair kernels, pooled sums; forward and backward) against torch."""

import logging
import shutil

import numpy as np
import pytest
import torch

from tests.test_fused import CONFIGS, _setup
from vcnn.engines import kernels
from vcnn.inference import predict_rows, row_kernel
from vcnn.network import CloudInputError

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="needs a C compiler"
)


def _rows(name: str, *, width: int = 40, seed: int = 0):
    """A model, its table and normaliser, and random subsets of full clouds as rows (padded)."""
    model, table, normalizer, clouds = _setup(name, seed=seed)
    rng = np.random.default_rng(seed)
    queries = np.arange(0, table.num_points, 3)
    indices = np.full((queries.size, width), -1, dtype=np.int64)
    for row, query in enumerate(queries):
        cloud = clouds.indices[clouds.offsets[query] : clouds.offsets[query + 1]]
        chosen = np.concatenate([cloud[:1], rng.permutation(cloud[1:])])[:width]
        indices[row, : chosen.size] = chosen
    return model.train(), table, normalizer, torch.as_tensor(queries), torch.as_tensor(indices)


def _value_and_gradients(model, table, normalizer, queries, indices, kernel):
    out = predict_rows(model, table, normalizer, queries, indices, kernel=kernel)
    loss = (out * torch.linspace(0.5, 1.5, out.numel())).sum()
    return out.detach(), torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_and_gradients_equal_the_torch_path(name):
    model, table, normalizer, queries, indices = _rows(name)
    assert bool((indices < 0).any()), "some clouds should be padded"
    kernel = row_kernel(model, table, normalizer)
    assert kernel is not None
    fused_out, fused_grads = _value_and_gradients(model, table, normalizer, queries, indices, kernel)
    torch_out, torch_grads = _value_and_gradients(model, table, normalizer, queries, indices, None)
    torch.testing.assert_close(fused_out, torch_out, rtol=1e-5, atol=1e-6)
    for (parameter, _), fused, reference in zip(
        model.named_parameters(), fused_grads, torch_grads, strict=True
    ):
        scale = reference.abs().max().clamp_min(1e-12)
        assert float((fused - reference).abs().max() / scale) < 3e-5, parameter


def test_padding_contributes_nothing():
    model, table, normalizer, queries, indices = _rows("published")
    kernel = row_kernel(model, table, normalizer)
    out = predict_rows(model, table, normalizer, queries, indices, kernel=kernel)
    # the same clouds with their padding moved to the front and more of it
    wider = torch.cat([torch.full((indices.shape[0], 5), -1), indices], dim=1)
    again = predict_rows(model, table, normalizer, queries, wider, kernel=kernel)
    torch.testing.assert_close(again, out, rtol=1e-5, atol=1e-6)


def test_one_thread_and_several_agree():
    model, table, normalizer, queries, indices = _rows("every-pair-scalar")
    kernel = row_kernel(model, table, normalizer)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _value_and_gradients(model, table, normalizer, queries, indices, kernel)
        torch.set_num_threads(max(2, threads))
        several = _value_and_gradients(model, table, normalizer, queries, indices, kernel)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(several[0], one[0], rtol=1e-6, atol=1e-7)  # the head: BLAS
    for a, b in zip(several[1], one[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_without_a_compiler_training_uses_torch_and_says_so(monkeypatch, tmp_path, caplog):
    model, table, normalizer, queries, indices = _rows("published")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(kernels, "_LIBRARIES", {})
    monkeypatch.setattr(kernels, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="vcnn.inference"):
        assert row_kernel(model, table, normalizer) is None
    assert "training kernel unavailable" in caplog.text and "no C compiler" in caplog.text
    monkeypatch.undo()
    kernel = row_kernel(model, table, normalizer)
    reference = predict_rows(model, table, normalizer, queries, indices, kernel=kernel)
    torch.testing.assert_close(
        predict_rows(model, table, normalizer, queries, indices), reference, rtol=1e-5, atol=1e-6
    )


def test_the_kernel_steps_aside_for_nets_it_does_not_cover():
    model, table, normalizer, *_ = _rows("published")
    assert row_kernel(model.double(), table, normalizer) is None  # float64 parameters


def test_bad_rows_are_refused():
    model, table, normalizer, queries, indices = _rows("published")
    kernel = row_kernel(model, table, normalizer)
    bad = indices.clone()
    bad[0, 3] = table.num_points
    with pytest.raises(ValueError, match="cloud point row is outside"):
        predict_rows(model, table, normalizer, queries, bad, kernel=kernel)
    with pytest.raises(ValueError, match="query row is outside"):
        predict_rows(model, table, normalizer, queries - 1, indices, kernel=kernel)


def test_an_empty_cloud_is_refused_with_its_index():
    model, table, normalizer, queries, indices = _rows("published")
    # volume pooling: a cloud of its query alone, whose volume is 0, weighs nothing
    table.volume_lowp[queries[2]] = 0.0
    kernel = row_kernel(model, table, normalizer)  # the records hold the volumes
    lonely = indices.clone()
    lonely[2, 1:] = -1
    with pytest.raises(CloudInputError, match=r"empty cloud: clouds \[2\]"):
        predict_rows(model, table, normalizer, queries, lonely, kernel=kernel)
