"""The set-up that generate and simulate share: meshes, boundary roles, inlets and case jobs.

A run's cases are :class:`CaseJob` s (:func:`case_jobs`): one per hill slope factor (in 3-D one
per slope factor and crest amplitude), one per user mesh file, or one per parameter combination
of a gmsh script (``.geo``) — a *family* of user meshes solved in one call. Each job carries
the :class:`MeshConfig` of its own mesh; :func:`build_mesh` makes its tagged mesh and
:func:`boundary_spec` the roles of its boundaries.
"""

from __future__ import annotations

from mpi4py import MPI

import glob
import itertools
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from solvers.boundaries import BoundarySpec, PeriodicPair, hill_boundary_spec
from vcnn.config import ConfigError, check_keys, check_types
from vcnn.expressions import ExpressionError, compile_expression
from vcnn.inputs import check_regular_input

logger = logging.getLogger(__name__)

__all__ = [
    "BOUNDARY_ROLES",
    "MESH_KINDS",
    "CaseJob",
    "MeshConfig",
    "boundary_spec",
    "build_mesh",
    "case_config",
    "case_jobs",
    "case_meshes",
    "check_boundaries_table",
    "check_case_name",
    "check_config_flow_source",
    "check_hill_dimension",
    "hill_case_name",
    "inlet_profile",
    "package_versions",
]


MESH_KINDS = ("structured", "unstructured", "file")


@dataclass
class MeshConfig:
    """Which mesh each case is solved on.

    Attributes:
        kind: ``structured`` (graded quadrilaterals like the published meshes; hexahedra in
            3-D), ``unstructured`` (gmsh triangles; tetrahedra in 3-D) or ``file`` (user
            meshes).
        resolution: structured: factor on the published 200 alpha x 200 cells (in 3-D the
            in-plane grid, so the 2-D mesh at the same resolution is its section).
        cell_type: structured 2-D: ``quadrilateral`` or ``triangle`` (3-D: hexahedra).
        span_cells: structured 3-D: cell layers across the span; None: ``max(2, round(28 r))``
            (:func:`meshes.hills3d.default_span_cells`: 7 at r = 0.25, about 0.44 M unknowns).
        size: unstructured: target cell size in the core of the flow.
        wall_size: unstructured: cell size at the walls (default size / 5; size / 3 in 3-D).
        file: file: path of a ``.msh`` or meshio-readable mesh with tagged boundaries, or of a
            gmsh script (``.geo``) that defines the geometry and its physical groups.
        files: file: a family of meshes, one case each: paths or glob patterns (``"m/*.msh"``,
            expanded and sorted when the config is read); not with ``file``.
        parameters: gmsh scripts only: values of the script's parameters (``DefineConstant``
            or ``DefineNumber``, matched by name), a number or a list of numbers each; one
            case per combination, e.g. ``{bump_height = [0.1, 0.2], width = 1.0}``.
    """

    kind: str = "structured"
    resolution: float = 1.0
    cell_type: str = "quadrilateral"
    size: float = 0.05
    wall_size: float | None = None
    file: str | None = None
    files: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    span_cells: int | None = None

    def __post_init__(self) -> None:
        check_types(asdict(self), MeshConfig, "[generate.mesh]")
        if self.kind not in MESH_KINDS:
            raise ConfigError(f"mesh kind must be one of {MESH_KINDS}, got {self.kind!r}")
        if self.span_cells is not None and (
            isinstance(self.span_cells, bool)
            or not isinstance(self.span_cells, int)
            or self.span_cells < 1
        ):
            raise ConfigError(
                f"[generate.mesh] span_cells must be a positive number of cell layers, got "
                f"{self.span_cells!r}"
            )
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
        self.files = [str(f) for f in self.files]
        self.parameters = _parameter_lists(self.parameters)
        if self.kind != "file":
            given = self.file or (self.files[0] if self.files else None)
            if given is not None:
                raise ConfigError(
                    f"mesh file {given!r} is given but the mesh kind is {self.kind!r}: use "
                    "--mesh file (kind = \"file\") to solve on it, or leave the file out"
                )
            if self.parameters:
                raise ConfigError(
                    "[generate.mesh] parameters are for a gmsh script (kind = \"file\", a .geo "
                    "file); leave them out for a hill mesh"
                )
            return
        if self.file and glob.has_magic(self.file) and not self.files:
            self.file, self.files = None, [self.file]  # a pattern is a family
        if self.file and self.files:
            raise ConfigError(
                "[generate.mesh] gives both file and files: list every mesh under files"
            )
        if not self.file and not self.files:
            raise ConfigError("mesh kind 'file' needs mesh.file or mesh.files (or --mesh-file)")
        if self.files:
            self.files = _expand_mesh_files(self.files)
        for path in self.mesh_files():
            check_regular_input(
                path,
                what="mesh file",
                flag="--mesh-file / [generate.mesh] file(s)",
                error=ConfigError,
            )
        scripts = [path for path in self.mesh_files() if _is_script(path)]
        if self.parameters and len(scripts) != len(self.mesh_files()):
            raise ConfigError(
                "[generate.mesh] parameters set the parameters of gmsh scripts (.geo); "
                f"{[p for p in self.mesh_files() if not _is_script(p)][0]!r} is a mesh: "
                "leave the parameters out or give .geo scripts only"
            )

    def mesh_files(self) -> list[str]:
        """The user mesh files (or scripts) of a ``file`` mesh, in case order."""
        if self.kind != "file":
            return []
        return [self.file] if self.file else list(self.files)

    def combinations(self) -> list[dict[str, float]]:
        """Every combination of the script parameters (one dict per case; ``[{}]`` without)."""
        names = list(self.parameters)
        return [
            dict(zip(names, values, strict=True))
            for values in itertools.product(*(self.parameters[n] for n in names))
        ]


def _is_script(path: str) -> bool:
    return Path(path).suffix.lower() == ".geo"


def _parameter_lists(parameters: Mapping[str, Any]) -> dict[str, list[float]]:
    """``{name: number or [numbers]}`` as ``{name: [floats]}``, each list non-empty, finite."""
    lists: dict[str, list[float]] = {}
    for name, value in dict(parameters).items():
        values = value if isinstance(value, list | tuple) else [value]
        if not values or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in values
        ):
            raise ConfigError(
                f"[generate.mesh.parameters] {name} must be a number or a non-empty list of "
                f"finite numbers, got {value!r}"
            )
        if len(set(values)) != len(values):
            raise ConfigError(f"[generate.mesh.parameters] {name} lists a value twice: {value!r}")
        lists[str(name)] = [float(v) for v in values]
    return lists


def _expand_mesh_files(patterns: list[str]) -> list[str]:
    """Mesh paths with glob patterns expanded (sorted, each pattern must match a file)."""
    files: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            if not matches:
                raise ConfigError(f"mesh files {pattern!r} match no file")
            files += matches
        else:
            files.append(pattern)
    twice = sorted({f for f in files if files.count(f) > 1})
    if twice:
        raise ConfigError(f"mesh file {twice[0]!r} is listed twice in [generate.mesh] files")
    return files


def hill_case_name(alpha: float, crest_amplitude: float | None = None) -> str:
    """File stem of the hill case of slope factor alpha, e.g. ``hill_a1.000``.

    Three decimals, or as many more as the value needs (``hill_a1.0004``), so that distinct
    slope factors never share a case file. A 3-D hill (``crest_amplitude`` given) also carries
    its crest amplitude a of ``h(z) = 1 + a cos(2 pi z / L_z)``: ``hill3d_a1.000_crest0.100``.
    """
    if crest_amplitude is None:
        return f"hill_a{_exact_decimals(alpha)}"
    return f"hill3d_a{_exact_decimals(alpha)}_crest{_exact_decimals(crest_amplitude)}"


def _exact_decimals(value: float) -> str:
    """Three decimals, or as many more as the value needs to be read back exactly."""
    for digits in range(3, 16):
        text = f"{value:.{digits}f}"
        if float(text) == value:
            return text
    return repr(value)


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


def check_config_flow_source(
    config: Any,
    jobs: list[CaseJob],
    *,
    prepared: Mapping[str, tuple[Any, BoundarySpec]] | None = None,
    comm: MPI.Comm,
) -> None:
    """Read the config's ``flow_from`` and check it against each case's mesh, up front.

    Args:
        config: generate's or simulate's configuration (``flow_from``, ``flow_field``,
            ``flow_time``, ``flow_min_samples_per_point``); nothing is done without a source.
        jobs: the cases to check.
        prepared: (TaggedMesh, BoundarySpec) by case name, of the meshes the caller has
            built already.
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
    jobs: list[CaseJob],
    *,
    prepared: Mapping[str, tuple[Any, BoundarySpec]] | None = None,
    comm: MPI.Comm,
) -> Iterator[tuple[Any, BoundarySpec]]:
    """(TaggedMesh, BoundarySpec) of each case, built one at a time (collective).

    Args:
        config: generate's or simulate's configuration.
        jobs: the cases.
        prepared: (TaggedMesh, BoundarySpec) by case name, of the meshes the caller has
            built already.
        comm: the communicator of the meshes.
    """
    for job in jobs:
        if prepared and job.name in prepared:
            yield prepared[job.name]
            continue
        tagged = build_mesh(job.mesh, job.alpha, comm=comm, crest_amplitude=job.crest_amplitude)
        yield tagged, boundary_spec(case_config(config, job), tagged)


class CaseJob(NamedTuple):
    """One case of a run.

    Attributes:
        name: the case name (file stem of its outputs).
        alpha: the hill slope factor; None for a user mesh.
        mesh: the mesh of this case alone: the run's for a hill; for a user mesh its one
            ``file`` and, for a gmsh script, one value per parameter.
        crest_amplitude: a 3-D hill's crest amplitude a (0: the extruded 2-D hill); None for
            a 2-D hill or a user mesh.
    """

    name: str
    alpha: float | None
    mesh: MeshConfig
    crest_amplitude: float | None = None


def check_hill_dimension(
    dim: Any, crest_amplitudes: list[float] | None, mesh: MeshConfig
) -> list[float] | None:
    """Check the dimension settings of a hill run; the crest amplitudes it resolves to.

    In 2-D the 3-D settings (crest amplitudes, span layers) are refused; in 3-D the crest
    amplitudes default to ``[0.0]`` (the extruded hill) and must lie in
    ``[0, meshes.hills3d.MAX_CREST_AMPLITUDE]``, and a file mesh or a structured cell type
    other than hexahedra is refused. Shared by generate and simulate.

    Args:
        dim: the run's ``dim`` (2 or 3).
        crest_amplitudes: the run's ``crest_amplitudes`` (None: not given).
        mesh: the run's mesh settings.

    Returns:
        The crest amplitudes as floats (3-D), or None (2-D).

    Raises:
        ConfigError: a dimension other than 2 or 3, or a setting the dimension does not take.
    """
    if isinstance(dim, bool) or dim not in (2, 3):
        raise ConfigError(f"dim must be 2 or 3, got {dim!r}")
    if dim == 2:
        for key, value in (
            ("crest_amplitudes (--crest-amplitudes)", crest_amplitudes),
            ("mesh.span_cells (--span-cells)", mesh.span_cells),
        ):
            if value is not None:
                raise ConfigError(
                    f"{key} is a setting of the 3-D hills: give --dim 3 (dim = 3), or "
                    "leave it out"
                )
        return None
    from meshes.hills3d import MAX_CREST_AMPLITUDE

    amplitudes = [float(a) for a in crest_amplitudes or [0.0]]
    bad = [a for a in amplitudes if not 0.0 <= a <= MAX_CREST_AMPLITUDE]
    if bad:
        raise ConfigError(
            f"crest amplitudes must lie in [0, {MAX_CREST_AMPLITUDE:g}] (h(z) = 1 + a "
            f"cos(2 pi z / L_z); 0: the extruded 2-D hill), got {bad}"
        )
    if mesh.kind == "file":
        raise ConfigError(
            "dim = 3: a file mesh is as many dimensions as its file: leave --dim out "
            "(dim = 3 makes the 3-D hills)"
        )
    if mesh.cell_type != "quadrilateral":
        raise ConfigError(
            "dim = 3: the structured 3-D hill is made of hexahedra: leave --cell-type out, "
            "or use --mesh unstructured for tetrahedra"
        )
    return amplitudes


def case_jobs(config: Any, *, section: str = "generate") -> list[CaseJob]:
    """Every case of a run: one per hill slope factor, or per user mesh and script parameters.

    The case of a user mesh is named by its file's stem (or ``name``, for a single mesh); a
    gmsh script's cases append each parameter and its value, e.g. ``bump_bump_height0.1``.

    Args:
        config: a run configuration with ``mesh``, ``alphas`` and ``name`` (generate's or
            simulate's); with ``dim = 3`` also ``crest_amplitudes``: one 3-D hill case per
            slope factor and crest amplitude.
        section: the configuration section that names the case (for the error message).

    Raises:
        ConfigError: an invalid case name, ``name`` with several meshes, two cases that would
            share a name, or ``mesh.span_cells`` for a 2-D run.
    """
    mesh = config.mesh
    dim = getattr(config, "dim", 2)
    if mesh.span_cells is not None and dim != 3:
        raise ConfigError(
            f"[{section}.mesh] span_cells (--span-cells) sets the layers of a 3-D hill: give "
            "--dim 3 (dim = 3), or leave it out"
        )
    if mesh.kind != "file" and dim == 3:
        return [
            CaseJob(hill_case_name(alpha, crest), alpha, mesh, crest)
            for alpha in config.alphas
            for crest in config.crest_amplitudes
        ]
    if mesh.kind != "file":
        return [CaseJob(hill_case_name(alpha), alpha, mesh) for alpha in config.alphas]
    files = mesh.mesh_files()
    if config.name is not None and len(files) > 1:
        raise ConfigError(
            f"[{section}] name names the case of one mesh; the {len(files)} cases of a mesh "
            "family are named by their files: leave name out"
        )
    jobs = []
    for path in files:
        stem = config.name or Path(path).stem
        for values in mesh.combinations():
            name = "_".join([stem, *(f"{key}{_short(value)}" for key, value in values.items())])
            check_case_name(name, where=f"case name (set [{section}] name)")
            own = replace(
                mesh, file=path, files=[], parameters={k: [v] for k, v in values.items()}
            )
            jobs.append(CaseJob(name, None, own))
    names = [job.name for job in jobs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigError(
            f"two meshes give the case {twice[0]!r} (cases are named by the file stems): "
            "rename one of the files"
        )
    return jobs


def _short(value: float) -> str:
    """A parameter value as short as it stays exact: 0.1 -> ``0.1``, 2.0 -> ``2``."""
    text = f"{value:g}"
    return text if float(text) == value else repr(value)


def case_config(config: Any, job: CaseJob) -> Any:
    """The run's configuration with the mesh of this one case (for per-case checks)."""
    return config if job.mesh is config.mesh else replace(config, mesh=job.mesh)


def build_mesh(
    mesh_config: MeshConfig,
    alpha: float | None,
    *,
    comm: MPI.Comm,
    crest_amplitude: float | None = None,
):
    """The TaggedMesh of one case (``mesh_config``: the case's own, see :class:`CaseJob`).

    ``crest_amplitude`` makes a hill case 3-D (:mod:`meshes.hills3d`): structured hexahedra
    (``mesh_config.span_cells`` layers) or gmsh tetrahedra; None is the 2-D hill.
    """
    if crest_amplitude is not None and mesh_config.kind != "file":
        return _build_hill3d_mesh(mesh_config, alpha, crest_amplitude, comm=comm)
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

    (path,) = mesh_config.mesh_files()
    if not _is_script(path):
        return read_mesh(path, comm=comm)
    values = {name: values[0] for name, values in mesh_config.parameters.items()}
    with tempfile.TemporaryDirectory(prefix="vcnn-mesh-") as folder:
        target = Path(folder) / f"{Path(path).stem}.msh"
        error = None
        if comm.rank == 0:
            try:
                mesh_script(path, values, target)
            except ConfigError as raised:
                error = str(raised)
        error = comm.bcast(error, root=0)
        if error is not None:
            raise ConfigError(error)
        tagged = read_mesh(target, comm=comm)
    tagged.info.update(path=str(path), format="gmsh script", parameters=values)
    return tagged


def _build_hill3d_mesh(
    mesh_config: MeshConfig, alpha: float, crest_amplitude: float, *, comm: MPI.Comm
):
    """The 3-D hill of one case: hexahedra (structured) or tetrahedra (unstructured)."""
    if mesh_config.kind == "structured":
        from meshes.hills3d import structured_hill3d_mesh

        return structured_hill3d_mesh(
            alpha,
            crest_amplitude=crest_amplitude,
            resolution=mesh_config.resolution,
            span_cells=mesh_config.span_cells,
            comm=comm,
        )
    from meshes.hills3d import unstructured_hill3d_mesh

    return unstructured_hill3d_mesh(
        alpha,
        crest_amplitude=crest_amplitude,
        size=mesh_config.size,
        wall_size=mesh_config.wall_size,
        comm=comm,
    )


def mesh_script(script: str | os.PathLike, values: Mapping[str, float], target: Path) -> None:
    """Mesh a gmsh script (``.geo``) with the given parameter values into a ``.msh`` file.

    A parameter is a ``DefineConstant`` or ``DefineNumber`` of the script, matched by its
    ONELAB name or that name's last component (``Parameters/bump_height`` or
    ``bump_height``). The mesh is generated in the script's highest dimension. Serial (gmsh).

    Raises:
        ConfigError: the script fails, or a parameter is not one of the script's (naming
            those it has).
    """
    from meshes.unstructured import gmsh_session

    script = str(script)
    try:
        with gmsh_session("mesh_script") as gmsh:
            gmsh.merge(script)
            # the script's own parameters, not gmsh's entries about the model
            known = [
                name
                for name in gmsh.onelab.getNames()
                if not name.startswith(("Gmsh/", "ONELAB/"))
            ]
        full_names = {}
        for name in values:
            matches = [k for k in known if k == name or k.rsplit("/", 1)[-1] == name]
            if len(matches) != 1:
                short = sorted({k.rsplit("/", 1)[-1] for k in known})
                raise ConfigError(
                    f"gmsh script {script!r} has no parameter {name!r}"
                    + (" (or several)" if matches else "")
                    + f"; its parameters: {short} (DefineConstant/DefineNumber)"
                )
            full_names[name] = matches[0]
        with gmsh_session("mesh_script") as gmsh:
            for name, value in values.items():
                gmsh.onelab.setNumber(full_names[name], [float(value)])
            gmsh.merge(script)
            dimension = max((dim for dim, _ in gmsh.model.getEntities()), default=0)
            gmsh.model.mesh.generate(dimension)
            gmsh.write(str(target))
    except ConfigError:
        raise
    except Exception as error:  # gmsh raises plain Exception
        raise ConfigError(f"gmsh cannot mesh the script {script!r}: {error}") from error
    logger.debug("meshed %s with %s", script, dict(values))


def boundary_spec(config: Any, tagged) -> BoundarySpec:
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
        periodic.append(_periodic_pair(pair, tagged, tag, where=where))
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


def _periodic_pair(
    pair: Mapping[str, Any], tagged, tag: Callable[[str], int], *, where: str
) -> PeriodicPair:
    """A periodic pair of the boundaries table, its translation found (when left out) and checked.

    The translation is optional: the offset between the two tagged surfaces (2-D or 3-D);
    given or found, the surfaces must map onto each other (:func:`matched_translation`).

    Raises:
        ConfigError: a translation that is not a list of numbers.
        PeriodicPairingError: surfaces that do not match, or a translation of the wrong size.
    """
    from solvers.periodic import matched_translation

    translation = pair.get("translation")
    if translation is not None and (
        not isinstance(translation, list | tuple)
        or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in translation
        )
    ):
        raise ConfigError(
            f"{where} periodic pair {pair['slave']!r} -> {pair['master']!r}: translation must "
            f"be a list of finite numbers (or left out: found from the surfaces), got "
            f"{translation!r}"
        )
    slave, master = tag(pair["slave"]), tag(pair["master"])
    found = matched_translation(
        tagged.mesh,
        tagged.facet_tags,
        slave,
        master,
        translation=translation,
        names=(pair["slave"], pair["master"]),
    )
    return PeriodicPair(slave, master, found)


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
