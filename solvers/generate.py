"""Dataset generation: mesh -> flow -> derived fields -> tau -> case files, XDMF and figures.

:func:`run_generate` is what ``vcnn generate`` runs. For each case (one per hill slope factor
alpha, or one per user mesh of a family, see :mod:`solvers.case_setup`) it solves the flow
(or, with ``flow_from``, takes it from another code: :mod:`solvers.flow_import`) and the
closure transport, gathers the nodal data at the P1 points on rank 0 and writes the case file
of docs/design.md atomically, an XDMF file of mesh and fields for ParaView and a PNG. A case
that fails is reported and skipped; complete cases are not recomputed unless ``overwrite`` is
set. The output folder keeps a record of every run (:mod:`solvers.run_folder`).
"""

from __future__ import annotations

from mpi4py import MPI

import logging
import math
import time
import traceback
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from solvers.boundaries import BoundarySpec
from solvers.case_setup import (
    BOUNDARY_ROLES,
    MESH_KINDS,
    CaseJob,
    MeshConfig,
    boundary_spec,
    build_mesh,
    case_config,
    case_jobs,
    case_meshes,
    check_boundaries_table,
    check_case_name,
    check_config_flow_source,
    check_hill_dimension,
    hill_case_name,
    inlet_profile,
    package_versions,
)
from solvers.collective import on_root
from solvers.flow_sources import MIN_SAMPLES_PER_MESH_POINT
from solvers.linalg import case_failure_message
from solvers.preflight import (
    check_alphas,
    check_case_size,
    check_existing_case,
    check_mesh_size,
    machine_memory,
)
from solvers.run_folder import (
    CaseProgress,
    append_summary,
    check_run_folder,
    locked_run,
    run_stamp,
)
from solvers.xdmf import write_xdmf
from vcnn.casefile import write_case
from vcnn.config import (
    RENAMED_KEYS,
    ConfigError,
    check_keys,
    check_types,
    merge,
    renamed_keys,
)
from vcnn.inputs import check_regular_input
from vcnn.physics import PRODUCTION_MODES, Physics
from vcnn.undershoot import tau_undershoot

logger = logging.getLogger(__name__)

#: Names that moved to :mod:`solvers.case_setup` and :mod:`solvers.xdmf`, still importable
#: from here.
__all__ = [
    "BOUNDARY_ROLES",
    "MESH_KINDS",
    "CaseReport",
    "GenerateConfig",
    "GenerateSummary",
    "MeshConfig",
    "boundary_spec",
    "build_mesh",
    "case_jobs",
    "case_meshes",
    "check_boundaries_table",
    "check_case_name",
    "check_config_flow_source",
    "generate_case",
    "hill_case_name",
    "inlet_profile",
    "package_versions",
    "run_generate",
    "write_xdmf",
]


#: The ``[generate.physics]`` table: the constants of :class:`vcnn.physics.Physics` except the
#: production mode and C_k, which are top-level keys (and flags) of ``[generate]``.
PHYSICS_TABLE_KEYS = frozenset(
    name for name in Physics.__dataclass_fields__ if name not in ("production", "c_k")
)


@dataclass
class GenerateConfig:
    """Configuration of ``vcnn generate`` (the ``[generate]`` table of a TOML file).

    Attributes:
        alphas: hill slope factors, one case each (ignored for file meshes).
        dim: 2, or 3 for the 3-D hills of :mod:`meshes.hills3d` (periodic across a span of
            4.5 hill heights; structured hexahedra, or tetrahedra with ``mesh.kind =
            "unstructured"``): one case per slope factor and crest amplitude.
        crest_amplitudes: 3-D only: crest amplitudes a in [0, 0.3] of the crest height
            ``h(z) = 1 + a cos(2 pi z / L_z)`` (0: the 2-D hill extruded); default [0].
        out: folder of the case files, figures, XDMF and summary (formerly ``output``).
        production: ``frozen`` (fixed source, the published data) or ``coupled`` (tau_P = tau).
        c_k: eddy-viscosity coefficient; > 0 couples nu_t = C_k l_m sqrt(tau) into the flow.
        overwrite: recompute cases whose case file exists.
        plots: write a PNG per case.
        xdmf: write an XDMF file of mesh and fields per case.
        name: case name for a single file mesh (default: the file's stem); the cases of a
            family (``mesh.files``, script parameters) are named by their files' stems and
            parameter values, e.g. ``bump_bump_height0.2``.
        mesh: see :class:`solvers.case_setup.MeshConfig`.
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
    dim: int = 2
    crest_amplitudes: list[float] | None = None
    out: str = "data/hills"
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
        self.out = str(self.out)
        if self.name is not None:
            check_case_name(self.name, where="[generate] name")
        self._check_dimension()
        if self.mesh.kind != "file":
            check_alphas(self.alphas)
            lists = (("alphas", self.alphas), ("crest_amplitudes", self.crest_amplitudes))
            for key, values in lists:
                names: dict[str, float] = {}
                for value in values or []:
                    name = hill_case_name(value)
                    if name in names:
                        raise ConfigError(
                            f"{key} lists {value:g} twice: give each one once"
                            if names[name] == value
                            else f"{key} {names[name]!r} and {value!r} both give the case {name!r}"
                        )
                    names[name] = value
        elif not self.boundaries:
            raise ConfigError("a file mesh needs a [generate.boundaries] table naming its walls")
        else:
            check_boundaries_table(self.boundaries)

    def _check_dimension(self) -> None:
        """Refuse 3-D settings in 2-D, and in 3-D what does not work there yet."""
        self.crest_amplitudes = check_hill_dimension(self.dim, self.crest_amplitudes, self.mesh)

    @classmethod
    def from_dict(
        cls, values: Mapping[str, Any], *, overrides: Mapping[str, Any] | None = None
    ) -> GenerateConfig:
        """Build from a ``[generate]`` table, with flag ``overrides`` (None = not given)."""
        values = renamed_keys(values, RENAMED_KEYS, "[generate]")
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

    @property
    def output(self) -> str:
        """The output folder: ``out`` under its former name (for existing callers)."""
        return self.out

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


def run_generate(config: GenerateConfig, *, comm: MPI.Comm = MPI.COMM_WORLD) -> GenerateSummary:
    """Solve every case of ``config`` and write its outputs (collective over ``comm``).

    Everything that can be checked is checked before anything is written: the output folder,
    the size of each hill mesh, the settings of existing case files (a complete case is skipped
    only when it matches this run), and for file meshes their boundary names. Where rank 0
    alone does I/O, its errors are raised on every rank (:func:`solvers.collective.on_root`).
    The folder keeps a record of every run (:mod:`solvers.run_folder`).

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
    output = Path(config.out)
    check_owner = check_run_folder(output, verb="generate", overwrite=config.overwrite, comm=comm)
    jobs = case_jobs(config)
    memory = machine_memory(comm) if config.mesh.kind != "file" else 0
    processes = comm.size

    def check_sizes() -> None:
        for job in jobs:
            if job.alpha is not None:
                check_case_size(
                    config.mesh,
                    job.alpha,
                    processes=processes,
                    memory=memory,
                    crest_amplitude=job.crest_amplitude,
                )

    on_root(comm, check_sizes)

    def inspect_existing() -> dict[str, str]:
        state = {}
        for job in jobs:
            target = output / f"{job.name}.npz"
            if not target.exists():
                state[job.name] = "missing"
            elif config.overwrite:
                state[job.name] = "overwrite"
            else:
                check_existing_case(target, case_config(config, job), job.alpha)
                state[job.name] = "complete"
        return state

    state = on_root(comm, inspect_existing, share_result=True) or {}
    prepared = _prepare_file_meshes(config, jobs, state, comm=comm)
    _check_inputs(config, jobs, state, prepared, comm=comm)
    # after the checks: a refused run reports its one error line and nothing else
    if config.dim == 3 and config.physics.supg_length == "diameter" and comm.rank == 0:
        logger.warning(
            "3-D with supg_length = 'diameter': the SUPG length then counts the cells' size "
            "across the flow (the span), which over-stabilises tau and lets it dip below zero "
            "on steep hills; set [generate.physics] supg_length = 'flow' (docs/physics.md)"
        )
    stamp = comm.bcast(run_stamp() if comm.rank == 0 else None, root=0)
    # The first write: the folder is locked for the run (and checked again under the lock).
    with locked_run(
        output,
        verb="generate",
        resolved=config.to_dict(),
        check_owner=check_owner,
        stamp=stamp,
        comm=comm,
    ):
        return _generate_cases(config, jobs, state, prepared, stamp=stamp, comm=comm)


def _prepare_file_meshes(
    config: GenerateConfig, jobs: list[CaseJob], state: Mapping[str, str], *, comm: MPI.Comm
) -> dict[str, tuple[Any, BoundarySpec]]:
    """Read (or mesh) every user mesh still to solve on, before anything is written.

    So that a boundary the mesh lacks, or a mesh too large, is refused up front. One mesh is
    kept for its case; a family's meshes are checked one at a time and built again for their
    cases, so that they are not all held in memory at once.

    Returns:
        (TaggedMesh, BoundarySpec) by case name, of the meshes kept.

    Raises:
        ConfigError: a boundary without a role or not in a mesh; a mesh too large.
    """
    to_solve = [job for job in jobs if job.alpha is None and state.get(job.name) != "complete"]
    prepared = {}
    for job in to_solve:
        tagged = build_mesh(job.mesh, None, comm=comm)
        spec = boundary_spec(case_config(config, job), tagged)
        info, memory, processes = tagged.info, machine_memory(comm), comm.size
        on_root(comm, lambda: check_mesh_size(info, processes=processes, memory=memory))
        if len(to_solve) == 1:
            prepared[job.name] = (tagged, spec)
    return prepared


def _check_inputs(
    config: GenerateConfig,
    jobs: list[CaseJob],
    state: Mapping[str, str],
    prepared: Mapping[str, tuple[Any, BoundarySpec]],
    *,
    comm: MPI.Comm,
) -> None:
    """Check the inputs that need a mesh, before anything is written (collective).

    A flow source is read and measured against the mesh of every case still to compute (built
    here unless ``prepared``), as :func:`solvers.flow_import.import_flow` will measure it.

    Raises:
        FlowSourceError: the source is unreadable, malformed, never solved, too sparse or does
            not fit a mesh.
    """
    to_compute = [job for job in jobs if state.get(job.name) != "complete"]
    check_config_flow_source(config, to_compute, prepared=prepared, comm=comm)


def _generate_cases(
    config: GenerateConfig,
    jobs: list[CaseJob],
    state: Mapping[str, str],
    prepared: Mapping[str, tuple[Any, BoundarySpec]],
    *,
    stamp: str,
    comm: MPI.Comm,
) -> GenerateSummary:
    """The cases of :func:`run_generate` once it has checked everything (collective)."""
    output = Path(config.out)
    reports = []
    with CaseProgress(len(jobs), verb="generate", comm=comm) as progress:
        for number, job in enumerate(jobs, start=1):
            name, alpha = job.name, job.alpha
            target = output / f"{name}.npz"
            prefix = f"[{number}/{len(jobs)}] {name}"
            progress.start(name)
            if state.get(name) == "complete":
                if comm.rank == 0:
                    logger.info("%s: complete, skipped (use --overwrite to recompute)", prefix)
                on_root(
                    comm,
                    lambda target=target, prefix=prefix: _missing_figure(config, target, prefix),
                )
                reports.append(CaseReport(name, alpha, "skipped"))
                progress.done()
                continue
            start = time.perf_counter()
            try:
                report = generate_case(
                    case_config(config, job),
                    name,
                    alpha,
                    comm=comm,
                    log_prefix=prefix,
                    prepared=prepared.get(name),
                    crest_amplitude=job.crest_amplitude,
                )
            except ConfigError:
                raise  # a config error fails every case: stop, with the one message
            except Exception as error:  # one failed case must not lose the others
                message = case_failure_message(error, name)
                if comm.rank == 0:
                    logger.error("%s: FAILED: %s", prefix, message)
                    logger.debug("%s", traceback.format_exc())
                report = CaseReport(name, alpha, "failed", error=message)
            report.wall_time = time.perf_counter() - start
            reports.append(report)
            progress.done()
    summary = GenerateSummary(reports, output)

    def write_summary() -> None:
        append_summary(output, summary.table(), verb="generate", stamp=stamp)
        # the table is the command's output: `vcnn generate` prints it (vcnn.cli)

    on_root(comm, write_summary)
    return summary


def _missing_figure(config: GenerateConfig, target: Path, prefix: str) -> None:
    """Draw the PNG of a complete case when it is missing (e.g. lost to an interrupt)."""
    figure = target.with_suffix(".png")
    if not config.plots or figure.exists():
        return
    from vcnn.casefile import read_case
    from vcnn.plotting.cases import plot_case

    case = read_case(target)
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
    crest_amplitude: float | None = None,
) -> CaseReport:
    """Solve one case and write its case file (and XDMF, PNG); collective over ``comm``.

    ``prepared`` is the (TaggedMesh, BoundarySpec) of the case when the caller built them.
    ``crest_amplitude`` makes a hill case the 3-D hill of that crest amplitude (None: 2-D).
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
        tagged = build_mesh(config.mesh, alpha, comm=comm, crest_amplitude=crest_amplitude)
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
        undershoot = tau_undershoot(result.tau, comm=comm)
        if undershoot.significant and comm.rank == 0:
            logger.warning("%s: %s", log_prefix, undershoot.describe())

        reversal = flow_reversal_meta(flow.u, problem, alpha)
        flow_statistics = {}  # an imported flow has no solver statistics; its source is in meta
        if not imported:
            flow_statistics = {
                "flow_newton_iterations": flow.newton_iterations,
                "flow_residuals": list(flow.residual_history),
                # viscosities of the continuation stages of the solve from rest ([]: none ran)
                "flow_continuation": list(problem.flow_solver.continuation),
            }
        meta = {
            "case": name,
            "alpha": alpha,
            **({} if crest_amplitude is None else {"crest_amplitude": crest_amplitude}),
            "mesh": {**tagged.info, "kind": tagged.kind, "num_cells": _num_cells(problem.mesh)},
            "physics": physics.to_dict(),
            **physics.flat_case_meta(),
            "U_b": physics.bulk_velocity if spec.body_force_driven and not imported else None,
            "bulk_velocity_measured": flow.bulk_velocity,
            "body_force": None if imported else flow.body_force,
            "flow_source": flow.to_meta() if imported else None,
            "tau_integral": tau_integral,
            "tau_undershoot": undershoot.to_meta(),
            **reversal,
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
        output = Path(config.out)
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
        if config.plots:
            from vcnn.plotting.cases import plot_case

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


def flow_reversal_meta(velocity, problem, alpha: float | None) -> dict[str, Any]:
    """Separation and reattachment for a case's meta (collective; 2-D; None in 3-D).

    A hill's along its bottom wall (abscissas x); a user mesh's along every named wall
    (:func:`solvers.diagnostics.wall_flow_reversal`): their x and their points.

    Returns:
        ``separation_x`` and ``reattachment_x`` (lists of x), and for a user mesh
        ``separation_points`` and ``reattachment_points`` (lists of [x, y]).
    """
    from solvers.diagnostics import hill_flow_reversal, wall_flow_reversal

    if problem.mesh.geometry.dim != 2:
        return {"separation_x": None, "reattachment_x": None}
    if alpha is not None:
        hill = hill_flow_reversal(velocity, alpha)
        return {
            "separation_x": hill.separation.tolist(),
            "reattachment_x": hill.reattachment.tolist(),
        }
    walls = wall_flow_reversal(velocity, problem.facet_tags, problem.spec.walls)
    separation = np.concatenate([w.separation for w in walls] or [np.zeros((0, 2))])
    reattachment = np.concatenate([w.reattachment for w in walls] or [np.zeros((0, 2))])
    return {
        "separation_x": separation[:, 0].tolist(),
        "reattachment_x": reattachment[:, 0].tolist(),
        "separation_points": separation.tolist(),
        "reattachment_points": reattachment.tolist(),
    }


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


def _num_cells(mesh) -> int:
    index_map = mesh.topology.index_map(mesh.topology.dim)
    return int(index_map.size_global)


