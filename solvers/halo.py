"""A halo of closure points around each rank's owned points, exchanged point to point.

A distributed closure evaluates, on every rank, the clouds of the closure points that rank
owns. A cloud reaches a distance ``reach`` (the largest semi-axis of its region) from its query
point, and may cross a periodic boundary, so a rank needs, besides its owned points, every
point of the other ranks that lies (with one of its periodic images) within the reach of an
owned point: its halo. :class:`HaloExchange` finds that halo without gathering the field on
any rank:

1. the global bounds of the points and the largest reach are reduced over the ranks;
2. each rank marks, on a coarse uniform grid over the bounds widened by the largest reach,
   the cells its clouds can touch: every cell within (Chebyshev) distance ``reach`` of a cell
   holding an owned point, with the largest reach of the points in that cell (a box around
   each cloud, so a superset of it);
3. the grids (bit-packed, one per rank) are allgathered; each rank tests its owned points and
   their periodic images against every other rank's grid, and sends the points that fall in
   a marked cell (``Alltoallv`` of their global ids, then of their values).

Points travel with their own coordinates, never shifted by a period: the cloud search on the
receiving rank replicates its points by whole periods (:class:`vcnn.clouds.CloudSampler`), so
the images a cloud holds there are exactly those it holds in a serial search. The grid only
over-approximates the halo (by about a cell, plus the corners of the boxes), which costs a few
points and never a cloud member.
"""

from __future__ import annotations

from mpi4py import MPI

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import maximum_filter

__all__ = ["HaloExchange"]

#: Cells per largest reach along an axis: finer cells fit the halo closer to the clouds, at the
#: cost of a larger grid to mark and allgather.
CELLS_PER_REACH = 4
#: Most cells of the coverage grid (one bit each per rank in the allgather): coarser cells when
#: the domain is large compared with the clouds.
MAX_GRID_CELLS = 1 << 22


@dataclass(frozen=True)
class HaloExchange:
    """Which owned points go to which rank, and which points arrive as this rank's halo.

    Attributes:
        comm: the communicator.
        send_indices: per destination rank, (k_r,) int64 indices into this rank's owned points
            (empty for this rank itself), in increasing order.
        recv_counts: (comm.size,) int64 halo points received from each rank.
        halo_ids: (h,) int64 global ids of the halo points, grouped by source rank (in rank
            order), each group in its owner's order.
        num_owned: n, the owned points this halo was built for.
    """

    comm: MPI.Comm
    send_indices: tuple[np.ndarray, ...]
    recv_counts: np.ndarray
    halo_ids: np.ndarray
    num_owned: int

    @property
    def num_halo(self) -> int:
        """h, the halo points this rank receives."""
        return int(self.halo_ids.size)

    @classmethod
    def build(
        cls,
        points: np.ndarray,
        reach: np.ndarray,
        global_ids: np.ndarray,
        period: np.ndarray | None,
        comm: MPI.Comm,
    ) -> HaloExchange:
        """Find the halo of every rank (collective).

        Args:
            points: (n, d) float64 coordinates of the owned points.
            reach: (n,) float64 distance the cloud of each owned point reaches (>= 0).
            global_ids: (n,) int64 global ids of the owned points.
            period: (d,) float64 periodic lengths, 0 where not periodic (None: none).
            comm: the communicator of the points.

        Returns:
            The exchange plan (collective ``exchange`` calls move values along it).
        """
        points = np.ascontiguousarray(points, dtype=np.float64)
        num_owned, dim = points.shape
        reach = np.asarray(reach, dtype=np.float64).reshape(num_owned)
        global_ids = np.asarray(global_ids, dtype=np.int64).reshape(num_owned)
        period = np.zeros(dim) if period is None else np.asarray(period, np.float64).reshape(dim)
        low = np.full(dim, np.inf) if num_owned == 0 else points.min(axis=0).copy()
        high = np.full(dim, -np.inf) if num_owned == 0 else points.max(axis=0).copy()
        comm.Allreduce(MPI.IN_PLACE, low, op=MPI.MIN)
        comm.Allreduce(MPI.IN_PLACE, high, op=MPI.MAX)
        largest = float(comm.allreduce(float(reach.max()) if num_owned else 0.0, op=MPI.MAX))
        grid = _Grid.covering(low, high, largest)
        marked = grid.marked(points, reach)
        # Bit-packed: the grid of every rank on every rank is a few hundred kB at most.
        packed = comm.allgather(np.packbits(marked.ravel()))
        send = []
        images = _image_shifts(low, high, largest, period)
        for rank, bits in enumerate(packed):
            if rank == comm.rank or num_owned == 0:
                send.append(np.zeros(0, dtype=np.int64))
                continue
            other = np.unpackbits(bits, count=marked.size).astype(bool)
            needed = np.zeros(num_owned, dtype=bool)
            for shift in images:
                needed |= grid.lookup(other, points + shift)
            send.append(np.flatnonzero(needed).astype(np.int64))
        send_counts = np.asarray([part.size for part in send], dtype=np.int64)
        recv_counts = np.asarray(comm.alltoall(send_counts.tolist()), dtype=np.int64)
        plan = cls(comm, tuple(send), recv_counts, np.zeros(0, dtype=np.int64), num_owned)
        halo_ids = plan.exchange(global_ids)
        return cls(comm, tuple(send), recv_counts, halo_ids, num_owned)

    def exchange(self, owned: np.ndarray) -> np.ndarray:
        """Values of the halo points from their owners (collective).

        Args:
            owned: (n, ...) values at this rank's owned points (float, int or bool).

        Returns:
            (h, ...) the values at this rank's halo points, in the order of :attr:`halo_ids`.
        """
        owned = np.asarray(owned)
        if owned.shape[0] != self.num_owned:
            raise ValueError(f"expected {self.num_owned} owned values, got {owned.shape[0]}")
        dtype = np.uint8 if owned.dtype == bool else owned.dtype
        tail = owned.shape[1:]
        width = math.prod(tail)
        outgoing = np.ascontiguousarray(
            np.concatenate([owned[part] for part in self.send_indices]).astype(dtype, copy=False)
        )
        incoming = np.empty((int(self.recv_counts.sum()), *tail), dtype=dtype)
        send_counts = np.asarray([part.size for part in self.send_indices]) * width
        recv_counts = self.recv_counts * width
        self.comm.Alltoallv(
            [outgoing, (send_counts, _displacements(send_counts))],
            [incoming, (recv_counts, _displacements(recv_counts))],
        )
        return incoming.astype(bool) if owned.dtype == bool else incoming


@dataclass(frozen=True)
class _Grid:
    """A uniform grid of cubic cells over the points' bounds widened by the largest reach."""

    origin: np.ndarray  # (d,) float64 corner of cell (0, ..., 0)
    cell: float
    shape: tuple[int, ...]

    @classmethod
    def covering(cls, low: np.ndarray, high: np.ndarray, largest: float) -> _Grid:
        extent = np.maximum(high - low, 0.0)
        cell = largest / CELLS_PER_REACH if largest > 0 else float(extent.max() or 1.0)
        while True:
            # one spare cell on each side: images within reach of the bounds fall inside
            shape = tuple(int(n) for n in np.floor((extent + 2 * largest) / cell) + 3)
            if math.prod(shape) <= MAX_GRID_CELLS:
                break
            cell *= 2.0
        return cls(low - largest - cell, float(cell), shape)

    def cells(self, coordinates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(m, d) int64 cell of each coordinate and (m,) bool whether it lies in the grid."""
        index = np.floor((coordinates - self.origin) / self.cell).astype(np.int64)
        inside = np.all((index >= 0) & (index < np.asarray(self.shape)), axis=1)
        return index, inside

    def marked(self, points: np.ndarray, reach: np.ndarray) -> np.ndarray:
        """(shape) bool: the cells within reach of an owned point (a box around each cloud)."""
        marked = np.zeros(self.shape, dtype=bool)
        if points.shape[0] == 0:
            return marked
        index, _ = self.cells(points)  # every owned point lies inside by construction
        linear = np.ravel_multi_index(tuple(index.T), self.shape)
        # |x - y| <= r along an axis puts their cells at most floor(r / cell) + 1 apart
        radius_cells = np.floor(reach / self.cell).astype(np.int64) + 1
        widest = np.zeros(math.prod(self.shape), dtype=np.int64)
        np.maximum.at(widest, linear, radius_cells)
        widest = widest.reshape(self.shape)
        for radius in np.unique(widest[widest > 0]):
            seeds = widest == radius
            marked |= maximum_filter(seeds, size=2 * int(radius) + 1, mode="constant", cval=False)
        return marked

    def lookup(self, marked: np.ndarray, coordinates: np.ndarray) -> np.ndarray:
        """(m,) bool: whether each coordinate falls in a marked cell of a flat ``marked``."""
        index, inside = self.cells(coordinates)
        result = np.zeros(coordinates.shape[0], dtype=bool)
        if inside.any():
            linear = np.ravel_multi_index(tuple(index[inside].T), self.shape)
            result[inside] = marked[linear]
        return result


def _image_shifts(
    low: np.ndarray, high: np.ndarray, largest: float, period: np.ndarray
) -> list[np.ndarray]:
    """(d,) translations by whole periods that can bring a point within reach of the bounds."""
    ranges = []
    for axis, length in enumerate(period):
        if length > 0:
            most = math.ceil((high[axis] - low[axis] + largest) / length) + 1
            ranges.append(range(-most, most + 1))
        else:
            ranges.append(range(0, 1))
    return [np.asarray(steps, dtype=np.float64) * period for steps in itertools.product(*ranges)]


def _displacements(counts: np.ndarray) -> np.ndarray:
    displacements = np.zeros(len(counts), dtype=np.int64)
    np.cumsum(counts[:-1], out=displacements[1:])
    return displacements
