"""The cloud quadrature: bounded weighted clouds that stand in for full clouds."""

from mpi4py import MPI

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from meshes.structured import structured_hill_mesh
from solvers.boundaries import hill_boundary_spec
from solvers.closures import PdeClosure
from solvers.problem import ClosureProblem
from vcnn._regions import smooth_switch
from vcnn.closure import load_closure
from vcnn.cloud_quadrature import (
    CloudQuadrature,
    QuadratureOptions,
    _rule,
    quadrature_unavailable,
)
from vcnn.clouds import CloudOptions
from vcnn.engines import CloudSet, PassData
from vcnn.engines.device import DeviceEngine
from vcnn.engines.kernels import KernelUnavailable
from vcnn.features import FieldTable
from vcnn.inference import predict_full_clouds
from vcnn.network import VectorCloudNet
from vcnn.physics import Physics
from vcnn.symmetry import check_frame_independence
from vcnn.system import TooLargeError

OPTIONS = CloudOptions(region="ellipse", diffusivity=0.1, zeta=3.0)


def _relative(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def hill_case():
    """The alpha = 1 hill at resolution 0.3 (60 x 60 cells): flow and tau solved."""
    tagged = structured_hill_mesh(1.0, resolution=0.3, comm=MPI.COMM_WORLD)
    spec = hill_boundary_spec(tagged.boundaries, tagged.period)
    with ClosureProblem.from_tagged_mesh(tagged, spec, Physics()) as problem:
        problem.solve_flow()
        with PdeClosure(problem) as pde:
            tau = pde.evaluate(problem).tau
        return problem.case(tau, name="hill_a1.000", meta={"alpha": 1.0})


@pytest.fixture(scope="module")
def closure():
    return load_closure("experiments/published/model/best.pt", device="cpu")


def test_radial_rule_integrates_the_cutoff_measure_exactly():
    radii, weights, angles = _rule(QuadratureOptions(radial=4, angular=6), None)
    # Gauss rule of rho d rho on [0, 1]: exact for rho^k, k <= 7, int = 1 / (k + 2)
    for power in range(8):
        assert np.dot(weights, radii**power) == pytest.approx(1.0 / (power + 2), rel=1e-12)
    assert np.all((radii > 0) & (radii < 1))
    np.testing.assert_allclose(np.sort(np.mod(-angles, 2 * np.pi)), np.sort(angles), atol=1e-12)
    # with the cutoff: the mass int c(rho) rho d rho, every radius where c leaves weight
    radii, weights, _ = _rule(QuadratureOptions(radial=6), 0.5)
    fine = np.linspace(0.0, 1.0, 200001)
    mass = np.trapezoid(fine * smooth_switch(fine, start=0.5), fine)
    assert weights.sum() == pytest.approx(mass, rel=1e-8)
    assert smooth_switch(radii, start=0.5).min() > 0.01


def test_quadrature_matches_full_clouds_on_a_hill_case(hill_case, closure):
    full = closure.predict_detailed(hill_case, clouds="full")
    quadrature = closure.predict_detailed(hill_case, clouds="quadrature")
    assert (full.clouds, quadrature.clouds) == ("full", "quadrature")
    assert quadrature.quadrature == QuadratureOptions().to_dict()
    # on the half-resolution hills the two differ by 0.6-1.4 % and their errors against the
    # PDE's tau by at most 0.16 points (experiments/quadrature_error.py); this coarse mesh
    # gets looser bounds
    assert _relative(quadrature.tau, full.tau) < 0.02
    error_full = 100 * _relative(full.tau, hill_case.tau)
    error_quadrature = 100 * _relative(quadrature.tau, hill_case.tau)
    assert abs(error_quadrature - error_full) < 0.5


def test_every_backend_runs_quadrature_clouds_alike(hill_case, closure):
    queries = np.arange(0, hill_case.num_points, 11)
    clouds = CloudQuadrature(
        hill_case.points, hill_case.velocity, hill_case.period, hill_case.wall_distance,
        closure.cloud_options,
    ).clouds(queries)
    table = FieldTable.from_cases(
        [hill_case], spec=closure.spec, options=closure.cloud_options, device="cpu"
    )
    outputs = {}
    for engine in ("fused", "sparse", "padded"):
        try:
            result = predict_full_clouds(
                closure.model, table, closure.normalizer, clouds.offsets, clouds.indices,
                clouds.queries, engine=engine, compile=False, weights=clouds.weights,
            )
        except Exception as error:  # noqa: BLE001 - the fused kernels need a C compiler
            if engine == "fused":
                continue
            raise error
        outputs[engine] = result.output
    # the device backend on CPU tensors (torch moments), as on a GPU
    device = DeviceEngine(cuda_only=False, fused=False).full_clouds(
        closure.model, PassData(table, closure.normalizer)
    )
    checked = CloudSet.checked(clouds.offsets, clouds.indices, clouds.queries, weights=clouds.weights)
    outputs["device"] = device(checked, chunk_entries=4099).output
    reference = outputs["padded"]
    for engine, output in outputs.items():
        assert np.abs(output - reference).max() <= 1e-5 * np.abs(reference).max(), engine
    # the weights matter: equal weights give another prediction
    flat = predict_full_clouds(
        closure.model, table, closure.normalizer, clouds.offsets, clouds.indices,
        clouds.queries, engine="padded", weights=np.ones_like(clouds.weights),
    ).output
    assert np.abs(flat - reference).max() > 1e-3 * np.abs(reference).max()


def _moved_case(case, matrix, order):
    """The case with its points moved by an orthogonal matrix and renumbered."""
    period = np.abs(matrix) @ case.period  # axis swaps and reflections keep it axis-aligned
    return replace(
        case,
        points=(case.points @ matrix.T)[order],
        velocity=(case.velocity @ matrix.T)[order],
        tau=case.tau[order],
        strain_rate=case.strain_rate[order],
        wall_distance=case.wall_distance[order],
        nodal_volume=case.nodal_volume[order],
        is_wall=case.is_wall[order],
        period=period,
        extra={},
    )


@pytest.mark.parametrize(
    "matrix",
    [np.eye(2), [[-1.0, 0.0], [0.0, 1.0]], [[0.0, -1.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]],
    ids=["permutation", "reflection", "rotation", "axis-swap"],
)
def test_mesh_motions_and_renumbering_leave_the_prediction_unchanged(hill_case, closure, matrix):
    matrix = np.asarray(matrix)
    order = np.random.default_rng(0).permutation(hill_case.num_points)
    reference = closure.predict(hill_case, clouds="quadrature")
    moved = closure.predict(_moved_case(hill_case, matrix, order), clouds="quadrature")
    # float32 round-off of the fused pass (the selection itself is exact)
    assert np.abs(moved - reference[order]).max() <= 1e-5 * np.abs(reference).max()


class QuadratureCloudModel(torch.nn.Module):
    """A cloud model for the symmetry checker: quadrature of the cloud's own points, then a net.

    The cloud's points (relative to the query, which is the point nearest the origin) are a
    small mesh; the quadrature picks and weighs entries from it by invariant geometry only.

    Args:
        net: the network run on the quadrature cloud.
        rule: the quadrature rule.
        wall_distance_scalar: the first scalar is the wall distance (a wall that cuts the
            cloud); False: no wall nearby.
    """

    def __init__(
        self, net: VectorCloudNet, rule: QuadratureOptions, *, wall_distance_scalar: bool
    ) -> None:
        super().__init__()
        self.net = net
        self.rule = rule
        self.wall_distance_scalar = wall_distance_scalar
        self.pooling = "volume"
        self.output_kind = "scalar"

    def forward(self, pos, vec, scal, mask=None, weight=None, volume=None):
        outputs = []
        for b in range(pos.shape[0]):
            real = mask[b]
            points = pos[b][real].double().numpy()
            velocity = vec[b][real][:, 0].double().numpy()
            query = int(np.argmin(np.linalg.norm(points, axis=1)))
            wall_distance = (
                scal[b][real][:, 0].double().numpy()
                if self.wall_distance_scalar
                else np.full(len(points), 10.0)
            )
            clouds = CloudQuadrature(
                points, velocity, None, wall_distance, OPTIONS, options=self.rule
            ).clouds(np.array([query]))
            rows = torch.as_tensor(clouds.indices)
            relative = pos[b][real][rows] - pos[b][real][query]
            outputs.append(
                self.net(
                    relative[None],
                    vec[b][real][rows][None],
                    scal[b][real][rows][None],
                    mask=torch.ones(1, rows.numel(), dtype=torch.bool),
                    weight=torch.as_tensor(clouds.weights, dtype=pos.dtype)[None],
                    volume=torch.ones(1, rows.numel(), dtype=pos.dtype),
                )
            )
        return torch.cat(outputs)


def test_the_library_checker_finds_the_quadrature_frame_independent():
    torch.manual_seed(0)
    net = VectorCloudNet(dim=2, num_scalars=2, num_vectors=1, embedding=(8, 8), axis_neurons=2,
                         fitting=(16,), pooling="volume")
    model = QuadratureCloudModel(
        net.double(), QuadratureOptions(radial=4, angular=8, neighbours=3),
        wall_distance_scalar=False,
    )
    rng = np.random.default_rng(1)
    batch, count = 3, 500
    angle = rng.uniform(0, 2 * np.pi, (batch, count))
    radius = 1.2 * np.sqrt(rng.uniform(0, 1, (batch, count)))
    pos = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=-1)
    pos[:, 0] = 0.0  # the query point
    flow = np.array([0.8, 0.3]) + 0.2 * pos[..., ::-1]  # a smooth velocity field
    vec = flow[:, :, None, :]
    scal = rng.standard_normal((batch, count, 2))
    report = check_frame_independence(model, pos, vec, scal, num_trials=2)
    # duplicating every point changes which points are nearest (a count, not an integral)
    failures = [name for name in report.failures(1e-9) if name != "duplication"]
    assert failures == [], report


def test_bounded_change_under_a_small_velocity_perturbation(hill_case, closure):
    x = hill_case.points
    field = np.stack([np.sin(2 * np.pi * x[:, 0] / 9.0 + 1.0), np.cos(x[:, 1] + 0.5)], axis=1)
    field *= np.linalg.norm(hill_case.velocity, axis=1, keepdims=True).max()
    base = {mode: closure.predict(hill_case, clouds=mode) for mode in ("full", "quadrature")}
    slopes = {}
    for delta in (1e-4, 1e-5):
        moved = replace(hill_case, velocity=hill_case.velocity + delta * field)
        for mode in ("full", "quadrature"):
            change = np.abs(closure.predict(moved, clouds=mode) - base[mode]).max()
            slopes[mode, delta] = change / delta
    # Lipschitz-like: |d tau| <= C |d u| with C a few times the full clouds' (measured about
    # 5x on the published-resolution hill: the nodes move across the mesh), and no jump: the
    # slope stays as the step shrinks (a jump would make it grow as 1 / delta)
    assert slopes["quadrature", 1e-4] <= 10 * slopes["full", 1e-4]
    assert slopes["quadrature", 1e-5] <= 1.5 * slopes["quadrature", 1e-4]


def _grid_case(spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Points of a periodic 4 x 2 box at a spacing, and a smooth velocity."""
    xs = np.arange(0, 4, spacing)
    ys = np.arange(0, 2, spacing)
    points = np.stack(np.meshgrid(xs, ys, indexing="ij"), axis=-1).reshape(-1, 2)
    velocity = np.stack(
        [1 + 0.3 * np.sin(np.pi * points[:, 1]), 0.2 * np.cos(np.pi * points[:, 0] / 2)], axis=1
    )
    return points, velocity


def test_points_per_cloud_are_bounded_independent_of_the_resolution():
    options = QuadratureOptions()
    sizes = {}
    for spacing in (0.05, 0.025):
        points, velocity = _grid_case(spacing)
        period = np.array([4.0, 2.0])
        quadrature = CloudQuadrature(points, velocity, period, np.full(len(points), 5.0), OPTIONS)
        clouds = quadrature.clouds()
        # at most the rule's entries (the compiled rule merges the entries of a point)
        assert np.all(clouds.sizes <= options.entries_per_cloud)
        assert np.all(clouds.indices[clouds.offsets[:-1]] == clouds.queries)  # the query first
        assert np.all(clouds.weights >= 0)
        full = OPTIONS.sampler(points, velocity, period).full_clouds()
        sizes[spacing] = full.sizes.mean()
        # the weights are a quadrature of the region's cutoff-weighted area
        area = np.add.reduceat(clouds.weights, clouds.offsets[:-1])
        exact = np.add.reduceat(full.weights, full.offsets[:-1]) * spacing**2
        assert np.abs(area / exact - 1).max() < 0.05
    assert sizes[0.025] > 3.5 * sizes[0.05]  # full clouds grow as the mesh is refined


def test_quadrature_clouds_are_deterministic(hill_case, closure):
    make = lambda: CloudQuadrature(  # noqa: E731
        hill_case.points, hill_case.velocity, hill_case.period, hill_case.wall_distance,
        closure.cloud_options,
    ).clouds()
    first, second = make(), make()
    np.testing.assert_array_equal(first.indices, second.indices)
    np.testing.assert_array_equal(first.weights, second.weights)
    np.testing.assert_array_equal(
        closure.predict(hill_case, clouds="quadrature"),
        closure.predict(hill_case, clouds="quadrature"),
    )


def test_refusals():
    assert quadrature_unavailable(OPTIONS, dim=2, pooling="volume") is None
    assert "2-D or 3-D" in quadrature_unavailable(OPTIONS, dim=1, pooling="volume")
    assert "pools by point count" in quadrature_unavailable(OPTIONS, dim=2, pooling="mean")
    knn = CloudOptions(region="knn", k=8, cutoff_start=None)
    assert "k-nearest" in quadrature_unavailable(knn, dim=2, pooling="volume")
    points = np.random.default_rng(0).random((50, 4))
    with pytest.raises(ValueError, match="2-D or 3-D"):
        CloudQuadrature(points, points, None, np.ones(50), OPTIONS)
    with pytest.raises(ValueError, match="even"):
        QuadratureOptions(angular=5)
    # clouds that would wrap around the period many times: the full clouds' refusal
    points, velocity = _grid_case(0.25)
    with pytest.raises(TooLargeError, match="much shorter than the clouds"):
        CloudQuadrature(points, 1e30 * velocity, np.array([4.0, 2.0]), np.ones(len(points)),
                        OPTIONS)


def test_evaluate_records_the_clouds_and_the_backend(hill_case, tmp_path):
    import json

    from vcnn.casefile import write_case
    from vcnn.evaluation import evaluate

    path = write_case(tmp_path / "hill_a1.000.npz", hill_case)
    evaluate("published", [path], tmp_path / "out", clouds="quadrature", figures=False,
             device="cpu")
    (written,) = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["clouds"] == "quadrature"
    assert written["engine"] in ("fused", "sparse", "padded")


def test_simulate_config_takes_the_cloud_mode():
    from solvers.simulate import SimulateConfig
    from vcnn.config import ConfigError

    assert SimulateConfig(model="published").clouds == "auto"
    assert SimulateConfig(model="published", clouds="quadrature").clouds == "quadrature"
    with pytest.raises(ConfigError, match="clouds must be one of"):
        SimulateConfig(model="published", clouds="some")


def _needs_the_compiled_rule():
    from vcnn.cloud_quadrature import _quadrature_library

    try:
        _quadrature_library()
    except KernelUnavailable as error:
        pytest.skip(f"needs the compiled cloud quadrature: {error}")


def _weights_by_point(clouds, num_points):
    """(Q, N) float64 summed weight of every (query, point): independent of entry order."""
    from scipy.sparse import csr_matrix

    rows = np.repeat(np.arange(clouds.queries.size), clouds.sizes)
    return csr_matrix(
        (clouds.weights.astype(np.float64), (rows, clouds.indices)),
        shape=(clouds.queries.size, num_points),
    ).toarray()


@pytest.mark.parametrize("periodic", [True, False], ids=["periodic", "bounded"])
def test_the_compiled_search_finds_the_nearest_points(periodic):
    _needs_the_compiled_rule()
    rng = np.random.default_rng(3)
    # graded like a wall-refined mesh: dense near y = 0, sparse above; and a solid body (no
    # points in a disk), whose inside the search crosses by skipping empty rings of cells
    points = np.stack([rng.uniform(0, 4, 6000), 2.0 * rng.uniform(0, 1, 6000) ** 3], axis=1)
    points = points[np.linalg.norm(points - [2.0, 1.0], axis=1) > 0.6][:3000]
    period = np.array([4.0, 0.0]) if periodic else None
    quadrature = CloudQuadrature(points, np.ones_like(points), period, np.ones(3000), OPTIONS)
    # targets inside, near the seam and outside the points' box
    targets = np.concatenate(
        [
            rng.uniform([-0.5, -0.5], [4.5, 2.5], (4000, 2)),
            [[0.0, 0.0], [3.999, 1e-4], [-7.9, 1.0], [2.0, 1.0], [2.1, 0.95]],
        ]
    )
    assert quadrature._grid.empty_rings.max() >= 3
    distance, indices = quadrature._nearest(targets, 5)
    if periodic:
        tree = cKDTree(np.mod(points + [0, 10], [4.0, 100.0]), boxsize=[4.0, 100.0])
        expected, _ = tree.query(np.mod(targets + [0, 10], [4.0, 100.0]), 5)
    else:
        expected, _ = cKDTree(points).query(targets, 5)
    np.testing.assert_allclose(distance, expected, rtol=1e-12, atol=1e-12)
    # the indices are the points at those distances
    offset = targets[:, None, :] - points[indices]
    if periodic:
        offset[..., 0] -= 4.0 * np.round(offset[..., 0] / 4.0)
    np.testing.assert_allclose(np.linalg.norm(offset, axis=-1), distance, rtol=1e-12, atol=1e-12)


def test_the_compiled_rule_matches_the_numpy_rule(hill_case, closure, monkeypatch):
    _needs_the_compiled_rule()
    make = lambda: CloudQuadrature(  # noqa: E731
        hill_case.points, hill_case.velocity, hill_case.period, hill_case.wall_distance,
        closure.cloud_options,
    ).clouds()
    compiled = make()
    compiled_tau = closure.predict(hill_case, clouds="quadrature")
    monkeypatch.setenv("VCNN_KERNELS", "0")  # the numpy rule (and the torch pass)
    plain = make()
    assert np.all(plain.sizes == QuadratureOptions().entries_per_cloud)
    # the same weight on every (query, point), in float32 round-off; merged into fewer entries
    by_point = _weights_by_point(plain, hill_case.num_points)
    difference = np.abs(_weights_by_point(compiled, hill_case.num_points) - by_point).max()
    assert difference <= 1e-6 * by_point.max()
    assert compiled.indices.size < 0.8 * plain.indices.size
    plain_tau = closure.predict(hill_case, clouds="quadrature")
    assert np.abs(compiled_tau - plain_tau).max() <= 1e-6 * np.abs(plain_tau).max()



def test_auto_takes_the_quadrature_only_where_full_clouds_are_large(hill_case, closure):
    from vcnn.cloud_quadrature import (
        AUTO_QUADRATURE_CLOUD_SIZE,
        auto_clouds,
        estimated_full_cloud_size,
    )

    speed = np.linalg.norm(hill_case.velocity, axis=1)
    options = closure.cloud_options
    estimate = estimated_full_cloud_size(options, speed, hill_case.nodal_volume)
    # the estimate against the real full clouds of this case (walls cut a few regions)
    sampler = options.sampler(hill_case.points, hill_case.velocity, hill_case.period)
    actual = float(np.mean(sampler.full_clouds().sizes))
    assert 0.9 * actual <= estimate <= 1.3 * actual
    assert estimate < AUTO_QUADRATURE_CLOUD_SIZE
    # this coarse case stays on full clouds; the same flow on a mesh 10x denser (volumes / 10)
    # takes the quadrature, except on a CUDA device or with count pooling
    assert closure.predict_detailed(hill_case).clouds == "full"
    dense = replace(hill_case, nodal_volume=hill_case.nodal_volume * (estimate / 1000.0))
    assert closure.predict_detailed(dense, warn=False).clouds == "quadrature"
    common = dict(dim=2, speed=speed, nodal_volume=dense.nodal_volume)
    assert auto_clouds(options, pooling="volume", **common) == "quadrature"
    assert auto_clouds(options, pooling="volume", device_type="cuda", **common) == "full"
    assert auto_clouds(options, pooling="mean", **common) == "full"
