"""A dolfinx mesh bundled with its boundary tags, periodicity and provenance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import dolfinx.mesh

__all__ = ["HILL_BOUNDARIES", "MESH_KINDS", "MeshError", "TaggedMesh"]

#: Facet tag values of the periodic-hill meshes: walls, then the periodic sides x = 0 and x = L.
HILL_BOUNDARIES: dict[str, int] = {"bottom": 1, "top": 2, "left": 3, "right": 4}

#: Allowed values of :attr:`TaggedMesh.kind`.
MESH_KINDS: tuple[str, ...] = ("structured", "unstructured", "file")


class MeshError(ValueError):
    """A mesh cannot be built or read, or it lacks something the caller asked for."""


@dataclass(frozen=True)
class TaggedMesh:
    """A mesh with named boundary tags.

    Attributes:
        mesh: the distributed dolfinx mesh.
        facet_tags: facet MeshTags (dimension ``tdim - 1``); values are those of ``boundaries``.
        boundaries: boundary role name -> facet tag value, e.g. :data:`HILL_BOUNDARIES`.
        period: ``(d,)`` float64 periodic lengths, 0 where not periodic.
        kind: "structured" | "unstructured" | "file".
        info: JSON-serialisable description (alpha, resolution, cell counts, sizes, path ...).
        cell_tags: optional cell MeshTags (subdomains), e.g. from a gmsh physical surface.
    """

    mesh: dolfinx.mesh.Mesh
    facet_tags: dolfinx.mesh.MeshTags
    boundaries: dict[str, int]
    period: np.ndarray
    kind: str
    info: dict[str, Any] = field(default_factory=dict)
    cell_tags: dolfinx.mesh.MeshTags | None = None

    def __post_init__(self) -> None:
        if self.kind not in MESH_KINDS:
            raise MeshError(f"mesh kind must be one of {MESH_KINDS}, got {self.kind!r}")
        gdim = self.mesh.geometry.dim
        period = np.asarray(self.period, dtype=np.float64)
        if period.shape != (gdim,):
            raise MeshError(
                f"period must have one entry per coordinate, shape ({gdim},), got {period.shape}"
            )
        # Frozen dataclass: bypass __setattr__ to store the normalised array.
        object.__setattr__(self, "period", period)

    def tag(self, name: str) -> int:
        """Facet tag value of a named boundary.

        Args:
            name: boundary role name, a key of ``boundaries``.

        Returns:
            The facet tag value.

        Raises:
            MeshError: if the mesh has no boundary of that name.
        """
        try:
            return self.boundaries[name]
        except KeyError:
            raise MeshError(
                f"mesh has no boundary named {name!r}; known boundaries: "
                f"{sorted(self.boundaries)} (pass boundaries={{name: tag}} to name facet tags)"
            ) from None

    def facets(self, name: str) -> np.ndarray:
        """Local indices of the facets of a named boundary on this process.

        Args:
            name: boundary role name, a key of ``boundaries``.

        Returns:
            ``(n,)`` int32 local facet indices (owned and ghost), possibly empty.

        Raises:
            MeshError: if the mesh has no boundary of that name.
        """
        return self.facet_tags.find(self.tag(name))
