"""The distributed network closure on 1 and 2 ranks: time and memory per rank.

On the alpha = 1 hill at each ``--resolutions`` (1: 40,200 closure points; 2: about 160,000),
with the shipped coupled closure (full clouds), it runs a worker under ``mpiexec -n R`` for
each ``--ranks`` R: the worker builds the problem, sets the flow (``--flow solve``: the
Taylor-Hood solve; ``--flow analytic``: a wall-bounded profile u_x = 1.2 U_b tanh(d / 0.3) of
the wall distance d, which skips the flow solve of the larger meshes but gives clouds of the
same sizes), evaluates the closure once to warm up and then again, timed. Per rank it records
the owned and held (owned + halo) closure points, the closure's wall time and the peak resident
memory during the timed evaluation above the memory before it (sampled every 2 ms from
``/proc/self/statm``; what the closure itself allocates, not the mesh and flow solver). It
also records the whole-mesh arrays that rank 0 keeps from the set-up, once, for writing case
files (closure-point coordinates, P1 cells, wall flags, nodal volumes and wall distances:
:class:`solvers.closure_points.ClosurePoints`, :class:`solvers.problem.ClosureProblem`); the
distributed closure and the coupled loop gather nothing per evaluation.

Prints a Markdown table, writes ``results/bench_distributed/metrics.json``, ``table.md`` and
``config.json``; exits non-zero when the 2-rank tau leaves the 1-rank tau by more than
1e-6 of max |tau| at any resolution.

Usage::

    python experiments/bench_distributed.py [--resolutions 1 2] [--ranks 1 2]
        [--flow solve|analytic] [--out results/bench_distributed]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

MODEL = ROOT / "experiments" / "coupled" / "model" / "best.pt"
TOLERANCE = 1e-6
PAGE = os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """The largest resident set size seen while the block runs (a polling thread)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = self.before = 0

    @staticmethod
    def resident() -> int:
        """Resident bytes of this process now."""
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * PAGE

    def __enter__(self) -> PeakMemory:
        self.before = self.peak = self.resident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.resident())

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.resident())


def root_setup_bytes(problem) -> int:
    """Bytes of the whole-mesh arrays rank 0 keeps from the set-up (0 on the other ranks)."""
    points = problem.points
    arrays = (
        points.points,
        points.is_wall,
        points.cells,
        getattr(problem, "_gathered_volumes", None),  # gathered once in the set-up
        getattr(problem, "_gathered_distance", None),
    )
    return sum(array.nbytes for array in arrays if array is not None)


def worker(resolution: float, flow: str, out: Path) -> None:
    """One run under mpiexec: set up, warm up, time the closure; rank 0 writes the JSON."""
    from mpi4py import MPI

    from dolfinx import fem

    from meshes.structured import structured_hill_mesh
    from solvers.boundaries import hill_boundary_spec
    from solvers.closures import NetworkClosure, load_network_closure
    from solvers.problem import ClosureProblem
    from vcnn.physics import Physics

    comm = MPI.COMM_WORLD
    model, record = load_network_closure(str(MODEL), comm, device="cpu")
    physics = Physics.from_dict({k: v for k, v in record.items() if k not in ("eps", "dimension")})
    tagged = structured_hill_mesh(1.0, resolution=resolution, comm=comm)
    spec = hill_boundary_spec(tagged.boundaries, tagged.period)
    kind = "solve" if flow == "solve" else "given"
    clock = time.perf_counter()
    built = ClosureProblem.from_tagged_mesh(tagged, spec, physics, two_way=False, flow=kind)
    with built as problem:
        if flow == "solve":
            problem.solve_flow()
        else:
            space = fem.functionspace(problem.mesh, ("Lagrange", 1, (problem.mesh.geometry.dim,)))
            velocity = fem.Function(space)
            speed = 1.2 * physics.bulk_velocity * np.tanh(problem.wall_distance.x.array / 0.3)
            velocity.x.array.reshape(-1, problem.mesh.geometry.dim)[:, 0] = speed
            problem.set_velocity(velocity)
        setup = time.perf_counter() - clock
        network = NetworkClosure(model, comm, name="bench")
        network.evaluate(problem)  # warm-up: kernels loaded, caches filled
        comm.Barrier()
        with PeakMemory() as memory:
            start = time.perf_counter()
            output = network.evaluate(problem)
            seconds = time.perf_counter() - start
        held = (
            output.tau.size + network.halo.num_halo if network.ranks == "distributed"
            else problem.points.num_points if comm.rank == 0 else 0
        )
        rows = comm.gather(
            {
                "rank": comm.rank,
                "owned": int(output.tau.size),
                "held": int(held),
                "closure_seconds": seconds,
                "closure_peak_mb": (memory.peak - memory.before) / 2**20,
                "resident_mb": memory.peak / 2**20,
                "setup_arrays_mb": root_setup_bytes(problem) / 2**20,
            },
            root=0,
        )
        tau = problem.points.gather(output.tau)
        points = problem.points.gather(problem.points.local_points)
        if comm.rank == 0:
            out.write_text(json.dumps({
                "ranks": comm.size, "mode": network.ranks, "resolution": resolution,
                "num_points": problem.points.num_points, "setup_seconds": setup,
                "per_rank": rows, "tau": tau.tolist(), "points": points.tolist(),
            }))


def by_position(report: dict) -> np.ndarray:
    """Tau in the order of the points' coordinates (the case order depends on the partition)."""
    points = np.asarray(report["points"])
    order = np.lexsort((np.round(points[:, 1], 9), np.round(points[:, 0], 9)))
    return np.asarray(report["tau"])[order]


def main() -> int:
    """Run the workers, print the table, write the results; 0 when the check passes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--flow", choices=("solve", "analytic"), default="solve")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_distributed")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--resolution", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.resolution, args.flow, args.json)
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    config = {"model": str(MODEL.relative_to(ROOT)), "alpha": 1.0, "clouds": "full",
              "resolutions": args.resolutions, "ranks": args.ranks, "flow": args.flow,
              "seed": None, "tolerance": TOLERANCE,
              "threads": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count()}
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    mpiexec = Path(sys.executable).parent / "mpiexec"
    reports: dict[tuple[float, int], dict] = {}
    for resolution in args.resolutions:
        for ranks in args.ranks:
            target = args.out / f"r{resolution:g}_n{ranks}.json"
            command = [str(mpiexec), "-n", str(ranks), sys.executable, __file__, "--worker",
                       "--resolution", str(resolution), "--flow", args.flow, "--json", str(target)]
            subprocess.run(command, check=True, cwd=ROOT)
            reports[resolution, ranks] = json.loads(target.read_text())

    lines = [
        "| resolution | points | ranks | mode | held points per rank (of all) | closure s "
        "(slowest rank) | closure peak MB per rank | resident MB per rank | rank-0 set-up arrays "
        "MB | max abs diff / max tau |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    metrics, failed = [], []
    for (resolution, ranks), report in reports.items():
        rows = report["per_rank"]
        reference = reports.get((resolution, min(args.ranks)))
        difference = 0.0
        if reference is not None and reference is not report:
            expected, found = by_position(reference), by_position(report)
            difference = float(np.abs(found - expected).max() / np.abs(expected).max())
            if not difference <= TOLERANCE:
                failed.append(f"resolution {resolution:g}, {ranks} ranks: {difference:.2e}")
        held = ", ".join(
            f"{row['held']} ({row['held'] / report['num_points']:.0%})" for row in rows
        )
        lines.append(
            f"| {resolution:g} | {report['num_points']} | {ranks} | {report['mode']} | {held} | "
            f"{max(row['closure_seconds'] for row in rows):.2f} | "
            + ", ".join(f"{row['closure_peak_mb']:.0f}" for row in rows) + " | "
            + ", ".join(f"{row['resident_mb']:.0f}" for row in rows)
            + f" | {rows[0]['setup_arrays_mb']:.1f} | {difference:.1e} |"
        )
        metrics.append({key: value for key, value in report.items() if key not in ("tau", "points")}
                       | {"max_difference_to_fewest_ranks": difference})
    table = "\n".join(lines)
    print(table)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if failed:
        print(f"FAIL: more ranks leave the fewest ranks' tau by more than {TOLERANCE:g} of "
              f"max |tau|: {'; '.join(failed)}")
        return 1
    print(f"OK: the ranks agree within {TOLERANCE:g} of max |tau|")
    return 0


if __name__ == "__main__":
    sys.exit(main())
