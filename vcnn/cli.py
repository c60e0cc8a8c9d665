"""The ``vcnn`` command line: verbs that follow the user's workflow.

``vcnn generate`` solves cases with the FEniCSx solvers and writes case files; ``vcnn plot``
draws case files. Each verb takes a TOML config (``--config``) and/or flags; flags win, and
the resolved configuration is written into the verb's output folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vcnn.config import ConfigError, load_toml

logger = logging.getLogger("vcnn")

FEM_HINT = (
    "the FEM stack is missing: install it with `pip install 'vcnn-closures[fem]'` "
    "(FEniCSx from the dolfinx-solver-real wheel, gmsh, meshio)"
)


def _mpi_rank() -> int:
    """The MPI rank from the launcher's environment, without importing mpi4py."""
    for variable in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "RANK"):
        if variable in os.environ:
            return int(os.environ[variable])
    return 0


def configure_logging(verbosity: int) -> None:
    """Log to stderr on rank 0 only: INFO by default, DEBUG with -v, WARNING with -q."""
    level = logging.INFO - 10 * verbosity
    if _mpi_rank() != 0:
        level = logging.ERROR
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)


def _section(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The ``[name]`` table of the --config file (or the whole file if it has no such table)."""
    if args.config is None:
        return {}
    document = load_toml(args.config)
    return dict(document.get(name, document))


def _cmd_generate(args: argparse.Namespace) -> int:
    try:
        from solvers.generate import GenerateConfig, run_generate
    except ImportError as error:
        logger.error("%s (%s)", FEM_HINT, error)
        return 2
    flags = {
        "alphas": args.alphas,
        "output": args.out,
        "production": args.production,
        "c_k": args.c_k,
        "overwrite": True if args.overwrite else None,
        "plots": False if args.no_plots else None,
        "xdmf": False if args.no_xdmf else None,
        "mesh": {
            "kind": args.mesh,
            "resolution": args.resolution,
            "size": args.size,
            "file": args.mesh_file,
        },
    }
    config = GenerateConfig.from_dict(_section(args, "generate"), overrides=flags)
    summary = run_generate(config)
    return 0 if summary.all_succeeded else 1


def _cmd_plot(args: argparse.Namespace) -> int:
    from vcnn.casefile import case_paths, read_case
    from vcnn.plotting import plot_case

    paths: list[Path] = []
    for target in args.cases:
        target = Path(target)
        paths += case_paths(target) if target.is_dir() else [target]
    out = Path(args.out) if args.out else None
    for path in paths:
        case = read_case(path)
        figure = (out or path.parent) / f"{path.stem}.png"
        plot_case(case, figure)
        logger.info("wrote %s", figure)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``vcnn`` command."""
    parser = argparse.ArgumentParser(prog="vcnn", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more output")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less output")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    generate = verbs.add_parser("generate", help="solve cases and write case files")
    generate.add_argument("--config", type=Path, help="TOML file ([generate] table)")
    generate.add_argument("--alphas", type=float, nargs="+", help="hill slope factors")
    generate.add_argument(
        "--mesh", choices=["structured", "unstructured", "file"], help="mesh kind"
    )
    generate.add_argument("--resolution", type=float, help="structured: factor on 200a x 200")
    generate.add_argument("--size", type=float, help="unstructured: target cell size")
    generate.add_argument("--mesh-file", type=Path, help="file: a .msh or meshio-readable mesh")
    generate.add_argument("--production", choices=["frozen", "coupled"], help="tau production")
    generate.add_argument("--c-k", type=float, help="eddy-viscosity coefficient (0: one-way)")
    generate.add_argument("--out", type=Path, help="output folder of the case files")
    generate.add_argument("--overwrite", action="store_true", help="recompute complete cases")
    generate.add_argument("--no-plots", action="store_true", help="skip the PNG per case")
    generate.add_argument("--no-xdmf", action="store_true", help="skip the XDMF per case")
    generate.set_defaults(handler=_cmd_generate)

    plot = verbs.add_parser("plot", help="draw case files (speed, streamlines, tau)")
    plot.add_argument("cases", nargs="+", help="case files or folders of case files")
    plot.add_argument("--out", type=Path, help="folder of the figures (default: beside each)")
    plot.set_defaults(handler=_cmd_plot, config=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``vcnn`` command line; returns the process exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose - args.quiet)
    try:
        return args.handler(args)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        logger.error("error: %s", error)
        return 2
    except KeyboardInterrupt:
        logger.error("interrupted: complete outputs are kept, rerun to continue")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
