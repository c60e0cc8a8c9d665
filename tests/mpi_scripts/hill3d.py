"""Flow and frozen tau on a coarse crest-varying 3-D hill; prints a JSON summary on rank 0.

Run serially or under ``mpiexec -n 2``; tests/test_flow3d.py compares the two.
"""

from mpi4py import MPI

import json

from experiments.verification3d.cases import hill3d_summary


def main() -> None:
    """Solve and print the integral quantities as JSON (rank 0)."""
    summary = hill3d_summary(crest_amplitude=0.2, resolution=0.05, span_cells=2)
    if MPI.COMM_WORLD.rank == 0:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
