import itertools

import numpy as np
import pytest

from vcnn._regions import ellipse_semi_axes, smooth_switch
from vcnn.clouds import CloudSampler

D, ZETA, EPS = 0.02, 3.0, 0.2


def reference_clouds(points, velocity, period, along, across, *, images=8):
    """Brute force O(N^2 images): for every query, the (index, relative position) inside."""
    dim = points.shape[1]
    period = np.asarray(period, float)
    shifts = [
        np.array(s) * period
        for s in itertools.product(*[range(-images, images + 1) if p > 0 else [0] for p in period])
    ]
    speed = np.linalg.norm(velocity, axis=1)
    result = []
    for q in range(points.shape[0]):
        e = velocity[q] / speed[q] if speed[q] > 0 else np.zeros(dim)
        inside, near = [], []
        for shift in shifts:
            rel = points + shift - points[q]
            par = rel @ e
            r2 = par**2 / along[q] ** 2 + ((rel**2).sum(1) - par**2) / across**2
            inside += [(j, tuple(np.round(rel[j], 6))) for j in np.flatnonzero(r2 <= 1)]
            near += [j for j in np.flatnonzero(np.abs(r2 - 1) < 1e-9)]
        result.append((set(inside), set(near)))
    return result


def random_case(rng, n, dim, period):
    box = np.where(np.asarray(period) > 0, period, 1.3)
    points = rng.random((n, dim)) * box
    velocity = rng.normal(size=(n, dim)) * 1.5
    velocity[:4] = 0.0
    return points, velocity


@pytest.mark.parametrize(
    "dim, period",
    [
        (2, [0.0, 0.0]),
        (2, [1.0, 0.0]),
        (2, [0.45, 0.45]),  # ellipses several periods long: many images of one point
        (3, [0.0, 0.0, 0.0]),
        (3, [1.0, 0.0, 1.0]),
    ],
)
def test_ellipse_membership_matches_brute_force(dim, period):
    rng = np.random.default_rng(dim * 10 + int(sum(period) * 100))
    # Fewer points where the reference loops over many images.
    points, velocity = random_case(rng, 300 if sum(p > 0 for p in period) < 2 else 120, dim, period)
    sampler = CloudSampler(points, velocity, period=period, diffusivity=D, zeta=ZETA, dtype=np.float64)
    clouds = sampler.full_clouds()
    along, across = ellipse_semi_axes(np.linalg.norm(velocity, axis=1), diffusivity=D, zeta=ZETA, eps=EPS)
    shortest = min([p for p in period if p > 0], default=1.0)
    images = int(np.ceil(along.max() / shortest)) + 1  # enough images to cover every cloud
    reference = reference_clouds(points, velocity, period, along, across, images=images)
    for q, (expected, near) in enumerate(reference):
        part = slice(clouds.offsets[q], clouds.offsets[q + 1])
        assert clouds.indices[part][0] == q
        assert np.all(clouds.relative_positions[part][0] == 0)
        got = {
            (j, tuple(np.round(r, 6)))
            for j, r in zip(clouds.indices[part], clouds.relative_positions[part])
        }
        assert len(got) == part.stop - part.start  # no entry twice
        differ = {j for j, _ in got ^ expected}
        assert differ <= set(near), f"cloud {q} differs at {differ}"


def test_cloud_straddles_periodic_boundary():
    points = np.array([[0.01, 0.5], [0.99, 0.5], [0.5, 0.5], [0.98, 0.52]])
    velocity = np.zeros_like(points)
    sampler = CloudSampler(points, velocity, period=[1.0, 0.0], diffusivity=D, zeta=ZETA)
    clouds = sampler.full_clouds(np.array([0]))
    assert clouds.indices.tolist()[0] == 0
    assert set(clouds.indices.tolist()) == {0, 1, 3}
    rel = dict(zip(clouds.indices.tolist(), clouds.relative_positions.tolist()))
    np.testing.assert_allclose(rel[1], [-0.02, 0.0], atol=1e-6)


def test_semi_axes_formula():
    speed = np.array([0.0, 0.5, 1.4, 1e4])
    along, across = ellipse_semi_axes(speed, diffusivity=0.1, zeta=3.0, eps=0.2)
    log_eps = abs(np.log(0.2))
    assert across == pytest.approx(np.sqrt(0.1 / 3.0) * log_eps)
    direct = 2 * 0.1 * log_eps / (np.sqrt(speed[:3] ** 2 + 4 * 0.1 * 3.0) - speed[:3])
    np.testing.assert_allclose(along[:3], direct, rtol=1e-12)
    assert along[0] == pytest.approx(across)
    assert np.all(np.diff(along) > 0) and np.all(along >= across)
    assert np.isfinite(along[-1]) and along[-1] == pytest.approx(log_eps * 1e4 / 3.0, rel=1e-6)


def test_zero_velocity_gives_circle_of_radius_b():
    rng = np.random.default_rng(3)
    points = rng.random((500, 2))
    sampler = CloudSampler(points, np.zeros_like(points), diffusivity=D, zeta=ZETA)
    _, across = sampler.semi_axes
    clouds = sampler.full_clouds()
    for q in (0, 17, 250):
        distance = np.linalg.norm(points - points[q], axis=1)
        part = slice(clouds.offsets[q], clouds.offsets[q + 1])
        assert set(clouds.indices[part].tolist()) == set(np.flatnonzero(distance <= across).tolist())
        np.testing.assert_allclose(clouds.radius[part], distance[clouds.indices[part]] / across, rtol=1e-5)


def test_ball_and_knn_match_brute_force():
    rng = np.random.default_rng(4)
    points = rng.random((400, 2))
    velocity = rng.normal(size=(400, 2))
    period = [1.0, 0.0]
    image = points + [1.0, 0.0]
    image_left = points - [1.0, 0.0]
    ball = CloudSampler(points, velocity, period=period, region="ball", radius=0.15).full_clouds()
    knn = CloudSampler(points, velocity, period=period, region="knn", k=12).full_clouds()
    assert np.all(knn.sizes == 12) and knn.weights is None
    for q in (0, 99, 301):
        distance = np.min(
            [np.linalg.norm(p - points[q], axis=1) for p in (points, image, image_left)], axis=0
        )
        part = slice(ball.offsets[q], ball.offsets[q + 1])
        assert ball.indices[part][0] == q
        assert set(ball.indices[part].tolist()) == set(np.flatnonzero(distance <= 0.15).tolist())
        part = slice(knn.offsets[q], knn.offsets[q + 1])
        assert knn.indices[part][0] == q
        assert set(knn.indices[part].tolist()) == set(np.argsort(distance)[:12].tolist())


@pytest.fixture(scope="module")
def sampler():
    rng = np.random.default_rng(5)
    points = rng.random((2000, 2)) * [2.0, 1.0]
    velocity = np.stack([np.ones(2000), 0.3 * np.sin(3 * points[:, 0])], axis=1)
    return CloudSampler(points, velocity, period=[2.0, 0.0], diffusivity=D, zeta=ZETA)


def test_samples_are_subsets_without_duplicates_and_reproducible(sampler):
    clouds = sampler.full_clouds()
    sizes = clouds.sizes
    n = int(np.median(sizes))  # some clouds smaller than n, some larger
    assert sizes.min() < n < sizes.max()
    first = sampler.sample(n, seed=11)
    again = sampler.sample(n, seed=11)
    other = sampler.sample(n, seed=12)
    np.testing.assert_array_equal(first.indices, again.indices)
    assert not np.array_equal(first.indices, other.indices)
    # the indices alone (what the training draw takes): the same draw
    queries = np.arange(3, sampler.num_points, 7)
    np.testing.assert_array_equal(
        sampler.sample_points(n, queries=queries, seed=11),
        sampler.sample(n, queries=queries, seed=11).indices,
    )
    assert first.indices.shape == (sampler.num_points, n)
    np.testing.assert_array_equal(first.indices[:, 0], np.arange(sampler.num_points))
    np.testing.assert_array_equal(first.sizes, np.minimum(sizes, n))
    for q in range(0, sampler.num_points, 37):
        row = first.indices[q][first.mask[q]]
        part = slice(clouds.offsets[q], clouds.offsets[q + 1])
        full = {(j, tuple(np.round(r, 5))) for j, r in zip(clouds.indices[part], clouds.relative_positions[part])}
        drawn = {(j, tuple(np.round(r, 5))) for j, r in zip(row, first.relative_positions[q][first.mask[q]])}
        assert len(drawn) == row.size and drawn <= full
        assert np.all(first.indices[q][~first.mask[q]] == -1)
        assert np.all(first.relative_positions[q][~first.mask[q]] == 0)
        assert np.all(first.weights[q][~first.mask[q]] == 0)


def test_sampling_is_uniform():
    points = np.stack([np.linspace(0, 0.1, 40), np.zeros(40)], axis=1)
    sampler = CloudSampler(points, np.zeros_like(points), region="ball", radius=1.0)
    counts = np.zeros(40)
    for seed in range(400):
        counts[sampler.sample_entries(6, queries=np.array([0]), seed=seed).entries[0, 1:]] += 1
    ids = np.argsort(sampler.extended_origin)
    others = counts[ids][1:]
    assert others.sum() == 400 * 5
    expected = 400 * 5 / 39
    assert np.all(np.abs(others - expected) < 5 * np.sqrt(expected))  # chi-like bound


def test_padded_masks(sampler):
    clouds = sampler.full_clouds(np.array([3, 1, 4]))
    padded = sampler.padded(np.array([3, 1, 4]), max_points=int(clouds.sizes.max()) + 2)
    np.testing.assert_array_equal(padded.mask.sum(1), clouds.sizes)
    np.testing.assert_array_equal(padded.indices[:, 0], [3, 1, 4])
    assert np.all(padded.indices[~padded.mask] == -1)
    assert np.all(padded.indices[padded.mask] >= 0)
    with pytest.raises(ValueError, match="max_points"):
        clouds.to_padded(max_points=2)


def test_smooth_switch():
    r = np.linspace(0, 1.2, 24001)
    s = smooth_switch(r, start=0.8)
    assert np.all((s >= 0) & (s <= 1))
    assert np.all(s[r <= 0.8] == 1) and np.all(s[r >= 1] == 0)
    assert np.all(np.diff(s) <= 0)
    slope = np.diff(s) / np.diff(r)
    assert np.max(np.abs(np.diff(slope))) < 1e-2  # C^1: no jump in the slope
    assert abs(slope[0]) < 1e-12 and abs(slope[-1]) < 1e-12
    assert np.max(np.abs(slope)) == pytest.approx(15 / 8 / 0.2, rel=1e-3)


def test_weights_follow_radius(sampler):
    clouds = sampler.full_clouds(np.arange(50))
    assert np.all(clouds.radius <= 1 + 1e-6)
    np.testing.assert_allclose(clouds.weights, smooth_switch(clouds.radius, start=sampler.cutoff_start), atol=1e-6)
    no_weights = CloudSampler(np.random.rand(10, 2), np.ones((10, 2)), cutoff_start=None)
    assert no_weights.full_clouds().weights is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"points": np.zeros((0, 2)), "velocity": np.zeros((0, 2))}, "empty"),
        ({"points": np.array([[0.0, np.nan]]), "velocity": np.zeros((1, 2))}, "NaN"),
        ({"points": np.zeros((2, 2)), "velocity": np.array([[np.inf, 0], [0, 0]])}, "NaN or inf"),
        ({"points": np.zeros((2, 2)), "velocity": np.zeros((2, 3))}, "shape of points"),
        ({"points": np.zeros((2, 2)), "velocity": np.zeros((2, 2)), "period": [1.0]}, "period"),
        ({"points": np.zeros((2, 2)), "velocity": np.zeros((2, 2)), "region": "box"}, "region"),
        ({"points": np.zeros((2, 2)), "velocity": np.zeros((2, 2)), "region": "ball"}, "radius"),
        ({"points": np.zeros((2, 2)), "velocity": np.zeros((2, 2)), "region": "knn", "k": 3}, "k"),
        ({"points": np.zeros((2, 2)), "velocity": np.zeros((2, 2)), "eps": 1.5}, "eps"),
        ({"points": np.zeros((2, 2)), "velocity": np.zeros((2, 2)), "diffusivity": 0.0}, "diffusivity"),
        ({"points": np.zeros((2, 1)), "velocity": np.zeros((2, 1))}, "d >= 2"),
    ],
)
def test_bad_input_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CloudSampler(**kwargs)


def test_bad_queries_and_sample_size(sampler):
    for n in (0, -3, 2.5):
        with pytest.raises(ValueError, match="n"):
            sampler.sample(n)
    with pytest.raises(ValueError, match="point indices"):
        sampler.full_clouds(np.array([sampler.num_points]))
    with pytest.raises(ValueError, match="integer"):
        sampler.full_clouds(np.array([0.5]))


def test_zero_velocity_everywhere_and_single_point():
    single = CloudSampler(np.zeros((1, 2)), np.zeros((1, 2))).full_clouds()
    assert single.sizes.tolist() == [1] and single.indices.tolist() == [0]


def test_inner_chord_bounds_are_inside_and_tight():
    from vcnn._regions import inner_chord_bounds

    rng = np.random.default_rng(21)
    count = 3000
    for dim in (2, 3):
        direction = rng.normal(size=(count, dim))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        direction[:20] = 0.0  # balls
        across = 0.3
        along = rng.uniform(across, 2.0, count)
        lower = rng.uniform(-0.45, 0.4, (count, dim - 1))
        upper = lower + rng.uniform(0.01, 0.15, (count, dim - 1))
        low, high = inner_chord_bounds(direction, along, across, 1, lower, upper)
        has = low <= high
        assert 0.2 < has.mean() < 1.0  # both cases occur
        transverse = [axis for axis in range(dim) if axis != 1]
        for trial in range(6):  # random points of the accepted box, then its corners
            point = np.empty((count, dim))
            point[:, transverse] = lower + rng.random((count, dim - 1)) * (upper - lower)
            point[:, 1] = np.where(has, low, 0.0) + rng.random(count) * np.where(has, high - low, 0.0)
            if trial == 0:  # the worst corner: exactly on the boundary for some pair
                point[:, transverse] = np.where(rng.random((count, dim - 1)) < 0.5, lower, upper)
            parallel = np.einsum("ij,ij->i", point, direction)
            radius_sq = parallel**2 / along**2 + (np.einsum("ij,ij->i", point, point) - parallel**2) / across**2
            assert np.all(radius_sq[has] <= 1 + 1e-9)
        # Tight: some corner of every non-empty cell sits on the boundary at low or high.
        corners = itertools.product(*[(0, 1)] * (dim - 1))
        closest = np.full(count, np.inf)
        for corner in corners:
            point = np.empty((count, dim))
            point[:, transverse] = np.where(np.array(corner, bool), upper, lower)
            for end in (low, high):
                point[:, 1] = np.where(has, end, 0.0)
                parallel = np.einsum("ij,ij->i", point, direction)
                radius_sq = parallel**2 / along**2 + (np.einsum("ij,ij->i", point, point) - parallel**2) / across**2
                closest = np.minimum(closest, np.abs(radius_sq - 1))
        assert np.all(closest[has] < 1e-9)


@pytest.mark.parametrize("size", [1000, 5_000_000])  # numpy path, torch path
def test_fill_runs_matches_concatenated_ranges(size):
    from vcnn.clouds import _fill_runs

    rng = np.random.default_rng(size)
    lengths = rng.integers(0, 2 * size // 300, 300)
    gaps = rng.integers(0, 3, 300)
    positions = np.cumsum(lengths + gaps) - lengths - gaps
    starts = rng.integers(0, 2**30, 300)
    out = np.empty(int(positions[-1] + lengths[-1] + gaps[-1]), dtype=np.int32)
    _fill_runs(out, positions, starts, lengths)
    for position, start, length in zip(positions, starts, lengths):
        np.testing.assert_array_equal(out[position : position + length], start + np.arange(length))


def test_many_chunks_and_threads_give_the_same_clouds():
    rng = np.random.default_rng(8)
    points = rng.random((1500, 2)) * [3.0, 1.0]
    velocity = np.stack([1 + points[:, 1], 0.4 * np.cos(2 * points[:, 0])], axis=1)
    options = dict(period=[3.0, 0.0], diffusivity=D, zeta=ZETA)
    one = CloudSampler(points, velocity, workers=1, chunk_size=100_000, **options)
    many = CloudSampler(points, velocity, workers=2, chunk_size=37, **options)
    queries = rng.integers(0, 1500, 700)  # repeats and any order
    first, second = one.full_clouds(queries), many.full_clouds(queries)
    assert first.indices.dtype == np.int32
    np.testing.assert_array_equal(first.offsets, second.offsets)
    np.testing.assert_array_equal(first.indices, second.indices)
    np.testing.assert_array_equal(first.indices[first.offsets[:-1]], queries)
    np.testing.assert_allclose(first.relative_positions, second.relative_positions)
    # All points: computed, then served from the cached index, then sampled from it.
    fresh = many.full_clouds()
    cached = many.full_clouds()
    np.testing.assert_array_equal(fresh.indices, cached.indices)
    np.testing.assert_allclose(fresh.radius, cached.radius)
    for q in queries[:50]:
        row = slice(first.offsets[np.flatnonzero(queries == q)[0]], None)
        expected = fresh.indices[fresh.offsets[q] : fresh.offsets[q + 1]]
        np.testing.assert_array_equal(first.indices[row][: expected.size], expected)
    # Samples do not depend on the thread count or on how the index was built.
    np.testing.assert_array_equal(
        one.sample_entries(40, seed=3).entries, many.sample_entries(40, seed=3).entries
    )


def test_lazy_geometry_matches_direct_formula(sampler):
    clouds = sampler.full_clouds(np.arange(0, 2000, 7))
    assert "_values" not in clouds.__dict__  # nothing computed until asked
    rows = np.repeat(clouds.queries, clouds.sizes)
    points = np.random.default_rng(5).random((2000, 2)) * [2.0, 1.0]  # as in the fixture
    relative = points[clouds.indices] - points[rows]
    relative[:, 0] -= 2.0 * np.round(relative[:, 0] / 2.0)  # clouds are smaller than the period
    np.testing.assert_allclose(clouds.relative_positions, relative, atol=1e-6)
    along, across = sampler.semi_axes
    velocity = np.stack([np.ones(2000), 0.3 * np.sin(3 * points[:, 0])], axis=1)
    direction = velocity / np.linalg.norm(velocity, axis=1, keepdims=True)
    parallel = np.einsum("ij,ij->i", relative, direction[rows])
    radius = np.sqrt(parallel**2 / along[rows] ** 2 + ((relative**2).sum(1) - parallel**2) / across**2)
    np.testing.assert_allclose(clouds.radius, radius, atol=1e-6)
    np.testing.assert_allclose(clouds.weights, smooth_switch(radius, start=sampler.cutoff_start), atol=1e-5)


def test_dense_sampling_path_is_uniform():
    # 12 points, n = 8: fewer than 2 (n - 1) others, so random keys are ranked instead.
    points = np.stack([np.linspace(0, 0.1, 12), np.zeros(12)], axis=1)
    sampler = CloudSampler(points, np.zeros_like(points), region="ball", radius=1.0)
    counts = np.zeros(12)
    draws = sampler.sample_entries(8, queries=np.zeros(600, dtype=int), seed=1).entries
    assert np.all(np.sort(draws, axis=1)[:, 1:] != np.sort(draws, axis=1)[:, :-1])
    np.add.at(counts, draws[:, 1:].ravel(), 1)
    others = counts[np.argsort(sampler.extended_origin)][1:]
    expected = 600 * 7 / 11
    assert np.all(np.abs(others - expected) < 5 * np.sqrt(expected))
