"""Wall-clock of each stage of one hill case (mesh, flow, derived fields, tau), serial and MPI.

Usage: python experiments/bench_pipeline.py [--alpha 1] [--resolution 1] [--ranks 1 2]

Forms are compiled (and cached) by a warm-up case at low resolution first, so the timings are
"after form compilation". Each rank count runs in its own ``mpiexec -n R`` process; the table
(Markdown) goes to stdout and to results/bench_pipeline.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from vcnn.system import machine_summary

STAGES = {
    "mesh": ("mesh",),
    "setup (P1 space, periodic map)": ("setup",),
    "flow (Navier-Stokes, Newton)": ("flow",),
    "derived fields (wall distance, |S|, volumes)": ("wall distance", "derived fields"),
    "tau (Newton)": ("tau",),
}


def worker(alpha: float, resolution: float) -> None:
    """Run one case on all ranks of COMM_WORLD and print its stage times as JSON on rank 0."""
    from mpi4py import MPI

    from solvers.generate import GenerateConfig, generate_case

    with tempfile.TemporaryDirectory() as folder:
        config = GenerateConfig.from_dict(
            {
                "alphas": [alpha],
                "out": folder,
                "plots": False,
                "xdmf": False,
                "mesh": {"resolution": resolution},
            }
        )
        report = generate_case(config, "bench", alpha, comm=MPI.COMM_WORLD)
    if MPI.COMM_WORLD.rank == 0:
        print("RESULT " + json.dumps({"stages": report.stage_times, "points": report.num_points}))


def run(ranks: int, alpha: float, resolution: float) -> dict:
    mpiexec = Path(sys.executable).with_name("mpiexec")
    command = [sys.executable, __file__, "--worker", f"--alpha={alpha}"]
    command += [f"--resolution={resolution}"]
    if ranks > 1:
        command = [str(mpiexec), "-n", str(ranks), *command]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{ranks}-rank run failed:\n{result.stderr[-3000:]}")
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--resolution", type=float, default=1.0)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("results/bench_pipeline.md"))
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.alpha, args.resolution)
        return 0
    print("warm-up (form compilation) ...", file=sys.stderr)
    run(1, args.alpha, 0.1)
    results = {}
    for ranks in args.ranks:
        print(f"alpha = {args.alpha}, resolution {args.resolution}, {ranks} rank(s) ...",
              file=sys.stderr)
        results[ranks] = run(ranks, args.alpha, args.resolution)
    header = "| stage | " + " | ".join(f"{r} rank{'s' * (r > 1)} (s)" for r in results) + " |"
    lines = [
        f"Hill case alpha = {args.alpha:g}, resolution {args.resolution:g} "
        f"({results[args.ranks[0]]['points']} closure points); {machine_summary()}; "
        "forms compiled beforehand.",
        "",
        header,
        "|---" * (len(results) + 1) + "|",
    ]
    totals = dict.fromkeys(results, 0.0)
    for label, keys in STAGES.items():
        cells = []
        for ranks, result in results.items():
            seconds = sum(result["stages"].get(key, 0.0) for key in keys)
            totals[ranks] += seconds
            cells.append(f"{seconds:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(f"**{t:.2f}**" for t in totals.values()) + " |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
