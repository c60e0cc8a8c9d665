"""The cloud quadrature in 3-D: the ball rule, its frame, invariance and continuity."""

from mpi4py import MPI

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.sparse import csr_matrix

from tests.test_cloud_quadrature import QuadratureCloudModel
from tests.test_simulate3d import serial_and_two_rank_reports, tau_by_position
from vcnn._regions import smooth_switch
from vcnn.casefile import Case
from vcnn.closure import load_closure
from vcnn.cloud_quadrature import (
    AUTO_QUADRATURE_CLOUD_SIZE_3D,
    CloudQuadrature,
    QuadratureOptions,
    _ball_rule,
    auto_clouds,
    estimated_full_cloud_size,
    quadrature_unavailable,
)
from vcnn.clouds import CloudOptions
from vcnn.network import VectorCloudNet
from vcnn.symmetry import check_frame_independence

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "experiments" / "hills3d" / "model" / "best.pt"
OPTIONS = CloudOptions(region="ellipse", diffusivity=0.1, zeta=3.0)
# the shipped 3-D model's clouds (semi-axis across the flow 0.97: the channel's spacing is 0.3)
CHANNEL_OPTIONS = CloudOptions(region="ellipse", diffusivity=0.1, zeta=3.0, eps=0.005)
# a small rule: the tests check the rule's properties, not its accuracy
SMALL = QuadratureOptions(shells=3, polar=3, azimuthal=6, neighbours=2)


def _sphere_monomial(a: int, b: int, c: int) -> float:
    """int over the unit ball of x^a y^b z^c."""
    if a % 2 or b % 2 or c % 2:
        return 0.0
    surface = 2.0 * math.prod(math.gamma((k + 1) / 2) for k in (a, b, c))
    surface /= math.gamma((a + b + c + 3) / 2)
    return surface / (a + b + c + 3)


def _random_rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def test_the_ball_rule_integrates_polynomials_exactly():
    options = QuadratureOptions(shells=4, polar=4, azimuthal=8)
    nodes, weights = _ball_rule(options, None)
    assert nodes.shape == (options.nodes_in(3), 3) and np.all(weights > 0)
    assert np.all(np.linalg.norm(nodes, axis=1) < 1.0)
    # exact to degree min(2 R - 1, 2 P - 1, K - 1) = 7, in any rotated frame
    rotated = nodes @ _random_rotation(0).T
    degree = 7
    for a in range(degree + 1):
        for b in range(degree + 1 - a):
            for c in range(degree + 1 - a - b):
                monomial = rotated[:, 0] ** a * rotated[:, 1] ** b * rotated[:, 2] ** c
                value = np.dot(weights, monomial)
                assert value == pytest.approx(_sphere_monomial(a, b, c), abs=1e-12), (a, b, c)
    # degree 8 is not exact (x^8 along the axis of the polar rule)
    assert np.dot(weights, nodes[:, 0] ** 8) != pytest.approx(_sphere_monomial(8, 0, 0), rel=1e-6)
    # with the cutoff: the weights sum to the cutoff-weighted volume 4 pi int c rho^2 d rho
    _, weights = _ball_rule(QuadratureOptions(), 0.5)
    fine = np.linspace(0.0, 1.0, 200001)
    mass = 4 * np.pi * np.trapezoid(fine**2 * smooth_switch(fine, start=0.5), fine)
    assert weights.sum() == pytest.approx(mass, rel=1e-8)


def _flow(points: np.ndarray) -> np.ndarray:
    """A smooth 3-D velocity (N, 3), with every component varying."""
    x, y, z = points.T
    return np.stack(
        [0.8 + 0.2 * np.sin(x), 0.2 * np.cos(0.7 * z) + 0.1 * y, 0.3 + 0.1 * np.sin(y + z)], axis=1
    )


def test_the_quadrature_converges_to_the_ellipsoid_integral():
    # int_E c(r) |y - x0|^2 dy = a b^2 (a^2 + 2 b^2) / 3 * 4 pi int c rho^4 d rho, and
    # int_E c(r) dy = a b^2 4 pi int c rho^2 d rho: two smooth integrands on random points
    fine = np.linspace(0.0, 1.0, 200001)
    cutoff = smooth_switch(fine, start=OPTIONS.cutoff_start)
    moments = {p: 4 * np.pi * np.trapezoid(fine**p * cutoff, fine) for p in (2, 4)}
    side = 3.0  # about 3 and 6 points per semi-axis across the flow (b = 0.29)
    errors = []
    for count in (6000, 48000):
        points = np.random.default_rng(count).uniform(0.0, side, (count, 3))
        velocity = _flow(points)
        quadrature = CloudQuadrature(
            points, velocity, np.full(3, side), np.full(count, 50.0), OPTIONS
        )
        queries = np.arange(0, count, count // 40)
        clouds = quadrature.clouds(queries)
        along, across = OPTIONS.semi_axes(np.linalg.norm(velocity[queries], axis=1))
        owner = np.repeat(np.arange(queries.size), clouds.sizes)
        offset = points[clouds.indices] - points[queries][owner]
        offset -= side * np.round(offset / side)
        weights = clouds.weights.astype(np.float64)
        mass = np.bincount(owner, weights, queries.size)
        second = np.bincount(owner, weights * np.sum(offset**2, axis=1), queries.size)
        exact_mass = along * across**2 * moments[2]
        exact_second = along * across**2 * (along**2 + 2 * across**2) / 3 * moments[4]
        assert np.abs(mass / exact_mass - 1).max() < 1e-6  # the node weights: exact
        errors.append(np.abs(second / exact_second - 1).mean())
    # the values at the nodes come from the nearest points: the error falls with the spacing
    # (measured 11.5 % and 3.3 %: about the square of the spacing)
    assert errors[1] < 0.5 * errors[0] and errors[1] < 0.05, errors


def test_the_library_checker_finds_the_3d_quadrature_frame_independent():
    torch.manual_seed(0)
    net = VectorCloudNet(dim=3, num_scalars=2, num_vectors=1, embedding=(8, 8), axis_neurons=2,
                         fitting=(16,), pooling="volume")
    model = QuadratureCloudModel(net.double(), SMALL, wall_distance_scalar=True)
    rng = np.random.default_rng(1)
    batch, count = 2, 700
    direction = rng.standard_normal((batch, count, 3))
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    pos = 1.3 * np.cbrt(rng.uniform(0, 1, (batch, count, 1))) * direction
    pos[:, 0] = 0.0  # the query point
    flow = np.array([0.8, 0.3, -0.2]) + 0.3 * pos[..., [1, 2, 0]]  # a smooth velocity field
    scal = np.stack([1.0 + 0.8 * pos[..., 1], rng.standard_normal((batch, count))], axis=-1)
    report = check_frame_independence(model, pos, flow[:, :, None, :], scal, num_trials=2)
    # duplicating every point changes which points are nearest (a count, not an integral)
    failures = [name for name in report.failures(1e-9) if name != "duplication"]
    assert failures == [], report


def _channel_case(spacing: float = 0.3) -> Case:
    """A periodic 3-D channel (walls at y = 0 and 2), a smooth 3-D flow: a synthetic case."""
    axes = [np.arange(0, 6.0, spacing), np.linspace(0, 2.0, int(round(2 / spacing)) + 1),
            np.arange(0, 4.5, spacing)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    x, y, z = points.T
    profile = y * (2 - y)
    velocity = np.stack(
        [profile * (1 + 0.2 * np.sin(2 * np.pi * x / 6)),
         0.1 * profile * np.cos(2 * np.pi * z / 4.5),
         0.15 * profile * np.sin(2 * np.pi * (x / 6 + z / 4.5))], axis=1
    )
    wall = (y == 0) | (y == 2.0)
    return Case(
        points=points, velocity=velocity, tau=np.ones(len(points)),
        strain_rate=np.abs(2 - 2 * y) + 0.1 * np.abs(np.cos(x)),
        wall_distance=np.minimum(y, 2 - y), nodal_volume=np.where(wall, 0.5, 1.0) * spacing**3,
        is_wall=wall, period=np.array([6.0, 0.0, 4.5]), name="channel3d",
    )


@pytest.fixture(scope="module")
def channel():
    return _channel_case()


@pytest.fixture(scope="module")
def closure3d():
    return load_closure(str(MODEL), device="cpu")


def _tau(closure, case: Case, clouds: str) -> np.ndarray:
    return closure.predict_detailed(case, clouds=clouds, warn=False).tau


def _weights_by_point(clouds, num_points: int) -> np.ndarray:
    rows = np.repeat(np.arange(clouds.queries.size), clouds.sizes)
    return csr_matrix(
        (clouds.weights.astype(np.float64), (rows, clouds.indices)),
        shape=(clouds.queries.size, num_points),
    ).toarray()


@pytest.mark.parametrize("kind", ["rotation", "reflection", "axis-swap"])
def test_rigid_motions_and_renumbering_leave_the_3d_clouds_unchanged(channel, kind):
    order = np.random.default_rng(2).permutation(channel.num_points)
    queries = np.arange(0, channel.num_points, 7)
    if kind == "axis-swap":  # x <-> z with a reflection of y: the periods stay on axes
        matrix, period = np.array([[0, 0, 1.0], [0, -1.0, 0], [1.0, 0, 0]]), [4.5, 0.0, 6.0]
    elif kind == "reflection":
        matrix, period = np.diag([1.0, 1.0, -1.0]), [6.0, 0.0, 4.5]
    else:  # any rotation, with a translation: the clouds of interior queries do not wrap
        matrix, period = _random_rotation(5), None
    period_of = None if period is None else channel.period
    reference = CloudQuadrature(
        channel.points, channel.velocity, period_of, channel.wall_distance, CHANNEL_OPTIONS
    ).clouds(queries)
    shift = np.array([0.3, -1.1, 2.0])
    moved = CloudQuadrature(
        (channel.points @ matrix.T + shift)[order], (channel.velocity @ matrix.T)[order],
        None if period is None else np.asarray(period), channel.wall_distance[order],
        CHANNEL_OPTIONS,
    ).clouds(np.argsort(order)[queries])
    inverse = np.argsort(order)
    expected = _weights_by_point(reference, channel.num_points)
    found = _weights_by_point(moved, channel.num_points)[:, inverse]  # back to the old numbering
    # float32 weights: the selection and the float64 weights agree to round-off
    assert np.abs(found - expected).max() <= 1e-6 * expected.max()


def test_the_3d_closure_prediction_is_invariant_and_continuous(channel, closure3d, monkeypatch):
    monkeypatch.setattr(closure3d, "quadrature_options", SMALL)  # the test's time
    base = closure3d.predict_detailed(channel, clouds="quadrature", warn=False)
    assert base.clouds == "quadrature"
    assert base.quadrature == SMALL.to_dict(3)
    # mesh motion (axes swapped, y reflected) with a renumbering: float32 round-off only
    order = np.random.default_rng(0).permutation(channel.num_points)
    matrix = np.array([[0, 0, 1.0], [0, -1.0, 0], [1.0, 0, 0]])
    moved = replace(
        channel, points=(channel.points @ matrix.T)[order],
        velocity=(channel.velocity @ matrix.T)[order], tau=channel.tau[order],
        strain_rate=channel.strain_rate[order], wall_distance=channel.wall_distance[order],
        nodal_volume=channel.nodal_volume[order], is_wall=channel.is_wall[order],
        period=np.array([4.5, 0.0, 6.0]),
    )
    tau = _tau(closure3d, moved, "quadrature")
    assert np.abs(tau - base.tau[order]).max() <= 1e-5 * np.abs(base.tau).max()
    # a small change of the velocity changes tau by a bounded amount, with no jump: the
    # slope stays as the step shrinks (a jump would grow as 1 / delta), and it is a few times
    # the full clouds' (measured about 2x, largest at the walls, where u = 0)
    x = channel.points
    field = np.stack([np.sin(x[:, 0] + 1.0), np.cos(x[:, 1] + 0.5), np.sin(x[:, 2])], axis=1)
    full = _tau(closure3d, channel, "full")
    slopes = {}
    for delta in (1e-4, 1e-5):
        perturbed = replace(channel, velocity=channel.velocity + delta * field)
        change = _tau(closure3d, perturbed, "quadrature") - base.tau
        slopes[delta] = np.abs(change).max() / delta
    perturbed = replace(channel, velocity=channel.velocity + 1e-4 * field)
    full_slope = np.abs(_tau(closure3d, perturbed, "full") - full).max() / 1e-4
    assert 0 < slopes[1e-5] <= 1.5 * slopes[1e-4]
    assert slopes[1e-4] <= 10 * full_slope


def test_the_3d_frame_at_a_channel_mid_plane_is_the_wall_normal(channel):
    quadrature = CloudQuadrature(
        channel.points, channel.velocity, channel.period, channel.wall_distance, CHANNEL_OPTIONS
    )
    # the wall-distance gradient flips across the mid-plane (y = 1); the azimuth reference
    # is an axis, the same on both sides, and defined on the plane itself
    queries = np.flatnonzero(np.abs(channel.points[:, 1] - 1.0) < 0.35)
    _, mean, reference, binormal = quadrature._frames3d(queries)
    across = channel.velocity[queries]
    assert np.all(np.abs(np.abs(reference[:, 1]) - 1.0) < 0.1 + 0.5 * np.abs(across[:, 1]))
    np.testing.assert_allclose(np.sum(reference * mean, axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(binormal, axis=1), 1.0, rtol=1e-12)


def test_3d_refusals_auto_and_sizes(channel):
    assert quadrature_unavailable(OPTIONS, dim=3, pooling="volume") is None
    assert "2-D or 3-D" in quadrature_unavailable(OPTIONS, dim=1, pooling="volume")
    with pytest.raises(ValueError, match="even"):
        QuadratureOptions(azimuthal=7)
    options = QuadratureOptions()
    assert options.to_dict() == {"radial": 8, "angular": 12, "neighbours": 2}  # 2-D keys
    assert options.entries_in(3) == 1 + options.shells * options.polar * options.azimuthal * 2
    clouds = CloudQuadrature(
        channel.points, channel.velocity, channel.period, channel.wall_distance, CHANNEL_OPTIONS
    ).clouds(np.arange(0, channel.num_points, 9))
    assert np.all(clouds.sizes == options.entries_in(3))
    assert np.all(clouds.indices[clouds.offsets[:-1]] == clouds.queries)
    # the estimated full cloud (an ellipsoid's volume) against the real full clouds
    speed = np.linalg.norm(channel.velocity, axis=1)
    estimate = estimated_full_cloud_size(CHANNEL_OPTIONS, speed, channel.nodal_volume, dim=3)
    actual = CHANNEL_OPTIONS.sampler(channel.points, channel.velocity, channel.period).full_clouds()
    assert 0.8 * actual.sizes.mean() <= estimate <= 1.3 * actual.sizes.mean()
    dense = channel.nodal_volume * estimate / (2 * AUTO_QUADRATURE_CLOUD_SIZE_3D)
    common = dict(dim=3, pooling="volume", speed=speed)
    assert auto_clouds(CHANNEL_OPTIONS, nodal_volume=dense, **common) == "quadrature"
    assert auto_clouds(CHANNEL_OPTIONS, nodal_volume=dense * 4, **common) == "full"
    assert auto_clouds(CHANNEL_OPTIONS, nodal_volume=dense, device_type="cuda", **common) == "full"


@pytest.mark.mpi
def test_two_ranks_predict_the_serial_3d_tau_with_quadrature_clouds(tmp_path):
    if MPI.COMM_WORLD.size > 1:
        pytest.skip("launches its own MPI runs")
    options = ["--model", str(MODEL), "--crest-amplitude", "0.2", "--resolution", "0.05",
               "--span-cells", "2", "--clouds", "quadrature"]
    serial, parallel = serial_and_two_rank_reports(tmp_path, options)
    # The same tau from each rank's points and halo: the halo holds every point a node reads
    # and every point the fits read. (The script's entry-by-entry comparison is not asserted:
    # where a point's azimuth reference is nearly perpendicular to its wall-distance gradient
    # the round-off of the fits' sums, summed in another order on a rank, may list the same
    # nodes from the opposite azimuth, the same integral in another order of entries.)
    assert sum(parallel["owned_points"]) == serial["num_points"]
    expected, found = tau_by_position(serial), tau_by_position(parallel)
    assert np.abs(found - expected).max() <= 1e-6 * np.abs(expected).max()
