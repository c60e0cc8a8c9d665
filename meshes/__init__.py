"""Geometry families (gmsh; 2-D and 3-D hills) and mesh import (meshio, .msh) into dolfinx meshes.

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
from meshes.hills3d import (
    HILL3D_BOUNDARIES,
    MAX_CREST_AMPLITUDE,
    SPAN_LENGTH,
    crest_height,
    default_span_cells,
    hill3d_bottom,
    map_to_crest_variant,
    structured_hill3d_grid,
    structured_hill3d_mesh,
    tag_hill3d_facets,
    unstructured_hill3d_mesh,
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
    "HILL3D_BOUNDARIES",
    "HILL_BOUNDARIES",
    "MAX_CREST_AMPLITUDE",
    "MeshError",
    "SPAN_LENGTH",
    "TOP_WALL_HEIGHT",
    "TaggedMesh",
    "channel_with_cylinder_msh",
    "crest_height",
    "default_span_cells",
    "hill3d_bottom",
    "hill_flank_length",
    "hill_period",
    "hill_profile",
    "hill_profile_derivative",
    "map_to_crest_variant",
    "read_mesh",
    "structured_hill3d_grid",
    "structured_hill3d_mesh",
    "structured_hill_grid",
    "structured_hill_mesh",
    "tag_hill3d_facets",
    "unstructured_hill3d_mesh",
    "unstructured_hill_mesh",
    "wall_normal_coordinates",
]
