"""Take the flow from another code: interpolate a velocity source onto the project's mesh.

``vcnn generate --flow-from SOURCE`` reads velocity samples (:mod:`solvers.flow_sources`) and
:func:`import_flow` turns them into the velocity Function of the flow's own space (vector
Lagrange P2, the velocity space of the Taylor-Hood solve), from which |S|, the wall distance,
the nodal volumes and tau are computed exactly as for a solved flow.

Interpolation method (:class:`VelocityInterpolator`): piecewise-linear interpolation on the
Delaunay triangulation (tetrahedralisation in 3-D) of the samples, which is second-order
accurate for smooth fields on any point cloud and needs no connectivity, so nodal (FEM) and
cell-centred (FV) data are treated alike. Three additions make it fit a bounded periodic
domain:

1. **Periodic images.** Along each periodic axis (length L from the boundary spec's
   translations), samples and query points are first wrapped into one period
   ``[x0, x0 + L)`` (x0 the mesh's lower bound), then the samples within a margin of either
   end are copied one period across. A point near a periodic side is therefore interpolated
   from samples on both sides of it, and the two copies of a point of the periodic domain
   (x0 and x0 + L) get exactly the same value.
2. **No-slip wall samples.** Cell-centred data have no sample on the walls, so the layer
   between a wall and the first cell centres would lie outside the samples' convex hull. The
   wall vertices and facet midpoints of the project mesh are added as samples with u = 0:
   the velocity then varies linearly from the wall to the first sample, consistent with no
   slip and second-order accurate, instead of being extrapolated.
3. **Outside the hull** (open boundaries not sampled by cell-centred data): the value of the
   nearest sample (first order), counted in the statistics.

Afterwards the no-slip wall dofs are set to exactly zero. The coverage check measures, for
every project dof, the distance to the nearest source sample; the source spacing ``h_s`` is
the largest distance from a sample to its ``2 d``-th nearest neighbour, and a dof farther
than ``2 h_s`` from every sample is *uncovered* (a source of another geometry, in other units
or cropped). More than :data:`MAX_UNCOVERED_FRACTION` of them is an error, as are a source
that declares another period, one that is longer than the period along a periodic axis, a
3-D source on a 2-D mesh (or a planar one with an out-of-plane velocity) and NaN/inf values.
Two more checks refuse sources that would give a wrong flow without error: fewer samples than
one per ten points of the mesh (:data:`MIN_SAMPLES_PER_MESH_POINT`), and a source covering
less than 95 % of the dofs (:data:`MIN_COVERED_FRACTION`; a dof is covered within the local
spacing of its nearest sample, or inside the hull of the source's own samples). A run checks
all of this before it writes anything (:func:`check_flow_source`).

Under MPI every rank holds the samples (read on rank 0, broadcast), builds the same
triangulation and interpolates at its own dofs (owned and ghost), so the result does not
depend on the partition.
"""

from __future__ import annotations

from mpi4py import MPI

import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import dolfinx
import numpy as np
import ufl
from dolfinx import fem
from scipy.interpolate import LinearNDInterpolator
from scipy.spatial import Delaunay, QhullError, cKDTree

from solvers.boundaries import BoundarySpec, periodic_lengths
from solvers.flow_sources import (
    MIN_SAMPLES_PER_MESH_POINT,
    FlowSource,
    FlowSourceError,
    read_flow_source,
)

__all__ = [
    "INTERPOLATION_METHOD",
    "MAX_UNCOVERED_FRACTION",
    "MIN_COVERED_FRACTION",
    "MIN_SAMPLES_PER_MESH_POINT",
    "FlowImportError",
    "ImportedFlow",
    "VelocityInterpolator",
    "check_flow_source",
    "check_source_fits",
    "import_flow",
    "load_flow_source",
    "subcell_centre_samples",
]

logger = logging.getLogger(__name__)

#: Recorded in the case meta: how the source velocity reached the project's dofs.
INTERPOLATION_METHOD = (
    "piecewise-linear on the Delaunay triangulation of the samples, with periodic images "
    "and no-slip wall samples (u = 0) added; nearest sample outside the convex hull; wall "
    "dofs set to zero"
)
#: Largest fraction of project dofs allowed farther than COVERAGE_FACTOR x the source spacing
#: from every sample.
MAX_UNCOVERED_FRACTION = 1e-3
#: A dof farther than this many source spacings from every sample is uncovered.
COVERAGE_FACTOR = 2.0
#: Least fraction of the project's velocity dofs a source must cover: within the local spacing
#: of the nearest sample or inside the hull of the source's own samples (see
#: :class:`InterpolationResult`).
MIN_COVERED_FRACTION = 0.95
#: Relative tolerance on periods and on a source's extent along a periodic axis (sources
#: written in ASCII carry 6-10 significant digits).
PERIOD_RTOL = 1e-5
#: Relative size (of the largest velocity) an out-of-plane component of a planar source may
#: have and still be read as 2-D.
PLANAR_VELOCITY_RTOL = 1e-6


class FlowImportError(FlowSourceError):
    """A flow source does not fit the project's mesh (dimension, period, coverage)."""


@dataclass(frozen=True)
class InterpolationResult:
    """Interpolated values and where they came from.

    Attributes:
        values: (n, d) float64 interpolated velocity.
        outside_hull: (n,) bool, True where the nearest sample's value was used.
        source_distance: (n,) float64 distance to the nearest source sample (periodic).
        covered: (n,) bool, True within the local spacing of the nearest source sample (its
            distance to its 2d-th neighbour) or inside the convex hull of the source's own
            samples and their periodic images (the wall samples left out).
    """

    values: np.ndarray
    outside_hull: np.ndarray
    source_distance: np.ndarray
    covered: np.ndarray


class VelocityInterpolator:
    """Piecewise-linear interpolation of scattered velocity samples in a periodic box.

    See the module docstring for the method. Pure numpy/scipy: no mesh is needed. Any set of
    fields interpolates alike (e.g. velocity, |S| and tau of a solution sampled at the cell
    centres of another mesh): pass them as the columns of ``velocity``.

    Args:
        points: (M, d) float64 sample coordinates.
        velocity: (M, c) float64 velocity (c = d), or any c fields, at the samples.
        period: (d,) float64 periodic lengths, 0 where not periodic.
        origin: (d,) float64 lower bound of the domain (where the wrapped period starts).
        wall_points: (W, d) float64 points on no-slip walls, added as samples with every
            field 0.
    """

    def __init__(
        self,
        points: np.ndarray,
        velocity: np.ndarray,
        *,
        period: np.ndarray,
        origin: np.ndarray,
        wall_points: np.ndarray | None = None,
    ) -> None:
        points = np.asarray(points, dtype=np.float64)
        velocity = np.asarray(velocity, dtype=np.float64)
        dim = points.shape[1]
        self.period = np.asarray(period, dtype=np.float64).reshape(dim)
        self.origin = np.asarray(origin, dtype=np.float64).reshape(dim)
        if points.shape[0] <= dim:
            raise FlowImportError(f"{points.shape[0]} samples cannot span a {dim}-D domain")
        wrapped = self.wrap(points)
        # Spacing and coverage use every image (cheap for a k-d tree); the triangulation only
        # those within the margin.
        all_images, all_owner = self._images(wrapped, margin=None)
        self._source_tree = cKDTree(all_images)
        neighbours = min(2 * dim + 1, all_images.shape[0])
        distance, _ = self._source_tree.query(wrapped, k=neighbours)
        # A sample's local spacing: the distance to its 2d-th neighbour (h on a grid of
        # spacing h); the source spacing is the largest.
        self._local_spacing = distance[:, -1]
        self._image_owner = all_owner
        self.spacing = float(np.max(distance[:, -1]))
        periodic = self.period > 0
        margin = None
        if np.any(periodic):
            margin = np.minimum(self.period, np.maximum(4.0 * self.spacing, 0.1 * self.period))
        samples, owner = self._images(wrapped, margin=margin)
        values = velocity[owner]
        self._source_vertices = samples  # without the wall samples
        self._source_only: Delaunay | None = None
        self.num_wall_samples = 0
        if wall_points is not None and len(wall_points):
            walls, _ = self._images(self.wrap(np.asarray(wall_points, dtype=np.float64)), margin)
            # A wall point that is already a sample (nodal data on the same wall) adds nothing.
            gap, _ = self._source_tree.query(walls, k=1)
            walls = walls[gap > 1e-9 * max(self.spacing, 1e-300)]
            samples = np.concatenate([samples, walls])
            values = np.concatenate([values, np.zeros((walls.shape[0], values.shape[1]))])
            self.num_wall_samples = int(walls.shape[0])
        self.num_samples = int(samples.shape[0])
        try:
            triangulation = Delaunay(samples)
        except QhullError as error:
            raise FlowImportError(
                f"the {points.shape[0]} source points do not span a {dim}-D region "
                f"(Delaunay triangulation failed: {str(error).splitlines()[0]})"
            ) from None
        self._linear = LinearNDInterpolator(triangulation, values, fill_value=np.nan)
        self._nearest_tree = cKDTree(samples)
        self._nearest_values = values

    def wrap(self, points: np.ndarray) -> np.ndarray:
        """Coordinates mapped into ``[origin, origin + period)`` along the periodic axes."""
        wrapped = np.array(points, dtype=np.float64, copy=True)
        for axis in np.flatnonzero(self.period > 0):
            length, start = self.period[axis], self.origin[axis]
            wrapped[:, axis] = start + np.mod(wrapped[:, axis] - start, length)
            # np.mod may round up to exactly one period: that point is the start.
            wrapped[wrapped[:, axis] >= start + length, axis] = start
        return wrapped

    def _images(
        self, wrapped: np.ndarray, margin: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Wrapped points and their copies one period across (all, or within ``margin``).

        Returns:
            (K, d) coordinates and (K,) int64 index of the original point of each.
        """
        coordinates = wrapped
        owner = np.arange(wrapped.shape[0])
        for axis in np.flatnonzero(self.period > 0):
            length, start = self.period[axis], self.origin[axis]
            parts, owners = [coordinates], [owner]
            for shift in (length, -length):
                if margin is None:
                    near = np.ones(coordinates.shape[0], dtype=bool)
                elif shift > 0:  # the samples near the start, copied past the end
                    near = coordinates[:, axis] < start + margin[axis]
                else:
                    near = coordinates[:, axis] > start + length - margin[axis]
                moved = coordinates[near].copy()
                moved[:, axis] += shift
                parts.append(moved)
                owners.append(owner[near])
            coordinates, owner = np.concatenate(parts), np.concatenate(owners)
        return coordinates, owner

    def __call__(self, query: np.ndarray) -> InterpolationResult:
        """Interpolate at (n, d) query points."""
        wrapped = self.wrap(np.asarray(query, dtype=np.float64))
        values = np.asarray(self._linear(wrapped), dtype=np.float64).reshape(wrapped.shape[0], -1)
        outside = ~np.isfinite(values).all(axis=1)
        if np.any(outside):
            _, nearest = self._nearest_tree.query(wrapped[outside], k=1)
            values[outside] = self._nearest_values[nearest]
        distance, nearest = self._source_tree.query(wrapped, k=1)
        covered = distance <= self._local_spacing[self._image_owner[nearest]]
        if not covered.all():
            covered[~covered] = self._source_hull().find_simplex(wrapped[~covered]) >= 0
        return InterpolationResult(
            values=values, outside_hull=outside, source_distance=distance, covered=covered
        )

    def _source_hull(self) -> Delaunay:
        """The triangulation of the source's own samples (no wall samples), built once."""
        if self._source_only is None:
            self._source_only = Delaunay(self._source_vertices)
        return self._source_only


@dataclass
class ImportedFlow:
    """A velocity taken from another code, in the flow's velocity space.

    Attributes:
        u: vector Lagrange Function (degree 2) of the interpolated velocity.
        source: the source's description (:meth:`FlowSource.to_meta`).
        bulk_velocity: area average of the velocity along the first periodic direction (of
            u_x when nothing is periodic), for comparison with U_b.
        statistics: interpolation facts for the case meta (method, samples, fractions of
            dofs outside the hull and uncovered, source spacing).
    """

    u: fem.Function
    source: dict[str, Any]
    bulk_velocity: float
    statistics: dict[str, Any] = field(default_factory=dict)

    def to_meta(self) -> dict[str, Any]:
        """The ``flow_source`` entry of a case file's meta."""
        return {**self.source, **self.statistics}


def load_flow_source(
    path: str | os.PathLike[str],
    *,
    field: str | None = None,
    time: str = "latest",
    comm: MPI.Comm = MPI.COMM_WORLD,
) -> FlowSource:
    """Read a flow source on rank 0 and broadcast it (collective).

    Raises:
        FlowSourceError: on every rank, when rank 0 cannot read the source.
    """
    source: FlowSource | None = None
    error: str | None = None
    if comm.rank == 0:
        try:
            source = read_flow_source(path, field=field, time=str(time))
        except FlowSourceError as failure:
            error = str(failure)
    # Agree on failure first, or the other ranks would wait for a source that never comes.
    error = comm.bcast(error, root=0)
    if error is not None:
        raise FlowSourceError(error)
    return comm.bcast(source, root=0)


def _planar(source: FlowSource, gdim: int) -> tuple[np.ndarray, np.ndarray]:
    """The source's points and velocity in the mesh's dimension (a flat 3-D source -> 2-D)."""
    points, velocity = source.points, source.velocity
    dim = points.shape[1]
    if dim == gdim:
        return points, velocity
    where = f"{source.kind} source {source.path!r}"
    if dim < gdim:
        raise FlowImportError(f"{where} is {dim}-D but the mesh is {gdim}-D")
    extent = float(np.ptp(points[:, 2]))
    scale = max(float(np.ptp(points[:, :2], axis=0).max()), 1e-300)
    if extent > 1e-9 * scale:
        raise FlowImportError(
            f"{where} is 3-D (its points span {extent:.3g} in z) but the mesh is 2-D: give a "
            f"planar source (one cell across, like an OpenFOAM case with empty front and back)"
        )
    out_of_plane = float(np.abs(velocity[:, 2]).max())
    speed = max(float(np.linalg.norm(velocity[:, :2], axis=1).max()), 1e-300)
    if out_of_plane > PLANAR_VELOCITY_RTOL * speed:
        raise FlowImportError(
            f"{where} is planar but its velocity has a z component up to {out_of_plane:.3g} "
            f"(largest in-plane speed {speed:.3g}): not a 2-D flow"
        )
    return points[:, :2], velocity[:, :2]


def _check_period(source: FlowSource, points: np.ndarray, period: np.ndarray) -> None:
    """A source must declare the mesh's period (if it declares one) and fit in one period."""
    where = f"{source.kind} source {source.path!r}"
    if source.period is not None:
        declared = source.period[: period.size]
        if not np.allclose(declared, period, rtol=PERIOD_RTOL, atol=0.0):
            raise FlowImportError(
                f"period mismatch: {where} declares periodic lengths {declared.tolist()} but the "
                f"mesh has {period.tolist()} (a source of another geometry?)"
            )
    for axis in np.flatnonzero(period > 0):
        extent = float(np.ptp(points[:, axis]))
        if extent > period[axis] * (1.0 + PERIOD_RTOL):
            raise FlowImportError(
                f"period mismatch: {where} spans {extent:.6g} along axis {axis}, more than the "
                f"mesh's period {period[axis]:.6g} (a source of another geometry?)"
            )


def _wall_points(mesh: dolfinx.mesh.Mesh, facet_tags, wall_tags) -> np.ndarray:
    """Vertices and midpoints of every wall facet (all ranks get all of them)."""
    if not wall_tags:
        return np.empty((0, mesh.geometry.dim))
    from solvers.fields import wall_segments

    facets = wall_segments(mesh, facet_tags, wall_tags)  # (M, v, gdim)
    points = np.concatenate([facets.reshape(-1, facets.shape[-1]), facets.mean(axis=1)])
    # Vertices shared by neighbouring facets (and by ranks) once each.
    return np.unique(np.round(points, 14), axis=0)


def _fit(
    source: FlowSource,
    mesh: dolfinx.mesh.Mesh,
    facet_tags: dolfinx.mesh.MeshTags,
    spec: BoundarySpec,
    *,
    degree: int,
    max_uncovered: float,
    min_samples_per_point: float,
) -> tuple[fem.FunctionSpace, InterpolationResult, dict[str, Any]]:
    """Check that a source fits the mesh and interpolate it at the velocity dofs (collective).

    The one place where a source is measured against a mesh: dimension, period, number of
    samples, distance of the dofs from the samples and coverage of the domain.

    Returns:
        The velocity space, the interpolation at its dofs (this rank's, owned then ghosts) and
        the statistics for the case meta.

    Raises:
        FlowImportError: see :func:`import_flow`.
    """
    comm = mesh.comm
    gdim = mesh.geometry.dim
    where = f"{source.kind} source {source.path!r}"
    points, velocity = _planar(source, gdim)
    period = np.asarray(periodic_lengths(spec, gdim), dtype=np.float64)
    _check_period(source, points, period)
    mesh_points = int(mesh.topology.index_map(0).size_global)
    needed = math.ceil(min_samples_per_point * mesh_points)
    if source.num_points < needed:
        raise FlowImportError(
            f"{where} has {source.num_points} samples for a mesh of {mesh_points} points: at "
            f"least one per {1 / min_samples_per_point:g} mesh points ({needed}) is needed "
            "(a subsampled or cropped source, or the wrong file? A coarser source on purpose: "
            "lower flow_min_samples_per_point)"
        )
    local_lower = np.full(gdim, np.inf)
    if mesh.geometry.x.shape[0]:
        local_lower = mesh.geometry.x[:, :gdim].min(axis=0)
    origin = np.empty(gdim)
    comm.Allreduce(np.ascontiguousarray(local_lower, dtype=np.float64), origin, op=MPI.MIN)
    interpolator = VelocityInterpolator(
        points,
        velocity,
        period=period,
        origin=origin,
        wall_points=_wall_points(mesh, facet_tags, spec.walls),
    )

    V = fem.functionspace(mesh, ("Lagrange", degree, (gdim,)))
    index_map = V.dofmap.index_map
    coordinates = V.tabulate_dof_coordinates()[:, :gdim]
    result = interpolator(coordinates)
    threshold = COVERAGE_FACTOR * interpolator.spacing
    owned = index_map.size_local
    covered = result.covered[:owned]
    counts = np.array(
        [
            owned,
            np.count_nonzero(result.source_distance[:owned] > threshold),
            np.count_nonzero(result.outside_hull[:owned]),
            np.count_nonzero(covered),
        ],
        dtype=np.int64,
    )
    summed = np.empty_like(counts)
    comm.Allreduce(counts, summed, op=MPI.SUM)
    total, uncovered, outside, inside = (int(c) for c in summed)
    farthest = comm.allreduce(float(result.source_distance[:owned].max(initial=0.0)), op=MPI.MAX)
    if uncovered > max_uncovered * total:
        raise FlowImportError(
            f"{where} does not cover the mesh: {uncovered} of "
            f"{total} velocity dofs ({100.0 * uncovered / total:.3g} %) are farther than "
            f"{threshold:.3g} (2 x the source spacing) from every source point, up to "
            f"{farthest:.3g} (another geometry, other units or a cropped source?)"
        )
    if inside < MIN_COVERED_FRACTION * total:
        raise FlowImportError(
            f"{where} covers only {100.0 * inside / total:.3g} % of the mesh (at least "
            f"{100.0 * MIN_COVERED_FRACTION:g} % needed): {total - inside} of {total} velocity "
            "dofs lie outside the hull of its samples and farther from the nearest one than "
            "its local spacing (clustered samples, or a cropped source?)"
        )
    statistics = {
        "interpolation": INTERPOLATION_METHOD,
        "target_space": f"vector Lagrange P{degree}",
        "num_target_dofs": total,
        "num_target_mesh_points": mesh_points,
        "num_interpolation_samples": interpolator.num_samples,
        "num_wall_samples": interpolator.num_wall_samples,
        "source_spacing": interpolator.spacing,
        "coverage_distance": threshold,
        "uncovered_fraction": uncovered / total,
        "outside_hull_fraction": outside / total,
        "covered_fraction": inside / total,
        "largest_source_distance": farthest,
    }
    return V, result, statistics


def check_source_fits(
    source: FlowSource,
    mesh: dolfinx.mesh.Mesh,
    facet_tags: dolfinx.mesh.MeshTags,
    spec: BoundarySpec,
    *,
    degree: int = 2,
    max_uncovered: float = MAX_UNCOVERED_FRACTION,
    min_samples_per_point: float = MIN_SAMPLES_PER_MESH_POINT,
) -> dict[str, Any]:
    """Every check of :func:`import_flow`, without building the velocity (collective).

    Returns:
        The interpolation statistics (as in the case meta).

    Raises:
        FlowImportError: see :func:`import_flow`.
    """
    return _fit(
        source,
        mesh,
        facet_tags,
        spec,
        degree=degree,
        max_uncovered=max_uncovered,
        min_samples_per_point=min_samples_per_point,
    )[2]


def check_flow_source(
    path: str | os.PathLike[str],
    meshes: Iterable[tuple[Any, BoundarySpec]],
    *,
    field: str | None = None,
    time: str = "latest",
    min_samples_per_point: float = MIN_SAMPLES_PER_MESH_POINT,
    comm: MPI.Comm = MPI.COMM_WORLD,
) -> FlowSource:
    """Read a flow source and check it against the mesh of each case, up front (collective).

    What a run checks before it writes anything: the source is read (on rank 0, see
    :func:`load_flow_source`) and measured against every mesh as :func:`import_flow` will
    measure it, so that a source that is unreadable, malformed, never solved, too sparse or
    not covering the domain is refused before the first output.

    Args:
        path: the source.
        meshes: (TaggedMesh, BoundarySpec) of each case, built lazily one at a time.
        field: the velocity field's name (None: ``U``, then ``velocity``).
        time: OpenFOAM source: ``"latest"`` or a time directory.
        min_samples_per_point: fewest source samples per mesh point.
        comm: the communicator of the meshes.

    Returns:
        The source.

    Raises:
        FlowSourceError: the source cannot be read or does not fit a mesh
            (:class:`FlowImportError`).
    """
    source = load_flow_source(path, field=field, time=time, comm=comm)
    for tagged, spec in meshes:
        check_source_fits(
            source,
            tagged.mesh,
            tagged.facet_tags,
            spec,
            min_samples_per_point=min_samples_per_point,
        )
    return source


def import_flow(
    source: FlowSource,
    mesh: dolfinx.mesh.Mesh,
    facet_tags: dolfinx.mesh.MeshTags,
    spec: BoundarySpec,
    *,
    degree: int = 2,
    max_uncovered: float = MAX_UNCOVERED_FRACTION,
    min_samples_per_point: float = MIN_SAMPLES_PER_MESH_POINT,
) -> ImportedFlow:
    """Interpolate a source's velocity onto the mesh's velocity space (collective).

    Args:
        source: the samples (the same on every rank, see :func:`load_flow_source`).
        mesh: the project's mesh.
        facet_tags: its facet markers.
        spec: boundary roles: the walls get u = 0, the periodic pairs give the period.
        degree: degree of the vector Lagrange velocity space (2: the flow solver's).
        max_uncovered: largest fraction of dofs allowed to be uncovered by the source.
        min_samples_per_point: fewest source samples per point (vertex) of the mesh.

    Returns:
        The interpolated flow.

    Raises:
        FlowImportError: dimension or period mismatch, fewer samples than
            ``min_samples_per_point`` per mesh point, or a source that does not
            cover the domain (dofs farther than 2 source spacings from every sample, or less
            than :data:`MIN_COVERED_FRACTION` of them covered, see
            :class:`InterpolationResult`).
    """
    comm = mesh.comm
    V, result, statistics = _fit(
        source,
        mesh,
        facet_tags,
        spec,
        degree=degree,
        max_uncovered=max_uncovered,
        min_samples_per_point=min_samples_per_point,
    )
    u = fem.Function(V, name="velocity")
    values = result.values
    from solvers.transport import dirichlet_dofs

    values[dirichlet_dofs(V, facet_tags, spec.walls)] = 0.0
    u.x.array[:] = values.reshape(-1)
    u.x.scatter_forward()

    bulk = _bulk_velocity(u, spec)
    if comm.rank == 0:
        logger.info(
            "flow from %s (%s, %d points): %d dofs, %.3g %% outside the samples' hull, "
            "bulk velocity %.6g",
            source.path,
            source.kind,
            source.num_points,
            statistics["num_target_dofs"],
            100.0 * statistics["outside_hull_fraction"],
            bulk,
        )
    return ImportedFlow(u=u, source=source.to_meta(), bulk_velocity=bulk, statistics=statistics)


def _bulk_velocity(u: fem.Function, spec: BoundarySpec) -> float:
    """Area average of u along the first periodic pair's direction (x without one)."""
    mesh = u.function_space.mesh
    gdim = mesh.geometry.dim
    direction = np.zeros(gdim)
    if spec.periodic:
        translation = np.asarray(spec.periodic[0].translation, dtype=np.float64)
        direction = np.abs(translation) / np.linalg.norm(translation)
    else:
        direction[0] = 1.0
    comm = mesh.comm
    e = ufl.as_vector(direction.tolist())
    flux = comm.allreduce(fem.assemble_scalar(fem.form(ufl.dot(u, e) * ufl.dx)), op=MPI.SUM)
    area = comm.allreduce(
        fem.assemble_scalar(fem.form(fem.Constant(mesh, 1.0) * ufl.dx(domain=mesh))), op=MPI.SUM
    )
    return float(flux / area)


def subcell_centre_samples(
    velocity: fem.Function, subdivisions: int
) -> tuple[np.ndarray, np.ndarray]:
    """A velocity sampled at the centres of an m x m subdivision of every quadrilateral.

    Cell-centred data like a finite-volume code's (no sample on a wall), made from a field of
    our own: the test data of the import's convergence under refinement of the source.

    Args:
        velocity: a vector Function on a quadrilateral mesh (this rank's cells are sampled).
        subdivisions: m, the sub-cells per cell and direction.

    Returns:
        (n, 2) float64 sample points and (n, 2) float64 velocity there, n = cells m^2.
    """
    mesh = velocity.function_space.mesh
    if mesh.topology.cell_name() != "quadrilateral":
        raise ValueError("sub-cell samples need a quadrilateral mesh")
    # dolfinx quadrilaterals list their nodes as (0,0) (1,0) (0,1) (1,1) of the reference square
    nodes = mesh.geometry.x[mesh.geometry.dofmaps[0]][:, :, :2]
    centres = (np.arange(subdivisions) + 0.5) / subdivisions
    s, t = (grid.ravel() for grid in np.meshgrid(centres, centres))
    shape = np.stack([(1 - s) * (1 - t), s * (1 - t), (1 - s) * t, s * t], axis=1)
    points = np.einsum("ki,cig->ckg", shape, nodes).reshape(-1, 2)
    cells = np.repeat(np.arange(nodes.shape[0], dtype=np.int32), subdivisions**2)
    values = velocity.eval(np.column_stack([points, np.zeros(len(points))]), cells)
    return points, np.asarray(values, dtype=np.float64)
