import io
import json

import pytest
import torch

from vcnn.network import (
    BaselineNet,
    CloudInputError,
    VectorCloudNet,
    count_parameters,
    flops_per_cloud,
)


def make_batch(dim, dtype=torch.float64, *, batch=4, n=30, num_vectors=1, num_scalars=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pos = torch.randn(batch, n, dim, generator=generator, dtype=dtype)
    pos[:, 0] = 0.0
    vec = torch.randn(batch, n, num_vectors, dim, generator=generator, dtype=dtype)
    scal = torch.randn(batch, n, num_scalars, generator=generator, dtype=dtype)
    mask = torch.rand(batch, n, generator=generator) > 0.3
    mask[:, 0] = True
    return pos, vec, scal, mask


def linear_shapes(mlp):
    return [(layer.in_features, layer.out_features) for layer in mlp.layers]


@pytest.mark.parametrize(
    ("output", "shape"), [("scalar", (4,)), ("vector", (4, 3)), ("tensor", (4, 3, 3))]
)
def test_output_shapes_and_tensor_symmetry(output, shape):
    model = VectorCloudNet(dim=3, num_scalars=7, num_vectors=1, output=output).double()
    out = model(*make_batch(3))
    assert out.shape == shape
    assert torch.isfinite(out).all()
    if output == "tensor":
        assert torch.equal(out, out.transpose(1, 2))
        assert out.abs().max() > 0


def test_published_preset_layer_sizes():
    model = VectorCloudNet.from_preset("published", dim=2, num_scalars=7, num_vectors=1)
    assert linear_shapes(model.embedding) == [(7, 32), (32, 64), (64, 64)]
    # vec(D) has m * m' = 64 * 4 = 256 entries: fitting 256-128-1.
    assert linear_shapes(model.fitting) == [(256, 128), (128, 1)]
    assert isinstance(model.embedding.activation, torch.nn.ReLU)
    assert model.config.axis_neurons == 4
    expected = (7 * 32 + 32) + (32 * 64 + 64) + (64 * 64 + 64) + (256 * 128 + 128) + (128 + 1)
    assert count_parameters(model) == expected == 39553


def test_dense_preset_equals_constructor_defaults():
    preset = VectorCloudNet.from_preset("dense", dim=2, num_scalars=7, num_vectors=1)
    plain = VectorCloudNet(dim=2, num_scalars=7, num_vectors=1)
    assert preset.to_config() == plain.to_config()
    # Two derived invariants (distance, angle) join the seven scalars.
    assert linear_shapes(plain.embedding)[0] == (9, 32)
    assert isinstance(plain.embedding.activation, torch.nn.SiLU)
    with pytest.raises(ValueError, match="unknown preset"):
        VectorCloudNet.from_preset("nope", dim=2, num_scalars=7, num_vectors=1)


def test_default_preset_is_factorised_volume_pooled_and_positive():
    with pytest.raises(ValueError, match="point_scalar_columns"):
        VectorCloudNet.from_preset("default", dim=2, num_scalars=6, num_vectors=1)
    model = VectorCloudNet.from_preset(
        "default", dim=2, num_scalars=6, num_vectors=1, point_scalar_columns=(0, 1, 2)
    )
    config = model.config
    assert model.is_factorised and config.num_kernels == 8 and config.embedding[-1] == 64
    assert config.pooling == "volume" and config.positive_output
    assert model.pair_columns == (3, 4, 5)
    # the pair kernels see the three pair scalars and the point's three scalars (no derived
    # distance or angle)
    assert linear_shapes(model.pair_embedding) == [(6, 16), (16, 8)]


def test_positive_output_is_never_negative_and_volume_pooling_needs_volumes():
    torch.manual_seed(0)
    model = VectorCloudNet(
        dim=2, num_scalars=7, num_vectors=1, positive_output=True, pooling="volume"
    ).double()
    with torch.no_grad():
        model.fitting.layers[-1].bias.fill_(-50.0)  # a fit far below zero
    pos, vec, scal, mask = make_batch(2)
    volume = torch.rand(mask.shape, dtype=torch.float64) + 0.5
    out = model(pos, vec, scal, mask, volume=volume)
    assert (out >= 0).all() and (out < 1e-15).all()
    with pytest.raises(CloudInputError, match="pools by volume"):
        model(pos, vec, scal, mask)
    with pytest.raises(ValueError, match="scalar head"):
        VectorCloudNet(dim=2, num_scalars=7, num_vectors=1, output="vector", positive_output=True)
    with pytest.raises(ValueError, match="pooling"):
        VectorCloudNet(dim=2, num_scalars=7, num_vectors=1, pooling="max")


def test_volume_pooling_is_a_quadrature():
    # Splitting a point into two halves of its volume leaves a volume-pooled output unchanged
    # (the same integral); a mean over points changes.
    torch.manual_seed(1)
    pos, vec, scal, mask = make_batch(2, n=12)
    mask[:] = True
    volume = torch.rand(mask.shape, dtype=torch.float64) + 0.5
    split = dict(
        pos=torch.cat([pos, pos[:, :1]], 1),
        vec=torch.cat([vec, vec[:, :1]], 1),
        scal=torch.cat([scal, scal[:, :1]], 1),
        mask=torch.cat([mask, mask[:, :1]], 1),
    )
    halved = torch.cat([volume, volume[:, :1] / 2], 1)
    halved[:, 0] /= 2
    for pooling, changes in (("volume", False), ("mean", True)):
        model = VectorCloudNet(dim=2, num_scalars=7, num_vectors=1, pooling=pooling).double()
        once = model(pos, vec, scal, mask, volume=volume)
        twice = model(**split, volume=halved)
        assert (not torch.allclose(once, twice, rtol=1e-9)) == changes


def test_kernels_must_divide_the_embedding_width():
    with pytest.raises(ValueError, match="divide"):
        VectorCloudNet(
            dim=2, num_scalars=7, num_vectors=1, point_scalar_columns=(0, 1), kernels=5
        )
    with pytest.raises(ValueError, match="factorised"):
        VectorCloudNet(dim=2, num_scalars=7, num_vectors=1, kernels=4)


@pytest.mark.parametrize("output", ["scalar", "vector", "tensor"])
@pytest.mark.parametrize("factorised", [False, True])
def test_config_round_trip_through_checkpoint(output, factorised):
    torch.manual_seed(0)
    extra = {"point_scalar_columns": [0, 1, 2]} if factorised else {}
    model = VectorCloudNet(dim=2, num_scalars=7, num_vectors=1, output=output, **extra).double()
    buffer = io.BytesIO()
    torch.save({"config": model.to_config(), "state": model.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    config = json.loads(json.dumps(checkpoint["config"]))
    rebuilt = VectorCloudNet.from_config(config).double()
    rebuilt.load_state_dict(checkpoint["state"])
    batch = make_batch(2)
    assert torch.equal(model(*batch), rebuilt(*batch))
    assert rebuilt.to_config() == model.to_config()


def test_from_config_rejects_unknown_keys_and_bad_values():
    config = VectorCloudNet(dim=2, num_scalars=7, num_vectors=1).to_config()
    with pytest.raises(ValueError, match="unknown VectorCloudNet config keys"):
        VectorCloudNet.from_config({**config, "widht": 3})
    with pytest.raises(ValueError, match="axis_neurons"):
        VectorCloudNet.from_config({**config, "axis_neurons": 65})
    with pytest.raises(ValueError, match="activation"):
        VectorCloudNet.from_config({**config, "activation": "swish2"})
    with pytest.raises(ValueError, match="use_angle_feature"):
        VectorCloudNet(dim=2, num_scalars=7, num_vectors=0)
    with pytest.raises(ValueError, match="point_scalar_columns"):
        VectorCloudNet(dim=2, num_scalars=7, num_vectors=1, point_scalar_columns=[7])


@pytest.mark.parametrize("output", ["scalar", "vector", "tensor"])
@pytest.mark.parametrize("dim", [2, 3])
def test_duplicating_every_point_leaves_output_unchanged(output, dim):
    model = VectorCloudNet(dim=dim, num_scalars=7, num_vectors=1, output=output).double()
    pos, vec, scal, mask = make_batch(dim)
    weight = torch.rand(mask.shape, dtype=torch.float64)
    once = model(pos, vec, scal, mask, weight)
    twice = model(
        torch.cat([pos, pos], 1),
        torch.cat([vec, vec], 1),
        torch.cat([scal, scal], 1),
        torch.cat([mask, mask], 1),
        torch.cat([weight, weight], 1),
    )
    torch.testing.assert_close(twice, once, rtol=1e-12, atol=1e-14)


def test_padding_with_nan_garbage_is_ignored():
    model = VectorCloudNet(dim=2, num_scalars=7, num_vectors=1, output="vector").double()
    pos, vec, scal, mask = make_batch(2)
    reference = model(pos, vec, scal, mask)
    pos, vec, scal = pos.clone(), vec.clone(), scal.clone()
    pos[~mask] = float("nan")
    vec[~mask] = float("inf")
    scal[~mask] = float("nan")
    torch.testing.assert_close(model(pos, vec, scal, mask), reference, rtol=0, atol=0)


def test_unit_weight_equals_no_weight_and_zero_weight_equals_removal():
    model = VectorCloudNet(dim=2, num_scalars=7, num_vectors=1).double()
    pos, vec, scal, mask = make_batch(2)
    plain = model(pos, vec, scal, mask)
    torch.testing.assert_close(model(pos, vec, scal, mask, torch.ones(mask.shape)), plain)
    weight = torch.ones(mask.shape, dtype=torch.float64)
    weight[:, 1] = 0.0
    removed = mask.clone()
    removed[:, 1] = False
    torch.testing.assert_close(model(pos, vec, scal, mask, weight), model(pos, vec, scal, removed))
    # A smooth cutoff: a vanishing weight approaches removal continuously.
    weight[:, 1] = 1e-9
    torch.testing.assert_close(
        model(pos, vec, scal, mask, weight), model(pos, vec, scal, removed), rtol=1e-7, atol=1e-9
    )


def test_gradients_are_finite_at_the_query_point():
    for preset in ("default", "dense", "published"):
        model = VectorCloudNet.from_preset(
            preset, dim=3, num_scalars=7, num_vectors=1, point_scalar_columns=(0, 1, 2)
        ).double()
        pos, vec, scal, mask = make_batch(3)
        pos.requires_grad_(True)
        volume = torch.rand(mask.shape, dtype=torch.float64) + 0.5
        model(pos, vec, scal, mask, volume=volume).sum().backward()
        assert torch.isfinite(pos.grad).all(), preset
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_float32_and_float64_agree():
    torch.manual_seed(0)
    model64 = VectorCloudNet(dim=3, num_scalars=7, num_vectors=1, output="tensor").double()
    model32 = VectorCloudNet.from_config(model64.to_config())
    model32.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    pos, vec, scal, mask = make_batch(3)
    out32 = model32(pos.float(), vec.float(), scal.float(), mask)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), model64(pos, vec, scal, mask), rtol=1e-4, atol=1e-6)


def test_factorised_embedding_with_precomputed_point_part_matches_direct():
    torch.manual_seed(0)
    columns = [0, 2, 3, 5]
    model = VectorCloudNet(
        dim=2, num_scalars=7, num_vectors=1, point_scalar_columns=columns, output="vector"
    ).double()
    assert model.is_factorised
    pos, vec, scal, mask = make_batch(2)
    # Mesh points with query-independent scalars; clouds index into them.
    mesh_scalars = torch.randn(50, len(columns), dtype=torch.float64)
    index = torch.randint(0, 50, mask.shape)
    scal = scal.clone()
    scal[..., columns] = mesh_scalars[index]
    table = model.embed_points(mesh_scalars)  # (50, m)
    direct = model(pos, vec, scal, mask)
    cached = model(pos, vec, scal, mask, point_embedding=table[index])
    torch.testing.assert_close(cached, direct, rtol=1e-12, atol=1e-14)
    # The pair part is much cheaper than the full embedding.
    full = VectorCloudNet(dim=2, num_scalars=7, num_vectors=1)
    assert flops_per_cloud(model, 666) < 0.5 * flops_per_cloud(full, 666)
    with pytest.raises(ValueError, match="factorised"):
        full.embed_points(mesh_scalars)
    with pytest.raises(ValueError, match="point_embedding"):
        model(pos, vec, scal, mask, point_embedding=table[index][:, :-1])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p, v, s, m: (p[..., :1], v, s, m), r"pos must be \(B, n, d=2\)"),
        (lambda p, v, s, m: (p, v[:, :-1], s, m), r"vec must be .*\(4, 30, 1, 2\)"),
        (lambda p, v, s, m: (p, v, s[:, :, :3], m), r"scal must be .*\(4, 30, 7\)"),
        (lambda p, v, s, m: (p, v, s, m[:, :-1]), r"mask must be .*\(4, 30\)"),
        (lambda p, v, s, m: (p, v, s, m.float()), "mask must be a bool"),
        (lambda p, v, s, m: (p[:, :0], v[:, :0], s[:, :0], m[:, :0]), "empty cloud"),
    ],
)
def test_shape_errors_name_the_shapes(change, message):
    model = VectorCloudNet(dim=2, num_scalars=7, num_vectors=1)
    pos, vec, scal, mask = change(*make_batch(2, torch.float32))
    with pytest.raises(CloudInputError, match=message) as info:
        model(pos, vec, scal, mask)
    assert isinstance(info.value, ValueError)


def test_wrong_weight_shape_and_negative_weight():
    model = VectorCloudNet(dim=2, num_scalars=7, num_vectors=1)
    pos, vec, scal, mask = make_batch(2, torch.float32)
    with pytest.raises(ValueError, match=r"weight must be \(B, n\)"):
        model(pos, vec, scal, mask, torch.ones(4, 29))
    with pytest.raises(ValueError, match="must be >= 0"):
        model(pos, vec, scal, mask, -torch.ones(4, 30))


def test_all_masked_or_zero_weight_cloud_is_an_error_not_nan():
    model = VectorCloudNet(dim=2, num_scalars=7, num_vectors=1)
    pos, vec, scal, mask = make_batch(2, torch.float32)
    mask[2] = False
    with pytest.raises(ValueError, match=r"empty cloud: clouds \[2\]"):
        model(pos, vec, scal, mask)
    weight = torch.ones(mask.shape)
    weight[1] = 0.0
    with pytest.raises(ValueError, match=r"empty cloud: clouds \[1\]"):
        model(pos, vec, scal, None, weight)


@pytest.mark.parametrize("output", ["scalar", "vector", "tensor"])
def test_baseline_shapes_and_round_trip(output):
    model = BaselineNet(dim=3, num_scalars=7, num_vectors=1, output=output).double()
    batch = make_batch(3)
    out = model(*batch)
    assert out.shape == {"scalar": (4,), "vector": (4, 3), "tensor": (4, 3, 3)}[output]
    rebuilt = BaselineNet.from_config(json.loads(json.dumps(model.to_config()))).double()
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt(*batch), out)


def test_baseline_is_not_invariant():
    torch.manual_seed(0)
    model = BaselineNet(dim=2, num_scalars=7, num_vectors=1).double()
    pos, vec, scal, mask = make_batch(2)
    rotation = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    before = model(pos, vec, scal, mask)
    after = model(pos @ rotation.T, vec @ rotation.T, scal, mask)
    assert (after - before).abs().max() > 1e-2 * before.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("output", ["scalar", "vector", "tensor"])
def test_cpu_and_gpu_agree(output):
    torch.manual_seed(0)
    model = VectorCloudNet(dim=3, num_scalars=7, num_vectors=1, output=output).double()
    pos, vec, scal, mask = make_batch(3, batch=64, n=200)
    weight = torch.rand(mask.shape, dtype=torch.float64)
    on_cpu = model(pos, vec, scal, mask, weight)
    gpu = torch.device("cuda")
    on_gpu = model.to(gpu)(pos.to(gpu), vec.to(gpu), scal.to(gpu), mask.to(gpu), weight.to(gpu))
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-10, atol=1e-12)
