"""The one inference path: vcnn.load_closure and Closure.predict on in-memory cases."""

import dataclasses
import logging

import numpy as np
import pytest
import torch

from tests.ddp_scripts.synthetic_cases import channel_case, write_channel_cases
from vcnn import Case, load_closure
from vcnn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vcnn.physics import Physics
from vcnn.training import TrainConfig, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small default (factorised, volume-pooled, positive) model and a dense one."""
    folder = tmp_path_factory.mktemp("closure")
    data_dir = folder / "cases"
    write_channel_cases(data_dir, [0.5, 1.0, 1.5], nx=24, ny=10)
    runs = {}
    for preset in ("default", "dense"):
        config = TrainConfig.from_dict(
            {
                "data": str(data_dir), "out": str(folder / preset),
                "validation_alphas": [1.0], "epochs": 2, "batch_size": 48, "cloud_size": 32,
                "learning_rate": 3e-3, "device": "cpu", "num_threads": 1,
                "model": {"preset": preset, "embedding": [8, 16], "fitting": [32]},
            }
        )
        train(config)
        runs[preset] = folder / preset / "best.pt"
    return data_dir, runs


def test_closure_records_the_physics_of_its_data(trained):
    _, runs = trained
    closure = load_closure(runs["default"], device="cpu")
    physics = closure.physics
    assert {name: physics[name] for name in Physics().to_dict()} == Physics().to_dict()
    assert physics["eps"] == 0.2 and physics["dimension"] == 2
    assert physics["reaction_exponent"] == 1.0


def test_predict_needs_no_tau_and_is_deterministic_and_positive(trained):
    _, runs = trained
    closure = load_closure(runs["default"], device="cpu")
    case = channel_case(1.2, nx=20, ny=9)
    blind = dataclasses.replace(case, tau=np.zeros(case.num_points))
    first = closure.predict(case)
    assert first.shape == (case.num_points,) and first.dtype == np.float64
    np.testing.assert_array_equal(closure.predict(blind), first)
    np.testing.assert_array_equal(closure.predict(case), first)
    assert first.min() >= 0  # softplus head


@pytest.mark.parametrize("preset", ["default", "dense"])
def test_fast_path_equals_the_reference_padded_path(trained, preset):
    _, runs = trained
    closure = load_closure(runs[preset], device="cpu")
    case = channel_case(1.7, nx=30, ny=12)
    padded = closure.predict_detailed(case, engine="padded")
    auto = closure.predict_detailed(case)
    np.testing.assert_allclose(auto.tau, padded.tau, rtol=1e-5, atol=1e-7 * np.abs(padded.tau).max())
    assert auto.num_entries == padded.num_entries > case.num_points
    if preset == "default":
        assert auto.engine == "fused"
        sparse = closure.predict_detailed(case, engine="sparse")
        np.testing.assert_allclose(sparse.tau, auto.tau, rtol=1e-5, atol=1e-7 * np.abs(auto.tau).max())
    else:
        assert auto.engine == "padded"
        with pytest.raises(ValueError, match="factorised"):
            closure.predict_detailed(case, engine="sparse")


def _compiler_available() -> bool:
    import shutil

    return shutil.which("g++") is not None or shutil.which("c++") is not None


@pytest.mark.skipif(not _compiler_available(), reason="torch.compile needs a C++ compiler")
def test_compiled_per_entry_stage_equals_the_eager_one(trained):
    from vcnn.engines import sparse

    _, runs = trained
    closure = load_closure(runs["default"], device="cpu")
    case = channel_case(1.3, nx=24, ny=10)
    eager = closure.predict_detailed(case, engine="sparse", compile=False)
    compiled = closure.predict_detailed(case, engine="sparse", compile=True)
    assert not sparse._COMPILE_FAILED, "torch.compile fell back to the eager stage"
    scale = np.abs(eager.tau).max()
    np.testing.assert_allclose(compiled.tau, eager.tau, rtol=1e-5, atol=1e-6 * scale)
    assert compiled.out_of_range_fraction == eager.out_of_range_fraction
    assert compiled.out_of_range_by_input == eager.out_of_range_by_input
    assert set(compiled.seconds) >= {"clouds", "entries", "products", "total"}


def test_a_failing_compiler_falls_back_to_the_eager_stage(trained, monkeypatch, caplog):
    from vcnn.engines import sparse

    def broken_compile(function, **options):
        def run(*args):
            raise RuntimeError("no C++ compiler here")

        return run

    monkeypatch.setattr(sparse, "_COMPILED_STAGE", None)
    monkeypatch.setattr(sparse, "_COMPILE_FAILED", False)
    monkeypatch.setattr(sparse.torch, "compile", broken_compile)
    _, runs = trained
    closure = load_closure(runs["default"], device="cpu")
    case = channel_case(1.3, nx=20, ny=9)
    eager = closure.predict_detailed(case, engine="sparse", compile=False)
    with caplog.at_level(logging.WARNING, logger="vcnn.engines.sparse"):
        fallback = closure.predict_detailed(case, engine="sparse", compile=True)
    np.testing.assert_array_equal(fallback.tau, eager.tau)
    assert "torch.compile" in caplog.text and "no C++ compiler here" in caplog.text
    assert sparse._COMPILE_FAILED


def test_an_input_error_is_not_mistaken_for_a_compiler_failure(monkeypatch):
    from vcnn.engines import sparse

    def failing(*args):
        raise RuntimeError("compiled stage failed")

    def invalid_input(*args):
        raise IndexError("index 99 is out of bounds")

    monkeypatch.setattr(sparse, "_COMPILED_STAGE", failing)
    monkeypatch.setattr(sparse, "_COMPILE_FAILED", False)
    monkeypatch.setattr(sparse, "_entry_stage", invalid_input)
    with pytest.raises(IndexError, match="out of bounds"):
        sparse._run_compiled()
    assert not sparse._COMPILE_FAILED


def test_chunking_does_not_change_the_prediction(trained):
    from vcnn.features import FieldTable
    from vcnn.inference import predict_full_clouds

    _, runs = trained
    closure = load_closure(runs["default"], device="cpu")
    case = channel_case(1.1, nx=20, ny=9)
    clouds = closure.cloud_options.sampler(case.points, case.velocity, case.period).full_clouds()
    table = FieldTable.from_cases([case], spec=closure.spec, options=closure.cloud_options)
    args = (closure.model, table, closure.normalizer, clouds.offsets, clouds.indices, clouds.queries)
    whole = predict_full_clouds(*args, engine="sparse", chunk_entries=10**9).output
    pieces = predict_full_clouds(*args, engine="sparse", chunk_entries=997).output
    np.testing.assert_allclose(pieces, whole, rtol=1e-6, atol=1e-9)


def test_inputs_outside_the_training_range_are_reported(trained, caplog):
    _, runs = trained
    closure = load_closure(runs["default"], device="cpu")
    case = channel_case(1.0, nx=20, ny=9)
    inside = closure.predict_detailed(case)
    assert inside.out_of_range_fraction < 0.05
    fast = dataclasses.replace(case, velocity=case.velocity * 5.0, strain_rate=case.strain_rate * 5)
    with caplog.at_level(logging.WARNING, logger="vcnn.closure"):
        outside = closure.predict_detailed(fast)
    assert outside.out_of_range_fraction > 0.5
    assert outside.out_of_range_by_input["strain_rate"] > 0.5
    assert "outside the training range" in caplog.text


def test_dimension_mismatch_is_a_clear_error(trained):
    _, runs = trained
    closure = load_closure(runs["default"], device="cpu")
    rng = np.random.default_rng(0)
    n = 50
    case = Case(
        points=rng.random((n, 3)), velocity=rng.random((n, 3)), tau=np.zeros(n),
        strain_rate=rng.random(n), wall_distance=rng.random(n), nodal_volume=np.ones(n),
        is_wall=np.zeros(n, bool), period=np.zeros(3), name="cube",
    )
    with pytest.raises(ValueError, match="3-D but the closure was trained on 2-D"):
        closure.predict(case)


def test_checkpoints_of_format_version_1_still_load(trained, tmp_path):
    # Version 1 kept the pooling in the cloud options, had no cutoff unless it said so, and
    # recorded no physics: the loader maps all three.
    _, runs = trained
    payload = load_checkpoint(runs["dense"])
    payload.pop("physics")
    payload.pop("dimension")
    payload["cloud_options"] = {"region": "ellipse", "diffusivity": 0.1, "zeta": 3.0,
                                "eps": 0.2, "volume_weighted": True}
    config = dict(payload["model_config"])
    config.pop("pooling")
    payload["model_config"] = config
    path = tmp_path / "old.pt"
    save_checkpoint(path, payload)
    raw = torch.load(path, weights_only=True)
    raw["format_version"] = 1
    torch.save(raw, path)
    closure = load_closure(path, device="cpu")
    assert closure.model.pooling == "volume"
    assert closure.cloud_options.cutoff_start is None
    assert closure.physics["reaction_exponent"] is None
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_closure(tmp_path / "junk.pt", device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_closure_on_cuda_agrees_with_the_cpu(trained):
    # The same closure on the GPU: clouds on the host, inputs, sparse products and network on
    # the device, float32.
    _, runs = trained
    case = channel_case(1.3, nx=30, ny=12)
    on_cpu = load_closure(runs["default"], device="cpu").predict(case)
    on_gpu = load_closure(runs["default"], device="cuda")
    assert on_gpu.device.type == "cuda"
    np.testing.assert_allclose(on_gpu.predict(case), on_cpu, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda_with_bf16_autocast(trained, tmp_path):
    data_dir, _ = trained
    config = TrainConfig.from_dict(
        {
            "data": str(data_dir), "out": str(tmp_path / "gpu"),
            "validation_alphas": [1.0], "epochs": 2, "batch_size": 48, "cloud_size": 32,
            "device": "cuda", "amp": True, "model": {"embedding": [8, 16], "fitting": [32]},
        }
    )
    result = train(config)
    assert np.isfinite(result.best_validation_rel_l2_percent)
    assert load_closure(result.best_checkpoint, device="cuda").predict(channel_case(1.0)).min() >= 0
