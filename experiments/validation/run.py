"""Validation of the dataset generator against the published reference figures (docs/physics.md).

Usage: python experiments/validation/run.py [--out results/validation] [--quick]

Solves alpha = 0.5, 1, 2 at the published resolution on structured (graded quadrilaterals,
200 alpha x 200) and unstructured (gmsh triangles of about the same number of nodes) meshes,
plus a three-resolution study at alpha = 1, and prints Markdown tables of area-averaged u,
max |u|, separation and reattachment on the bottom wall, tau mean and max and the integral of
tau. Complete cases are reused, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from solvers.diagnostics import main_recirculation
from solvers.generate import GenerateConfig, run_generate
from vcnn.casefile import Case, read_case

ALPHAS = (0.5, 1.0, 2.0)
#: Published reference (docs/physics.md): area-averaged u, max |u|, tau mean over cells, tau max.
REFERENCE = {
    0.5: (0.72104, 1.393, 0.416, 0.941),
    1.0: (0.72104, 1.362, 0.400, 1.033),
    2.0: (0.72104, 1.316, 0.364, 0.911),
}
#: Unstructured cell size giving about the node count of the published structured mesh.
UNSTRUCTURED_SIZE = 0.036
CONVERGENCE_RESOLUTIONS = (0.25, 0.5, 1.0)


def case_row(case: Case) -> dict[str, float]:
    """The validation quantities of one case."""
    volume = case.nodal_volume
    separation, reattachment = main_recirculation(
        case.meta.get("separation_x") or [],
        case.meta.get("reattachment_x") or [],
        period=float(case.period[0]),
    )
    return {
        "points": case.num_points,
        # the FEM area average of the P2 velocity (the solver holds it at U_b)
        "u_mean": float(case.meta["bulk_velocity_measured"]),
        "u_max": float(np.linalg.norm(case.velocity, axis=1).max()),
        "separation": separation,
        "reattachment": reattachment,
        "tau_mean": float(case.tau.mean()),
        "tau_area_mean": float(volume @ case.tau / volume.sum()),
        "tau_max": float(case.tau.max()),
        "tau_integral": float(case.meta["tau_integral"]),
    }


HEADER = (
    "| mesh | alpha | points | mean u | max abs(u) | separation x | reattachment x | "
    "tau mean (points) | tau mean (area) | tau max | integral tau |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(label: str, alpha: float, row: dict[str, float]) -> str:
    return (
        f"| {label} | {alpha:g} | {row['points']} | {row['u_mean']:.5f} | {row['u_max']:.3f} | "
        f"{row['separation']:.3f} | {row['reattachment']:.3f} | {row['tau_mean']:.3f} | "
        f"{row['tau_area_mean']:.3f} | {row['tau_max']:.3f} | {row['tau_integral']:.4f} |"
    )


def generate(out: Path, alphas, mesh: dict) -> list[Case]:
    config = GenerateConfig.from_dict(
        {"alphas": list(alphas), "out": str(out), "mesh": mesh, "xdmf": False}
    )
    summary = run_generate(config)
    return [read_case(out / f"{c.name}.npz") for c in summary.cases if c.status != "failed"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/validation"))
    parser.add_argument(
        "--quick", action="store_true", help="quarter resolution (a smoke test of the script)"
    )
    args = parser.parse_args(argv)
    scale = 0.25 if args.quick else 1.0
    lines = ["## Published resolution", "", HEADER]
    for alpha in ALPHAS:
        published = dict(zip(("u_mean", "u_max", "tau_mean", "tau_max"), REFERENCE[alpha]))
        lines.append(
            f"| published (FV) | {alpha:g} | {int(40000 * alpha)} | {published['u_mean']:.5f} | "
            f"{published['u_max']:.3f} | | | {published['tau_mean']:.3f} | | "
            f"{published['tau_max']:.3f} | |"
        )
    kinds = {
        "structured": {"kind": "structured", "resolution": scale},
        "unstructured": {"kind": "unstructured", "size": UNSTRUCTURED_SIZE / scale},
    }
    for label, mesh in kinds.items():
        for case in generate(args.out / label, ALPHAS, mesh):
            lines.append(format_row(label, case.meta["alpha"], case_row(case)))
    lines += ["", "## Mesh convergence, structured, alpha = 1", "", HEADER]
    rows = []
    for resolution in CONVERGENCE_RESOLUTIONS:
        mesh = {"kind": "structured", "resolution": resolution * scale}
        folder = "structured" if resolution == 1.0 else f"structured_r{resolution * scale:g}"
        (case,) = generate(args.out / folder, [1.0], mesh)
        rows.append(case_row(case))
        lines.append(format_row(f"structured x{resolution * scale:g}", 1.0, rows[-1]))
    # observed order and extrapolated value of the integral from the three resolutions
    coarse, medium, fine = (row["tau_integral"] for row in rows)
    ratio = (coarse - medium) / (medium - fine) if medium != fine else math.nan
    order = math.log(abs(ratio), 2) if ratio and not math.isnan(ratio) else math.nan
    extrapolated = fine + (fine - medium) / (2**order - 1) if order > 0 else math.nan
    lines += [
        "",
        f"Integral of tau: observed order {order:.2f} under refinement by 2, Richardson "
        f"extrapolation {extrapolated:.5f} (finest {fine:.5f}, "
        f"{abs(fine - extrapolated) / abs(extrapolated) * 100:.3f} % from it).",
    ]
    text = "\n".join(lines)
    print(text)
    (args.out / "validation.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
