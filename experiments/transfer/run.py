"""Transfer study: a closure trained on one structured mesh, tested on data it never saw.

Usage::

    python experiments/transfer/run.py [--model experiments/published/model/best.pt]
        [--training-data data/published_r0.5/all] [--alphas 0.5 1 1.475 2 3] [--quick]

The model of experiment (a) (structured FEM meshes at half the published resolution, 100
alpha x 100 cells, p = 1) predicts tau with full clouds on the same slope factors

* on its own mesh family (the in-distribution error; alpha 1 and 2 are training cases),
* on structured meshes at 0.5x and 2x that resolution,
* on unstructured gmsh triangles (size 0.036: about the node count of the 2x mesh),
* on cell-centred data of another mesh: quadrilaterals at 0.6x the published resolution with
  a stronger wall grading (tanh parameter 2.0 instead of 1.22, first cell centre about half as
  far from the wall), holding the values of the 2x solution interpolated at the cell centres
  (piecewise-linear, :class:`solvers.flow_import.VelocityInterpolator`), the cell areas as
  ``nodal_volume``, the exact distance of each centre to the walls, and no point on a wall,

and prints the relative L2 error of tau per mesh and slope factor with its ratio to the
in-distribution error (goal: at most 1.3). The 2x and unstructured cases of alpha 0.5, 1, 2 are
those of experiments/validation/run.py when they exist (same folders); missing cases are
generated. Writes the table to results/transfer/transfer.md.
"""

from __future__ import annotations

from mpi4py import MPI  # noqa: F401  (before dolfinx, which the generator imports)

import argparse
import json
import time
from pathlib import Path

import numpy as np

from meshes.hills import TOP_WALL_HEIGHT, hill_period, hill_profile
from meshes.structured import structured_hill_grid
from solvers.fields import distance_to_facets
from solvers.flow_import import VelocityInterpolator
from solvers.generate import GenerateConfig, hill_case_name, run_generate
from vcnn.casefile import Case, read_case, write_case
from vcnn.closure import load_closure
from vcnn.evaluation import predict_case
from vcnn.system import machine_summary

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results"
#: The cell-centred mesh: another resolution and a stronger wall grading than the training mesh.
CELL_CENTRED_RESOLUTION = 0.6
CELL_CENTRED_GRADING = 2.0


def hill_cases(folder: Path, alphas, mesh: dict) -> list[Case]:
    """The hill cases of ``alphas`` on ``mesh`` in ``folder``, generated when missing."""
    missing = [a for a in alphas if not (folder / f"{hill_case_name(a)}.npz").is_file()]
    if missing:
        run_generate(
            GenerateConfig.from_dict(
                {"alphas": missing, "out": str(folder), "mesh": mesh, "xdmf": False}
            )
        )
    return [read_case(folder / f"{hill_case_name(a)}.npz") for a in alphas]


def wall_facets(alpha: float, segments: int = 1000) -> np.ndarray:
    """(M, 2, 2) segments of both walls over three periods (exact distances near the sides).

    A thousand segments per period: the polyline is within about 1e-5 h of the smooth profile,
    and :func:`solvers.fields.distance_to_facets` needs segments coarse enough for its
    candidate search to stop early (far finer ones make it test every segment).
    """
    period = hill_period(alpha)
    x = np.linspace(-period, 2 * period, 3 * segments + 1)
    bottom = np.column_stack([x, hill_profile(np.mod(x, period), alpha)])
    top = np.array([[-period, TOP_WALL_HEIGHT], [2 * period, TOP_WALL_HEIGHT]])
    return np.concatenate([np.stack([bottom[:-1], bottom[1:]], axis=1), top[None]])


def cell_centred_case(source: Case, alpha: float) -> Case:
    """The source solution sampled at the cell centres of another structured mesh.

    Args:
        source: a finer solution (nodal values).
        alpha: its slope factor.

    Returns:
        A case of cell centres: velocity, |S| and tau interpolated, cell areas as volumes,
        exact wall distances, ``is_wall`` = the first and last cell rows.
    """
    grid = structured_hill_grid(
        alpha, resolution=CELL_CENTRED_RESOLUTION, wall_grading=CELL_CENTRED_GRADING
    )
    corners = grid.points[grid.cells]  # (C, 4, 2): lower left, lower right, upper left, upper right
    centres = corners.mean(axis=1)
    polygon = corners[:, [0, 1, 3, 2]]  # counter-clockwise
    x, y = polygon[..., 0], polygon[..., 1]
    areas = 0.5 * np.abs(np.sum(x * np.roll(y, -1, axis=1) - np.roll(x, -1, axis=1) * y, axis=1))
    values = np.column_stack([source.velocity, source.strain_rate, source.tau])
    interpolator = VelocityInterpolator(
        source.points, values, period=source.period, origin=np.zeros(2)
    )
    sampled = interpolator(centres)
    if np.any(sampled.outside_hull):
        raise RuntimeError(f"{int(sampled.outside_hull.sum())} cell centres outside the source")
    rows = np.repeat(np.arange(grid.ny), grid.nx)
    return Case(
        points=centres,
        velocity=sampled.values[:, :2],
        tau=sampled.values[:, 3],
        strain_rate=sampled.values[:, 2],
        wall_distance=distance_to_facets(centres, wall_facets(alpha)),
        nodal_volume=areas,
        is_wall=(rows == 0) | (rows == grid.ny - 1),
        period=np.array([grid.period, 0.0]),
        meta={
            "alpha": alpha,
            "mesh": {
                "kind": "cell-centred",
                "resolution": CELL_CENTRED_RESOLUTION,
                "wall_grading": CELL_CENTRED_GRADING,
                "num_cells": int(centres.shape[0]),
            },
            "physics": source.meta.get("physics"),
            "source": f"{source.name} ({source.num_points} nodes), piecewise-linear",
        },
        name=hill_case_name(alpha),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=ROOT / "experiments" / "published" / "model" / "best.pt"
    )
    parser.add_argument(
        "--training-data", type=Path, default=ROOT / "data" / "published_r0.5" / "all"
    )
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1.0, 1.475, 2.0, 3.0])
    parser.add_argument("--out", type=Path, default=RESULTS / "transfer")
    parser.add_argument("--quick", action="store_true", help="three alphas, coarse 2x mesh")
    args = parser.parse_args(argv)
    alphas = [0.5, 1.0, 2.0] if args.quick else args.alphas
    start = time.perf_counter()
    closure = load_closure(args.model, device="cpu")
    meshes = {
        "structured x0.5 (training mesh family)": lambda: [
            read_case(args.training_data / f"{hill_case_name(a)}.npz") for a in alphas
        ],
        "structured x0.25 (0.5x)": lambda: hill_cases(
            args.out / "structured_r0.25", alphas, {"kind": "structured", "resolution": 0.25}
        ),
        "structured x1 (2x)": lambda: hill_cases(
            RESULTS / "validation" / "structured", alphas, {"kind": "structured", "resolution": 1.0}
        ),
        "unstructured triangles (size 0.036)": lambda: hill_cases(
            RESULTS / "validation" / "unstructured", alphas, {"kind": "unstructured", "size": 0.036}
        ),
    }
    results: dict[str, list] = {}
    for label, cases in meshes.items():
        results[label] = [predict_case(closure, case).metrics for case in cases()]
    fine = results["structured x1 (2x)"]
    cell_folder = args.out / "cell_centred"
    cell_cases = []
    for alpha, metrics in zip(alphas, fine, strict=True):
        source = read_case(RESULTS / "validation" / "structured" / f"{metrics.case}.npz")
        case = cell_centred_case(source, alpha)
        write_case(cell_folder / f"{case.name}.npz", case)
        cell_cases.append(case)
    label = (
        f"cell-centred, x{CELL_CENTRED_RESOLUTION:g} with grading {CELL_CENTRED_GRADING:g} "
        "(values of the 2x solution)"
    )
    results[label] = [predict_case(closure, case).metrics for case in cell_cases]

    reference = results["structured x0.5 (training mesh family)"]
    header = ["test data", "points"] + [f"a={a:g}: rel L2 % (ratio)" for a in alphas]
    header += ["worst ratio", "inputs out of range %"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    worst_overall = 0.0
    for label, metrics in results.items():
        ratios = [m.rel_l2_percent / r.rel_l2_percent for m, r in zip(metrics, reference, strict=True)]
        worst_overall = max(worst_overall, max(ratios))
        cells = [f"{m.rel_l2_percent:.2f} ({q:.2f})" for m, q in zip(metrics, ratios, strict=True)]
        points = " / ".join(str(m.num_points) for m in metrics)
        out_of_range = max(100 * m.out_of_range_fraction for m in metrics)
        lines.append(
            f"| {label} | {points} | " + " | ".join(cells) + f" | {max(ratios):.2f} | "
            f"{out_of_range:.2g} |"
        )
    training = closure.metadata.get("split", {}).get("train", [])
    text = "\n".join(lines) + (
        f"\n\nModel {args.model} ({len(training)} training cases on the x0.5 structured "
        "meshes), full clouds; ratio = error / error on the training mesh family at the same "
        f"alpha; worst ratio {worst_overall:.2f} (goal <= 1.3). {machine_summary()}; "
        f"{time.perf_counter() - start:.0f} s."
    )
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "transfer.md").write_text(text + "\n")
    metrics_out = {label: [m.__dict__ for m in ms] for label, ms in results.items()}
    (args.out / "metrics.json").write_text(json.dumps(metrics_out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
