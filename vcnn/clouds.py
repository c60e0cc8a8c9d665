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
the sweep coordinate, and stored in that order, so that for each (query, cell) pair the
candidates are one run of consecutive ids. Two sweep ranges are computed per pair: an outer
one that holds every point of the region in the cell, and an inner one whose points are all
inside the region (:func:`vcnn._regions.inner_chord_bounds`). The inner run is accepted as
it is; only the two short end pieces between the ranges go through the exact test. The
output is written once, as int32 ids, by a cumulative sum over run starts, in threads over
chunks of queries. Relative positions, radii and weights of full clouds are computed only
when asked for. The k-nearest region uses ``cKDTree.query``, which returns arrays.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from functools import cached_property
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from scipy.spatial import cKDTree

from vcnn._regions import (
    chord_bounds,
    ellipse_semi_axes,
    inner_chord_bounds,
    region_covariance,
    smooth_switch,
)
from vcnn.physics import DEFAULT_PHYSICS
from vcnn.system import TooLargeError, check_fits

logger = logging.getLogger(__name__)

__all__ = [
    "CloudEntries",
    "CloudOptions",
    "CloudSampler",
    "Clouds",
    "PaddedClouds",
    "RegionKind",
]

RegionKind = Literal["ellipse", "ball", "knn"]
_REGIONS = ("ellipse", "ball", "knn")
SeedLike = int | np.random.Generator | None

# Transverse cell size of the sweep in units of the smallest transverse semi-axis: thinner
# cells leave shorter end pieces to test but give more (query, cell) pairs; measured on the
# 40k hill field (experiments/bench_clouds.py).
_CELL_FRACTION = {2: 0.15, 3: 0.5}
#: Estimated bytes per cloud entry (query, point): its id, relative position, radius and
#: weight, and the network inputs built from them; used to refuse clouds that cannot fit.
BYTES_PER_ENTRY = 48
#: Estimated bytes per periodic image of a point (coordinates, ids, sort keys).
BYTES_PER_IMAGE = 128
#: Most periods a cloud may span along a periodic axis: beyond, the period is absurdly short
#: for the clouds (every cloud would hold each point that many times).
MAX_PERIOD_WRAPS = 64
# Relative slack on chord bounds so that round-off never drops a point on the boundary (outer
# range) nor accepts one outside (inner range); the exact test decides in between.
_SLACK = 1e-9


def check_period_wraps(reach: float, length: float, *, axis: int) -> None:
    """Refuse clouds that would wrap around a period more than :data:`MAX_PERIOD_WRAPS` times.

    Shared by every cloud builder (full clouds, the device search, the cloud quadrature): a
    velocity of absurd size or a wrong period shows here, before anything is allocated.

    Args:
        reach: the largest distance a cloud reaches from its query point.
        length: the period along ``axis`` (> 0).
        axis: the axis, for the message.

    Raises:
        TooLargeError: naming the period, the reach and the number of wraps.
    """
    if reach > MAX_PERIOD_WRAPS * length:
        raise TooLargeError(
            f"period {length:.3g} along axis {axis} is much shorter than the clouds "
            f"(they reach {reach:.3g} from their query point): every cloud would wrap "
            f"around the period about {reach / length:.2g} times (at most "
            f"{MAX_PERIOD_WRAPS} allowed); check the period and the velocity"
        )


def map_images(image_points: np.ndarray, image_ids: np.ndarray) -> np.ndarray:
    """``image_points[image_ids]`` by a multithreaded torch gather (large arrays).

    Args:
        image_points: (M,) int point index of every image id.
        image_ids: (nnz,) int image ids.

    Returns:
        (nnz,) point indices, in the dtype of ``image_points``.
    """
    origin = torch.from_numpy(np.ascontiguousarray(image_points))
    out = np.empty(image_ids.size, dtype=origin.numpy().dtype)
    ids = torch.from_dlpack(np.ascontiguousarray(image_ids))  # no copy, read-only ids too
    torch.index_select(origin, 0, ids, out=torch.from_numpy(out))
    return out


class Clouds:
    """Full clouds in compressed-row form.

    Point indices are computed eagerly; relative positions, radii and weights are computed on
    first access (and then kept), since most users need only some of them and they are the
    largest part (about 28 M entries x d for a 40k-point case).

    Attributes:
        queries: (Q,) int64 indices of the query points.
        offsets: (Q + 1,) int64; cloud q is entries offsets[q]:offsets[q + 1].
        indices: (nnz,) int32 (int64 beyond 2^31 points) point indices of the entries (first
            entry of each cloud: the query point itself); computed on first access when the
            clouds were built as image ids.
        image_ids: (nnz,) int ids of the entries in a set of point images (periodic copies),
            or None; ``indices = image_points[image_ids]``.
        image_points: (M,) int point index of every image id, or None.
        relative_positions: (nnz, d) float, x_i - x0 of the image that lies in the cloud.
        radius: (nnz,) float normalised region radius of each entry (1 on the region boundary;
            for "knn", distance over the cloud's largest distance).
        weights: (nnz,) float smooth cutoff weights in [0, 1], or None (no cutoff, or "knn").
    """

    def __init__(
        self,
        queries: np.ndarray,
        offsets: np.ndarray,
        indices: np.ndarray | None,
        relative_positions: np.ndarray | None = None,
        radius: np.ndarray | None = None,
        weights: np.ndarray | None = None,
        *,
        compute: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray | None]] | None = None,
        image_ids: np.ndarray | None = None,
        image_points: np.ndarray | None = None,
    ) -> None:
        """Hold the clouds.

        Args:
            queries: (Q,) int64 query point indices.
            offsets: (Q + 1,) int64 row offsets.
            indices: (nnz,) int point indices, or None with ``image_ids`` and
                ``image_points`` (then mapped on first access: consumers that can read image
                ids, like the fused closure kernel, skip the pass over all entries).
            relative_positions: (nnz, d) float, or None when ``compute`` gives them.
            radius: (nnz,) float, or None when ``compute`` gives them.
            weights: (nnz,) float or None.
            compute: called once, on first access, to give (relative_positions, radius,
                weights) instead of passing them.
            image_ids: (nnz,) int ids of the entries in a set of point images, or None.
            image_points: (M,) int point index of every image id, or None.
        """
        if compute is None and (relative_positions is None or radius is None):
            raise ValueError("Clouds needs relative_positions and radius, or a compute callable")
        if indices is None and (image_ids is None or image_points is None):
            raise ValueError("Clouds needs indices, or image_ids and image_points")
        self.queries = queries
        self.offsets = offsets
        self.image_ids = image_ids
        self.image_points = image_points
        if indices is not None:
            self.__dict__["indices"] = indices
        self._compute = compute
        if compute is None:
            self.__dict__["_values"] = (relative_positions, radius, weights)

    @cached_property
    def _values(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        return self._compute()

    @cached_property
    def indices(self) -> np.ndarray:
        """(nnz,) int point indices of the entries (mapped from the image ids once)."""
        return map_images(self.image_points, self.image_ids)

    @property
    def relative_positions(self) -> np.ndarray:
        """(nnz, d) float x_i - x0 (computed on first access)."""
        return self._values[0]

    @property
    def radius(self) -> np.ndarray:
        """(nnz,) float normalised region radius (computed on first access)."""
        return self._values[1]

    @property
    def weights(self) -> np.ndarray | None:
        """(nnz,) float smooth cutoff weights, or None (computed on first access)."""
        return self._values[2]

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


class _ChunkPlan(NamedTuple):
    """How to write the full clouds of a chunk of queries (positions local to the chunk).

    Every cloud is a sequence of (query, cell) pairs in cell order; a pair's part is its
    accepted left end piece, its inner run and its accepted right end piece, so each cloud
    lists extended ids in increasing order until the query is swapped to the front.
    """

    sizes: np.ndarray  # (Q,) int64 cloud sizes
    run_positions: np.ndarray  # (R,) int64 output position of each non-empty inner run
    run_starts: np.ndarray  # (R,) int64 first extended id of the run
    single_positions: np.ndarray  # (S,) int64 output positions of tested, accepted entries
    single_ids: np.ndarray  # (S,) int64 their extended ids
    self_positions: np.ndarray  # (Q,) int64 output position of each query's own entry


class _Index(NamedTuple):
    """Full clouds as extended ids (query first in each cloud)."""

    offsets: np.ndarray  # (Q + 1,) int64
    entries: np.ndarray  # (nnz,) int32 (int64 beyond 2^31 extended points)


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
        diffusivity: float = DEFAULT_PHYSICS.diffusivity,
        zeta: float = DEFAULT_PHYSICS.zeta,
        eps: float = 0.2,
        radius: float | None = None,
        k: int | None = None,
        cutoff_start: float | None = 0.5,
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
            if not np.isfinite(reach):
                raise TooLargeError(
                    f"velocity reaches a speed of {float(speed.max()):.3g}: the clouds along "
                    "the flow would be infinitely long; check the velocity's units"
                )
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
        self._csr_cache: _Index | None = None
        self._sampling_cache: tuple[np.ndarray, np.ndarray] | None = None
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
    # ------------------------------------------------------------------ public API
    def full_clouds(self, queries: np.ndarray | None = None) -> Clouds:
        """All points of the clouds of the query points.

        Point indices are computed here; relative positions, radii and weights when the
        returned :class:`Clouds` is first asked for them.

        Args:
            queries: (Q,) int point indices; None for every point.

        Returns:
            The clouds in compressed-row form, query point first in each.
        """
        every_point = queries is None
        queries = self._checked_queries(queries)
        if self.region == "knn":
            return self._knn_clouds(queries)
        if every_point and self._csr_cache is not None:
            index = self._csr_cache
        else:
            index, _ = self._index(queries, with_origin=False)
            if every_point:
                self._csr_cache = index

        def compute() -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
            relative, radius = self._entry_geometry(queries, index)
            return relative, radius, self._weights(radius)

        return Clouds(
            queries, index.offsets, None, compute=compute, image_ids=index.entries,
            image_points=self._image_points(),
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
        (4 bytes per entry), so redrawing every epoch costs O(Q n).

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
        check_fits(
            queries.size * n,
            BYTES_PER_ENTRY,
            f"clouds of {n} points for {queries.size} queries would hold",
            hint="lower the cloud size",
        )
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        offsets, padded_entries = self._sampling_index()
        out = np.empty((queries.size, n), dtype=padded_entries.dtype)
        sentinel = padded_entries.size - 1  # holds -1: padding slots gather it
        # Chunks of about 1 M slots, drawn in threads; each chunk has its own generator seeded
        # from rng, so the sample does not depend on the thread schedule.
        step = max(1, (1 << 20) // n)
        starts = range(0, queries.size, step)
        seeds = rng.integers(0, 2**63 - 1, size=len(starts))

        def draw(job: int) -> None:
            start = starts[job]
            rows = queries[start : start + step]
            first = offsets[rows]
            chunk_rng = np.random.default_rng(int(seeds[job]))
            positions = _sample_positions(offsets[rows + 1] - first, n, chunk_rng)
            padding = positions < 0
            positions += first[:, None]
            positions[padding] = sentinel
            np.take(padded_entries, positions, out=out[start : start + rows.size])

        self._map(draw, list(range(len(starts))))
        return CloudEntries(queries=queries, entries=out)

    def expand(self, sample: CloudEntries) -> PaddedClouds:
        """Turn a compact sample into padded clouds with point indices and positions.

        Args:
            sample: from :meth:`sample_entries` of this sampler.

        Returns:
            (Q, n) padded clouds.
        """
        entries = sample.entries
        queries = sample.queries
        num_rows, width = entries.shape
        mask = entries >= 0
        indices = self._entry_points(entries)
        if self.region == "knn":
            safe = np.where(mask, entries, 0)
            relative = self._ext_points[safe] - self._points[queries][:, None, :]
            relative[~mask] = 0.0
            distance = np.linalg.norm(relative, axis=-1)
            reach = self._knn_reach(queries)
            with np.errstate(invalid="ignore", divide="ignore"):
                radius = np.where(reach[:, None] > 0, distance / reach[:, None], 0.0)
            relative = relative.astype(self._dtype, copy=False)
            radius = np.where(mask, radius, 0.0).astype(self._dtype, copy=False)
        else:
            relative = np.empty((num_rows, width, self.dim), dtype=self._dtype)
            radius = np.empty((num_rows, width), dtype=self._dtype)
            # A padding slot (-1) gathers the query's own point: relative 0, radius 0.
            safe = np.where(mask, entries, self._self_ext[queries][:, None])
            step = max(1, (1 << 16) // max(width, 1))
            counts = np.full(min(step, num_rows), width)

            def fill(start: int) -> None:
                rows = slice(start, min(start + step, num_rows))
                count = rows.stop - rows.start
                self._fill_geometry(
                    safe[rows].ravel(), queries[rows], counts[:count],
                    relative[rows].reshape(-1, self.dim), radius[rows].reshape(-1),
                )

            self._map(fill, list(range(0, num_rows, step)))
        weights = self._weights(radius)
        if weights is not None:
            weights[~mask] = 0.0
        return PaddedClouds(
            queries=queries,
            indices=indices,
            relative_positions=relative,
            radius=radius,
            mask=mask,
            weights=weights,
        )

    def sample_points(
        self, n: int, *, queries: np.ndarray | None = None, seed: SeedLike = None
    ) -> np.ndarray:
        """The point indices of :meth:`sample` (same seed, same draw), without the geometry.

        Args:
            n: points per sample, >= 1.
            queries: (Q,) int point indices; None for every point.
            seed: int seed or numpy Generator.

        Returns:
            (Q, n) int point indices, -1 in padding slots; column 0 is the query point.
        """
        return self._entry_points(self.sample_entries(n, queries=queries, seed=seed).entries)

    def _entry_points(self, entries: np.ndarray) -> np.ndarray:
        """Point index of each extended id, -1 kept."""
        return np.where(entries >= 0, self._ext_origin.astype(entries.dtype)[entries], -1)

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
    def _check_periods(self, reach: float, low: np.ndarray, high: np.ndarray) -> None:
        """Refuse periods that are absurd for the points or the clouds, before allocating.

        Raises:
            TooLargeError: a period shorter than the extent of the points, one that a cloud
                would wrap around more than :data:`MAX_PERIOD_WRAPS` times, or periodic images
                that would not fit in memory (with the estimate).
        """
        images = 1.0
        for axis in range(self.dim):
            length = float(self._period[axis])
            if length <= 0:
                continue
            extent = float(high[axis] - low[axis])
            if length < extent * (1.0 - 1e-9):
                raise TooLargeError(
                    f"period {length:.3g} along axis {axis} is shorter than the extent of the "
                    f"points along it ({extent:.3g}): the case would repeat itself about "
                    f"{extent / length:.2g} times; give the domain's period"
                )
            check_period_wraps(reach, length, axis=axis)
            images *= (extent + 2.0 * reach) / length + 1.0
        check_fits(
            self.num_points * images,
            BYTES_PER_IMAGE,
            "the periodic images of the points would hold",
            hint="check the period and the velocity",
            unit="points",
        )

    def _build_extended(self, reach: float) -> None:
        """Replicate the points by whole periods wherever a region of size reach can see them."""
        points = self._points
        dim = self.dim
        low, high = points.min(axis=0), points.max(axis=0)
        self._check_periods(reach, low, high)
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
        self._cell_size = _CELL_FRACTION.get(dim, 0.5) * self._across
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
        # First id of every key bin (about 16 bins per point): a range bound is then one
        # lookup instead of a binary search over all points.
        self._bin_origin = -1.0
        bins = 16 * keys.size
        self._bin_width = (math.prod(self._cell_shape) * self._span + 1.0) / bins
        edges = self._bin_origin + np.arange(bins + 2) * self._bin_width
        self._bin_first = np.searchsorted(self._sorted_keys, edges, side="left")
        # Store the extended set in sweep order so that candidates are runs of ids.
        self._ext_points = np.ascontiguousarray(ext[order])
        self._ext_origin = self._ext_origin[order]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        self._self_ext = inverse[: self.num_points]
        self._ext_coords = [np.ascontiguousarray(ext[order, axis]) for axis in range(dim)]

    # ------------------------------------------------------------------ cloud index
    @property
    def _id_dtype(self) -> type:
        return np.int32 if self._ext_points.shape[0] < 2**31 - 1 else np.int64

    def _map_origin(self, entries: np.ndarray) -> np.ndarray:
        """(nnz,) point indices of extended ids (a multithreaded torch gather)."""
        return map_images(self._image_points(), entries)

    def _image_points(self) -> np.ndarray:
        """(M,) point index of every extended id, in the id dtype."""
        return self._ext_origin.astype(self._id_dtype, copy=False)

    def _index(
        self, queries: np.ndarray, *, with_origin: bool
    ) -> tuple[_Index, np.ndarray | None]:
        """Full clouds of the queries as extended ids, and point indices if asked for.

        Chunks of queries are planned in threads (cell ranges, exact test of the end pieces,
        cloud sizes); then the one output array is written in a few whole-array passes
        (torch's fill, cumulative sum and gather use every core).
        """
        size = self._chunk_size
        chunks = [queries[i : i + size] for i in range(0, queries.size, size)]
        plans = self._map(self._plan_chunk, chunks)
        sizes = np.concatenate([plan.sizes for plan in plans]) if plans else np.zeros(0, int)
        offsets = np.zeros(queries.size + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        check_fits(
            int(offsets[-1]),
            BYTES_PER_ENTRY,
            f"the full clouds of {queries.size} points would hold",
            hint="the clouds are too large for this mesh (check the velocity and the cloud "
            "options)",
        )
        bases = offsets[np.arange(0, queries.size, size)]

        def joined(field: str, shifted: bool) -> np.ndarray:
            parts = [getattr(plan, field) for plan in plans]
            if shifted:
                parts = [part + base for part, base in zip(parts, bases)]
            return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

        entries = np.empty(int(offsets[-1]), dtype=self._id_dtype)
        _fill_runs(entries, joined("run_positions", True), joined("run_starts", False))
        entries[joined("single_positions", True)] = joined("single_ids", False)
        own_positions = joined("self_positions", True)
        front = offsets[:-1]
        entries[own_positions] = entries[front]
        entries[front] = self._self_ext[queries]
        indices = self._map_origin(entries) if with_origin else None
        return _Index(offsets, entries), indices

    def _plan_chunk(self, queries: np.ndarray) -> _ChunkPlan:
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
        pair_front = np.cumsum(pair_counts) - pair_counts
        local = np.arange(pair_query.size) - np.repeat(pair_front, pair_counts)
        # Mixed-radix decomposition of the pair's rank into per-axis cell numbers.
        cells = np.empty((pair_query.size, len(transverse)), dtype=np.int64)
        for column in range(len(transverse) - 1, -1, -1):
            radix = per_axis[pair_query, column]
            cells[:, column] = first[pair_query, column] + local % radix
            local //= radix
        lower = self._cell_origin + cells * self._cell_size - centre_t[pair_query]
        upper = lower + self._cell_size
        low, high = chord_bounds(covariance[pair_query], self._sweep_axis, lower, upper)
        inner_low, inner_high = inner_chord_bounds(
            direction[pair_query], along[pair_query], self._across, self._sweep_axis, lower, upper
        )
        # |low|, |high| <= a; a finite slack keeps empty (infinite) bounds from making NaN.
        slack = _SLACK * (self._span + 2.0 * along[pair_query])
        sweep_centre = centre[pair_query, self._sweep_axis] - self._sweep_min
        base = np.ravel_multi_index(tuple(cells.T), self._cell_shape) * self._span

        def bound(relative: np.ndarray, rounding: Callable, step: int = 0) -> np.ndarray:
            key = base + np.clip(sweep_centre + relative, -0.5, self._sweep_range + 0.5)
            position = rounding((key - self._bin_origin) / self._bin_width) + step
            return self._bin_first[np.clip(position, 0, self._bin_first.size - 1).astype(np.intp)]

        # Key bins rounded outwards for the outer range and inwards for the inner one: that
        # only moves points from the accepted run into the tested pieces.
        outer_start = bound(low - slack, np.floor)
        outer_stop = np.where(
            low <= high, np.maximum(bound(high + slack, np.floor, 1), outer_start), outer_start
        )
        has_inner = inner_low + slack <= inner_high - slack
        inner_start = np.where(
            has_inner, np.clip(bound(inner_low + slack, np.ceil), outer_start, outer_stop),
            outer_stop,
        )
        inner_stop = np.where(
            has_inner, np.clip(bound(inner_high - slack, np.floor), inner_start, outer_stop),
            outer_stop,
        )
        # End pieces [outer_start, inner_start) and [inner_stop, outer_stop), interleaved per
        # pair (left, right), go through the exact test.
        piece_starts = np.stack([outer_start, inner_stop], axis=1).ravel()
        piece_lengths = np.stack(
            [inner_start - outer_start, outer_stop - inner_stop], axis=1
        ).ravel()
        piece_fronts = np.zeros(piece_lengths.size + 1, dtype=np.int64)
        np.cumsum(piece_lengths, out=piece_fronts[1:])
        candidates = np.empty(int(piece_fronts[-1]), dtype=np.int64)
        _fill_runs(candidates, piece_fronts[:-1], piece_starts, piece_lengths)
        piece_of = np.repeat(np.arange(piece_lengths.size), piece_lengths)
        owner = pair_query[piece_of >> 1]
        inside = self._inside(candidates, centre, direction, along, owner)
        accepted = np.flatnonzero(inside)
        inside_before = np.zeros(candidates.size + 1, dtype=np.int64)
        np.cumsum(inside, out=inside_before[1:])
        accepted_before = inside_before[piece_fronts]
        accepted_count = np.diff(accepted_before).reshape(-1, 2)
        inner_length = inner_stop - inner_start
        pair_total = accepted_count.sum(axis=1) + inner_length
        pair_out = np.cumsum(pair_total) - pair_total
        total_before = np.zeros(pair_total.size + 1, dtype=np.int64)
        np.cumsum(pair_total, out=total_before[1:])
        sizes = total_before[pair_front + pair_counts] - total_before[pair_front]
        run_positions = pair_out + accepted_count[:, 0]
        # Tested entries: output slot = pair start + rank within the piece (+ left piece and
        # inner run for the right piece).
        single_piece = piece_of[accepted]
        single_pair = single_piece >> 1
        rank = np.arange(accepted.size) - accepted_before[single_piece]
        single_positions = pair_out[single_pair] + rank
        right_offset = accepted_count[:, 0] + inner_length
        single_positions += (single_piece & 1) * right_offset[single_pair]
        single_ids = candidates[accepted]
        # The query's own entry: in an inner run or among the tested entries, exactly once.
        own = self._self_ext[queries]
        own_pair = own[pair_query]
        in_run = np.flatnonzero((own_pair >= inner_start) & (own_pair < inner_stop))
        in_singles = np.flatnonzero(single_ids == own[pair_query[single_pair]])
        found_query = np.concatenate([pair_query[in_run], pair_query[single_pair[in_singles]]])
        found_position = np.concatenate([
            run_positions[in_run] + own_pair[in_run] - inner_start[in_run],
            single_positions[in_singles],
        ])
        if found_query.size != queries.size or np.any(
            np.bincount(found_query, minlength=queries.size) != 1
        ):
            raise RuntimeError("internal error: a query point was not found once in its cloud")
        self_positions = np.empty(queries.size, dtype=np.int64)
        self_positions[found_query] = found_position
        runs = inner_length > 0
        return _ChunkPlan(
            sizes=sizes,
            run_positions=run_positions[runs],
            run_starts=inner_start[runs],
            single_positions=single_positions,
            single_ids=single_ids,
            self_positions=self_positions,
        )

    def _inside(
        self,
        candidates: np.ndarray,
        centre: np.ndarray,
        direction: np.ndarray,
        along: np.ndarray,
        owner: np.ndarray,
    ) -> np.ndarray:
        """Exact region test (float64) of candidate extended ids against their owners' regions."""
        norm_sq = np.zeros(candidates.size)
        parallel = np.zeros(candidates.size)
        for axis in range(self.dim):
            component = self._ext_coords[axis].take(candidates)
            component -= centre[:, axis].take(owner)
            norm_sq += component * component
            parallel += component * direction[:, axis].take(owner)
        # r^2 = |r|^2 / b^2 + (r . e)^2 (1 / a^2 - 1 / b^2)
        inverse_across_sq = 1.0 / (self._across * self._across)
        radius_squared = norm_sq
        radius_squared *= inverse_across_sq
        parallel *= parallel
        parallel *= (1.0 / (along * along) - inverse_across_sq).take(owner)
        radius_squared += parallel
        return radius_squared <= 1.0

    def _entry_geometry(self, queries: np.ndarray, index: _Index) -> tuple[np.ndarray, np.ndarray]:
        """Relative positions ((nnz, d) dtype) and radii ((nnz,) dtype) of a full-cloud index."""
        offsets, entries = index
        relative = np.empty((entries.size, self.dim), dtype=self._dtype)
        radius = np.empty(entries.size, dtype=self._dtype)
        # About 64 k entries per piece: the float64 temporaries stay in the core's cache.
        step = max(1, (1 << 16) // max(1, entries.size // max(1, queries.size)))

        def fill(start: int) -> None:
            stop = min(start + step, queries.size)
            part = slice(int(offsets[start]), int(offsets[stop]))
            self._fill_geometry(
                entries[part], queries[start:stop], np.diff(offsets[start : stop + 1]),
                relative[part], radius[part],
            )

        self._map(fill, list(range(0, queries.size, step)))
        return relative, radius

    def _fill_geometry(
        self,
        ids: np.ndarray,
        queries: np.ndarray,
        counts: np.ndarray,
        relative: np.ndarray,
        radius: np.ndarray,
    ) -> None:
        """Write x_i - x0 and the normalised region radius of entries grouped by query.

        Args:
            ids: (M,) int extended ids (>= 0), counts[r] consecutive ones per query r.
            queries: (R,) int64 query points.
            counts: (R,) int64 entries per query (summing to M).
            relative: (M, d) float output.
            radius: (M,) float output.
        """
        # float64 throughout (coordinates are much larger than relative positions; the radius
        # feeds a steep cutoff); the pieces are small enough to stay in cache.
        norm_sq = np.zeros(ids.size)
        parallel = np.zeros(ids.size)
        for axis in range(self.dim):
            component = self._ext_coords[axis].take(ids)
            component -= np.repeat(self._points[queries, axis], counts)
            relative[:, axis] = component
            norm_sq += component * component
            component *= np.repeat(self._direction[queries, axis], counts)
            parallel += component
        inverse_across_sq = 1.0 / (self._across * self._across)
        parallel *= parallel
        parallel *= np.repeat(1.0 / (self._along[queries] ** 2) - inverse_across_sq, counts)
        norm_sq *= inverse_across_sq
        norm_sq += parallel
        np.maximum(norm_sq, 0.0, out=norm_sq)
        np.sqrt(norm_sq, out=norm_sq)
        radius[:] = norm_sq

    def _map(self, function: Callable, chunks: list) -> list:
        if self._workers == 1 or len(chunks) <= 1:
            return [function(chunk) for chunk in chunks]
        with ThreadPoolExecutor(max_workers=self._workers) as pool:
            return list(pool.map(function, chunks))

    def _knn_index(self, queries: np.ndarray) -> _Index:
        k = self.k
        check_fits(
            queries.size * k,
            BYTES_PER_ENTRY,
            f"the {k}-nearest clouds of {queries.size} points would hold",
            hint="lower k",
        )
        _, neighbours = self._tree.query(self._points[queries], k, workers=-1)
        neighbours = np.asarray(neighbours, dtype=np.int64).reshape(queries.size, k)
        own = self._self_ext[queries]
        is_self = neighbours == own[:, None]
        # Coincident points can push the query out of its own k list: put it first always and
        # keep the k - 1 nearest others.
        order = np.argsort(is_self, axis=1, kind="stable")[:, : k - 1]
        others = np.take_along_axis(neighbours, order, axis=1)
        entries = np.concatenate([own[:, None], others], axis=1).ravel()
        offsets = np.arange(queries.size + 1, dtype=np.int64) * k
        return _Index(offsets, entries.astype(self._id_dtype))

    def _knn_clouds(self, queries: np.ndarray) -> Clouds:
        k = self.k
        offsets, entries = self._knn_index(queries)
        relative = self._ext_points[entries] - np.repeat(self._points[queries], k, axis=0)
        distance = np.linalg.norm(relative, axis=1)
        reach = np.repeat(distance.reshape(-1, k).max(axis=1), k)
        with np.errstate(invalid="ignore", divide="ignore"):
            radius = np.where(reach > 0, distance / reach, 0.0)
        return Clouds(
            queries,
            offsets,
            self._ext_origin[entries].astype(self._id_dtype),
            relative.astype(self._dtype, copy=False),
            radius.astype(self._dtype, copy=False),
            None,
        )

    def _knn_reach(self, queries: np.ndarray) -> np.ndarray:
        distance, _ = self._tree.query(self._points[queries], self.k, workers=-1)
        return np.asarray(distance).reshape(queries.size, self.k)[:, -1]

    def _sampling_index(self) -> tuple[np.ndarray, np.ndarray]:
        """Cached clouds of every point: offsets (N+1,) int64, extended ids + a -1 sentinel."""
        if self._sampling_cache is None:
            every_point = np.arange(self.num_points, dtype=np.int64)
            if self.region == "knn":
                index = self._knn_index(every_point)
            else:
                index = self._csr_cache
                if index is None:
                    index, _ = self._index(every_point, with_origin=False)
            # One trailing -1 lets padding slots be gathered like any other slot.
            padded = np.empty(index.entries.size + 1, dtype=index.entries.dtype)
            padded[:-1] = index.entries
            padded[-1] = -1
            padded.flags.writeable = False
            if self.region != "knn":
                self._csr_cache = _Index(index.offsets, padded[:-1])
            self._sampling_cache = (index.offsets, padded)
        return self._sampling_cache
    # ------------------------------------------------------------------ per-entry values
    def _weights(self, radius: np.ndarray) -> np.ndarray | None:
        if self.cutoff_start is None or self.region == "knn":
            return None
        weights = np.empty(radius.shape, dtype=self._dtype)
        flat_radius, flat_weights = radius.reshape(-1), weights.reshape(-1)
        # Cache-sized pieces in threads: the polynomial takes several passes over each.
        self._map(
            lambda part: smooth_switch(
                flat_radius[part], start=self.cutoff_start, out=flat_weights[part]
            ),
            _slices(flat_radius.size, 1 << 16),
        )
        return weights

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



def _slices(total: int, step: int) -> list[slice]:
    return [slice(start, min(start + step, total)) for start in range(0, total, step)]


def _fill_runs(
    out: np.ndarray,
    positions: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray | None = None,
) -> None:
    """Write runs of consecutive integers into out, in one cumulative-sum pass.

    Run k puts starts[k], starts[k] + 1, ... at out[positions[k]:], up to the next run's
    position. Slots between the end of a run (given by lengths, when some runs may be empty)
    and the next run hold arbitrary values: the caller overwrites them.

    Args:
        out: (M,) int32 or int64 contiguous output, written in place.
        positions: (R,) int64 increasing output positions of the runs.
        starts: (R,) int64 first value of every run.
        lengths: (R,) int64 run lengths; only used to drop empty runs.
    """
    if lengths is not None:
        keep = lengths > 0
        positions, starts = positions[keep], starts[keep]
    if out.size == 0:
        return
    # out[i] = i + shift_k inside run k, with shift_k = starts[k] - positions[k]: a cumulative
    # sum of ones plus the change of shift at every run start.
    shift = starts - positions
    # torch's fill and cumulative sum use every core; small pieces (planned in threads
    # already) stay in numpy.
    view = torch.from_numpy(out) if out.size >= 1 << 22 else None
    if view is None:
        out.fill(1)
    else:
        view.fill_(1)
    if shift.size:
        jumps = np.empty_like(shift)
        jumps[0] = shift[0]
        np.subtract(shift[1:], shift[:-1], out=jumps[1:])
        jumps[1:] += 1
        out[positions] = jumps
    if view is None:
        np.cumsum(out, out=out, dtype=out.dtype)
    else:
        # In place, so the sum keeps out's dtype (torch.cumsum would promote int32 to int64).
        view.cumsum_(0)


def _sample_positions(sizes: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Local positions of a uniform sample without replacement of n entries per cloud.

    Position 0 (the query point) is always kept first; the other n - 1 are drawn from
    1..size-1. Large clouds draw integers with replacement and keep the first n - 1 distinct
    values in draw order (exactly sequential sampling without replacement): a sort per row of
    (value, draw number) keys finds the first draw of every value, a second sort by draw
    number puts them back in draw order. Clouds where that
    would need many draws, or where too few distinct values came, rank random keys instead.

    Args:
        sizes: (R,) int64 cloud sizes (>= 1).
        n: sample width.
        rng: random generator.

    Returns:
        (R, n) int64 positions, -1 in padding slots.
    """
    rows = sizes.size
    out = np.empty((rows, n), dtype=np.int64)
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
        bound = others[rows_sparse]
        # floor(U * m) with 53-bit U: uniform on 0..m-1 up to m / 2^53.
        draws = rng.random((rows_sparse.size, draws_per_row))
        draws *= bound[:, None]
        draw_bits = int(draws_per_row - 1).bit_length()
        value_bits = int(bound.max() - 1).bit_length()
        key_type = np.int32 if draw_bits + value_bits <= 31 else np.int64
        keys = draws.astype(key_type)
        np.minimum(keys, (bound - 1).astype(key_type)[:, None], out=keys)
        # Sorting (value, draw number) bit-packed keys groups equal values in draw order.
        keys <<= draw_bits
        keys |= np.arange(draws_per_row, dtype=key_type)
        keys.sort(axis=1)
        value = keys >> draw_bits
        repeat = value[:, 1:] == value[:, :-1]
        # The first draw of every value, re-sorted by (draw number, value); repeats go last.
        keys &= (1 << draw_bits) - 1
        keys <<= value_bits
        keys |= value
        sentinel = np.iinfo(key_type).max
        np.copyto(keys[:, 1:], sentinel, where=repeat)
        keys.sort(axis=1)
        chosen = keys[:, :want]
        enough = chosen[:, -1] != sentinel
        chosen = chosen[enough]
        chosen &= (1 << value_bits) - 1
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


@dataclass(frozen=True)
class CloudOptions:
    """Which points form the cloud of a query point (docs/design.md); a model stores them.

    Attributes:
        region: ``"ellipse"`` (the paper's velocity-aligned ellipse), ``"ball"`` or ``"knn"``.
        diffusivity: D of the transport operator that shapes the ellipse; None: the D of the
            training data's physics (filled in by :meth:`resolved`).
        zeta: decay coefficient of the operator; None: the training data's.
        eps: decay threshold that defines the ellipse boundary.
        radius: ball radius (``region="ball"`` only).
        k: neighbours per cloud (``region="knn"`` only).
        cutoff_start: normalised radius where the smooth cutoff weight starts to fall, in
            [0, 1); None (``"none"`` in a config) gives every cloud point weight 1 (a hard
            edge, as in the paper). The default 0.5 makes a point's weight go to zero smoothly at the region boundary,
            so the prediction is a smooth function of the flow (needed inside a coupled
            solver) and the pooled integral converges faster under mesh refinement.
    """

    region: str = "ellipse"
    diffusivity: float | None = None
    zeta: float | None = None
    eps: float = 0.2
    radius: float | None = None
    k: int | None = None
    cutoff_start: float | None = 0.5

    def __post_init__(self) -> None:
        if self.region not in _REGIONS:
            raise ValueError(f"cloud region must be one of {_REGIONS}, got {self.region!r}")
        if self.cutoff_start is not None and not 0.0 <= self.cutoff_start < 1.0:
            raise ValueError(f"cutoff_start must be in [0, 1) or absent, got {self.cutoff_start}")
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}")

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> CloudOptions:
        """Build from a config table; unknown keys raise ValueError naming the known ones."""
        options = dict(options)
        if "volume_weighted" in options:
            raise ValueError(
                "[cloud] volume_weighted is gone: pooling is a property of the model, set "
                "[model] pooling = \"volume\" (the default) or \"mean\""
            )
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in [cloud]; allowed: {sorted(known)}")
        if isinstance(options.get("cutoff_start"), str):
            if options["cutoff_start"].lower() != "none":
                raise ValueError(
                    f"cutoff_start must be a number in [0, 1) or \"none\", got "
                    f"{options['cutoff_start']!r}"
                )
            options["cutoff_start"] = None
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        """TOML-friendly dictionary (None values left out, as TOML has no null).

        No cutoff is written as ``cutoff_start = "none"``, so that it does not read back as the
        default.
        """
        values = {key: value for key, value in asdict(self).items() if value is not None}
        if self.cutoff_start is None:
            values["cutoff_start"] = "none"
        return values

    def resolved(self, *, diffusivity: float, zeta: float) -> CloudOptions:
        """A copy with the operator coefficients filled in where they were left to the data."""
        return replace(
            self,
            diffusivity=diffusivity if self.diffusivity is None else self.diffusivity,
            zeta=zeta if self.zeta is None else self.zeta,
        )

    def semi_axes(self, speed: np.ndarray) -> tuple[np.ndarray, float] | None:
        """Region semi-axes a (N,) along the flow and b across it; None for ``"knn"``.

        Args:
            speed: (N,) float64 |u| at the query points.
        """
        if self.region == "knn":
            return None
        if self.region == "ball":
            return np.full(np.shape(speed), float(self.radius)), float(self.radius)
        self._check_resolved()
        return ellipse_semi_axes(
            np.asarray(speed, dtype=np.float64),
            diffusivity=self.diffusivity,
            zeta=self.zeta,
            eps=self.eps,
        )

    def sampler(
        self,
        points: np.ndarray,
        velocity: np.ndarray,
        period: np.ndarray | None,
        *,
        dtype: np.dtype | type = np.float64,
    ) -> CloudSampler:
        """A :class:`CloudSampler` with these options over one case's points.

        Args:
            points: (N, d) float coordinates.
            velocity: (N, d) float velocity.
            period: (d,) periodic lengths (0: not periodic) or None.
            dtype: dtype of the sampler's relative positions, radii and weights.
        """
        if self.region == "ellipse":
            self._check_resolved()
        if period is not None and not np.any(np.asarray(period) > 0):
            period = None
        return CloudSampler(
            points,
            velocity,
            period=period,
            region=self.region,
            # an ellipse is resolved above; the other regions do not read the operator
            diffusivity=DEFAULT_PHYSICS.diffusivity if self.diffusivity is None else self.diffusivity,
            zeta=DEFAULT_PHYSICS.zeta if self.zeta is None else self.zeta,
            eps=self.eps,
            radius=self.radius,
            k=self.k,
            cutoff_start=self.cutoff_start,
            dtype=dtype,
        )

    def _check_resolved(self) -> None:
        if self.diffusivity is None or self.zeta is None:
            raise ValueError(
                "the ellipse needs diffusivity and zeta: give them in [cloud] or resolve the "
                "options against the data's physics (CloudOptions.resolved)"
            )
