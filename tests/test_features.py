import io

import numpy as np
import pytest
import torch

from vcnn.clouds import CloudSampler
from vcnn.features import (
    CloudBatch,
    FeatureNormalizer,
    FeatureSpec,
    build_batch,
    point_features,
)


def random_fields(rng, n, dim):
    points = rng.random((n, dim)) * 2.0
    velocity = rng.normal(size=(n, dim))
    velocity[0] = 0.0
    return {
        "points": points,
        "velocity": velocity,
        "tau": rng.random(n),
        "strain_rate": rng.random(n) * 3,
        "wall_distance": rng.random(n) * 0.6,
        "nodal_volume": rng.random(n) + 0.5,
        "is_wall": rng.random(n) < 0.1,
        "period": np.zeros(dim),
        "pressure_gradient": rng.normal(size=(n, dim)),
        "temperature": rng.random(n),
    }


def random_orthogonal(rng, dim):
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) > 0:  # make it a reflection too
        q[:, 0] = -q[:, 0]
    return q


def sorted_by_index(batch, padded):
    """Reorder each cloud by point index so that two independently built clouds align."""
    key = np.where(padded.mask, padded.indices, np.iinfo(np.int64).max)
    order = torch.as_tensor(np.argsort(key, axis=1, kind="stable"))
    take = lambda t: torch.take_along_dim(t, order.reshape(order.shape + (1,) * (t.dim() - 2)), 1)  # noqa: E731
    return take(batch.pos), take(batch.vec), take(batch.scal), take(batch.mask)


@pytest.mark.parametrize("dim", [2, 3])
def test_scalars_invariant_vectors_corotate(dim):
    rng = np.random.default_rng(dim)
    fields = random_fields(rng, 600, dim)
    rotation = random_orthogonal(rng, dim)
    rotated = dict(fields)
    for name in ("points", "velocity", "pressure_gradient"):
        rotated[name] = fields[name] @ rotation.T
    spec = FeatureSpec(
        point_scalars=("strain_rate", "wall_feature", "volume", "speed", "is_wall", "temperature"),
        pair_scalars=("proximity", "distance", "normalized_radius", "upstream_cosine"),
        vectors=("velocity", "pressure_gradient"),
    )
    queries = np.arange(0, 600, 7)
    batches = []
    for case in (fields, rotated):
        sampler = CloudSampler(case["points"], case["velocity"], diffusivity=0.05, dtype=np.float64)
        padded = sampler.padded(queries)
        batch = build_batch(case, padded, spec=spec, dtype=torch.float64)
        batches.append(sorted_by_index(batch, padded))
    (pos, vec, scal, mask), (pos_r, vec_r, scal_r, mask_r) = batches
    assert torch.equal(mask, mask_r)
    assert mask.sum(1).min() > 1
    rot = torch.as_tensor(rotation)
    torch.testing.assert_close(pos_r, pos @ rot.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(vec_r, vec @ rot.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(scal_r, scal, rtol=0, atol=1e-10)


@pytest.fixture(scope="module")
def case_and_clouds():
    rng = np.random.default_rng(7)
    fields = random_fields(rng, 800, 2)
    sampler = CloudSampler(fields["points"], fields["velocity"], diffusivity=0.05)
    return fields, sampler


def test_feature_values_and_layout(case_and_clouds):
    fields, sampler = case_and_clouds
    spec = FeatureSpec()
    padded = sampler.sample(40, seed=0)
    batch = build_batch(fields, padded, spec=spec)
    q, n = padded.indices.shape
    assert batch.pos.shape == (q, n, 2) and batch.vec.shape == (q, n, 1, 2)
    assert batch.scal.shape == (q, n, spec.num_scalars) and batch.mask.shape == (q, n)
    assert batch.weight is not None and batch.weight.shape == (q, n)
    assert spec.point_scalar_columns == (0, 1, 2, 3, 4)
    names = spec.scalar_names
    real = batch.mask
    wall = batch.scal[..., names.index("wall_feature")][real]
    assert wall.min() >= 0 and wall.max() <= 1
    upstream = batch.scal[..., names.index("upstream_cosine")]
    assert torch.all(upstream[:, 0] == 0)  # the query point: x_i - x0 = 0
    assert torch.all(upstream[real].abs() <= 1 + 1e-6)
    speed = batch.scal[..., names.index("speed")]
    torch.testing.assert_close(speed[real], batch.vec[..., 0, :].norm(dim=-1)[real])
    assert torch.all(batch.scal[~real] == 0) and torch.all(batch.vec[~real] == 0)
    volume = point_features(fields, spec).scalars[:, names.index("volume")]
    assert volume.mean() == pytest.approx(1.0)
    # Full clouds are accepted too, padded to their largest.
    full = build_batch(fields, sampler.full_clouds(np.arange(5)), spec=spec)
    assert full.mask.sum(1).tolist() == sampler.full_clouds(np.arange(5)).sizes.tolist()


def test_normalizer_fit_apply_and_round_trip(case_and_clouds):
    fields, sampler = case_and_clouds
    spec = FeatureSpec(vectors=("velocity", "pressure_gradient"))
    raw = build_batch(fields, sampler.sample(30, seed=1), spec=spec, dtype=torch.float64)
    normalizer = FeatureNormalizer.fit(raw)
    normalized = normalizer.apply(raw)
    real = raw.mask
    scal = normalized.scal[real]
    torch.testing.assert_close(scal.mean(0), torch.zeros(spec.num_scalars, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(scal.std(0, unbiased=False), torch.ones(spec.num_scalars, dtype=torch.float64), atol=1e-9, rtol=0)
    for k in range(2):
        rms = normalized.vec[..., k, :][real].pow(2).sum(-1).mean().sqrt()
        assert rms.item() == pytest.approx(1.0)
    assert torch.all(normalized.scal[~real] == 0)
    # One scale per vector type: the direction of every vector is unchanged.
    cos = torch.nn.functional.cosine_similarity(normalized.vec[real], raw.vec[real], dim=-1)
    assert torch.all(cos[raw.vec[real].norm(dim=-1) > 0] > 1 - 1e-12)
    buffer = io.BytesIO()
    torch.save({"normalizer": normalizer.state_dict(), "spec": spec.to_dict()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    restored = FeatureNormalizer()
    restored.load_state_dict(loaded["normalizer"])
    assert restored == normalizer
    assert FeatureSpec.from_dict(loaded["spec"]) == spec
    batch = build_batch(fields, sampler.sample(30, seed=1), spec=spec, dtype=torch.float64, normalizer=restored)
    torch.testing.assert_close(batch.scal, normalized.scal)


def test_bad_inputs(case_and_clouds):
    fields, sampler = case_and_clouds
    with pytest.raises(ValueError, match="unknown pair scalars"):
        FeatureSpec(pair_scalars=("angle",))
    with pytest.raises(ValueError, match="distinct"):
        FeatureSpec(point_scalars=("speed", "speed"))
    with pytest.raises(ValueError, match="sequence"):
        FeatureSpec(vectors="velocity")
    with pytest.raises(ValueError, match="unknown FeatureSpec keys"):
        FeatureSpec.from_dict({"colour": 1})
    with pytest.raises(ValueError, match="no 'vorticity'"):
        build_batch(fields, sampler.sample(5, seed=0), spec=FeatureSpec(point_scalars=("vorticity",)))
    missing = {k: v for k, v in fields.items() if k != "wall_distance"}
    with pytest.raises(ValueError, match="wall_distance"):
        build_batch(missing, sampler.sample(5, seed=0), spec=FeatureSpec())
    raw = build_batch(fields, sampler.sample(5, seed=0), spec=FeatureSpec())
    with pytest.raises(ValueError, match="fitted on"):
        FeatureNormalizer(scalar_mean=[0.0], scalar_std=[1.0], vector_scale=[1.0]).apply(raw)
    with pytest.raises(ValueError, match="keys"):
        FeatureNormalizer().load_state_dict({"scalar_mean": []})
    assert isinstance(raw, CloudBatch)
