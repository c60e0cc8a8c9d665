"""Evaluate the shipped coupled network closure on a coarse hill, serially or under MPI.

Run serially (the root path: the whole case on one rank) or under ``mpiexec -n 2`` (the
distributed closure: owned points plus a halo per rank). Rank 0 writes a JSON file with tau
and the points in case-file order (which depends on the partition) and, under MPI, the checks
of the halo: with full clouds (``--clouds full``) every owned point's cloud on its rank has
exactly the members of its serial cloud (point and periodic image); with the cloud quadrature
(``--clouds quadrature``) its nodes read the same points with the same weights; and the points
each rank holds. With ``--fail`` the evaluation fails on one rank (a NaN in its flow, or its
model raising) and every rank writes the error it raised. Used by
tests/test_distributed_closure.py.
"""

from mpi4py import MPI

import argparse
import json
import time
from pathlib import Path

import numpy as np

from meshes.hills3d import structured_hill3d_mesh
from meshes.structured import structured_hill_mesh
from solvers.boundaries import hill_boundary_spec
from solvers.closures import ClosureError, NetworkClosure, load_network_closure
from solvers.problem import ClosureProblem
from vcnn.physics import Physics

COMM = MPI.COMM_WORLD
MODEL = Path(__file__).resolve().parents[2] / "experiments" / "coupled" / "model" / "best.pt"


def cloud_entries(closure, case, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(nnz, 2 + d) int64 rows (query id, member id, periodic image per axis) of full clouds.

    Args:
        closure: the vcnn closure (its cloud options).
        case: the case the clouds are searched in.
        queries: (Q,) int64 indices of the case's query points.
        ids: (N,) int64 global id of every point of the case.
    """
    sampler = closure.cloud_options.sampler(case.points, case.velocity, case.period)
    clouds = sampler.full_clouds(queries)
    members = clouds.indices.astype(np.int64)
    owners = np.repeat(queries, np.diff(clouds.offsets))
    relative = clouds.relative_positions.astype(np.float64)
    # x_member + k L - x_query = relative: the image k of the member along each axis
    shift = relative - (case.points[members] - case.points[owners])
    period = np.where(case.period > 0, case.period, 1.0)
    images = np.rint(shift / period).astype(np.int64)
    return np.column_stack([ids[owners], ids[members], images])


def sorted_rows(rows: np.ndarray) -> np.ndarray:
    """The rows in lexicographic order."""
    return rows[np.lexsort(rows.T[::-1])]


def quadrature_entries(
    closure, case, queries: np.ndarray, ids: np.ndarray, mean_speed: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature clouds by global id: (nnz, 3) int64 rows (query id, entry's place in its
    cloud, member id) and (nnz,) float64 weights, in lexicographic order of the rows."""
    from vcnn.cloud_quadrature import CloudQuadrature

    clouds = CloudQuadrature(
        case.points, case.velocity, case.period, case.wall_distance, closure.cloud_options,
        options=closure.quadrature_options, mean_speed=mean_speed,
    ).clouds(queries)
    sizes = np.diff(clouds.offsets)
    place = np.arange(clouds.indices.size) - np.repeat(clouds.offsets[:-1], sizes)
    rows = np.column_stack(
        [np.repeat(ids[clouds.queries], sizes), place, ids[clouds.indices]]
    ).astype(np.int64)
    order = np.lexsort(rows.T[::-1])
    return rows[order], clouds.weights.astype(np.float64)[order]


def inject_failure(kind: str, problem, network) -> None:
    """Make this rank's part of the evaluation fail: a NaN in its flow, or the model raising."""
    if kind == "nan-velocity":
        values = problem.velocity_values

        def with_nan() -> np.ndarray:
            velocity = values()
            velocity[0, 0] = np.nan
            return velocity

        problem.velocity_values = with_nan
    elif kind == "model-error" and network.model is not None:  # the root mode: rank 0's

        def broken(*args, **kwargs):
            raise RuntimeError("injected failure of the model on this rank")

        network.model.predict_detailed = broken


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolution", type=float, default=0.25)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--clouds", choices=["full", "quadrature"], default="full")
    parser.add_argument("--fail", choices=["nan-velocity", "model-error"], default=None,
                        help="make the evaluation fail on --fail-rank; every rank writes "
                        "the error it raised to OUT.rank<r>.json")
    parser.add_argument("--fail-rank", type=int, default=1)
    parser.add_argument("--ranks", choices=["distributed", "root"], default="distributed")
    parser.add_argument("--model", type=Path, default=MODEL, help="the closure's checkpoint")
    parser.add_argument("--crest-amplitude", type=float, default=None,
                        help="the 3-D hill of this crest amplitude (periodic in x and z)")
    parser.add_argument("--span-cells", type=int, default=2, help="3-D: layers across the span")
    parser.add_argument("--count-gathers", action="store_true",
                        help="run a two-way coupled solve and count the gathers on rank 0 "
                        "during it")
    args = parser.parse_args()

    model, record = load_network_closure(str(args.model), COMM, device="cpu")
    physics = Physics.from_dict({k: v for k, v in record.items() if k not in ("eps", "dimension")})
    if args.crest_amplitude is None:
        tagged = structured_hill_mesh(1.0, resolution=args.resolution, comm=COMM)
    else:
        tagged = structured_hill3d_mesh(
            1.0, crest_amplitude=args.crest_amplitude, resolution=args.resolution,
            span_cells=args.span_cells, comm=COMM,
        )
    spec = hill_boundary_spec(tagged.boundaries, tagged.period)
    report: dict = {"ranks": COMM.size}
    two_way = args.count_gathers
    with ClosureProblem.from_tagged_mesh(tagged, spec, physics, two_way=two_way) as problem:
        problem.solve_flow()
        if args.count_gathers:
            count_gathers(problem, model, report)
            if COMM.rank == 0:
                args.out.write_text(json.dumps(report))
            return
        network = NetworkClosure(model, COMM, name="probe", clouds=args.clouds, ranks=args.ranks)
        report["mode"] = network.ranks
        if args.fail is not None:
            if COMM.rank == args.fail_rank:
                inject_failure(args.fail, problem, network)
            outcome = {"rank": COMM.rank, "mode": network.ranks, "error": None}
            try:
                network.evaluate(problem)
            except ClosureError as error:
                outcome.update(error=str(error), type=type(error).__name__)
            # the ranks are all here: a rank that waited for a stopped one would not be
            COMM.Barrier()
            args.out.with_suffix(f".rank{COMM.rank}.json").write_text(json.dumps(outcome))
            return
        start = time.perf_counter()
        output = network.evaluate(problem)
        report["closure_seconds"] = COMM.allreduce(time.perf_counter() - start, op=MPI.MAX)
        tau = problem.points.gather(output.tau)
        # the case-file order depends on the partition: the test matches points by position
        points = problem.points.gather(problem.points.local_points)
        report["num_points"] = problem.points.num_points
        if network.ranks == "distributed":
            # the checks below gather the whole state on rank 0: the test does, the closure not
            local = network.local_case(problem)
            halo = network.halo
            owned = problem.points.local_dofs.size
            ids = np.concatenate([problem.points.global_ids, halo.halo_ids])
            report["held_points"] = COMM.gather(int(local.num_points), root=0)
            report["owned_points"] = COMM.gather(int(owned), root=0)
            everything = problem.case(np.zeros(owned), name="all")
            if args.clouds == "quadrature":
                check_quadrature(network, local, np.arange(owned), ids, everything, report)
            else:
                check_full(network, local, np.arange(owned), ids, everything, report)
    if COMM.rank == 0:
        report["tau"] = tau.tolist()
        report["points"] = points.tolist()
        args.out.write_text(json.dumps(report))


def count_gathers(problem, model, report: dict) -> None:
    """Count what the loop gathers of the whole field on one rank: nothing per iteration."""
    from solvers.closure_loop import OuterOptions, solve_two_way

    calls = {"gather": 0, "case": 0, "distribute": 0}
    points = problem.points
    for name, owner in (("gather", points), ("distribute", points), ("case", problem)):
        original = getattr(owner, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        setattr(owner, name, counted)
    network = NetworkClosure(model, COMM, name="loop")
    result = solve_two_way(problem, network, OuterOptions(tol=1e-5))
    report.update(mode=network.ranks, evaluations=result.evaluations, converged=result.converged,
                  calls=COMM.allreduce(sum(calls.values()), op=MPI.SUM))
    # the counters see the gathers where there are some: one evaluation of the root mode
    NetworkClosure(model, COMM, name="root", ranks="root").evaluate(problem)
    report["root_calls"] = COMM.allreduce(sum(calls.values()), op=MPI.SUM) - report["calls"]


def check_full(network, local, queries, ids, everything, report: dict) -> None:
    """Full clouds: every owned point's cloud holds exactly its serial members and images."""
    rows = cloud_entries(network.model, local, queries, ids)
    # members from another rank seen through a periodic image
    crossing = int(np.count_nonzero(
        np.any(rows[:, 2:] != 0, axis=1) & ~np.isin(rows[:, 1], ids[queries])
    ))
    report["halo_images_from_other_ranks"] = COMM.allreduce(crossing, op=MPI.SUM)
    gathered = COMM.gather(rows, root=0)
    if COMM.rank == 0:
        every = np.arange(everything.num_points)
        serial = cloud_entries(network.model, everything, every, every)
        distributed = np.concatenate(gathered)
        report["entries"] = [int(serial.shape[0]), int(distributed.shape[0])]
        report["same_cloud_members"] = bool(
            serial.shape == distributed.shape
            and np.array_equal(sorted_rows(serial), sorted_rows(distributed))
        )
        report["periodic_image_entries"] = int(
            np.count_nonzero(np.any(serial[:, 2:] != 0, axis=1))
        )
        # per axis: the cloud entries that are images across that axis's period
        report["periodic_images_per_axis"] = np.count_nonzero(serial[:, 2:], axis=0).tolist()


def check_quadrature(network, local, queries, ids, everything, report: dict) -> None:
    """Quadrature clouds: every owned point's nodes read the serial points with its weights."""
    found = quadrature_entries(network.model, local, queries, ids, network.mean_speed)
    gathered = COMM.gather(found, root=0)
    if COMM.rank == 0:
        every = np.arange(everything.num_points)
        serial_rows, serial_weights = quadrature_entries(
            network.model, everything, every, every, None
        )
        rows = np.concatenate([part[0] for part in gathered])
        weights = np.concatenate([part[1] for part in gathered])
        order = np.lexsort(rows.T[::-1])
        rows, weights = rows[order], weights[order]
        same = rows.shape == serial_rows.shape and np.array_equal(rows, serial_rows)
        report["same_quadrature_members"] = bool(same)
        report["quadrature_weight_difference"] = (
            float(np.abs(weights - serial_weights).max() / np.abs(serial_weights).max())
            if same else None
        )


if __name__ == "__main__":
    main()
