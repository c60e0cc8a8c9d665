"""Body-force-driven flow in a periodic wavy channel; prints a JSON summary on rank 0.

Run serially or under ``mpiexec -n 2``; tests/test_flow.py compares the two. The module also
provides the small tagged meshes the flow and periodicity tests use.
"""

from mpi4py import MPI

import argparse
import json

import numpy as np
from dolfinx import mesh as dmesh

from solvers.boundaries import BoundarySpec, PeriodicPair
from solvers.flow import solve_flow

BOTTOM, TOP, LEFT, RIGHT = 1, 2, 3, 4


def tagged_rectangle(
    comm: MPI.Comm,
    lower: tuple[float, float],
    upper: tuple[float, float],
    n: tuple[int, int],
    *,
    quadrilateral: bool = False,
    wave_amplitude: float = 0.0,
) -> tuple[dmesh.Mesh, dmesh.MeshTags]:
    """Rectangle with facets tagged bottom 1, top 2, left 3, right 4.

    With ``wave_amplitude`` the bottom wall becomes ``y = lower_y + A sin(2 pi x / L)`` (the
    interior follows linearly, the top stays flat), a periodic wavy channel.
    """
    cell_type = dmesh.CellType.quadrilateral if quadrilateral else dmesh.CellType.triangle
    mesh = dmesh.create_rectangle(comm, [list(lower), list(upper)], list(n), cell_type)
    fdim = mesh.topology.dim - 1
    markers = {
        BOTTOM: lambda x: np.isclose(x[1], lower[1]),
        TOP: lambda x: np.isclose(x[1], upper[1]),
        LEFT: lambda x: np.isclose(x[0], lower[0]),
        RIGHT: lambda x: np.isclose(x[0], upper[0]),
    }
    entities, values = [], []
    for tag, marker in markers.items():
        facets = dmesh.locate_entities_boundary(mesh, fdim, marker)
        # Corner facets do not exist (facets are edges), so no facet gets two tags.
        entities.append(facets)
        values.append(np.full(facets.size, tag, dtype=np.int32))
    entities_all = np.concatenate(entities)
    order = np.argsort(entities_all)
    tags = dmesh.meshtags(mesh, fdim, entities_all[order], np.concatenate(values)[order])
    if wave_amplitude:
        points = mesh.geometry.x
        length = upper[0] - lower[0]
        height = upper[1] - lower[1]
        relative_height = (points[:, 1] - lower[1]) / height
        wave = wave_amplitude * np.sin(2 * np.pi * (points[:, 0] - lower[0]) / length)
        points[:, 1] += wave * (1.0 - relative_height)
    return mesh, tags


def periodic_channel_spec(length: float) -> BoundarySpec:
    """Walls at bottom and top, right side periodic with the left one."""
    return BoundarySpec(walls=(BOTTOM, TOP), periodic=(PeriodicPair(RIGHT, LEFT, (-length, 0.0)),))


def main() -> None:
    """Solve the wavy channel flow and print its integral quantities as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=12, help="cells per side")
    parser.add_argument("--quadrilateral", action="store_true")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    length, height = 2.0, 1.0
    mesh, tags = tagged_rectangle(
        comm,
        (0.0, 0.0),
        (length, height),
        (args.n, args.n),
        quadrilateral=args.quadrilateral,
        wave_amplitude=0.15,
    )
    solution = solve_flow(mesh, tags, periodic_channel_spec(length), nu=0.01, bulk_velocity=0.5)
    max_speed = comm.allreduce(float(np.abs(solution.u.x.array).max()), op=MPI.MAX)
    if comm.rank == 0:
        print(
            json.dumps(
                {
                    "body_force": solution.body_force,
                    "bulk_velocity": solution.bulk_velocity,
                    "newton_iterations": solution.newton_iterations,
                    "num_dofs": solution.num_dofs,
                    "max_velocity_component": max_speed,
                    "ranks": comm.size,
                }
            )
        )


if __name__ == "__main__":
    main()
