"""Read user meshes (gmsh .msh or any meshio-readable file) into tagged dolfinx meshes.

Boundary facets must be tagged in the file: gmsh physical groups for .msh files, or integer
cell data (``gmsh:physical``, ``medit:ref``, ``cell_tags`` ...) on the facet cells for other
formats. Boundary names come from the file where it has them (gmsh ``$PhysicalNames``, meshio
``field_data``) and can be overridden with ``boundaries={name: tag}``. Periodicity of user meshes
is not read from files (``period`` is zero); the run configuration supplies it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from meshes.tagged import MeshError, TaggedMesh
from meshes.unstructured import gmsh_session

if TYPE_CHECKING:
    from mpi4py import MPI

    import dolfinx.mesh

__all__ = ["CELL_TAG_KEYS", "MeshError", "read_mesh", "read_meshio", "read_xdmf_fields"]

logger = logging.getLogger(__name__)

#: meshio cell-data keys that hold integer region/boundary markers, in order of preference.
CELL_TAG_KEYS: tuple[str, ...] = (
    "gmsh:physical",
    "medit:ref",
    "cell_tags",
    "CellEntityIds",
    "tags",
    "markers",
    "flac3d:zone",
    "gmsh:geometrical",
)

# First-order cell types dolfinx can be built from, with their topological dimension.
_MESHIO_DOMAIN_CELLS = {"triangle": 2, "quad": 2, "tetra": 3, "hexahedron": 3}
_MESHIO_FACET_CELLS = {2: ("line",), 3: ("triangle", "quad")}
_DOLFINX_CELL_NAMES = {
    "triangle": "triangle",
    "quad": "quadrilateral",
    "tetra": "tetrahedron",
    "hexahedron": "hexahedron",
}
# A z column whose magnitude stays below this (relative to the mesh size) counts as 2-D.
_FLAT_TOLERANCE = 1e-12


def read_mesh(
    path: str | os.PathLike[str],
    *,
    comm: MPI.Comm | None = None,
    boundaries: dict[str, int] | None = None,
) -> TaggedMesh:
    """Read a mesh file into a distributed dolfinx mesh with facet tags.

    ``.msh`` files are read with gmsh (physical groups of the highest dimension are the cells,
    those one dimension lower the tagged facets); every other extension goes through
    ``meshio.read``. Rank 0 reads the file and dolfinx distributes the mesh. Planar meshes whose
    z coordinate is zero become 2-D meshes.

    Args:
        path: mesh file.
        comm: MPI communicator; defaults to ``MPI.COMM_WORLD``.
        boundaries: boundary role name -> facet tag value. Replaces the names stored in the
            file; every value must occur among the facet tags. Without it (and without names
            in the file) each facet tag value ``v`` is named ``"boundary_v"``.

    Returns:
        The tagged mesh, ``kind="file"``, ``period`` all zeros, ``info`` with the path, format,
        cell type and global cell/vertex counts.

    Raises:
        MeshError: if the file is missing or unreadable, holds no cells of the domain dimension
            or no tagged facets, or a requested boundary tag does not occur in it.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    path = Path(path)
    missing = None
    if comm.rank == 0 and not path.is_file():
        missing = f"mesh file {str(path)!r} does not exist (or is not a regular file)"
    missing = comm.bcast(missing, root=0)
    if missing is not None:
        raise MeshError(missing)

    if path.suffix.lower() == ".msh":
        mesh, facet_tags, cell_tags, names, file_format = _read_gmsh(path, comm)
    else:
        mesh, facet_tags, cell_tags, names, file_format = _read_meshio(path, comm)

    present = _global_tag_values(facet_tags, comm)
    if present.size == 0:
        raise MeshError(
            f"mesh file {str(path)!r} has no tagged boundary facets: tag the boundaries "
            f"(gmsh physical curves/surfaces, or integer cell data such as 'gmsh:physical' or "
            f"'medit:ref' on the facet cells)"
        )
    boundaries = _resolve_boundaries(path, names, present, boundaries)
    tdim = mesh.topology.dim
    info = {
        "path": str(path),
        "format": file_format,
        "cell_type": mesh.topology.cell_name(),
        "num_cells": int(mesh.topology.index_map(tdim).size_global),
        "num_vertices": int(mesh.topology.index_map(0).size_global),
        "facet_tag_values": [int(v) for v in present],
    }
    if comm.rank == 0:
        logger.debug("read %s mesh %s: %d cells", file_format, path, info["num_cells"])
    return TaggedMesh(
        mesh=mesh,
        facet_tags=facet_tags,
        boundaries=boundaries,
        period=np.zeros(mesh.geometry.dim),
        kind="file",
        info=info,
        cell_tags=cell_tags,
    )


def _global_tag_values(tags: dolfinx.mesh.MeshTags | None, comm: MPI.Comm) -> np.ndarray:
    local = np.unique(tags.values) if tags is not None else np.empty(0, dtype=np.int32)
    return np.unique(np.concatenate(comm.allgather(local))).astype(np.int64)


def _resolve_boundaries(
    path: Path, names: dict[str, int], present: np.ndarray, requested: dict[str, int] | None
) -> dict[str, int]:
    if requested is None:
        named = {name: tag for name, tag in names.items() if tag in present}
        unnamed = [int(tag) for tag in present if tag not in named.values()]
        return named | {f"boundary_{tag}": tag for tag in unnamed}
    absent = {name: tag for name, tag in requested.items() if int(tag) not in present}
    if absent:
        known = ", ".join(
            f"{tag}" + (f" ({name})" if name else "")
            for tag in present
            for name in [next((n for n, t in names.items() if t == tag), "")]
        )
        raise MeshError(
            f"requested boundaries {absent} are not facet tags of {str(path)!r}; "
            f"facet tags in the file: {known}"
        )
    return {str(name): int(tag) for name, tag in requested.items()}


def _read_gmsh(path: Path, comm: MPI.Comm) -> tuple[Any, Any, Any, dict[str, int], str]:
    """Read a .msh file on rank 0 with gmsh and distribute it."""
    import dolfinx.io.gmsh

    with contextlib.ExitStack() as stack:
        gmsh = None
        header: dict[str, Any] = {"error": None}
        if comm.rank == 0:
            try:
                gmsh = stack.enter_context(gmsh_session("read_mesh"))
                gmsh.merge(str(path))
                header = _inspect_gmsh_model(gmsh, path)
            except MeshError as exc:
                header = {"error": str(exc)}
            except Exception as exc:  # gmsh raises plain Exception
                header = {"error": f"gmsh cannot read {str(path)!r}: {exc}"}
        # Agree on success before the collective mesh creation, or other ranks would hang.
        header = comm.bcast(header, root=0)
        if header["error"] is not None:
            raise MeshError(header["error"])
        mesh_data = dolfinx.io.gmsh.model_to_mesh(
            gmsh.model if gmsh is not None else None, comm, 0, gdim=header["gdim"]
        )
    tdim = mesh_data.mesh.topology.dim
    names = {
        name: int(tag) for name, (dim, tag) in mesh_data.physical_groups.items() if dim == tdim - 1
    }
    return mesh_data.mesh, mesh_data.facet_tags, mesh_data.cell_tags, names, "gmsh"


def _inspect_gmsh_model(gmsh: Any, path: Path) -> dict[str, Any]:
    """Check a loaded gmsh model has tagged cells and facets; find its geometric dimension."""
    groups = gmsh.model.getPhysicalGroups()
    element_dims = [dim for dim in range(4) if len(gmsh.model.mesh.getElements(dim)[0])]
    if not element_dims or max(element_dims) < 1:
        raise MeshError(f"{str(path)!r} contains no mesh elements (was the mesh generated?)")
    tdim = max(element_dims)
    if not any(dim == tdim for dim, _ in groups):
        raise MeshError(
            f"{str(path)!r} has no physical group of dimension {tdim}: gmsh files must tag the "
            f"domain cells (and the boundary facets) with physical groups"
        )
    if not any(dim == tdim - 1 for dim, _ in groups):
        raise MeshError(
            f"mesh file {str(path)!r} has no tagged boundary facets: add physical groups of "
            f"dimension {tdim - 1} for the boundaries"
        )
    _, coordinates, _ = gmsh.model.mesh.getNodes()
    coordinates = np.asarray(coordinates).reshape(-1, 3)
    gdim = 3
    if tdim <= 2 and _is_flat(coordinates):
        gdim = 2
    return {"error": None, "gdim": gdim}


def _is_flat(points: np.ndarray) -> bool:
    if points.shape[1] < 3 or points.size == 0:
        return True
    scale = max(float(np.ptp(points[:, :2], axis=0).max()), 1.0)
    return bool(np.abs(points[:, 2]).max() <= _FLAT_TOLERANCE * scale)


def _read_meshio(path: Path, comm: MPI.Comm) -> tuple[Any, Any, Any, dict[str, int], str]:
    """Read any meshio format on rank 0 and distribute it with dolfinx."""
    import basix.ufl
    import dolfinx.mesh
    import ufl

    header: dict[str, Any] = {"error": None}
    arrays: dict[str, np.ndarray] = {}
    if comm.rank == 0:
        try:
            header, arrays = _meshio_arrays(path)
        except MeshError as exc:
            header = {"error": str(exc)}
    header = comm.bcast(header, root=0)
    if header["error"] is not None:
        raise MeshError(header["error"])

    cell_name, gdim, tdim = header["cell_name"], header["gdim"], header["tdim"]
    vertices_per_cell, vertices_per_facet = header["vertices_per_cell"], header["vertices_per_facet"]
    if comm.rank != 0:
        arrays = {
            "points": np.empty((0, gdim)),
            "cells": np.empty((0, vertices_per_cell), dtype=np.int64),
            "cell_values": np.empty(0, dtype=np.int32),
            "facets": np.empty((0, vertices_per_facet), dtype=np.int64),
            "facet_values": np.empty(0, dtype=np.int32),
        }
    domain = ufl.Mesh(basix.ufl.element("Lagrange", cell_name, 1, shape=(gdim,)))
    mesh = dolfinx.mesh.create_mesh(comm, arrays["cells"], domain, arrays["points"])
    facet_tags = _entity_tags(mesh, tdim - 1, arrays["facets"], arrays["facet_values"])
    cell_tags = None
    if header["has_cell_values"]:
        cell_tags = _entity_tags(mesh, tdim, arrays["cells"], arrays["cell_values"])
    return mesh, facet_tags, cell_tags, header["names"], f"meshio:{header['format']}"


def _entity_tags(
    mesh: dolfinx.mesh.Mesh, dim: int, entities: np.ndarray, values: np.ndarray
) -> dolfinx.mesh.MeshTags:
    """MeshTags from entities given as input node indices (rank 0 holds them all)."""
    import dolfinx.graph
    import dolfinx.io
    import dolfinx.mesh

    local_entities, local_values = dolfinx.io.distribute_entity_data(
        mesh, dim, entities.astype(np.int64), values.astype(np.int32)
    )
    mesh.topology.create_connectivity(dim, mesh.topology.dim)
    tags = dolfinx.mesh.meshtags_from_entities(
        mesh,
        dim,
        dolfinx.graph.adjacencylist(local_entities),
        local_values.astype(np.int32, copy=False),
    )
    tags.name = "facet_tags" if dim == mesh.topology.dim - 1 else "cell_tags"
    return tags


def read_meshio(path: Path, *, error: type[Exception] = MeshError, what: str = "") -> Any:
    """``meshio.read(path)``, with every failure raised as one ``error`` that says why.

    Args:
        path: the file.
        error: the exception class to raise.
        what: words put before the path in the message (e.g. ``"flow source "``).

    Returns:
        The ``meshio.Mesh``.
    """
    import meshio

    messages = io.StringIO()
    try:
        # meshio reports some failures by printing and calling sys.exit, hence SystemExit.
        with contextlib.redirect_stdout(messages), contextlib.redirect_stderr(messages):
            return meshio.read(path)
    except (Exception, SystemExit) as exc:
        detail = messages.getvalue().strip() or str(exc) or type(exc).__name__
        raise error(f"meshio cannot read {what}{str(path)!r}: {detail}") from None


def _meshio_arrays(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Load a file with meshio and extract first-order cells, tagged facets and names."""
    data = read_meshio(path)

    blocks = [(block.type, np.asarray(block.data)) for block in data.cells]
    domain_types = {cell_type for cell_type, _ in blocks if cell_type in _MESHIO_DOMAIN_CELLS}
    if not domain_types:
        found = sorted({cell_type for cell_type, _ in blocks}) or "none"
        raise MeshError(
            f"{str(path)!r} has no first-order triangle, quad, tetra or hexahedron cells "
            f"(cell types found: {found})"
        )
    tdim = max(_MESHIO_DOMAIN_CELLS[cell_type] for cell_type in domain_types)
    domain_types = {t for t in domain_types if _MESHIO_DOMAIN_CELLS[t] == tdim}
    if len(domain_types) > 1:
        raise MeshError(
            f"{str(path)!r} mixes cell types {sorted(domain_types)}; use a single cell type"
        )
    (domain_type,) = domain_types

    tag_key = next((key for key in CELL_TAG_KEYS if key in data.cell_data), None)
    cells, cell_values, facets, facet_values = [], [], [], []
    for index, (cell_type, connectivity) in enumerate(blocks):
        block_values = None
        if tag_key is not None:
            block_values = np.asarray(data.cell_data[tag_key][index]).reshape(-1)
        if cell_type == domain_type:
            cells.append(connectivity)
            if block_values is not None:
                cell_values.append(block_values)
        elif cell_type in _MESHIO_FACET_CELLS[tdim] and block_values is not None:
            facets.append(connectivity)
            facet_values.append(block_values)

    cells_array = np.concatenate(cells).astype(np.int64)
    points = np.asarray(data.points, dtype=np.float64)
    # Keep only referenced nodes: many writers also store unused geometry points.
    used, cells_array = np.unique(cells_array, return_inverse=True)
    cells_array = cells_array.reshape(-1, cells[0].shape[1])
    points = points[used]
    gdim = points.shape[1]
    if tdim == 2 and gdim == 3 and _is_flat(points):
        points, gdim = points[:, :2].copy(), 2

    vertices_per_facet = {2: 2, 3: 4 if domain_type == "hexahedron" else 3}[tdim]
    # A hexahedral file may also carry triangles (e.g. a surface mesh); keep matching facets.
    matching = [i for i, block in enumerate(facets) if block.shape[1] == vertices_per_facet]
    facets = [facets[i] for i in matching]
    facet_values = [facet_values[i] for i in matching]
    if not facets:
        raise MeshError(
            f"mesh file {str(path)!r} has no tagged boundary facets: add {_MESHIO_FACET_CELLS[tdim]}"
            f" cells with integer cell data {CELL_TAG_KEYS[:3]} marking the boundaries"
        )
    facets_array = np.concatenate(facets).astype(np.int64)
    facet_values_array = np.concatenate(facet_values).astype(np.int32)
    # Facets are given in file node numbers; drop those not on the domain cells' nodes.
    position = np.searchsorted(used, facets_array)
    position = np.minimum(position, used.size - 1)
    on_domain = np.all(used[position] == facets_array, axis=1)
    facets_array, facet_values_array = position[on_domain], facet_values_array[on_domain]

    cells_array = _to_dolfinx_order(cells_array, domain_type)
    names = {
        str(name): int(value[0])
        for name, value in data.field_data.items()
        if np.size(value) >= 2 and int(value[1]) == tdim - 1
    }
    header = {
        "error": None,
        "cell_name": _DOLFINX_CELL_NAMES[domain_type],
        "gdim": gdim,
        "tdim": tdim,
        "vertices_per_cell": cells_array.shape[1],
        "vertices_per_facet": vertices_per_facet,
        "has_cell_values": len(cell_values) == len(cells),
        "names": names,
        "format": path.suffix.lstrip(".").lower() or "unknown",
    }
    arrays = {
        "points": points,
        "cells": cells_array,
        "cell_values": (
            np.concatenate(cell_values).astype(np.int32)
            if header["has_cell_values"]
            else np.empty(0, dtype=np.int32)
        ),
        "facets": facets_array,
        "facet_values": facet_values_array,
    }
    return header, arrays


def _to_dolfinx_order(cells: np.ndarray, meshio_type: str) -> np.ndarray:
    """Permute meshio (VTK) vertex order to dolfinx order."""
    import dolfinx.io.utils
    import dolfinx.mesh

    cell_type = dolfinx.mesh.to_type(_DOLFINX_CELL_NAMES[meshio_type])
    permutation = dolfinx.io.utils.cell_perm_vtk(cell_type, cells.shape[1])
    return cells[:, permutation]


#: Names :func:`read_xdmf_fields` gives the mesh; no field may take them.
_XDMF_MESH_KEYS = ("points", "cells")


def read_xdmf_fields(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Mesh and fields of an XDMF file written by ``vcnn generate`` or ``vcnn simulate``.

    dolfinx writes the mesh and one temporal grid per function into one ``.xdmf`` (the XML)
    and its ``.h5`` (the arrays); ``meshio.read`` takes only one grid ("Only supports one
    grid") and ``meshio.xdmf.TimeSeriesReader`` only the last function, so this reads the XML
    with the standard library and every array it names with h5py (``Format="XML"`` inline
    arrays as well). ParaView opens the same file (the ``Xdmf3ReaderT`` reader).

    Args:
        path: the ``.xdmf`` file (its ``.h5`` is found through the names it holds).

    Returns:
        ``points`` (N, gdim) float64 and ``cells`` (M, nodes per cell) int64 of the mesh, and
        each field by its name at its last time step: (N,) for a scalar, (N, 3) for a vector
        (dolfinx pads 2-D vectors with a zero z component); a cell field has M rows.

    Raises:
        MeshError: the file is missing, not dolfinx XDMF, or h5py is not installed.
    """
    import xml.etree.ElementTree as ElementTree

    path = Path(path)
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError) as error:
        raise MeshError(f"cannot read the XDMF file {str(path)!r}: {error}") from None
    grids = [g for g in root.iter("Grid") if g.find("Topology") is not None]
    if not grids or grids[0].find("Geometry") is None:
        raise MeshError(f"XDMF file {str(path)!r} has no grid with a topology and a geometry")
    mesh = grids[0]
    files: dict[Path, Any] = {}
    try:
        fields = {
            "points": _xdmf_array(mesh.find("Geometry/DataItem"), path, files),
            "cells": _xdmf_array(mesh.find("Topology/DataItem"), path, files).astype(np.int64),
        }
        for attribute in root.iter("Attribute"):  # in file order: a later step replaces
            name = attribute.get("Name", "")
            if name in _XDMF_MESH_KEYS:
                raise MeshError(f"XDMF file {str(path)!r} has a field named {name!r}")
            values = _xdmf_array(attribute.find("DataItem"), path, files)
            fields[name] = values[:, 0] if values.ndim == 2 and values.shape[1] == 1 else values
    finally:
        for handle in files.values():
            handle.close()
    return fields


def _xdmf_array(item: Any, path: Path, files: dict[Path, Any]) -> np.ndarray:
    """The array of one XDMF ``DataItem``: an HDF5 dataset (``file.h5:/group/name``) or XML."""
    if item is None:
        raise MeshError(f"XDMF file {str(path)!r} has an element without a DataItem")
    shape = tuple(int(n) for n in item.get("Dimensions", "").split())
    text = (item.text or "").strip()
    if item.get("Format", "XML") == "XML":
        return np.asarray(text.split(), dtype=np.float64).reshape(shape)
    if item.get("Format") != "HDF":
        raise MeshError(f"XDMF file {str(path)!r}: data format {item.get('Format')!r}")
    try:
        import h5py
    except ImportError:
        raise MeshError(
            "reading XDMF output needs h5py: pip install h5py (part of 'vcnn-closures[fem]')"
        ) from None
    name, _, dataset = text.partition(":/")
    h5 = path.parent / name
    if h5 not in files:
        try:
            files[h5] = h5py.File(h5, "r")
        except OSError as error:
            raise MeshError(f"cannot read {str(h5)!r}, named by {str(path)!r}: {error}") from None
    try:
        values = np.asarray(files[h5]["/" + dataset])
    except KeyError:
        raise MeshError(f"{str(h5)!r} has no dataset /{dataset} (named by {str(path)!r})") from None
    return values.reshape(shape) if shape else values
