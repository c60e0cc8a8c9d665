"""The closure points of a P1 space and the maps between them and its dofs.

The closure lives at the P1 points of the domain, each point once: a periodic slave dof and
a copy on a slave boundary kept out of the slave set by a Dirichlet condition (a wall corner)
are the same point as their master. :class:`ClosurePoints` numbers these points globally in
the order of the case files, which is the order of the reduced (periodic) dof numbering, and
moves values between the three places they live:

- a P1 Function (every local dof, ghosts included), where the solvers need them;
- the closure points owned by each rank (``(n,)`` local arrays, and the PETSc vector
  distributed the same way), where an outer iteration can keep them without communication;
- the whole set on rank 0 (``(N,)`` arrays in case-file order), where case files are written
  (and a network closure that is not distributed evaluates them; a distributed one reads the
  owned points, :attr:`ClosurePoints.local_points` and :attr:`ClosurePoints.global_ids`, and
  exchanges a halo, :mod:`solvers.halo`).

Because each rank's reduced dofs form one contiguous block of the reduced numbering, the
closure points owned by rank r are the block ``[offset_r, offset_r + n_r)`` of the global
order: gathering is a concatenation and distributing a split, and the PETSc vector's
ownership ranges are those blocks.
"""

from __future__ import annotations

from mpi4py import MPI

import itertools

import numpy as np
from dolfinx import fem
from petsc4py import PETSc

from solvers.boundaries import BoundarySpec

__all__ = ["ClosurePoints"]


class ClosurePoints:
    """The closure points of a scalar P1 space, numbered as in the case files.

    Attributes:
        V: the scalar P1 space.
        comm: its communicator.
        num_points: N, the global number of closure points.
        local_dofs: (n,) int32 local dofs of the closure points this rank owns, in global order.
        offset: global index of this rank's first closure point.
        counts: (comm.size,) int64 number of closure points per rank.
        dof_points: (num_owned_dofs,) int64 global closure point of each owned dof (a slave
            or a copy points at the point it stands for).
        copy_dofs: (m,) int32 owned dofs that are copies on a slave boundary but not slaves.
        points: (N, d) float64 coordinates, on rank 0 (None elsewhere).
        is_wall: (N,) bool, points on the walls of ``spec``, on rank 0 (None elsewhere).
        local_is_wall: (n,) bool, the owned closure points on the walls.
        local_points: (n, d) float64 coordinates of the owned closure points.
        cells: (num_cells, vertices) int64 P1 cells as closure-point indices, on rank 0.
    """

    def __init__(
        self,
        V: fem.FunctionSpace,
        constraint,
        facet_tags,
        spec: BoundarySpec,
        *,
        match_tol: float = 1e-8,
    ) -> None:
        """Number the closure points and build the maps (collective).

        Args:
            V: scalar P1 space.
            constraint: its :class:`solvers.periodic.PeriodicConstraint`, or None when the
                problem is not periodic.
            facet_tags: facet markers of ``V.mesh``.
            spec: boundary roles (walls, periodic pairs).
            match_tol: distance within which a translated copy matches its point.

        Raises:
            RuntimeError: when a copy on a slave boundary has no point at its translated
                position (the periodic sides are not node-matched).
        """
        from solvers.transport import dirichlet_dofs

        self.V = V
        self.comm: MPI.Comm = V.mesh.comm
        comm = self.comm
        gdim = V.mesh.geometry.dim
        index_map = V.dofmap.index_map
        num_owned = index_map.size_local
        num_local = num_owned + index_map.num_ghosts
        self._num_owned = num_owned
        if constraint is not None:
            reduced = np.asarray(constraint.reduced_index, dtype=np.int64)
            slave = np.asarray(constraint.slave_mask, dtype=bool)
            num_reduced = int(constraint.num_reduced_dofs)
        else:
            reduced = index_map.local_range[0] + np.arange(num_owned, dtype=np.int64)
            slave = np.zeros(num_owned, dtype=bool)
            num_reduced = int(index_map.size_global)
        # Dofs on a slave boundary are copies of master points. Most are eliminated slaves;
        # those kept out of the slave set by a Dirichlet condition (wall corners) are copies.
        on_slave_side = np.zeros(num_local, dtype=bool)
        on_slave_side[dirichlet_dofs(V, facet_tags, [pair.slave for pair in spec.periodic])] = True
        keep = ~on_slave_side[:num_owned]
        copy = on_slave_side[:num_owned] & ~slave
        self.local_dofs = np.flatnonzero(keep).astype(np.int32)
        self.copy_dofs = np.flatnonzero(copy).astype(np.int32)
        self.counts = np.asarray(comm.allgather(int(self.local_dofs.size)), dtype=np.int64)
        self.offset = int(self.counts[: comm.rank].sum())
        self.num_points = int(self.counts.sum())

        wall = np.zeros(num_local, dtype=bool)
        wall[dirichlet_dofs(V, facet_tags, spec.walls)] = True
        self.local_is_wall = wall[:num_owned][keep]
        coordinates = V.tabulate_dof_coordinates()[:num_owned, :gdim]
        self.local_points = np.ascontiguousarray(coordinates[keep], dtype=np.float64)
        gathered = comm.gather(
            (
                reduced[keep],
                coordinates[keep],
                wall[:num_owned][keep],
                reduced[copy],
                coordinates[copy],
                reduced,
            ),
            root=0,
        )
        positions_per_rank = None
        self.points = self.is_wall = self.cells = None
        message = None
        if comm.rank == 0:
            try:
                positions_per_rank = self._number_on_root(gathered, num_reduced, spec, match_tol)
            except RuntimeError as error:  # sent to every rank: all must stop together
                message = str(error)
        message = comm.bcast(message, root=0)
        if message is not None:
            raise RuntimeError(message)
        self.dof_points = np.asarray(comm.scatter(positions_per_rank, root=0), dtype=np.int64)

        # Cells as closure points: ghost dofs learn their point from their owner.
        carrier = fem.Function(V)
        carrier.x.array[:num_owned] = self.dof_points.astype(np.float64)
        carrier.x.scatter_forward()
        points_with_ghosts = np.rint(carrier.x.array).astype(np.int64)
        num_cells = V.mesh.topology.index_map(V.mesh.topology.dim).size_local
        local_cells = points_with_ghosts[V.dofmap.list[:num_cells]]
        all_cells = comm.gather(local_cells, root=0)
        if comm.rank == 0:
            self.cells = np.concatenate(all_cells)

        # Closure vector -> owned dofs (every owned dof reads the point it stands for).
        self._vector = self.create_vector()
        self._owned_values = PETSc.Vec().createSeq(num_owned, comm=PETSc.COMM_SELF)
        source = PETSc.IS().createGeneral(
            self.dof_points.astype(PETSc.IntType), comm=PETSc.COMM_SELF
        )
        self._to_dofs = PETSc.Scatter().create(self._vector, source, self._owned_values, None)
        source.destroy()

    def _number_on_root(
        self, gathered: list, num_reduced: int, spec: BoundarySpec, match_tol: float
    ) -> list[np.ndarray]:
        """On rank 0: points, walls, copies matched; the closure point of every rank's dofs."""
        kept_reduced = np.concatenate([part[0] for part in gathered])
        self.points = np.concatenate([part[1] for part in gathered])
        self.is_wall = np.concatenate([part[2] for part in gathered])
        if np.any(np.diff(kept_reduced) <= 0):
            raise RuntimeError("internal error: closure points are not in reduced order")
        position_of_reduced = np.full(num_reduced, -1, dtype=np.int64)
        position_of_reduced[kept_reduced] = np.arange(kept_reduced.size)
        copy_reduced = np.concatenate([part[3] for part in gathered])
        if copy_reduced.size:
            copy_points = np.concatenate([part[4] for part in gathered])
            matches = _match_periodic_copies(copy_points, self.points, spec, match_tol)
            position_of_reduced[copy_reduced] = matches
        positions_per_rank = [position_of_reduced[part[5]] for part in gathered]
        if any(np.any(positions < 0) for positions in positions_per_rank):
            raise RuntimeError("internal error: a dof maps to no closure point")
        return positions_per_rank

    @property
    def global_ids(self) -> np.ndarray:
        """(n,) int64 global (case-file) index of each owned closure point."""
        return self.offset + np.arange(self.local_dofs.size, dtype=np.int64)

    def create_vector(self) -> PETSc.Vec:
        """A zero PETSc vector over the closure points, distributed like them."""
        vector = PETSc.Vec().createMPI((int(self.local_dofs.size), self.num_points), comm=self.comm)
        vector.set(0.0)
        return vector

    def values(self, function: fem.Function) -> np.ndarray:
        """Values of a P1 Function (scalar or blocked vector) at the owned closure points.

        Args:
            function: a Function on this P1 space or on the blocked P1 vector space of the
                same mesh (same dof layout, block size b).

        Returns:
            (n,) float64 for a scalar, (n, b) for a vector Function (a copy).
        """
        block = function.function_space.dofmap.index_map_bs
        array = function.x.array
        if block == 1:
            return array[self.local_dofs].copy()
        return array.reshape(-1, block)[self.local_dofs].copy()

    def add_copies(self, local: np.ndarray, function: fem.Function) -> np.ndarray:
        """``local`` plus the values of ``function`` at the copies, added at their points.

        Used for quadrature weights: a wall-corner copy's patch volume belongs to the point it
        stands for.

        Args:
            local: (n,) float64 values at the owned closure points.
            function: scalar P1 Function whose copy-dof values are added.

        Returns:
            (n,) float64 sums.
        """
        vector = self.create_vector()
        vector.array[:] = local
        vector.setValues(
            self.dof_points[self.copy_dofs].astype(PETSc.IntType),
            function.x.array[self.copy_dofs],
            addv=PETSc.InsertMode.ADD_VALUES,
        )
        vector.assemble()
        result = vector.getArray(readonly=True).copy()
        vector.destroy()
        return result

    def gather(self, local: np.ndarray) -> np.ndarray | None:
        """The values of all closure points on rank 0 (collective).

        Args:
            local: (n, ...) values at the owned closure points.

        Returns:
            (N, ...) values in case-file order on rank 0, None on the other ranks.
        """
        parts = self.comm.gather(np.ascontiguousarray(local), root=0)
        if self.comm.rank != 0:
            return None
        return np.concatenate(parts)

    def distribute(self, values: np.ndarray | None) -> np.ndarray:
        """Split values of all closure points held by rank 0 among the owners (collective).

        Args:
            values: (N, ...) in case-file order on rank 0 (ignored elsewhere).

        Returns:
            (n, ...) the owned part.
        """
        parts = None
        if self.comm.rank == 0:
            values = np.asarray(values)
            if values.shape[0] != self.num_points:
                raise ValueError(
                    f"expected {self.num_points} values (one per closure point), "
                    f"got {values.shape[0]}"
                )
            bounds = np.concatenate(([0], np.cumsum(self.counts)))
            parts = [values[bounds[r] : bounds[r + 1]] for r in range(self.comm.size)]
        return self.comm.scatter(parts, root=0)

    def to_function(self, local: np.ndarray, function: fem.Function) -> None:
        """Write closure-point values into a scalar P1 Function (every dof, ghosts too).

        Slaves and copies take the value of the point they stand for.

        Args:
            local: (n,) float64 values at the owned closure points.
            function: scalar Function on this P1 space (collective).
        """
        local = np.asarray(local, dtype=np.float64)
        if local.shape != (self.local_dofs.size,):
            raise ValueError(f"expected ({self.local_dofs.size},) values, got {local.shape}")
        self._vector.array[:] = local
        self._to_dofs.scatter(
            self._vector,
            self._owned_values,
            addv=PETSc.InsertMode.INSERT_VALUES,
            mode=PETSc.ScatterMode.FORWARD,
        )
        function.x.array[: self._num_owned] = self._owned_values.getArray(readonly=True)
        function.x.scatter_forward()

    def destroy(self) -> None:
        """Free the PETSc objects."""
        for petsc_object in (self._to_dofs, self._owned_values, self._vector):
            petsc_object.destroy()


def _match_periodic_copies(
    copies: np.ndarray, points: np.ndarray, spec: BoundarySpec, tol: float
) -> np.ndarray:
    """Index of the point that each copy on a slave boundary stands for (copy + translation).

    Args:
        copies: (m, d) float64 coordinates of the copies.
        points: (N, d) float64 coordinates of the closure points.
        spec: the periodic pairs.
        tol: matching distance.

    Returns:
        (m,) int64 indices into ``points``.
    """
    from scipy.spatial import cKDTree

    tree = cKDTree(points)
    matches = np.full(len(copies), -1, dtype=np.int64)
    translations = [np.asarray(pair.translation, dtype=np.float64) for pair in spec.periodic]
    # A copy on an edge where two slave sides meet (a 3-D hill's wall nodes at x = L, z = L_z)
    # stands for the point that both translations together lead to.
    for count in range(1, len(translations) + 1):
        for chosen in itertools.combinations(translations, count):
            distance, index = tree.query(copies + np.sum(chosen, axis=0), k=1)
            found = (matches < 0) & (distance < tol)
            matches[found] = index[found]
    if np.any(matches < 0):
        raise RuntimeError(f"{np.count_nonzero(matches < 0)} periodic copies have no master")
    return matches
