"""Atoms: a Lennard-Jones potential energy learned by the vector-cloud network, E = sum_i E_i.

Usage::

    python experiments/atoms/run.py [--quick] [--out results/atoms] [--seed 0]

1. Data: 108 Lennard-Jones atoms (reduced units, shifted-force cutoff 2.5, density 0.8442,
   periodic cubic box) from an fcc start, Langevin dynamics at T = 0.8, 1.1, 1.4; a quarter of
   the samples randomly displaced (sigma 0.03). Energies and forces from the exact potential.
2. Training on T = 0.8 and 1.4 (energies and forces together; the model pools neighbour
   sums over a fixed normaliser, ``pooling_normaliser="fixed"`` of
   :class:`vcnn.atoms.AtomicModelConfig`, and has a term linear in the standardised
   descriptor beside its fitting net, ``linear_term=True``), then the last layer of the
   fitting net and that linear term set to the exact minimiser of the final loss with the
   energy weight ``refit_energy_weight`` by linear least squares
   (:func:`experiments.atoms.fit.refit_output_layer`); held-out configurations
   of those temperatures and all of T = 1.1 (a temperature not trained on) are the test
   sets.
3. Symmetry in float64 (:func:`vcnn.symmetry.check_point_set_symmetry`): a free cluster under
   random rotations, reflections, translations and permutations; the periodic box under the
   cube's symmetries, translations and permutations.
4. NVE (velocity Verlet, dt 0.005) from the T = 1.1 state with the learned and the exact
   potential: energy drift per atom and the radial distribution function.
5. Data efficiency: the force error against the training-set size (1 to 100 configurations
   quick, 1 to 300 full) for the symmetric network and the non-symmetric baseline
   (``BaselineNet``: a per-point MLP of the raw relative coordinates and the same radial
   scalars, mean-pooled with the same weights, then an MLP), with the same recipe and number of
   optimiser steps per size, and the factor of data the baseline needs for the symmetric
   network's error (:func:`data_factors`). The quick run's 300 steps per fit leave every fit
   far from converged (22 % at 100 configurations against 3.4 % for the main model): its
   curve shows the trend at equal compute, not the converged errors.

Writes ``metrics.json``, ``config.json`` (the resolved settings and seeds), ``model.pt`` and
figures under ``--out``; prints the tables; exits 1 when a goal is missed (quick: force error
<= 5 % and the symmetry check; full: force <= 2 %, energy MAE <= 1e-3 per atom, NVE drift
<= 1e-4 per atom over 10,000 steps).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make `experiments.atoms` importable
    sys.path.insert(0, str(ROOT))

import argparse
import json
import logging
import textwrap
import time
from dataclasses import asdict, dataclass, field, replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from experiments.atoms.fit import TrainSettings, evaluate, model_config, train
from experiments.atoms.lj import (
    AtomsData,
    GenerationSettings,
    closest_approach,
    generate,
    lj_energy_forces,
)
from experiments.atoms.md import energy_drift, radial_distribution, velocity_verlet
from vcnn.atomic import atomic_write_text
from vcnn.atoms import AtomicEnergyModel, save_atomic_model
from vcnn.symmetry import (
    check_point_set_symmetry,
    random_cube_symmetry,
    random_orthogonal,
)
from vcnn.system import machine_summary

logger = logging.getLogger("atoms")
TRAIN_TEMPERATURES = (0.8, 1.4)
UNSEEN_TEMPERATURE = 1.1
#: optimiser steps of the quick run's model and of each quick data-efficiency fit
QUICK_STEPS = 1600
QUICK_EFFICIENCY_STEPS = 300


@dataclass(frozen=True)
class RunSettings:
    """Everything a run depends on (written to config.json)."""

    quick: bool
    seed: int
    generation: GenerationSettings
    test_per_temperature: int
    training: TrainSettings
    nve_steps: int
    nve_dt: float = 0.005
    efficiency_sizes: tuple[int, ...] = (1, 3, 10, 30, 100)
    efficiency_training: TrainSettings = field(default_factory=TrainSettings)
    symmetry_tolerance: float = 1e-10
    #: hidden widths of the main model's fitting net (the data-efficiency fits keep (64, 64));
    #: the full run's (128, 128): held-out energy MAE 1.56e-3 per atom against 1.67e-3 with
    #: (64, 64), forces 1.67 % both (one run each, 60 held-out configurations)
    fitting: tuple[int, ...] = (64, 64)


def settings_for(*, quick: bool, seed: int) -> RunSettings:
    """The quick (minutes on 2 cores) or the full settings."""
    temperatures = (TRAIN_TEMPERATURES[0], UNSEEN_TEMPERATURE, TRAIN_TEMPERATURES[1])
    if quick:
        return RunSettings(
            quick=True,
            seed=seed,
            generation=GenerationSettings(
                temperatures=temperatures, samples_per_temperature=60,
                equilibration_steps=800, steps_between_samples=20, seed=seed,
            ),
            test_per_temperature=10,
            training=TrainSettings(
                steps=QUICK_STEPS, batch=2, seed=seed, refit_output_layer=True,
                # with the linear term the refit has about 200 unknowns: the forces of 16
                # configurations left two held-out ones at 6-9 % (5.33 % in all); 32 give
                # 2.77 %, 48 give 2.62 % at 1.4x the refit's time
                refit_force_configurations=32,
            ),
            nve_steps=1000,
            efficiency_sizes=(1, 3, 10, 30, 100),
            efficiency_training=TrainSettings(steps=QUICK_EFFICIENCY_STEPS, batch=1, seed=seed),
        )
    return RunSettings(
        quick=False,
        seed=seed,
        generation=GenerationSettings(
            temperatures=temperatures, samples_per_temperature=600,
            equilibration_steps=2000, steps_between_samples=40, seed=seed,
        ),
        test_per_temperature=30,
        training=TrainSettings(
            steps=8000, batch=4, final_learning_rate=1e-4, seed=seed, refit_output_layer=True,
        ),
        nve_steps=10_000,
        efficiency_sizes=(1, 3, 10, 30, 100, 300),
        efficiency_training=TrainSettings(steps=1000, batch=2, seed=seed),
        fitting=(128, 128),
    )


@dataclass(frozen=True)
class Splits:
    """Training, held-out (trained temperatures) and unseen-temperature configurations."""

    train: AtomsData
    test: AtomsData
    unseen: AtomsData


def split(data: AtomsData, *, test_per_temperature: int, seed: int) -> Splits:
    """Random held-out configurations per trained temperature; the unseen temperature apart."""
    rng = np.random.default_rng(seed)
    temperature = data.temperature.numpy()
    train_index, test_index = [], []
    for value in TRAIN_TEMPERATURES:
        index = rng.permutation(np.flatnonzero(np.isclose(temperature, value)))
        test_index.append(index[:test_per_temperature])
        train_index.append(index[test_per_temperature:])
    # interleave the temperatures so that any prefix of the training set holds both
    train_order = np.stack(train_index, axis=1).ravel()
    return Splits(
        train=data.subset(train_order),
        test=data.subset(np.concatenate(test_index)),
        unseen=data.subset(np.flatnonzero(np.isclose(temperature, UNSEEN_TEMPERATURE))),
    )


def symmetry_checks(model: AtomicEnergyModel, data: AtomsData, *, seed: int) -> dict:
    """float64 checks: a free cluster (any O(3) map) and the periodic box (cube maps)."""
    model = model.to(torch.float64)
    positions = data.positions[0]
    # a free cluster: the atoms within 2.2 of atom 0 (minimum image), centred on it
    difference = positions - positions[0]
    difference = difference - data.box * torch.round(difference / data.box)
    cluster = difference[difference.norm(dim=1) < 2.2]

    def cluster_energy(points: torch.Tensor) -> torch.Tensor:
        return model(points[None], box=None)[0]

    def box_energy(points: torch.Tensor) -> torch.Tensor:
        return model(points[None], box=data.box)[0]

    free = check_point_set_symmetry(
        cluster_energy, cluster, seed=seed, orthogonal=random_orthogonal
    )
    periodic = check_point_set_symmetry(
        box_energy, positions, seed=seed, orthogonal=random_cube_symmetry,
        translation_scale=data.box,
    )
    return {"free_cluster": free, "periodic_box": periodic, "cluster_atoms": len(cluster)}


def nve(model: AtomicEnergyModel, state, *, box: float, settings: RunSettings) -> dict:
    """NVE runs with the learned and the exact potential from the same state."""
    model = model.to(torch.float64)

    def learned(positions: torch.Tensor):
        return model.energy_and_forces(positions, box=box)

    def exact(positions: torch.Tensor):
        return lj_energy_forces(positions, box=box)

    runs = {}
    for name, field_ in (("learned", learned), ("exact", exact)):
        started = time.perf_counter()
        trajectory = velocity_verlet(
            field_, state.positions, state.velocities, dt=settings.nve_dt,
            steps=settings.nve_steps, record_every=10, frame_every=max(settings.nve_steps // 50, 1),
        )
        atoms = state.positions.shape[1]
        total = trajectory.total[:, 0]
        centres, rdf = radial_distribution(trajectory.frames[:, 0], box=box)
        runs[name] = {
            "drift_per_atom": energy_drift(trajectory.time, total, atoms),
            "fluctuation_per_atom": float(np.std(total / atoms)),
            "temperature": float(np.mean(trajectory.kinetic[:, 0]) * 2 / (3 * atoms)),
            "seconds": time.perf_counter() - started,
            "time": trajectory.time,
            "total_per_atom": total / atoms,
            "rdf_r": centres,
            "rdf": rdf,
        }
    return runs


def data_efficiency(splits: Splits, settings: RunSettings) -> dict:
    """Force and energy errors against the training-set size, symmetric vs baseline."""
    rows = {"sizes": [], "symmetric": [], "baseline": [], "symmetric_energy": [],
            "baseline_energy": []}
    for size in settings.efficiency_sizes:
        subset = splits.train.subset(slice(0, size))
        config = model_config(subset)
        rows["sizes"].append(len(subset))
        for kind, build in (("symmetric", AtomicEnergyModel.vector_cloud),
                            ("baseline", AtomicEnergyModel.baseline)):
            torch.manual_seed(settings.seed)
            result = train(build(config), subset, settings.efficiency_training)
            errors = evaluate(result.model, splits.test)
            rows[kind].append(errors.force_rel_rmse_percent)
            rows[f"{kind}_energy"].append(errors.energy_mae_per_atom)
            logger.info("data efficiency: %d configurations, %s: force %.2f %%",
                        len(subset), kind, errors.force_rel_rmse_percent)
    rows["steps_per_size"] = settings.efficiency_training.steps
    rows["data_factors"] = data_factors(rows["sizes"], rows["symmetric"], rows["baseline"])
    return rows


def data_factors(sizes: list[int], symmetric: list[float], baseline: list[float]) -> list[dict]:
    """How much more data the baseline needs for the symmetric network's error, per size.

    For each size n, the smallest training size at which the baseline's error (interpolated
    linearly in log size and log error between measured sizes) falls to the symmetric
    network's error at n, divided by n. When the baseline never gets there within the sizes
    measured, the factor is only bounded below by (largest size) / n.

    Returns:
        One dict per size: ``size``, ``factor`` (float) and ``lower_bound`` (bool).
    """
    log_n, log_b = np.log(np.asarray(sizes, float)), np.log(np.asarray(baseline, float))
    rows = []
    for size, target in zip(sizes, symmetric, strict=True):
        factor, bound = sizes[-1] / size, True
        for k in range(len(sizes)):
            if baseline[k] <= target:
                if k == 0:
                    factor, bound = sizes[0] / size, False  # at most: none smaller measured
                else:  # crossing between sizes k-1 and k
                    t = (np.log(target) - log_b[k - 1]) / (log_b[k] - log_b[k - 1])
                    needed = float(np.exp(log_n[k - 1] + t * (log_n[k] - log_n[k - 1])))
                    factor, bound = needed / size, False
                break
        rows.append({"size": size, "factor": float(factor), "lower_bound": bool(bound)})
    return rows


def efficiency_summary(efficiency: dict) -> str:
    """One honest sentence on what the data-efficiency study found."""
    rows = efficiency["data_factors"]
    best = max(rows, key=lambda row: row["factor"])
    relation = "at least " if best["lower_bound"] else ""
    if best["factor"] < 10:
        verdict = "not met"
    elif best["lower_bound"]:
        # a bound only: the baseline never reached that error, which a flat curve also gives
        verdict = ("met only as a lower bound (the baseline never reaches that error within "
                   f"{efficiency['sizes'][-1]} configurations)")
    else:
        verdict = "met"
    return (f"largest factor of data the baseline needs for the symmetric network's error: "
            f"{relation}{best['factor']:.1f}x (at {best['size']} configurations; "
            f"{efficiency['steps_per_size']} steps per fit); goal >= 10x {verdict}")


def figures(out: Path, runs: dict, efficiency: dict, loss: np.ndarray) -> list[str]:
    """The RDF, the NVE energies, the data efficiency and the learning curve."""
    names = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, style in (("exact", "-"), ("learned", "--")):
        ax.plot(runs[name]["rdf_r"], runs[name]["rdf"], style, label=f"{name} potential")
    ax.set_xlabel("r / sigma")
    ax.set_ylabel("g(r)")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(out / "rdf.png", dpi=150)
    names.append("rdf.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in ("exact", "learned"):
        run = runs[name]
        ax.plot(run["time"], run["total_per_atom"] - run["total_per_atom"][0],
                label=f"{name} (drift {run['drift_per_atom']:.1e})")
    ax.set_xlabel("time (LJ units)")
    ax.set_ylabel("E(t) - E(0) per atom / epsilon")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(out / "nve_energy.png", dpi=150)
    names.append("nve_energy.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.loglog(efficiency["sizes"], efficiency["symmetric"], "o-", label="vector cloud (symmetric)")
    ax.loglog(efficiency["sizes"], efficiency["baseline"], "s--", label="baseline (raw coordinates)")
    ax.set_xlabel("training configurations (108 atoms each)")
    ax.set_ylabel("held-out force relative RMSE (%)")
    ax.set_title(textwrap.fill(efficiency_summary(efficiency), 80), fontsize=7)
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(out / "data_efficiency.png", dpi=150)
    names.append("data_efficiency.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.semilogy(loss)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png", dpi=150)
    names.append("learning_curve.png")
    plt.close(fig)
    return names


def jsonable(value):
    """Tuples, numpy scalars and arrays as JSON values."""
    if isinstance(value, dict):
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run of a few minutes")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "atoms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-efficiency", action="store_true",
                        help="leave out the data-efficiency study (for smoke tests)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    settings = settings_for(quick=args.quick, seed=args.seed)
    if args.skip_efficiency:
        settings = replace(settings, efficiency_sizes=())
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    atomic_write_text(out / "config.json", json.dumps(jsonable(asdict(settings)), indent=2))
    timings = {}

    started = time.perf_counter()
    data, states = generate(settings.generation)
    splits = split(data, test_per_temperature=settings.test_per_temperature, seed=settings.seed)
    timings["generate_s"] = time.perf_counter() - started
    logger.info("data: %d training, %d held-out, %d at T = %g (%.0f s)", len(splits.train),
                len(splits.test), len(splits.unseen), UNSEEN_TEMPERATURE, timings["generate_s"])

    torch.manual_seed(settings.seed)
    model = AtomicEnergyModel.vector_cloud(model_config(splits.train), fitting=settings.fitting)
    result = train(model, splits.train, settings.training)
    timings["train_s"] = result.seconds
    model = result.model
    test = evaluate(model, splits.test)
    unseen = evaluate(model, splits.unseen)
    logger.info("trained in %.0f s: held-out force %.2f %%, energy MAE %.2e per atom; "
                "T = %g: force %.2f %%", result.seconds, test.force_rel_rmse_percent,
                test.energy_mae_per_atom, UNSEEN_TEMPERATURE, unseen.force_rel_rmse_percent)

    # the learned wall is fitted only down to the closest approach of the training data: the
    # unseen temperature's configurations with closer pairs are an extrapolation, told apart
    training_closest = float(closest_approach(splits.train.positions, box=data.box).min())
    unseen_closest = closest_approach(splits.unseen.positions, box=data.box)
    within = torch.nonzero(unseen_closest >= training_closest).flatten()
    unseen_within = evaluate(model, splits.unseen.subset(within))
    closer = len(splits.unseen) - len(within)
    if closer:
        logger.warning("%d of %d configurations at T = %g have a pair closer (%.3f) than any "
                       "training configuration (%.3f); their forces are an extrapolation",
                       closer, len(splits.unseen), UNSEEN_TEMPERATURE,
                       float(unseen_closest.min()), training_closest)

    symmetry = symmetry_checks(model, data, seed=settings.seed)
    unseen_index = settings.generation.temperatures.index(UNSEEN_TEMPERATURE)
    start = type(states)(
        positions=states.positions[unseen_index : unseen_index + 1],
        velocities=states.velocities[unseen_index : unseen_index + 1],
    )
    runs = nve(model, start, box=data.box, settings=settings)
    rdf_difference = float(np.max(np.abs(runs["learned"]["rdf"] - runs["exact"]["rdf"])))

    started = time.perf_counter()
    efficiency = data_efficiency(splits, settings) if settings.efficiency_sizes else None
    timings["efficiency_s"] = time.perf_counter() - started

    save_atomic_model(out / "model.pt", model, test=asdict(test))
    figure_names = figures(out, runs, efficiency, result.loss) if efficiency else []

    tolerance = settings.symmetry_tolerance
    symmetry_passed = all(
        report.passed(tolerance) for key, report in symmetry.items() if key != "cluster_atoms"
    )
    metrics = {
        "quick": settings.quick,
        "force_rel_rmse_percent": test.force_rel_rmse_percent,
        "energy_mae_per_atom": test.energy_mae_per_atom,
        "force_rel_rmse_percent_unseen_temperature": unseen.force_rel_rmse_percent,
        "energy_mae_per_atom_unseen_temperature": unseen.energy_mae_per_atom,
        "unseen_temperature": UNSEEN_TEMPERATURE,
        "training_closest_approach": training_closest,
        "unseen_closest_approach": float(unseen_closest.min()),
        "unseen_configurations_closer_than_training": closer,
        "force_rel_rmse_percent_unseen_within_training_range":
            unseen_within.force_rel_rmse_percent,
        "energy_mae_per_atom_unseen_within_training_range": unseen_within.energy_mae_per_atom,
        "train_temperatures": list(TRAIN_TEMPERATURES),
        "nve_drift_per_atom": runs["learned"]["drift_per_atom"],
        "nve_drift_per_atom_exact": runs["exact"]["drift_per_atom"],
        "nve_fluctuation_per_atom": runs["learned"]["fluctuation_per_atom"],
        "nve_fluctuation_per_atom_exact": runs["exact"]["fluctuation_per_atom"],
        "nve_temperature": runs["learned"]["temperature"],
        "nve_temperature_exact": runs["exact"]["temperature"],
        "nve_steps": settings.nve_steps,
        "nve_dt": settings.nve_dt,
        "rdf_max_abs_difference": rdf_difference,
        "symmetry_passed": symmetry_passed,
        "symmetry": {
            key: {"value": report.value.relative, "gradient": report.gradient.relative}
            for key, report in symmetry.items() if key != "cluster_atoms"
        },
        "data_efficiency": efficiency,
        "model_config": asdict(model.config),
        "training_configurations": len(splits.train),
        "test_configurations": len(splits.test),
        "unseen_configurations": len(splits.unseen),
        "atoms": int(data.positions.shape[1]),
        "box": data.box,
        "seed": settings.seed,
        "timings_s": timings,
        "machine": machine_summary(),
        "figures": figure_names,
    }
    atomic_write_text(out / "metrics.json", json.dumps(jsonable(metrics), indent=2))

    print(f"\n## Atoms: learned Lennard-Jones energy ({'quick' if settings.quick else 'full'})\n")
    print("| set | configurations | energy MAE per atom | force relative RMSE (%) |")
    print("|---|---|---|---|")
    print(f"| held-out, T = 0.8 and 1.4 | {len(splits.test)} | {test.energy_mae_per_atom:.2e} | "
          f"{test.force_rel_rmse_percent:.2f} |")
    print(f"| unseen T = {UNSEEN_TEMPERATURE} | {len(splits.unseen)} | "
          f"{unseen.energy_mae_per_atom:.2e} | {unseen.force_rel_rmse_percent:.2f} |")
    print(f"| unseen T = {UNSEEN_TEMPERATURE}, closest pair within the training range "
          f"(>= {training_closest:.3f}) | {len(within)} | "
          f"{unseen_within.energy_mae_per_atom:.2e} | "
          f"{unseen_within.force_rel_rmse_percent:.2f} |")
    print(f"\nNVE, {settings.nve_steps} steps of dt {settings.nve_dt}, "
          f"{data.positions.shape[1]} atoms:\n")
    print("| potential | drift per atom | fluctuation per atom | mean temperature |")
    print("|---|---|---|---|")
    for name in ("exact", "learned"):
        run = runs[name]
        print(f"| {name} | {run['drift_per_atom']:.2e} | {run['fluctuation_per_atom']:.2e} | "
              f"{run['temperature']:.3f} |")
    print(f"\nlargest |g_learned(r) - g_exact(r)|: {rdf_difference:.3f}\n")
    for key in ("free_cluster", "periodic_box"):
        print(f"Symmetry, {key.replace('_', ' ')} (float64):\n\n{symmetry[key].to_markdown()}\n")
    if efficiency:
        print("| training configurations | symmetric force (%) | baseline force (%) |")
        print("|---|---|---|")
        for size, sym, base in zip(efficiency["sizes"], efficiency["symmetric"],
                                   efficiency["baseline"], strict=True):
            print(f"| {size} | {sym:.2f} | {base:.2f} |")
        print(f"\n{efficiency_summary(efficiency)}")

    checks = {"symmetry": symmetry_passed}
    if settings.quick:
        checks["force <= 5 %"] = test.force_rel_rmse_percent <= 5.0
    else:
        checks["force <= 2 %"] = test.force_rel_rmse_percent <= 2.0
        checks["energy MAE <= 1e-3"] = test.energy_mae_per_atom <= 1e-3
        checks["unseen T: energy MAE <= 1e-3"] = unseen.energy_mae_per_atom <= 1e-3
        checks["unseen T within the training range: force <= 2 %"] = (
            unseen_within.force_rel_rmse_percent <= 2.0
        )
        checks["NVE drift <= 1e-4"] = runs["learned"]["drift_per_atom"] <= 1e-4
    failed = [name for name, passed in checks.items() if not passed]
    print("\nchecks: " + ", ".join(f"{n}: {'pass' if p else 'FAIL'}" for n, p in checks.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
