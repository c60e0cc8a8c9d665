"""Solve the frozen tau equation on a periodic Poiseuille channel and print its integral.

Run serially or under ``mpiexec -n 2``; rank 0 prints ``TAU_INTEGRAL <value>``. Used by
tests/test_transport.py to compare the parallel and serial solutions.
"""

from mpi4py import MPI

import argparse

import numpy as np
from dolfinx import fem
from dolfinx import mesh as dmesh

from solvers.boundaries import hill_boundary_spec
from solvers.fields import strain_rate_magnitude, wall_distance_function
from solvers.transport import solve_tau

BOUNDARIES = {"bottom": 1, "top": 2, "left": 3, "right": 4}


def channel(comm: MPI.Comm, length: float, height: float, nx: int, ny: int):
    """Rectangle [0, length] x [0, height] with the hill boundary tags."""
    mesh = dmesh.create_rectangle(
        comm, [[0.0, 0.0], [length, height]], [nx, ny], diagonal=dmesh.DiagonalType.crossed
    )
    fdim = mesh.topology.dim - 1
    markers = {
        1: lambda x: np.isclose(x[1], 0.0),
        2: lambda x: np.isclose(x[1], height),
        3: lambda x: np.isclose(x[0], 0.0),
        4: lambda x: np.isclose(x[0], length),
    }
    facets, values = [], []
    for tag, marker in markers.items():
        found = dmesh.locate_entities_boundary(mesh, fdim, marker)
        facets.append(found)
        values.append(np.full(found.size, tag, dtype=np.int32))
    facets = np.concatenate(facets)
    values = np.concatenate(values)
    order = np.argsort(facets)
    return mesh, dmesh.meshtags(mesh, fdim, facets[order], values[order])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nx", type=int, default=12)
    parser.add_argument("--ny", type=int, default=16)
    parser.add_argument("--production", default="frozen")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    length, height = 2.0, 2.0
    mesh, facet_tags = channel(comm, length, height, args.nx, args.ny)
    spec = hill_boundary_spec(BOUNDARIES, (length, 0.0))
    V = fem.functionspace(mesh, ("Lagrange", 1))
    W = fem.functionspace(mesh, ("Lagrange", 2, (2,)))
    velocity = fem.Function(W)
    # Poiseuille profile with bulk velocity 1; a small cross-flow that is periodic in x
    # makes the solution genuinely 2-D, so the periodic pairing matters.
    velocity.interpolate(
        lambda x: np.vstack(
            [
                1.5 * 4.0 * x[1] * (height - x[1]) / height**2,
                0.2 * np.sin(np.pi * x[0]) * x[1] * (height - x[1]),
            ]
        )
    )
    strain_rate = strain_rate_magnitude(velocity, V)
    distance = wall_distance_function(V, facet_tags, spec.walls)
    solution = solve_tau(
        V, velocity, strain_rate, distance, facet_tags, spec, production=args.production
    )
    if comm.rank == 0:
        print(f"TAU_INTEGRAL {solution.integral:.15e}", flush=True)
        print(f"NEWTON_ITERATIONS {solution.newton_iterations}", flush=True)


if __name__ == "__main__":
    main()
