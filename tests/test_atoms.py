"""The atoms example: LJ data, the per-atom energy model, its symmetry, MD and training."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.atoms.fit import (
    TrainSettings,
    evaluate,
    model_config,
    output_layer_rows,
    refit_output_layer,
    train,
)
from experiments.atoms.lj import (
    GenerationSettings,
    closest_approach,
    fcc_lattice,
    generate,
    lj_energy_forces,
)
from experiments.atoms.md import energy_drift, radial_distribution, velocity_verlet
from vcnn.atoms import (
    AtomicEnergyModel,
    AtomicModelConfig,
    load_atomic_model,
    neighbour_clouds,
    save_atomic_model,
    smooth_cutoff,
)
from vcnn.symmetry import check_point_set_symmetry, random_cube_symmetry, random_orthogonal

ROOT = Path(__file__).resolve().parents[1]
# 32 atoms (2 fcc cells) in a box of edge 3.36: cutoffs below half of it
SMALL_CONFIG = AtomicModelConfig(cutoff=1.6, inner=1.2, self_weight=10.0, radial_basis=6)


def perturbed_lattice(cells: int, *, sigma: float, seed: int = 0) -> tuple[torch.Tensor, float]:
    positions, box = fcc_lattice(cells)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(positions.shape, generator=generator, dtype=torch.float64)
    return positions + sigma * noise, box


def small_model(kind: str = "symmetric", *, normaliser: str = "cloud") -> AtomicEnergyModel:
    torch.manual_seed(0)
    build = AtomicEnergyModel.vector_cloud if kind == "symmetric" else AtomicEnergyModel.baseline
    config = SMALL_CONFIG
    if normaliser == "fixed":  # twice the largest neighbour weight sum of these lattices
        # with the linear term, at nonzero weights so that the tests see it
        config = replace(config, pooling_normaliser="fixed", self_weight=30.0, linear_term=True)
    model = build(config).double()
    if config.linear_term:
        with torch.no_grad():
            model.standardisation.linear.weight.normal_(std=0.1)
    return model


@pytest.fixture(scope="module")
def tiny_data():
    settings = GenerationSettings(
        temperatures=(0.8, 1.4), samples_per_temperature=6, equilibration_steps=100,
        steps_between_samples=10, seed=1,
    )
    return generate(settings)


def test_lj_forces_are_minus_the_energy_gradient():
    positions, box = perturbed_lattice(3, sigma=0.05)
    positions = positions[None]
    exact = lj_energy_forces(positions, box=box)
    step = 1e-6
    for atom, axis in ((0, 0), (17, 1), (93, 2)):
        shift = torch.zeros_like(positions)
        shift[0, atom, axis] = step
        plus = lj_energy_forces(positions + shift, box=box).energy
        minus = lj_energy_forces(positions - shift, box=box).energy
        numeric = -float(plus - minus) / (2 * step)
        assert numeric == pytest.approx(float(exact.forces[0, atom, axis]), rel=1e-6, abs=1e-6)
    # a perfect lattice: no net force on any atom
    lattice, _ = fcc_lattice(3)
    assert float(lj_energy_forces(lattice[None], box=box).forces.abs().max()) < 1e-10


def test_shifted_force_potential_vanishes_smoothly_at_the_cutoff():
    for distance in (2.5 - 1e-7, 2.5 + 1e-7):
        pair = torch.tensor([[[0.0, 0.0, 0.0], [distance, 0.0, 0.0]]], dtype=torch.float64)
        result = lj_energy_forces(pair, box=None)
        assert abs(float(result.energy)) < 1e-12
        assert float(result.forces.abs().max()) < 1e-5


def test_neighbour_clouds_match_a_brute_force_search_over_images():
    positions, box = perturbed_lattice(2, sigma=0.1, seed=3)
    clouds = neighbour_clouds(positions[None], cutoff=1.6, inner=1.2, box=box)
    images = torch.tensor(
        [[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)],
        dtype=torch.float64,
    ) * box
    for atom in (0, 5, 31):
        found = clouds.relative[0, atom][clouds.mask[0, atom]]
        expected = (positions[None, :, :] + images[:, None, :] - positions[atom]).reshape(-1, 3)
        distance = expected.norm(dim=1)
        expected = expected[(distance < 1.6) & (distance > 0)]
        assert len(found) == len(expected)
        assert torch.allclose(found.norm(dim=1).sort().values, expected.norm(dim=1).sort().values)
    assert torch.all(clouds.weight[~clouds.mask] == 0)


def test_closest_approach_takes_the_minimum_image():
    positions = torch.tensor([[[0.1, 0.0, 0.0], [4.9, 0.0, 0.0], [2.5, 2.5, 2.5]],
                              [[1.0, 1.0, 1.0], [1.5, 1.0, 1.0], [3.0, 3.0, 3.0]]])
    periodic = closest_approach(positions, box=5.0, chunk=1)
    torch.testing.assert_close(periodic, torch.tensor([0.2, 0.5], dtype=torch.float64))
    free = closest_approach(positions, box=None)
    torch.testing.assert_close(free[0], torch.tensor((2.4**2 + 2 * 2.5**2) ** 0.5,
                                                       dtype=torch.float64))


def test_neighbour_clouds_refuse_a_box_smaller_than_twice_the_cutoff():
    positions, box = fcc_lattice(2)
    with pytest.raises(ValueError, match="half the box"):
        neighbour_clouds(positions[None], cutoff=2.5, inner=2.0, box=box)


def test_smooth_cutoff_has_zero_slope_at_both_ends():
    r = torch.tensor([1.2, 1.6, 1.4], dtype=torch.float64, requires_grad=True)
    weight = smooth_cutoff(r, inner=1.2, cutoff=1.6)
    (slope,) = torch.autograd.grad(weight.sum(), r)
    weight = weight.detach()
    assert weight[0] == 1 and weight[1] == 0 and float(weight[2]) == pytest.approx(0.5)
    assert abs(float(slope[0])) < 1e-12 and abs(float(slope[1])) < 1e-12


@pytest.mark.parametrize(("kind", "normaliser"),
                         [("symmetric", "cloud"), ("baseline", "cloud"), ("symmetric", "fixed")])
def test_model_forces_match_finite_differences(kind, normaliser):
    model = small_model(kind, normaliser=normaliser)
    positions, box = perturbed_lattice(2, sigma=0.08, seed=2)
    positions = positions[None]
    forces = model.energy_and_forces(positions, box=box).forces
    step = 1e-5
    for atom, axis in ((0, 0), (9, 2), (30, 1)):
        shift = torch.zeros_like(positions)
        shift[0, atom, axis] = step
        with torch.no_grad():
            numeric = -float(model(positions + shift, box=box) - model(positions - shift, box=box))
        numeric /= 2 * step
        assert numeric == pytest.approx(float(forces[0, atom, axis]), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("normaliser", ["cloud", "fixed"])
def test_energy_changes_continuously_when_an_atom_crosses_the_cutoff(normaliser):
    model = small_model(normaliser=normaliser)
    energies = []
    for distance in (1.6 - 1e-9, 1.6 + 1e-9):
        pair = torch.tensor([[[0.0, 0.0, 0.0], [distance, 0.0, 0.0], [0.0, 1.1, 0.0]]],
                            dtype=torch.float64)
        with torch.no_grad():
            energies.append(float(model(pair, box=None)))
    assert abs(energies[0] - energies[1]) < 1e-10


@pytest.mark.parametrize("normaliser", ["cloud", "fixed"])
def test_energy_is_invariant_and_forces_equivariant_in_float64(normaliser):
    model = small_model(normaliser=normaliser)
    positions, box = perturbed_lattice(2, sigma=0.08, seed=4)
    cluster = positions[(positions - positions[0]).norm(dim=1) < 1.7]

    free = check_point_set_symmetry(
        lambda x: model(x[None], box=None)[0], cluster, orthogonal=random_orthogonal
    )
    periodic = check_point_set_symmetry(
        lambda x: model(x[None], box=box)[0], positions, orthogonal=random_cube_symmetry,
        translation_scale=box,
    )
    assert free.passed(1e-10), free.to_markdown()
    assert periodic.passed(1e-10), periodic.to_markdown()
    assert free.value.reference_scale > 0 and free.gradient.reference_scale > 0


def test_fixed_normaliser_pools_every_cloud_over_the_same_total_weight():
    positions, box = perturbed_lattice(2, sigma=0.08, seed=3)
    totals = {}
    for normaliser in ("cloud", "fixed"):
        model = small_model(normaliser=normaliser)
        captured = []
        hook = model.network.register_forward_pre_hook(
            lambda module, args, kwargs: captured.append(kwargs["weight"]), with_kwargs=True
        )
        with torch.no_grad():
            model(positions[None], box=box)
        hook.remove()
        weight = captured[0]
        assert float(weight.min()) >= 0.0
        totals[normaliser] = weight.sum(dim=1)
    # fixed: neighbour sums over the constant self_weight; cloud: a per-atom density factor
    assert torch.allclose(totals["fixed"], torch.full_like(totals["fixed"], 30.0), atol=1e-12)
    assert float(totals["cloud"].std()) > 1e-3
    neighbours = totals["cloud"] - SMALL_CONFIG.self_weight
    assert float(neighbours.max()) < 30.0  # the clamp at 0 was not needed


def test_point_set_checker_catches_a_model_without_rotation_symmetry():
    model = small_model("baseline")
    positions, _ = perturbed_lattice(2, sigma=0.08, seed=4)
    cluster = positions[(positions - positions[0]).norm(dim=1) < 1.7]
    report = check_point_set_symmetry(lambda x: model(x[None], box=None)[0], cluster)
    assert "value:rotation" in report.failures(1e-6)
    assert "gradient:reflection" in report.failures(1e-6)
    # translation and permutation hold for the baseline too (relative positions, pooling)
    assert report.value.relative["permutation"] < 1e-10
    assert report.value.relative["translation"] < 1e-10


def test_cube_symmetries_are_signed_permutations():
    rng = np.random.default_rng(0)
    for determinant in (1, -1):
        matrix = random_cube_symmetry(3, determinant=determinant, rng=rng)
        assert np.allclose(np.abs(matrix).sum(axis=0), 1) and np.allclose(matrix @ matrix.T,
                                                                           np.eye(3))
        assert round(np.linalg.det(matrix)) == determinant


def test_velocity_verlet_conserves_energy_with_the_exact_potential():
    positions, box = fcc_lattice(3)
    generator = torch.Generator().manual_seed(0)
    velocities = torch.randn(positions.shape, generator=generator, dtype=torch.float64)
    velocities = (velocities - velocities.mean(0))[None]

    def exact(x):
        return lj_energy_forces(x, box=box)

    trajectory = velocity_verlet(exact, positions[None], velocities, dt=0.005, steps=400,
                                 record_every=5, frame_every=100)
    total = trajectory.total[:, 0]
    assert np.std(total / 108) < 5e-4
    assert energy_drift(trajectory.time, total, 108) < 5e-4
    # the lattice melts or heats: energy moved from kinetic to potential, so it is not trivial
    assert np.ptp(trajectory.potential[:, 0] / 108) > 0.05
    # a step 8 times larger fluctuates far more: the check can fail
    coarse = velocity_verlet(exact, positions[None], velocities, dt=0.04, steps=50,
                             record_every=1, frame_every=100)
    assert np.std(coarse.total[:, 0] / 108) > 4 * np.std(total / 108)


def test_radial_distribution_of_uniform_points_is_one():
    rng = np.random.default_rng(0)
    frames = rng.random((20, 200, 3)) * 6.0
    centres, rdf = radial_distribution(frames, box=6.0, bins=10)
    assert np.all(np.abs(rdf[3:] - 1) < 0.1)
    assert centres[-1] < 3.0


def test_generated_data_is_labelled_with_the_exact_potential(tiny_data):
    data, states = tiny_data
    assert len(data) == 12 and data.positions.shape[1:] == (108, 3)
    assert set(data.temperature.tolist()) == {0.8, 1.4}
    relabelled = lj_energy_forces(data.positions[:3], box=data.box)
    assert torch.allclose(relabelled.energy, data.energy[:3])
    assert states.positions.shape == (2, 108, 3)
    # liquid-like energies per atom, far from the lattice's -5.69
    assert -5.5 < float((data.energy / 108).mean()) < -3.0


def test_short_training_lowers_the_force_error(tiny_data, tmp_path):
    data, _ = tiny_data
    train_set, test_set = data.subset(slice(0, 8)), data.subset(slice(8, 12))
    torch.manual_seed(0)
    model = AtomicEnergyModel.vector_cloud(model_config(train_set)).double()
    before = evaluate(model, test_set)
    settings = TrainSettings(steps=80, batch=2, learning_rate=1e-2, final_learning_rate=1e-2)
    result = train(model, train_set, settings)
    after = evaluate(result.model, test_set)
    assert after.force_rel_rmse_percent < 0.8 * before.force_rel_rmse_percent
    assert math.isfinite(after.energy_mae_per_atom)
    path = save_atomic_model(tmp_path / "model.pt", result.model)
    loaded = load_atomic_model(path)
    positions = test_set.positions[:1]
    assert torch.equal(loaded(positions, box=data.box), result.model(positions, box=data.box))


def test_training_a_trained_model_further_keeps_its_standardisation(tiny_data):
    data, _ = tiny_data
    train_set = data.subset(slice(0, 8))
    torch.manual_seed(0)
    model = AtomicEnergyModel.vector_cloud(model_config(train_set)).double()
    assert not model.standardisation.is_set
    first = train(model, train_set, TrainSettings(steps=10, batch=2)).model
    shift = first.standardisation.shift.clone()
    scale = first.standardisation.scale.clone()
    assert first.standardisation.is_set
    # zero steps on other configurations: the model must come back unchanged, its
    # standardisation not recomputed from the new data
    again = train(first, data.subset(slice(8, 12)), TrainSettings(steps=0, batch=2)).model
    assert torch.equal(again.standardisation.shift, shift)
    assert torch.equal(again.standardisation.scale, scale)


def _refit_loss(model, data, settings) -> torch.Tensor:
    """The loss the refit minimises (the refit's p_E, the final p_F), with its graph."""
    prediction = model.energy_and_forces(data.positions.double(), box=data.box, create_graph=True)
    atoms = data.positions.shape[1]
    force_unit = float(data.forces.pow(2).mean().sqrt())
    energy = (((prediction.energy - data.energy) / atoms) ** 2).mean() / settings.energy_unit**2
    forces = ((prediction.forces - data.forces) ** 2).mean() / force_unit**2
    return settings.refit_energy_weight * energy + settings.final_force_weight * forces


@pytest.mark.parametrize("linear_term", [False, True])
def test_output_layer_refit_is_the_least_squares_minimiser(tiny_data, linear_term):
    data, _ = tiny_data
    train_set = data.subset(slice(0, 6))
    torch.manual_seed(0)
    config = model_config(train_set, linear_term=linear_term)
    model = AtomicEnergyModel.vector_cloud(config).double()
    settings = TrainSettings(steps=20, batch=2, learning_rate=1e-2, final_learning_rate=1e-2)
    model = train(model, train_set, settings).model
    # the rows are affine: rows @ theta + rest reproduces the model's energies and forces
    rows = output_layer_rows(model, train_set, force_configurations=len(train_set))
    last = model.standardisation.inner.layers[-1]
    parameters = [last.weight, last.bias]
    if linear_term:
        parameters.append(model.standardisation.linear.weight)
    theta = torch.cat([parameter.detach().flatten() for parameter in parameters])
    assert rows.energy_rows.shape[1] == theta.numel()
    prediction = model.energy_and_forces(train_set.positions.double(), box=data.box)
    assert torch.allclose(rows.energy_rows @ theta + rows.energy_rest, prediction.energy)
    assert torch.allclose(rows.force_rows @ theta + rows.force_rest, prediction.forces)
    loss = _refit_loss(model, train_set, settings)
    before = float(loss.detach())
    gradient_before = torch.autograd.grad(loss, parameters)
    refit = replace(settings, refit_force_configurations=len(train_set))
    model = refit_output_layer(model, train_set, refit)
    loss = _refit_loss(model, train_set, settings)
    assert float(loss.detach()) < before
    # at the minimiser the loss is stationary in the output parameters
    gradient = torch.autograd.grad(loss, parameters)

    def largest(values) -> float:
        return float(torch.cat([value.abs().flatten() for value in values]).max())

    assert largest(gradient) < 1e-3 * largest(gradient_before)


def test_descriptor_standardisation_centres_the_fitting_input_and_keeps_symmetry(tiny_data):
    data, _ = tiny_data
    for kind in ("symmetric", "baseline"):
        torch.manual_seed(0)
        build = (AtomicEnergyModel.vector_cloud if kind == "symmetric"
                 else AtomicEnergyModel.baseline)
        model = build(model_config(data)).double()
        positions = data.positions[:4]
        before = model(positions, box=data.box)
        model.standardise_descriptor(positions, box=data.box)
        captured = []
        inner = model.standardisation.inner
        hook = inner.register_forward_hook(lambda m, i, o: captured.append(i[0].detach()))
        after = model(positions, box=data.box)
        hook.remove()
        descriptors = torch.cat(captured)
        assert float(descriptors.mean(0).abs().max()) < 1e-8
        varying = model.standardisation.scale != 1
        assert int(varying.sum()) > 0
        assert torch.allclose(descriptors.std(0)[varying], torch.ones(int(varying.sum()),
                                                                       dtype=torch.float64))
        assert not torch.allclose(before, after)  # the fitting net now sees other inputs
    cluster = data.positions[0][(data.positions[0] - data.positions[0, 0]).norm(dim=1) < 1.8]
    report = check_point_set_symmetry(
        lambda x: model(x[None], box=None)[0], cluster, orthogonal=random_orthogonal
    )
    assert report.value.relative["permutation"] < 1e-10  # the baseline stays permutation-free


def test_inverse_radial_basis_is_densest_at_short_range():
    config = AtomicModelConfig(cutoff=2.5, inner=2.0, radial_basis=5, radial_start=0.8)
    distance = torch.tensor([0.8, 2.5], dtype=torch.float64)
    scalars = config.point_scalars(distance)
    assert scalars.shape == (2, 6) and torch.allclose(scalars[:, 0], 1 / distance)
    # the last centre sits at 1/0.8, the first at 1/2.5
    assert float(scalars[0, -1]) == pytest.approx(1.0) and float(scalars[1, 1]) == pytest.approx(1.0)
    # evenly spaced in 1/r: the second-to-last centre lies at 1/r = 1.25 - 0.2125, r = 0.9639
    assert float(config.point_scalars(torch.tensor([0.9639], dtype=torch.float64))[0, -2]) > 0.999
    evenly = AtomicModelConfig(radial_basis=5, radial_start=0.8, radial_variable="distance")
    assert float(evenly.point_scalars(torch.tensor([0.8], dtype=torch.float64))[0, 1]) == 1.0
    with pytest.raises(ValueError, match="radial_variable"):
        AtomicModelConfig(radial_variable="log")


def test_data_factors_interpolate_the_baseline_curve():
    from experiments.atoms.run import data_factors

    rows = data_factors([1, 3, 10, 30, 100], [10, 5, 3, 2, 1.5], [20, 12, 6, 3, 2])
    # symmetric error 10 at n = 1: the baseline falls from 12 (n = 3) to 6 (n = 10); log-log
    expected = 3 * math.exp(math.log(10 / 3) * math.log(10 / 12) / math.log(6 / 12))
    assert rows[0]["factor"] == pytest.approx(expected) and not rows[0]["lower_bound"]
    assert rows[2]["factor"] == pytest.approx(3.0)  # 3 % at n = 10: the baseline at n = 30
    assert rows[4] == {"size": 100, "factor": 1.0, "lower_bound": True}  # never reached


def test_linear_term_starts_at_zero_and_round_trips_through_a_checkpoint(tmp_path):
    positions, box = perturbed_lattice(2, sigma=0.08, seed=5)
    torch.manual_seed(0)
    plain = AtomicEnergyModel.vector_cloud(SMALL_CONFIG).double()
    torch.manual_seed(0)
    with_term = AtomicEnergyModel.vector_cloud(replace(SMALL_CONFIG, linear_term=True)).double()
    # zero at initialisation: the same energies as the model without it
    torch.testing.assert_close(with_term(positions[None], box=box),
                               plain(positions[None], box=box), rtol=0, atol=0)
    model = small_model(normaliser="fixed")
    path = save_atomic_model(tmp_path / "linear.pt", model)
    loaded = load_atomic_model(path)
    assert loaded.config.linear_term
    assert torch.equal(loaded(positions[None], box=box), model(positions[None], box=box))
    # a checkpoint written before the option existed loads without the term
    payload = torch.load(save_atomic_model(tmp_path / "plain.pt", plain), weights_only=True)
    del payload["config"]["linear_term"]
    torch.save(payload, tmp_path / "legacy.pt")
    legacy = load_atomic_model(tmp_path / "legacy.pt")
    assert legacy.standardisation.linear is None
    assert torch.equal(legacy(positions[None], box=box), plain(positions[None], box=box))
    with pytest.raises(ValueError, match="linear term"):
        AtomicEnergyModel(model.network, replace(model.config, linear_term=False))


def test_an_atoms_checkpoint_is_told_apart(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"kind": "closure"}, path)
    with pytest.raises(ValueError, match="not an atoms energy checkpoint"):
        load_atomic_model(path)


@pytest.mark.example
def test_quick_run_writes_its_metrics(tmp_path):
    out = tmp_path / "atoms"
    # one thread: the step is small, and two threads spin-waiting on a shared machine ran the
    # training several times slower than one (measured under a load average of 6)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "atoms" / "run.py"), "--quick", "--out",
         str(out)],
        capture_output=True, text=True, env=env, timeout=1800,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["quick"] is True
    assert metrics["force_rel_rmse_percent"] <= 5.0
    for key in ("energy_mae_per_atom", "nve_drift_per_atom", "nve_drift_per_atom_exact"):
        assert math.isfinite(metrics[key])
    assert len(metrics["data_efficiency"]["sizes"]) >= 5
    assert metrics["unseen_closest_approach"] > 0.5
    assert math.isfinite(metrics["force_rel_rmse_percent_unseen_within_training_range"])
    assert (out / "rdf.png").is_file() and (out / "data_efficiency.png").is_file()
