import numpy as np
import pytest
import torch

from vcnn.network import _PRESETS, BaselineNet, VectorCloudNet
from vcnn.symmetry import TRANSFORMATIONS, check_frame_independence, random_orthogonal

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def make_batch(dim, dtype, *, batch=6, n=40, num_vectors=2, num_scalars=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pos = torch.randn(batch, n, dim, generator=generator, dtype=dtype)
    pos[:, 0] = 0.0  # the query point belongs to its own cloud
    vec = torch.randn(batch, n, num_vectors, dim, generator=generator, dtype=dtype)
    scal = torch.randn(batch, n, num_scalars, generator=generator, dtype=dtype)
    mask = torch.rand(batch, n, generator=generator) > 0.25
    mask[:, 0] = True
    weight = torch.rand(batch, n, generator=generator, dtype=dtype)
    return pos, vec, scal, mask, weight


MODEL_VARIANTS = {
    "default": {},
    "published": dict(_PRESETS["published"]),
    "factorised": dict(point_scalar_columns=(0, 2, 3)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("output", ["scalar", "vector", "tensor"])
@pytest.mark.parametrize("variant", sorted(MODEL_VARIANTS))
def test_vcnn_is_frame_independent(variant, output, dim, dtype):
    torch.manual_seed(1)
    model = VectorCloudNet(
        dim=dim, num_scalars=5, num_vectors=2, output=output, **MODEL_VARIANTS[variant]
    ).to(dtype)
    pos, vec, scal, mask, weight = make_batch(dim, dtype)
    report = check_frame_independence(model, pos, vec, scal, mask, weight=weight, num_trials=2)
    assert report.output_kind == output
    assert report.reference_scale > 0
    assert set(report.relative) == set(TRANSFORMATIONS)
    assert report.max_relative <= TOLERANCE[dtype], report.to_markdown()
    assert report.passed(TOLERANCE[dtype])
    assert report.passed()  # the dtype's default tolerance


@pytest.mark.parametrize("output", ["scalar", "vector", "tensor"])
def test_vcnn_without_mask_or_weight(output):
    model = VectorCloudNet(dim=3, num_scalars=5, num_vectors=2, output=output).double()
    pos, vec, scal, _, _ = make_batch(3, torch.float64)
    report = check_frame_independence(model, pos, vec, scal)
    assert report.passed(1e-10), report.to_markdown()


@pytest.mark.parametrize("output", ["scalar", "vector", "tensor"])
def test_baseline_is_not_rotation_invariant_and_the_checker_says_so(output):
    torch.manual_seed(0)
    model = BaselineNet(dim=2, num_scalars=5, num_vectors=2, output=output).double()
    pos, vec, scal, mask, weight = make_batch(2, torch.float64)
    report = check_frame_independence(model, pos, vec, scal, mask, weight=weight)
    assert report.relative["rotation"] > 1e-2
    assert report.relative["reflection"] > 1e-2
    assert not report.passed(1e-5)
    assert {"rotation", "reflection"} <= set(report.failures(1e-5))
    # Mean pooling over relative positions keeps the other invariances.
    for name in ("translation", "permutation", "padding", "duplication"):
        assert report.relative[name] <= 1e-10, name


class SumPooling(torch.nn.Module):
    """Invariant to rotations but counts points: fails duplication."""

    output_kind = "scalar"

    def forward(self, pos, vec, scal, mask=None, weight=None):
        radius = (pos * pos).sum(-1)
        return (radius * mask).sum(1)


class IgnoresMask(torch.nn.Module):
    """Averages over every slot, padding included."""

    def forward(self, pos, vec, scal, mask=None, weight=None):
        return (pos * pos).sum(-1).mean(1)


class FirstPoint(torch.nn.Module):
    """Reads the first slot only: order dependent."""

    def forward(self, pos, vec, scal, mask=None, weight=None):
        return scal[:, 1, 0]


class AbsoluteOffset(torch.nn.Module):
    """A vector output that is not equivariant: a fixed direction."""

    def forward(self, pos, vec, scal, mask=None, weight=None):
        radius = ((pos * pos).sum(-1) * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
        return radius * torch.ones_like(pos[:, 0])


@pytest.mark.parametrize(
    ("model", "broken"),
    [
        (SumPooling(), {"duplication"}),
        (IgnoresMask(), {"padding"}),
        (FirstPoint(), {"permutation"}),
        (AbsoluteOffset(), {"rotation", "reflection"}),
    ],
)
def test_checker_catches_each_broken_symmetry(model, broken):
    pos, vec, scal, mask, _ = make_batch(3, torch.float64)
    mask[:] = True
    report = check_frame_independence(model, pos, vec, scal, mask)
    assert set(report.failures(1e-6)) == broken, report.to_markdown()


def test_report_is_reproducible_and_accepts_numpy():
    model = VectorCloudNet(dim=2, num_scalars=5, num_vectors=2, output="vector").double()
    pos, vec, scal, mask, weight = make_batch(2, torch.float64)
    first = check_frame_independence(model, pos, vec, scal, mask, weight=weight, seed=3)
    second = check_frame_independence(
        model, pos.numpy(), vec.numpy(), scal.numpy(), mask.numpy(), weight=weight.numpy(), seed=3
    )
    assert first.absolute == second.absolute
    assert "| rotation |" in first.to_markdown()


def test_checker_restores_training_mode():
    model = VectorCloudNet(dim=2, num_scalars=5, num_vectors=2).double().train()
    pos, vec, scal, mask, _ = make_batch(2, torch.float64)
    check_frame_independence(model, pos, vec, scal, mask, num_trials=1)
    assert model.training


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("determinant", [1, -1])
def test_random_orthogonal(dim, determinant):
    rng = np.random.default_rng(0)
    matrix = random_orthogonal(dim, determinant=determinant, rng=rng)
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(dim), atol=1e-14)
    assert np.isclose(np.linalg.det(matrix), determinant)


def test_checker_rejects_bad_options():
    model = VectorCloudNet(dim=2, num_scalars=5, num_vectors=2)
    pos, vec, scal, mask, _ = make_batch(2, torch.float32)
    with pytest.raises(ValueError, match="num_trials"):
        check_frame_independence(model, pos, vec, scal, mask, num_trials=0)
    with pytest.raises(ValueError, match="extra_padding"):
        check_frame_independence(model, pos, vec, scal, mask, extra_padding=0)
    with pytest.raises(ValueError, match="output_kind"):
        check_frame_independence(model, pos, vec, scal, mask, output_kind="matrix")
    with pytest.raises(ValueError, match="output kind"):
        check_frame_independence(lambda *a, **k: pos[:, :3, 0], pos, vec, scal, mask)
