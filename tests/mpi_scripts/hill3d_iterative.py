"""Flow and frozen tau on a coarse 3-D hill with the iterative solver paths; JSON on rank 0.

Run serially or under ``mpiexec -n 2``; tests/test_flow3d.py compares the two.
"""

from mpi4py import MPI

import json

import numpy as np
from dolfinx import fem

from meshes.hills3d import structured_hill3d_mesh
from solvers.boundaries import hill_boundary_spec
from solvers.fields import strain_rate_magnitude, wall_distance_function
from solvers.flow import solve_flow
from solvers.linalg import ITERATIVE_FLOW_OPTIONS, ITERATIVE_SCALAR_OPTIONS
from solvers.periodic import PeriodicConstraint
from solvers.transport import solve_tau


def main() -> None:
    """Solve and print the integral quantities as JSON (rank 0)."""
    comm = MPI.COMM_WORLD
    tagged = structured_hill3d_mesh(1.0, crest_amplitude=0.2, resolution=0.05, span_cells=2)
    spec = hill_boundary_spec(tagged.boundaries, tagged.period)
    flow = solve_flow(tagged.mesh, tagged.facet_tags, spec, petsc_options=ITERATIVE_FLOW_OPTIONS)
    V = fem.functionspace(tagged.mesh, ("Lagrange", 1))
    fdim = tagged.mesh.topology.dim - 1
    walls = [
        fem.locate_dofs_topological(V, fdim, tagged.facet_tags.find(t)) for t in spec.dirichlet_tags
    ]
    boundary = np.unique(np.concatenate(walls)).astype(np.int32)
    constraint = PeriodicConstraint(V, tagged.facet_tags, spec.periodic, excluded_dofs=boundary)
    strain = strain_rate_magnitude(flow.u, V, constraint=constraint)
    distance = wall_distance_function(V, tagged.facet_tags, spec.walls, period=tagged.period)
    tau = solve_tau(
        V,
        flow.u,
        strain,
        distance,
        tagged.facet_tags,
        spec,
        constraint=constraint,
        petsc_options=ITERATIVE_SCALAR_OPTIONS,
    )
    summary = {
        "body_force": flow.body_force,
        "bulk_velocity": flow.bulk_velocity,
        "tau_integral": tau.integral,
        "max_velocity": comm.allreduce(float(np.abs(flow.u.x.array).max()), op=MPI.MAX),
        "max_tau": comm.allreduce(float(tau.tau.x.array.max()), op=MPI.MAX),
        "ranks": comm.size,
    }
    if comm.rank == 0:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
