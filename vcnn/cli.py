"""The ``vcnn`` command line: verbs that follow the user's workflow.

``vcnn generate`` solves cases with the FEniCSx solvers and writes case files; ``vcnn train``
fits a vector-cloud network to case files; ``vcnn evaluate`` measures a trained model on
case files (a priori); ``vcnn plot`` draws case files. Each verb takes a TOML config (``--config``) and/or flags; flags win, and
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

from vcnn.config import ConfigError, load_toml, merge

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


def _cmd_train(args: argparse.Namespace) -> int:
    from vcnn.training import TrainConfig, train

    flags = {
        "data_dir": args.data,
        "out_dir": args.out,
        "device": args.device,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "cloud_size": args.cloud_size,
        "queries_per_case": args.queries_per_case,
        "seed": args.seed,
        "resume": True if args.resume else None,
        "amp": True if args.amp else None,
        "num_threads": args.threads,
    }
    config = TrainConfig.from_dict(merge(_section(args, "train"), flags))
    result = train(config)
    logger.info(
        "best validation relative L2 error %.3f %% at epoch %d; checkpoints in %s",
        result.best_validation_rel_l2_percent,
        result.best_epoch,
        result.out_dir,
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from vcnn.casefile import case_paths
    from vcnn.evaluation import evaluate

    cases = [p for d in args.data for p in (case_paths(d) if d.is_dir() else [d])]
    metrics = evaluate(
        args.model, cases, args.out, cloud_size=args.cloud_size, device=args.device
    )
    lines = [
        "| case | alpha | rel L2 % | max abs error | integral rel error | inputs out of range % "
        "| seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in metrics:
        alpha = "" if m.alpha is None else f"{m.alpha:g}"
        lines.append(
            f"| {m.case} | {alpha} | {m.rel_l2_percent:.3f} | {m.max_abs_error:.4g} | "
            f"{m.integral_rel_error:.3e} | {100 * m.out_of_range_fraction:.3g} | "
            f"{m.seconds:.2f} |"
        )
    logger.info("%s\n\nmetrics and figures in %s", "\n".join(lines), Path(args.out).resolve())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from vcnn.checkpoint import export_model

    out = export_model(args.model, args.out)
    logger.info("wrote %s (%.0f KB)", out, out.stat().st_size / 1024)
    return 0


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
    parser = argparse.ArgumentParser(
        prog="vcnn",
        description="Learned nonlocal closures: generate cases, train and evaluate networks.",
    )
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

    train = verbs.add_parser("train", help="train a vector-cloud network on case files")
    train.add_argument("--config", type=Path, help="TOML file ([train] table)")
    train.add_argument("--data", help="folder of case files")
    train.add_argument("--out", help="run folder (checkpoints, lcurve.tsv, figures)")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: auto")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--cloud-size", type=int, help="points sampled per cloud (150)")
    train.add_argument("--queries-per-case", type=int, help="clouds per case per epoch")
    train.add_argument("--seed", type=int)
    train.add_argument("--threads", type=int, help="torch CPU threads")
    train.add_argument("--resume", action="store_true", help="continue from last.pt")
    train.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    train.set_defaults(handler=_cmd_train)

    evaluate = verbs.add_parser("evaluate", help="a-priori errors of a model on case files")
    evaluate.add_argument("--model", type=Path, required=True, help="checkpoint (best.pt)")
    evaluate.add_argument(
        "--data", type=Path, nargs="+", required=True, help="case files or folders of them"
    )
    evaluate.add_argument("--out", type=Path, required=True, help="folder of metrics and figures")
    evaluate.add_argument("--cloud-size", type=int, help="fixed n per cloud (default: full)")
    evaluate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    evaluate.set_defaults(handler=_cmd_evaluate, config=None)

    export = verbs.add_parser("export", help="inference-only copy of a checkpoint (small)")
    export.add_argument("--model", type=Path, required=True, help="checkpoint (best.pt)")
    export.add_argument("--out", type=Path, required=True, help="file to write")
    export.set_defaults(handler=_cmd_export, config=None)

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
