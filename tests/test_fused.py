"""The fused CPU kernel against the torch pass it replaces, option by option."""

import dataclasses
import logging
import math
import shutil

import numpy as np
import pytest
import torch

from tests.ddp_scripts.synthetic_cases import channel_case
from vcnn.clouds import CloudOptions
from vcnn.engines import fused_clouds, kernels
from vcnn.features import FeatureNormalizer, FeatureSpec, FieldTable, gather_inputs
from vcnn.inference import point_embedding, predict_full_clouds
from vcnn.network import VectorCloudNet

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="needs a C compiler"
)

ELLIPSE = CloudOptions(region="ellipse", diffusivity=0.1, zeta=3.0, eps=0.2)
ALL_PAIRS = ("proximity", "distance", "normalized_radius", "upstream_cosine")


def _rotation(angle: float, *, reflect: bool = False) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    rotation = np.array([[c, -s], [s, c]])
    return rotation @ np.diag([1.0, -1.0]) if reflect else rotation


# name -> (feature spec, cloud options, model options, frame, normalised, periodic)
CONFIGS = {
    "published": (FeatureSpec(), ELLIPSE, {}, None, True, True),
    "rotated-and-reflected": (FeatureSpec(), ELLIPSE, {}, _rotation(0.7, reflect=True), True, True),
    "not-periodic": (FeatureSpec(), ELLIPSE, {}, None, True, False),
    "every-pair-scalar": (
        FeatureSpec(pair_scalars=ALL_PAIRS),
        dataclasses.replace(ELLIPSE, cutoff_start=0.3),
        {"pooling": "mean", "position_vector": "direction", "use_position_scalar_feature": True,
         "use_angle_feature": True},
        _rotation(2.0),
        True,
        True,
    ),
    "ball-hard-edge-relu-residual": (
        FeatureSpec(pair_scalars=("distance", "normalized_radius")),
        CloudOptions(region="ball", radius=0.45, cutoff_start=None),
        {"activation": "relu", "point_scalars_in_kernels": False, "pair_embedding": (16, 16)},
        None,
        True,
        True,
    ),
    "knn-tanh": (
        FeatureSpec(pair_scalars=("proximity", "distance", "upstream_cosine")),
        CloudOptions(region="knn", k=12, cutoff_start=None),
        {"activation": "tanh", "pair_embedding": (12, 6)},
        None,
        True,
        True,
    ),
    "gelu-four-wide-kernels": (
        FeatureSpec(), ELLIPSE, {"activation": "gelu", "kernels": 4, "pair_embedding": (8,)},
        None, True, True,
    ),
    "softplus-without-normaliser": (
        FeatureSpec(vectors=("velocity", "swirl")), ELLIPSE,
        {"activation": "softplus", "kernels": 16, "use_angle_feature": True}, None, False, True,
    ),
}


def _setup(name: str, *, seed: int = 0):
    spec, options, model_options, frame, normalised, periodic = CONFIGS[name]
    case = channel_case(1.3, nx=22, ny=10, seed=seed)
    # a second point vector for the specs that ask for one
    swirl = np.stack([-case.velocity[:, 1], case.velocity[:, 0] + 0.3 * case.points[:, 1]], axis=1)
    case = dataclasses.replace(case, extra={**case.extra, "swirl": swirl})
    if not periodic:
        case = dataclasses.replace(case, period=np.zeros(2))
    table = FieldTable.from_cases([case], spec=spec, options=options, frame=frame)
    clouds = options.sampler(case.points, case.velocity, case.period).full_clouds()
    torch.manual_seed(seed)
    config = {
        "dim": 2, "num_scalars": len(spec.scalar_names), "num_vectors": len(spec.vectors),
        "embedding": (8, 32), "fitting": (16,), "use_position_scalar_feature": False,
        "use_angle_feature": False, "point_scalar_columns": tuple(range(len(spec.point_scalars))),
        "kernels": 8, "point_scalars_in_kernels": True, "pooling": "volume",
        "positive_output": True,
    }
    config.update(model_options)
    model = VectorCloudNet(**config).eval()
    with torch.no_grad():  # kernels that differ visibly from 1 and between entries
        for layer in model.pair_embedding.layers:
            layer.weight.mul_(3.0)
            layer.bias.normal_(0.0, 0.5)
    normalizer = None
    if normalised:
        sample = options.sampler(case.points, case.velocity, case.period).sample(24, seed=seed)
        indices = torch.as_tensor(np.where(sample.mask, sample.indices, -1))
        normalizer = FeatureNormalizer.fit(
            gather_inputs(table, torch.as_tensor(sample.queries), indices)
        )
    return model, table, normalizer, clouds


def _assert_counts_agree(kernel, reference):
    """Range counts equal up to entries whose value lies within round-off of a range's end."""
    slack = max(2, int(1e-4 * reference.num_entries))
    assert abs(kernel.out_of_range_entries - reference.out_of_range_entries) <= slack
    assert kernel.out_of_range_by_input.keys() == reference.out_of_range_by_input.keys()
    for name, count in reference.out_of_range_by_input.items():
        assert abs(kernel.out_of_range_by_input[name] - count) <= slack, name


def _both(model, table, normalizer, clouds):
    args = (model, table, normalizer, clouds.offsets, clouds.indices, clouds.queries)
    reference = predict_full_clouds(*args, engine="sparse", compile=False)
    kernel = predict_full_clouds(*args, engine="fused")
    return reference, kernel


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_fused_kernel_equals_the_torch_pass(name):
    reference, kernel = _both(*_setup(name))
    assert kernel.engine == "fused" and reference.engine == "sparse"
    scale = np.abs(reference.output).max()
    np.testing.assert_allclose(kernel.output, reference.output, rtol=2e-5, atol=2e-6 * scale)
    assert kernel.num_entries == reference.num_entries
    _assert_counts_agree(kernel, reference)
    assert set(kernel.seconds) == {"tables", "kernel", "head"}


def test_range_counts_agree_when_many_inputs_are_outside():
    model, table, normalizer, clouds = _setup("every-pair-scalar")
    # shrink every range to its middle: most entries now lie outside some range
    normalizer.scalar_min = [low + 0.45 * (high - low) for low, high in
                             zip(normalizer.scalar_min, normalizer.scalar_max, strict=True)]
    normalizer.scalar_max = [low + 0.2 * abs(low) + 1e-3 for low in normalizer.scalar_min]
    reference, kernel = _both(model, table, normalizer, clouds)
    assert reference.out_of_range_entries > 0.5 * reference.num_entries
    assert all(reference.out_of_range_by_input[name] > 0 for name in ("strain_rate", "distance"))
    _assert_counts_agree(kernel, reference)


def test_one_thread_and_several_threads_agree():
    model, table, normalizer, clouds = _setup("published")
    counter_outside = torch.zeros(table.num_points, dtype=torch.bool)
    bound = fused_clouds.FusedPass.build(
        model, table, normalizer, point_outside=counter_outside,
        embedded=point_embedding(model, table, normalizer).detach(),
    )
    one = bound(clouds.offsets, clouds.indices, clouds.queries, threads=1)
    three = bound(clouds.offsets, clouds.indices, clouds.queries, threads=3)
    torch.testing.assert_close(three.sums, one.sums, rtol=0, atol=0)
    torch.testing.assert_close(three.totals, one.totals, rtol=0, atol=0)


def test_bad_clouds_are_refused_before_the_kernel_runs():
    model, table, normalizer, clouds = _setup("published")
    bound = fused_clouds.FusedPass.build(
        model, table, normalizer, point_outside=torch.zeros(table.num_points, dtype=torch.bool),
        embedded=point_embedding(model, table, normalizer).detach(),
    )
    indices = clouds.indices.copy()
    indices[5] = table.num_points  # one past the last row
    with pytest.raises(ValueError, match="not a row of the table"):
        bound(clouds.offsets, indices, clouds.queries)
    with pytest.raises(ValueError, match="do not describe the same clouds"):
        bound(clouds.offsets[:-1], clouds.indices, clouds.queries)


def test_without_a_compiler_auto_falls_back_and_fused_says_why(monkeypatch, tmp_path, caplog):

    model, table, normalizer, clouds = _setup("published")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("VCNN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "_LIBRARIES", {})
    monkeypatch.setattr(kernels, "_WARNED", set())
    args = (model, table, normalizer, clouds.offsets, clouds.indices, clouds.queries)
    with caplog.at_level(logging.WARNING, logger="vcnn.inference"):
        result = predict_full_clouds(*args)
    assert result.engine == "sparse"
    assert "fused closure kernel unavailable" in caplog.text and "no C compiler" in caplog.text
    with pytest.raises(fused_clouds.KernelUnavailable, match="no C compiler"):
        predict_full_clouds(*args, engine="fused")


def test_kernels_are_cached_on_disk(monkeypatch, tmp_path):
    model, table, normalizer, clouds = _setup("published")
    monkeypatch.setenv("VCNN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "_LIBRARIES", {})
    predict_full_clouds(
        model, table, normalizer, clouds.offsets, clouds.indices, clouds.queries, engine="fused"
    )
    built = sorted((tmp_path / "kernels").glob("kernel_*.so"))
    assert len(built) == 2  # the fused pass and the point embedding (vcnn.engines.fused_mlp)
    assert not [p for p in (tmp_path / "kernels").iterdir() if p.is_dir()]  # no leftovers
    # a new process (no kernel loaded) finds them on disk and builds nothing
    monkeypatch.setattr(kernels, "_LIBRARIES", {})
    predict_full_clouds(
        model, table, normalizer, clouds.offsets, clouds.indices, clouds.queries, engine="fused"
    )
    assert sorted((tmp_path / "kernels").glob("kernel_*.so")) == built


def test_unsupported_nets_are_named():
    model, table, normalizer, clouds = _setup("published")
    dense = VectorCloudNet(dim=2, num_scalars=6, num_vectors=1).eval()
    with pytest.raises(fused_clouds.KernelUnavailable, match="not factorised"):
        fused_clouds.kernel_spec(dense, table, normalizer)
    with pytest.raises(fused_clouds.KernelUnavailable, match="float32"):
        fused_clouds.kernel_spec(model.double(), table, normalizer)


def test_the_kernels_exp_is_accurate_and_saturates():
    model, table, normalizer, _ = _setup("published")
    spec = fused_clouds.kernel_spec(model, table, normalizer)
    x = torch.cat([torch.linspace(-86.9, 87.9, 64000), torch.tensor([-200.0, 200.0, math.nan, 0.0])])
    x = torch.cat([x, torch.zeros(-x.numel() % (spec.entry_lanes * spec.group))])
    y = fused_clouds.probe(spec, "exp", x)
    exact = torch.exp(x.double())
    finite = x.abs() < 87
    relative = ((y.double() - exact).abs() / exact)[finite]
    assert relative.max() < 3e-7  # a few float32 ulp
    assert y[64000] < 1e-37 and y[64001] > 1e38  # saturated, never inf or NaN from the clamp
    assert math.isnan(y[64002]) and y[64003] == 1.0


@pytest.mark.parametrize("activation", ["silu", "tanh", "relu", "gelu", "softplus"])
def test_the_kernels_activations_match_torch(activation):
    model, table, normalizer, _ = _setup("published")
    model = VectorCloudNet(**{**model.config.to_dict(), "activation": activation})
    spec = fused_clouds.kernel_spec(model, table, normalizer)
    x = torch.linspace(-60.0, 60.0, 48000)
    exact = model.pair_embedding.activation(x.double()).float()
    y = fused_clouds.probe(spec, "activation", x)
    torch.testing.assert_close(y, exact, rtol=1e-6, atol=1e-6)


def test_image_ids_give_the_same_moments_as_point_rows():
    # full clouds come as ids of periodic images; the kernel maps them itself
    model, table, normalizer, clouds = _setup("published")
    assert clouds.image_ids is not None
    args = (model, table, normalizer, clouds.offsets)
    by_images = predict_full_clouds(
        *args, clouds.image_ids, clouds.queries, engine="fused", image_points=clouds.image_points
    )
    by_rows = predict_full_clouds(*args, clouds.indices, clouds.queries, engine="fused")
    np.testing.assert_array_equal(by_images.output, by_rows.output)
    sparse = predict_full_clouds(
        *args, clouds.image_ids, clouds.queries, engine="sparse", image_points=clouds.image_points
    )
    np.testing.assert_allclose(sparse.output, by_rows.output, rtol=2e-5)
    bad = clouds.image_ids.copy()
    bad[3] = clouds.image_points.size
    with pytest.raises(ValueError, match="not an image id"):
        predict_full_clouds(*args, bad, clouds.queries, engine="fused", image_points=clouds.image_points)


def test_a_threaded_build_that_does_not_load_falls_back_to_a_serial_one(monkeypatch, tmp_path):
    model, table, normalizer, clouds = _setup("published")
    monkeypatch.setenv("VCNN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "_LIBRARIES", {})
    loaded = kernels.ctypes.CDLL

    def refuse_openmp(path, *args, **options):
        if str(path).endswith("_omp.so"):
            raise OSError("undefined symbol: GOMP_parallel")
        return loaded(path, *args, **options)

    monkeypatch.setattr(kernels.ctypes, "CDLL", refuse_openmp)
    args = (model, table, normalizer, clouds.offsets, clouds.indices, clouds.queries)
    serial = predict_full_clouds(*args, engine="fused")
    monkeypatch.undo()
    reference = predict_full_clouds(*args, engine="sparse", compile=False)
    np.testing.assert_allclose(serial.output, reference.output, rtol=2e-5)
    assert list((tmp_path / "kernels").glob("kernel_*[0-9a-f].so"))  # the serial build
