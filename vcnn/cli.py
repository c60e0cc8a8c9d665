"""The ``vcnn`` command line: verbs that follow the user's workflow.

``vcnn generate`` solves cases with the FEniCSx solvers and writes case files; ``vcnn train``
fits a vector-cloud network to case files; ``vcnn evaluate`` measures a trained model on
case files (a priori); ``vcnn simulate`` runs a trained closure inside the flow solver
(one-way or two-way, a posteriori, against the PDE truth); ``vcnn plot`` draws case files. Each verb takes a TOML config (``--config``) and/or flags; flags win, and
the resolved configuration is written into the verb's output folder.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from vcnn.config import load_toml, merge
from vcnn.errors import (
    UsageError,
    handle_interrupts,
    interrupts_deferred,
    reset_interrupts,
    run_verb,
)

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


def _mpi_size() -> int:
    """The number of MPI ranks from the launcher's environment (1 outside ``mpiexec``)."""
    for variable in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if variable in os.environ:
            return int(os.environ[variable])
    return 1


def configure_logging(verbosity: int) -> None:
    """Log to stderr on rank 0 only: INFO by default, DEBUG with -v, WARNING with -q."""
    level = logging.INFO - 10 * verbosity
    if _mpi_rank() != 0:
        level = logging.ERROR
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (a flag like --batch-size 0 is refused)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def _number(text: str) -> float:
    """An argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors take the command line's one error path (one line)."""

    def error(self, message: str) -> NoReturn:
        """Raise a UsageError instead of printing the usage and exiting."""
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _section(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The ``[name]`` table of the --config file (or the whole file if it has no such table)."""
    if args.config is None:
        return {}
    document = load_toml(args.config)
    table = document.get(name, document)
    if not isinstance(table, dict):
        raise UsageError(f"--config {str(args.config)!r}: [{name}] must be a table")
    return dict(table)


def _mesh_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The ``mesh`` overrides of generate's and simulate's mesh flags."""
    kind = args.mesh
    if args.mesh_file is not None:
        if kind not in (None, "file"):
            raise UsageError(
                f"--mesh-file is for --mesh file, but --mesh is {kind!r}: drop one of them"
            )
        kind = "file"  # a mesh file given on the command line is the mesh to solve on
    return {
        "kind": kind,
        "resolution": args.resolution,
        "size": args.size,
        "file": None if args.mesh_file is None else str(args.mesh_file),
    }


def _add_mesh_options(parser: argparse.ArgumentParser) -> None:
    """The hill and mesh flags that generate and simulate share."""
    parser.add_argument("--alphas", type=_number, nargs="+", help="hill slope factors")
    parser.add_argument("--mesh", choices=["structured", "unstructured", "file"], help="mesh kind")
    parser.add_argument("--resolution", type=_number, help="structured: factor on 200a x 200")
    parser.add_argument("--size", type=_number, help="unstructured: target cell size")
    parser.add_argument(
        "--mesh-file", type=Path, help="a .msh or meshio-readable mesh (implies --mesh file)"
    )


def _fem_world() -> Any:
    """Import the FEM stack (MPI before dolfinx and PETSc) and return ``MPI.COMM_WORLD``.

    The threads these imports start must not receive SIGINT/SIGTERM, and PETSc's own handler
    (which aborts the process) is replaced afterwards: 130/143, complete outputs kept
    (:mod:`vcnn.errors`).

    Raises:
        UsageError: the FEM stack is not installed (naming what to install).
    """
    try:
        with interrupts_deferred():
            from mpi4py import MPI

            import dolfinx  # noqa: F401
            from petsc4py import PETSc  # noqa: F401

            handle_interrupts()
    except ImportError as error:
        raise UsageError(f"{FEM_HINT} ({error})") from error
    return MPI.COMM_WORLD


def _cmd_generate(args: argparse.Namespace) -> int:
    world = _fem_world()
    from solvers.collective import config_agreement
    from solvers.generate import GenerateConfig, run_generate

    # Every rank resolves its own config; the ranks agree on it before any collective work.
    with config_agreement(world, verb="generate") as agreement:
        flags = {
            "alphas": args.alphas,
            "output": None if args.out is None else str(args.out),
            "production": args.production,
            "c_k": args.c_k,
            "overwrite": True if args.overwrite else None,
            "plots": False if args.no_plots else None,
            "xdmf": False if args.no_xdmf else None,
            "flow_from": args.flow_from,
            "flow_time": args.flow_time,
            "flow_field": args.flow_field,
            "mesh": _mesh_flags(args),
        }
        config = GenerateConfig.from_dict(_section(args, "generate"), overrides=flags)
        agreement.agree(config.to_dict())
    summary = run_generate(config)
    return 0 if summary.all_succeeded else 1


def _cmd_simulate(args: argparse.Namespace) -> int:
    world = _fem_world()
    from solvers.collective import config_agreement
    from solvers.simulate import SimulateConfig, run_simulate

    # Every rank resolves its own config; the ranks agree on it before any collective work.
    with config_agreement(world, verb="simulate") as agreement:
        flags = {
            "alphas": args.alphas,
            "output": None if args.out is None else str(args.out),
            "model": None if args.model is None else str(args.model),
            "closure": args.closure,
            "coupling": args.coupling,
            "compare": True if args.compare else None,
            "production": args.production,
            "c_k": args.c_k,
            "outer": args.outer,
            "relaxation": args.relaxation,
            "tol": args.tol,
            "max_iterations": args.max_iterations,
            "allow_physics_mismatch": True if args.allow_physics_mismatch else None,
            "overwrite": True if args.overwrite else None,
            "device": args.device,
            "flow_from": args.flow_from,
            "flow_time": args.flow_time,
            "flow_field": args.flow_field,
            "plots": False if args.no_plots else None,
            "xdmf": False if args.no_xdmf else None,
            "mesh": _mesh_flags(args),
        }
        config = SimulateConfig.from_dict(_section(args, "simulate"), overrides=flags)
        agreement.agree(config.to_dict())
    summary = run_simulate(config)
    return 0 if summary.all_succeeded else 1


def _cmd_train(args: argparse.Namespace) -> int:
    from vcnn.outputs import check_output_dir
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
        "overwrite": True if args.overwrite else None,
        "amp": True if args.amp else None,
        "num_threads": args.threads,
    }
    config = TrainConfig.from_dict(merge(_section(args, "train"), flags))
    check_output_dir(config.out_dir, flag="--out (out_dir)")
    result = train(config)
    if not result.best_checkpoint.is_file():
        raise UsageError(
            f"training ended without a best checkpoint in {str(result.out_dir)!r}: no epoch "
            "gave a finite validation error"
        )
    logger.info(
        "best validation relative L2 error %.3f %% at epoch %d; checkpoints in %s",
        result.best_validation_rel_l2_percent,
        result.best_epoch,
        result.out_dir,
    )
    return 0


def _case_files(targets: Sequence[str | os.PathLike], *, flag: str) -> list[Path]:
    """The case files given as files or folders; each folder must hold at least one.

    Raises:
        CaseFileError / DatasetError: naming the folder or file.
    """
    from vcnn.casefile import case_paths, check_archive
    from vcnn.datasets import DatasetError

    paths: list[Path] = []
    for target in map(Path, targets):
        if target.is_dir():
            found = case_paths(target)
            if not found:
                raise DatasetError(f"{flag}: no case files (*.npz) in {str(target)!r}")
            paths += found
        else:
            paths.append(check_archive(target))
    return paths


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from vcnn.casefile import CaseFileError, inspect_case, read_case
    from vcnn.checkpoint import load_checkpoint
    from vcnn.evaluation import evaluate
    from vcnn.outputs import check_output_dir, check_output_owner, output_lock

    # Everything is checked before the output folder is made: nothing partial is written.
    checkpoint = load_checkpoint(args.model)
    model_dim = checkpoint["model_config"].get("dim")
    cases = _case_files(args.data, flag="--data")
    for path in cases:
        header = inspect_case(path)  # cheap: the archive, its keys and the point array
        if model_dim is not None and header.dim != model_dim:
            raise CaseFileError(
                f"case file {str(path)!r} is {header.dim}-D but the model {str(args.model)!r} "
                f"was trained on {model_dim}-D cases"
            )
    for path in cases:
        read_case(path)  # the full contract (shapes, NaN), one case at a time
    check_output_dir(args.out, flag="--out")

    def check_owner() -> None:
        check_output_owner(args.out, verb="evaluate", overwrite=args.overwrite, flag="--out")

    check_owner()
    with output_lock(args.out, verb="evaluate", flag="--out", then=check_owner):
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
    from vcnn.checkpoint import export_model, is_exported_file
    from vcnn.outputs import check_output_file

    check_output_file(args.out, flag="--out", not_same_as=args.model)
    if args.out.exists() and not args.overwrite and not is_exported_file(args.out):
        # a training checkpoint (train's output) or a file that is no model: not ours to replace
        raise UsageError(
            f"--out {str(args.out)!r} exists and is not an exported model (a training "
            "checkpoint, or another file): give another --out, or --overwrite to replace it"
        )
    out = export_model(args.model, args.out)
    logger.info("wrote %s (%.0f KB)", out, out.stat().st_size / 1024)
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from vcnn.casefile import inspect_case, read_case
    from vcnn.outputs import check_output_dir
    from vcnn.plotting import plot_case

    paths = _case_files(args.cases, flag="vcnn plot")
    for path in paths:
        header = inspect_case(path)
        if header.dim != 2:
            raise UsageError(f"vcnn plot draws 2-D cases; {str(path)!r} is {header.dim}-D")
    for path in paths:
        read_case(path)  # every case is valid before the first figure is written
    out = Path(args.out) if args.out else None
    for folder in {out} if out is not None else {path.parent for path in paths}:
        check_output_dir(folder, flag="--out" if out is not None else "the case folder")
    for path in paths:
        case = read_case(path)
        figure = (out or path.parent) / f"{path.stem}.png"
        plot_case(case, figure)
        logger.info("wrote %s", figure)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``vcnn`` command."""
    parser = _Parser(
        prog="vcnn",
        description=(
            "Learned nonlocal closures: generate cases, train and evaluate networks, "
            "simulate with them in the loop."
        ),
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more output")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less output")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    generate = verbs.add_parser("generate", help="solve cases and write case files")
    generate.add_argument("--config", type=Path, help="TOML file ([generate] table)")
    _add_mesh_options(generate)
    generate.add_argument("--production", choices=["frozen", "coupled"], help="tau production")
    generate.add_argument("--c-k", type=_number, help="eddy-viscosity coefficient (0: one-way)")
    generate.add_argument(
        "--flow-from",
        help="take the velocity from this source instead of solving for it: a case file "
        "(.npz), a meshio-readable file with point or cell data, or an OpenFOAM case directory",
    )
    generate.add_argument(
        "--flow-time", help="OpenFOAM source: 'latest' (default) or a time directory, e.g. 341"
    )
    generate.add_argument(
        "--flow-field", help="velocity field name in the source (default: U, then velocity)"
    )
    generate.add_argument("--out", type=Path, help="output folder of the case files")
    generate.add_argument(
        "--overwrite",
        action="store_true",
        help="recompute complete cases; write into a folder of another verb's outputs",
    )
    generate.add_argument("--no-plots", action="store_true", help="skip the PNG per case")
    generate.add_argument("--no-xdmf", action="store_true", help="skip the XDMF per case")
    generate.set_defaults(handler=_cmd_generate)

    simulate = verbs.add_parser(
        "simulate", help="a closure in the loop of the flow solver, against the PDE truth"
    )
    simulate.add_argument("--config", type=Path, help="TOML file ([simulate] table)")
    _add_mesh_options(simulate)
    simulate.add_argument("--model", type=Path, help="trained closure (best.pt or exported)")
    simulate.add_argument(
        "--closure", choices=["network", "pde"], help="network (default) or the tau PDE"
    )
    simulate.add_argument(
        "--coupling", choices=["one-way", "two-way"], help="flow fixed, or nu_t from tau"
    )
    simulate.add_argument("--compare", action="store_true", help="also solve the PDE truth")
    simulate.add_argument(
        "--flow-from",
        help="one-way: take the fixed flow from this source (case file, meshio file, OpenFOAM "
        "case) instead of solving it",
    )
    simulate.add_argument("--flow-time", help="OpenFOAM source: 'latest' or a time directory")
    simulate.add_argument("--flow-field", help="velocity field name in the source")
    simulate.add_argument("--production", choices=["frozen", "coupled"], help="tau production")
    simulate.add_argument("--c-k", type=_number, help="eddy-viscosity coefficient C_k")
    simulate.add_argument(
        "--outer", choices=["anderson", "ngmres", "picard"], help="two-way outer iteration"
    )
    simulate.add_argument("--relaxation", type=_number, help="omega of relaxed Picard (0.7)")
    simulate.add_argument("--tol", type=_number, help="relative change to converge (1e-6)")
    simulate.add_argument(
        "--max-iterations", type=_count(1), help="flow solves at most per run (40)"
    )
    simulate.add_argument(
        "--allow-physics-mismatch",
        action="store_true",
        help="run although the physics differs from the closure's record",
    )
    simulate.add_argument("--device", choices=["auto", "cpu", "cuda"], help="inference device")
    simulate.add_argument("--out", type=Path, help="output folder")
    simulate.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a folder that holds another verb's outputs (generated cases, a run)",
    )
    simulate.add_argument("--no-plots", action="store_true", help="skip the PNG per case")
    simulate.add_argument("--no-xdmf", action="store_true", help="skip the XDMF per case")
    simulate.set_defaults(handler=_cmd_simulate)

    train = verbs.add_parser("train", help="train a vector-cloud network on case files")
    train.add_argument("--config", type=Path, help="TOML file ([train] table)")
    train.add_argument("--data", help="folder of case files")
    train.add_argument("--out", help="run folder (checkpoints, lcurve.tsv, figures)")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: auto")
    train.add_argument("--epochs", type=_count(1))
    train.add_argument("--batch-size", type=_count(1))
    train.add_argument("--cloud-size", type=_count(1), help="points sampled per cloud (150)")
    train.add_argument("--queries-per-case", type=_count(1), help="clouds per case per epoch")
    train.add_argument("--seed", type=_count(0))
    train.add_argument("--threads", type=_count(1), help="torch CPU threads")
    resume = train.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue the run from last.pt")
    resume.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run the --out folder holds (or write beside another verb's outputs)",
    )
    train.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    train.set_defaults(handler=_cmd_train)

    evaluate = verbs.add_parser("evaluate", help="a-priori errors of a model on case files")
    evaluate.add_argument("--model", type=Path, required=True, help="checkpoint (best.pt)")
    evaluate.add_argument(
        "--data", type=Path, nargs="+", required=True, help="case files or folders of them"
    )
    evaluate.add_argument("--out", type=Path, required=True, help="folder of metrics and figures")
    evaluate.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a folder that holds another verb's outputs (a training run, cases)",
    )
    evaluate.add_argument(
        "--cloud-size", type=_count(1), help="fixed n per cloud (default: full)"
    )
    evaluate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    evaluate.set_defaults(handler=_cmd_evaluate, config=None)

    export = verbs.add_parser("export", help="inference-only copy of a checkpoint (small)")
    export.add_argument("--model", type=Path, required=True, help="checkpoint (best.pt)")
    export.add_argument("--out", type=Path, required=True, help="file to write")
    export.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out that is not an exported model (e.g. a training checkpoint)",
    )
    export.set_defaults(handler=_cmd_export, config=None)

    plot = verbs.add_parser("plot", help="draw case files (speed, streamlines, tau)")
    plot.add_argument("cases", nargs="+", help="case files or folders of case files")
    plot.add_argument("--out", type=Path, help="folder of the figures (default: beside each)")
    plot.set_defaults(handler=_cmd_plot, config=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``vcnn`` command line; returns the process exit code.

    Every verb goes through :func:`vcnn.errors.run_verb`: a user error is one line on stderr
    (with its traceback under ``-v``) and exit code 2, an interrupt exits with 130 (Ctrl-C) or
    143 (SIGTERM) keeping complete outputs, and anything else is reported as a bug with its
    traceback and exit code 1. Under MPI only rank 0 reports, a user error of any one rank
    ends every rank with exit code 2, and an interrupt ends every rank at once.
    """
    report = _mpi_rank() == 0
    configure_logging(0)
    reset_interrupts()
    handle_interrupts()
    try:
        args = build_parser().parse_args(argv)
    except UsageError as error:
        return run_verb(_shared_usage_error, error, verbose=False, report=report)
    configure_logging(args.verbose - args.quiet)
    return run_verb(args.handler, args, verbose=args.verbose > 0, report=report)


def _shared_usage_error(error: UsageError) -> NoReturn:
    """Raise a command-line error; under ``mpiexec -n N`` on every rank (collective).

    The ranks parse their own command lines: one whose line is bad must not leave the others
    waiting in generate's or simulate's agreement on the configuration
    (:func:`solvers.collective.config_agreement`), so it joins that agreement with its error,
    after the same imports (PETSc's initialization is collective).
    """
    if _mpi_size() > 1:
        try:
            world = _fem_world()
        except UsageError:
            raise error from None  # no FEM stack: no collective verb runs on the other ranks
        from solvers.collective import config_agreement

        with config_agreement(world, verb="?"):
            raise error
    raise error


if __name__ == "__main__":
    raise SystemExit(main())
