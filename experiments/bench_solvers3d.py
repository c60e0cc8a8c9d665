"""Direct against iterative 3-D flow and tau solves on the crest-varying hex hill (Re = 100).

For each size (in-plane resolution r and spanwise layers) and rank count, one worker process
(``mpiexec -n N`` for N > 1) builds the hill (alpha = 1, crest amplitude 0.2), solves the
flow from rest and the frozen tau with MUMPS LU (:data:`solvers.linalg.DIRECT_SOLVER_OPTIONS`)
or with the iterative paths (:data:`solvers.linalg.ITERATIVE_FLOW_OPTIONS`,
:data:`solvers.linalg.ITERATIVE_SCALAR_OPTIONS`), and reports the solve wall times (set-up
excluded: it is shared) and its peak resident memory (summed over ranks; the flow dominates
it). Prints the crossover table, writes ``results/bench_solvers3d/metrics.json`` with the
resolved configuration, and checks that both paths give the same flow and tau (relative
difference of the body force and of the tau integral <= 1e-7).

The tau systems (P1) are ~20x smaller than the flow's at the same mesh: ``--tau-sizes`` adds
serial tau-only runs on larger meshes, with a channel-like analytic velocity in place of the
flow.

With three sizes or more per rank count it also prints the observed exponents of the flow
solves' time and peak memory against the flow unknowns (a least-squares fit in log-log) and
the fits' values at 1,000,000 unknowns.

Usage: python experiments/bench_solvers3d.py [--sizes 0.05:2,0.075:3,0.1:4] [--ranks 1,2]
    [--tau-sizes 0.2:8,0.3:12,0.45:18]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "results" / "bench_solvers3d"
TOLERANCE = 1e-7


def _worker(resolution: float, span_cells: int, path: str, *, tau_only: bool) -> None:
    """Solve flow and tau (tau only: an analytic velocity) with one path; rank 0 prints JSON."""
    from mpi4py import MPI

    import numpy as np
    from dolfinx import fem

    from meshes.hills import TOP_WALL_HEIGHT
    from meshes.hills3d import structured_hill3d_mesh
    from solvers.boundaries import hill_boundary_spec
    from solvers.fields import strain_rate_magnitude, wall_distance_function
    from solvers.flow import solve_flow
    from solvers.linalg import ITERATIVE_FLOW_OPTIONS, ITERATIVE_SCALAR_OPTIONS
    from solvers.periodic import PeriodicConstraint
    from solvers.transport import solve_tau

    comm = MPI.COMM_WORLD
    tagged = structured_hill3d_mesh(
        1.0, crest_amplitude=0.2, resolution=resolution, span_cells=span_cells, comm=comm
    )
    spec = hill_boundary_spec(tagged.boundaries, tagged.period)
    iterative = path == "iterative"
    flow_options = dict(ITERATIVE_FLOW_OPTIONS) if iterative else {}
    scalar_options = dict(ITERATIVE_SCALAR_OPTIONS) if iterative else {}
    V = fem.functionspace(tagged.mesh, ("Lagrange", 1))
    if tau_only:
        # A channel-like profile between the walls stands in for the flow (tau-only sizes are
        # beyond what the flow solve reaches on this machine); the tau systems keep their size.
        velocity = fem.Function(fem.functionspace(tagged.mesh, ("Lagrange", 1, (3,))))
        velocity.interpolate(
            lambda x: np.vstack([x[1] * (TOP_WALL_HEIGHT - x[1]), 0 * x[0], 0 * x[0]])
        )
        flow = None
        flow_time, flow_rss = 0.0, 0
    else:
        flow = solve_flow(tagged.mesh, tagged.facet_tags, spec, petsc_options=flow_options)
        flow_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        flow_time = flow.wall_time - flow.timings.get("setup", 0.0)
        velocity = flow.u
    fdim = tagged.mesh.topology.dim - 1
    boundary = np.unique(
        np.concatenate(
            [
                fem.locate_dofs_topological(V, fdim, tagged.facet_tags.find(t))
                for t in spec.dirichlet_tags
            ]
        )
    ).astype(np.int32)
    constraint = PeriodicConstraint(V, tagged.facet_tags, spec.periodic, excluded_dofs=boundary)
    strain = strain_rate_magnitude(velocity, V, constraint=constraint)
    distance = wall_distance_function(V, tagged.facet_tags, spec.walls, period=tagged.period)
    start = time.perf_counter()
    tau = solve_tau(
        V,
        velocity,
        strain,
        distance,
        tagged.facet_tags,
        spec,
        constraint=constraint,
        petsc_options=scalar_options,
    )
    tau_time = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    summary = {
        "resolution": resolution,
        "span_cells": span_cells,
        "path": path,
        "ranks": comm.size,
        "flow_dofs": flow.num_dofs if flow else 0,
        "tau_dofs": V.dofmap.index_map.size_global,
        "newton_steps": flow.newton_iterations if flow else 0,
        "flow_seconds": comm.allreduce(flow_time, op=MPI.MAX),
        "tau_seconds": comm.allreduce(tau_time, op=MPI.MAX),
        "flow_peak_rss_mb": comm.allreduce(flow_rss, op=MPI.SUM) / 1024,
        "peak_rss_mb": comm.allreduce(peak_rss, op=MPI.SUM) / 1024,
        "body_force": flow.body_force if flow else 1.0,
        "tau_integral": tau.integral,
    }
    if comm.rank == 0:
        print(json.dumps(summary), flush=True)


def _run_worker(
    resolution: float, span_cells: int, path: str, ranks: int, *, tau_only: bool = False
) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        f"{resolution}:{span_cells}:{path}:{int(tau_only)}",
    ]
    if ranks > 1:
        command = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks), *command]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, env=environment, check=False
    )
    if completed.returncode != 0:
        raise SystemExit(f"worker failed ({command}):\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


#: The size of item 8 of the scale goal: the fits below are extrapolated to it.
TARGET_FLOW_DOFS = 1_000_000


def scaling_table(rows: list[dict]) -> tuple[str, list[dict]]:
    """Observed exponents of the flow solves' cost against size, per rank count and path.

    A least-squares fit of ``log(cost) = c + k log(flow dofs)`` over the sizes of one rank
    count (at least three), for the solve seconds and the peak memory, and the time fit's
    value at :data:`TARGET_FLOW_DOFS` (an extrapolation). The memory includes a fixed
    per-rank overhead (Python, dolfinx, MUMPS; about 200 MB), so its exponent over small
    sizes understates the factorisation's growth and is not extrapolated.

    Args:
        rows: the benchmark's rows (``{"direct": report, "iterative": report}``).

    Returns:
        The Markdown table and its rows.
    """
    import numpy as np

    lines = [
        "| ranks | path | sizes | dofs | time exponent | memory exponent "
        f"| time at {TARGET_FLOW_DOFS:,} dofs, extrapolated (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    fits = []
    for count in sorted({row["direct"]["ranks"] for row in rows}):
        for path in ("direct", "iterative"):
            reports = [row[path] for row in rows if row[path]["ranks"] == count]
            if len(reports) < 3:
                continue
            dofs = np.log([r["flow_dofs"] for r in reports])
            fit = {"ranks": count, "path": path, "sizes": len(reports),
                   "dofs": [int(r["flow_dofs"]) for r in reports]}
            for key, name in (("flow_seconds", "time"), ("flow_peak_rss_mb", "memory")):
                slope, intercept = np.polyfit(dofs, np.log([r[key] for r in reports]), 1)
                fit[f"{name}_exponent"] = float(slope)
                fit[f"{name}_at_target"] = float(np.exp(intercept + slope * np.log(TARGET_FLOW_DOFS)))
            fits.append(fit)
            lines.append(
                f"| {count} | {path} | {fit['sizes']} | {fit['dofs'][0]:,}-{fit['dofs'][-1]:,} "
                f"| {fit['time_exponent']:.2f} | {fit['memory_exponent']:.2f} "
                f"| {fit['time_at_target']:.0f} |"
            )
    return "\n".join(lines), fits


def main() -> int:
    """Run the grid of sizes, ranks and paths; print the table; check agreement."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.05:2,0.075:3,0.1:4", help="r:span_cells,...")
    parser.add_argument("--ranks", default="1,2", help="rank counts, comma-separated")
    parser.add_argument(
        "--tau-sizes",
        default="0.2:8,0.3:12,0.45:18",
        help="r:span_cells,... of tau-only runs (an analytic velocity; serial), '' for none",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        resolution, span_cells, path, tau_only = arguments.worker.split(":")
        _worker(float(resolution), int(span_cells), path, tau_only=bool(int(tau_only)))
        return 0
    from solvers.linalg import ITERATIVE_FLOW_OPTIONS, ITERATIVE_SCALAR_OPTIONS
    from vcnn.system import cpu_model

    sizes = [
        (float(r), int(n))
        for r, n in (item.split(":") for item in arguments.sizes.split(",") if item)
    ]
    ranks = [int(n) for n in arguments.ranks.split(",")]
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    rows = []
    for resolution, span_cells in sizes:
        for count in ranks:
            direct = _run_worker(resolution, span_cells, "direct", count)
            iterative = _run_worker(resolution, span_cells, "iterative", count)
            rows.append({"direct": direct, "iterative": iterative})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    tau_sizes = [
        (float(r), int(n))
        for r, n in (item.split(":") for item in arguments.tau_sizes.split(",") if item)
    ]
    tau_rows = []
    for resolution, span_cells in tau_sizes:
        direct = _run_worker(resolution, span_cells, "direct", 1, tau_only=True)
        iterative = _run_worker(resolution, span_cells, "iterative", 1, tau_only=True)
        tau_rows.append({"direct": direct, "iterative": iterative})
        print(json.dumps(tau_rows[-1]), file=sys.stderr, flush=True)
    print(
        "\n| r | span | ranks | flow dofs | flow direct s | flow iterative s | flow direct MB "
        "| flow iterative MB | tau dofs | tau direct s | tau iterative s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for row in rows:
        d, i = row["direct"], row["iterative"]
        print(
            f"| {d['resolution']} | {d['span_cells']} | {d['ranks']} | {d['flow_dofs']} "
            f"| {d['flow_seconds']:.1f} | {i['flow_seconds']:.1f} "
            f"| {d['flow_peak_rss_mb']:.0f} | {i['flow_peak_rss_mb']:.0f} | {d['tau_dofs']} "
            f"| {d['tau_seconds']:.2f} | {i['tau_seconds']:.2f} |"
        )
        for key in ("body_force", "tau_integral"):
            worst = max(worst, abs(i[key] / d[key] - 1))
    scaling, fits = scaling_table(rows)
    if fits:
        print(f"\nObserved exponents (cost ~ dofs^k, least squares over the sizes) and the "
              f"fits at {TARGET_FLOW_DOFS:,} flow dofs:\n")
        print(scaling)
    print("\nTau only (analytic velocity, serial):\n")
    print("| r | span | tau dofs | direct s | iterative s | direct MB | iterative MB |")
    print("|---|---|---|---|---|---|---|")
    for row in tau_rows:
        d, i = row["direct"], row["iterative"]
        print(
            f"| {d['resolution']} | {d['span_cells']} | {d['tau_dofs']} | {d['tau_seconds']:.2f} "
            f"| {i['tau_seconds']:.2f} | {d['peak_rss_mb']:.0f} | {i['peak_rss_mb']:.0f} |"
        )
        worst = max(worst, abs(i["tau_integral"] / d["tau_integral"] - 1))
    OUTPUT.mkdir(parents=True, exist_ok=True)
    metrics = {
        "config": {
            "sizes": sizes,
            "ranks": ranks,
            "alpha": 1.0,
            "crest_amplitude": 0.2,
            "flow_options": ITERATIVE_FLOW_OPTIONS,
            "scalar_options": ITERATIVE_SCALAR_OPTIONS,
        },
        "rows": rows,
        "scaling": fits,
        "tau_rows": tau_rows,
        "worst_relative_difference": worst,
    }
    (OUTPUT / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"\nworst relative difference direct/iterative (body force, tau integral): {worst:.2e}")
    if worst > TOLERANCE:
        print(f"FAIL: above {TOLERANCE}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
