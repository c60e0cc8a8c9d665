"""Channel-with-cylinder mesh (inflow/outflow demonstration), written as a gmsh .msh file.

The default dimensions are those of the classic 2-D flow-around-a-cylinder benchmark: a
2.2 x 0.41 channel with a cylinder of radius 0.05 centred at (0.2, 0.2).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from meshes.tagged import MeshError
from meshes.unstructured import gmsh_session, write_msh_atomic

__all__ = ["CHANNEL_BOUNDARIES", "CHANNEL_FLUID_TAG", "channel_with_cylinder_msh"]

logger = logging.getLogger(__name__)

#: Facet physical-group values of the channel mesh (names are stored in the .msh file too).
CHANNEL_BOUNDARIES: dict[str, int] = {"inlet": 1, "outlet": 2, "walls": 3, "cylinder": 4}

#: Physical-group value of the fluid surface.
CHANNEL_FLUID_TAG: int = 5


def _check_geometry(
    length: float, height: float, center: tuple[float, float], radius: float
) -> None:
    if length <= 0.0 or height <= 0.0:
        raise ValueError(f"channel length and height must be > 0, got {length!r}, {height!r}")
    cx, cy = center
    if radius <= 0.0:
        raise ValueError(f"cylinder radius must be > 0, got {radius!r}")
    if not (radius < cx < length - radius and radius < cy < height - radius):
        raise ValueError(
            f"the cylinder (center={center}, radius={radius}) must lie strictly inside the "
            f"channel [0, {length}] x [0, {height}]"
        )


def channel_with_cylinder_msh(
    path: str | os.PathLike[str],
    *,
    length: float = 2.2,
    height: float = 0.41,
    center: tuple[float, float] = (0.2, 0.2),
    radius: float = 0.05,
    size: float = 0.03,
    cylinder_size: float | None = None,
) -> Path:
    """Mesh a channel around a cylinder with triangles and write it as a gmsh .msh file.

    Physical groups: curves "inlet" (x = 0), "outlet" (x = length), "walls" (y = 0 and
    y = height), "cylinder", with the values of :data:`CHANNEL_BOUNDARIES`, and the surface
    "fluid" (:data:`CHANNEL_FLUID_TAG`). Cells shrink linearly from ``size`` to
    ``cylinder_size`` towards the cylinder. Call it on one process only; read the file back
    with :func:`meshes.io.read_mesh`.

    Args:
        path: destination, must end in ``.msh``; written atomically.
        length: channel length (x extent).
        height: channel height (y extent).
        center: cylinder centre (x, y).
        radius: cylinder radius.
        size: cell size away from the cylinder.
        cylinder_size: cell size on the cylinder; defaults to ``size / 3``.

    Returns:
        The path written.

    Raises:
        ValueError: on inconsistent dimensions or sizes.
        MeshError: if gmsh fails or the path does not end in ``.msh``.
    """
    length, height, radius, size = float(length), float(height), float(radius), float(size)
    center = (float(center[0]), float(center[1]))
    _check_geometry(length, height, center, radius)
    cylinder_size = size / 3.0 if cylinder_size is None else float(cylinder_size)
    if not 0.0 < cylinder_size <= size:
        raise ValueError(
            f"sizes must satisfy 0 < cylinder_size <= size, got size={size}, "
            f"cylinder_size={cylinder_size}"
        )
    path = Path(path)
    if path.suffix != ".msh":
        raise MeshError(f"gmsh mesh files must end in '.msh', got {str(path)!r}")

    try:
        with gmsh_session("channel_with_cylinder") as gmsh:
            occ = gmsh.model.occ
            channel = occ.addRectangle(0.0, 0.0, 0.0, length, height)
            cylinder = occ.addDisk(center[0], center[1], 0.0, radius, radius)
            fluid, _ = occ.cut([(2, channel)], [(2, cylinder)])
            occ.synchronize()
            surfaces = [tag for dim, tag in fluid if dim == 2]
            groups = _classify_channel_curves(gmsh, surfaces, length, height)

            model = gmsh.model
            for name, curves in groups.items():
                model.addPhysicalGroup(1, curves, CHANNEL_BOUNDARIES[name], name=name)
            model.addPhysicalGroup(2, surfaces, CHANNEL_FLUID_TAG, name="fluid")

            fields = model.mesh.field
            distance = fields.add("Distance")
            fields.setNumbers(distance, "CurvesList", groups["cylinder"])
            fields.setNumber(distance, "Sampling", 200)
            threshold = fields.add("Threshold")
            fields.setNumber(threshold, "InField", distance)
            fields.setNumber(threshold, "SizeMin", cylinder_size)
            fields.setNumber(threshold, "SizeMax", size)
            fields.setNumber(threshold, "DistMin", 0.0)
            fields.setNumber(threshold, "DistMax", 4.0 * radius)
            fields.setAsBackgroundMesh(threshold)
            for option in (
                "MeshSizeExtendFromBoundary",
                "MeshSizeFromPoints",
                "MeshSizeFromCurvature",
            ):
                gmsh.option.setNumber(f"Mesh.{option}", 0)
            model.mesh.generate(2)
            write_msh_atomic(gmsh, path)
    except MeshError:
        raise
    except Exception as exc:  # gmsh raises plain Exception
        raise MeshError(f"gmsh failed to mesh the channel with a cylinder: {exc}") from exc
    logger.info("wrote channel-with-cylinder mesh %s", path)
    return path


def _classify_channel_curves(
    gmsh: Any, surfaces: list[int], length: float, height: float
) -> dict[str, list[int]]:
    """Sort the boundary curves of the fluid surface into inlet, outlet, walls and cylinder."""
    boundary = gmsh.model.getBoundary([(2, tag) for tag in surfaces], oriented=False)
    groups: dict[str, list[int]] = {name: [] for name in CHANNEL_BOUNDARIES}
    tolerance = 1e-8 * max(length, height)
    for _, curve in boundary:
        x, y, _ = gmsh.model.occ.getCenterOfMass(1, curve)
        if np.isclose(x, 0.0, atol=tolerance):
            groups["inlet"].append(curve)
        elif np.isclose(x, length, atol=tolerance):
            groups["outlet"].append(curve)
        elif np.isclose(y, 0.0, atol=tolerance) or np.isclose(y, height, atol=tolerance):
            groups["walls"].append(curve)
        else:
            groups["cylinder"].append(curve)
    missing = [name for name, curves in groups.items() if not curves]
    if missing:
        raise MeshError(f"could not identify the channel boundaries {missing}")
    return groups
