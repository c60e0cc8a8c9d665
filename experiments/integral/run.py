"""The integral of tau learnt from the whole discretisation, against the integrated closure.

Usage::

    python experiments/integral/run.py [--quick] [--data data/integral] [--out results/integral]

Steps (cases already generated are reused):

1. generate periodic-hill cases (frozen production, the published physics) for a family of
   slope factors alpha on structured and unstructured meshes (mesh augmentation; the full run
   adds a finer structured mesh), into ``--data`` (one flat folder,
   ``hill_a<alpha>_<mesh>.npz``);
2. train the whole-discretisation model (``vcnn train`` with ``target = "integral"``, see
   ``vcnn/integral.py``) on the training alphas, two alphas validating;
3. on held-out alphas in [0.75, 3]: the model's I against each case's integral of tau, and the
   pointwise closure (the shipped published model, ``vcnn.load_closure(...).predict``)
   integrated with the nodal volumes; the model on a structured and an unstructured mesh of the
   same case; its invariance (float64) under rotations, reflections, translations,
   permutations and padding of the points (``vcnn.symmetry.check_frame_independence``);
4. prints the table, writes ``metrics.json`` (``integral_rel_error_percent``: the worst
   held-out case), ``config.json`` (seeds, alphas, meshes, training settings) and figures into
   ``--out``, and exits non-zero when a goal is missed: worst held-out error <= 3 % (quick) or
   1 % (full), structured vs unstructured <= 0.5 %, invariance <= 1e-10.

``--quick`` (9 training alphas on two meshes, 400 epochs) runs in about 3.5 minutes on two
busy cores once its cases exist (generating its 32 cases takes about 4 more); the full run
(13 training alphas on three meshes, 1500 epochs) takes about an hour.
"""

from __future__ import annotations

from mpi4py import MPI  # noqa: F401  (before dolfinx)

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from vcnn.casefile import read_case, write_case  # noqa: E402
from vcnn.integral import (  # noqa: E402
    integral_metrics,
    invariance_report,
    load_integral_model,
)
from vcnn.system import machine_summary  # noqa: E402

logger = logging.getLogger("integral")

SEED = 0
POINTWISE_MODEL = ROOT / "experiments" / "published" / "model" / "best.pt"
#: Goals of the integral example (percent) and the round-off bound of the invariance check.
GOALS = {"quick": 3.0, "full": 1.0, "mesh_percent": 0.5, "invariance": 1e-10}


@dataclass(frozen=True)
class Plan:
    """What one mode of the example generates and trains.

    Attributes:
        train_alphas: slope factors of the training cases.
        validation_alphas: slope factors of the validation cases (best epoch).
        test_alphas: held-out slope factors in [0.75, 3].
        meshes: tag -> ``[generate.mesh]`` table; every alpha on every mesh.
        epochs: full-batch training epochs.
        learning_rate: Adam's peak learning rate (cosine to 1 % of it).
        ema_decay: moving average of the weights (0: none; a short run selects the raw
            weights, which reach the training plateau long before an average does).
    """

    train_alphas: tuple[float, ...]
    validation_alphas: tuple[float, ...]
    test_alphas: tuple[float, ...]
    meshes: dict
    epochs: int
    learning_rate: float
    ema_decay: float


QUICK = Plan(
    train_alphas=(0.5, 0.875, 1.25, 1.625, 2.0, 2.375, 2.75, 3.125, 3.5),
    validation_alphas=(1.4375, 2.5625),
    test_alphas=(0.8, 1.1, 1.8, 2.2, 2.9),
    meshes={
        "s0.25": {"kind": "structured", "resolution": 0.25},
        "u0.14": {"kind": "unstructured", "size": 0.14},
    },
    epochs=400,
    learning_rate=3e-3,
    ema_decay=0.0,
)
FULL = Plan(
    train_alphas=tuple(float(a) for a in np.round(np.arange(0.5, 3.5001, 0.25), 4)),
    validation_alphas=(1.4375, 2.5625),
    test_alphas=(0.8, 0.95, 1.1, 1.3, 1.55, 1.8, 2.05, 2.2, 2.45, 2.7, 2.9),
    meshes={
        "s0.25": {"kind": "structured", "resolution": 0.25},
        "s0.4": {"kind": "structured", "resolution": 0.4},
        "u0.14": {"kind": "unstructured", "size": 0.14},
    },
    epochs=1500,
    learning_rate=3e-3,
    ema_decay=0.99,
)


def case_path(data: Path, alpha: float, tag: str) -> Path:
    """The flat file of one (alpha, mesh) case."""
    return data / f"hill_a{alpha:.4f}_{tag}.npz"


def generate(data: Path, alphas: list[float], tag: str, mesh: dict) -> list[Path]:
    """Solve the missing cases of one mesh (``solvers.generate``), then file them flat."""
    from solvers.generate import GenerateConfig, hill_case_name, run_generate

    wanted = {alpha: case_path(data, alpha, tag) for alpha in alphas}
    missing = [alpha for alpha, path in wanted.items() if not path.is_file()]
    if missing:
        raw = data / "raw" / tag
        start = time.perf_counter()
        config = GenerateConfig.from_dict(
            {"alphas": missing, "out": str(raw), "mesh": mesh, "plots": False, "xdmf": False}
        )
        summary = run_generate(config)
        if not summary.all_succeeded:
            raise SystemExit(f"generation failed for mesh {tag}: {summary}")
        for alpha in missing:
            case = read_case(raw / f"{hill_case_name(alpha)}.npz")
            write_case(wanted[alpha], case)
        shutil.rmtree(raw, ignore_errors=True)
        logger.info("generated %d cases on %s in %.1f s", len(missing), tag,
                    time.perf_counter() - start)
    return list(wanted.values())


def train_model(plan: Plan, data: Path, out: Path, paths: dict) -> Path:
    """``vcnn train`` with ``target = "integral"``; returns best.pt."""
    from vcnn.training import TrainConfig, train

    config = TrainConfig(
        data=str(data),
        out=str(out / "run"),
        target="integral",
        train_cases=[str(p) for p in paths["train"]],
        validation_cases=[str(p) for p in paths["validation"]],
        epochs=plan.epochs,
        learning_rate=plan.learning_rate,
        min_learning_rate=plan.learning_rate / 100,
        scheduler="cosine",
        ema_decay=plan.ema_decay,
        seed=SEED,
        overwrite=True,
        num_threads=torch.get_num_threads(),
    )
    result = train(config)
    logger.info(
        "trained in %.1f s, best epoch %d, validation rms %.3f %%",
        result.history[-1].wall_clock_s,
        result.best_epoch,
        result.best_validation_rel_l2_percent,
    )
    return result.best_checkpoint


def pointwise_integral(closure, case) -> float:
    """The shipped pointwise closure's tau, integrated with the nodal volumes."""
    return float(np.dot(case.nodal_volume, closure.predict(case)))


def draw_figures(out: Path, rows: list[dict], train_integrals: list[tuple[float, str, float]]):
    """I against alpha (training and held-out cases) and the held-out errors of both methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for tag in sorted({t for _, t, _ in train_integrals}):
        points = sorted((a, i) for a, t, i in train_integrals if t == tag)
        axes[0].plot(*zip(*points, strict=True), "o", ms=3, alpha=0.5, label=f"training, {tag}")
    for tag in sorted({r["mesh"] for r in rows}):
        mine = sorted((r["alpha"], r["predicted"]) for r in rows if r["mesh"] == tag)
        axes[0].plot(*zip(*mine, strict=True), "x", ms=8, label=f"held out, model, {tag}")
    truth = sorted((r["alpha"], r["integral"]) for r in rows)
    axes[0].plot(*zip(*truth, strict=True), "k.", ms=4, label="held out, truth")
    axes[0].set_xlabel("alpha")
    axes[0].set_ylabel("I = integral of tau")
    axes[0].legend(fontsize=7)
    for key, label, marker in (
        ("rel_error_percent", "whole-discretisation model", "o"),
        ("pointwise_rel_error_percent", "integrated pointwise closure", "s"),
    ):
        for tag in sorted({r["mesh"] for r in rows}):
            mine = sorted((r["alpha"], r[key]) for r in rows if r["mesh"] == tag)
            axes[1].plot(*zip(*mine, strict=True), marker, label=f"{label}, {tag}")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("alpha (held out)")
    axes[1].set_ylabel("|I error| / I (%)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "integral_vs_alpha.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the short run (< 5 min)")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "integral")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "integral")
    parser.add_argument("--pointwise-model", type=Path, default=POINTWISE_MODEL)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("solvers").setLevel(logging.WARNING)
    plan = QUICK if args.quick else FULL
    torch.manual_seed(SEED)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)

    paths: dict[str, list[Path]] = {"train": [], "validation": [], "test": []}
    for tag, mesh in plan.meshes.items():
        for split, alphas in (
            ("train", plan.train_alphas),
            ("validation", plan.validation_alphas),
            ("test", plan.test_alphas),
        ):
            paths[split] += generate(args.data, list(alphas), tag, mesh)
    generated = time.perf_counter() - start

    best = train_model(plan, args.data, args.out, paths)
    trained = time.perf_counter() - start
    loaded = load_integral_model(best)
    model, spec = loaded.model, loaded.spec

    from vcnn import load_closure

    closure = load_closure(args.pointwise_model, device="cpu")
    rows = []
    for path in paths["test"]:
        case = read_case(path)
        metrics = integral_metrics(case, model.predict(case, spec))
        pointwise = pointwise_integral(closure, case)
        rows.append(
            {
                **asdict(metrics),
                "mesh": path.stem.rsplit("_", 1)[1],
                "pointwise": pointwise,
                "pointwise_rel_error_percent": 100 * abs(pointwise - metrics.integral)
                / abs(metrics.integral),
            }
        )
    # Structured against unstructured: the model's I of the same case on two meshes.
    tags = list(plan.meshes)
    structured = [t for t in tags if plan.meshes[t]["kind"] == "structured"]
    unstructured = [t for t in tags if plan.meshes[t]["kind"] == "unstructured"]
    mesh_rows = []
    for alpha in plan.test_alphas:
        for s_tag in structured:
            for u_tag in unstructured:
                s_row = next(r for r in rows if r["alpha"] == alpha and r["mesh"] == s_tag)
                u_row = next(r for r in rows if r["alpha"] == alpha and r["mesh"] == u_tag)
                mean = 0.5 * (s_row["predicted"] + u_row["predicted"])
                mesh_rows.append(
                    {
                        "alpha": alpha,
                        "structured": s_tag,
                        "unstructured": u_tag,
                        "model_difference_percent": 100
                        * abs(s_row["predicted"] - u_row["predicted"]) / mean,
                        "truth_difference_percent": 100
                        * abs(s_row["integral"] - u_row["integral"])
                        / (0.5 * (s_row["integral"] + u_row["integral"])),
                    }
                )
    invariance = invariance_report(model.double(), read_case(paths["test"][0]), spec, seed=SEED)
    model.float()
    train_integrals = []
    for path in paths["train"]:
        case = read_case(path)
        train_integrals.append((float(case.meta["alpha"]), path.stem.rsplit("_", 1)[1],
                                case.tau_integral()))

    worst = max(r["rel_error_percent"] for r in rows)
    worst_pointwise = max(r["pointwise_rel_error_percent"] for r in rows)
    worst_mesh = max(m["model_difference_percent"] for m in mesh_rows)
    worst_invariance = max(invariance.values())
    goal = GOALS["quick" if args.quick else "full"]
    metrics = {
        "quick": bool(args.quick),
        "integral_rel_error_percent": worst,
        "integral_rel_error_percent_mean": float(np.mean([r["rel_error_percent"] for r in rows])),
        "pointwise_integral_rel_error_percent": worst_pointwise,
        "pointwise_integral_rel_error_percent_mean": float(
            np.mean([r["pointwise_rel_error_percent"] for r in rows])
        ),
        "structured_vs_unstructured_percent": worst_mesh,
        "invariance_max_relative": worst_invariance,
        "invariance": invariance,
        "goals": {"integral_rel_error_percent": goal, **GOALS},
        "held_out": rows,
        "mesh_agreement": mesh_rows,
        "pointwise_model": str(args.pointwise_model),
        "seconds": {"generate": generated, "train": trained - generated,
                    "total": time.perf_counter() - start},
        "machine": machine_summary(),
    }
    resolved = {"seed": SEED, "plan": asdict(plan), "data": str(args.data)}
    (args.out / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    draw_figures(args.out, rows, train_integrals)

    print("| alpha | mesh | points | I (truth) | I (model) | model err % | I (pointwise closure) "
          "| pointwise err % |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["alpha"], r["mesh"])):
        print(f"| {r['alpha']:g} | {r['mesh']} | {r['num_points']} | {r['integral']:.5g} | "
              f"{r['predicted']:.5g} | {r['rel_error_percent']:.3f} | {r['pointwise']:.5g} | "
              f"{r['pointwise_rel_error_percent']:.3f} |")
    print()
    print("| check | value | goal |")
    print("|---|---|---|")
    checks = [
        ("worst held-out integral error (model) %", worst, goal),
        ("worst held-out integral error (integrated pointwise closure) %", worst_pointwise, None),
        ("structured vs unstructured, model, max %", worst_mesh, GOALS["mesh_percent"]),
        ("invariance, max relative deviation (float64)", worst_invariance, GOALS["invariance"]),
    ]
    failed = []
    for name, value, bound in checks:
        print(f"| {name} | {value:.3g} | {'' if bound is None else f'<= {bound:g}'} |")
        if bound is not None and not (value <= bound):
            failed.append(name)
    print(f"\n{'quick' if args.quick else 'full'} run, {metrics['seconds']['total']:.0f} s; "
          f"metrics and figures in {args.out}")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
