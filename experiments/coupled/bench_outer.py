"""Outer iterations of the PDE-coupled hill: SNES Anderson / NGMRES against relaxed Picard.

Two-way coupling nu_t = C_k l_m sqrt(max(tau, 0)) with the tau PDE as the closure, solved on
one :class:`solvers.problem.ClosureProblem` (set up once) by every outer method in turn, each
from rest (laminar flow, tau = 0) to the same tolerance. Prints a Markdown table: closure
evaluations (each one warm-started flow solve and one warm-started tau solve), wall time,
speed-up over relaxed Picard (omega = 0.7, the previous default), and the agreement of the
solutions. Optionally also times the previous implementation (``--baseline PATH``: a checkout
whose ``solvers.coupled.solve_coupled`` rebuilt the spaces, forms and solvers at every flow and
tau solve), run in a separate process.

Usage: python experiments/coupled/bench_outer.py [--resolution 0.25] [--production frozen]
           [--c-k 0.15] [--tol 1e-8] [--baseline /path/to/old/checkout]
"""

from __future__ import annotations

from mpi4py import MPI

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from meshes.structured import structured_hill_mesh
from solvers.boundaries import hill_boundary_spec
from solvers.closure_loop import OuterOptions, solve_two_way
from solvers.closures import PdeClosure
from solvers.problem import ClosureProblem
from vcnn.physics import Physics
from vcnn.system import machine_summary

METHODS = (("picard", 0.7), ("picard", 1.0), ("anderson", 0.7), ("ngmres", 0.7))

BASELINE = """
import json, sys, time
from mpi4py import MPI
from meshes.structured import structured_hill_mesh
from solvers.boundaries import hill_boundary_spec
import solvers.coupled
from solvers.coupled import solve_coupled
alpha, resolution, production, c_k, tol = sys.argv[1:6]
tagged = structured_hill_mesh(float(alpha), resolution=float(resolution), comm=MPI.COMM_WORLD)
spec = hill_boundary_spec(tagged.boundaries, tagged.period)
start = time.perf_counter()
solution = solve_coupled(tagged.mesh, tagged.facet_tags, spec, c_k=float(c_k),
                         production=production, tol=float(tol))
print("RESULT " + json.dumps({"iterations": solution.iterations,
      "seconds": time.perf_counter() - start, "body_force": solution.flow.body_force,
      "module": solvers.coupled.__file__}))
"""


def run_baseline(checkout: Path, args) -> dict:
    """Time the previous solve_coupled of another checkout (a fresh process)."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", BASELINE, str(args.alpha), str(args.resolution),
               args.production, str(args.c_k), str(args.tol)]
    # run from the checkout: ``python -c`` puts the working folder first on sys.path (its
    # forms are those of this checkout, compiled and cached by the runs above)
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, check=False, cwd=checkout
    )
    if result.returncode != 0:
        raise RuntimeError(f"baseline failed:\n{result.stderr[-3000:]}")
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--resolution", type=float, default=0.25)
    parser.add_argument("--production", default="frozen", choices=["frozen", "coupled"])
    parser.add_argument("--c-k", type=float, default=0.15)
    parser.add_argument("--tol", type=float, default=1e-8)
    parser.add_argument("--baseline", type=Path, help="checkout of the previous solve_coupled")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    comm = MPI.COMM_WORLD
    tagged = structured_hill_mesh(args.alpha, resolution=args.resolution, comm=comm)
    spec = hill_boundary_spec(tagged.boundaries, tagged.period)
    physics = Physics(production=args.production, c_k=args.c_k)
    rows = []
    start = time.perf_counter()
    with ClosureProblem.from_tagged_mesh(tagged, spec, physics) as problem:
        setup = time.perf_counter() - start
        with PdeClosure(problem) as closure:
            # warm-up: compile the tau forms outside the timings
            problem.solve_flow()
            closure.evaluate(problem)
            for method, relaxation in METHODS:
                problem.reset()
                options = OuterOptions(method=method, relaxation=relaxation, tol=args.tol,
                                       negative_tolerance=None, max_iterations=100)
                clock = time.perf_counter()
                result = solve_two_way(problem, closure, options)
                seconds = time.perf_counter() - clock
                tau = problem.points.gather(result.tau)
                rows.append((f"{method} (omega {relaxation:g})" if method == "picard"
                             else method, result.evaluations, seconds, tau,
                             result.flow.body_force,
                             sum(s.flow_iterations for s in result.history),
                             sum(s.closure_iterations for s in result.history),
                             # after the first evaluation (the laminar flow from rest and its
                             # tau), which every method starts with
                             sum(s.seconds for s in result.history[1:])))
        points = problem.points.num_points
        dofs = problem.flow_solver.num_dofs
    baseline = None
    if args.baseline and comm.rank == 0:
        try:
            baseline = run_baseline(args.baseline, args)
        except RuntimeError as error:  # the table of this checkout is still worth printing
            print(f"baseline not timed: {error}", file=sys.stderr)
    if comm.rank != 0:
        return 0
    reference_its, reference_seconds, reference_rest = rows[0][1], rows[0][2], rows[0][7]
    reference_tau = rows[0][3]
    lines = [
        f"Hill alpha = {args.alpha:g}, structured, resolution {args.resolution:g} ({points} "
        f"closure points, {dofs} flow dofs), production {args.production}, C_k = "
        f"{args.c_k:g}, tol {args.tol:g}; {comm.size} rank(s); {machine_summary()}; "
        f"problem set-up {setup:.2f} s (once, not in the times below).",
        "",
        "| outer | evaluations | flow Newton steps | tau Newton steps | wall s | "
        "wall s after the first evaluation | speed-up (evaluations) | speed-up (time) | "
        "speed-up (time after the first) | tau vs picard 0.7 (rel L2) | body force |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, evaluations, seconds, tau, force, flow_steps, tau_steps, rest in rows:
        difference = np.linalg.norm(tau - reference_tau) / np.linalg.norm(reference_tau)
        lines.append(
            f"| {name} | {evaluations} | {flow_steps} | {tau_steps} | {seconds:.2f} | "
            f"{rest:.2f} | {reference_its / evaluations:.2f}x | "
            f"{reference_seconds / seconds:.2f}x | {reference_rest / rest:.2f}x | "
            f"{difference:.1e} | {force:.8e} |"
        )
    if baseline is not None:
        lines.append(
            f"| previous solve_coupled (picard 0.7, set-up per solve) | "
            f"{baseline['iterations']} | | | {baseline['seconds']:.2f} | | | "
            f"{reference_seconds / baseline['seconds']:.2f}x | | | "
            f"{baseline['body_force']:.8e} |"
        )
        lines.append("")
        lines.append(f"Previous implementation: {baseline['module']}.")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
