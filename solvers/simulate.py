"""``vcnn simulate``: a closure in the loop of the flow solver, against the PDE truth.

For each case (a hill slope factor, or the user's mesh) :func:`run_simulate` builds one
:class:`solvers.problem.ClosureProblem` and runs on it

- one-way: the flow once, then tau from the closure (and from the tau PDE with ``compare``);
- two-way: the closure's tau feeds nu_t = C_k l_m sqrt(max(tau, 0)) back into the momentum
  equation, to a fixed point (:func:`solvers.closure_loop.solve_two_way`); with ``compare``
  the fully coupled PDE solution through the same loop code first (the truth), the network on
  the truth's flow (the a-priori error), then the network in the loop (the a-posteriori
  error). Each run starts from rest: none inherits another's flow.

The closure is a trained network (``model``: a checkpoint for ``vcnn.load_closure``, or an
object with the same contract passed to :func:`run_simulate`) or the tau PDE itself
(``closure = "pde"``). The physics defaults to what the network records; asking for other
constants is refused unless ``allow_physics_mismatch``.

Outputs in ``out``: per case a case file (the closure's tau and the flow; the truth's
fields under ``tau_truth``, ``velocity_truth``, ``strain_rate_truth``, ``nu_t_truth`` and the
a-priori prediction under ``tau_a_priori``), an XDMF file (P1 nodal fields ``velocity``,
``pressure``, ``tau``, ``nu_t``; with ``compare`` also ``velocity_truth``, ``pressure_truth``,
``tau_truth``, ``nu_t_truth``, ``tau_a_priori`` and the signed differences ``tau_minus_truth``
and ``tau_a_priori_minus_truth``; read it with :func:`meshes.io.read_xdmf_fields` or ParaView),
a PNG (closure against truth), and for a run that failed the last state under ``failed/``;
``metrics.json`` (one entry per case, see :data:`solvers.simulate_metrics.METRIC_KEYS`),
``summary.md`` and the resolved ``config.toml``.
"""

from __future__ import annotations

from mpi4py import MPI

import json
import logging
import math
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from solvers.case_setup import (
    CaseJob,
    MeshConfig,
    boundary_spec,
    build_mesh,
    case_config,
    case_jobs,
    check_boundaries_table,
    check_case_name,
    check_config_flow_source,
    check_hill_dimension,
    package_versions,
)
from solvers.collective import on_root
from solvers.flow_sources import MIN_SAMPLES_PER_MESH_POINT
from solvers.linalg import case_failure_message, is_interrupt
from solvers.preflight import check_alphas, check_case_size, check_mesh_size, machine_memory
from solvers.run_folder import (
    CaseProgress,
    append_summary,
    check_run_folder,
    locked_run,
    run_stamp,
)
from solvers.simulate_metrics import (
    METRIC_KEYS,
    periodic_distance,
    relative_error,
    relative_l2_percent,
    summary_table,
)
from solvers.xdmf import write_xdmf
from vcnn.atomic import atomic_write_text
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
from vcnn.outputs import is_disk_full
from vcnn.physics import PRODUCTION_MODES, Physics, Range, check_constant

if TYPE_CHECKING:
    from solvers.closure_loop import LoopResult
    from solvers.closures import SimulationPhysics
    from solvers.problem import ClosureProblem

logger = logging.getLogger(__name__)

__all__ = [
    "CLOSURES",
    "COUPLINGS",
    "SHARED_CASE_KEYS",
    "SimulateConfig",
    "SimulateSummary",
    "run_simulate",
    "simulate_table",
]

COUPLINGS = ("one-way", "two-way")
CLOSURES = ("network", "pde")
DEVICES = ("auto", "cpu", "cuda")

#: The ``[simulate.physics]`` table: constants of :class:`vcnn.physics.Physics` (except the
#: production mode and C_k, top-level keys and flags) and the network's cloud threshold eps.
PHYSICS_TABLE_KEYS = frozenset(
    {name for name in Physics.__dataclass_fields__ if name not in ("production", "c_k")} | {"eps"}
)

#: Allowed values of the numbers of ``[simulate]``: a :class:`vcnn.physics.Range` of a real
#: number (finite), or the (lowest, highest) integer. The physical constants' ranges are
#: :data:`vcnn.physics.CONSTANT_RANGES`.
NUMBER_RANGES: dict[str, Range | tuple[int, int]] = {
    "relaxation": Range(0.0, 1.0, high_closed=True),
    "tol": Range(0.0, 1.0),
    "negative_tau_tolerance": Range(0.0, 1.0, low_closed=True),
    "max_iterations": (1, 10_000),
    "history_size": (1, 100),
    "flow_min_samples_per_point": Range(0.0, 1.0, high_closed=True),
}


def _checked(check: Callable[..., float], *args: Any, **options: Any) -> float:
    """``check(*args, **options)`` with its ValueError raised as a ConfigError."""
    try:
        return check(*args, **options)
    except ValueError as error:
        raise ConfigError(str(error)) from None


@dataclass
class SimulateConfig:
    """Configuration of ``vcnn simulate`` (the ``[simulate]`` table of a TOML file).

    Attributes:
        alphas: hill slope factors in [0.1, 20], one case each (ignored for a file mesh).
        dim: 2, or 3 for the 3-D hills of :mod:`meshes.hills3d` (periodic in x and z).
        crest_amplitudes: 3-D only: crest amplitudes a in [0, 0.3] of the crest height
            h(z) = 1 + a cos(2 pi z / L_z) (default ``[0.0]``, the extruded hill); one case per
            slope factor and crest amplitude.
        out: folder of the outputs (formerly ``output``).
        model: checkpoint of the network closure (``closure = "network"``).
        closure: ``network`` (a trained model) or ``pde`` (the tau PDE in the loop, no model).
        coupling: ``one-way`` (flow fixed) or ``two-way`` (nu_t from tau).
        compare: also solve the PDE truth and report the errors against it.
        production: tau production mode (default: the closure's; ``frozen`` for ``pde``).
        c_k: eddy-viscosity coefficient, finite and >= 0 (default: the closure's; required
            > 0 two-way).
        outer: outer iteration of a two-way run: ``anderson``, ``ngmres`` or ``picard``.
        relaxation: omega in (0, 1] of relaxed Picard (``picard`` and the fallback of the
            others).
        tol: in (0, 1): converged when the relative changes of tau and velocity are below it.
        max_iterations: closure evaluations (flow solves) at most per run, an integer from 1
            to 10000.
        history_size: past iterates mixed by ``anderson`` and ``ngmres``, an integer from 1 to
            100 (they hold 2 x history_size vectors of the unknowns, counted in the size check).
        negative_tau_tolerance: in [0, 1): a network's tau below ``-tolerance * max(tau)``
            where it feeds nu_t stops a two-way run.
        allow_physics_mismatch: run although the requested physics differs from the
            network's record.
        overwrite: write into an output folder that holds another verb's outputs (generated
            cases, a training run, evaluate's metrics); same-named files there are replaced.
        device: inference device, ``auto``, ``cpu`` or ``cuda``.
        clouds: the network's clouds: ``full``, ``quadrature`` (a bounded number of
            weighted points per cloud, :mod:`vcnn.cloud_quadrature`) or ``auto`` (the
            quadrature where a case's full clouds would hold more than 400 points on average,
            3,000 in 3-D, decided once per case from the first flow; CPU).
        plots: write a PNG per case.
        xdmf: write an XDMF file per case.
        name: case name for a file mesh (default: the file's stem).
        mesh: see :class:`solvers.case_setup.MeshConfig`.
        physics: constants the user sets (names of :class:`vcnn.physics.Physics` and
            ``eps``); the rest come from the closure's record (or the defaults for ``pde``).
            Each within :data:`vcnn.physics.CONSTANT_RANGES`: positive and finite, ``eps``
            in (0, 1).
        boundaries: file mesh only: boundary roles, as in ``[generate.boundaries]``.
        flow_from: one-way only: take the fixed flow from this source instead of solving it
            (a case file, a meshio file or an OpenFOAM case, see :mod:`solvers.flow_import`).
        flow_time: OpenFOAM source: ``"latest"`` or a time directory.
        flow_field: name of the velocity field of the source (default ``U``, then
            ``velocity``).
        flow_min_samples_per_point: fewest samples of the flow source per point of the mesh,
            in (0, 1] (0.1: one per ten; a sparser source is refused as subsampled or
            cropped; lower it for a deliberately coarser source).
    """

    alphas: list[float] = field(default_factory=lambda: [1.0])
    dim: int = 2
    crest_amplitudes: list[float] | None = None
    out: str = "results/simulate"
    model: str | None = None
    closure: str = "network"
    coupling: str = "two-way"
    compare: bool = False
    production: str | None = None
    c_k: float | None = None
    outer: str = "anderson"
    relaxation: float = 0.7
    tol: float = 1e-6
    max_iterations: int = 40
    history_size: int = 10
    negative_tau_tolerance: float = 0.05
    allow_physics_mismatch: bool = False
    overwrite: bool = False
    device: str = "auto"
    clouds: str = "auto"
    plots: bool = True
    xdmf: bool = True
    name: str | None = None
    mesh: MeshConfig = field(default_factory=MeshConfig)
    physics: dict[str, float] = field(default_factory=dict)
    boundaries: dict[str, Any] = field(default_factory=dict)
    flow_from: str | None = None
    flow_time: str | float = "latest"
    flow_field: str | None = None
    flow_min_samples_per_point: float = MIN_SAMPLES_PER_MESH_POINT

    def __post_init__(self) -> None:
        from solvers.closure_loop import OUTER_METHODS

        choices = {
            "closure": CLOSURES,
            "coupling": COUPLINGS,
            "outer": OUTER_METHODS,
            "device": DEVICES,
            "clouds": ("auto", "quadrature", "full"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.production is not None and self.production not in PRODUCTION_MODES:
            raise ConfigError(
                f"production must be one of {PRODUCTION_MODES}, got {self.production!r}"
            )
        if self.c_k is not None:
            self.c_k = _checked(check_constant, "c_k", self.c_k, where="[simulate] ")
        if self.closure == "network" and not self.model:
            raise ConfigError(
                "a network closure needs a model (--model best.pt); or run --closure pde"
            )
        if self.closure == "pde" and self.compare:
            raise ConfigError(
                "--compare solves the PDE truth beside a network; with --closure pde the "
                "run is the truth: leave --compare out"
            )
        for name, allowed in NUMBER_RANGES.items():
            value = getattr(self, name)
            if isinstance(allowed, Range):
                ok = isinstance(value, int | float) and not isinstance(value, bool)
                if not (ok and float(value) in allowed):
                    raise ConfigError(
                        f"[simulate] {name} must be a finite number in {allowed}, got {value!r}"
                    )
            elif not (
                isinstance(value, int)
                and not isinstance(value, bool)
                and allowed[0] <= value <= allowed[1]
            ):
                raise ConfigError(
                    f"[simulate] {name} must be an integer from {allowed[0]} to {allowed[1]}, "
                    f"got {value!r}"
                )
        self.alphas = [float(a) for a in self.alphas]
        self.crest_amplitudes = check_hill_dimension(self.dim, self.crest_amplitudes, self.mesh)
        if self.mesh.kind != "file":
            check_alphas(self.alphas)
        elif not self.boundaries:
            raise ConfigError("a file mesh needs a [simulate.boundaries] table naming its walls")
        else:
            check_boundaries_table(self.boundaries)
        if self.name is not None:
            check_case_name(self.name, where="[simulate] name")
        check_keys(self.physics, set(PHYSICS_TABLE_KEYS), "[simulate.physics]")
        self.physics = {
            name: _checked(check_constant, name, value, where="[simulate.physics] ")
            for name, value in self.physics.items()
        }
        self.flow_time = str(self.flow_time)
        if self.flow_from is not None:
            self.flow_from = str(self.flow_from)
            check_regular_input(
                self.flow_from,
                what="flow source",
                flag="--flow-from / [simulate] flow_from",
                allow_dir=True,
                error=ConfigError,
            )
            if self.coupling != "one-way":
                raise ConfigError(
                    "flow_from fixes the flow, so tau cannot feed it back: use --coupling one-way"
                )

    @classmethod
    def from_dict(
        cls, values: Mapping[str, Any], *, overrides: Mapping[str, Any] | None = None
    ) -> SimulateConfig:
        """Build from a ``[simulate]`` table, with flag ``overrides`` (None = not given)."""
        values = renamed_keys(values, RENAMED_KEYS, "[simulate]")
        values = merge(values, overrides or {})
        check_keys(values, set(cls.__dataclass_fields__), "[simulate]")
        check_types(values, cls, "[simulate]")
        mesh = dict(values.pop("mesh", {}))
        check_keys(mesh, set(MeshConfig.__dataclass_fields__), "[simulate.mesh]")
        check_types(mesh, MeshConfig, "[simulate.mesh]")
        for key in ("model", "out"):
            if values.get(key) is not None:
                values[key] = str(values[key])
        if mesh.get("file") is not None:
            mesh["file"] = str(mesh["file"])
        return cls(**values, mesh=MeshConfig(**mesh))

    @property
    def output(self) -> str:
        """The output folder: ``out`` under its former name (for existing callers)."""
        return self.out

    def to_dict(self) -> dict[str, Any]:
        """Plain TOML-friendly dictionary (the resolved config)."""
        return asdict(self)

    def requested_physics(self) -> dict[str, Any]:
        """The constants the user set (physics table, production, C_k)."""
        requested = dict(self.physics)
        if self.production is not None:
            requested["production"] = self.production
        if self.c_k is not None:
            requested["c_k"] = self.c_k
        return requested


#: Keys of a ``[generate]`` table that say which cases to solve (alphas, meshes, boundary
#: roles): ``vcnn simulate --config`` of a generate config reads them from it.
SHARED_CASE_KEYS = ("alphas", "dim", "crest_amplitudes", "mesh", "boundaries", "name")


def simulate_table(document: Mapping[str, Any]) -> dict[str, Any]:
    """The ``[simulate]`` table of a config file, with the cases of its ``[generate]`` table.

    A file written for generate (its ``[generate]`` table, or a folder's resolved
    ``config.toml``) runs the same cases with ``vcnn simulate --config``: the keys of
    :data:`SHARED_CASE_KEYS` that ``[simulate]`` lacks come from ``[generate]``; generate's
    other keys (production, plots ...) are its own and are not read. A file with neither table
    is the ``[simulate]`` table itself.

    Raises:
        ConfigError: ``[simulate]`` or ``[generate]`` is not a table.
    """
    if "simulate" not in document and "generate" not in document:
        return dict(document)
    for name in ("simulate", "generate"):
        if not isinstance(document.get(name, {}), Mapping):
            raise ConfigError(f"[{name}] must be a table")
    table = dict(document.get("simulate", {}))
    generate = document.get("generate", {})
    taken = [key for key in SHARED_CASE_KEYS if key in generate and key not in table]
    for key in taken:
        table[key] = generate[key]
    if taken:
        logger.info("cases from [generate]: %s", ", ".join(taken))
    return table


@dataclass
class SimulateSummary:
    """The metrics of every case and where the outputs are."""

    entries: list[dict[str, Any]]
    output: Path

    @property
    def all_succeeded(self) -> bool:
        """True when every case ran to its end (converged two-way runs)."""
        return all(entry.get("error") is None and entry.get("converged") for entry in self.entries)

    def table(self) -> str:
        """The summary as a Markdown table."""
        return summary_table(self.entries)


class SimulationError(RuntimeError):
    """A case of a simulation failed; ``entry`` holds what is known (its metrics entry)."""

    def __init__(self, message: str, entry: dict[str, Any]) -> None:
        super().__init__(message)
        self.entry = entry


def run_simulate(
    config: SimulateConfig, *, comm: MPI.Comm = MPI.COMM_WORLD, model: Any = None
) -> SimulateSummary:
    """Run every case of ``config`` and write its outputs (collective over ``comm``).

    Args:
        config: the run's configuration.
        comm: the communicator of the solvers.
        model: a network closure object to use instead of loading ``config.model`` (rank 0;
            anything with ``.physics`` and ``.predict(case)``, see
            :class:`solvers.closures.ClosureModel`).

    Returns:
        The summary; failed cases are listed with their error, not raised.

    Raises:
        PhysicsMismatchError: the requested physics differs from the closure's record.
        ClosureError: the model cannot be loaded.
        ConfigError: an unusable configuration (e.g. two-way with C_k = 0).
        UsageError: the output folder cannot be written, holds another verb's outputs
            (without ``overwrite``), or is in use by another run (its lock is held).
        OSError: the disk (or quota) is full: ENOSPC/EDQUOT naming the file; the complete
            outputs written before (``metrics.json`` of an earlier run included) are kept.
    """
    from solvers.closures import load_network_closure, resolve_physics

    output = Path(config.out)
    # Everything that can be checked is checked before a model is loaded or a file written.
    check_owner = check_run_folder(output, verb="simulate", overwrite=config.overwrite, comm=comm)
    jobs = case_jobs(config, section="simulate")
    _validate_inputs(config, jobs, comm)
    closure_physics = None
    if config.closure == "network":
        # The model lives on rank 0: whether one was passed in is rank 0's to say.
        if comm.bcast(model is not None, root=0):
            record = dict(model.physics) if comm.rank == 0 else None
            closure_physics = comm.bcast(record, root=0)
        else:
            model, closure_physics = load_network_closure(config.model, comm, device=config.device)
    # A hill run's dimension is its config's; a file mesh's is checked per case.
    dimension = config.dim if config.mesh.kind != "file" else None
    resolved = resolve_physics(
        config.requested_physics(),
        closure_physics,
        dimension=dimension,
        coupling=config.coupling,
        allow_mismatch=config.allow_physics_mismatch,
    )
    if resolved.mismatches and comm.rank == 0:
        logger.warning(
            "running with physics that differs from the closure's record (allowed): %s",
            "; ".join(resolved.mismatches),
        )
    if config.coupling == "two-way" and not resolved.physics.c_k > 0:
        raise ConfigError(
            "two-way coupling needs C_k > 0"
            + (
                " and the closure records C_k = 0 (trained on one-way data): give --c-k "
                "with --allow-physics-mismatch to couple it anyway"
                if closure_physics is not None
                else ": give --c-k"
            )
        )
    resolved_config = config.to_dict()
    physics_values = resolved.physics.to_dict()
    resolved_config["production"] = physics_values.pop("production")
    resolved_config["c_k"] = physics_values.pop("c_k")
    if resolved.eps is not None:
        physics_values["eps"] = resolved.eps
    resolved_config["physics"] = physics_values
    stamp = comm.bcast(run_stamp() if comm.rank == 0 else None, root=0)
    # The first write: the folder is locked for the run (and checked again under the lock).
    with locked_run(
        output,
        verb="simulate",
        resolved=resolved_config,
        check_owner=check_owner,
        stamp=stamp,
        comm=comm,
    ):
        return _simulate_cases(
            config, jobs, resolved, closure_physics, model, stamp=stamp, comm=comm
        )


def _validate_inputs(config: SimulateConfig, jobs: list[CaseJob], comm: MPI.Comm) -> None:
    """Check what needs a mesh or a source, before a model is loaded or a file written.

    Collective. The size of each case must fit in memory (a hill's estimated from its
    settings, a file mesh's read from it; both with the two-way outer iteration's history of
    ``history_size`` iterates); a file mesh is read and its boundary roles resolved; a flow
    source is read and measured against the mesh of every case
    (:func:`solvers.flow_import.check_flow_source`), so that none of these fails a case after
    outputs are written.

    Raises:
        ConfigError: a case too large or too coarse, a boundary the mesh lacks.
        MeshError: the mesh file cannot be read.
        FlowSourceError: the source is unreadable, malformed, never solved, too sparse or does
            not fit a mesh.
    """
    two_way_history = config.coupling == "two-way" and config.outer != "picard"
    history = config.history_size if two_way_history else 0
    memory, processes = machine_memory(comm), comm.size
    prepared = {}
    if config.mesh.kind == "file":
        # Each user mesh is read (or meshed) and checked; one is kept for its case, a
        # family's are built again for theirs rather than all held in memory.
        for job in jobs:
            tagged = build_mesh(job.mesh, None, comm=comm)
            spec = boundary_spec(case_config(config, job), tagged)
            info = tagged.info
            on_root(
                comm,
                lambda: check_mesh_size(
                    info, processes=processes, memory=memory, history_size=history
                ),
            )
            if len(jobs) == 1:
                prepared[job.name] = (tagged, spec)
    else:

        def check_sizes() -> None:
            for job in jobs:
                check_case_size(
                    config.mesh,
                    job.alpha,
                    processes=processes,
                    memory=memory,
                    history_size=history,
                    crest_amplitude=job.crest_amplitude,
                )

        on_root(comm, check_sizes)
    check_config_flow_source(config, jobs, prepared=prepared, comm=comm)


def _simulate_cases(
    config: SimulateConfig,
    jobs: list[CaseJob],
    resolved: SimulationPhysics,
    closure_physics: Mapping[str, Any] | None,
    model: Any,
    *,
    stamp: str,
    comm: MPI.Comm,
) -> SimulateSummary:
    """The cases of :func:`run_simulate` once it has checked everything, and the summary."""
    output = Path(config.out)
    entries = []
    with CaseProgress(len(jobs), verb="simulate", comm=comm) as progress:
        for number, job in enumerate(jobs, start=1):
            progress.start(job.name)
            entries.append(
                _simulate_one(
                    case_config(config, job),
                    resolved,
                    closure_physics,
                    model,
                    job,
                    prefix=f"[{number}/{len(jobs)}] {job.name}",
                    comm=comm,
                )
            )
            progress.done()
    summary = SimulateSummary(entries, output)

    def write_summary() -> None:
        text = json.dumps(entries, indent=2, allow_nan=True)
        atomic_write_text(output / "metrics.json", text + "\n")
        append_summary(output, summary.table(), verb="simulate", stamp=stamp)
        # the table is the command's output: `vcnn simulate` prints it (vcnn.cli)

    on_root(comm, write_summary)
    return summary


def _simulate_one(
    config: SimulateConfig,
    resolved: SimulationPhysics,
    closure_physics: Mapping[str, Any] | None,
    model: Any,
    job: CaseJob,
    *,
    prefix: str,
    comm: MPI.Comm,
) -> dict[str, Any]:
    """One case of :func:`_simulate_cases`: its metrics entry, or its failure's (collective)."""
    name, alpha = job.name, job.alpha
    start = time.perf_counter()
    try:
        return simulate_case(
            config,
            resolved,
            closure_physics,
            model,
            name,
            alpha,
            comm=comm,
            prefix=prefix,
            crest_amplitude=job.crest_amplitude,
        )
    except ConfigError:
        raise  # a config error fails every case: stop, with the one message
    except Exception as error:  # one failed case must not lose the others
        message = case_failure_message(error, name)
        entry = getattr(error, "entry", None) or _empty_entry(
            name, alpha, config, crest_amplitude=job.crest_amplitude
        )
        entry["error"] = message
        entry["wall_seconds"] = entry.get("wall_seconds") or time.perf_counter() - start
        if comm.rank == 0:
            logger.error("%s: FAILED: %s", prefix, message)
            logger.debug("%s", traceback.format_exc())
        return entry


def _empty_entry(
    name: str,
    alpha: float | None,
    config: SimulateConfig,
    *,
    crest_amplitude: float | None = None,
) -> dict[str, Any]:
    entry: dict[str, Any] = dict.fromkeys(METRIC_KEYS)
    entry.update(
        case=name,
        alpha=alpha,
        crest_amplitude=crest_amplitude,
        closure=config.closure,
        coupling=config.coupling,
        outer=config.outer if config.coupling == "two-way" else "one-way",
        converged=False,
    )
    return entry


@dataclass
class _RunState:
    """The state of a finished run at the owned closure points (and its flow)."""

    tau: np.ndarray
    velocity: np.ndarray
    strain_rate: np.ndarray
    nu_t: np.ndarray
    flow: Any
    result: Any
    separation: float | None
    reattachment: float | None


def _capture(problem: ClosureProblem, result: LoopResult, alpha: float | None) -> _RunState:
    """The problem's current state after ``result`` (collective)."""
    separation = reattachment = None
    if alpha is not None and problem.mesh.geometry.dim == 2:
        from meshes.hills import hill_period
        from solvers.diagnostics import hill_flow_reversal, main_recirculation

        reversal = hill_flow_reversal(result.flow.u, alpha)
        separation, reattachment = main_recirculation(
            reversal.separation, reversal.reattachment, period=hill_period(alpha)
        )
    elif problem.mesh.geometry.dim == 2 and problem.spec.walls:
        # a user mesh: the longest reversed stretch of its named walls (x of its ends)
        from solvers.diagnostics import main_wall_recirculation, wall_flow_reversal

        walls = wall_flow_reversal(result.flow.u, problem.facet_tags, problem.spec.walls)
        bubble = main_wall_recirculation(walls)
        if bubble is not None:
            separation, reattachment = float(bubble[0][0]), float(bubble[1][0])
    return _RunState(
        tau=result.tau,
        velocity=problem.velocity_values(),
        strain_rate=problem.values(problem.strain_rate()),
        nu_t=problem.values(problem.eddy_viscosity),
        flow=result.flow,
        result=result,
        separation=None if separation is None or math.isnan(separation) else separation,
        reattachment=None if reattachment is None or math.isnan(reattachment) else reattachment,
    )


def simulate_case(
    config: SimulateConfig,
    resolved: SimulationPhysics,
    closure_physics: Mapping[str, Any] | None,
    model: Any,
    name: str,
    alpha: float | None,
    *,
    comm: MPI.Comm = MPI.COMM_WORLD,
    prefix: str = "",
    crest_amplitude: float | None = None,
) -> dict[str, Any]:
    """Run one case and write its outputs; returns its metrics entry (collective).

    ``crest_amplitude`` makes a hill case the 3-D hill of that crest amplitude (None: 2-D).

    Raises:
        SimulationError: a run failed; its last state is written under ``failed/``.
    """
    from solvers.closure_loop import (
        CoupledDivergedError,
        OuterOptions,
        solve_one_way,
        solve_two_way,
    )
    from solvers.closures import ClosureError, NetworkClosure, PdeClosure
    from solvers.linalg import SolverDivergedError
    from solvers.problem import ClosureProblem
    from vcnn.physics import PhysicsMismatchError

    start = time.perf_counter()
    output = Path(config.out)
    entry = _empty_entry(name, alpha, config, crest_amplitude=crest_amplitude)
    tagged = build_mesh(config.mesh, alpha, comm=comm, crest_amplitude=crest_amplitude)
    spec = boundary_spec(config, tagged)
    dimension = tagged.mesh.geometry.dim
    trained_dimension = (closure_physics or {}).get("dimension")
    if trained_dimension is not None and int(trained_dimension) != dimension:
        raise PhysicsMismatchError(
            f"the closure was trained in {int(trained_dimension)}-D, the mesh is {dimension}-D"
        )
    physics = resolved.physics
    two_way = config.coupling == "two-way"
    options = OuterOptions(
        method=config.outer,
        relaxation=config.relaxation,
        tol=config.tol,
        max_iterations=config.max_iterations,
        history_size=config.history_size,
        negative_tolerance=config.negative_tau_tolerance,
    )
    # The tau PDE's undershoots on coarse meshes are discretisation error, not divergence.
    truth_options = OuterOptions(**{**asdict(options), "negative_tolerance": None})
    imported = config.flow_from is not None
    flow_kind = "given" if imported else "solve"
    with ClosureProblem.from_tagged_mesh(
        tagged, spec, physics, two_way=two_way, flow=flow_kind
    ) as problem:
        entry["num_points"] = problem.points.num_points
        entry["setup_seconds"] = sum(problem.setup_seconds.values())
        if comm.rank == 0:
            logger.info(
                "%s: %d closure points, set-up %.1f s",
                prefix,
                problem.points.num_points,
                entry["setup_seconds"],
            )
        pde = PdeClosure(problem) if (config.closure == "pde" or config.compare) else None
        network = (
            NetworkClosure(model, comm, name=name, clouds=config.clouds)
            if config.closure == "network"
            else None
        )
        closure = network if network is not None else pde
        truth = None
        a_priori = None

        def guarded(run: Callable[[], LoopResult], label: str) -> LoopResult:
            return _guarded(
                run, problem, config, name, alpha, physics, label, crest_amplitude=crest_amplitude
            )

        try:
            if not two_way:
                clock = time.perf_counter()
                if imported:
                    flow = problem.import_flow(
                        config.flow_from,
                        field=config.flow_field,
                        time=config.flow_time,
                        min_samples_per_point=config.flow_min_samples_per_point,
                    )
                else:
                    flow = problem.solve_flow()
                flow_seconds = time.perf_counter() - clock
                run = guarded(lambda: solve_one_way(problem, closure, flow=flow), "closure")
                state = _capture(problem, run, alpha)
                entry["wall_seconds"] = flow_seconds + run.wall_time
                if config.compare:
                    truth_run = guarded(lambda: solve_one_way(problem, pde, flow=flow), "truth")
                    truth = _capture(problem, truth_run, alpha)
                    entry["truth_wall_seconds"] = flow_seconds + truth_run.wall_time
                    a_priori = state.tau
            else:
                if config.compare:
                    if comm.rank == 0:
                        logger.info("%s: the PDE truth (two-way, %s)", prefix, config.outer)
                    problem.reset()
                    truth_run = guarded(lambda: solve_two_way(problem, pde, truth_options), "truth")
                    truth = _capture(problem, truth_run, alpha)
                    entry["truth_wall_seconds"] = truth_run.wall_time
                    # The network on the truth's flow (the problem holds it): a priori.
                    a_priori = network.evaluate(problem).tau
                    if comm.rank == 0:
                        logger.info("%s: the closure in the loop (%s)", prefix, closure.kind)
                problem.reset()
                loop_options = options if closure is network else truth_options
                run = guarded(lambda: solve_two_way(problem, closure, loop_options), "closure")
                state = _capture(problem, run, alpha)
                entry["wall_seconds"] = run.wall_time
        except (CoupledDivergedError, ClosureError, SolverDivergedError) as error:
            entry["wall_seconds"] = time.perf_counter() - start
            if isinstance(error, CoupledDivergedError):
                entry["iterations"] = len(error.steps)
            raise SimulationError(str(error), entry) from error
        finally:
            if pde is not None:
                pde.close()
        _fill_entry(entry, problem, state, truth, a_priori, alpha)
        if network is not None:  # what ran the network: its backend, clouds and ranks
            entry.update(engine=network.engine, clouds=network.clouds, closure_ranks=network.ranks)
        mesh_info = {**tagged.info, "kind": tagged.kind}
        _write_outputs(
            config,
            problem,
            state,
            truth,
            a_priori,
            entry,
            name,
            alpha,
            physics,
            resolved,
            output,
            mesh_info,
            engine=None if network is None else network.engine,
        )
    if comm.rank == 0:
        logger.info(
            "%s: done in %.1f s (%s, %s iterations)",
            prefix,
            time.perf_counter() - start,
            entry["outer"],
            entry["iterations"],
        )
    return entry


def _guarded(
    run: Callable[[], LoopResult],
    problem: ClosureProblem,
    config: SimulateConfig,
    name: str,
    alpha: float | None,
    physics: Physics,
    label: str,
    *,
    crest_amplitude: float | None = None,
) -> LoopResult:
    """Run ``run()``; on failure write the last state under ``failed/`` and re-raise."""
    from solvers.closure_loop import CoupledDivergedError

    try:
        return run()
    except Exception as error:
        if is_interrupt(error):  # e.g. a PETSc.Error wrapping Ctrl-C: not a failed run
            raise
        tau = getattr(error, "tau", None) if isinstance(error, CoupledDivergedError) else None
        if tau is None:
            tau = np.zeros(problem.points.local_dofs.size)
        suffix = "" if label == "closure" else f"_{label}"
        meta = _base_meta(name, alpha, physics, config, crest_amplitude=crest_amplitude)
        meta["failure"] = {
            "run": label,
            "error": f"{type(error).__name__}: {error}",
            "history": [asdict(step) for step in getattr(error, "steps", [])],
            "state": "the last flow and the last tau the closure produced",
        }
        try:
            path = Path(config.out) / "failed" / f"{name}{suffix}.npz"
            try:  # collective gathers, then rank 0 validates the state (NaN of a diverged flow)
                case, invalid = problem.case(tau, name=f"{name}{suffix}", meta=meta), None
            except ValueError as caught:  # raised on every rank by on_root: none waits there
                case, invalid = None, caught

            def write_failed() -> None:
                if invalid is not None:
                    raise invalid
                write_case(path, case)

            on_root(problem.comm, write_failed)
            if problem.comm.rank == 0:
                logger.error("the last state of the failed run is in %s", path)
        except Exception as write_error:  # the original failure matters more ...
            if is_interrupt(write_error):
                raise
            if is_disk_full(write_error):
                raise  # ... unless the disk is full: that ends the run
            if problem.comm.rank == 0:
                logger.error("could not write the last state: %s", write_error)
        raise


def _base_meta(
    name: str,
    alpha: float | None,
    physics: Physics,
    config: SimulateConfig,
    *,
    crest_amplitude: float | None = None,
) -> dict[str, Any]:
    return {
        "case": name,
        "alpha": alpha,
        # a 3-D hill's crest amplitude (figure titles read it); absent in 2-D
        **({} if crest_amplitude is None else {"crest_amplitude": crest_amplitude}),
        "physics": physics.to_dict(),
        **physics.flat_case_meta(),
        "U_b": physics.bulk_velocity,
        "simulate": {
            "closure": config.closure,
            "model": config.model,
            "coupling": config.coupling,
            "outer": config.outer,
            "relaxation": config.relaxation,
            "tol": config.tol,
            "max_iterations": config.max_iterations,
        },
        "versions": package_versions(),
    }


def _body_force(flow: Any) -> float | None:
    """The driving body force of a solved flow (None for an imported one)."""
    force = getattr(flow, "body_force", None)
    return None if force is None else float(force)


def _fill_entry(
    entry: dict[str, Any],
    problem: ClosureProblem,
    state: _RunState,
    truth: _RunState | None,
    a_priori: np.ndarray | None,
    alpha: float | None,
) -> None:
    """Metrics of the run (and against the truth), computed on rank 0, shared by all."""
    result = state.result
    period = float(problem.period[0])
    entry.update(
        outer=result.method,
        converged=bool(result.converged),
        iterations=int(result.evaluations),
        out_of_range_fraction=result.out_of_range_fraction,
        body_force=_body_force(result.flow),
        tau_integral=problem.tau_integral(state.tau),
        reattachment_x=state.reattachment,
        separation_x=state.separation,
    )
    if truth is None:
        return
    gather = problem.points.gather
    tau, tau_truth = gather(state.tau), gather(truth.tau)
    velocity, velocity_truth = gather(state.velocity), gather(truth.velocity)
    prediction = gather(a_priori)
    truth_integral = problem.tau_integral(truth.tau)
    values = None
    if problem.comm.rank == 0:
        values = {
            "tau_rel_l2_percent": relative_l2_percent(tau, tau_truth),
            "a_priori_tau_rel_l2_percent": relative_l2_percent(prediction, tau_truth),
            "velocity_rel_l2_percent": relative_l2_percent(velocity, velocity_truth),
        }
    entry.update(problem.comm.bcast(values, root=0))
    entry.update(
        tau_integral_rel_error=relative_error(entry["tau_integral"], truth_integral),
        body_force_rel_error=relative_error(entry["body_force"], _body_force(truth.flow)),
        reattachment_x_error=periodic_distance(state.reattachment, truth.reattachment, period),
        separation_x_error=periodic_distance(state.separation, truth.separation, period),
        truth_iterations=int(truth.result.evaluations),
    )


def _write_outputs(
    config: SimulateConfig,
    problem: ClosureProblem,
    state: _RunState,
    truth: _RunState | None,
    a_priori: np.ndarray | None,
    entry: dict[str, Any],
    name: str,
    alpha: float | None,
    physics: Physics,
    resolved: SimulationPhysics,
    output: Path,
    mesh_info: dict[str, Any],
    *,
    engine: str | None = None,
) -> None:
    """Case file, XDMF and PNG of one case (collective); ``engine``: the network's backend."""
    from dolfinx import fem

    meta = _base_meta(name, alpha, physics, config, crest_amplitude=entry["crest_amplitude"])
    meta.update(
        mesh={**mesh_info, "num_points": problem.points.num_points},
        body_force=entry["body_force"],
        tau_integral=entry["tau_integral"],
        separation_x=entry["separation_x"],
        reattachment_x=entry["reattachment_x"],
        metrics=dict(entry),
        # an imported flow records its source (a solved one has none)
        flow_source=state.flow.to_meta() if hasattr(state.flow, "to_meta") else None,
    )
    meta["simulate"].update(
        eps=resolved.eps,
        physics_mismatches=list(resolved.mismatches),
        converged=entry["converged"],
        iterations=entry["iterations"],
        history=[asdict(step) for step in state.result.history],
        num_processes=problem.comm.size,
        engine=engine,
        clouds=entry.get("clouds"),
    )
    extra = {"nu_t": state.nu_t}
    if truth is not None:
        meta["truth"] = {
            "iterations": truth.result.evaluations,
            "outer": truth.result.method,
            "history": [asdict(step) for step in truth.result.history],
            "body_force": _body_force(truth.flow),
            "reattachment_x": truth.reattachment,
            "separation_x": truth.separation,
        }
        extra.update(
            tau_truth=truth.tau,
            velocity_truth=truth.velocity,
            strain_rate_truth=truth.strain_rate,
            nu_t_truth=truth.nu_t,
            tau_a_priori=a_priori,
        )
    case = problem.case(
        state.tau,
        name=name,
        meta=meta,
        extra=extra,
        velocity=state.velocity,
        strain_rate=state.strain_rate,
    )
    on_root(problem.comm, lambda: write_case(output / f"{name}.npz", case))
    if config.xdmf:
        functions = {"velocity": state.flow.u}
        if getattr(state.flow, "p", None) is not None:  # an imported flow has no pressure
            functions["pressure"] = state.flow.p
        nodal = {"tau": state.tau, "nu_t": state.nu_t}
        if truth is not None:
            functions["velocity_truth"] = truth.flow.u
            if getattr(truth.flow, "p", None) is not None:
                functions["pressure_truth"] = truth.flow.p
            nodal.update(tau_truth=truth.tau, nu_t_truth=truth.nu_t)
            nodal.update(tau_minus_truth=state.tau - truth.tau)
            if a_priori is not None:
                nodal.update(tau_a_priori=a_priori, tau_a_priori_minus_truth=a_priori - truth.tau)
        for key, values in nodal.items():
            functions[key] = problem.to_function(values, fem.Function(problem.V, name=key))
        write_xdmf(output / f"{name}.xdmf", problem.mesh, functions)

    def draw() -> None:
        if config.plots:
            from vcnn.plotting.simulation import plot_simulation

            plot_simulation(case, output / f"{name}.png")

    on_root(problem.comm, draw)
