"""Derived fields at the closure points: strain rate, wall distance, mixing length, volumes.

Every field here lives in (or is sampled at) a scalar P1 space ``V``: the P1 degrees of
freedom are the points where the closure variable tau is solved for and where the case files
store nodal data (docs/design.md).

Choices made here:

- Cell-wise quantities (the strain rate of a P2 velocity is discontinuous) are brought to P1
  by an L2 projection with a lumped mass matrix, ``f_i = (int q phi_i dx) / (int phi_i dx)``.
  That is a local, positivity-preserving average of ``q`` over the patch of node ``i``; it is
  exact for constants and converges (first order in general, second on uniform meshes) under
  refinement. No linear solve is needed, so it is cheap and parallel-safe.
- Wall distance is the exact Euclidean distance to the piecewise-linear wall (the mesh's wall
  facets), not a PDE-based approximation. A quadrilateral wall facet of a hexahedral mesh is
  taken as two triangles: exact where the facet is planar (flat walls, the extruded hill), a
  second-order approximation of a warped bilinear facet.
"""

from __future__ import annotations

from mpi4py import MPI  # noqa: F401  (MPI must be initialised before dolfinx)

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import dolfinx
import numpy as np
import ufl
from dolfinx import fem
from scipy.spatial import cKDTree

from vcnn.physics import KAPPA, MIXING_LENGTH_CAP

if TYPE_CHECKING:
    from solvers.periodic import PeriodicConstraint

logger = logging.getLogger(__name__)


__all__ = [
    "KAPPA",
    "LumpedProjector",
    "MIXING_LENGTH_CAP",
    "distance_to_facets",
    "lumped_projection",
    "mixing_length",
    "nodal_values",
    "nodal_volumes",
    "strain_rate_expression",
    "strain_rate_magnitude",
    "wall_distance",
    "wall_distance_function",
    "wall_segments",
]


def _require_scalar_p1(V: fem.FunctionSpace) -> None:
    element = V.element.basix_element
    if V.dofmap.index_map_bs != 1 or element.degree != 1:
        raise ValueError(
            "expected a scalar P1 function space, e.g. "
            "dolfinx.fem.functionspace(mesh, ('Lagrange', 1)); got block size "
            f"{V.dofmap.index_map_bs} and degree {element.degree}"
        )


def _assemble_lumped(form: ufl.Form | fem.Form, V: fem.FunctionSpace) -> dolfinx.la.Vector:
    """Assemble a linear form on V and accumulate the ghost contributions on their owners."""
    vector = fem.assemble_vector(form if isinstance(form, fem.Form) else fem.form(form))
    vector.scatter_reverse(dolfinx.la.InsertMode.add)
    vector.scatter_forward()
    return vector


def _combine_periodic(values: np.ndarray, V: fem.FunctionSpace, constraint) -> np.ndarray:
    """Sum the values of periodic copies onto the master, then copy back to the slaves.

    Args:
        values: (N_local,) float64 values of all local dofs (owned and ghost) of V.
        V: the scalar P1 space ``constraint`` was built on.
        constraint: a :class:`solvers.periodic.PeriodicConstraint`.

    Returns:
        (N_local,) float64: master and slave copies both carry the sum of their values.
    """
    full = fem.Function(V)
    full.x.array[:] = values
    full.x.scatter_forward()
    reduced = constraint.restrict_vector(full.x.petsc_vec)
    constraint.prolong(reduced, full.x.petsc_vec)
    full.x.scatter_forward()
    reduced.destroy()
    return full.x.array.copy()


class LumpedProjector:
    """The lumped L2 projection of one UFL expression onto P1, compiled once, rerun on demand.

    The expression's coefficients (e.g. a velocity Function that a coupled run updates in
    place) are read at every :meth:`project`, so a loop reprojects without recompiling.

    Attributes:
        result: the P1 Function that :meth:`project` writes, ``f_i = int(q phi_i) / int(phi_i)``.
    """

    def __init__(
        self,
        expression: ufl.core.expr.Expr,
        V: fem.FunctionSpace,
        *,
        constraint: PeriodicConstraint | None = None,
        name: str | None = None,
    ) -> None:
        """Compile the form and assemble the lumped mass.

        Args:
            expression: scalar UFL expression on ``V.mesh`` (may be discontinuous).
            V: scalar P1 space.
            constraint: when given, the patches of periodic copies are joined (numerator and
                denominator summed across the periodic boundary) so both copies get the same
                value, the average over the whole periodic patch.
            name: name of :attr:`result`.
        """
        _require_scalar_p1(V)
        self.V = V
        self._constraint = constraint
        test = ufl.TestFunction(V)
        self._numerator_form = fem.form(expression * test * ufl.dx)
        denominator = _assemble_lumped(test * ufl.dx, V).array
        if constraint is not None:
            denominator = _combine_periodic(denominator, V, constraint)
        self._denominator = denominator
        self.result = fem.Function(V, name=name)

    def project(self) -> fem.Function:
        """Assemble the numerator for the current coefficients; returns :attr:`result`."""
        numerator = _assemble_lumped(self._numerator_form, self.V).array
        if self._constraint is not None:
            numerator = _combine_periodic(numerator, self.V, self._constraint)
        self.result.x.array[:] = numerator / self._denominator
        self.result.x.scatter_forward()
        return self.result


def lumped_projection(
    expression: ufl.core.expr.Expr,
    V: fem.FunctionSpace,
    *,
    constraint: PeriodicConstraint | None = None,
) -> fem.Function:
    """L2-project a scalar UFL expression onto P1 with the lumped mass matrix (once).

    See :class:`LumpedProjector`, which compiles the form once for repeated projections.

    Args:
        expression: scalar UFL expression on ``V.mesh`` (may be discontinuous).
        V: scalar P1 space.
        constraint: when given, the patches of periodic copies are joined (numerator and
            denominator summed across the periodic boundary) so both copies get the same
            value, the average over the whole periodic patch.

    Returns:
        P1 Function with ``f_i = int(q phi_i) / int(phi_i)`` (ghosts updated).
    """
    return LumpedProjector(expression, V, constraint=constraint).project()


def strain_rate_expression(u: fem.Function | ufl.core.expr.Expr) -> ufl.core.expr.Expr:
    """UFL expression of ``|S| = sqrt(2 S:S)`` with ``S = sym(grad u)``."""
    strain = ufl.sym(ufl.grad(u))
    return ufl.sqrt(2.0 * ufl.inner(strain, strain))


def strain_rate_magnitude(
    u: fem.Function,
    V: fem.FunctionSpace,
    *,
    constraint: PeriodicConstraint | None = None,
) -> fem.Function:
    """Strain-rate magnitude ``|S| = sqrt(2 S:S)`` of a velocity, as a P1 Function.

    The cell-wise ``|S|`` of ``u`` (e.g. P2 velocity, so |S| is a discontinuous piecewise
    linear-ish field) is brought to the P1 nodes by the lumped L2 projection of
    :func:`lumped_projection`. It is exact for linear velocities (constant |S|), and converges
    under mesh refinement for smooth flows.

    Args:
        u: vector velocity Function on ``V.mesh``, values (d,) float64.
        V: scalar P1 space.
        constraint: optional periodic constraint: periodic copies then get equal values.

    Returns:
        P1 Function holding |S| >= 0 at the P1 dofs.
    """
    if u.function_space.mesh is not V.mesh:
        raise ValueError("the velocity and the P1 space must live on the same mesh")
    return lumped_projection(strain_rate_expression(u), V, constraint=constraint)


def wall_segments(
    mesh: dolfinx.mesh.Mesh,
    facet_tags: dolfinx.mesh.MeshTags,
    wall_tags: Sequence[int],
) -> np.ndarray:
    """Vertex coordinates of every wall facet of the mesh, gathered on all ranks.

    Wall facets are O(N^{(d-1)/d}) of the mesh, so every rank holding all of them is cheap
    and makes the distance computation purely local.

    Args:
        mesh: the mesh (affine geometry: curved higher-order facets are taken as straight).
        facet_tags: facet markers of ``mesh``.
        wall_tags: tags of the facets that are walls.

    Returns:
        (M, d, gdim) float64: the d vertices of each of the M wall facets (segments in 2-D,
        triangles in 3-D; each quadrilateral facet of a hexahedral mesh is split into two
        triangles, so M counts those). Facets shared as ghosts may appear twice, which is
        harmless.
    """
    tdim = mesh.topology.dim
    gdim = mesh.geometry.dim
    if facet_tags.dim != tdim - 1:
        raise ValueError(f"facet_tags must tag facets (dim {tdim - 1}), got dim {facet_tags.dim}")
    wall_tags = [int(tag) for tag in wall_tags]
    if not wall_tags:
        raise ValueError("wall_tags is empty: name at least one wall facet tag")
    facets = np.unique(np.concatenate([facet_tags.find(tag) for tag in wall_tags]))
    facets = facets.astype(np.int32)
    facet_type = dolfinx.cpp.mesh.cell_entity_type(mesh.topology.cell_type, tdim - 1, 0)
    quadrilateral = facet_type == dolfinx.mesh.CellType.quadrilateral
    if facets.size:
        mesh.topology.create_connectivity(tdim - 1, tdim)
        nodes = dolfinx.mesh.entities_to_geometry(mesh, tdim - 1, facets)
        if quadrilateral:
            # dolfinx numbers a quadrilateral's vertices in tensor-product order, so going
            # round it is 0, 1, 3, 2: the diagonal 0-3 splits it into two triangles. (The
            # first four nodes are the vertices, also for a higher-order geometry.)
            corners = np.concatenate([nodes[:, [0, 1, 3]], nodes[:, [0, 3, 2]]])
        else:
            # Only the facet's vertices: for a higher-order geometry the first tdim nodes of
            # a facet (a simplex) are its vertices, the rest are edge/interior nodes.
            corners = nodes[:, :tdim]
        local = mesh.geometry.x[corners, :gdim]
    else:
        local = np.empty((0, tdim, gdim), dtype=np.float64)
    gathered = mesh.comm.allgather(np.ascontiguousarray(local, dtype=np.float64))
    segments = np.concatenate(gathered, axis=0)
    if segments.shape[0] == 0:
        raise ValueError(f"no facet of the mesh carries any of the wall tags {wall_tags}")
    return segments


def _periodic_images(segments: np.ndarray, period: np.ndarray) -> np.ndarray:
    """Copies of the wall facets shifted by -1, 0, +1 periods in every periodic direction."""
    shifts = [np.zeros(segments.shape[-1])]
    for axis, length in enumerate(period):
        if length == 0:
            continue
        unit = np.zeros(segments.shape[-1])
        unit[axis] = length
        shifts = [s + k * unit for s in shifts for k in (-1.0, 0.0, 1.0)]
    return np.concatenate([segments + shift for shift in shifts], axis=0)


def _point_segment_distance(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Exact distances, element by element, from points (..., g) to segments (..., g)."""
    edge = end - start
    length_sq = np.einsum("...i,...i->...", edge, edge)
    offset = points - start
    # Degenerate (zero-length) segments are points: parameter 0.
    safe = np.where(length_sq > 0, length_sq, 1.0)
    t = np.clip(np.einsum("...i,...i->...", offset, edge) / safe, 0.0, 1.0)
    closest = start + t[..., None] * edge
    return np.linalg.norm(points - closest, axis=-1)


def _point_triangle_distance(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Exact distances from points (..., 3) to triangles (..., 3, 3), element by element.

    Inside the triangle's prism the distance is the normal offset; outside it the nearest
    point lies on an edge, so the minimum over the three edges is exact.
    """
    a, b, c = triangles[..., 0, :], triangles[..., 1, :], triangles[..., 2, :]
    normal = np.cross(b - a, c - a)
    norm = np.linalg.norm(normal, axis=-1)
    safe = np.where(norm > 0, norm, 1.0)
    unit = normal / safe[..., None]
    height = np.einsum("...i,...i->...", points - a, unit)
    projected = points - height[..., None] * unit
    # Barycentric test of the projection, by the signs of the sub-triangle normals.
    inside = norm > 0
    for p0, p1 in ((a, b), (b, c), (c, a)):
        side = np.einsum("...i,...i->...", np.cross(p1 - p0, projected - p0), normal)
        inside &= side >= 0
    edges = np.minimum(
        np.minimum(_point_segment_distance(points, a, b), _point_segment_distance(points, b, c)),
        _point_segment_distance(points, c, a),
    )
    return np.where(inside, np.abs(height), edges)


def _facet_distance(points: np.ndarray, facets: np.ndarray) -> np.ndarray:
    if facets.shape[-2] == 2:
        return _point_segment_distance(points, facets[..., 0, :], facets[..., 1, :])
    if facets.shape[-2] == 3 and facets.shape[-1] == 3:
        return _point_triangle_distance(points, facets)
    raise ValueError(f"unsupported wall facet shape {facets.shape[-2:]} (segments or triangles)")


def distance_to_facets(
    points: np.ndarray, facets: np.ndarray, *, neighbours: int = 16
) -> np.ndarray:
    """Exact distance from each point to the nearest of a set of straight facets.

    Candidates come from a k-d tree on the facet centroids. With ``R`` the largest distance
    from a centroid to its facet's vertices, a facet whose centroid lies at ``r`` from the point
    is at least ``r - R`` away; once the k-th nearest centroid satisfies ``r_k - R >= best``
    no unseen facet can be nearer, otherwise k is doubled for that point. The result is exact.

    Args:
        points: (N, g) float64 query points.
        facets: (M, v, g) float64 facet vertices (v = 2 segments, v = 3 triangles in 3-D).
        neighbours: initial number of candidate facets per point.

    Returns:
        (N,) float64 distances.
    """
    points = np.asarray(points, dtype=np.float64)
    centroids = facets.mean(axis=1)
    radius = float(np.max(np.linalg.norm(facets - centroids[:, None, :], axis=-1)))
    tree = cKDTree(centroids)
    result = np.empty(points.shape[0], dtype=np.float64)
    pending = np.arange(points.shape[0])
    k = min(neighbours, centroids.shape[0])
    while pending.size:
        centroid_distance, index = tree.query(points[pending], k=k)
        centroid_distance = centroid_distance.reshape(pending.size, k)
        index = index.reshape(pending.size, k)
        exact = _facet_distance(points[pending][:, None, :], facets[index])
        best = exact.min(axis=1)
        done = (k == centroids.shape[0]) | (centroid_distance[:, -1] - radius >= best)
        result[pending[done]] = best[done]
        pending = pending[~done]
        k = min(2 * k, centroids.shape[0])
    return result


def wall_distance(
    points: np.ndarray,
    mesh: dolfinx.mesh.Mesh,
    facet_tags: dolfinx.mesh.MeshTags,
    wall_tags: Sequence[int],
    *,
    period: Sequence[float] | None = None,
) -> np.ndarray:
    """Exact Euclidean distance from points to the nearest wall facet of a mesh.

    Collective: every rank must call it (the wall facets are gathered to all ranks). Periodic
    images of the walls (shifted by -1, 0, +1 periods along each periodic axis) are included,
    which is exact for points inside the domain whenever a wall lies within one period, as for
    channels and hills.

    Args:
        points: (N, d) float64 query points (d = mesh.geometry.dim; a (N, 3) array with a zero
            third column is also accepted in 2-D).
        mesh: the mesh whose boundary holds the walls.
        facet_tags: facet markers of ``mesh``.
        wall_tags: tags of the wall facets.
        period: (d,) periodic lengths, 0 where not periodic; None for no periodicity.

    Returns:
        (N,) float64 distances >= 0.
    """
    gdim = mesh.geometry.dim
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] not in (gdim, 3):
        raise ValueError(f"points must have shape (N, {gdim}), got {points.shape}")
    points = points[:, :gdim]
    if not np.all(np.isfinite(points)):
        raise ValueError("points contain NaN or inf")
    segments = wall_segments(mesh, facet_tags, wall_tags)
    if period is not None:
        period_array = np.asarray(period, dtype=np.float64).ravel()
        if period_array.shape[0] < gdim or np.any(period_array < 0):
            raise ValueError(f"period must be ({gdim},) non-negative lengths, got {period}")
        period_array = period_array[:gdim]
        if np.any(period_array > 0):
            segments = _periodic_images(segments, period_array)
    if points.shape[0] == 0:
        return np.empty(0, dtype=np.float64)
    return distance_to_facets(points, segments)


def wall_distance_function(
    V: fem.FunctionSpace,
    facet_tags: dolfinx.mesh.MeshTags,
    wall_tags: Sequence[int],
    *,
    period: Sequence[float] | None = None,
) -> fem.Function:
    """Exact wall distance at the P1 dofs of V (owned and ghost), as a Function.

    Args:
        V: scalar P1 space.
        facet_tags: facet markers of ``V.mesh``.
        wall_tags: tags of the wall facets.
        period: (d,) periodic lengths, 0 where not periodic.

    Returns:
        P1 Function of the distance (the P1 interpolant of the exact distance).
    """
    _require_scalar_p1(V)
    distance = fem.Function(V, name="wall_distance")
    coordinates = V.tabulate_dof_coordinates()
    distance.x.array[:] = wall_distance(coordinates, V.mesh, facet_tags, wall_tags, period=period)
    return distance


def mixing_length(wall_distance, *, kappa: float = KAPPA, cap: float = MIXING_LENGTH_CAP):
    """Mixing length ``l_m = min(kappa d, cap)``.

    Args:
        wall_distance: distance to the wall: numpy array (any shape, float64), a Function or
            a UFL expression.
        kappa: von Karman constant.
        cap: the largest mixing length.

    Returns:
        Same kind as the input: numpy array of the input's shape, or a UFL expression.
    """
    if not (kappa > 0 and cap > 0):
        raise ValueError(f"kappa and cap must be positive, got kappa={kappa}, cap={cap}")
    if isinstance(wall_distance, (np.ndarray, float, int, list, tuple)):
        return np.minimum(kappa * np.asarray(wall_distance, dtype=np.float64), cap)
    return ufl.min_value(kappa * wall_distance, cap)


def nodal_volumes(
    V: fem.FunctionSpace,
    *,
    constraint: PeriodicConstraint | None = None,
) -> fem.Function:
    """Lumped mass ``m_i = int phi_i dx`` of the P1 dofs: the quadrature weight of each point.

    Without a constraint the owned values sum to the domain measure. With a periodic
    constraint a master and its slave copies are one point of the periodic domain: the master
    gets the sum of their patch volumes and each slave copy carries the same value, so a
    point's volume does not depend on which side of the period it is stored on. Then the sum
    over the owned dofs that are not slaves (equivalently the sum of
    ``constraint.restrict_vector(m)``) is the domain measure.

    Args:
        V: scalar P1 space.
        constraint: optional periodic constraint on V.

    Returns:
        P1 Function of nodal volumes (ghosts updated).
    """
    _require_scalar_p1(V)
    test = ufl.TestFunction(V)
    values = _assemble_lumped(test * ufl.dx, V).array.copy()
    if constraint is not None:
        values = _combine_periodic(values, V, constraint)
    volumes = fem.Function(V, name="nodal_volume")
    volumes.x.array[:] = values
    volumes.x.scatter_forward()
    return volumes


def nodal_values(f: fem.Function, V1: fem.FunctionSpace) -> np.ndarray:
    """Values of any Function at the owned P1 dofs of V1 (by interpolation).

    Args:
        f: a Function on ``V1.mesh`` (e.g. the P2 velocity), value shape () or (bs,).
        V1: scalar P1 space that defines the points.

    Returns:
        (N_owned, bs) float64 values at V1's owned dofs, in V1's dof order (bs = 1 for scalar
        Functions).
    """
    _require_scalar_p1(V1)
    if f.function_space.mesh is not V1.mesh:
        raise ValueError("f and V1 must live on the same mesh")
    value_shape = f.function_space.value_shape
    block = int(np.prod(value_shape)) if len(value_shape) else 1
    if block == 1:
        target_space = V1
    else:
        target_space = fem.functionspace(V1.mesh, ("Lagrange", 1, (block,)))
    target = fem.Function(target_space)
    target.interpolate(f)
    owned = V1.dofmap.index_map.size_local
    return target.x.array[: owned * block].reshape(owned, block).copy()
