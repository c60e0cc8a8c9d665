"""Interpolation error of ``--flow-from`` under refinement of the source.

The project's own Taylor-Hood flow on the structured alpha = 1 hill is sampled at the centres
of an m x m subdivision of every cell (cell-centred data like a finite-volume code's, no
sample on a wall), written as a case file of cell centres and imported with
``vcnn generate --flow-from``; u, |S| and tau are compared (relative L2, nodal-volume
weighted) with the case generated on the solved flow itself, on the same mesh. The error is
interpolation error only, so it must vanish as m grows.

    python experiments/flow_import/convergence.py --resolution 0.25 --subdivisions 1 2 4 8
"""

from __future__ import annotations

from mpi4py import MPI  # noqa: F401  (initialise MPI before dolfinx)

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from meshes.structured import structured_hill_mesh
from solvers.boundaries import hill_boundary_spec
from solvers.flow import solve_flow
from solvers.flow_import import subcell_centre_samples
from solvers.generate import GenerateConfig, run_generate
from vcnn.casefile import read_case


def relative_l2(case, values, reference) -> float:
    weights = case.nodal_volume if values.ndim == 1 else case.nodal_volume[:, None]
    return float(
        np.sqrt(np.sum(weights * (values - reference) ** 2) / np.sum(weights * reference**2))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=float, default=0.25)
    parser.add_argument("--subdivisions", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tagged = structured_hill_mesh(1.0, resolution=args.resolution)
    spec = hill_boundary_spec(tagged.boundaries, tagged.period)
    flow = solve_flow(tagged.mesh, tagged.facet_tags, spec)
    base = {"alphas": [1.0], "mesh": {"resolution": args.resolution}, "plots": False, "xdmf": False}
    lines = [
        "| samples per cell | samples | u rel L2 | abs(S) rel L2 | tau rel L2 | tau rate | import s |",
        "|---|---|---|---|---|---|---|",
    ]
    previous = None
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        run_generate(GenerateConfig.from_dict({**base, "out": str(work / "solved")}))
        reference = read_case(work / "solved" / "hill_a1.000.npz")
        for m in args.subdivisions:
            points, velocity = subcell_centre_samples(flow.u, m)
            source = work / f"centres_{m}.npz"
            np.savez(source, points=points, velocity=velocity, period=tagged.period)
            out = work / f"imported_{m}"
            summary = run_generate(
                GenerateConfig.from_dict({**base, "out": str(out), "flow_from": str(source)})
            )
            case = read_case(out / "hill_a1.000.npz")
            seconds = summary.cases[0].stage_times["flow import"]
            error = relative_l2(case, case.tau, reference.tau)
            rate = (
                ""
                if previous is None
                else f"{np.log(previous[1] / error) / np.log(m / previous[0]):.2f}"
            )
            lines.append(
                f"| {m} x {m} | {len(points)} | "
                f"{relative_l2(case, case.velocity, reference.velocity):.2e} | "
                f"{relative_l2(case, case.strain_rate, reference.strain_rate):.2e} | "
                f"{error:.2e} | {rate} | {seconds:.2f} |"
            )
            print(lines[-1], flush=True)
            previous = (m, error)
    print(
        f"\nStructured alpha = 1 hill, resolution {args.resolution:g} ({reference.num_points} "
        f"points); {time.strftime('%Y-%m-%d')}\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
