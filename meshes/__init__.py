"""Geometry families (gmsh) and mesh import (meshio, .msh) into dolfinx meshes."""
