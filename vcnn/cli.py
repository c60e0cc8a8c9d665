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

from vcnn.config import load_toml
from vcnn.errors import (
    UsageError,
    handle_interrupts,
    interrupts_deferred,
    reset_interrupts,
    run_verb,
)
from vcnn.physics import SUPG_LENGTHS

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


def _count_or_all(text: str) -> int | str:
    """An argparse type: an integer >= 1, or ``all`` (every point of a case)."""
    if text == "all":
        return text
    try:
        return _count(1)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be an integer >= 1 or 'all' (every point), got {text!r}"
        ) from None


def _number(text: str) -> float:
    """An argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help text that keeps the line breaks of the description and of the examples."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors take the command line's one error path (one line).

    Its help shows every option's default (:func:`_show_defaults`), read when the help is
    printed, so that ``vcnn --help`` imports no solver and no torch.

    Args:
        config_class: returns the verb's config dataclass (imported only for the help), whose
            field defaults are the defaults of the flags; None: the flags' argparse defaults.
        config_keys: the config key of each flag whose destination is not its key, e.g.
            ``{"threads": "num_threads", "resolution": "mesh.resolution"}``.
    """

    def __init__(
        self,
        *args: Any,
        config_class: Callable[[], type] | None = None,
        config_keys: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self.config_class = config_class
        self.config_keys = dict(config_keys or {})
        self._defaults_shown = False

    def format_help(self) -> str:
        """The help, with the default of every option that takes a value."""
        if not self._defaults_shown:
            self._defaults_shown = True
            _show_defaults(self)
        return super().format_help()

    def error(self, message: str) -> NoReturn:
        """Raise a UsageError instead of printing the usage and exiting."""
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


class _VersionAction(argparse.Action):
    """``--version``: print ``vcnn <version>`` (from the package metadata) and exit."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS) -> None:
        super().__init__(
            option_strings, dest, default=argparse.SUPPRESS, nargs=0, help="print the version"
        )

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> NoReturn:
        """Print the version and exit with code 0."""
        import vcnn

        print(f"vcnn {vcnn.__version__}")
        parser.exit()


def _unset_means(action: argparse.Action, meaning: str) -> argparse.Action:
    """Say in the help what the flag's default of None means (e.g. "every point")."""
    action.none_means = meaning  # type: ignore[attr-defined]
    return action


def config_defaults(config_class: type, *, prefix: str = "") -> dict[str, Any]:
    """The default of every key of a config dataclass; nested tables as ``table.key``.

    A field without a default maps to :data:`dataclasses.MISSING`.
    """
    import dataclasses

    defaults: dict[str, Any] = {}
    for field in dataclasses.fields(config_class):
        if field.default is not dataclasses.MISSING:
            value = field.default
        elif field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        else:
            value = dataclasses.MISSING
        if dataclasses.is_dataclass(value):
            defaults.update(config_defaults(type(value), prefix=f"{prefix}{field.name}."))
        else:
            defaults[f"{prefix}{field.name}"] = value
    return defaults


def _format_default(value: Any) -> str:
    """A default as a user types it on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return " ".join(_format_default(item) for item in value)
    return str(value)


def _show_defaults(parser: _Parser) -> None:
    """Append ``(default: ...)`` to the help of every option of ``parser`` that takes a value.

    The default is the verb's config class's (``parser.config_class``) for a flag that maps to
    a config key, else the flag's own: help and config cannot drift. Switches (store_true,
    counts) are off unless given; a help that already says its default is left as it is.
    """
    import dataclasses

    defaults: dict[str, Any] = {}
    if parser.config_class is not None:
        try:
            defaults = config_defaults(parser.config_class())
        except ImportError as error:  # no FEM stack: the help is still useful without them
            parser.epilog = f"{parser.epilog or ''}\n(defaults not shown: {FEM_HINT}; {error})"
            return
    table = parser.prog.split()[-1]
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0 or action.help == argparse.SUPPRESS:
            continue
        help_text = action.help or ""
        if "default" in help_text or "required" in help_text:
            continue
        key = parser.config_keys.get(action.dest, action.dest)
        value = defaults.get(key, action.default)
        if value is dataclasses.MISSING:
            text = f"required: the flag or {key} in [{table}] of --config"
        elif value is None:
            text = f"default: {getattr(action, 'none_means', 'none')}"
        else:
            text = f"default: {_format_default(value)}"
        action.help = f"{help_text} ({text})" if help_text else f"({text})"


def _section(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The ``[name]`` table of the --config file (or the whole file if it has no such table)."""
    if args.config is None:
        return {}
    document = load_toml(args.config)
    table = document.get(name, document)
    if not isinstance(table, dict):
        raise UsageError(f"--config {str(args.config)!r}: [{name}] must be a table")
    return dict(table)


def _flags_from_config(args: argparse.Namespace, verb: str) -> None:
    """Fill the flags not given with the ``[verb]`` table of --config (evaluate, export, plot).

    The table's keys are the long names of the verb's flags with ``_`` (``cloud_size``); flags
    win. Then every flag in ``args.needs`` must have a value.

    Raises:
        ConfigError: an unknown key (naming the allowed ones), or a value of the wrong type.
        UsageError: a needed flag that neither the command line nor the table gives.
    """
    from vcnn.config import PLOT_RENAMED_KEYS, check_keys, renamed_keys

    actions = {
        action.dest: action
        for action in args.flags._actions
        if action.dest not in ("help", "config", "verb_verbose", "verb_quiet")
    }
    table = _section(args, verb)
    if verb == "plot":  # its case files were once `cases`, now `data` as in [evaluate]
        table = renamed_keys(table, PLOT_RENAMED_KEYS, "[plot]")
    where = f"[{verb}] of --config {str(args.config)!r}"
    check_keys(table, set(actions), where)
    for key, value in table.items():
        action = actions[key]
        if getattr(args, key) in (action.default, []):  # not given on the command line
            setattr(args, key, _config_value(action, value, where=f"{where}: {key}"))
    for key in args.needs:
        if getattr(args, key) in (None, []):
            action = actions[key]
            flag = action.metavar if not action.option_strings else f"--{key.replace('_', '-')}"
            raise UsageError(
                f"vcnn {verb}: give {flag} (or {key} in the [{verb}] table of --config)"
            )


def _config_value(action: argparse.Action, value: Any, *, where: str) -> Any:
    """A config table's value of a flag, checked and converted like the flag's text.

    Raises:
        ConfigError: naming ``where``, what the flag takes and the value.
    """
    from vcnn.config import ConfigError

    if action.nargs == 0:  # a switch
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    many = action.nargs in ("+", "*")
    items = [value] if not many or isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where} must be a list of values, got {value!r}")
    textual = action.type in (None, str, Path)
    converted = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, str if textual else int | float):
            kind = "a string" if textual else "a number"
            raise ConfigError(f"{where} must be {kind}, got {item!r}")
        try:
            item = action.type(str(item)) if action.type is not None else item
        except argparse.ArgumentTypeError as error:
            raise ConfigError(f"{where} {error}") from None
        if action.choices is not None and item not in action.choices:
            raise ConfigError(f"{where} must be one of {list(action.choices)}, got {item!r}")
        converted.append(item)
    return converted if many else converted[0]


def _output(text: str) -> None:
    """Print the command's result (its table) to stdout, whatever the verbosity (rank 0)."""
    if _mpi_rank() == 0:
        print(text, flush=True)


def _mesh_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The ``mesh`` overrides of generate's and simulate's mesh flags."""
    kind = args.mesh
    files = [str(path) for path in args.mesh_file or []]
    if files:
        if kind not in (None, "file"):
            raise UsageError(
                f"--mesh-file is for --mesh file, but --mesh is {kind!r}: drop one of them"
            )
        kind = "file"  # a mesh file given on the command line is the mesh to solve on
    return {
        "kind": kind,
        "resolution": args.resolution,
        "size": args.size,
        # one file is mesh.file, several a family (mesh.files)
        "file": files[0] if len(files) == 1 else None,
        "files": files if len(files) > 1 else None,
        "parameters": _mesh_parameters(args.mesh_parameter or []) or None,
        # the 3-D hills' layers (generate's and simulate's flag)
        "span_cells": args.span_cells,
    }


def _mesh_parameters(items: Sequence[str]) -> dict[str, list[float]]:
    """``--mesh-parameter NAME=V1,V2`` flags as ``{NAME: [V1, V2]}``.

    Raises:
        UsageError: an item without ``=``, a name given twice, or a value that is no number.
    """
    parameters: dict[str, list[float]] = {}
    for item in items:
        name, equals, values = item.partition("=")
        name = name.strip()
        if not equals or not name:
            raise UsageError(f"--mesh-parameter {item!r}: give NAME=VALUE[,VALUE...]")
        if name in parameters:
            raise UsageError(f"--mesh-parameter {name!r} is given twice: list its values once")
        try:
            parameters[name] = [_number(value) for value in values.split(",")]
        except argparse.ArgumentTypeError as error:
            raise UsageError(f"--mesh-parameter {item!r}: {error}") from None
    return parameters


def _add_mesh_options(parser: argparse.ArgumentParser) -> None:
    """The hill and mesh flags that generate and simulate share."""
    parser.add_argument("--alphas", type=_number, nargs="+", help="hill slope factors")
    parser.add_argument("--mesh", choices=["structured", "unstructured", "file"], help="mesh kind")
    parser.add_argument("--resolution", type=_number, help="structured: factor on 200a x 200")
    parser.add_argument("--size", type=_number, help="unstructured: target cell size")
    _unset_means(
        parser.add_argument(
            "--mesh-file",
            type=Path,
            nargs="+",
            help="a .msh or meshio-readable mesh, or a gmsh script (.geo); several (or a quoted "
            "glob) are a family, one case each (implies --mesh file)",
        ),
        "none",
    )
    _unset_means(
        parser.add_argument(
            "--mesh-parameter",
            action="append",
            metavar="NAME=V1,V2",
            help="a parameter of a gmsh script and its values, one case per combination "
            "(repeatable)",
        ),
        "the script's",
    )


def _add_dimension_options(parser: argparse.ArgumentParser) -> None:
    """The 3-D hill flags that generate and simulate share."""
    parser.add_argument(
        "--dim", type=int, choices=[2, 3], help="3: the 3-D hills (periodic across the span)"
    )
    _unset_means(
        parser.add_argument(
            "--crest-amplitudes",
            type=_number,
            nargs="+",
            help="--dim 3: crest amplitudes a in [0, 0.3] of h(z) = 1 + a cos(2 pi z / L_z), "
            "one case per slope factor and amplitude",
        ),
        "0 in 3-D, the extruded hill",
    )
    _unset_means(
        parser.add_argument(
            "--span-cells", type=_count(1), help="--dim 3, structured: cell layers across the span"
        ),
        "max(2, round(28 r))",
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


def _agreed_config(
    world: Any,
    args: argparse.Namespace,
    verb: str,
    config_class: Any,
    flags: Callable[[], dict],
    *,
    table: Callable[[], dict] | None = None,
) -> Any:
    """The verb's config from its ``[verb]`` table and ``flags()``, agreed by every MPI rank.

    Every rank resolves its own config; the ranks agree on it (or share the user error one of
    them raised) before any collective work (:func:`solvers.collective.config_agreement`).
    ``table()`` reads the verb's table instead of :func:`_section`.
    """
    from solvers.collective import config_agreement

    with config_agreement(world, verb=verb) as agreement:
        values = _section(args, verb) if table is None else table()
        config = config_class.from_dict(values, overrides=flags())
        agreement.agree(config.to_dict())
    return config


def _solver_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The overrides of the flags that generate and simulate share (None = not given)."""
    return {
        "alphas": args.alphas,
        "out": None if args.out is None else str(args.out),
        "production": args.production,
        "c_k": args.c_k,
        "overwrite": True if args.overwrite else None,
        "plots": False if args.no_plots else None,
        "xdmf": False if args.no_xdmf else None,
        "flow_from": args.flow_from,
        "flow_time": args.flow_time,
        "flow_field": args.flow_field,
        "dim": args.dim,
        "crest_amplitudes": args.crest_amplitudes,
        "mesh": _mesh_flags(args),
    }


def _cmd_generate(args: argparse.Namespace) -> int:
    world = _fem_world()
    from solvers.generate import GenerateConfig, run_generate

    config = _agreed_config(
        world,
        args,
        "generate",
        GenerateConfig,
        lambda: {**_solver_flags(args), "physics": {"supg_length": args.supg_length}},
    )
    summary = run_generate(config)
    counts = {
        status: sum(1 for case in summary.cases if case.status == status)
        for status in ("written", "skipped", "failed")
    }
    _output(
        f"{summary.table()}\n\n{counts['written']} case(s) written, {counts['skipped']} "
        f"skipped (complete), {counts['failed']} failed; outputs in {summary.output.resolve()}"
    )
    return 0 if summary.all_succeeded else 1


def _cmd_simulate(args: argparse.Namespace) -> int:
    world = _fem_world()
    from solvers.simulate import SimulateConfig, run_simulate, simulate_table

    config = _agreed_config(
        world,
        args,
        "simulate",
        SimulateConfig,
        lambda: {
            **_solver_flags(args),
            "model": None if args.model is None else str(args.model),
            "closure": args.closure,
            "coupling": args.coupling,
            "compare": True if args.compare else None,
            "outer": args.outer,
            "relaxation": args.relaxation,
            "tol": args.tol,
            "max_iterations": args.max_iterations,
            "allow_physics_mismatch": True if args.allow_physics_mismatch else None,
            "device": args.device,
            "clouds": args.clouds,
        },
        # a generate config's cases (alphas, meshes, boundaries) run as they are
        table=lambda: {} if args.config is None else simulate_table(load_toml(args.config)),
    )
    summary = run_simulate(config)
    _output(f"{summary.table()}\n\nmetrics.json and the outputs in {summary.output.resolve()}")
    return 0 if summary.all_succeeded else 1


def _cmd_train(args: argparse.Namespace) -> int:
    from vcnn.outputs import check_output_dir
    from vcnn.training import TrainConfig, train

    flags = {
        "data": args.data,
        "out": args.out,
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
        "init_model": None if args.init_model is None else str(args.init_model),
    }
    config = TrainConfig.from_dict(_section(args, "train"), overrides=flags)
    if config.init_model is not None:  # a path, or a shipped model's name (vcnn.models)
        from vcnn.models import resolve_model

        config.init_model = str(resolve_model(config.init_model, flag="--init-model"))
    check_output_dir(config.out, flag="--out")
    result = train(config)
    if not result.best_checkpoint.is_file():
        raise UsageError(
            f"training ended without a best checkpoint in {str(result.out_dir)!r}: no epoch "
            "gave a finite validation error"
        )
    # An integral run scores each case by one number: its error is the RMS over the cases of
    # the relative error of the integral of tau, not a relative L2 error of a field.
    measure = (
        "RMS relative integral error"
        if config.target == "integral"
        else "relative L2 error"
    )
    _output(
        f"best validation {measure} {result.best_validation_rel_l2_percent:.3f} % at "
        f"epoch {result.best_epoch}; checkpoints in {result.out_dir}"
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
    _flags_from_config(args, "evaluate")
    from vcnn.casefile import CaseFileError, inspect_case, read_case
    from vcnn.checkpoint import load_checkpoint
    from vcnn.evaluation import evaluate
    from vcnn.models import resolve_model
    from vcnn.outputs import check_output_dir, check_output_owner, output_lock

    # Everything is checked before the output folder is made: nothing partial is written.
    args.model = resolve_model(args.model)  # a path, or a shipped model's name
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
            args.model, cases, args.out, cloud_size=args.cloud_size, device=args.device,
            clouds=args.clouds,
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
    table = "\n".join(lines)
    _output(f"{table}\n\nmetrics and figures in {Path(args.out).resolve()}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    _flags_from_config(args, "export")
    from vcnn.checkpoint import export_model, is_exported_file
    from vcnn.models import resolve_model
    from vcnn.outputs import check_output_file

    args.model = resolve_model(args.model)  # a path, or a shipped model's name
    check_output_file(args.out, flag="--out", not_same_as=args.model)
    if args.out.exists() and not args.overwrite and not is_exported_file(args.out):
        # a training checkpoint (train's output) or a file that is no model: not ours to replace
        raise UsageError(
            f"--out {str(args.out)!r} exists and is not an exported model (a training "
            "checkpoint, or another file): give another --out, or --overwrite to replace it"
        )
    out = export_model(args.model, args.out)
    _output(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB)")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    _flags_from_config(args, "plot")
    from vcnn.casefile import inspect_case, read_case
    from vcnn.outputs import check_output_dir
    from vcnn.plotting.cases import plot_case

    paths = _case_files(args.data, flag="vcnn plot")
    drawable = "vcnn plot draws 2-D cases, and 3-D cases with their cells (tetrahedra or hexahedra)"
    for path in paths:
        header = inspect_case(path)
        if header.dim not in (2, 3):
            raise UsageError(f"{drawable}; {str(path)!r} is {header.dim}-D")
    for path in paths:
        case = read_case(path)  # every case is valid before the first figure is written
        cells = case.extra.get("cells")
        if case.dim == 3 and (cells is None or cells.ndim != 2 or cells.shape[1] not in (4, 8)):
            raise UsageError(f"{drawable}; {str(path)!r} is 3-D without them")
    out = Path(args.out) if args.out else None
    for folder in {out} if out is not None else {path.parent for path in paths}:
        check_output_dir(folder, flag="--out" if out is not None else "the case folder")
    for path in paths:
        case = read_case(path)
        figure = (out or path.parent) / f"{path.stem}.png"
        plot_case(case, figure)
        _output(f"wrote {figure}")
    return 0


def _generate_config() -> type:
    from solvers.generate import GenerateConfig

    return GenerateConfig


def _simulate_config() -> type:
    from solvers.simulate import SimulateConfig

    return SimulateConfig


def _train_config() -> type:
    from vcnn.training import TrainConfig

    return TrainConfig


#: The help of every model flag on the shipped models' names (``vcnn.models.SHIPPED_MODELS``,
#: not imported here: it imports torch, and ``vcnn --help`` must stay fast).
SHIPPED_HELP = "or a shipped model's name: published, coupled (an existing file wins)"

#: The config keys of the mesh flags of generate and simulate.
MESH_KEYS = {
    "mesh": "mesh.kind",
    "resolution": "mesh.resolution",
    "size": "mesh.size",
    "mesh_file": "mesh.file",
}

#: An example of each verb (its help's epilog); the paths exist in a fresh clone or are made
#: by the example before.
EXAMPLES = {
    "generate": """\
examples:
  vcnn generate --alphas 0.8 1.0 1.3 --resolution 0.25 --out data/hills
  vcnn generate --config experiments/coupled/generate.toml   # the coupled recipe's cases""",
    "simulate": """\
examples:
  vcnn simulate --model experiments/coupled/model/best.pt --alphas 1.45 --resolution 0.25 \\
      --coupling two-way --compare --out results/simulate
  vcnn simulate --config experiments/coupled/simulate.toml""",
    "train": """\
examples:
  vcnn generate --config experiments/coupled/generate.toml   # the cases it trains on
  vcnn train --config experiments/coupled/train.toml   # into runs/coupled""",
    "evaluate": """\
examples:
  vcnn generate --alphas 1.45 1.9 --resolution 0.25 --out data/hills
  vcnn evaluate --model experiments/published/model/best.pt --data data/hills \\
      --out results/evaluate""",
    "export": """\
example:
  vcnn export --model experiments/coupled/model/best.pt --out coupled_exported.pt""",
    "plot": """\
examples:
  vcnn generate --alphas 1.0 --resolution 0.25 --out data/hills
  vcnn plot data/hills --out figures""",
}


def _verbosity_parent() -> argparse.ArgumentParser:
    """-v/-q after the verb (``vcnn generate -v``); they add to the ones before it."""
    parent = _Parser(add_help=False)
    parent.add_argument(
        "-v", "--verbose", dest="verb_verbose", action="count", default=0,
        help="more output: solver steps (-v), tracebacks of errors",
    )
    parent.add_argument(
        "-q", "--quiet", dest="verb_quiet", action="count", default=0,
        help="less output: warnings and the result table only",
    )
    return parent


def _add_verb(
    verbs: Any, name: str, *, summary: str, table: bool = True, **kwargs: Any
) -> _Parser:
    """A verb's parser: its summary, example, -v/-q and ``--config``."""
    parser = verbs.add_parser(
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + ".",
        epilog=EXAMPLES[name],
        parents=[_verbosity_parent()],
        **kwargs,
    )
    parser.add_argument(
        "--config",
        type=Path,
        help=f"TOML file; its [{name}] table holds "
        + ("keys of the config reference" if not table else "the flags' long names with _")
        + "; flags win (default: none)",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``vcnn`` command.

    Nothing heavy is imported here: a verb's config class (for the defaults its help shows) is
    imported only when that verb's help is printed.
    """
    parser = _Parser(
        prog="vcnn",
        description=(
            "Learned nonlocal closures: generate cases, train and evaluate networks,\n"
            "simulate with them in the loop."
        ),
        epilog="""\
a first run (five minutes on a laptop):
  vcnn generate --alphas 0.8 1.0 1.3 --resolution 0.25 --out data/hills
  vcnn evaluate --model experiments/published/model/best.pt --data data/hills \\
      --out results/evaluate
`vcnn VERB --help` shows each verb's flags, defaults and an example.""",
    )
    parser.add_argument("--version", action=_VersionAction)
    parser.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="more output: solver steps (-v), tracebacks of errors",
    )
    parser.add_argument(
        "-q", "--quiet", action="count", default=0,
        help="less output: warnings and the result table only",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    generate = _add_verb(
        verbs,
        "generate",
        summary="solve cases and write case files",
        table=False,
        config_class=_generate_config,
        config_keys={
            **MESH_KEYS, "span_cells": "mesh.span_cells", "supg_length": "physics.supg_length"
        },
    )
    _add_mesh_options(generate)
    _add_dimension_options(generate)
    generate.add_argument("--production", choices=["frozen", "coupled"], help="tau production")
    generate.add_argument("--c-k", type=_number, help="eddy-viscosity coefficient (0: one-way)")
    generate.add_argument(
        "--supg-length",
        choices=SUPG_LENGTHS,
        help="element length of tau's SUPG parameter ([generate.physics] supg_length): "
        "'diameter' (default; the published data) or 'flow' (the cell's extent along u; use "
        "it in 3-D, where the diameter counts the span)",
    )
    _unset_means(
        generate.add_argument(
            "--flow-from",
            help="take the velocity from this source instead of solving for it: a case file "
            "(.npz), a meshio-readable file with point or cell data, or an OpenFOAM case "
            "directory",
        ),
        "solve the flow",
    )
    generate.add_argument(
        "--flow-time", help="OpenFOAM source: 'latest' or a time directory, e.g. 341"
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

    simulate = _add_verb(
        verbs,
        "simulate",
        summary="a closure in the loop of the flow solver, against the PDE truth",
        table=False,
        config_class=_simulate_config,
        config_keys={**MESH_KEYS, "span_cells": "mesh.span_cells"},
    )
    _add_mesh_options(simulate)
    _add_dimension_options(simulate)
    _unset_means(
        simulate.add_argument(
            "--model", type=Path, help=f"trained closure: best.pt, an export {SHIPPED_HELP}"
        ),
        "none, needed by --closure network",
    )
    simulate.add_argument("--closure", choices=["network", "pde"], help="network or the tau PDE")
    simulate.add_argument(
        "--coupling", choices=["one-way", "two-way"], help="flow fixed, or nu_t from tau"
    )
    simulate.add_argument("--compare", action="store_true", help="also solve the PDE truth")
    _unset_means(
        simulate.add_argument(
            "--flow-from",
            help="one-way: take the fixed flow from this source (case file, meshio file, "
            "OpenFOAM case) instead of solving it",
        ),
        "solve the flow",
    )
    simulate.add_argument("--flow-time", help="OpenFOAM source: 'latest' or a time directory")
    simulate.add_argument(
        "--flow-field", help="velocity field name in the source (default: U, then velocity)"
    )
    _unset_means(
        simulate.add_argument(
            "--production", choices=["frozen", "coupled"], help="tau production"
        ),
        "the closure's",
    )
    _unset_means(
        simulate.add_argument("--c-k", type=_number, help="eddy-viscosity coefficient C_k"),
        "the closure's",
    )
    simulate.add_argument(
        "--outer", choices=["anderson", "ngmres", "picard"], help="two-way outer iteration"
    )
    simulate.add_argument("--relaxation", type=_number, help="omega of relaxed Picard")
    simulate.add_argument("--tol", type=_number, help="relative change to converge")
    simulate.add_argument("--max-iterations", type=_count(1), help="flow solves at most per run")
    simulate.add_argument(
        "--allow-physics-mismatch",
        action="store_true",
        help="run although the physics differs from the closure's record",
    )
    simulate.add_argument("--device", choices=["auto", "cpu", "cuda"], help="inference device")
    simulate.add_argument(
        "--clouds",
        choices=["auto", "quadrature", "full"],
        help="the network's clouds: full, the cloud quadrature (bounded points per cloud), or "
        "auto (the quadrature where a case's full clouds would hold more than 400 points on "
        "average in 2-D, 3,000 in 3-D, decided once per case)",
    )
    simulate.add_argument("--out", type=Path, help="output folder")
    simulate.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a folder that holds another verb's outputs (generated cases, a run)",
    )
    simulate.add_argument("--no-plots", action="store_true", help="skip the PNG per case")
    simulate.add_argument("--no-xdmf", action="store_true", help="skip the XDMF per case")
    simulate.set_defaults(handler=_cmd_simulate)

    train = _add_verb(
        verbs,
        "train",
        summary="train a vector-cloud network on case files",
        table=False,
        config_class=_train_config,
        config_keys={"threads": "num_threads"},
    )
    train.add_argument("--data", help="folder of case files")
    train.add_argument("--out", help="run folder (checkpoints, lcurve.tsv, figures)")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], help="training device")
    train.add_argument("--epochs", type=_count(1), help="epochs at most")
    train.add_argument("--batch-size", type=_count(1), help="clouds per optimiser step")
    train.add_argument("--cloud-size", type=_count(1), help="points sampled per cloud")
    _unset_means(
        train.add_argument(
            "--queries-per-case",
            type=_count_or_all,
            help="clouds per case per epoch, or 'all' (every point)",
        ),
        "every point",
    )
    train.add_argument("--seed", type=_count(0), help="seed of weights, clouds and shuffling")
    _unset_means(
        train.add_argument("--threads", type=_count(1), help="torch CPU threads"),
        "torch's choice",
    )
    resume = train.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue the run from last.pt")
    resume.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run the --out folder holds (or write beside another verb's outputs)",
    )
    train.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    train.add_argument(
        "--init-model",
        type=Path,
        help="start a new run from this checkpoint's weights, normaliser and target scale "
        f"(fine-tuning; same [train.model]; not with --resume); a path {SHIPPED_HELP}",
    )
    train.set_defaults(handler=_cmd_train)

    evaluate = _add_verb(verbs, "evaluate", summary="a-priori errors of a model on case files")
    evaluate.add_argument(
        "--model", type=Path, help=f"checkpoint, e.g. best.pt, {SHIPPED_HELP} (required)"
    )
    evaluate.add_argument(
        "--data", type=Path, nargs="+", help="case files or folders of them (required)"
    )
    evaluate.add_argument("--out", type=Path, help="folder of metrics and figures (required)")
    evaluate.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a folder that holds another verb's outputs (a training run, cases)",
    )
    _unset_means(
        evaluate.add_argument("--cloud-size", type=_count(1), help="fixed n per cloud"),
        "the full cloud",
    )
    evaluate.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="inference device"
    )
    evaluate.add_argument(
        "--clouds",
        default="auto",  # vcnn.closure.DEFAULT_CLOUDS (not imported: the CLI starts without torch)
        choices=["auto", "quadrature", "full"],
        help="full clouds, the cloud quadrature (a bounded number of weighted points per "
        "cloud), or auto: the quadrature on the CPU where a case's full clouds would hold more "
        "than 400 points on average in 2-D (3,000 in 3-D), else full clouds (ignored with "
        "--cloud-size)",
    )
    evaluate.set_defaults(handler=_cmd_evaluate, flags=evaluate, needs=("model", "data", "out"))

    export = _add_verb(verbs, "export", summary="inference-only copy of a checkpoint (small)")
    export.add_argument(
        "--model", type=Path, help=f"checkpoint, e.g. best.pt, {SHIPPED_HELP} (required)"
    )
    export.add_argument("--out", type=Path, help="file to write (required)")
    export.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out that is not an exported model (e.g. a training checkpoint)",
    )
    export.set_defaults(handler=_cmd_export, flags=export, needs=("model", "out"))

    plot = _add_verb(
        verbs, "plot", summary="draw case files (speed, streamlines, tau; 3-D: sections, profiles)"
    )
    plot.add_argument(
        "data", metavar="CASES", nargs="*", type=Path, help="case files or folders of case "
        "files (or data = [...] in [plot] of --config)"
    )
    plot.add_argument("--out", type=Path, help="folder of the figures (default: beside each)")
    plot.set_defaults(handler=_cmd_plot, flags=plot, needs=("data",))
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
    verbosity = args.verbose + args.verb_verbose - args.quiet - args.verb_quiet
    configure_logging(verbosity)
    verbose = args.verbose + args.verb_verbose > 0
    return run_verb(args.handler, args, verbose=verbose, report=report)


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
