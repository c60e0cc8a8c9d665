"""Run ``vcnn generate`` with a command line that depends on the MPI rank (mpiexec -n 2).

Usage: python per_rank_argv.py {resolution|config|flag} OUT. Rank 0 gets a good command line;
rank 1 gets ``resolution``: another --resolution, ``config``: a --config file that does not
exist, ``flag``: an unknown flag. Every rank must end with exit code 2 (the message printed
once, by rank 0), nothing written, and no rank left waiting in a collective.
"""

from mpi4py import MPI

import sys

from vcnn.cli import main

if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    argv = ["generate", "--alphas", "1", "--resolution", "0.05", "--out", out, "--no-plots",
            "--no-xdmf"]
    if MPI.COMM_WORLD.rank == 1:
        if mode == "resolution":
            argv[4] = "0.1"
        elif mode == "config":
            argv += ["--config", f"{out}-missing.toml"]
        else:
            argv += ["--no-such-flag"]
    code = main(argv)
    print(f"rank {MPI.COMM_WORLD.rank} exit {code}", flush=True)
    raise SystemExit(code)
