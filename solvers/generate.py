"""Dataset generation: mesh -> flow -> derived fields -> tau -> case files, XDMF and figures.

:func:`run_generate` is what ``vcnn generate`` runs. For each case (one per hill slope factor
alpha, or one for a user mesh) it solves the flow (or, with ``flow_from``, takes it from
another code: :mod:`solvers.flow_import`) and the closure transport, gathers the nodal data at
the P1 points on rank 0 and writes the case file of DESIGN 4 atomically, an XDMF file of mesh
and fields for ParaView and a PNG. A case that fails is reported and skipped; complete
cases are not recomputed unless ``overwrite`` is set.
"""

from __future__ import annotations

from mpi4py import MPI

import contextlib
import errno
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from solvers.boundaries import BoundarySpec, PeriodicPair, hill_boundary_spec
from solvers.collective import on_root
from solvers.flow_sources import MIN_SAMPLES_PER_MESH_POINT
from solvers.linalg import is_interrupt
from solvers.preflight import (
    check_alphas,
    check_case_size,
    check_existing_case,
    check_mesh_size,
    machine_memory,
)
from vcnn.atomic import atomic_write_text
from vcnn.casefile import write_case
from vcnn.config import ConfigError, check_keys, check_types, merge, write_resolved_config
from vcnn.expressions import ExpressionError, compile_expression
from vcnn.inputs import check_regular_input
from vcnn.outputs import (
    check_output_dir,
    check_output_owner,
    disk_full_error,
    is_disk_full,
    output_lock,
)
from vcnn.physics import PRODUCTION_MODES, Physics

logger = logging.getLogger(__name__)

MESH_KINDS = ("structured", "unstructured", "file")


@dataclass
class MeshConfig:
    """Which mesh each case is solved on.

    Attributes:
        kind: ``structured`` (graded quadrilaterals like the published meshes),
            ``unstructured`` (gmsh triangles) or ``file`` (a user mesh).
        resolution: structured: factor on the published 200 alpha x 200 cells.
        cell_type: structured: ``quadrilateral`` or ``triangle``.
        size: unstructured: target cell size in the core of the flow.
        wall_size: unstructured: cell size at the walls (default size / 5).
        file: file: path of a ``.msh`` or meshio-readable mesh with tagged boundaries.
    """

    kind: str = "structured"
    resolution: float = 1.0
    cell_type: str = "quadrilateral"
    size: float = 0.05
    wall_size: float | None = None
    file: str | None = None

    def __post_init__(self) -> None:
        check_types(asdict(self), MeshConfig, "[generate.mesh]")
        if self.kind not in MESH_KINDS:
            raise ConfigError(f"mesh kind must be one of {MESH_KINDS}, got {self.kind!r}")
        for name in ("resolution", "size", "wall_size"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"[generate.mesh] {name} must be a positive number, got {value}")
        if self.cell_type not in ("quadrilateral", "triangle"):
            raise ConfigError(
                f"[generate.mesh] cell_type must be 'quadrilateral' or 'triangle', got "
                f"{self.cell_type!r}"
            )
        if self.wall_size is not None and self.wall_size > self.size:
            raise ConfigError(
                f"[generate.mesh] wall_size ({self.wall_size:g}) must not exceed size "
                f"({self.size:g})"
            )
        if self.file is not None:
            self.file = str(self.file)
        if self.kind == "file":
            if not self.file:
                raise ConfigError("mesh kind 'file' needs mesh.file (or --mesh-file)")
            check_regular_input(
                self.file,
                what="mesh file",
                flag="--mesh-file / [generate.mesh] file",
                error=ConfigError,
            )
        elif self.file is not None:
            raise ConfigError(
                f"mesh file {self.file!r} is given but the mesh kind is {self.kind!r}: use "
                "--mesh file (kind = \"file\") to solve on it, or leave the file out"
            )


#: The ``[generate.physics]`` table: the constants of :class:`vcnn.physics.Physics` except the
#: production mode and C_k, which are top-level keys (and flags) of ``[generate]``.
PHYSICS_TABLE_KEYS = frozenset(
    name for name in Physics.__dataclass_fields__ if name not in ("production", "c_k")
)


@dataclass
class GenerateConfig:
    """Configuration of ``vcnn generate`` (the ``[generate]`` table of a TOML file).

    Attributes:
        alphas: hill slope factors, one case each (ignored for a file mesh).
        output: folder of the case files, figures, XDMF and summary.
        production: ``frozen`` (fixed source, the published data) or ``coupled`` (tau_P = tau).
        c_k: eddy-viscosity coefficient; > 0 couples nu_t = C_k l_m sqrt(tau) into the flow.
        overwrite: recompute cases whose case file exists.
        plots: write a PNG per case.
        xdmf: write an XDMF file of mesh and fields per case.
        name: case name for a file mesh (default: the file's stem).
        mesh: see :class:`MeshConfig`.
        physics: the constants of :class:`vcnn.physics.Physics`; its ``production`` and
            ``c_k`` are the top-level ``production`` and ``c_k`` of this config.
        flow_from: take the velocity from this source instead of solving for it: a case
            file (``.npz``), a meshio-readable file with point or cell data, or an OpenFOAM
            case directory (see :mod:`solvers.flow_import`). Incompatible with c_k > 0.
        flow_time: OpenFOAM source: ``"latest"`` or a time directory (e.g. ``"341"``).
        flow_field: name of the velocity field of the source (default ``U``, then
            ``velocity``).
        flow_min_samples_per_point: fewest samples of the flow source per point of the mesh,
            in (0, 1] (0.1: one per ten; a sparser source is refused as subsampled or
            cropped; lower it for a deliberately coarser source).
        boundaries: file mesh only: boundary roles by name, e.g.
            ``{walls = ["walls", "cylinder"], outlets = ["outlet"],
            inlets = {inlet = {profile = "parabolic", mean_velocity = 1.0}},
            periodic = [{slave = "right", master = "left", translation = [-9.0, 0.0]}]}``.
            Profiles: ``parabolic`` (mean_velocity), ``uniform`` (velocity = [ux, uy]) or
            ``expression`` (components = ["arithmetic of x, y, z", ...], see
            :mod:`vcnn.expressions`).
            Every boundary group of the mesh needs a role (:data:`BOUNDARY_ROLES`); one that
            is open without being an outlet goes under ``natural = ["name"]`` (the conditions
            of an outlet: do-nothing for u, zero flux for tau). Tau is zero on walls and
            inlets.
    """

    alphas: list[float] = field(default_factory=lambda: [1.0])
    output: str = "data/hills"
    production: str = "frozen"
    c_k: float = 0.0
    overwrite: bool = False
    plots: bool = True
    xdmf: bool = True
    name: str | None = None
    mesh: MeshConfig = field(default_factory=MeshConfig)
    physics: Physics = field(default_factory=Physics)
    boundaries: dict[str, Any] = field(default_factory=dict)
    flow_from: str | None = None
    flow_time: str | float = "latest"
    flow_field: str | None = None
    flow_min_samples_per_point: float = MIN_SAMPLES_PER_MESH_POINT

    def __post_init__(self) -> None:
        if self.production not in PRODUCTION_MODES:
            raise ConfigError(
                f"production must be one of {PRODUCTION_MODES}, got {self.production!r}"
            )
        if not (math.isfinite(self.c_k) and self.c_k >= 0):
            raise ConfigError(f"c_k must be >= 0, got {self.c_k}")
        try:
            self.physics = self.physics.with_overrides(production=self.production, c_k=self.c_k)
        except ValueError as error:
            raise ConfigError(str(error)) from error
        if self.flow_from is not None:
            self.flow_from = str(self.flow_from)
            check_regular_input(
                self.flow_from,
                what="flow source",
                flag="--flow-from / [generate] flow_from",
                allow_dir=True,
                error=ConfigError,
            )
            if self.c_k > 0:
                raise ConfigError(
                    "flow_from takes the flow from a source, so it cannot be coupled to tau: "
                    "c_k must be 0"
                )
        self.flow_time = str(self.flow_time)
        density = self.flow_min_samples_per_point
        if isinstance(density, bool) or not (
            isinstance(density, int | float) and 0 < density <= 1
        ):
            raise ConfigError(
                f"[generate] flow_min_samples_per_point must be a number in (0, 1], got "
                f"{density!r}"
            )
        self.alphas = [float(a) for a in self.alphas]
        self.output = str(self.output)
        if self.name is not None:
            check_case_name(self.name, where="[generate] name")
        if self.mesh.kind != "file":
            check_alphas(self.alphas)
            names: dict[str, float] = {}
            for alpha in self.alphas:
                name = hill_case_name(alpha)
                if name in names:
                    raise ConfigError(
                        f"alphas lists the slope factor {alpha:g} twice: give each one once"
                        if names[name] == alpha
                        else f"alphas {names[name]!r} and {alpha!r} both give the case {name!r}"
                    )
                names[name] = alpha
        elif not self.boundaries:
            raise ConfigError("a file mesh needs a [generate.boundaries] table naming its walls")
        else:
            check_boundaries_table(self.boundaries)

    @classmethod
    def from_dict(
        cls, values: Mapping[str, Any], *, overrides: Mapping[str, Any] | None = None
    ) -> GenerateConfig:
        """Build from a ``[generate]`` table, with flag ``overrides`` (None = not given)."""
        values = merge(values, overrides or {})
        check_keys(values, {f for f in cls.__dataclass_fields__}, "[generate]")
        check_types(values, cls, "[generate]")
        mesh = dict(values.pop("mesh", {}))
        check_keys(mesh, set(MeshConfig.__dataclass_fields__), "[generate.mesh]")
        check_types(mesh, MeshConfig, "[generate.mesh]")
        physics = dict(values.pop("physics", {}))
        check_keys(physics, set(PHYSICS_TABLE_KEYS), "[generate.physics]")
        try:
            physics_constants = Physics.from_dict(physics)
        except ValueError as error:
            raise ConfigError(str(error)) from error
        return cls(**values, mesh=MeshConfig(**mesh), physics=physics_constants)

    def to_dict(self) -> dict[str, Any]:
        """Plain TOML-friendly dictionary (the resolved config)."""
        values = asdict(self)
        values["physics"] = {
            key: value for key, value in values["physics"].items() if key in PHYSICS_TABLE_KEYS
        }
        return values


@dataclass
class CaseReport:
    """Outcome of one case (a row of the summary table)."""

    name: str
    alpha: float | None
    status: str  # "written", "skipped" (already complete) or "failed"
    num_points: int = 0
    flow_iterations: int = 0
    tau_iterations: int = 0
    tau_integral: float = float("nan")
    wall_time: float = 0.0
    stage_times: dict[str, float] = field(default_factory=dict)
    error: str = ""


@dataclass
class GenerateSummary:
    """All case reports of a run and where its outputs are."""

    cases: list[CaseReport]
    output: Path

    @property
    def all_succeeded(self) -> bool:
        """True when no case failed."""
        return all(case.status != "failed" for case in self.cases)

    def table(self) -> str:
        """The summary as a Markdown table."""
        rows = [
            "| case | alpha | status | points | flow its | tau its | integral tau | wall s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in self.cases:
            alpha = "" if c.alpha is None else f"{c.alpha:g}"
            rows.append(
                f"| {c.name} | {alpha} | {c.status} | {c.num_points} | {c.flow_iterations} | "
                f"{c.tau_iterations} | {c.tau_integral:.6g} | {c.wall_time:.1f} |"
            )
        return "\n".join(rows)


def hill_case_name(alpha: float) -> str:
    """File stem of the hill case of slope factor alpha, e.g. ``hill_a1.000``.

    Three decimals, or as many more as the value needs (``hill_a1.0004``), so that distinct
    slope factors never share a case file.
    """
    for digits in range(3, 16):
        text = f"{alpha:.{digits}f}"
        if float(text) == alpha:
            return f"hill_a{text}"
    return f"hill_a{alpha!r}"


#: Case names are file stems: letters, digits and ``_ . + -``, no path separators, no ``..``.
_CASE_NAME = re.compile(r"[A-Za-z0-9_+\-][A-Za-z0-9_.+\-]*")


def check_case_name(name: str, *, where: str) -> str:
    """Refuse a case name that is not a plain file stem (it must not leave ``--out``).

    Raises:
        ConfigError: for separators, ``..``, a leading dot, or other characters.
    """
    if (
        not isinstance(name, str)
        or not _CASE_NAME.fullmatch(name)
        or ".." in name
        or os.sep in name
        or (os.altsep is not None and os.altsep in name)
        or len(name) > 200
    ):
        raise ConfigError(
            f"{where} {name!r} is not a valid case name: use letters, digits and _ . + - "
            "(no path separators, no '..', no leading dot)"
        )
    return name


#: Roles of a boundary group in the ``boundaries`` table of a file mesh: ``walls`` (no slip,
#: tau = 0), ``inlets`` (a velocity profile, tau = 0), ``outlets`` (do-nothing for u, zero flux
#: for tau), ``periodic`` (pairs identified by a translation) and ``natural`` (an outlet's
#: conditions on a boundary that is not an outlet, e.g. an open top). Every group needs one.
BOUNDARY_ROLES = ("walls", "inlets", "outlets", "periodic", "natural")


def check_boundaries_table(table: Mapping[str, Any]) -> None:
    """Check the ``[generate.boundaries]`` table of a file mesh before anything is solved.

    Expressions of inlet profiles are parsed here (see :mod:`vcnn.expressions`), so that a bad
    or unsafe one is refused before any mesh is read.

    Raises:
        ConfigError: naming the key or inlet.
    """
    check_keys(table, set(BOUNDARY_ROLES), "[generate.boundaries]")
    for key in ("walls", "outlets", "natural"):
        names = table.get(key, [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"[generate.boundaries] {key} must be a list of boundary names")
    inlets = table.get("inlets", {})
    if not isinstance(inlets, Mapping):
        raise ConfigError("[generate.boundaries] inlets must be a table of inlet tables")
    for name, settings in inlets.items():
        where = f"[generate.boundaries.inlets.{name}]"
        if not isinstance(settings, Mapping):
            raise ConfigError(f"{where} must be a table")
        if settings.get("profile") == "expression":
            components = settings.get("components")
            if not isinstance(components, list) or not components:
                raise ConfigError(f"{where} components must be a list of expressions")
            for component in components:
                try:
                    compile_expression(component, where=f"{where} components")
                except ExpressionError as error:
                    raise ConfigError(str(error)) from error
    periodic = table.get("periodic", [])
    if not isinstance(periodic, list) or not all(isinstance(p, Mapping) for p in periodic):
        raise ConfigError("[generate.boundaries] periodic must be a list of tables")


def run_generate(config: GenerateConfig, *, comm: MPI.Comm = MPI.COMM_WORLD) -> GenerateSummary:
    """Solve every case of ``config`` and write its outputs (collective over ``comm``).

    Everything that can be checked is checked before anything is written: the output folder,
    the size of each hill mesh, the settings of existing case files (a complete case is skipped
    only when it matches this run), and for a file mesh its boundary names. Where rank 0 alone
    does I/O, its errors are raised on every rank (:func:`solvers.collective.on_root`).

    Returns:
        The summary; failed cases are listed with their error, not raised.

    Raises:
        ConfigError: a setting is unusable for the whole run (refused before writing, or a
            config error met in a case, which would fail every case).
        UsageError: the output folder cannot be written, holds another verb's outputs
            (without ``overwrite``), or is in use by another run (its lock is held).
        OSError: the disk (or quota) is full: ENOSPC/EDQUOT naming the file; the complete
            outputs written before are kept.
        KeyboardInterrupt: the run was interrupted (Ctrl-C, SIGTERM), also inside a solve.
    """
    output = Path(config.output)
    on_root(comm, lambda: check_output_dir(output, flag="--out (output)"))

    def check_owner() -> None:
        check_output_owner(
            output, verb="generate", overwrite=config.overwrite, flag="--out (output)"
        )

    on_root(comm, check_owner)
    jobs = case_jobs(config)
    memory = machine_memory(comm) if config.mesh.kind != "file" else 0
    processes = comm.size

    def check_sizes() -> None:
        for _, alpha in jobs:
            if alpha is not None:
                check_case_size(config.mesh, alpha, processes=processes, memory=memory)

    on_root(comm, check_sizes)

    def inspect_existing() -> dict[str, str]:
        state = {}
        for name, alpha in jobs:
            target = output / f"{name}.npz"
            if not target.exists():
                state[name] = "missing"
            elif config.overwrite:
                state[name] = "overwrite"
            else:
                check_existing_case(target, config, alpha)
                state[name] = "complete"
        return state

    state = on_root(comm, inspect_existing, share_result=True) or {}
    prepared = None
    if config.mesh.kind == "file" and state.get(jobs[0][0]) != "complete":
        # One case on one mesh: read it now, so that a boundary the mesh lacks is refused
        # before anything is written.
        tagged = build_mesh(config.mesh, None, comm=comm)
        prepared = (tagged, boundary_spec(config, tagged))
    _check_inputs(config, jobs, state, prepared, comm=comm)
    # The first write: the folder is locked for the run (and checked again under the lock).
    with output_lock(
        output,
        verb="generate",
        flag="--out (output)",
        then=check_owner,
        on_root=lambda action: on_root(comm, action),
    ):
        on_root(comm, lambda: write_resolved_config(output, {"generate": config.to_dict()}))
        return _generate_cases(config, jobs, state, prepared, comm=comm)


def _check_inputs(
    config: GenerateConfig,
    jobs: list[tuple[str, float | None]],
    state: Mapping[str, str],
    prepared: tuple[Any, BoundarySpec] | None,
    *,
    comm: MPI.Comm,
) -> None:
    """Check the inputs that need a mesh, before anything is written (collective).

    A file mesh (already read, ``prepared``) must fit in memory; a flow source is read and
    measured against the mesh of every case still to compute (built here for a hill), as
    :func:`solvers.flow_import.import_flow` will measure it.

    Raises:
        ConfigError: the file mesh is too large.
        FlowSourceError: the source is unreadable, malformed, never solved, too sparse or does
            not fit a mesh.
    """
    if prepared is not None:
        info, memory, processes = prepared[0].info, machine_memory(comm), comm.size
        on_root(comm, lambda: check_mesh_size(info, processes=processes, memory=memory))
    to_compute = [(name, alpha) for name, alpha in jobs if state.get(name) != "complete"]
    check_config_flow_source(config, to_compute, prepared=prepared, comm=comm)


def check_config_flow_source(
    config: Any,
    jobs: list[tuple[str, float | None]],
    *,
    prepared: tuple[Any, BoundarySpec] | None = None,
    comm: MPI.Comm,
) -> None:
    """Read the config's ``flow_from`` and check it against each case's mesh, up front.

    Args:
        config: generate's or simulate's configuration (``flow_from``, ``flow_field``,
            ``flow_time``, ``flow_min_samples_per_point``); nothing is done without a source.
        jobs: (name, alpha) of the cases to check.
        prepared: the file mesh's, when the caller has read it already.
        comm: the communicator of the meshes.

    Raises:
        FlowSourceError: see :func:`solvers.flow_import.check_flow_source`.
    """
    if config.flow_from is None:
        return
    from solvers.flow_import import check_flow_source

    check_flow_source(
        config.flow_from,
        case_meshes(config, jobs, prepared=prepared, comm=comm),
        field=config.flow_field,
        time=config.flow_time,
        min_samples_per_point=config.flow_min_samples_per_point,
        comm=comm,
    )


def case_meshes(
    config: Any,
    jobs: list[tuple[str, float | None]],
    *,
    prepared: tuple[Any, BoundarySpec] | None = None,
    comm: MPI.Comm,
) -> Iterator[tuple[Any, BoundarySpec]]:
    """(TaggedMesh, BoundarySpec) of each case, built one at a time (collective).

    Args:
        config: generate's or simulate's configuration.
        jobs: (name, alpha) of the cases.
        prepared: the file mesh's, when the caller has read it already.
        comm: the communicator of the meshes.
    """
    for _, alpha in jobs:
        if prepared is not None:
            yield prepared
            continue
        tagged = build_mesh(config.mesh, alpha, comm=comm)
        yield tagged, boundary_spec(config, tagged)


def _generate_cases(
    config: GenerateConfig,
    jobs: list[tuple[str, float | None]],
    state: Mapping[str, str],
    prepared: Any,
    *,
    comm: MPI.Comm,
) -> GenerateSummary:
    """The cases of :func:`run_generate` once it has checked everything (collective)."""
    output = Path(config.output)
    reports = []
    for number, (name, alpha) in enumerate(jobs, start=1):
        target = output / f"{name}.npz"
        prefix = f"[{number}/{len(jobs)}] {name}"
        if state.get(name) == "complete":
            if comm.rank == 0:
                logger.info("%s: complete, skipped (use --overwrite to recompute)", prefix)
            on_root(comm, lambda target=target, prefix=prefix: _missing_figure(config, target, prefix))
            reports.append(CaseReport(name, alpha, "skipped"))
            continue
        start = time.perf_counter()
        try:
            report = generate_case(
                config, name, alpha, comm=comm, log_prefix=prefix, prepared=prepared
            )
        except ConfigError:
            raise  # a config error fails every case: stop, with the one message
        except Exception as error:  # one failed case must not lose the others
            if is_interrupt(error):
                raise KeyboardInterrupt(f"interrupted in case {name}") from error
            if is_disk_full(error):
                raise  # the run's end (one line naming the file), not this case's failure
            message = f"{type(error).__name__}: {error}"
            if comm.rank == 0:
                logger.error("%s: FAILED: %s", prefix, message)
                logger.debug("%s", traceback.format_exc())
            report = CaseReport(name, alpha, "failed", error=message)
        report.wall_time = time.perf_counter() - start
        reports.append(report)
    summary = GenerateSummary(reports, output)

    def write_summary() -> None:
        table = summary.table()
        atomic_write_text(output / "summary.md", table + "\n")
        # the table is the command's output: `vcnn generate` prints it (vcnn.cli)

    on_root(comm, write_summary)
    return summary


def case_jobs(config: Any, *, section: str = "generate") -> list[tuple[str, float | None]]:
    """(case name, alpha) of every case of a run; alpha is None for a file mesh.

    Args:
        config: a run configuration with ``mesh``, ``alphas`` and ``name`` (generate's or
            simulate's).
        section: the configuration section that names the case (for the error message).
    """
    if config.mesh.kind == "file":
        name = config.name or Path(config.mesh.file).stem
        check_case_name(name, where=f"case name (set [{section}] name)")
        return [(name, None)]
    return [(hill_case_name(alpha), alpha) for alpha in config.alphas]


def _missing_figure(config: GenerateConfig, target: Path, prefix: str) -> None:
    """Draw the PNG of a complete case when it is missing (e.g. lost to an interrupt)."""
    figure = target.with_suffix(".png")
    if not config.plots or figure.exists():
        return
    from vcnn.casefile import read_case
    from vcnn.plotting import plot_case

    case = read_case(target)
    if case.dim == 2:
        plot_case(case, figure)
        logger.info("%s: figure was missing, drew %s", prefix, figure.name)


def generate_case(
    config: GenerateConfig,
    name: str,
    alpha: float | None,
    *,
    comm: MPI.Comm = MPI.COMM_WORLD,
    log_prefix: str = "",
    prepared: tuple[Any, BoundarySpec] | None = None,
) -> CaseReport:
    """Solve one case and write its case file (and XDMF, PNG); collective over ``comm``.

    ``prepared`` is the (TaggedMesh, BoundarySpec) of the case when the caller built them.
    """
    from dolfinx import fem

    from solvers.closures import PdeClosure
    from solvers.problem import ClosureProblem

    times: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str, *, seconds: float | None = None) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[stage] = now - clock if seconds is None else seconds
        clock = now
        if comm.rank == 0:
            logger.info("%s: %s done in %.1f s", log_prefix, stage, times[stage])

    if prepared is None:
        tagged = build_mesh(config.mesh, alpha, comm=comm)
        spec = boundary_spec(config, tagged)
    else:
        tagged, spec = prepared
    lap("mesh")
    physics = config.physics
    imported = config.flow_from is not None
    with (
        ClosureProblem.from_tagged_mesh(
            tagged, spec, physics, flow="given" if imported else "solve"
        ) as problem,
        PdeClosure(problem) as closure,
    ):
        setup = problem.setup_seconds
        lap("setup", seconds=setup["P1 space, periodic map, closure points"])
        lap("wall distance", seconds=setup["wall distance, volumes"])
        # The flow solver's set-up (spaces, forms, periodic pairing) counts as flow time.
        clock -= setup["flow solver"]
        result, coupling_iterations = solve_physics(config, problem, closure, lap=lap)
        strain = problem.strain_rate()
        lap("derived fields")
        flow = result.flow
        tau = problem.to_function(result.tau, fem.Function(problem.V, name="tau"))
        tau_integral = problem.integral(tau)
        tau_residuals = closure.last_solution.residual_history

        reversal = None
        if alpha is not None and problem.mesh.geometry.dim == 2:
            from solvers.diagnostics import hill_flow_reversal

            reversal = hill_flow_reversal(flow.u, alpha)
        flow_statistics = {}  # an imported flow has no solver statistics; its source is in meta
        if not imported:
            flow_statistics = {
                "flow_newton_iterations": flow.newton_iterations,
                "flow_residuals": list(flow.residual_history),
            }
        meta = {
            "case": name,
            "alpha": alpha,
            "mesh": {**tagged.info, "kind": tagged.kind, "num_cells": _num_cells(problem.mesh)},
            "physics": physics.to_dict(),
            **physics.flat_case_meta(),
            "U_b": physics.bulk_velocity if spec.body_force_driven and not imported else None,
            "bulk_velocity_measured": flow.bulk_velocity,
            "body_force": None if imported else flow.body_force,
            "flow_source": flow.to_meta() if imported else None,
            "tau_integral": tau_integral,
            "separation_x": None if reversal is None else reversal.separation.tolist(),
            "reattachment_x": None if reversal is None else reversal.reattachment.tolist(),
            "solver": {
                **flow_statistics,
                "tau_newton_iterations": result.closure_iterations,
                "tau_residuals": list(tau_residuals),
                "coupling_iterations": coupling_iterations,
                "coupling_method": result.method if coupling_iterations else None,
                "num_processes": comm.size,
                "stage_seconds": dict(times),
            },
            "seed": None,  # generation is deterministic: nothing random is drawn
            "versions": package_versions(),
        }
        case = problem.case(result.tau, name=name, meta=meta)
        output = Path(config.output)
        on_root(comm, lambda: write_case(output / f"{name}.npz", case))
        if config.xdmf:
            fields = {
                "velocity": flow.u,
                **({} if imported else {"pressure": flow.p}),
                "tau": tau,
                "strain_rate": strain,
                "wall_distance": problem.wall_distance,
                "nodal_volume": problem.volumes,
            }
            if problem.two_way:
                fields["nu_t"] = problem.eddy_viscosity
            write_xdmf(output / f"{name}.xdmf", problem.mesh, fields)

    def draw() -> None:
        if config.plots and case.dim == 2:
            from vcnn.plotting import plot_case

            plot_case(case, output / f"{name}.png")

    on_root(comm, draw)
    lap("output")
    return CaseReport(
        name,
        alpha,
        "written",
        num_points=case.num_points if comm.rank == 0 else 0,
        flow_iterations=0 if imported else flow.newton_iterations,
        tau_iterations=result.closure_iterations,
        tau_integral=tau_integral,
        stage_times=times,
    )


def solve_physics(config: GenerateConfig, problem, closure, *, lap=None):
    """Flow and tau: one-way (flow, then tau) or two-way coupled when c_k > 0.

    With ``config.flow_from`` the flow is not solved but interpolated from that source
    (:meth:`solvers.problem.ClosureProblem.import_flow`), then tau is solved on it.

    Args:
        config: the run's configuration.
        problem: the case's :class:`solvers.problem.ClosureProblem` (built with
            ``flow="given"`` for an imported flow).
        closure: its :class:`solvers.closures.PdeClosure`.
        lap: ``lap(stage)`` is called after each stage (for timing and progress).

    Returns:
        (:class:`solvers.closure_loop.LoopResult`, number of coupling iterations); its flow is
        a :class:`solvers.flow.FlowSolution` or a :class:`solvers.flow_import.ImportedFlow`.
    """
    from solvers.closure_loop import OuterOptions, solve_one_way, solve_two_way

    lap = lap or (lambda stage: None)
    if config.c_k > 0:
        # The tau PDE's undershoots on coarse meshes are discretisation error: no check.
        options = OuterOptions(negative_tolerance=None)
        result = solve_two_way(problem, closure, options)
        lap("coupled flow and tau")
        return result, result.evaluations
    if config.flow_from is not None:
        flow = problem.import_flow(
            config.flow_from,
            field=config.flow_field,
            time=config.flow_time,
            min_samples_per_point=config.flow_min_samples_per_point,
        )
        lap("flow import")
    else:
        flow = problem.solve_flow()
        lap("flow")
    result = solve_one_way(problem, closure, flow=flow)
    lap("tau")
    return result, 0


def build_mesh(mesh_config: MeshConfig, alpha: float | None, *, comm: MPI.Comm):
    """The TaggedMesh of one case."""
    if mesh_config.kind == "structured":
        from meshes.structured import structured_hill_mesh

        return structured_hill_mesh(
            alpha, resolution=mesh_config.resolution, comm=comm, cell_type=mesh_config.cell_type
        )
    if mesh_config.kind == "unstructured":
        from meshes.unstructured import unstructured_hill_mesh

        return unstructured_hill_mesh(
            alpha, size=mesh_config.size, wall_size=mesh_config.wall_size, comm=comm
        )
    from meshes.io import read_mesh

    return read_mesh(mesh_config.file, comm=comm)


def boundary_spec(config: GenerateConfig | Any, tagged) -> BoundarySpec:
    """Boundary roles: the hill spec, or the one of the config for a file mesh.

    Every boundary group (facet tag name) of a file mesh must have exactly one role in the
    config's boundaries table (see :data:`BOUNDARY_ROLES`); ``natural`` boundaries get the
    conditions of an outlet (do-nothing for u, zero diffusive flux for tau) and are outlets in
    the returned spec.

    Args:
        config: a :class:`GenerateConfig` or a ``SimulateConfig`` (same ``mesh`` and
            ``boundaries``).
        tagged: the tagged mesh.

    Raises:
        ConfigError: a listed boundary the mesh lacks, a boundary listed twice, or a boundary
            group of the mesh the table does not list (naming it and the roles it can take).
    """
    if config.mesh.kind != "file":
        return hill_boundary_spec(tagged.boundaries, tagged.period)
    # "[generate.boundaries]" or "[simulate.boundaries]": the table the user wrote
    where = f"[{type(config).__name__.removesuffix('Config').lower()}.boundaries]"
    table = dict(config.boundaries)
    check_keys(table, set(BOUNDARY_ROLES), where)

    def tag(name: str) -> int:
        if name not in tagged.boundaries:
            raise ConfigError(
                f"boundary {name!r} is not in the mesh; it has {sorted(tagged.boundaries)}"
            )
        return tagged.boundaries[name]

    inlets = {
        tag(name): inlet_profile(settings, tagged, tag(name), where=f"inlet {name!r}")
        for name, settings in dict(table.get("inlets", {})).items()
    }
    periodic = []
    for pair in table.get("periodic", []):
        check_keys(pair, {"slave", "master", "translation"}, "a periodic pair")
        periodic.append(
            PeriodicPair(tag(pair["slave"]), tag(pair["master"]), tuple(pair["translation"]))
        )
    walls = tuple(tag(n) for n in table.get("walls", []))
    outlets = tuple(tag(n) for n in [*table.get("outlets", []), *table.get("natural", [])])
    listed = _listed_boundaries(table)
    twice = sorted({name for name in listed if listed.count(name) > 1})
    if twice:
        raise ConfigError(f"boundary {twice[0]!r} has more than one role in {where}")
    unlisted = sorted(set(tagged.boundaries) - set(listed))
    if unlisted:
        source = f" of mesh file {str(config.mesh.file)!r}" if config.mesh.file else ""
        raise ConfigError(
            f"boundary {unlisted[0]!r}{source} has no role in {where}"
            + (f" (nor have {unlisted[1:]})" if len(unlisted) > 1 else "")
            + ": list it under walls, inlets, outlets, periodic, or natural (do-nothing for "
            "u, zero flux for tau: an outlet's conditions)"
        )
    return BoundarySpec(
        walls=walls, inlets=inlets, outlets=outlets, periodic=tuple(periodic)
    )


def _listed_boundaries(table: Mapping[str, Any]) -> list[str]:
    """Every boundary name a boundaries table gives a role, once per mention."""
    names = [*table.get("walls", []), *table.get("outlets", []), *table.get("natural", [])]
    names += list(dict(table.get("inlets", {})))
    for pair in table.get("periodic", []):
        names += [pair["slave"], pair["master"]]
    return names


def inlet_profile(
    settings: Mapping[str, Any], tagged, facet_tag: int, *, where: str
) -> Callable[[np.ndarray], np.ndarray]:
    """An inlet velocity profile ``f(x: (3, M)) -> (d, M)`` from its config table.

    ``parabolic``: a parabola across the inlet (zero at its ends) with the given mean velocity,
    directed into the domain along the inlet's normal (straight 2-D inlets). ``uniform``: a
    constant vector. ``expression``: one arithmetic expression of the coordinates per
    component (``x``, ``y``, ``z`` or ``x[0]``, ``x[1]``, ``x[2]``; ``pi``, ``e``, ``sin``,
    ``sqrt`` ...), parsed by :func:`vcnn.expressions.compile_expression`, never evaluated as
    Python code.
    """
    settings = dict(settings)
    kind = settings.get("profile", "parabolic")
    dim = tagged.mesh.geometry.dim
    if kind == "uniform":
        check_keys(settings, {"profile", "velocity"}, where)
        velocity = np.asarray(settings["velocity"], dtype=np.float64)
        if velocity.shape != (dim,):
            raise ConfigError(f"{where}: velocity must have {dim} components")
        return lambda x: np.tile(velocity[:, None], (1, x.shape[1]))
    if kind == "expression":
        check_keys(settings, {"profile", "components"}, where)
        components = list(settings["components"])
        if len(components) != dim:
            raise ConfigError(f"{where}: expression needs {dim} components")
        try:
            functions = [compile_expression(c, where=where) for c in components]
        except ExpressionError as error:
            raise ConfigError(str(error)) from error

        def evaluate(x: np.ndarray) -> np.ndarray:
            return np.asarray([function(x) for function in functions], dtype=np.float64)

        return evaluate
    if kind != "parabolic":
        raise ConfigError(f"{where}: profile must be parabolic, uniform or expression")
    check_keys(settings, {"profile", "mean_velocity"}, where)
    if dim != 2:
        raise ConfigError(f"{where}: the parabolic profile is for 2-D inlets; use expression")
    mean = float(settings.get("mean_velocity", 1.0))
    start, end, inward = _inlet_geometry(tagged, facet_tag)
    length = float(np.linalg.norm(end - start))
    direction = (end - start) / length

    def parabola(x: np.ndarray) -> np.ndarray:
        s = np.clip((x[:2].T - start) @ direction / length, 0.0, 1.0)
        return (6.0 * mean * s * (1.0 - s))[None, :] * inward[:, None]

    return parabola


def _inlet_geometry(tagged, facet_tag: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """End points of a straight 2-D inlet and its inward unit normal (all ranks agree)."""
    mesh = tagged.mesh
    fdim = mesh.topology.dim - 1
    mesh.topology.create_connectivity(fdim, 0)
    facets = tagged.facet_tags.find(facet_tag)
    from dolfinx.mesh import entities_to_geometry

    nodes = entities_to_geometry(mesh, fdim, facets).reshape(-1)
    local = mesh.geometry.x[nodes, :2]
    points = np.concatenate(mesh.comm.allgather(local))
    if points.shape[0] == 0:
        raise ConfigError(f"inlet tag {facet_tag} has no facets")
    centre = points.mean(axis=0)
    _, _, axes = np.linalg.svd(points - centre)
    direction = axes[0]
    s = (points - centre) @ direction
    start, end = centre + s.min() * direction, centre + s.max() * direction
    normal = np.array([-direction[1], direction[0]])
    cells = mesh.geometry.x[:, :2]
    inside = np.concatenate(mesh.comm.allgather(cells.mean(axis=0, keepdims=True))).mean(axis=0)
    if (inside - centre) @ normal < 0:
        normal = -normal
    return start, end, normal


def write_xdmf(path: Path, mesh, functions: Mapping[str, Any]) -> None:
    """Mesh and named fields in one XDMF file for ParaView (fields interpolated to P1).

    Atomic, as a pair (collective over ``mesh.comm``): dolfinx writes ``<name>.xdmf`` and the
    ``<name>.h5`` it names, so both are written under their final names into a private
    temporary folder beside them (``.<name>.*.xdmf-tmp``, made by rank 0, written by every
    rank), checked (the .xdmf must reference ``<name>.h5``), flushed to disk, and renamed into
    place by rank 0, the .h5 first. After the call the folder holds the new pair, or (on a
    failure before the renames) what it held before, or (a failure between the two renames)
    neither; never a partial .h5 and never the temporary folder. HDF5's own error stack is
    kept off the terminal (it is logged at debug level).

    Args:
        path: the ``.xdmf`` file to write.
        mesh: the dolfinx mesh.
        functions: field name -> dolfinx Function.

    Raises:
        OSError: ENOSPC/EDQUOT naming ``path`` when the disk (or quota) is full.
    """
    from dolfinx import fem, io

    comm = mesh.comm
    outputs = []
    for name, function in functions.items():
        shape = function.function_space.value_shape
        space = fem.functionspace(mesh, ("Lagrange", 1, shape))
        p1 = fem.Function(space, name=name)
        p1.interpolate(function)
        outputs.append(p1)
    h5 = path.with_suffix(".h5")

    def make_folder() -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return tempfile.mkdtemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".xdmf-tmp")
        except OSError as error:
            full = disk_full_error(error, path)
            if full is None:
                raise
            raise full from error

    folder = Path(on_root(comm, make_folder, share_result=True))
    staged, staged_h5 = folder / path.name, folder / h5.name
    try:
        failure: Exception | None = None
        with _captured_stderr() as captured:
            try:
                with io.XDMFFile(comm, str(staged), "w") as stream:
                    stream.write_mesh(mesh)
                    for function in outputs:
                        stream.write_function(function)
            except Exception as error:  # decided together below: every rank raises or none
                failure = error
        full = disk_full_error(failure, path) if failure is not None else None
        if comm.allreduce(full is not None, op=MPI.LOR):
            if comm.rank == 0:
                logger.debug("HDF5 reported:\n%s", captured.text())
            raise full or OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        if comm.allreduce(failure is not None, op=MPI.LOR):
            if comm.rank == 0:
                logger.debug("HDF5 reported:\n%s", captured.text())
            raise failure or RuntimeError(f"writing {str(path)!r} failed on another rank")
        captured.replay()

        def publish() -> None:
            text = staged.read_text(encoding="utf-8")
            if f">{h5.name}:/" not in text or not staged_h5.is_file():
                raise RuntimeError(f"the XDMF file {str(staged)!r} does not reference {h5.name}")
            try:
                for written in (staged_h5, staged):
                    descriptor = os.open(written, os.O_RDONLY)
                    try:
                        os.fsync(descriptor)
                    finally:
                        os.close(descriptor)
            except OSError as error:
                full = disk_full_error(error, path)
                if full is None:
                    raise
                raise full from error
            os.replace(staged_h5, h5)
            try:
                os.replace(staged, path)
            except BaseException:
                try:  # finish the pair (an interrupt between the renames) ...
                    os.replace(staged, path)
                except OSError:  # ... or take the new .h5 away with the .xdmf it would break
                    h5.unlink(missing_ok=True)
                    path.unlink(missing_ok=True)
                raise

        on_root(comm, publish)
    finally:
        if comm.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)


class _CapturedStderr:
    """What was written to file descriptor 2 while it was captured (see below)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def text(self) -> str:
        if self.stream is None:
            return ""
        self.stream.seek(0)
        return self.stream.read().decode(errors="replace")

    def replay(self) -> None:
        """Write what was captured to stderr (a successful write's warnings stay visible)."""
        text = self.text()
        if text:
            sys.stderr.write(text)
        if self.stream is not None:
            self.stream.close()


@contextlib.contextmanager
def _captured_stderr() -> Iterator[_CapturedStderr]:
    """Send file descriptor 2 to a temporary file (HDF5 prints dozens of lines per error)."""
    try:
        stream = tempfile.TemporaryFile()
        saved = os.dup(2)
    except OSError:  # no room for it: let HDF5 print
        yield _CapturedStderr(None)
        return
    sys.stderr.flush()
    os.dup2(stream.fileno(), 2)
    try:
        yield _CapturedStderr(stream)
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _num_cells(mesh) -> int:
    index_map = mesh.topology.index_map(mesh.topology.dim)
    return int(index_map.size_global)


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the results (recorded in every case)."""
    from importlib import metadata

    versions = {}
    for package in ("vcnn-closures", "dolfinx-solver-real", "numpy", "scipy", "gmsh", "torch"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions
