"""Run ``vcnn simulate`` (two-way, with the PDE truth) with the local-equilibrium test double.

Run serially or under ``mpiexec -n 2``: ``python simulate_double.py OUT``. The double stands
in for a trained network (the contract of ``vcnn.load_closure``) on rank 0.
"""

from mpi4py import MPI

import sys

from solvers.simulate import SimulateConfig, run_simulate
from tests.closure_double import LocalEquilibriumClosure


def run(out: str):
    """Run the simulation into ``out``; returns its summary."""
    config = SimulateConfig.from_dict(
        {
            "alphas": [1.0],
            "output": str(out),
            "model": "local-equilibrium test double",
            "coupling": "two-way",
            "compare": True,
            "tol": 1e-8,
            "plots": False,
            "xdmf": False,
            "mesh": {"resolution": 0.1},
        }
    )
    model = LocalEquilibriumClosure({"c_k": 0.15}) if MPI.COMM_WORLD.rank == 0 else None
    return run_simulate(config, model=model)


def main() -> None:
    raise SystemExit(0 if run(sys.argv[1]).all_succeeded else 1)


if __name__ == "__main__":
    main()
