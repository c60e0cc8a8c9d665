"""Tau on the shipped OpenFOAM hill flow against tau on our own Taylor-Hood flow.

For each project resolution, the alpha = 1 hill case is generated twice on the same mesh:
with the flow solved by the project (Taylor-Hood, Newton) and with the flow taken from
``tests/data/openfoam_hill`` (2,976 finite volumes, simpleFoam, linearUpwind; see its README).
The table gives relative L2 differences (nodal-volume weighted) of u, |S| and tau, the
integral of tau and the reattachment point. Two ablations at the first resolution show what
the interpolation's wall samples and periodic images contribute (hooks replaced in this
script only).

    python experiments/openfoam_hill/compare.py --resolutions 0.25 0.5 1.0
"""

from __future__ import annotations

from mpi4py import MPI  # noqa: F401  (initialise MPI before dolfinx)

import argparse
import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from solvers import flow_import
from solvers.generate import GenerateConfig, run_generate
from vcnn.casefile import read_case

ROOT = Path(__file__).resolve().parents[2]

CASE = ROOT / "tests" / "data" / "openfoam_hill"
#: The study interpolates one coarse source onto project meshes up to 13.6 times denser (40,200
#: points against 2,976 cells at x1), below the default floor of one sample per ten points.
MIN_SAMPLES_PER_POINT = 0.05


def generate(output: Path, resolution: float, **more) -> object:
    config = {
        "alphas": [1.0],
        "out": str(output),
        "mesh": {"resolution": resolution},
        "plots": False,
        "xdmf": False,
        **more,
    }
    summary = run_generate(GenerateConfig.from_dict(config))
    if not summary.all_succeeded:
        raise SystemExit(summary.cases[0].error)
    return read_case(output / "hill_a1.000.npz")


def relative_l2(case, values, reference) -> float:
    weights = case.nodal_volume if values.ndim == 1 else case.nodal_volume[:, None]
    return float(
        np.sqrt(np.sum(weights * (values - reference) ** 2) / np.sum(weights * reference**2))
    )


@contextmanager
def without_wall_samples():
    original = flow_import._wall_points
    flow_import._wall_points = lambda mesh, *rest: np.empty((0, mesh.geometry.dim))
    try:
        yield
    finally:
        flow_import._wall_points = original


@contextmanager
def without_periodic_images():
    original = flow_import.VelocityInterpolator._images

    def no_images(self, wrapped, margin):
        return wrapped, np.arange(wrapped.shape[0])

    flow_import.VelocityInterpolator._images = no_images
    try:
        yield
    finally:
        flow_import.VelocityInterpolator._images = original


def main_reattachment(case) -> str:
    """Reattachment of the main recirculation bubble (the last one along x), if any."""
    points = case.meta.get("reattachment_x") or []
    return f"{points[-1]:.3f}" if points else "none"


def row(label: str, imported, reference) -> str:
    return (
        f"| {label} | {reference.num_points} | "
        f"{100 * relative_l2(imported, imported.velocity, reference.velocity):.2f} | "
        f"{100 * relative_l2(imported, imported.strain_rate, reference.strain_rate):.2f} | "
        f"{100 * relative_l2(imported, imported.tau, reference.tau):.2f} | "
        f"{imported.tau_integral():.4f} / {reference.tau_integral():.4f} | "
        f"{main_reattachment(imported)} / {main_reattachment(reference)} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    lines = [
        "| project mesh | points | u rel L2 % | abs(S) rel L2 % | tau rel L2 % | "
        "integral tau (OpenFOAM / ours) | reattachment x (OpenFOAM / ours) |",
        "|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        for number, resolution in enumerate(args.resolutions):
            reference = generate(work / f"ours_{resolution}", resolution)
            imported = generate(work / f"openfoam_{resolution}", resolution, flow_from=str(CASE), flow_min_samples_per_point=MIN_SAMPLES_PER_POINT)
            label = f"structured x{resolution:g}"
            lines.append(row(label, imported, reference))
            if number == 0:
                with without_wall_samples():
                    ablated = generate(work / "no_walls", resolution, flow_from=str(CASE), flow_min_samples_per_point=MIN_SAMPLES_PER_POINT)
                lines.append(row(f"{label}, no wall samples", ablated, reference))
                with without_periodic_images():
                    ablated = generate(work / "no_images", resolution, flow_from=str(CASE), flow_min_samples_per_point=MIN_SAMPLES_PER_POINT)
                lines.append(row(f"{label}, no periodic images", ablated, reference))
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
