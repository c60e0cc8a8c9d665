"""Run ``vcnn generate`` with a fault injected on rank 0 only (run under mpiexec -n 2).

Usage: python fail_on_root.py {config|case} OUT. ``config``: writing config.toml fails on
rank 0 (disk full), before any collective solve; ``case``: writing the case file fails on
rank 0 after a collective solve. Either way every rank must stop or go on together: the run
ends (no deadlock) with the error reported.
"""

from mpi4py import MPI

import errno
import sys

from solvers import generate, run_folder
from vcnn.cli import main


def fail_on_root(real):
    def wrapper(path, *args, **kwargs):
        if MPI.COMM_WORLD.rank == 0:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *args, **kwargs)

    return wrapper


if __name__ == "__main__":
    where, out = sys.argv[1], sys.argv[2]
    if where == "config":
        run_folder.write_resolved_config = fail_on_root(run_folder.write_resolved_config)
    else:
        generate.write_case = fail_on_root(generate.write_case)
    code = main(["generate", "--alphas", "1", "--resolution", "0.05", "--out", out,
                 "--no-plots", "--no-xdmf"])
    print(f"rank {MPI.COMM_WORLD.rank} exit {code}", flush=True)
    raise SystemExit(code)
