"""Geometry families (gmsh) and mesh import (meshio, .msh) into dolfinx meshes.

Importing this package needs only numpy: dolfinx, gmsh and meshio are imported by the
functions that use them.
"""

from meshes.channel import CHANNEL_BOUNDARIES, channel_with_cylinder_msh
from meshes.hills import (
    TOP_WALL_HEIGHT,
    hill_flank_length,
    hill_period,
    hill_profile,
    hill_profile_derivative,
)
from meshes.io import read_mesh
from meshes.structured import (
    DEFAULT_WALL_GRADING,
    structured_hill_grid,
    structured_hill_mesh,
    wall_normal_coordinates,
)
from meshes.tagged import HILL_BOUNDARIES, MeshError, TaggedMesh
from meshes.unstructured import unstructured_hill_mesh

__all__ = [
    "CHANNEL_BOUNDARIES",
    "DEFAULT_WALL_GRADING",
    "HILL_BOUNDARIES",
    "MeshError",
    "TOP_WALL_HEIGHT",
    "TaggedMesh",
    "channel_with_cylinder_msh",
    "hill_flank_length",
    "hill_period",
    "hill_profile",
    "hill_profile_derivative",
    "read_mesh",
    "structured_hill_grid",
    "structured_hill_mesh",
    "unstructured_hill_mesh",
    "wall_normal_coordinates",
]
