"""3-D verification: manufactured-solution rates and the extruded hill against the 2-D hill.

Prints a table of L2 errors and observed rates (Taylor-Hood flow against the rotated 3-D
Kovasznay flow; P1 SUPG tau transport against a manufactured solution) on hexahedra and
tetrahedra, and the comparison of the extruded hill (a = 0) with the 2-D hill of the same
section. Writes ``results/verification3d/metrics.json`` (with the resolved settings) and exits
non-zero when a rate or the extruded-hill flow check misses its tolerance.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python experiments/verification3d/run.py
"""

from __future__ import annotations

from mpi4py import MPI  # noqa: F401  (before dolfinx)

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from experiments.verification3d.cases import (
    hill_section_comparison,
    kovasznay3d_errors,
    tau_mms_error,
)
from vcnn.atomic import atomic_write_text

RESULTS = Path("results/verification3d")
# Checks: observed rate on the finest pair, and the extruded-hill flow.
VELOCITY_RATE_MIN, PRESSURE_RATE_MIN, TAU_RATE_MIN = 2.7, 1.8, 1.6
SECTION_VELOCITY_MAX, SECTION_TAU_MAX, SPANWISE_MAX = 5e-3, 5e-3, 1e-6


def main() -> int:
    """Run the study, print the tables, write the metrics and return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--resolution", type=float, default=0.05)
    parser.add_argument("--span-cells", type=int, default=2)
    args = parser.parse_args()
    rows = []
    print("| cells | n | velocity L2 | rate | pressure L2 | rate | tau L2 | rate | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    failures = []
    for cell_type in ("hexahedron", "tetrahedron"):
        previous = None
        for n in args.sizes:
            start = time.perf_counter()
            velocity, pressure = kovasznay3d_errors(n, cell_type)
            tau = tau_mms_error(n, cell_type)
            seconds = time.perf_counter() - start
            errors = np.array([velocity, pressure, tau])
            rates = np.log2(previous / errors) if previous is not None else [np.nan] * 3
            previous = errors
            rows.append(
                {
                    "cell_type": cell_type,
                    "n": n,
                    "errors": errors.tolist(),
                    "rates": [float(r) for r in rates],
                    "seconds": seconds,
                }
            )
            print(
                f"| {cell_type} | {n} | {velocity:.3e} | {rates[0]:.2f} | {pressure:.3e} | "
                f"{rates[1]:.2f} | {tau:.3e} | {rates[2]:.2f} | {seconds:.1f} |",
                flush=True,
            )
        last = rows[-1]["rates"]
        for value, minimum, name in zip(
            last,
            (VELOCITY_RATE_MIN, PRESSURE_RATE_MIN, TAU_RATE_MIN),
            ("velocity", "pressure", "tau"),
            strict=True,
        ):
            if not value > minimum:
                failures.append(f"{cell_type} {name} rate {value:.2f} <= {minimum}")
    section = hill_section_comparison(resolution=args.resolution, span_cells=args.span_cells)
    print()
    print("| extruded hill (a = 0) vs 2-D | value |")
    print("|---|---|")
    for key, value in section.items():
        print(f"| {key} | {value:.3g} |")
    if not section["velocity_rel_l2"] < SECTION_VELOCITY_MAX:
        failures.append(f"extruded-hill velocity differs by {section['velocity_rel_l2']:.3g}")
    if not section["tau_rel_l2_flow_length"] < SECTION_TAU_MAX:
        failures.append(
            f"extruded-hill tau (flow-aligned SUPG length) differs by "
            f"{section['tau_rel_l2_flow_length']:.3g}"
        )
    if not section["spanwise_velocity"] < SPANWISE_MAX:
        failures.append(f"spanwise velocity {section['spanwise_velocity']:.3g} of the bulk")
    RESULTS.mkdir(parents=True, exist_ok=True)
    metrics = {
        "settings": vars(args),
        "machine": platform.platform(),
        "rates": rows,
        "extruded_hill": {key: float(value) for key, value in section.items()},
        "failures": failures,
    }
    atomic_write_text(RESULTS / "metrics.json", json.dumps(metrics, indent=2))
    for failure in failures:
        print(f"CHECK FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
