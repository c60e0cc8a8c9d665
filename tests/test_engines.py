"""The backends of the per-entry pass (vcnn.engines): one protocol, one priority list.

Every backend that runs here is checked against the reference (the network's own forward on
padded clouds) on the same inputs: full clouds (outputs and range counts) and training rows
(outputs and gradients in every parameter; the inputs are integer table rows, so the
parameters are what gradients exist for).
"""

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.ddp_scripts.synthetic_cases import channel_case
from tests.test_fused import _assert_counts_agree, _setup
from tests.test_fused_training import _rows
from vcnn import engines
from vcnn.closure import load_closure
from vcnn.engines import (
    CLOUDS,
    ROWS,
    CloudSet,
    EngineUnavailable,
    PassData,
    TrainingPass,
    bind,
    kernels,
)
from vcnn.engines.fused_cpu import embed_points
from vcnn.evaluation import predict_case
from vcnn.inference import predict_full_clouds, predict_rows, row_kernel
from vcnn.network import VectorCloudNet

COMPILER = shutil.which("cc") is not None or shutil.which("gcc") is not None
KERNELS_OFF = os.environ.get("VCNN_KERNELS", "").strip().lower() in ("0", "off", "no", "false")
needs_kernels = pytest.mark.skipif(
    not COMPILER or KERNELS_OFF, reason="needs a C compiler and the C kernels turned on"
)
# configurations of tests/test_fused.py that between them cover every option of the pass
NAMES = ["published", "every-pair-scalar", "softplus-without-normaliser", "ball-hard-edge-relu-residual"]
SHIPPED = Path(__file__).resolve().parents[1] / "experiments" / "published" / "model" / "best.pt"


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    """No C compiler, nothing loaded and nothing warned yet in this process."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("VCNN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "_LIBRARIES", {})
    monkeypatch.setattr(kernels, "_WARNED", set())


def _runnable(model, data):
    """The backends of the priority list whose ``supports`` passes for this net and data."""
    return [e for e in engines.ENGINES if e.supports(model, data, data.device) is None]


# ------------------------------------------------------------------------------- protocol
def test_every_backend_follows_the_protocol_and_the_list_ends_with_the_reference():
    names = [engine.name for engine in engines.ENGINES]
    assert names == ["device", "fused", "sparse", "padded"]
    assert all(isinstance(engine, engines.Engine) for engine in engines.ENGINES)
    assert engines.REQUESTS == ("auto", *names)
    assert engines.resolve("fused_cpu") is engines.resolve("fused") is engines.ENGINES[1]
    assert engines.resolve("reference") is engines.resolve("padded") is engines.ENGINES[-1]
    assert engines.resolve("auto") is None
    with pytest.raises(ValueError, match="engine must be 'auto', 'device', 'fused', 'sparse' or 'padded'"):
        engines.resolve("gpu")


# --------------------------------------------------------------- every backend vs reference
@needs_kernels
@pytest.mark.parametrize("name", NAMES)
def test_full_clouds_of_every_backend_equal_the_reference(name):
    model, table, normalizer, clouds = _setup(name)
    data = PassData(table, normalizer)
    checked = CloudSet.checked(clouds.offsets, clouds.indices, clouds.queries)
    ran = {}
    for engine in _runnable(model, data):
        forward = bind(CLOUDS, model, data, engine=engine.name)
        ran[engine.name] = forward(checked, chunk_entries=997, compile=False)
        assert ran[engine.name].engine == engine.name
    assert set(ran) == {"fused", "sparse", "padded"}  # factorised float32 nets on the CPU
    reference = ran.pop("padded")
    scale = np.abs(reference.output).max()
    assert scale > 0
    for result in ran.values():
        np.testing.assert_allclose(result.output, reference.output, rtol=2e-5, atol=2e-6 * scale)
        assert result.num_entries == reference.num_entries == clouds.offsets[-1]
        _assert_counts_agree(result, reference)


@needs_kernels
@pytest.mark.parametrize("name", NAMES)
def test_training_rows_of_every_backend_equal_the_reference_values_and_gradients(name):
    model, table, normalizer, queries, indices = _rows(name)
    assert bool((indices < 0).any()), "some clouds should be padded"
    data = PassData(table, normalizer)
    weights = torch.linspace(0.5, 1.5, queries.numel())
    ran = {}
    for engine in _runnable(model, data):
        forward = bind(ROWS, model, data, engine=engine.name)
        assert forward.engine == engine.name
        out = forward(model, queries, indices)
        loss = (out * weights.reshape(-1, *[1] * (out.dim() - 1))).sum()
        ran[engine.name] = out.detach(), torch.autograd.grad(loss, list(model.parameters()))
    assert set(ran) == {"fused", "sparse", "padded"}
    reference_out, reference_grads = ran.pop("padded")
    for engine, (out, grads) in ran.items():
        torch.testing.assert_close(out, reference_out, rtol=1e-5, atol=1e-6)
        for (parameter, _), grad, expected in zip(
            model.named_parameters(), grads, reference_grads, strict=True
        ):
            scale = expected.abs().max().clamp_min(1e-12)
            assert float((grad - expected).abs().max() / scale) < 3e-5, (engine, parameter)


@needs_kernels
def test_the_c_point_embedding_equals_the_nets_and_its_gradient():
    model, table, normalizer, _ = _setup("published")
    rows = torch.tensor([0, 5, 7, 100])
    in_c = embed_points(model, table, normalizer, rows)
    in_torch = engines.point_embedding(model, table, normalizer, rows)
    torch.testing.assert_close(in_c, in_torch, rtol=1e-5, atol=1e-6)
    weights = torch.randn(in_c.shape, generator=torch.Generator().manual_seed(0))
    parameters = list(model.embedding.parameters())
    for a, b in zip(
        torch.autograd.grad((in_c * weights).sum(), parameters),
        torch.autograd.grad((in_torch * weights).sum(), parameters),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- the priority list
@needs_kernels
def test_auto_picks_fused_for_a_factorised_float32_net_on_the_cpu():
    model, table, normalizer, _ = _setup("published")
    data = PassData(table, normalizer)
    assert bind(CLOUDS, model, data).engine == "fused"
    assert bind(ROWS, model, data).engine == "fused"
    assert TrainingPass(model, table, normalizer).engine == "fused"


def test_auto_picks_sparse_where_the_kernels_do_not_apply_and_the_reference_for_dense_nets(
    caplog,
):
    model, table, normalizer, _ = _setup("published")
    data = PassData(table, normalizer)
    # on another device the C kernels step aside without a warning (tested without a GPU)
    fused = engines.resolve("fused")
    assert fused.supports(model, data, torch.device("cuda")) == "the C kernels run on the CPU only"
    # a float64 net: not what the kernels cover; sparse, quietly
    double = VectorCloudNet(**model.config.to_dict()).double()
    with caplog.at_level(logging.WARNING):
        assert "float32" in fused.supports(double, data, data.device)
        assert bind(CLOUDS, double, data).engine == "sparse"
        assert bind(ROWS, double, data).engine == "sparse"
    assert not caplog.records
    # a dense (not factorised) net: only the reference runs it
    dense = VectorCloudNet(dim=2, num_scalars=len(table.spec.scalar_names), num_vectors=1)
    assert bind(CLOUDS, dense, data).engine == "padded"
    assert TrainingPass(dense, table, normalizer).engine == "padded"


def test_with_the_kernels_turned_off_the_torch_backends_run_and_say_why_once(
    monkeypatch, caplog
):
    model, table, normalizer, clouds = _setup("published")
    monkeypatch.setenv("VCNN_KERNELS", "0")
    monkeypatch.setattr(kernels, "_WARNED", set())
    args = (model, table, normalizer, clouds.offsets, clouds.indices, clouds.queries)
    with caplog.at_level(logging.WARNING):
        first = predict_full_clouds(*args, compile=False)
        again = predict_full_clouds(*args, compile=False)
        rows = TrainingPass(model, table, normalizer)
        TrainingPass(model, table, normalizer)
    assert first.engine == again.engine == rows.engine == "sparse"
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2, messages  # one per pass form, however often it is bound
    assert "fused closure kernel unavailable" in messages[0] and "VCNN_KERNELS" in messages[0]
    assert "fused training kernel unavailable" in messages[1]
    assert all(record.name == "vcnn.engines.registry" for record in caplog.records)
    # without a compiler the reference of a dense net needs no kernel and warns nothing
    dense = VectorCloudNet(dim=2, num_scalars=len(table.spec.scalar_names), num_vectors=1)
    caplog.clear()
    assert predict_full_clouds(dense, *args[1:]).engine == "padded"
    assert not caplog.records


def test_without_a_compiler_the_warning_is_emitted_exactly_once(no_compiler, caplog):
    model, table, normalizer, queries, indices = _rows("published")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert row_kernel(model, table, normalizer) is None
            assert TrainingPass(model, table, normalizer).engine == "sparse"
    assert len(caplog.records) == 1
    assert "training kernel unavailable" in caplog.text and "no C compiler" in caplog.text


# ------------------------------------------------------------------ requests and refusals
def test_a_requested_backend_that_cannot_run_is_refused_with_its_reason(monkeypatch):
    model, table, normalizer, clouds = _setup("published")
    data = PassData(table, normalizer)
    dense = VectorCloudNet(dim=2, num_scalars=len(table.spec.scalar_names), num_vectors=1)
    for name in ("fused", "fused_cpu", "sparse"):
        for kind in (CLOUDS, ROWS):
            with pytest.raises(EngineUnavailable, match=f"the {name.split('_')[0]} engine cannot "
                               "run: the network is not factorised"):
                bind(kind, dense, data, engine=name)
    with pytest.raises(EngineUnavailable, match="float32"):
        TrainingPass(model.double(), table, normalizer, engine="fused")
    with pytest.raises(ValueError, match="factorised"):  # EngineUnavailable is a ValueError
        predict_full_clouds(
            dense, table, normalizer, clouds.offsets, clouds.indices, clouds.queries,
            engine="sparse",
        )
    with pytest.raises(ValueError, match="engine must be"):
        predict_full_clouds(
            dense, table, normalizer, clouds.offsets, clouds.indices, clouds.queries,
            engine="gpu",
        )
    # a backend that applies but cannot be built is refused with the build's reason
    monkeypatch.setenv("VCNN_KERNELS", "off")
    with pytest.raises(kernels.KernelUnavailable, match="VCNN_KERNELS"):
        bind(CLOUDS, model.float(), data, engine="fused")
    # the reference runs everything, under both of its names
    assert bind(ROWS, dense, data, engine="reference").engine == "padded"
    assert bind(ROWS, model, data, engine="padded").engine == "padded"


# -------------------------------------------------------------- the training pass (module)
@needs_kernels
def test_the_training_pass_is_a_module_whose_parameters_are_the_nets_and_all_get_gradients():
    model, table, normalizer, queries, indices = _rows("published")
    training_pass = TrainingPass(model, table, normalizer)
    assert training_pass.engine == "fused"
    assert list(training_pass.parameters()) == list(model.parameters())
    assert set(training_pass.state_dict()) == {f"model.{key}" for key in model.state_dict()}
    out = training_pass(queries, indices)
    kernel = row_kernel(model, table, normalizer)
    torch.testing.assert_close(out, predict_rows(model, table, normalizer, queries, indices,
                                                 kernel=kernel))
    out.square().sum().backward()
    # DistributedDataParallel needs a gradient for every parameter from this forward
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(bool(p.grad.abs().sum() > 0) for p in model.parameters())
    training_pass.eval()
    assert not model.training


# ------------------------------------------------------------------- what ran is recorded
@needs_kernels
def test_evaluation_metrics_record_the_backend():
    closure = load_closure(SHIPPED, device="cpu")
    case = channel_case(1.0, nx=16, ny=8)
    prediction = predict_case(closure, case)
    assert prediction.metrics.engine == closure.predict_detailed(case).engine == "fused"
