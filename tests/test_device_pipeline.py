"""The device-resident pipeline (vcnn.engines.device) on CPU tensors, and on CUDA where there is one.

* the radius search on the device finds the CPU sampler's clouds (same members, images too);
* device draws are reproducible with a seed and follow the sampler's contract;
* the device backend equals the reference (values and gradients; float64 and float32), with
  the fused Triton kernel under ``TRITON_INTERPRET=1`` and with its torch fallback;
* the closure (the one inference path) searches its full clouds on the device where the device
  backend runs, and predicts as the CPU backends;
* training through the device path lowers the loss, its error sums are read once per epoch;
  ``experiments/bench_gpu.py --cpu-smoke`` runs, and the script takes carried data.
"""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.ddp_scripts.synthetic_cases import channel_case
from tests.test_fused import CONFIGS
from vcnn.closure import Closure
from vcnn.clouds import CloudOptions
from vcnn.engines import CLOUDS, ROWS, CloudSet, PassData, bind, registry
from vcnn.engines.device import DeviceEngine, sample_cloud_rows, searched_full_clouds
from vcnn.engines.radius_search import DeviceCloudSearch
from vcnn.engines.triton_kernels import pooled_moments, triton_runs
from vcnn.features import FeatureNormalizer, FeatureSpec, FieldTable, gather_inputs
from vcnn.network import VectorCloudNet

ROOT = Path(__file__).resolve().parents[1]
ELLIPSE = CloudOptions(region="ellipse", diffusivity=0.1, zeta=3.0, eps=0.2)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# the configurations of tests/test_fused.py the device pass applies to (not knn: no radius)
NAMES = ["published", "rotated-and-reflected", "every-pair-scalar", "softplus-without-normaliser",
         "ball-hard-edge-relu-residual"]


def _same_clouds(points, velocity, period, options, *, max_candidates=1 << 25):
    sampler = options.sampler(points, velocity, period)
    full = sampler.full_clouds()
    search = DeviceCloudSearch(
        torch.as_tensor(points), torch.as_tensor(velocity), options,
        period=None if period is None else torch.as_tensor(period),
        max_candidates=max_candidates,
    )
    found = search.clouds()
    np.testing.assert_array_equal(found.offsets.numpy(), full.offsets)
    cpu, device = full.indices.astype(np.int64), found.points.numpy()
    starts = full.offsets[:-1]
    np.testing.assert_array_equal(device[starts], np.arange(points.shape[0]))  # query first
    owner = np.repeat(np.arange(starts.size), np.diff(full.offsets))
    # the same members (a point may appear as several periodic images: compare multisets)
    np.testing.assert_array_equal(cpu[np.lexsort((cpu, owner))], device[np.lexsort((device, owner))])
    return full


@pytest.mark.parametrize(
    "period, options",
    [
        (None, ELLIPSE),
        (np.array([4.0, 0.0]), ELLIPSE),
        (np.array([4.0, 2.0]), dataclasses.replace(ELLIPSE, eps=0.05)),
        (np.array([4.0, 0.0]), CloudOptions(region="ball", radius=0.3)),
    ],
    ids=["open", "periodic-x", "periodic-xy-wide", "ball"],
)
def test_device_radius_search_finds_the_cpu_clouds(period, options):
    rng = np.random.default_rng(1)
    points = rng.random((1500, 2)) * [4.0, 2.0]
    velocity = np.stack([1 + np.sin(points[:, 1]), 0.4 * np.cos(points[:, 0])], axis=1)
    velocity[:50] = 0.0  # resting points: their ellipse is a circle
    # small chunks: the cut into chunks must not change the clouds
    _same_clouds(points, velocity, period, options, max_candidates=50_000)


def test_device_radius_search_with_clouds_wider_than_the_period_and_in_3d():
    rng = np.random.default_rng(2)
    points = rng.random((800, 2)) * [1.0, 2.0]
    velocity = np.stack([np.ones(800), 0.1 * points[:, 0]], axis=1)
    full = _same_clouds(points, velocity, np.array([1.0, 0.0]), ELLIPSE)
    first_cloud = full.indices[: full.offsets[1]]
    assert np.unique(first_cloud).size < first_cloud.size  # a point seen as several images
    points3 = rng.random((700, 3)) * [2.0, 1.0, 1.0]
    _same_clouds(points3, rng.normal(size=(700, 3)), np.array([2.0, 0.0, 1.0]), ELLIPSE)


# ------------------------------------------------------------------------ device draws
def _full_clouds(seed=0):
    case = channel_case(1.0, nx=24, ny=10, seed=seed)
    search = DeviceCloudSearch(
        torch.as_tensor(case.points), torch.as_tensor(case.velocity), ELLIPSE,
        period=torch.as_tensor(case.period),
    )
    return search.clouds()


def test_device_draws_are_reproducible_and_subsample_the_full_clouds():
    clouds = _full_clouds()
    queries = torch.tensor([0, 5, 5, 17, 200])
    sizes = clouds.sizes[queries]

    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return sample_cloud_rows(clouds.offsets, clouds.points, queries, 30, generator)

    first, again, other = draw(7), draw(7), draw(8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert torch.equal(first[:, 0], queries)  # the query first
    for row, query in enumerate(queries.tolist()):
        members = clouds.points[clouds.offsets[query] : clouds.offsets[query + 1]].tolist()
        drawn = [value for value in first[row].tolist() if value >= 0]
        assert len(drawn) == min(30, int(sizes[row]))  # without replacement, padded when small
        assert len(set(drawn)) == len(drawn) and set(drawn) <= set(members)
    assert (first[:, 1:] >= 0).all() if bool((sizes >= 30).all()) else True


def test_device_draws_are_uniform():
    clouds = _full_clouds()
    query = torch.tensor([100] * 4000)
    generator = torch.Generator().manual_seed(0)
    drawn = sample_cloud_rows(clouds.offsets, clouds.points, query, 5, generator)[:, 1:]
    size = int(clouds.sizes[100])
    counts = torch.bincount(drawn.flatten(), minlength=int(clouds.points.max()) + 1)
    members = clouds.points[clouds.offsets[100] + 1 : clouds.offsets[101]]
    expected = 4000 * 4 / (size - 1)
    assert int(counts[members].sum()) == drawn.numel()  # every draw a member other than the query
    assert float((counts[members].double() - expected).abs().max()) < 4 * expected**0.5


# -------------------------------------------------------------- device backend vs reference
def _setup(name, dtype):
    spec, options, model_options, frame, normalised, periodic = CONFIGS[name]
    case = channel_case(1.3, nx=22, ny=10, seed=0)
    swirl = np.stack([-case.velocity[:, 1], case.velocity[:, 0] + 0.3 * case.points[:, 1]], axis=1)
    case = dataclasses.replace(case, extra={**case.extra, "swirl": swirl})
    if not periodic:
        case = dataclasses.replace(case, period=np.zeros(2))
    table = FieldTable.from_cases([case], spec=spec, options=options, frame=frame, dtype=dtype)
    sampler = options.sampler(case.points, case.velocity, case.period)
    torch.manual_seed(0)
    config = {
        "dim": 2, "num_scalars": len(spec.scalar_names), "num_vectors": len(spec.vectors),
        "embedding": (8, 32), "fitting": (16,), "use_position_scalar_feature": False,
        "use_angle_feature": False, "point_scalar_columns": tuple(range(len(spec.point_scalars))),
        "kernels": 8, "point_scalars_in_kernels": True, "pooling": "volume",
        "positive_output": True,
    }
    config.update(model_options)
    model = VectorCloudNet(**config).to(dtype)
    with torch.no_grad():  # kernels that differ visibly from 1 and between entries
        for layer in model.pair_embedding.layers:
            layer.weight.mul_(3.0)
            layer.bias.normal_(0.0, 0.5)
    normalizer = None
    if normalised:
        sample = sampler.sample(24, seed=0)
        indices = torch.as_tensor(np.where(sample.mask, sample.indices, -1))
        normalizer = FeatureNormalizer.fit(gather_inputs(table, torch.as_tensor(sample.queries), indices))
    rng = np.random.default_rng(0)
    clouds = sampler.full_clouds()
    queries = np.arange(0, table.num_points, 3)
    indices = np.full((queries.size, 40), -1, dtype=np.int64)
    for row, query in enumerate(queries):
        cloud = clouds.indices[clouds.offsets[query] : clouds.offsets[query + 1]]
        chosen = np.concatenate([cloud[:1], rng.permutation(cloud[1:])])[:40]
        indices[row, : chosen.size] = chosen
    rows = (torch.as_tensor(queries), torch.as_tensor(indices))
    return model, PassData(table, normalizer), case, clouds, rows


def _rows_and_gradients(forward, model, queries, indices):
    out = forward(model, queries, indices)
    loss = (out * torch.linspace(0.5, 1.5, out.shape[0], dtype=out.dtype)).sum()
    return out.detach(), torch.autograd.grad(loss, list(model.parameters()))


def _assert_rows_agree(model, data, rows, *, fused, tolerance):
    reference = bind(ROWS, model, data, engine="padded")
    device = DeviceEngine(cuda_only=False, fused=fused).training_rows(model, data)
    expected_out, expected_grads = _rows_and_gradients(reference, model, *rows)
    out, grads = _rows_and_gradients(device, model, *rows)
    assert bool((rows[1] < 0).any()), "some clouds should be padded"
    scale = expected_out.abs().max()
    assert float((out - expected_out).abs().max() / scale) < tolerance
    for (name, _), grad, expected in zip(model.named_parameters(), grads, expected_grads, strict=True):
        assert float((grad - expected).abs().max() / expected.abs().max().clamp_min(1e-30)) < tolerance, name


def _assert_full_clouds_agree(model, data, clouds, *, fused, tolerance):
    checked = CloudSet.checked(clouds.offsets, clouds.indices, clouds.queries)
    reference = bind(CLOUDS, model, data, engine="padded")(checked, chunk_entries=997, compile=False)
    forward = DeviceEngine(cuda_only=False, fused=fused).full_clouds(model, data)
    result = forward(checked, chunk_entries=997)
    assert result.engine == "device" and result.num_entries == reference.num_entries
    scale = np.abs(reference.output).max()
    assert np.abs(result.output - reference.output).max() / scale < tolerance
    assert result.out_of_range_entries == reference.out_of_range_entries
    assert result.out_of_range_by_input == reference.out_of_range_by_input
    return result


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_device_backend_equals_the_reference_with_the_torch_moments(name, dtype, tolerance):
    model, data, _, clouds, rows = _setup(name, dtype)
    _assert_rows_agree(model.train(), data, rows, fused=False, tolerance=tolerance)
    _assert_full_clouds_agree(model.eval(), data, clouds, fused=False, tolerance=tolerance)


def _interpreted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reason = triton_runs(torch.device("cpu"))
    if reason is not None:
        # Run in a fresh process by test_the_triton_kernel_runs_under_the_interpreter.
        pytest.skip(f"the Triton interpreter is not available in this process: {reason}")


def test_the_triton_kernel_runs_under_the_interpreter():
    # triton.language fixes at its import whether it is interpreted, and an earlier test may
    # have imported it: the interpreter tests run in a process that sets TRITON_INTERPRET=1
    # before anything is imported.
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    environment = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "fused_triton_kernel"],
        cwd=Path(__file__).resolve().parents[1], env=environment, capture_output=True,
        text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-2000:]
    assert "5 passed" in completed.stdout and "skipped" not in completed.stdout, completed.stdout


@pytest.mark.parametrize("name", ["published", "softplus-without-normaliser"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fused_triton_kernel_under_the_interpreter_equals_the_reference(
    monkeypatch, name, dtype, tolerance
):
    _interpreted(monkeypatch)
    model, data, _, clouds, rows = _setup(name, dtype)
    small = (rows[0][:24], rows[1][:24])  # the interpreter runs one program at a time
    _assert_rows_agree(model.train(), data, small, fused=True, tolerance=tolerance)


def test_fused_triton_kernel_values_and_gradients_on_ragged_clouds(monkeypatch):
    _interpreted(monkeypatch)
    generator = torch.Generator().manual_seed(0)
    sizes = torch.tensor([1, 33, 2, 70, 31])  # blocks of 32 entries: full, partial, several
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
    entries, kernels, channels, width, points = int(offsets[-1]), 4, 5, 24, 40
    inputs = [
        torch.randn(entries, kernels, dtype=torch.float64, generator=generator),
        torch.randn(entries, channels, dtype=torch.float64, generator=generator),
        torch.randn(points, width, dtype=torch.float64, generator=generator),
    ]
    rows = torch.randint(0, points, (entries,), generator=generator)
    results = []
    for fused in (True, False):
        leaves = [tensor.clone().requires_grad_() for tensor in inputs]
        out = pooled_moments(leaves[0], leaves[1], rows, leaves[2], offsets, fused=fused)
        weights = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)
        results.append((out.detach(), torch.autograd.grad((out * weights).sum(), leaves)))
    (fused_out, fused_grads), (torch_out, torch_grads) = results
    torch.testing.assert_close(fused_out, torch_out, rtol=1e-12, atol=1e-12)
    for fused_grad, torch_grad in zip(fused_grads, torch_grads, strict=True):
        torch.testing.assert_close(fused_grad, torch_grad, rtol=1e-12, atol=1e-12)


def test_full_clouds_searched_on_the_device_equal_the_reference():
    model, data, case, clouds, _ = _setup("published", torch.float64)
    forward = DeviceEngine(cuda_only=False, fused=False).full_clouds(model.eval(), data)
    search = DeviceCloudSearch(
        torch.as_tensor(case.points), torch.as_tensor(case.velocity), data.table.options,
        period=torch.as_tensor(case.period),
    )
    result, found = forward.case(search)
    reference = _assert_full_clouds_agree(model, data, clouds, fused=False, tolerance=1e-10)
    np.testing.assert_allclose(result.output, reference.output, rtol=1e-10, atol=0)
    assert found.num_entries == clouds.offsets[-1] and "clouds" in result.seconds


@pytest.mark.parametrize("name", ["published", "rotated-and-reflected", "ball-hard-edge-relu-residual"])
def test_the_closure_searches_full_clouds_on_the_device(monkeypatch, name):
    """Closure.predict with the device backend: clouds searched on the device, not the host."""
    model, data, case, _, _ = _setup(name, torch.float32)
    spec, options, _, frame, _, _ = CONFIGS[name]
    closure = Closure(
        model.eval(), normalizer=data.normalizer, target_scale=2.5, spec=spec,
        cloud_options=options, physics_constants=None, dimension=2, device=torch.device("cpu"),
    )
    host = closure.predict_detailed(case, frame=frame, warn=False)
    assert host.engine != "device"
    # the device backend first, as on CUDA data, and the host's cloud sampler out of reach
    monkeypatch.setattr(registry, "ENGINES", (DeviceEngine(cuda_only=False), *registry.ENGINES[1:]))
    monkeypatch.setattr(CloudOptions, "sampler", lambda *_, **__: pytest.fail("clouds built on the host"))
    for engine in ("auto", "device"):
        device = closure.predict_detailed(case, frame=frame, warn=False, engine=engine)
        assert device.engine == "device" and device.clouds == "full"
        assert np.abs(device.tau - host.tau).max() / np.abs(host.tau).max() < 1e-5
        assert device.num_entries == host.num_entries
        assert device.out_of_range_by_input == pytest.approx(host.out_of_range_by_input, abs=0)
        assert "clouds" in device.seconds and "entries" in device.seconds


def test_the_closure_keeps_host_clouds_where_the_device_search_does_not_apply(monkeypatch):
    """A k-nearest-neighbour region (no radius to search) or another backend: host clouds."""
    model, data, case, *_ = _setup("published", torch.float32)
    closure = Closure(
        model.eval(), normalizer=data.normalizer, target_scale=1.0, spec=FeatureSpec(),
        cloud_options=ELLIPSE, physics_constants=None, dimension=2, device=torch.device("cpu"),
    )
    monkeypatch.setattr(registry, "ENGINES", (DeviceEngine(cuda_only=False), *registry.ENGINES[1:]))
    assert closure.predict_detailed(case, warn=False, engine="sparse").engine == "sparse"
    knn = CloudOptions(region="knn", k=12, cutoff_start=None)
    assert searched_full_clouds(model, data, knn, case.points, case.velocity, case.period) is None


def test_the_device_engine_is_first_for_cuda_data_only():
    assert registry.ENGINES[0].name == "device"
    model, data, *_ = _setup("published", torch.float32)
    reason = registry.ENGINES[0].supports(model, data, torch.device("cpu"))
    assert reason is not None and "CUDA" in reason
    assert bind(ROWS, model, data).engine != "device"  # auto on the CPU: the next backend


# ------------------------------------------------------------------------ training, bench
def test_training_through_the_device_path_lowers_the_loss():
    model, data, *_ = _setup("published", torch.float32)
    clouds = _full_clouds_of(data)
    points = data.table.points
    target = (0.5 + 0.3 * torch.sin(2.0 * points[:, 0]) * points[:, 1]).to(torch.float32)
    forward = DeviceEngine(cuda_only=False, fused=False).training_rows(model, data)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    every = torch.arange(data.table.num_points)
    fixed = sample_cloud_rows(clouds.offsets, clouds.points, every, 24, generator)

    def loss_of(queries, indices):
        return torch.mean((forward(model, queries, indices) - target[queries]) ** 2)

    with torch.no_grad():
        before = float(loss_of(every, fixed))
    for _ in range(60):
        queries = torch.randint(0, data.table.num_points, (64,), generator=generator)
        indices = sample_cloud_rows(clouds.offsets, clouds.points, queries, 24, generator)
        loss = loss_of(queries, indices)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(loss_of(every, fixed))
    assert after < 0.3 * before, (before, after)


def test_training_sums_are_read_once_per_epoch_and_equal_per_batch_reads():
    """The epoch's error sums accumulate on the device: the same float64 additions as reads."""
    from vcnn.training.loop import _Distributed, _Sums

    generator = torch.Generator().manual_seed(0)
    batches = [
        [torch.rand(size, generator=generator) for _ in range(3)] for size in (64, 64, 17)
    ]
    sums = _Sums()
    expected = {"loss": 0.0, "squared_error": 0.0, "squared_target": 0.0}
    for prediction, target, volume in batches:
        sums.add(prediction, target, volume, weighted=True, count=target.numel())
        assert isinstance(sums.pending, torch.Tensor)  # nothing read yet
        error = (prediction - target).square()
        expected["loss"] += float(error.sum())
        expected["squared_error"] += float((error * volume).sum())
        expected["squared_target"] += float((target.square() * volume).sum())
    reduced = sums.reduced(_Distributed(), torch.device("cpu"))
    assert reduced.pending is None and reduced.count == 145
    assert {name: getattr(reduced, name) for name in expected} == expected  # bit for bit


def _full_clouds_of(data):
    table = data.table
    search = DeviceCloudSearch(
        table.points, table.velocity.to(torch.float64), table.options, period=table.period[0]
    )
    return search.clouds()


def test_bench_gpu_cpu_smoke_runs(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "bench_gpu.py"), "--cpu-smoke",
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "clouds/s" in completed.stdout and "closure.predict warm" in completed.stdout
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["generation_seconds"] == 0 and metrics["total_seconds"] < 60
    assert metrics["gpu_cpu_max_rel"] < 1e-5 and metrics["closure_seconds"] > 0


def _bench_module(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "experiments" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look themselves up
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_takes_carried_data_and_generates_only_what_is_missing(tmp_path, monkeypatch, capsys):
    bench = _bench_module(monkeypatch)
    folder = tmp_path / "cases"
    folder.mkdir()
    for alpha in bench.TRAIN_ALPHAS + bench.VALIDATION_ALPHAS:
        (folder / f"hill_a{alpha:.3f}.npz").touch()
    monkeypatch.setattr(bench, "generate", lambda *_, **__: pytest.fail("generated carried data"))
    assert bench.published_cases(folder) == (folder, 0.0)
    (folder / "hill_a1.050.npz").unlink()
    calls = []

    def generate(alphas, resolution, out, *, config=None):
        calls.append((alphas, resolution, out, None if config is None else config.name))
        return 1.5

    monkeypatch.setattr(bench, "generate", generate)
    assert bench.published_cases(folder) == (folder, 3.0)
    assert calls == [([], 0.5, folder, "generate_train.toml"), ([0.5], 0.5, folder, None)]
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    assert "carried along with the command" in " ".join(capsys.readouterr().out.split())


# ------------------------------------------------------------------------ CUDA only
@needs_cuda
def test_cuda_search_and_pass_equal_the_cpu():
    model, data, case, clouds, rows = _setup("published", torch.float32)
    search = DeviceCloudSearch(
        torch.as_tensor(case.points, device="cuda"), torch.as_tensor(case.velocity, device="cuda"),
        data.table.options, period=torch.as_tensor(case.period),
    )
    found = search.clouds()
    np.testing.assert_array_equal(found.offsets.cpu().numpy(), clouds.offsets)
    table = FieldTable.from_cases(
        [case], spec=data.table.spec, options=data.table.options, device="cuda"
    )
    cuda_data = PassData(table, data.normalizer)  # the normaliser follows its inputs
    cuda_model = model.to("cuda").eval()
    result, _ = DeviceEngine().full_clouds(cuda_model, cuda_data).case(search)
    reference = _assert_full_clouds_agree(model.cpu(), data, clouds, fused=False, tolerance=1e-5)
    assert np.abs(result.output - reference.output).max() / np.abs(reference.output).max() < 1e-5


@needs_cuda
def test_the_closure_on_cuda_searches_its_clouds_there_and_equals_the_cpu():
    model, data, case, _, _ = _setup("published", torch.float32)

    def closure_on(device):
        return Closure(
            model.to(device).eval(), normalizer=data.normalizer, target_scale=1.0,
            spec=FeatureSpec(), cloud_options=ELLIPSE, physics_constants=None, dimension=2,
            device=torch.device(device),
        )

    host = closure_on("cpu").predict_detailed(case, warn=False)
    cuda = closure_on("cuda").predict_detailed(case, warn=False)
    assert cuda.engine == "device" and host.engine != "device"
    assert np.abs(cuda.tau - host.tau).max() / np.abs(host.tau).max() < 1e-5
