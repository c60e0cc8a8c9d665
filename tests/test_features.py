import io

import numpy as np
import pytest
import torch

from vcnn.clouds import CloudOptions
from vcnn.features import (
    CloudBatch,
    FeatureNormalizer,
    FeatureSpec,
    FieldTable,
    build_batch,
    entry_inputs,
    point_features,
)

OPTIONS = CloudOptions(diffusivity=0.05, zeta=3.0, cutoff_start=0.5)


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
        sampler = OPTIONS.sampler(case["points"], case["velocity"], None)
        padded = sampler.padded(queries)
        batch = build_batch(case, padded, spec=spec, options=OPTIONS, dtype=torch.float64)
        batches.append(sorted_by_index(batch, padded))
    (pos, vec, scal, mask), (pos_r, vec_r, scal_r, mask_r) = batches
    assert torch.equal(mask, mask_r)
    assert mask.sum(1).min() > 1
    rot = torch.as_tensor(rotation)
    torch.testing.assert_close(pos_r, pos @ rot.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(vec_r, vec @ rot.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(scal_r, scal, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dim", [2, 3])
def test_entry_formulas_match_the_sampler_geometry(dim):
    # The one input path recomputes radius and weights from the point rows; they must be the
    # sampler's (which decides who is in a cloud), and the weights never negative.
    rng = np.random.default_rng(10 + dim)
    fields = random_fields(rng, 500, dim)
    # a period longer than twice the largest cloud, so that every entry is a minimum image
    fields["points"][:, 0] *= 4.0
    fields["period"] = np.array([8.0] + [0.0] * (dim - 1))
    sampler = OPTIONS.sampler(fields["points"], fields["velocity"], fields["period"])
    clouds = sampler.full_clouds(np.arange(0, 500, 5))
    spec = FeatureSpec(pair_scalars=("distance", "normalized_radius"))
    table = FieldTable.from_cases([fields], spec=spec, options=OPTIONS, dtype=torch.float64)
    queries = torch.as_tensor(np.repeat(clouds.queries, clouds.sizes))
    raw = entry_inputs(table, queries, torch.as_tensor(clouds.indices.astype(np.int64)))
    torch.testing.assert_close(raw.pos, torch.as_tensor(clouds.relative_positions), rtol=0, atol=1e-12)
    torch.testing.assert_close(raw.scal[:, -1], torch.as_tensor(clouds.radius), rtol=0, atol=1e-9)
    torch.testing.assert_close(raw.weight, torch.as_tensor(clouds.weights), rtol=0, atol=1e-9)
    assert raw.weight.min() >= 0 and raw.scal[:, -1].max() <= 1 + 1e-9
    volume = fields["nodal_volume"]
    expected = volume[clouds.indices] / volume[np.repeat(clouds.queries, clouds.sizes)]
    torch.testing.assert_close(raw.volume, torch.as_tensor(expected), rtol=1e-12, atol=0)


@pytest.fixture(scope="module")
def case_and_clouds():
    rng = np.random.default_rng(7)
    fields = random_fields(rng, 800, 2)
    sampler = OPTIONS.sampler(fields["points"], fields["velocity"], None, dtype=np.float32)
    return fields, sampler


def test_feature_values_and_layout(case_and_clouds):
    fields, sampler = case_and_clouds
    spec = FeatureSpec(
        point_scalars=("strain_rate", "wall_feature", "volume", "speed", "is_wall"),
        pair_scalars=("proximity", "upstream_cosine"),
    )
    assert FeatureSpec().point_scalars == ("strain_rate", "wall_feature", "speed")
    padded = sampler.sample(40, seed=0)
    batch = build_batch(fields, padded, spec=spec, options=OPTIONS)
    q, n = padded.indices.shape
    assert batch.pos.shape == (q, n, 2) and batch.vec.shape == (q, n, 1, 2)
    assert batch.scal.shape == (q, n, spec.num_scalars) and batch.mask.shape == (q, n)
    assert batch.weight is not None and batch.weight.shape == (q, n)
    assert batch.volume.shape == (q, n) and torch.all(batch.volume[:, 0] == 1)
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
    full = build_batch(fields, sampler.full_clouds(np.arange(5)), spec=spec, options=OPTIONS)
    assert full.mask.sum(1).tolist() == sampler.full_clouds(np.arange(5)).sizes.tolist()


def test_normalizer_fit_apply_and_round_trip(case_and_clouds):
    fields, sampler = case_and_clouds
    spec = FeatureSpec(vectors=("velocity", "pressure_gradient"))
    raw = build_batch(fields, sampler.sample(30, seed=1), spec=spec, options=OPTIONS, dtype=torch.float64)
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
    # the training range of every scalar is kept: the fitted values lie inside it
    assert restored.has_ranges
    assert not restored.outside_range(raw.scal[real]).any()
    shifted = raw.scal[real].clone()
    shifted[:, 0] = torch.as_tensor(normalizer.scalar_max[0]) + 1.0
    assert restored.outside_range(shifted)[:, 0].all()
    assert FeatureSpec.from_dict(loaded["spec"]) == spec
    batch = build_batch(
        fields, sampler.sample(30, seed=1), spec=spec, options=OPTIONS, dtype=torch.float64,
        normalizer=restored,
    )
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
        build_batch(
            fields, sampler.sample(5, seed=0), spec=FeatureSpec(point_scalars=("vorticity",)),
            options=OPTIONS,
        )
    missing = {k: v for k, v in fields.items() if k != "wall_distance"}
    with pytest.raises(ValueError, match="wall_distance"):
        build_batch(missing, sampler.sample(5, seed=0), spec=FeatureSpec(), options=OPTIONS)
    raw = build_batch(fields, sampler.sample(5, seed=0), spec=FeatureSpec(), options=OPTIONS)
    with pytest.raises(ValueError, match="fitted on"):
        FeatureNormalizer(scalar_mean=[0.0], scalar_std=[1.0], vector_scale=[1.0]).apply(raw)
    with pytest.raises(ValueError, match="keys"):
        FeatureNormalizer().load_state_dict({"scalar_mean": []})
    assert isinstance(raw, CloudBatch)


def test_upstream_cosine_is_continuous_where_the_velocity_vanishes():
    # Round-off in a wall velocity (1e-15 in any direction) must not flip the feature: the
    # cosine fades out below speeds of about the spec's floor instead of jumping.
    rng = np.random.default_rng(3)
    fields = random_fields(rng, 300, 2)
    spec = FeatureSpec(pair_scalars=("upstream_cosine",))
    values = []
    for speed in (1e-15, -1e-15, 1e-9, 0.0):
        case = dict(fields, velocity=fields["velocity"].copy())
        case["velocity"][5] = [speed, speed]
        table = FieldTable.from_cases([case], spec=spec, options=OPTIONS, dtype=torch.float64)
        raw = entry_inputs(table, torch.tensor([0]), torch.tensor([5]))
        values.append(float(raw.scal[0, -1]))
    assert max(abs(v) for v in values) < 1e-5
    fast = FieldTable.from_cases([fields], spec=spec, options=OPTIONS, dtype=torch.float64)
    raw = entry_inputs(fast, torch.zeros(300, dtype=torch.int64), torch.arange(300))
    cosine = raw.scal[:, -1].numpy()
    relative = fields["points"] - fields["points"][0]
    speed = np.linalg.norm(fields["velocity"], axis=1)
    exact = np.einsum("ij,ij->i", relative, fields["velocity"]) / np.maximum(
        np.linalg.norm(relative, axis=1) * speed, 1e-300
    )
    moving = speed > 0.1
    np.testing.assert_allclose(cosine[moving][1:], exact[moving][1:], rtol=1e-4, atol=1e-6)
