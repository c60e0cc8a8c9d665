"""Checks of a ``vcnn generate`` run before anything is meshed, solved or written.

* **Size**: the number of cells of each hill case is estimated from the mesh settings and the
  slope factor (a file mesh's is read from it), and a case that would need more memory than the
  machine has, or that would have too few cells to mean anything, is refused with the estimate
  in the message (instead of allocating GiBs and failing, or solving a 2-cell mesh). The
  estimate counts the history of a two-way run's outer iteration (Anderson, NGMRES) too.
* **Existing cases**: a complete case file is skipped only when it was generated with the
  settings of this run (slope factor, mesh, physics); otherwise the run is refused, so that a
  rerun at another resolution never "skips" cases that do not match the config it records.
"""

from __future__ import annotations

from mpi4py import MPI

import json
import math
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from meshes.hills import TOP_WALL_HEIGHT, hill_period, hill_profile
from vcnn.config import ConfigError
from vcnn.physics import Physics
from vcnn.system import machine_bytes

if TYPE_CHECKING:
    from solvers.case_setup import MeshConfig
    from solvers.generate import GenerateConfig

__all__ = [
    "ALPHA_RANGE",
    "check_alphas",
    "MIN_CELLS_ACROSS",
    "check_case_size",
    "check_existing_case",
    "check_mesh_size",
    "estimate_cells",
    "estimate_cells3d",
    "machine_memory",
]

#: Slope factors accepted by ``vcnn generate``: below, the hill flanks are nearly vertical
#: (narrower than 0.2 hill heights); above, the period exceeds 80 hill heights.
ALPHA_RANGE: tuple[float, float] = (0.1, 20.0)


def check_alphas(alphas: list[float]) -> None:
    """Refuse an empty list of hill slope factors or one outside :data:`ALPHA_RANGE`.

    Raises:
        ConfigError: naming the bad factors.
    """
    if not alphas:
        raise ConfigError("alphas is empty: give at least one hill slope factor")
    bad = [a for a in alphas if not (math.isfinite(a) and a > 0)]
    if bad:
        raise ConfigError(f"hill slope factors must be positive, got {bad}")
    low, high = ALPHA_RANGE
    bad = [a for a in alphas if not low <= a <= high]
    if bad:
        raise ConfigError(
            f"hill slope factors must lie in [{low:g}, {high:g}], got {bad} (below, the "
            "hill flanks are nearly vertical; above, the period exceeds 80 hill heights)"
        )
#: Fewest cells across the channel (and along it) of a hill mesh.
MIN_CELLS_ACROSS = 4
#: Memory model of one case, measured on the structured hill (Taylor-Hood flow, MUMPS LU):
#: about 1 GiB per process for the libraries, plus about 32 KiB per cell.
BASE_BYTES_PER_PROCESS = 1 << 30
BYTES_PER_CELL = 32 << 10
#: The outer iteration of a two-way run keeps two float64 vectors over the closure points (the
#: P1 nodes, about one per cell) per past iterate (iterates and residuals).
HISTORY_BYTES_PER_POINT = 2 * 8
_GIB = float(1 << 30)
#: Growth ratio of gmsh's wall refinement (meshes.unstructured.DEFAULT_GROWTH).
_GROWTH = 1.15


def estimate_cells(mesh: MeshConfig, alpha: float) -> tuple[int, int]:
    """Cells of the hill mesh of slope factor ``alpha``, and cells across the channel.

    Structured: ``round(200 alpha r) x round(200 r)`` quadrilaterals (twice as many triangles).
    Unstructured: triangles of the given size over the domain's area, plus the wall
    refinement (sizes growing from ``wall_size`` to ``size``); an order-of-magnitude estimate.

    Returns:
        (cells, cells across the channel); (0, 0) for a file mesh (its size is the file's).
    """
    if mesh.kind == "structured":
        along = max(2, round(200 * alpha * mesh.resolution))
        across = max(1, round(200 * mesh.resolution))
        cells = along * across * (2 if mesh.cell_type == "triangle" else 1)
        return cells, min(along, across)
    if mesh.kind == "unstructured":
        length = hill_period(alpha)
        x = np.linspace(0.0, length, 2001)
        area = length * TOP_WALL_HEIGHT - float(np.trapezoid(hill_profile(x, alpha), x))
        wall_size = mesh.wall_size if mesh.wall_size is not None else mesh.size / 5.0
        triangle = math.sqrt(3.0) / 4.0  # area of an equilateral triangle of unit side
        core = area / (triangle * mesh.size**2)
        # Layers of cells along both walls, sizes growing geometrically from wall_size; the
        # factor 1/2 matches gmsh's meshes of the hill to 20 % (size 0.1 to 0.3).
        band = length / (wall_size * triangle) * _GROWTH / (_GROWTH - 1.0)
        across = int(TOP_WALL_HEIGHT / mesh.size)
        return int(core + band), across
    return 0, 0


def machine_memory(comm: MPI.Comm) -> int:
    """Bytes of memory of the machines the ranks of ``comm`` run on (collective)."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    nodes = max(1, comm.size // node.size)
    node.Free()
    return nodes * machine_bytes()


def check_case_size(
    mesh: MeshConfig,
    alpha: float,
    *,
    processes: int = 1,
    memory: int | None = None,
    history_size: int = 0,
    crest_amplitude: float | None = None,
) -> None:
    """Refuse a hill case whose mesh would be too large for the machine or too coarse.

    Args:
        mesh: the mesh settings.
        alpha: the slope factor.
        processes: MPI processes that share the case (each loads the libraries).
        memory: bytes available to them (default: this machine's memory).
        history_size: past iterates the outer iteration keeps (0: none, one-way or Picard).
        crest_amplitude: a 3-D hill's crest amplitude (None: the 2-D hill).

    Raises:
        ConfigError: with the estimated cells and memory.
    """
    if crest_amplitude is not None:
        _check_case_size3d(mesh, alpha, processes=processes, memory=memory)
        return
    cells, across = estimate_cells(mesh, alpha)
    if mesh.kind == "file":
        return
    setting = (
        f"--resolution {mesh.resolution:g}"
        if mesh.kind == "structured"
        else f"--size {mesh.size:g}"
    )
    if across < MIN_CELLS_ACROSS:
        raise ConfigError(
            f"alpha = {alpha:g} with {setting} gives only {across} cell(s) across the hill "
            f"channel (about {cells} cells in all); at least {MIN_CELLS_ACROSS} are needed: "
            f"{'raise --resolution' if mesh.kind == 'structured' else 'lower --size'}"
        )
    memory = machine_bytes() if memory is None else memory
    needed = estimate_bytes(cells, cells, processes=processes, history_size=history_size)
    if needed > memory:
        raise ConfigError(
            f"alpha = {alpha:g} with {setting} needs about {cells:.3g} cells, an estimated "
            f"{needed / _GIB:.3g} GiB of memory{_history_note(cells, history_size)}; this "
            f"machine has {memory / _GIB:.3g} GiB: "
            f"{'lower --resolution' if mesh.kind == 'structured' else 'raise --size'} "
            "or the slope factor"
        )


#: Memory of a 3-D hill case per cell (Taylor-Hood Q2/Q1 flow, MUMPS LU), on top of the
#: libraries: the peak memory of structured cases of 800 and 6,400 hexahedra (0.95 and 4.7 GB,
#: serial) grows by 0.69 MB per cell; a tetrahedron counts as 1/5 of a hexahedron (a P2
#: tetrahedral mesh has about 1/5.7 of the velocity nodes per cell of a Q2 hexahedral one).
BYTES_PER_HEXAHEDRON = 700 << 10
_HEXAHEDRA_PER_TETRAHEDRON = 0.2


def estimate_cells3d(mesh: MeshConfig, alpha: float) -> tuple[int, int]:
    """Cells of the 3-D hill mesh of slope factor ``alpha``, and cells across the channel.

    Structured: the 2-D grid times ``span_cells`` layers (hexahedra). Unstructured: regular
    tetrahedra of edge ``size`` filling the volume, plus 1.5 ``A / wall_size^2`` per layer of
    the wall refinement (walls of area A, sizes growing geometrically from ``wall_size`` to
    ``size``); fitted to gmsh's meshes of alpha = 1 (size 0.35 and 0.5) within 5 %.

    Returns:
        (cells, cells across the channel).
    """
    from meshes.hills3d import SPAN_LENGTH, default_span_cells

    if mesh.kind == "structured":
        section, across = estimate_cells(mesh, alpha)
        layers = mesh.span_cells or default_span_cells(mesh.resolution)
        return section * layers, across
    length = hill_period(alpha)
    x = np.linspace(0.0, length, 2001)
    volume = SPAN_LENGTH * (
        length * TOP_WALL_HEIGHT - float(np.trapezoid(hill_profile(x, alpha), x))
    )
    wall_size = mesh.wall_size if mesh.wall_size is not None else mesh.size / 3.0
    tetrahedron = mesh.size**3 / (6.0 * math.sqrt(2.0))  # volume of a regular one
    wall_area = 2.0 * length * SPAN_LENGTH
    band = 1.5 * wall_area / wall_size**2 * _GROWTH / (_GROWTH - 1.0)
    return int(volume / tetrahedron + band), int(TOP_WALL_HEIGHT / mesh.size)


def _check_case_size3d(
    mesh: MeshConfig, alpha: float, *, processes: int, memory: int | None
) -> None:
    """:func:`check_case_size` of a 3-D hill (structured hexahedra or gmsh tetrahedra)."""
    cells, across = estimate_cells3d(mesh, alpha)
    structured = mesh.kind == "structured"
    setting = f"--resolution {mesh.resolution:g}" if structured else f"--size {mesh.size:g}"
    if across < MIN_CELLS_ACROSS:
        raise ConfigError(
            f"3-D alpha = {alpha:g} with {setting} gives only {across} cell(s) across the hill "
            f"channel; at least {MIN_CELLS_ACROSS} are needed: "
            f"{'raise --resolution' if structured else 'lower --size'}"
        )
    memory = machine_bytes() if memory is None else memory
    hexahedra = cells if structured else cells * _HEXAHEDRA_PER_TETRAHEDRON
    needed = processes * BASE_BYTES_PER_PROCESS + hexahedra * BYTES_PER_HEXAHEDRON
    if needed > memory:
        kind = "hexahedra" if structured else "tetrahedra"
        raise ConfigError(
            f"3-D alpha = {alpha:g} with {setting} needs about {cells:.3g} {kind}, an "
            f"estimated {needed / _GIB:.3g} GiB of memory; this machine has "
            f"{memory / _GIB:.3g} GiB: "
            f"{'lower --resolution or --span-cells' if structured else 'raise --size'}"
        )


def estimate_bytes(cells: int, points: int, *, processes: int = 1, history_size: int = 0) -> int:
    """Estimated memory of one case: libraries, solver and outer-iteration history.

    Args:
        cells: cells of the mesh.
        points: closure points (P1 nodes) of the mesh.
        processes: MPI processes that share the case.
        history_size: past iterates the outer iteration keeps (0: none, one-way or Picard).

    Returns:
        Bytes.
    """
    return (
        processes * BASE_BYTES_PER_PROCESS
        + cells * BYTES_PER_CELL
        + history_size * points * HISTORY_BYTES_PER_POINT
    )


def _history_note(points: int, history_size: int) -> str:
    if not history_size:
        return ""
    history = history_size * points * HISTORY_BYTES_PER_POINT / _GIB
    return f" ({history:.3g} GiB of them for a history of {history_size} iterates)"


def check_mesh_size(
    info: dict[str, Any],
    *,
    processes: int = 1,
    memory: int | None = None,
    history_size: int = 0,
) -> None:
    """Refuse a file mesh (read, not yet solved on) too large for the machine.

    Args:
        info: the mesh's ``info`` (:func:`meshes.io.read_mesh`): ``path``, ``num_cells``,
            ``num_vertices``.
        processes: MPI processes that share the case.
        memory: bytes available to them (default: this machine's memory).
        history_size: past iterates the outer iteration keeps (0: none).

    Raises:
        ConfigError: naming the file, with its cells and the estimated memory.
    """
    cells, points = int(info["num_cells"]), int(info["num_vertices"])
    memory = machine_bytes() if memory is None else memory
    needed = estimate_bytes(cells, points, processes=processes, history_size=history_size)
    if needed > memory:
        raise ConfigError(
            f"mesh file {str(info['path'])!r} has {cells} cells: solving on it needs an "
            f"estimated {needed / _GIB:.3g} GiB of memory{_history_note(points, history_size)}; "
            f"this machine has {memory / _GIB:.3g} GiB: coarsen the mesh or run on more machines"
        )


def read_meta(path: Path) -> dict[str, Any]:
    """The ``meta`` of a case file, without reading its arrays.

    Raises:
        ConfigError: naming the file when it cannot be read.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            return json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
        raise ConfigError(
            f"existing case file {str(path)!r} cannot be read ({error}); delete it or rerun "
            "with --overwrite"
        ) from error


def case_differences(
    meta: dict[str, Any], config: GenerateConfig, alpha: float | None
) -> list[str]:
    """Settings of this run that a case file's ``meta`` disagrees with (empty: it matches)."""
    found: list[str] = []

    def differ(a: Any, b: Any) -> bool:
        if isinstance(a, int | float) and isinstance(b, int | float):
            return not math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-15)
        return a != b

    if alpha is not None and differ(meta.get("alpha"), alpha):
        found.append(f"alpha {meta.get('alpha')!r} vs {alpha!r}")
    mesh = meta.get("mesh") if isinstance(meta.get("mesh"), dict) else {}
    wanted = config.mesh
    if mesh.get("kind") != wanted.kind:
        found.append(f"mesh kind {mesh.get('kind')!r} vs {wanted.kind!r}")
    elif wanted.kind == "structured" and getattr(config, "dim", 2) == 3:
        from meshes.hills3d import default_span_cells

        layers = wanted.span_cells or default_span_cells(wanted.resolution)
        for key, value in (("resolution", wanted.resolution), ("span_cells", layers)):
            if differ(mesh.get(key), value):
                found.append(f"mesh {key} {mesh.get(key)!r} vs {value!r}")
    elif wanted.kind == "structured":
        for key in ("resolution", "cell_type"):
            if differ(mesh.get(key), getattr(wanted, key)):
                found.append(f"mesh {key} {mesh.get(key)!r} vs {getattr(wanted, key)!r}")
    elif wanted.kind == "unstructured":
        # gmsh's default wall size: size / 5 in 2-D, size / 3 in 3-D (meshes.hills3d)
        share = 3.0 if getattr(config, "dim", 2) == 3 else 5.0
        wall_size = wanted.wall_size if wanted.wall_size is not None else wanted.size / share
        for key, value in (("size", wanted.size), ("wall_size", wall_size)):
            if differ(mesh.get(key), value):
                found.append(f"mesh {key} {mesh.get(key)!r} vs {value!r}")
    elif Path(str(mesh.get("path"))).name != Path(str(wanted.file)).name:
        found.append(f"mesh file {mesh.get('path')!r} vs {wanted.file!r}")
    found += _flow_source_differences(meta, config)
    try:
        physics = Physics.from_case_meta(meta)
    except (TypeError, ValueError) as error:
        found.append(f"physics unreadable ({error})")
    else:
        found += [f"physics {d}" for d in physics.differences(config.physics)]
    return found


def _flow_source_differences(meta: dict[str, Any], config: GenerateConfig) -> list[str]:
    """A solved flow against an imported one, or another source (by file name) or time."""
    source = meta.get("flow_source") if isinstance(meta.get("flow_source"), dict) else None
    if source is None and config.flow_from is None:
        return []
    if source is None or config.flow_from is None:
        was = "solved" if source is None else repr(source.get("path"))
        wanted = "solved" if config.flow_from is None else repr(config.flow_from)
        return [f"flow {was} vs {wanted}"]
    found = []
    if Path(str(source.get("path"))).name != Path(config.flow_from).name:
        found.append(f"flow source {source.get('path')!r} vs {config.flow_from!r}")
    if config.flow_time != "latest" and str(source.get("time")) != config.flow_time:
        found.append(f"flow time {source.get('time')!r} vs {config.flow_time!r}")
    return found


def check_existing_case(path: Path, config: GenerateConfig, alpha: float | None) -> None:
    """Refuse to skip an existing case file that was generated with other settings.

    Raises:
        ConfigError: naming the file, the settings that differ (file vs this run) and the way
            out (``--overwrite`` or another ``--out``).
    """
    differences = case_differences(read_meta(path), config, alpha)
    if differences:
        raise ConfigError(
            f"existing case file {str(path)!r} was generated with other settings than this "
            f"run ({'; '.join(differences)}; file vs run): rerun with --overwrite to recompute "
            "it, or choose another --out"
        )
