"""Full clouds built on the device: a radius search in torch tensor operations.

:class:`DeviceCloudSearch` finds the same clouds as :meth:`vcnn.clouds.CloudSampler.full_clouds`
(velocity-aligned ellipses or balls, periodic images included) for points and velocities that
already live on a device, so that a GPU pass never waits for clouds built on the host. Every
step is a whole-array operation; Python loops run only over periodic shifts, the 2^d corners of
a box and chunks of queries, never over points or entries.

* Periodic images: the points are replicated by whole periods wherever a region can reach
  them, with the rule of the CPU sampler (an image is kept when it lies within the reach of
  the points' bounding box), so both see the same image set.
* Cells: the images are sorted by a uniform grid cell (cell size a fraction of the transverse
  semi-axis b); a summed-area table of the cell counts gives the number of candidates of each
  query's bounding box in O(1), which cuts the queries into chunks of bounded memory.
* Candidates: each (query, cell) pair of a query's bounding box expands to the images of the
  cell (one run of consecutive sorted ids); the exact region test is the CPU sampler's formula
  in float64, term for term in the same order, so membership is decided identically.
* Output: compressed rows, the query's own point first in its cloud (the sampler's contract),
  the other members in image order.

The search is written for any device: on CPU tensors it is what the tests compare with the
sampler, on a GPU it is how the device pass gets its clouds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vcnn.clouds import CloudOptions, check_period_wraps
from vcnn.system import TooLargeError

__all__ = ["DEFAULT_MAX_CANDIDATES", "DeviceCloudSearch", "DeviceClouds"]

#: Candidate (query, image) tests per chunk: bounds the temporary memory of a chunk to about
#: 40 bytes per candidate (1.3 GB at the default).
DEFAULT_MAX_CANDIDATES = 1 << 25
#: Cell edge in units of the transverse semi-axis b: smaller cells fit a query's bounding box
#: more tightly (fewer rejected candidates) but give more (query, cell) pairs.
_CELL_FRACTION = 0.5
#: Most grid cells: beyond, the cells are made larger (a sparse point set in a large box).
_MAX_CELLS = 1 << 24
#: Relative slack of the bounding boxes, as the CPU sampler's outer ranges (never drops a point
#: on the boundary; the exact test decides).
_SLACK = 1e-9


@dataclass(frozen=True)
class DeviceClouds:
    """Full clouds in compressed-row form, on the device of the search.

    Attributes:
        queries: (Q,) int64 point indices of the query points.
        offsets: (Q + 1,) int64; cloud q is entries ``offsets[q]:offsets[q + 1]``.
        points: (nnz,) int64 point index of every entry (the query's own first).
        images: (nnz,) int64 id of every entry in the search's image set
            (:attr:`DeviceCloudSearch.image_points`), which tells periodic copies apart.
    """

    queries: torch.Tensor
    offsets: torch.Tensor
    points: torch.Tensor
    images: torch.Tensor

    @property
    def num_entries(self) -> int:
        """Cloud entries in all."""
        return int(self.points.numel())

    @property
    def sizes(self) -> torch.Tensor:
        """(Q,) int64 points per cloud."""
        return torch.diff(self.offsets)


class DeviceCloudSearch:
    """The full clouds of one case's points, searched on the points' device.

    Args:
        points: (N, d) float64 coordinates (d = 2 or 3), finite.
        velocity: (N, d) float64 velocity at the points (same device).
        options: cloud options with the operator coefficients resolved
            (:meth:`vcnn.clouds.CloudOptions.resolved`); region ``"ellipse"`` or ``"ball"``.
        period: (d,) periodic lengths (0: not periodic), or None.
        max_candidates: candidate tests per chunk of queries (bounds memory).

    Raises:
        ValueError: a ``"knn"`` region, or inputs of the wrong shape.
        TooLargeError: periods absurdly short for the clouds (as the CPU sampler).
    """

    def __init__(
        self,
        points: torch.Tensor,
        velocity: torch.Tensor,
        options: CloudOptions,
        *,
        period: torch.Tensor | None = None,
        max_candidates: int = DEFAULT_MAX_CANDIDATES,
    ) -> None:
        if points.ndim != 2 or points.shape[1] not in (2, 3) or velocity.shape != points.shape:
            raise ValueError(
                f"points and velocity must both be (N, 2) or (N, 3), got {tuple(points.shape)} "
                f"and {tuple(velocity.shape)}"
            )
        if options.region not in ("ellipse", "ball"):
            raise ValueError(f"the device search needs an ellipse or ball region, not {options.region!r}")
        self.device = points.device
        self.points = points.to(torch.float64).contiguous()
        self.velocity = velocity.to(device=self.device, dtype=torch.float64)
        self.options = options
        self.max_candidates = int(max_candidates)
        dim = self.dim
        self.period = (
            torch.zeros(dim, dtype=torch.float64)
            if period is None
            else torch.as_tensor(period, dtype=torch.float64).reshape(-1).cpu()
        )
        if self.period.shape != (dim,):
            raise ValueError(f"period must have {dim} entries, got {tuple(self.period.shape)}")
        # The sampler's semi-axes and unit directions, float64, operation for operation.
        components = [self.velocity[:, axis] for axis in range(dim)]
        squared = components[0] * components[0]
        for component in components[1:]:
            squared = squared + component * component
        speed = torch.sqrt(squared)
        if options.region == "ellipse":
            options._check_resolved()
            log_eps = abs(math.log(options.eps))
            diffusivity, zeta = float(options.diffusivity), float(options.zeta)
            self.along = log_eps * (
                torch.sqrt(speed * speed + 4.0 * diffusivity * zeta) + speed
            ) / (2.0 * zeta)
            self.across = float(math.sqrt(diffusivity / zeta) * log_eps)
            direction = self.velocity / speed[:, None]
            self.direction = torch.where(speed[:, None] > 0, direction, 0.0)
        else:
            radius = float(options.radius)
            self.along = torch.full_like(speed, radius)
            self.across = radius
            self.direction = torch.zeros_like(self.points)
        reach = float(self.along.max())
        if not math.isfinite(reach):
            raise TooLargeError("the clouds along the flow would be infinitely long")
        self._build_images(reach)
        self._build_cells()

    # ------------------------------------------------------------------ properties
    @property
    def num_points(self) -> int:
        """Points N of the case."""
        return int(self.points.shape[0])

    @property
    def dim(self) -> int:
        """Spatial dimension d."""
        return int(self.points.shape[1])

    @property
    def image_points(self) -> torch.Tensor:
        """(M,) int64 point index of every image id (the original points first)."""
        return self._image_origin

    # ------------------------------------------------------------------ construction
    def _build_images(self, reach: float) -> None:
        """Replicate the points by whole periods wherever a region of size ``reach`` sees them.

        The rule of :meth:`vcnn.clouds.CloudSampler._build_extended` (same shifts, same test),
        so the image sets agree.
        """
        points, dim = self.points, self.dim
        low, high = points.min(dim=0).values, points.max(dim=0).values
        origin = torch.arange(self.num_points, device=self.device)
        image_origin, image_points = [origin], [points]
        periodic = [axis for axis in range(dim) if float(self.period[axis]) > 0]
        if periodic:
            ranges = []
            for axis in periodic:
                length = float(self.period[axis])
                extent = float(high[axis] - low[axis])
                check_period_wraps(reach, length, axis=axis)
                most = math.ceil((extent + reach) / length) + 1
                ranges.append(torch.arange(-most, most + 1, dtype=torch.float64))
            grids = torch.meshgrid(*ranges, indexing="ij")
            shifts = torch.stack([grid.reshape(-1) for grid in grids], dim=1)
            shifts = shifts[(shifts != 0).any(dim=1)]
            lower, upper = low - reach, high + reach
            for shift_int in shifts:
                shift = torch.zeros(dim, dtype=torch.float64)
                shift[periodic] = shift_int * self.period[periodic]
                moved = points + shift.to(self.device)
                keep = ((moved >= lower) & (moved <= upper)).all(dim=1)
                image_origin.append(origin[keep])
                image_points.append(moved[keep])
        self._image_origin = torch.cat(image_origin)
        self._image_coordinates = torch.cat(image_points)  # (M, d), original points first

    def _build_cells(self) -> None:
        """Sort the images by grid cell; counts, first sorted id and summed-area table per cell."""
        coordinates = self._image_coordinates
        dim = self.dim
        self._cell_origin = coordinates.min(dim=0).values
        span = coordinates.max(dim=0).values - self._cell_origin
        cell_size = _CELL_FRACTION * self.across
        while math.prod(int(s / cell_size) + 1 for s in span.tolist()) > _MAX_CELLS:
            cell_size *= 2.0
        self._cell_size = cell_size
        self._cell_shape = [int(s / cell_size) + 1 for s in span.tolist()]
        cells = self._cell_of(coordinates)
        linear = self._linear(cells)
        order = torch.argsort(linear, stable=True)
        self._sorted_images = order  # (M,) image id of every sorted position
        self._sorted_coordinates = [coordinates[order, axis].contiguous() for axis in range(dim)]
        total = math.prod(self._cell_shape)
        counts = torch.bincount(linear, minlength=total)
        self._cell_count = counts
        self._cell_first = torch.cumsum(counts, 0) - counts
        # Summed-area table with a zero border: box sums by inclusion-exclusion of 2^d corners.
        table = counts.reshape(self._cell_shape)
        for axis in range(dim):
            table = torch.cumsum(table, dim=axis)
        self._summed = torch.nn.functional.pad(table, [1, 0] * dim)
        # the own image of every original point in sorted order
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=self.device)
        self._own_sorted = inverse[: self.num_points]

    def _cell_of(self, coordinates: torch.Tensor) -> torch.Tensor:
        """(M, d) int64 cell of every coordinate row, clipped to the grid."""
        cells = torch.floor((coordinates - self._cell_origin) / self._cell_size).to(torch.int64)
        upper = torch.tensor(self._cell_shape, device=self.device) - 1
        return torch.minimum(cells.clamp_min(0), upper)

    def _linear(self, cells: torch.Tensor) -> torch.Tensor:
        """Row-major linear index of (.., d) cells."""
        linear = cells[..., 0]
        for axis in range(1, self.dim):
            linear = linear * self._cell_shape[axis] + cells[..., axis]
        return linear

    # ------------------------------------------------------------------ search
    def clouds(self, queries: torch.Tensor | None = None) -> DeviceClouds:
        """The full clouds of some points.

        Args:
            queries: (Q,) int64 point indices on the search's device; None for every point.

        Returns:
            The clouds, on the search's device.
        """
        if queries is None:
            queries = torch.arange(self.num_points, device=self.device)
        queries = queries.to(device=self.device, dtype=torch.int64)
        first, last = self._boxes(queries)
        candidates = self._box_counts(first, last)
        # Cut the queries into chunks of at most max_candidates tests (one host sync).
        bounds = torch.cumsum(candidates, 0)
        total = int(bounds[-1]) if bounds.numel() else 0
        pieces = max(total - 1, 0) // self.max_candidates
        cuts = torch.arange(1, pieces + 1, device=self.device) * self.max_candidates
        stops = torch.searchsorted(bounds, cuts, right=True).tolist()
        edges = sorted({0, *[max(stop, 1) for stop in stops], queries.numel()})
        parts = [
            self._chunk(queries[start:stop], first[start:stop], last[start:stop])
            for start, stop in zip(edges[:-1], edges[1:], strict=True)
            if stop > start
        ]
        sizes = (
            torch.cat([part[0] for part in parts])
            if parts
            else torch.zeros(0, dtype=torch.int64, device=self.device)
        )
        offsets = torch.zeros(queries.numel() + 1, dtype=torch.int64, device=self.device)
        torch.cumsum(sizes, 0, out=offsets[1:])
        images = (
            torch.cat([part[1] for part in parts])
            if parts
            else torch.zeros(0, dtype=torch.int64, device=self.device)
        )
        return DeviceClouds(
            queries=queries, offsets=offsets, points=self._image_origin[images], images=images
        )

    def _boxes(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """First and last grid cell (Q, d) int64 of every query's region bounding box."""
        direction = self.direction[queries]
        along = self.along[queries]
        across_sq = self.across * self.across
        # diagonal of C = a^2 e e^T + b^2 (I - e e^T)
        variance = (along * along)[:, None] * direction * direction + across_sq * (
            1.0 - direction * direction
        )
        extent = torch.sqrt(variance.clamp_min(0.0)) * (1.0 + _SLACK) + _SLACK
        centre = self.points[queries]
        first = self._cell_of(centre - extent)
        last = self._cell_of(centre + extent)
        return first, last

    def _box_counts(self, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """(Q,) int64 images in every query's box of cells (summed-area table)."""
        total = torch.zeros(first.shape[0], dtype=torch.int64, device=self.device)
        flat = self._summed.reshape(-1)
        padded_shape = [size + 1 for size in self._cell_shape]
        for corner in range(1 << self.dim):
            index = torch.zeros_like(total)
            sign = 1
            for axis in range(self.dim):
                upper = (corner >> axis) & 1
                coordinate = last[:, axis] + 1 if upper else first[:, axis]
                sign = sign if upper else -sign
                index = index * padded_shape[axis] + coordinate
            total += sign * flat[index]
        return total

    def _chunk(
        self, queries: torch.Tensor, first: torch.Tensor, last: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cloud sizes (Q,) and image ids (nnz,) of a chunk of queries (own image first)."""
        device, dim = self.device, self.dim
        count = queries.numel()
        per_axis = last - first + 1  # (Q, d) >= 1
        pair_counts = per_axis.prod(dim=1)
        pair_query = torch.repeat_interleave(torch.arange(count, device=device), pair_counts)
        pair_front = torch.cumsum(pair_counts, 0) - pair_counts
        local = torch.arange(pair_query.numel(), device=device) - pair_front[pair_query]
        # mixed-radix decomposition of a pair's rank into its cell, last axis fastest
        cells = torch.empty((pair_query.numel(), dim), dtype=torch.int64, device=device)
        for axis in range(dim - 1, -1, -1):
            radix = per_axis[pair_query, axis]
            cells[:, axis] = first[pair_query, axis] + local % radix
            local = local // radix
        pair_cell = self._linear(cells)
        cell_counts = self._cell_count[pair_cell]
        candidate_pair = torch.repeat_interleave(
            torch.arange(pair_cell.numel(), device=device), cell_counts
        )
        candidate_front = torch.cumsum(cell_counts, 0) - cell_counts
        sorted_ids = (
            self._cell_first[pair_cell][candidate_pair]
            + torch.arange(candidate_pair.numel(), device=device)
            - candidate_front[candidate_pair]
        )
        owner = pair_query[candidate_pair]
        inside = self._inside(sorted_ids, queries, owner)
        kept = sorted_ids[inside]
        kept_owner = owner[inside]
        sizes = torch.bincount(kept_owner, minlength=count)
        offsets = torch.cumsum(sizes, 0) - sizes
        # The query's own image to the front of its cloud (the sampler's contract): swap it
        # with whatever the front held.
        own = self._own_sorted[queries]
        own_position = torch.nonzero(kept == own[kept_owner]).flatten()
        if own_position.numel() != count:
            raise RuntimeError("internal error: a query point was not found once in its cloud")
        own_query = kept_owner[own_position]
        front_values = kept[offsets[own_query]]
        kept = kept.clone()
        kept[own_position] = front_values
        kept[offsets[own_query]] = own[own_query]
        return sizes, self._sorted_images[kept]

    def _inside(
        self, sorted_ids: torch.Tensor, queries: torch.Tensor, owner: torch.Tensor
    ) -> torch.Tensor:
        """Exact region test of sorted image ids against their owners' regions (float64).

        The formula of :meth:`vcnn.clouds.CloudSampler._inside`, in the same order of
        operations, so that both decide every point alike.
        """
        centre = self.points[queries]
        direction = self.direction[queries]
        norm_sq = torch.zeros(sorted_ids.numel(), dtype=torch.float64, device=self.device)
        parallel = torch.zeros_like(norm_sq)
        for axis in range(self.dim):
            component = self._sorted_coordinates[axis][sorted_ids] - centre[:, axis][owner]
            norm_sq = norm_sq + component * component
            parallel = parallel + component * direction[:, axis][owner]
        inverse_across_sq = 1.0 / (self.across * self.across)
        along = self.along[queries]
        radius_squared = norm_sq * inverse_across_sq
        radius_squared = radius_squared + (parallel * parallel) * (
            1.0 / (along * along) - inverse_across_sq
        )[owner]
        return radius_squared <= 1.0
