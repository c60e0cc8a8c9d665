"""Time the derived fields and the tau solve on the structured periodic-hill mesh.

Prints a table of wall-clock seconds per stage (max over ranks). By default the velocity is
an analytic stand-in (the cost of the tau solve does not depend on it); ``--flow`` solves the
laminar flow first (much slower) and also prints the tau statistics that DESIGN 3.4 quotes
(mean over the P1 nodes here, the published mean is over cells).

    python tests/mpi_scripts/tau_timing.py --resolution 1.0
    mpiexec -n 2 python tests/mpi_scripts/tau_timing.py --resolution 1.0
"""

from mpi4py import MPI

import argparse
import time

import numpy as np
from dolfinx import fem

from meshes.structured import structured_hill_mesh
from solvers.boundaries import hill_boundary_spec
from solvers.fields import nodal_volumes, strain_rate_magnitude, wall_distance_function
from solvers.flow import solve_flow
from solvers.transport import dirichlet_dofs, solve_tau


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--resolution", type=float, default=1.0)
    parser.add_argument("--cell-type", default="quadrilateral")
    parser.add_argument("--flow", action="store_true")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    times: dict[str, float] = {}

    def stage(name: str, start: float) -> float:
        now = time.perf_counter()
        times[name] = comm.allreduce(now - start, op=MPI.MAX)
        return time.perf_counter()

    start = time.perf_counter()
    tagged = structured_hill_mesh(
        args.alpha, resolution=args.resolution, comm=comm, cell_type=args.cell_type
    )
    mesh, tags = tagged.mesh, tagged.facet_tags
    spec = hill_boundary_spec(tagged.boundaries, tagged.period)
    V = fem.functionspace(mesh, ("Lagrange", 1))
    start = stage("mesh", start)
    if args.flow:
        velocity = solve_flow(mesh, tags, spec).u
        start = stage("flow", start)
    else:
        W = fem.functionspace(mesh, ("Lagrange", 2, (2,)))
        velocity = fem.Function(W)
        top = 85.0 / 28.0
        velocity.interpolate(
            lambda x: np.vstack([1.5 * x[1] * (top - x[1]) / top, 0.1 * np.sin(x[0])])
        )
        start = time.perf_counter()
    from solvers.periodic import PeriodicConstraint

    constraint = PeriodicConstraint(
        V, tags, spec.periodic, excluded_dofs=dirichlet_dofs(V, tags, spec.dirichlet_tags)
    )
    start = stage("periodic constraint", start)
    distance = wall_distance_function(V, tags, spec.walls, period=tagged.period)
    start = stage("wall distance", start)
    strain_rate = strain_rate_magnitude(velocity, V, constraint=constraint)
    start = stage("strain rate", start)
    volumes = nodal_volumes(V, constraint=constraint)
    start = stage("nodal volumes", start)
    frozen = solve_tau(
        V, velocity, strain_rate, distance, tags, spec, production="frozen", constraint=constraint
    )
    start = stage(f"tau frozen ({frozen.newton_iterations} Newton)", start)
    coupled = solve_tau(
        V, velocity, strain_rate, distance, tags, spec, production="coupled", constraint=constraint
    )
    start = stage(f"tau coupled ({coupled.newton_iterations} Newton incl. frozen)", start)

    num_nodes = V.dofmap.index_map.size_global
    owned = V.dofmap.index_map.size_local
    tau = frozen.tau.x.array[:owned]
    area = float(constraint.restrict_vector(volumes.x.petsc_vec).sum())  # global sum
    tau_max = comm.allreduce(float(tau.max()), op=MPI.MAX)
    tau_mean = comm.allreduce(float(tau.sum()), op=MPI.SUM) / num_nodes
    if comm.rank == 0:
        print(f"alpha {args.alpha}, {args.cell_type}, {num_nodes} P1 nodes, {comm.size} ranks")
        print(f"{'stage':<50} {'seconds':>9}")
        for name, seconds in times.items():
            print(f"{name:<50} {seconds:9.2f}")
        print(
            f"frozen tau: integral {frozen.integral:.5f}, mean/area {frozen.integral / area:.4f},"
            f" nodal mean {tau_mean:.4f}, max {tau_max:.4f}"
        )
        print(f"coupled tau: integral {coupled.integral:.5f}")


if __name__ == "__main__":
    main()
