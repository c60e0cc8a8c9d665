"""Vector clouds: the points that a query point's closure value depends on.

A :class:`CloudSampler` holds one case's points and velocities and answers, for any set of
query points (indices of the case's points), their clouds:

* ``region="ellipse"`` (the paper's choice): the points inside an ellipse (ellipsoid in 3-D)
  centred at the query point x0 with semi-axes
  a = 2 D |ln eps| / (sqrt(|u0|^2 + 4 D zeta) - |u0|) along u(x0) and
  b = sqrt(D / zeta) |ln eps| in every direction across the flow (a >= b; a = b at u0 = 0);
* ``region="ball"``: the points within a fixed radius;
* ``region="knn"``: the k nearest points.

Periodic images are included: along a periodic axis the points are replicated by whole
periods wherever a region can reach them, so a cloud may straddle the periodic boundary and
may be larger than the period (then the same point can appear as several images, each with
its own relative position). Relative positions ``x_i - x0`` are those of the image that lies in
the cloud (the minimum image whenever the cloud is smaller than half a period).

The query point itself is always the first entry of its cloud, in full clouds and in samples.

Speed: ``cKDTree.query_ball_point`` returns Python lists, which costs seconds for the ~30 M
entries of one 40k-point case, so the ellipse and ball regions use a sweep instead. The
(extended) points are sorted by a transverse cell (strips in 2-D, columns in 3-D) and then by
the sweep coordinate; for each (query, cell) pair the exact (2-D) or conservative (3-D) chord
of the ellipse gives one contiguous index range by ``searchsorted``; the ranges are expanded
and filtered by the exact ellipse test, all vectorised over a chunk of queries, chunks in
threads. The k-nearest region uses ``cKDTree.query``, which returns arrays.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
from scipy.spatial import cKDTree

from vcnn._regions import (
    chord_bounds,
    ellipse_semi_axes,
    normalized_radius_squared,
    region_covariance,
    smooth_switch,
)

logger = logging.getLogger(__name__)

__all__ = ["CloudEntries", "CloudSampler", "Clouds", "PaddedClouds", "RegionKind"]

RegionKind = Literal["ellipse", "ball", "knn"]
_REGIONS = ("ellipse", "ball", "knn")
SeedLike = int | np.random.Generator | None

# Transverse cell size of the sweep in units of the smallest transverse semi-axis: smaller
# cells give tighter candidate sets but more (query, cell) ranges; measured on the 40k hill
# field, 0.5 (2-D) is near the optimum.
_CELL_FRACTION = {2: 0.5, 3: 1.0}
# Relative slack on chord bounds so that round-off never drops a point on the boundary;
# the exact ellipse test decides afterwards.
_SLACK = 1e-9


@dataclass(frozen=True)
class Clouds:
    """Full clouds in compressed-row form.

    Attributes:
        queries: (Q,) int64 indices of the query points.
        offsets: (Q + 1,) int64; cloud q is entries offsets[q]:offsets[q + 1].
        indices: (nnz,) int64 point indices of the entries (first entry of each cloud: the
            query point itself).
        relative_positions: (nnz, d) float, x_i - x0 of the image that lies in the cloud.
        radius: (nnz,) float normalised region radius of each entry (1 on the region boundary;
            for "knn", distance over the cloud's largest distance).
        weights: (nnz,) float smooth cutoff weights in [0, 1], or None (no cutoff, or "knn").
    """

    queries: np.ndarray
    offsets: np.ndarray
    indices: np.ndarray
    relative_positions: np.ndarray
    radius: np.ndarray
    weights: np.ndarray | None

    @property
    def sizes(self) -> np.ndarray:
        """(Q,) int64 number of points of every cloud."""
        return np.diff(self.offsets)

    def to_padded(self, *, max_points: int | None = None) -> PaddedClouds:
        """Pad to a (Q, n_max) layout.

        Args:
            max_points: width n_max; default the largest cloud. Must not be smaller than the
                largest cloud (use :meth:`CloudSampler.sample` for fixed-size subsets).

        Returns:
            The same clouds, padded with masked slots.
        """
        sizes = self.sizes
        largest = int(sizes.max()) if sizes.size else 0
        width = largest if max_points is None else int(max_points)
        if width < largest:
            raise ValueError(
                f"max_points={width} is smaller than the largest cloud ({largest} points); "
                "raise max_points or draw fixed-size subsets with CloudSampler.sample(n)"
            )
        num_queries = sizes.size
        rows = np.repeat(np.arange(num_queries), sizes)
        columns = np.arange(self.indices.size) - np.repeat(self.offsets[:-1], sizes)
        dim = self.relative_positions.shape[1]
        dtype = self.relative_positions.dtype
        indices = np.full((num_queries, width), -1, dtype=np.int64)
        indices[rows, columns] = self.indices
        relative = np.zeros((num_queries, width, dim), dtype=dtype)
        relative[rows, columns] = self.relative_positions
        radius = np.zeros((num_queries, width), dtype=self.radius.dtype)
        radius[rows, columns] = self.radius
        mask = np.zeros((num_queries, width), dtype=bool)
        mask[rows, columns] = True
        weights = None
        if self.weights is not None:
            weights = np.zeros((num_queries, width), dtype=self.weights.dtype)
            weights[rows, columns] = self.weights
        return PaddedClouds(self.queries, indices, relative, radius, mask, weights)


@dataclass(frozen=True)
class PaddedClouds:
    """Clouds padded to a common width n; padding slots are masked out.

    Attributes:
        queries: (Q,) int64 indices of the query points.
        indices: (Q, n) int64 point indices, -1 in padding slots; column 0 is the query point.
        relative_positions: (Q, n, d) float, x_i - x0 (0 in padding slots).
        radius: (Q, n) float normalised region radius (0 in padding slots).
        mask: (Q, n) bool, True for real points.
        weights: (Q, n) float smooth cutoff weights (0 in padding slots), or None.
    """

    queries: np.ndarray
    indices: np.ndarray
    relative_positions: np.ndarray
    radius: np.ndarray
    mask: np.ndarray
    weights: np.ndarray | None

    @property
    def sizes(self) -> np.ndarray:
        """(Q,) int64 number of real points of every cloud."""
        return self.mask.sum(axis=1, dtype=np.int64)


@dataclass(frozen=True)
class CloudEntries:
    """A compact sample: extended-point ids only (no positions), for large training indices.

    Attributes:
        queries: (Q,) int64 indices of the query points.
        entries: (Q, n) int32 (int64 for huge extended sets) ids into the sampler's extended
            point set (original points first, then periodic images), -1 in padding slots.
    """

    queries: np.ndarray
    entries: np.ndarray


class _Chunk(NamedTuple):
    """Full clouds of a chunk of queries, in extended ids (query first in each cloud)."""

    sizes: np.ndarray  # (Q,) int64
    entries: np.ndarray  # (nnz,) int64 extended ids
    relative: np.ndarray | None  # (nnz, d) float64 x_i - x0
    radius_squared: np.ndarray | None  # (nnz,) float64 (squared distance for "knn")


class CloudSampler:
    """Clouds of the points of one case.

    Args:
        points: (N, d) float coordinates, d >= 2, finite.
        velocity: (N, d) float velocity at the points, finite (zero vectors allowed: such a
            point's ellipse is the circle/ball of radius b).
        period: (d,) periodic lengths, 0 where not periodic; None for no periodicity.
        region: "ellipse", "ball" or "knn".
        diffusivity: D > 0 of the ellipse formula.
        zeta: decay coefficient > 0 of the ellipse formula.
        eps: decay threshold in (0, 1) of the ellipse formula.
        radius: ball radius (region="ball" only).
        k: number of neighbours (region="knn" only), 1 <= k <= N.
        cutoff_start: normalised radius where the smooth cutoff weight starts to fall, in
            [0, 1); None for no weights.
        dtype: floating dtype of the returned relative positions, radii and weights.
        workers: threads for chunks of queries (-1: all cores).
        chunk_size: queries per chunk (bounds the temporary memory).

    Raises:
        ValueError: on any invalid input, with what is wrong.
    """

    def __init__(
        self,
        points: np.ndarray,
        velocity: np.ndarray,
        *,
        period: np.ndarray | None = None,
        region: RegionKind = "ellipse",
        diffusivity: float = 0.1,
        zeta: float = 3.0,
        eps: float = 0.2,
        radius: float | None = None,
        k: int | None = None,
        cutoff_start: float | None = 0.8,
        dtype: np.dtype | type = np.float32,
        workers: int = -1,
        chunk_size: int = 4096,
    ) -> None:
        self._points = _checked_points(points)
        num_points, dim = self._points.shape
        self._velocity = _checked_velocity(velocity, self._points.shape)
        self._period = _checked_period(period, dim)
        if region not in _REGIONS:
            raise ValueError(f"region must be one of {_REGIONS}, got {region!r}")
        self.region: RegionKind = region
        self._dtype = np.dtype(dtype)
        if self._dtype.kind != "f":
            raise ValueError(f"dtype must be a floating type, got {self._dtype}")
        if cutoff_start is not None and not 0.0 <= cutoff_start < 1.0:
            raise ValueError(f"cutoff_start must be in [0, 1) or None, got {cutoff_start}")
        self.cutoff_start = cutoff_start
        self._workers = (os.cpu_count() or 1) if workers == -1 else int(workers)
        if self._workers < 1:
            raise ValueError(f"workers must be -1 or >= 1, got {workers}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self._chunk_size = int(chunk_size)
        self.k: int | None = None
        speed = np.linalg.norm(self._velocity, axis=1)
        if region == "ellipse":
            for name, value in (("diffusivity", diffusivity), ("zeta", zeta)):
                if not (np.isfinite(value) and value > 0):
                    raise ValueError(f"{name} must be a finite number > 0, got {value}")
            if not 0.0 < eps < 1.0:
                raise ValueError(f"eps must be in (0, 1), got {eps}")
            self._along, self._across = ellipse_semi_axes(
                speed, diffusivity=diffusivity, zeta=zeta, eps=eps
            )
            with np.errstate(invalid="ignore", divide="ignore"):
                direction = self._velocity / speed[:, None]
            self._direction = np.where(speed[:, None] > 0, direction, 0.0)
            reach = float(self._along.max())
        elif region == "ball":
            if radius is None or not (np.isfinite(radius) and radius > 0):
                raise ValueError(f"region='ball' needs a finite radius > 0, got {radius}")
            self._along = np.full(num_points, float(radius))
            self._across = float(radius)
            self._direction = np.zeros_like(self._points)
            reach = float(radius)
        else:
            if k is None or int(k) != k or not 1 <= k <= num_points:
                raise ValueError(
                    f"region='knn' needs an integer k in [1, N={num_points}], got {k}"
                )
            self.k = int(k)
            # The k-th distance without images bounds the k-th distance with them.
            distance, _ = cKDTree(self._points).query(self._points, self.k, workers=-1)
            reach = float(np.atleast_2d(distance.T).T[:, -1].max())
        self._reach = reach
        self._build_extended(reach)
        if region == "knn":
            self._tree = cKDTree(self._ext_points)
        else:
            self._build_sweep()
        self._csr_cache: tuple[np.ndarray, np.ndarray] | None = None
        logger.debug(
            "cloud sampler: %d points, %d with images, region %s", num_points,
            self._ext_points.shape[0], region,
        )

    # ------------------------------------------------------------------ properties
    @property
    def num_points(self) -> int:
        """Number of points N."""
        return int(self._points.shape[0])

    @property
    def dim(self) -> int:
        """Spatial dimension d."""
        return int(self._points.shape[1])

    @property
    def period(self) -> np.ndarray:
        """(d,) float64 periodic lengths (0: not periodic)."""
        return self._period.copy()

    @property
    def semi_axes(self) -> tuple[np.ndarray, float]:
        """Per-point region semi-axes: a (N,) float64 along the flow and b across it.

        For "ball" both are the radius; for "knn" they are undefined (ValueError).
        """
        if self.region == "knn":
            raise ValueError("region='knn' has no semi-axes")
        return self._along.copy(), self._across

    @property
    def extended_origin(self) -> np.ndarray:
        """(N_ext,) int64 original point of every extended point (ids of :class:`CloudEntries`)."""
        return self._ext_origin

    @property
    def extended_points(self) -> np.ndarray:
        """(N_ext, d) float64 coordinates of the extended points (images shifted by periods)."""
        return self._ext_points

    # ------------------------------------------------------------------ public API
    def full_clouds(self, queries: np.ndarray | None = None) -> Clouds:
        """All points of the clouds of the query points.

        Args:
            queries: (Q,) int point indices; None for every point.

        Returns:
            The clouds in compressed-row form, query point first in each.
        """
        queries = self._checked_queries(queries)
        chunk = self._entries(queries, full=True)
        offsets = np.zeros(queries.size + 1, dtype=np.int64)
        np.cumsum(chunk.sizes, out=offsets[1:])
        radius = np.sqrt(chunk.radius_squared)
        if self.region == "knn":
            reach = np.maximum.reduceat(radius, offsets[:-1]) if radius.size else radius
            reach = np.repeat(reach, chunk.sizes)
            with np.errstate(invalid="ignore", divide="ignore"):
                radius = np.where(reach > 0, radius / reach, 0.0)
        return Clouds(
            queries=queries,
            offsets=offsets,
            indices=self._ext_origin[chunk.entries],
            relative_positions=chunk.relative.astype(self._dtype, copy=False),
            radius=radius.astype(self._dtype, copy=False),
            weights=self._weights(radius),
        )

    def padded(
        self, queries: np.ndarray | None = None, *, max_points: int | None = None
    ) -> PaddedClouds:
        """Full clouds padded to a common width (see :meth:`Clouds.to_padded`).

        Args:
            queries: (Q,) int point indices; None for every point.
            max_points: padded width; default the largest cloud.

        Returns:
            (Q, n_max) padded clouds.
        """
        return self.full_clouds(queries).to_padded(max_points=max_points)

    def sample_entries(
        self, n: int, *, queries: np.ndarray | None = None, seed: SeedLike = None
    ) -> CloudEntries:
        """Draw n points per cloud uniformly without replacement, as compact extended ids.

        The query point is always kept, as column 0 (the network should see the local
        state); the other n - 1 columns are a uniform random subset of the rest of the cloud
        in random order. Clouds of at most n points are taken whole and padded with -1, never
        with duplicated points. The full clouds of all points are computed once and cached
        (about 4 bytes per entry), so redrawing every epoch costs O(Q n).

        Args:
            n: points per sample, >= 1.
            queries: (Q,) int point indices (repeats allowed); None for every point.
            seed: int seed or numpy Generator; the same seed gives the same sample.

        Returns:
            (Q, n) compact sample.
        """
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"n (points per cloud) must be an integer >= 1, got {n!r}")
        n = int(n)
        queries = self._checked_queries(queries)
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        offsets, entries = self._csr()
        out = np.full((queries.size, n), -1, dtype=entries.dtype)
        # Large chunks: sampling is O(rows * n) with small per-call overhead.
        step = max(1, (1 << 22) // max(n, 1))
        for start in range(0, queries.size, step):
            rows = queries[start : start + step]
            positions = _sample_positions(offsets[rows + 1] - offsets[rows], n, rng)
            valid = positions >= 0
            gathered = entries[np.where(valid, positions + offsets[rows][:, None], 0)]
            out[start : start + rows.size] = np.where(valid, gathered, -1)
        return CloudEntries(queries=queries, entries=out)

    def expand(self, sample: CloudEntries) -> PaddedClouds:
        """Turn a compact sample into padded clouds with point indices and positions.

        Args:
            sample: from :meth:`sample_entries` of this sampler.

        Returns:
            (Q, n) padded clouds.
        """
        entries = sample.entries
        mask = entries >= 0
        safe = np.where(mask, entries, 0)
        indices = np.where(mask, self._ext_origin[safe], -1)
        relative = self._ext_points[safe] - self._points[sample.queries][:, None, :]
        relative[~mask] = 0.0
        flat_queries = np.broadcast_to(sample.queries[:, None], entries.shape).ravel()
        if self.region == "knn":
            distance = np.linalg.norm(relative, axis=-1)
            reach = self._knn_reach(sample.queries)
            with np.errstate(invalid="ignore", divide="ignore"):
                radius = np.where(reach[:, None] > 0, distance / reach[:, None], 0.0)
        else:
            radius = np.sqrt(
                normalized_radius_squared(
                    relative.reshape(-1, self.dim),
                    self._direction[flat_queries],
                    self._along[flat_queries],
                    self._across,
                )
            ).reshape(entries.shape)
        radius = np.where(mask, radius, 0.0)
        weights = self._weights(radius)
        if weights is not None:
            weights = np.where(mask, weights, 0.0).astype(self._dtype, copy=False)
        return PaddedClouds(
            queries=sample.queries,
            indices=indices,
            relative_positions=relative.astype(self._dtype, copy=False),
            radius=radius.astype(self._dtype, copy=False),
            mask=mask,
            weights=weights,
        )

    def sample(
        self, n: int, *, queries: np.ndarray | None = None, seed: SeedLike = None
    ) -> PaddedClouds:
        """Draw n points per cloud (see :meth:`sample_entries`) and expand them.

        Args:
            n: points per sample, >= 1.
            queries: (Q,) int point indices; None for every point.
            seed: int seed or numpy Generator.

        Returns:
            (Q, n) padded clouds; column 0 is the query point.
        """
        return self.expand(self.sample_entries(n, queries=queries, seed=seed))

    # ------------------------------------------------------------------ construction
    def _build_extended(self, reach: float) -> None:
        """Replicate the points by whole periods wherever a region of size reach can see them."""
        points = self._points
        dim = self.dim
        low, high = points.min(axis=0), points.max(axis=0)
        origin = np.arange(points.shape[0], dtype=np.int64)
        ext_origin = [origin]
        ext_points = [points]
        periodic = [axis for axis in range(dim) if self._period[axis] > 0]
        if periodic:
            ranges = []
            for axis in periodic:
                length = self._period[axis]
                most = math.ceil((high[axis] - low[axis] + reach) / length) + 1
                ranges.append(np.arange(-most, most + 1))
            grids = np.meshgrid(*ranges, indexing="ij")
            shifts_int = np.stack([g.ravel() for g in grids], axis=1)
            shifts_int = shifts_int[np.any(shifts_int != 0, axis=1)]
            for shift_int in shifts_int:
                shift = np.zeros(dim)
                shift[periodic] = shift_int * self._period[periodic]
                moved = points + shift
                keep = np.all((moved >= low - reach) & (moved <= high + reach), axis=1)
                if keep.any():
                    ext_origin.append(origin[keep])
                    ext_points.append(moved[keep])
        self._ext_origin = np.concatenate(ext_origin)
        self._ext_points = np.concatenate(ext_points)
        self._self_ext = origin

    def _build_sweep(self) -> None:
        """Sort the extended points by transverse cell, then by the sweep coordinate."""
        dim = self.dim
        # Sweep along the axis the flow mostly follows: the chords are then long and few.
        self._sweep_axis = int(np.argmax(np.abs(self._velocity).mean(axis=0)))
        self._transverse = [axis for axis in range(dim) if axis != self._sweep_axis]
        ext = self._ext_points
        self._cell_size = _CELL_FRACTION.get(dim, 1.0) * self._across
        transverse = ext[:, self._transverse]
        self._cell_origin = transverse.min(axis=0)
        cell = np.floor((transverse - self._cell_origin) / self._cell_size).astype(np.int64)
        self._cell_shape = tuple(int(c) for c in cell.max(axis=0) + 1)
        linear = np.ravel_multi_index(tuple(cell.T), self._cell_shape)
        sweep = ext[:, self._sweep_axis]
        self._sweep_min = float(sweep.min())
        self._sweep_range = float(sweep.max() - self._sweep_min)
        # Gap of 1 between cells so that clipped keys never alias a neighbouring cell.
        self._span = self._sweep_range + 1.0
        keys = linear * self._span + (sweep - self._sweep_min)
        order = np.argsort(keys, kind="stable")
        self._sorted_keys = keys[order]
        # Store the extended set in sweep order so that candidates are runs of ids.
        self._ext_points = np.ascontiguousarray(ext[order])
        self._ext_origin = self._ext_origin[order]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        self._self_ext = inverse[: self.num_points]
        self._ext_coords = [np.ascontiguousarray(ext[order, axis]) for axis in range(dim)]

    # ------------------------------------------------------------------ cloud entries
    def _entries(self, queries: np.ndarray, *, full: bool) -> _Chunk:
        """Full clouds of the queries (query first); with full=True also positions and radii."""
        if self.region == "knn":
            return self._knn_entries(queries, full=full)
        size = self._chunk_size
        chunks = [queries[i : i + size] for i in range(0, queries.size, size)]
        results = self._map(lambda chunk: self._sweep_chunk(chunk, full=full), chunks)
        if not results:
            empty = np.zeros(0, dtype=np.int64)
            return _Chunk(empty, empty, np.zeros((0, self.dim)), np.zeros(0))
        if len(results) == 1:
            return results[0]
        return _Chunk(
            sizes=np.concatenate([r.sizes for r in results]),
            entries=np.concatenate([r.entries for r in results]),
            relative=np.concatenate([r.relative for r in results]) if full else None,
            radius_squared=np.concatenate([r.radius_squared for r in results]) if full else None,
        )

    def _map(self, function: Callable, chunks: list) -> list:
        if self._workers == 1 or len(chunks) <= 1:
            return [function(chunk) for chunk in chunks]
        with ThreadPoolExecutor(max_workers=self._workers) as pool:
            return list(pool.map(function, chunks))

    def _sweep_chunk(self, queries: np.ndarray, *, full: bool) -> _Chunk:
        dim = self.dim
        centre = self._points[queries]
        direction = self._direction[queries]
        along = self._along[queries]
        covariance = region_covariance(direction, along, self._across)
        transverse = self._transverse
        extent = np.sqrt(np.diagonal(covariance, axis1=1, axis2=2))[:, transverse]
        extent = extent * (1.0 + _SLACK) + _SLACK
        centre_t = centre[:, transverse]
        shape = np.asarray(self._cell_shape)
        first = np.floor((centre_t - extent - self._cell_origin) / self._cell_size)
        last = np.floor((centre_t + extent - self._cell_origin) / self._cell_size)
        first = np.clip(first, 0, shape - 1).astype(np.int64)
        last = np.clip(last, -1, shape - 1).astype(np.int64)
        per_axis = np.maximum(last - first + 1, 0)
        pair_counts = per_axis.prod(axis=1)
        pair_query = np.repeat(np.arange(queries.size), pair_counts)
        local = np.arange(pair_query.size) - np.repeat(
            np.cumsum(pair_counts) - pair_counts, pair_counts
        )
        # Mixed-radix decomposition of the pair's rank into per-axis cell numbers.
        cells = np.empty((pair_query.size, len(transverse)), dtype=np.int64)
        for column in range(len(transverse) - 1, -1, -1):
            radix = per_axis[pair_query, column]
            cells[:, column] = first[pair_query, column] + local % radix
            local //= radix
        lower = self._cell_origin + cells * self._cell_size - centre_t[pair_query]
        upper = lower + self._cell_size
        low, high = chord_bounds(covariance[pair_query], self._sweep_axis, lower, upper)
        slack = _SLACK * (self._span + np.abs(high) + np.abs(low))
        sweep_centre = centre[pair_query, self._sweep_axis] - self._sweep_min
        base = np.ravel_multi_index(tuple(cells.T), self._cell_shape) * self._span
        key_low = base + np.clip(sweep_centre + low - slack, -0.5, self._sweep_range + 0.5)
        key_high = base + np.clip(sweep_centre + high + slack, -0.5, self._sweep_range + 0.5)
        start = np.searchsorted(self._sorted_keys, key_low, side="left")
        stop = np.searchsorted(self._sorted_keys, key_high, side="right")
        counts = np.where(low <= high, np.maximum(stop - start, 0), 0)
        total = int(counts.sum())
        # The extended set is stored in sweep order: candidates are runs of consecutive ids.
        entries = np.arange(total, dtype=np.int64)
        entries += np.repeat(start - (np.cumsum(counts) - counts), counts)
        owner = np.repeat(pair_query.astype(np.int32), counts)
        # r^2 = |r|^2 / b^2 + (r . e)^2 (1 / a^2 - 1 / b^2), per coordinate on 1-D arrays.
        relative = []
        norm_sq = np.zeros(total)
        parallel = np.zeros(total)
        for axis in range(dim):
            component = self._ext_coords[axis].take(entries)
            component -= centre[:, axis].take(owner)
            relative.append(component)
            norm_sq += component * component
            parallel += component * direction[:, axis].take(owner)
        inverse_across_sq = 1.0 / (self._across * self._across)
        radius_squared = norm_sq
        radius_squared *= inverse_across_sq
        parallel *= parallel
        parallel *= (1.0 / (along * along) - inverse_across_sq).take(owner)
        radius_squared += parallel
        inside = radius_squared <= 1.0
        entries = entries[inside]
        owner = owner[inside]
        sizes = np.bincount(owner, minlength=queries.size).astype(np.int64)
        front = np.cumsum(sizes) - sizes
        self_position = np.flatnonzero(entries == self._self_ext.take(queries).take(owner))
        if self_position.size != queries.size:
            raise RuntimeError("internal error: a query point was not found in its own cloud")
        entries[self_position] = entries[front]
        entries[front] = self._self_ext.take(queries)
        if not full:
            return _Chunk(sizes, entries, None, None)
        radius_squared = radius_squared[inside]
        radius_squared[self_position] = radius_squared[front]
        radius_squared[front] = 0.0
        stacked = np.empty((entries.size, dim))
        for axis in range(dim):
            component = relative[axis][inside]
            component[self_position] = component[front]
            component[front] = 0.0
            stacked[:, axis] = component
        return _Chunk(sizes, entries, stacked, radius_squared)

    def _knn_entries(self, queries: np.ndarray, *, full: bool) -> _Chunk:
        k = self.k
        _, neighbours = self._tree.query(self._points[queries], k, workers=-1)
        neighbours = np.asarray(neighbours, dtype=np.int64).reshape(queries.size, k)
        own = self._self_ext[queries]
        is_self = neighbours == own[:, None]
        # Coincident points can push the query out of its own k list: put it first always and
        # keep the k - 1 nearest others.
        order = np.argsort(is_self, axis=1, kind="stable")[:, : k - 1]
        others = np.take_along_axis(neighbours, order, axis=1)
        entries = np.concatenate([own[:, None], others], axis=1).ravel()
        sizes = np.full(queries.size, k, dtype=np.int64)
        if not full:
            return _Chunk(sizes, entries, None, None)
        relative = self._ext_points[entries] - np.repeat(self._points[queries], k, axis=0)
        return _Chunk(sizes, entries, relative, np.einsum("ij,ij->i", relative, relative))

    def _knn_reach(self, queries: np.ndarray) -> np.ndarray:
        distance, _ = self._tree.query(self._points[queries], self.k, workers=-1)
        return np.asarray(distance).reshape(queries.size, self.k)[:, -1]

    def _csr(self) -> tuple[np.ndarray, np.ndarray]:
        """Cached full clouds of every point: offsets (N+1,) int64, extended ids (nnz,) int32."""
        if self._csr_cache is None:
            chunk = self._entries(np.arange(self.num_points, dtype=np.int64), full=False)
            offsets = np.zeros(self.num_points + 1, dtype=np.int64)
            np.cumsum(chunk.sizes, out=offsets[1:])
            small = np.int32 if self._ext_points.shape[0] < 2**31 else np.int64
            self._csr_cache = (offsets, chunk.entries.astype(small))
        return self._csr_cache

    # ------------------------------------------------------------------ per-entry values
    def _weights(self, radius: np.ndarray) -> np.ndarray | None:
        if self.cutoff_start is None or self.region == "knn":
            return None
        return smooth_switch(radius, start=self.cutoff_start).astype(self._dtype, copy=False)

    def _checked_queries(self, queries: np.ndarray | None) -> np.ndarray:
        if queries is None:
            return np.arange(self.num_points, dtype=np.int64)
        array = np.asarray(queries)
        if array.ndim != 1:
            raise ValueError(f"queries must be a 1-D array of point indices, got shape {array.shape}")
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"queries must be integer point indices, got dtype {array.dtype}")
        array = array.astype(np.int64, copy=False)
        if array.size and (array.min() < 0 or array.max() >= self.num_points):
            raise ValueError(
                f"queries must be point indices in [0, {self.num_points}), got values in "
                f"[{array.min()}, {array.max()}]"
            )
        return array


def _sample_positions(sizes: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Local positions of a uniform sample without replacement of n entries per cloud.

    Position 0 (the query point) is always kept first; the other n - 1 are drawn from
    1..size-1. Large clouds draw integers with replacement and keep the first n - 1 distinct
    values in draw order (exactly sequential sampling without replacement); clouds where that
    would need many draws, or where too few distinct values came, rank random keys instead.

    Args:
        sizes: (R,) int64 cloud sizes (>= 1).
        n: sample width.
        rng: random generator.

    Returns:
        (R, n) int64 positions, -1 in padding slots.
    """
    rows = sizes.size
    out = np.full((rows, n), -1, dtype=np.int64)
    out[:, 0] = 0
    if n == 1 or rows == 0:
        return out
    want = n - 1
    small = sizes <= n
    if small.any():
        width = np.arange(1, n)
        out[small, 1:] = np.where(width < sizes[small, None], width, -1)
    large = np.flatnonzero(~small)
    if large.size == 0:
        return out
    others = sizes[large] - 1
    sparse = others >= 2 * want
    draws_per_row = int(1.5 * want) + 8
    done = np.zeros(large.size, dtype=bool)
    rows_sparse = np.flatnonzero(sparse)
    if rows_sparse.size:
        draws = rng.integers(0, others[rows_sparse, None], size=(rows_sparse.size, draws_per_row))
        order = np.argsort(draws, axis=1, kind="stable")
        ordered = np.take_along_axis(draws, order, axis=1)
        repeated = np.zeros_like(ordered, dtype=bool)
        repeated[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
        first_seen = np.empty_like(repeated)
        np.put_along_axis(first_seen, order, ~repeated, axis=1)
        rank = np.cumsum(first_seen, axis=1)
        enough = rank[:, -1] >= want
        keep = first_seen & (rank <= want) & enough[:, None]
        chosen = draws[keep].reshape(-1, want)
        out[large[rows_sparse[enough]], 1:] = chosen + 1
        done[rows_sparse[enough]] = True
    rest = np.flatnonzero(~done)
    if rest.size:
        width = int(others[rest].max())
        keys = rng.random((rest.size, width))
        keys[np.arange(width)[None, :] >= others[rest, None]] = np.inf
        chosen = np.argpartition(keys, want - 1, axis=1)[:, :want]
        out[large[rest], 1:] = chosen + 1
    return out


def _checked_points(points: np.ndarray) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"points must be an (N, d) array, got shape {array.shape}")
    if array.shape[0] == 0:
        raise ValueError("points is empty: a cloud sampler needs at least one point")
    if array.shape[1] < 2:
        raise ValueError(f"points must have d >= 2 coordinates, got d = {array.shape[1]}")
    if not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.all(np.isfinite(array), axis=1)))
        raise ValueError(f"points contain NaN or inf ({bad} rows); clean the case data first")
    return np.ascontiguousarray(array)


def _checked_velocity(velocity: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    array = np.asarray(velocity, dtype=np.float64)
    if array.shape != shape:
        raise ValueError(
            f"velocity must have the shape of points {shape}, got {array.shape} "
            "(one velocity vector with d components per point)"
        )
    if not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.all(np.isfinite(array), axis=1)))
        raise ValueError(f"velocity contains NaN or inf ({bad} rows); clean the case data first")
    return np.ascontiguousarray(array)


def _checked_period(period: np.ndarray | None, dim: int) -> np.ndarray:
    if period is None:
        return np.zeros(dim)
    array = np.asarray(period, dtype=np.float64).reshape(-1)
    if array.shape != (dim,):
        raise ValueError(
            f"period must have one entry per coordinate (length {dim}, 0 = not periodic), "
            f"got length {array.size}"
        )
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError(f"period entries must be finite and >= 0, got {array.tolist()}")
    return array
