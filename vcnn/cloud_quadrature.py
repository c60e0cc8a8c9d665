"""Resolution-independent cloud quadrature: a bounded number of weighted points per cloud.

A full cloud holds every mesh point of the query's region, so it grows as the mesh is refined
(about 180, 710 and 2,800 points on the alpha = 1 hill at resolutions 0.5, 1 and 2) and the
closure costs O(N^2) under refinement. With volume pooling (``pooling="volume"``, see
:mod:`vcnn.network`) the network's moments are a quadrature of an integral over the region,

    L = int_E c(r(x)) F(x) dx / int_E c(r(x)) dx,

where ``c`` is the smooth cutoff and ``F`` the per-entry integrand. This module evaluates that
integral by a fixed rule instead of by the mesh:

* **Nodes.** A product rule in the region's normalised polar coordinates: the ``radial``
  Gauss radii rho_i in (0, 1) of the measure ``c(rho) rho d rho`` times
  ``angular`` equally spaced angles theta_m = (m + 1/2) 2 pi / angular, mapped to
  ``y = x0 + rho (a cos(theta + phi) e + b sin(theta + phi) n)`` with ``e`` the flow direction
  at the query, ``n`` its normal, ``a`` and ``b`` the region's semi-axes. The node weight is
  ``a b w_i (2 pi / angular)``. In 3-D (below) a ball rule replaces the disc's.
* **Orientation phi.** The angle from ``e`` to ``d``, the direction of the locally averaged
  velocity (a smooth average over the query's nearest mesh points, non-zero on walls where
  ``u0 = 0``) plus a tenth of the mean speed along the wall-distance gradient (which holds
  the nodes still near a wall where the flow stalls). As ``|u0| -> 0`` the region becomes a circle and the nodes become
  ``x0 + b rho R(theta) d``, whatever ``e`` was: the node set is a continuous function of the
  flow there too. The angle set is symmetric (theta <-> -theta), so a reflection of the mesh
  maps the node set onto itself.
* **In 3-D.** The nodes are ``y = x0 + A z``, ``A = a e e^T + b (I - e e^T)``, for the nodes
  ``z = rho (cos(theta) d + sin(theta) (cos(psi) m1 + sin(psi) m2))`` of a product rule on the
  unit ball: the ``shells`` Gauss radii of ``c(rho) rho^2 d rho``, ``polar`` Gauss-Legendre
  points in ``cos(theta)`` and ``azimuthal`` equally spaced azimuths
  ``psi_k = (k + 1/2) 2 pi / azimuthal`` (node weight ``a b^2`` times the ball rule's). In
  2-D the same formula (no azimuth) is the rule above. ``d`` is the mean direction of 2-D
  (its wall-distance gradient fitted by the same weighted least squares, 3 x 3). The azimuth
  reference ``m1`` is the principal axis, across ``d``, of a smoothly averaged tensor over the
  point's nearest points: the wall-distance gradients' ``g g^T`` plus a hundredth of the
  velocities' ``(u / U)(u / U)^T`` (U the mean speed); ``m2 = d x m1``. An axis has no sign,
  and the azimuth set is symmetric under ``psi -> psi + pi`` and ``psi -> -psi``: neither the
  sign of ``m1``, nor a reflection (which flips ``m2``), nor the flip of the gradient across a
  channel's mid-plane changes the node set. As ``|u0| -> 0`` the region becomes a ball and
  the nodes depend on ``d`` and ``m1`` only. The node set is continuous in the flow except
  where the frame degenerates: where the tensor's two eigenvalues across ``d`` are equal (its
  principal axis turns by a finite angle under a small change: flow straight at a wall where
  the velocities across ``d`` are isotropic too, or a corner), where ``d`` itself vanishes
  (a fluid at rest, no wall nearby), and where the tensor has no part across ``d`` (then the
  coordinate axis least aligned with ``d`` stands in: the one choice that depends on the
  axes). There the node set turns about ``d`` by at most ``pi / azimuthal`` (the rule is
  invariant under turns by ``2 pi / azimuthal``): two rules of the same accuracy, so the jump
  is of the order of the quadrature error.
* **Values at the nodes.** The integrand at a node is a smooth partition-of-unity average of
  its values at the node's ``neighbours`` nearest mesh points: weights
  ``kappa(|y - x_j| / h)``, ``kappa(s) = (1 - s^2)^2``, with ``h`` the distance of the
  next-nearest point. The point at distance ``h`` (and any point tied with it) weighs 0, so
  the weights are continuous in the node position and never depend on how ties are broken.
  The network therefore runs on mesh points with weights: a quadrature cloud is an ordinary
  cloud with at most ``1 + radial * angular * neighbours`` entries (``1 + shells * polar *
  azimuthal * neighbours`` in 3-D; the query first) and its own pooling weights, run by the
  same backends (:mod:`vcnn.engines`).
* **The domain.** Nodes beyond a wall carry no weight: the signed wall distance at a node is
  extrapolated linearly from its neighbours (wall distance and its gradient, fitted once per
  point by weighted least squares over the nearest points), and the node weight is multiplied
  by a smooth step of it over the node's own spacing ``h``. Only walls bound the region
  this way: a cloud that crosses an open boundary (inlet, outlet) is not cut there, unlike
  a full cloud.

Everything depends on distances between points, the velocity and the wall distance, never on
point indices or coordinate axes: the prediction is invariant under rigid motions,
reflections and permutations of the mesh (to round-off), and continuous in the velocity
(except where the orientation vector itself vanishes, and in 3-D where the frame degenerates,
above). Points per cloud are bounded by the rule, independent of the mesh.

**Cost.** The node search and weights run compiled (``vcnn/engines/csrc/cloud_quadrature.c``,
built and cached by :mod:`vcnn.engines.kernels`): the points are sorted into a uniform grid of
cells (about two points per cell), each node's nearest points are found by visiting rings of
cells until no unvisited cell can hold a nearer point (exact, whatever the grading), and the
weights, the wall step and the cloud's entries follow in the same pass, one query after
another. The cost is linear in the number of nodes (queries times the rule's nodes). The
compiled rule merges the entries of one point (the nodes that share a nearest point) into one
entry with the summed weight, and drops the entries of weight 0: the moments are linear in
the weights, so this is the same integral with fewer entries (about 107 instead of 193 per
cloud on the half-resolution hill, 154 at the published resolution); its weights agree with
the numpy rule's to float32 round-off and its predictions within 1e-6 relative
(``tests/test_cloud_quadrature.py``). Without a C compiler (or with ``VCNN_KERNELS=0``) the
numpy rule runs (a k-d tree search, 193 entries per cloud, about 5x the compiled rule's time).
The compiled node search is 2-D: 3-D always runs the numpy rule (a k-d tree search whose box
wraps the periodic axes; one entry per node and neighbour, none merged).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.spatial import cKDTree

from vcnn._regions import smooth_switch
from vcnn.clouds import CloudOptions, check_period_wraps
from vcnn.engines.kernels import (
    KernelUnavailable,
    bind,
    c_source,
    compiled_library,
    even_parts,
    warn_unavailable,
)

logger = logging.getLogger(__name__)

__all__ = [
    "AUTO_QUADRATURE_CLOUD_SIZE",
    "AUTO_QUADRATURE_CLOUD_SIZE_3D",
    "CLOUD_MODES",
    "CloudQuadrature",
    "QuadratureClouds",
    "QuadratureOptions",
    "auto_clouds",
    "estimated_full_cloud_size",
    "quadrature_unavailable",
]

#: The cloud modes of inference: ``"auto"`` (:func:`auto_clouds`), the quadrature (bounded
#: points per cloud) or full clouds.
CLOUD_MODES = ("auto", "quadrature", "full")
#: ``"auto"`` runs the quadrature on the CPU when a case's full clouds would hold more points
#: than this on average. Measured with one thread on the alpha = 1 hill (``make bench``,
#: experiments/bench_closure.py --resolutions 0.5 1 2, CPU seconds): with 178 points per full
#: cloud (half the published resolution) full clouds cost 0.6x the quadrature (whose ~100
#: nodes per cloud each need a nearest-point search), with 711 (the published resolution)
#: 1.3x. Their costs
#: per cloud are about a + b E (full, E points) and c (quadrature), which meet near 300-400
#: points; above it the quadrature is cheaper and its error within 0.2 points of full clouds.
AUTO_QUADRATURE_CLOUD_SIZE = 400.0
#: The 3-D threshold of ``"auto"``: 3-D runs the numpy rule (a k-d tree search per node).
#: Measured with one thread on the 3-D hills (experiments/quadrature_error3d.py, 2 loaded
#: cores): the default rule (432 nodes) cost 0.72-0.75 ms per cloud, full clouds 0.2-0.46 us
#: per entry (129 and 199 points per cloud): they meet at 1,600-3,800 points per cloud.
AUTO_QUADRATURE_CLOUD_SIZE_3D = 3000.0
#: Nearest points of the per-point fits (local velocity direction, wall-distance gradient):
#: the last one sets the smooth weights' width and weighs nothing.
_FIT_NEIGHBOURS = 9
#: 3-D: the share of the velocities' tensor in the azimuth reference's tensor (the wall
#: distance gradients' has share 1): (0.1 u / U)^2, the tenth of the mean speed that the mean
#: direction gives the wall normal, squared.
_VELOCITY_AXIS_SHARE = 0.01
#: 3-D: below this largest eigenvalue across d the azimuth reference is undefined (the
#: tensor's entries are O(1): unit gradients and velocities over the mean speed).
_AXIS_FLOOR = 1e-24
# Queries per block of node searches: bounds the (block, nodes, neighbours) temporaries.
_BLOCK_QUERIES = 2048
#: The most nearest points one search of the compiled node search returns (its stack arrays):
#: the per-point fits' and a rule's ``neighbours + 1``.
_MAX_NEAREST = 16
#: Mean mesh points per cell (of the points' bounding box) of the compiled search's grid:
#: measured on the alpha = 1 hill at half the published resolution, 0.7-3 points per cell cost
#: the same within 15 %.
_POINTS_PER_CELL = 2.0
#: Parts of the queries per thread of the compiled rule, handed out as threads come free.
_PARTS_PER_THREAD = 8


@dataclass(frozen=True)
class QuadratureOptions:
    """The quadrature rule.

    Attributes:
        radial: 2-D: Gauss radii per cloud (>= 1).
        angular: 2-D: angles per radius (>= 2, even so that the angle set is symmetric about
            the flow direction and its normal).
        neighbours: mesh points that give the integrand at a node (>= 1; 1 makes the node's
            value jump where its nearest point changes: use >= 2 for a continuous rule).
        shells: 3-D: Gauss radii per cloud (>= 1).
        polar: 3-D: Gauss-Legendre points in the cosine of the angle from the mean
            direction (>= 1).
        azimuthal: 3-D: equally spaced azimuths about the mean direction (>= 2, even so that
            the azimuth set is symmetric under psi -> psi + pi and psi -> -psi).
    """

    # measured on the alpha = 0.5-4 hills at half the published resolution: 8 x 12 x 2 keeps
    # both shipped models within 0.2 points of their full-cloud error with 193 entries, where
    # 6 x 12 x 3 (217 entries) left the coupled model 0.21-0.23 points off at alpha = 1-2
    radial: int = 8
    angular: int = 12
    neighbours: int = 2
    # 3-D only: measured on the 3-D hills (experiments/quadrature_error3d.py) on the two
    # cases whose meshes resolve the clouds, 6 x 6 x 12 x 2 left the r = 0.05 family's model's tau
    # 7.6-8.2 % from its full-cloud tau, where 8 x 4 x 8 x 2 left 9.9-11.8 % and 4 x 4 x 8 x 2 up
    # to 16.6 % (the shipped model: 13-17 % and 13-27 %, docs/results.md)
    shells: int = 6
    polar: int = 6
    azimuthal: int = 12

    def __post_init__(self) -> None:
        for name, value, low in (
            ("radial", self.radial, 1), ("angular", self.angular, 2),
            ("neighbours", self.neighbours, 1), ("shells", self.shells, 1),
            ("polar", self.polar, 1),
            ("azimuthal", self.azimuthal, 2),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"quadrature {name} must be an integer >= {low}, got {value!r}")
        for name, value in (("angular", self.angular), ("azimuthal", self.azimuthal)):
            if value % 2:
                raise ValueError(f"quadrature {name} must be even, got {value}")

    @property
    def nodes(self) -> int:
        """Nodes per cloud in 2-D."""
        return self.nodes_in(2)

    @property
    def entries_per_cloud(self) -> int:
        """Entries per 2-D quadrature cloud: the query itself, then neighbours per node."""
        return self.entries_in(2)

    def nodes_in(self, dim: int) -> int:
        """Nodes per cloud in ``dim`` dimensions (2 or 3)."""
        if dim == 3:
            return self.shells * self.polar * self.azimuthal
        return self.radial * self.angular

    def entries_in(self, dim: int) -> int:
        """Entries per cloud in ``dim`` dimensions: the query, then neighbours per node."""
        return 1 + self.nodes_in(dim) * self.neighbours

    def to_dict(self, dim: int = 2) -> dict[str, Any]:
        """The rule of ``dim`` dimensions, for metrics and case meta."""
        if dim == 3:
            return {
                "shells": self.shells, "polar": self.polar, "azimuthal": self.azimuthal,
                "neighbours": self.neighbours,
            }
        return {"radial": self.radial, "angular": self.angular, "neighbours": self.neighbours}


@dataclass(frozen=True)
class QuadratureClouds:
    """Quadrature clouds in compressed-row form (the query first in each).

    Attributes:
        queries: (Q,) int64 query points.
        offsets: (Q + 1,) int64 row offsets (at most ``entries_per_cloud`` entries a cloud:
            exactly that many from the numpy rule, fewer from the compiled one, which merges
            the entries of one point).
        indices: (nnz,) int64 mesh point of every entry.
        weights: (nnz,) float32 pooling weights (node weight times partition-of-unity weight
            times the inside-the-domain step).
    """

    queries: np.ndarray
    offsets: np.ndarray
    indices: np.ndarray
    weights: np.ndarray

    @property
    def sizes(self) -> np.ndarray:
        """(Q,) int64 entries of every cloud."""
        return np.diff(self.offsets)


def quadrature_unavailable(cloud_options: CloudOptions, *, dim: int, pooling: str) -> str | None:
    """Why the quadrature cannot stand in for full clouds of a closure, or None.

    Args:
        cloud_options: the closure's cloud options.
        dim: spatial dimension of the case.
        pooling: the network's pooling (``"volume"`` makes the moments an integral).
    """
    if pooling != "volume":
        return "the network pools by point count, not by volume: its moments are not an integral"
    if cloud_options.region == "knn":
        return "k-nearest clouds have no region to integrate over"
    if dim not in (2, 3):
        return f"the quadrature rule is 2-D or 3-D (this case is {dim}-D)"
    return None


def estimated_full_cloud_size(
    cloud_options: CloudOptions, speed: np.ndarray, nodal_volume: np.ndarray, *, dim: int = 2
) -> float:
    """The mean points of a full cloud, estimated without building the clouds.

    The mean area (2-D: pi a b) or volume (3-D: 4/3 pi a b^2) of the cloud regions times the
    mean point density (points over the summed nodal volumes); regions cut by walls make it a
    slight over-estimate (7 % on the 2-D hills).

    Args:
        cloud_options: the closure's cloud options (an ellipse or ball region).
        speed: (N,) float |u| at the points.
        nodal_volume: (N,) float the points' volumes (areas in 2-D).
        dim: spatial dimension (2 or 3).
    """
    semi_axes = cloud_options.semi_axes(np.asarray(speed, dtype=np.float64))
    total = float(np.sum(nodal_volume))
    if semi_axes is None or total <= 0:
        return 0.0
    along, across = semi_axes
    mean_along = float(np.mean(np.asarray(along, dtype=np.float64)))
    if dim == 3:
        size = 4.0 / 3.0 * math.pi * mean_along * float(across) ** 2
    else:
        size = math.pi * mean_along * float(across)
    return size * np.size(nodal_volume) / total


def auto_clouds(
    cloud_options: CloudOptions,
    *,
    dim: int,
    pooling: str,
    speed: np.ndarray,
    nodal_volume: np.ndarray,
    device_type: str = "cpu",
) -> str:
    """The clouds of ``clouds="auto"``: ``"quadrature"`` or ``"full"``.

    The quadrature where it applies (:func:`quadrature_unavailable`), on the CPU, and where the
    case's full clouds would hold more than :data:`AUTO_QUADRATURE_CLOUD_SIZE` points on average
    (:func:`estimated_full_cloud_size`): from about the published resolution of the hills up;
    in 3-D more than :data:`AUTO_QUADRATURE_CLOUD_SIZE_3D` (the numpy rule costs more).
    Full clouds elsewhere: coarse meshes (full clouds cost less there) and CUDA devices (full
    clouds are searched and run on the device; the quadrature's are built on the CPU).

    Args:
        cloud_options: the closure's cloud options.
        dim: spatial dimension of the case.
        pooling: the network's pooling.
        speed: (N,) float |u| at the case's points.
        nodal_volume: (N,) float the points' volumes.
        device_type: the closure's device type (``"cpu"``, ``"cuda"``).
    """
    if device_type != "cpu" or quadrature_unavailable(cloud_options, dim=dim, pooling=pooling):
        return "full"
    size = estimated_full_cloud_size(cloud_options, speed, nodal_volume, dim=dim)
    threshold = AUTO_QUADRATURE_CLOUD_SIZE_3D if dim == 3 else AUTO_QUADRATURE_CLOUD_SIZE
    return "quadrature" if size > threshold else "full"


def _radial_rule(
    count: int, cutoff_start: float | None, power: int
) -> tuple[np.ndarray, np.ndarray]:
    """Radii (count,) and weights (count,): the Gauss rule of ``c(rho) rho^power d rho``.

    On [0, 1] (``c`` the smooth cutoff, 1 without one): exact for polynomials of degree
    2 count - 1 times that measure, with every radius where the cutoff leaves weight. Built
    by the Stieltjes procedure on a 400-point Gauss-Legendre discretisation of the measure,
    then the eigenvalues of its Jacobi matrix (Golub-Welsch).
    """
    fine, fine_weights = np.polynomial.legendre.leggauss(400)
    fine = 0.5 * (fine + 1.0)
    cutoff = np.ones_like(fine) if cutoff_start is None else smooth_switch(fine, start=cutoff_start)
    measure = 0.5 * fine_weights * fine**power * cutoff
    diagonal, off_diagonal = np.zeros(count), np.zeros(max(count - 1, 0))
    previous, current = np.zeros_like(fine), np.ones_like(fine)
    norm_previous = 1.0
    for k in range(count):
        norm = float(np.dot(measure, current * current))
        diagonal[k] = float(np.dot(measure, fine * current * current)) / norm
        beta = norm / norm_previous if k > 0 else 0.0
        if k > 0:
            off_diagonal[k - 1] = math.sqrt(beta)
        previous, current = current, (fine - diagonal[k]) * current - beta * previous
        norm_previous = norm
    jacobi = np.diag(diagonal) + np.diag(off_diagonal, 1) + np.diag(off_diagonal, -1)
    radii, vectors = np.linalg.eigh(jacobi)
    weights = float(measure.sum()) * vectors[0] ** 2
    return radii, weights


@functools.lru_cache(maxsize=16)
def _rule(
    options: QuadratureOptions, cutoff_start: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 2-D rule: radii (R,), their weights (R,) and the angles (A,).

    The radii and weights are the Gauss rule of the radial measure ``c(rho) rho d rho`` on
    [0, 1] (:func:`_radial_rule`), the angles equally spaced.
    """
    radii, weights = _radial_rule(options.radial, cutoff_start, 1)
    angles = (np.arange(options.angular) + 0.5) * (2.0 * math.pi / options.angular)
    for array in (radii, weights, angles):
        array.flags.writeable = False  # cached: shared by every call
    return radii, weights, angles


@functools.lru_cache(maxsize=16)
def _ball_rule(
    options: QuadratureOptions, cutoff_start: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """The 3-D rule on the unit ball: nodes (M, 3) in the frame (d, m1, m2), weights (M,).

    A product rule ``z = rho (cos(theta) d + sin(theta) (cos(psi) m1 + sin(psi) m2))``: the
    Gauss radii of ``c(rho) rho^2 d rho`` (:func:`_radial_rule`), Gauss-Legendre points in
    ``cos(theta)`` and equally spaced azimuths ``psi_k = (k + 1/2) 2 pi / K``. The weights sum
    to ``4 pi int_0^1 c(rho) rho^2 d rho`` (the cutoff-weighted volume of the ball); the rule
    integrates ``c(|z|)`` times every polynomial of degree <= min(2 R - 1, 2 P - 1, K - 1)
    exactly. M = shells * polar * azimuthal, the radius slowest, the azimuth fastest.
    """
    radii, radial_weights = _radial_rule(options.shells, cutoff_start, 2)
    cosines, polar_weights = np.polynomial.legendre.leggauss(options.polar)
    sines = np.sqrt(np.clip(1.0 - cosines * cosines, 0.0, None))
    azimuths = (np.arange(options.azimuthal) + 0.5) * (2.0 * math.pi / options.azimuthal)
    direction = np.stack(
        [
            np.broadcast_to(cosines[:, None], (cosines.size, azimuths.size)),
            sines[:, None] * np.cos(azimuths)[None, :],
            sines[:, None] * np.sin(azimuths)[None, :],
        ],
        axis=-1,
    )  # (P, K, 3)
    nodes = (radii[:, None, None, None] * direction[None]).reshape(-1, 3)
    weights = (
        radial_weights[:, None, None]
        * polar_weights[None, :, None]
        * np.full(azimuths.size, 2.0 * math.pi / options.azimuthal)[None, None, :]
    ).reshape(-1)
    for array in (nodes, weights):
        array.flags.writeable = False  # cached: shared by every call
    return nodes, weights


@dataclass(frozen=True)
class _CellGrid:
    """The points sorted into a uniform grid of cells, as ``cloud_quadrature.c`` reads it.

    Attributes:
        sizes: (4,) int64 cells along x and y, then whether each axis is periodic (0/1).
        geometry: (6,) float64 low corner (2), cell widths (2), periods (2; 0: not periodic).
        order: (N,) int64 original index of every sorted point.
        starts: (cells + 1,) int64 first sorted point of every cell (x fastest).
        empty_rings: (cells,) int64 Chebyshev distance, in cells, to the nearest cell with
            points (0 for a cell with points): the search skips the empty rings around a node
            beyond a wall.
        sorted_points: (N, 2) float64 the points in cell order.
    """

    sizes: np.ndarray
    geometry: np.ndarray
    order: np.ndarray
    starts: np.ndarray
    empty_rings: np.ndarray
    sorted_points: np.ndarray

    @classmethod
    def build(cls, points: np.ndarray, period: np.ndarray) -> _CellGrid:
        """The grid of (N, 2) float64 points, cells of about :data:`_POINTS_PER_CELL` points."""
        low = points.min(axis=0)
        periodic = period > 0
        extent = np.where(periodic, period, points.max(axis=0) - low)
        box = float(np.prod(np.where(extent > 0, extent, 1.0)))
        target = math.sqrt(box * _POINTS_PER_CELL / max(points.shape[0], 1))
        # a periodic axis: whole cells per period (rounded down)
        ratio = extent / target
        cells = np.maximum(1, np.where(periodic, np.floor(ratio), np.ceil(ratio))).astype(np.int64)
        width = np.where(extent > 0, extent / cells, target)
        position = (points - low) / width
        cell = np.floor(position).astype(np.int64)
        cell = np.where(periodic, np.mod(cell, cells), np.clip(cell, 0, cells - 1))
        flat = cell[:, 0] + cells[0] * cell[:, 1]
        order = np.argsort(flat, kind="stable")
        # along a periodic axis the sorted points lie in [low, low + period) (the C search
        # moves targets there and shifts the columns beyond it by one period)
        moved = np.where(periodic, low + np.mod(points - low, np.where(periodic, period, 1.0)), points)
        starts = np.zeros(int(cells[0] * cells[1]) + 1, dtype=np.int64)
        np.cumsum(np.bincount(flat, minlength=starts.size - 1), out=starts[1:])
        occupied = (np.diff(starts) > 0).reshape(int(cells[1]), int(cells[0]))  # (y, x)
        return cls(
            sizes=np.array([cells[0], cells[1], periodic[0], periodic[1]], dtype=np.int64),
            geometry=np.ascontiguousarray(np.concatenate([low, width, period]), dtype=np.float64),
            order=order.astype(np.int64),
            starts=starts,
            empty_rings=_empty_rings(occupied, periodic=(bool(periodic[1]), bool(periodic[0]))),
            sorted_points=np.ascontiguousarray(moved[order], dtype=np.float64),
        )

    def arguments(self) -> tuple[int, ...]:
        """The grid's pointers, in the order of the C functions' grid arguments."""
        return tuple(
            array.ctypes.data
            for array in (
                self.sizes, self.geometry, self.order, self.starts, self.empty_rings,
                self.sorted_points,
            )
        )


def _empty_rings(occupied: np.ndarray, *, periodic: tuple[bool, bool]) -> np.ndarray:
    """(cells,) int64 Chebyshev distance of every cell to the nearest occupied one.

    Args:
        occupied: (rows, columns) bool cells that hold points (at least one).
        periodic: whether the rows' and the columns' axis wrap.
    """
    far = occupied.size + 1

    def neighbour_minimum(values: np.ndarray, axis: int) -> np.ndarray:
        """The minimum over each cell and its two neighbours along an axis."""
        smallest = values.copy()
        for step in (1, -1):
            if periodic[axis]:
                moved = np.roll(values, step, axis=axis)
            else:
                moved = np.full_like(values, far)
                source, target = [slice(None)] * 2, [slice(None)] * 2
                source[axis] = slice(None, -1) if step == 1 else slice(1, None)
                target[axis] = slice(1, None) if step == 1 else slice(None, -1)
                moved[tuple(target)] = values[tuple(source)]
            np.minimum(smallest, moved, out=smallest)
        return smallest

    distance = np.where(occupied, 0, far).astype(np.int64)
    while True:  # one round per ring: the minimum over the 3 x 3 block, plus one
        grown = np.minimum(distance, neighbour_minimum(neighbour_minimum(distance, 0), 1) + 1)
        if np.array_equal(grown, distance):
            return np.ascontiguousarray(distance.reshape(-1))
        distance = grown


def quadrature_source() -> str:
    """The C source of the compiled node search and weights (``cloud_quadrature.c``)."""
    return c_source("cloud_quadrature.c", {"VCNN_MAX_NEAREST": _MAX_NEAREST})


def _quadrature_library():
    """The compiled node search and weights.

    Raises:
        KernelUnavailable: when it cannot be built (the numpy rule runs).
    """
    return compiled_library(
        quadrature_source(), symbols=("vcnn_grid_nearest", "vcnn_quadrature_clouds")
    )


def _partition_weights(distance: np.ndarray) -> np.ndarray:
    """Smooth partition-of-unity weights over the last axis of k + 1 sorted distances.

    The last distance sets the width h and weighs 0 itself: (..., k + 1) -> (..., k), each row
    summing to 1. A row whose distances all tie (zero width) takes equal weights.
    """
    width = distance[..., -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = np.where(width > 0, distance[..., :-1] / width, 1.0)
    kernel = np.clip(1.0 - scaled * scaled, 0.0, None) ** 2
    total = kernel.sum(axis=-1, keepdims=True)
    equal = np.full_like(kernel, 1.0 / kernel.shape[-1])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, kernel / np.where(total > 0, total, 1.0), equal)


class CloudQuadrature:
    """The quadrature clouds of one case's points (module docstring).

    Args:
        points: (N, d) float coordinates, d = 2 or 3.
        velocity: (N, d) float velocity.
        period: (d,) periodic lengths (0: not periodic) or None.
        wall_distance: (N,) float distance to the nearest wall (cuts the region at walls).
        cloud_options: the closure's cloud options (ellipse or ball, resolved).
        options: the rule.
        mean_speed: the mean of |u| over the points of the whole field (it scales the
            wall-normal part of the nodes' orientation); None: over this case's points. A
            distributed closure predicts on a case that holds part of the field (a rank's
            points and their halo) and passes the mean over all of it.

    Raises:
        ValueError: for a k-nearest region, a dimension other than 2 or 3, or arrays that do
            not match.
    """

    def __init__(
        self,
        points: np.ndarray,
        velocity: np.ndarray,
        period: np.ndarray | None,
        wall_distance: np.ndarray,
        cloud_options: CloudOptions,
        *,
        options: QuadratureOptions | None = None,
        mean_speed: float | None = None,
    ) -> None:
        self.options = options or QuadratureOptions()
        self._mean_speed = mean_speed
        self._points = np.ascontiguousarray(points, dtype=np.float64)
        num_points, dim = self._points.shape
        if dim not in (2, 3):
            raise ValueError(f"the cloud quadrature is 2-D or 3-D, got {dim}-D points")
        if cloud_options.region == "knn":
            raise ValueError("the cloud quadrature needs an ellipse or ball region, not knn")
        self._velocity = np.asarray(velocity, dtype=np.float64).reshape(num_points, dim)
        self._wall_distance = np.ascontiguousarray(wall_distance, dtype=np.float64).reshape(num_points)
        self._period = np.zeros(dim) if period is None else np.asarray(period, np.float64).reshape(dim)
        self._cutoff_start = cloud_options.cutoff_start
        speed = np.linalg.norm(self._velocity, axis=1)
        along, self._across = cloud_options.semi_axes(speed)
        self._along = np.asarray(along, dtype=np.float64)
        reach = float(max(self._along.max(initial=0.0), self._across))
        for axis, length in enumerate(self._period):
            if length > 0:
                check_period_wraps(reach, float(length), axis=axis)
        with np.errstate(invalid="ignore", divide="ignore"):
            direction = self._velocity / speed[:, None]
        self._direction = np.where(speed[:, None] > 0, direction, 0.0)
        self._library = None
        # the compiled node search is 2-D: 3-D runs the numpy rule (a k-d tree search)
        if dim == 2 and num_points >= max(_FIT_NEIGHBOURS, self.options.neighbours + 1) and (
            self.options.neighbours + 1 <= _MAX_NEAREST
        ):
            try:
                self._library = _quadrature_library()
            except KernelUnavailable as error:
                warn_unavailable(logger, "the compiled cloud quadrature", error)
        if self._library is not None:
            self._grid = _CellGrid.build(self._points, self._period)
        else:
            self._build_tree()
        self._fit_points()

    # ------------------------------------------------------------------ set-up
    def _nearest(self, targets: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(T, count) float64 distances (sorted) and int64 indices of the nearest points.

        Args:
            targets: (T, 2) float64 positions.
            count: nearest points per target.
        """
        if self._library is None:
            return self._tree.query(self._boxed(targets), count, workers=-1)
        targets = np.ascontiguousarray(targets, dtype=np.float64)
        distance = np.empty((targets.shape[0], count), dtype=np.float64)
        indices = np.empty((targets.shape[0], count), dtype=np.int64)
        bounds = even_parts(targets.shape[0])
        status = bind(self._library, "vcnn_grid_nearest")(
            bounds.numel() - 1, bounds.data_ptr(), *self._grid.arguments(), count,
            targets.ctypes.data, distance.ctypes.data, indices.ctypes.data,
        )
        if status:
            raise RuntimeError("the compiled nearest-point search failed")
        return distance, indices

    def _build_tree(self) -> None:
        """A k-d tree whose box wraps the periodic axes (and never the others)."""
        low = self._points.min(axis=0)
        extent = self._points.max(axis=0) - low
        reach = float(self._along.max()) + float(self._across) + 1.0
        periodic = self._period > 0
        # non-periodic axes: a box so wide that no distance wraps around it
        self._shift = np.where(periodic, -low, -low + 2.0 * reach + extent)
        self._box = np.where(periodic, self._period, 4.0 * (extent + 2.0 * reach) + 1.0)
        self._tree = cKDTree(self._boxed(self._points), boxsize=self._box)

    def _boxed(self, coordinates: np.ndarray) -> np.ndarray:
        """Coordinates moved into the tree's box [0, box) along every axis."""
        moved = coordinates + self._shift
        moved = np.mod(moved, self._box)
        return np.where(moved >= self._box, moved - self._box, moved)

    def _wrapped(self, difference: np.ndarray) -> np.ndarray:
        """Differences of coordinates, periodic axes wrapped to the minimum image."""
        periodic = self._period > 0
        if not periodic.any():
            return difference
        length = np.where(periodic, self._period, 1.0)
        return np.where(periodic, difference - length * np.round(difference / length), difference)

    def _fit_points(self) -> None:
        """Per point: the local average velocity direction and the wall-distance gradient."""
        distance, neighbour = self._nearest(self._points, _FIT_NEIGHBOURS)
        weight = _partition_weights(distance)  # (N, k)
        neighbour = neighbour[:, :-1]
        mean_velocity = np.einsum("nk,nkd->nd", weight, self._velocity[neighbour])
        # weighted least squares of the wall distance's gradient over the neighbours
        offset = self._wrapped(self._points[neighbour] - self._points[:, None, :])  # (N, k, 2)
        change = self._wall_distance[neighbour] - self._wall_distance[:, None]
        normal = np.einsum("nk,nki,nkj->nij", weight, offset, offset)
        right = np.einsum("nk,nki,nk->ni", weight, offset, change)
        # A ridge of 1e-6 of the trace: on graded meshes the nearest points of a wall point
        # lie on one line (the wall-normal column), and the fit keeps the slope along it.
        ridge = 1e-6 * np.trace(normal, axis1=1, axis2=2)
        dim = self._points.shape[1]
        for axis in range(dim):
            normal[:, axis, axis] += ridge
        solvable = np.linalg.det(normal) > 0
        safe = np.where(solvable[:, None, None], normal, np.eye(dim))
        gradient = np.linalg.solve(safe, right[..., None])[..., 0]
        self._wall_gradient = np.where(solvable[:, None], gradient, 0.0)
        # The nodes' orientation: the local mean velocity, plus a tenth of the mean speed
        # along the wall-distance gradient. Near a wall where the flow stalls (separation,
        # reattachment) the mean velocity alone nearly vanishes and would swing the nodes
        # around under the smallest change of the flow; the wall normal holds them there.
        mean_speed = self._mean_speed
        if mean_speed is None:
            mean_speed = float(np.linalg.norm(self._velocity, axis=1).mean())
        speed_scale = 0.1 * mean_speed
        orientation = mean_velocity + speed_scale * self._wall_gradient
        norm = np.linalg.norm(orientation, axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            self._mean_direction = np.where(norm > 0, orientation / norm, 0.0)
        if dim == 3:
            self._azimuth_axis = self._principal_axes(weight, neighbour, mean_speed)

    def _principal_axes(
        self, weight: np.ndarray, neighbour: np.ndarray, mean_speed: float
    ) -> np.ndarray:
        """3-D: (N, 3) float64 azimuth reference m1 of every point (module docstring).

        The principal axis, across the point's mean direction d, of a smoothly averaged
        tensor: the wall-distance gradients' ``g g^T`` plus a hundredth of the velocities'
        ``(u / U)(u / U)^T`` (U the mean speed), over the point's fit neighbours with the
        fit's weights. A tensor, not a vector: its axis has no sign, so the flip of the
        gradient across a channel's mid-plane changes nothing (nor does the sign eigh gives
        it: the azimuths are symmetric under psi -> psi + pi). The velocity part decides
        only where the gradients lie along d (the wall-normal flow of a stagnation point).
        Zero (no reference) where the tensor has no part across d.

        Args:
            weight: (N, k) float64 the fit's partition-of-unity weights.
            neighbour: (N, k) int64 the fit's nearest points (the point itself first).
            mean_speed: U, the mean speed the velocities are scaled by.
        """
        gradients = self._wall_gradient[neighbour]  # (N, k, 3)
        tensor = np.einsum("nk,nki,nkj->nij", weight, gradients, gradients)
        if mean_speed > 0:
            scaled = self._velocity[neighbour] / mean_speed
            tensor += _VELOCITY_AXIS_SHARE * np.einsum("nk,nki,nkj->nij", weight, scaled, scaled)
        across = np.eye(3) - np.einsum("ni,nj->nij", self._mean_direction, self._mean_direction)
        values, vectors = np.linalg.eigh(across @ tensor @ across)
        axis = np.einsum("nij,nj->ni", across, vectors[..., -1])  # the largest eigenvalue's
        # eigh's sign is arbitrary and the node set does not depend on it; pointing the axis
        # up the point's own wall-distance gradient keeps the nodes' order too (except where
        # the two are nearly perpendicular): two runs with the same flow list one cloud alike
        axis *= np.where(np.sum(axis * self._wall_gradient, axis=1, keepdims=True) < 0, -1.0, 1.0)
        norm = np.linalg.norm(axis, axis=1, keepdims=True)
        defined = (values[:, -1:] > _AXIS_FLOOR) & (norm > 0.5)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(defined, axis / np.where(defined, norm, 1.0), 0.0)

    # ------------------------------------------------------------------ clouds
    def clouds(self, queries: np.ndarray | None = None) -> QuadratureClouds:
        """The quadrature clouds of some points.

        Args:
            queries: (Q,) int point indices; None for every point.

        Returns:
            The clouds: the query itself, then the nodes' entries (``neighbours`` per node from
            the numpy rule, the query's weight 0; merged by point from the compiled rule).
        """
        num_points = self._points.shape[0]
        queries = (
            np.arange(num_points, dtype=np.int64)
            if queries is None
            else np.asarray(queries, dtype=np.int64).reshape(-1)
        )
        if queries.size and (queries.min() < 0 or queries.max() >= num_points):
            raise ValueError(f"queries must be point indices in [0, {num_points})")
        if self._library is not None:
            return self._compiled(queries)
        width = self.options.entries_in(self._points.shape[1])
        indices = np.empty((queries.size, width), dtype=np.int64)
        weights = np.empty((queries.size, width), dtype=np.float32)
        for start in range(0, queries.size, _BLOCK_QUERIES):
            block = slice(start, min(start + _BLOCK_QUERIES, queries.size))
            indices[block], weights[block] = self._block(queries[block])
        offsets = np.arange(queries.size + 1, dtype=np.int64) * width
        return QuadratureClouds(queries, offsets, indices.reshape(-1), weights.reshape(-1))

    def _flow_directions(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The flow direction e (B, d) of queries (B,) and their mean direction (B, d).

        ``e`` is the unit velocity at the query; where u0 = 0 the region is a circle (a ball)
        and the nodes are oriented by the mean direction alone; where both vanish (a fluid at
        rest nearby) the first coordinate axis, any orientation. The mean direction is the
        stored one (zero where there is none).
        """
        direction = self._direction[queries]
        mean = self._mean_direction[queries]
        still = ~np.any(direction != 0.0, axis=1)
        direction = np.where(still[:, None], mean, direction)
        unoriented = ~np.any(direction != 0.0, axis=1)
        direction[unoriented] = np.eye(direction.shape[1])[0]
        return direction, mean

    def _frames(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The nodes' frame of some queries (B,): direction e (B, 2), its normal (B, 2), phi (B,).

        ``e`` is the flow direction (the mean direction where u0 = 0, x where both vanish),
        ``phi`` the angle from ``e`` to the mean direction (0 where there is none).
        """
        direction, mean = self._flow_directions(queries)
        normal = np.stack([-direction[:, 1], direction[:, 0]], axis=1)
        # phi: the angle from the flow direction to the mean direction (0 where there is none)
        phi = np.arctan2(
            direction[:, 0] * mean[:, 1] - direction[:, 1] * mean[:, 0],
            direction[:, 0] * mean[:, 0] + direction[:, 1] * mean[:, 1],
        )
        phi = np.where(np.any(mean != 0.0, axis=1), phi, 0.0)
        return direction, normal, phi

    def _compiled(self, queries: np.ndarray) -> QuadratureClouds:
        """The clouds of the queries by ``cloud_quadrature.c``.

        Each holds the query, then every point that a node gives weight, once, with its
        weights summed: the same integral as the numpy rule (:meth:`_block`), with fewer
        entries (the moments are linear in the weights).
        """
        radii, area, angles = _rule(self.options, self._cutoff_start)
        direction, _, phi = self._frames(queries)
        frames = np.empty((queries.size, 6), dtype=np.float64)
        frames[:, 0:2] = self._points[queries]
        frames[:, 2:4] = direction
        frames[:, 4] = phi
        frames[:, 5] = self._along[queries]
        rule = np.concatenate(
            [radii, area, np.cos(angles), np.sin(angles), [float(self._across)]]
        ).astype(np.float64)
        rule_sizes = np.array([radii.size, angles.size], dtype=np.int64)
        wall_gradient = np.ascontiguousarray(self._wall_gradient, dtype=np.float64)
        threads = max(1, torch.get_num_threads())
        bounds = even_parts(queries.size, _PARTS_PER_THREAD * threads)
        parts = bounds.numel() - 1
        queries = np.ascontiguousarray(queries, dtype=np.int64)
        width = self.options.entries_per_cloud
        slots = np.full((threads, self._points.shape[0]), -1, dtype=np.int64)
        sums = np.empty((threads, width), dtype=np.float64)
        counts = np.empty(queries.size, dtype=np.int64)
        # room for full clouds; each part writes its clouds compactly from its first row on,
        # so the pages past them are never touched
        indices = np.empty(queries.size * width, dtype=np.int64)
        weights = np.empty(queries.size * width, dtype=np.float32)
        status = bind(self._library, "vcnn_quadrature_clouds")(
            parts, bounds.data_ptr(), *self._grid.arguments(),
            self.options.neighbours, rule_sizes.ctypes.data, rule.ctypes.data,
            queries.ctypes.data, frames.ctypes.data, self._points.ctypes.data,
            self._wall_distance.ctypes.data, wall_gradient.ctypes.data, threads,
            slots.ctypes.data, sums.ctypes.data, indices.ctypes.data, weights.ctypes.data,
            counts.ctypes.data,
        )
        if status:
            raise RuntimeError("the compiled cloud quadrature failed")
        offsets = np.zeros(queries.size + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        starts = bounds.numpy()
        pieces = [
            slice(int(starts[p]) * width, int(starts[p]) * width + int(offsets[starts[p + 1]] - offsets[starts[p]]))
            for p in range(parts)
        ]
        return QuadratureClouds(
            queries,
            offsets,
            np.concatenate([indices[piece] for piece in pieces]),
            np.concatenate([weights[piece] for piece in pieces]),
        )

    def _frames3d(
        self, queries: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """3-D: the flow direction e and the nodes' frame (d, m1, m2) of queries (B,), each (B, 3).

        ``e`` is the flow direction (the mean direction where u0 = 0, x where both vanish);
        ``d`` the mean direction (``e`` where there is none); ``m1`` the azimuth reference
        across ``d`` (:meth:`_principal_axes`; where it is undefined, the projection of the
        coordinate axis least aligned with ``d``: a choice that only a fluid at rest with no
        wall nearby, or a reference tensor that lies along ``d``, leaves to the axes);
        ``m2 = d x m1``.
        """
        direction, mean = self._flow_directions(queries)
        mean = mean.copy()
        no_mean = ~np.any(mean != 0.0, axis=1)
        mean[no_mean] = direction[no_mean]
        reference = self._azimuth_axis[queries]
        # across d (the reference is across the point's own mean direction, which d is
        # except where that one vanished)
        reference = reference - np.sum(reference * mean, axis=1, keepdims=True) * mean
        norm = np.linalg.norm(reference, axis=1)
        undefined = norm <= 0.5
        if undefined.any():
            fallback = np.eye(3)[np.argmin(np.abs(mean[undefined]), axis=1)]
            fallback -= np.sum(fallback * mean[undefined], axis=1, keepdims=True) * mean[undefined]
            reference[undefined] = fallback
            norm[undefined] = np.linalg.norm(fallback, axis=1)
        reference /= norm[:, None]
        return direction, mean, reference, np.cross(mean, reference)

    def _nodes(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The nodes (B, M, d) float64 and their weights (B, M) of a block of queries (B,)."""
        count = queries.size
        origin = self._points[queries]  # (B, d)
        along = self._along[queries]
        across = self._across
        if self._points.shape[1] == 3:
            ball, ball_weight = _ball_rule(self.options, self._cutoff_start)
            direction, mean, reference, binormal = self._frames3d(queries)
            # z in the frame (d, m1, m2), then y = x0 + A z, A = a e e^T + b (I - e e^T)
            unit = (
                ball[None, :, 0:1] * mean[:, None, :]
                + ball[None, :, 1:2] * reference[:, None, :]
                + ball[None, :, 2:3] * binormal[:, None, :]
            )  # (B, M, 3)
            along_flow = np.einsum("bmd,bd->bm", unit, direction)
            nodes = (
                origin[:, None, :]
                + across * unit
                + ((along - across)[:, None] * along_flow)[..., None] * direction[:, None, :]
            )
            node_weight = (along * across * across)[:, None] * ball_weight[None, :]
            return nodes, node_weight
        radii, area, angles = _rule(self.options, self._cutoff_start)
        direction, normal, phi = self._frames(queries)
        theta = angles[None, None, :] + phi[:, None, None]  # (B, 1, A)
        rho = radii[None, :, None]  # (1, R, 1)
        local_along = (rho * np.cos(theta)) * along[:, None, None]
        local_across = (rho * np.sin(theta)) * across
        nodes = (
            origin[:, None, None, :]
            + local_along[..., None] * direction[:, None, None, :]
            + local_across[..., None] * normal[:, None, None, :]
        ).reshape(count, -1, 2)  # (B, M, 2)
        node_weight = (  # the cutoff is in the radial rule's measure
            along[:, None, None]
            * across
            * area[None, :, None]
            * (2.0 * math.pi / self.options.angular)
        )
        node_weight = np.broadcast_to(node_weight, (count, radii.size, angles.size)).reshape(count, -1)
        return nodes, node_weight

    def _block(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, entries) point indices and weights of a block of queries (numpy)."""
        count = queries.size
        dim = self._points.shape[1]
        nodes, node_weight = self._nodes(queries)
        neighbours = self.options.neighbours
        distance, neighbour = self._nearest(nodes.reshape(-1, dim), neighbours + 1)
        distance = distance.reshape(count, -1, neighbours + 1)
        neighbour = neighbour.reshape(count, -1, neighbours + 1)[..., :-1]
        share = _partition_weights(distance)  # (B, M, k)
        # signed wall distance at the node, extrapolated from each neighbour
        offset = self._wrapped(nodes[:, :, None, :] - self._points[neighbour])  # (B, M, k, d)
        signed = self._wall_distance[neighbour] + np.einsum(
            "bmkd,bmkd->bmk", offset, self._wall_gradient[neighbour]
        )
        signed = np.einsum("bmk,bmk->bm", share, signed)
        spacing = distance[..., -1]
        with np.errstate(invalid="ignore", divide="ignore"):
            depth = np.where(spacing > 0, signed / spacing, np.sign(signed))
        # a C^2 step from 0 (half a spacing outside) to 1 (half a spacing inside)
        inside = 1.0 - smooth_switch(np.clip(depth + 0.5, 0.0, 1.0), start=0.0)
        entry_weight = (node_weight * inside)[..., None] * share  # (B, M, k)
        width = self.options.entries_in(dim)
        indices = np.empty((count, width), dtype=np.int64)
        weights = np.empty((count, width), dtype=np.float32)
        indices[:, 0] = queries
        weights[:, 0] = 0.0
        indices[:, 1:] = neighbour.reshape(count, -1)
        weights[:, 1:] = entry_weight.reshape(count, -1)
        return indices, weights
