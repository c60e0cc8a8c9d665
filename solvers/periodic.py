"""Periodic constraints on PETSc: a 0/1 prolongation from a reduced to the full dof numbering.

No periodic-constraint library installs with the FEniCSx wheel, so periodicity is imposed
algebraically. Each *slave* dof (on a slave boundary) is identified with the *master* dof at
the translated position. The prolongation ``K`` maps reduced vectors (one entry per non-slave
dof) to full vectors: a non-slave row holds a 1 in its own reduced column, a slave row a 1 in
its final master's column. A linear system ``A x = b`` on the full space then becomes
``(K^T A K) x_r = K^T b`` and ``x = K x_r``.

Pairing is done by coordinates with point-to-point messages: every rank sends the translated
coordinates of the slave dofs it knows only to the ranks whose master-boundary bounding box
contains them, so no rank ever holds the coordinates of the whole mesh.
"""

from __future__ import annotations

from mpi4py import MPI

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import dolfinx
import dolfinx.fem
import dolfinx.la.petsc
import numpy as np
from petsc4py import PETSc
from scipy.spatial import cKDTree

from solvers.boundaries import PeriodicPair

logger = logging.getLogger(__name__)

__all__ = ["PeriodicConstraint", "PeriodicPairingError", "matched_translation"]


class PeriodicPairingError(ValueError):
    """A slave dof has no master dof at its translated position (sides not node-matched)."""


@dataclass(frozen=True)
class _Leaf:
    """One scalar component of a (possibly blocked or mixed) function space.

    Attributes:
        parent_dofs: (n,) int32 local unrolled dof indices in the parent space (owned + ghost),
            one per dof block of ``space``.
        coordinates: (n, 3) float64 coordinates of those dofs.
        space: the collapsed space holding the component (blocked for vector sub-spaces, shared
            by their components) to locate dof blocks on facets.
    """

    parent_dofs: np.ndarray
    coordinates: np.ndarray
    space: dolfinx.fem.FunctionSpace


def _components(
    space: dolfinx.fem.FunctionSpace, parent_map: np.ndarray, coordinates: np.ndarray
) -> list[_Leaf]:
    """Leaves of a collapsed space whose unrolled dof ``i`` is parent dof ``parent_map[i]``."""
    block_size = space.dofmap.index_map_bs
    by_block = parent_map.reshape(-1, block_size)
    return [_Leaf(by_block[:, c].copy(), coordinates, space) for c in range(block_size)]


def _scalar_leaves(
    V: dolfinx.fem.FunctionSpace,
    collapsed: Sequence[tuple[dolfinx.fem.FunctionSpace, np.ndarray]] | None = None,
) -> list[_Leaf]:
    """Split ``V`` into its scalar components (vector blocks, mixed sub-spaces)."""
    if V.num_sub_spaces == 0 or V.dofmap.index_map_bs > 1:
        # Scalar or blocked top-level space: its own dofs, no collapse needed.
        block_size = V.dofmap.index_map_bs
        num_blocks = V.dofmap.index_map.size_local + V.dofmap.index_map.num_ghosts
        unrolled = np.arange(num_blocks * block_size, dtype=np.int32)
        return _components(V, unrolled, V.tabulate_dof_coordinates())

    leaves: list[_Leaf] = []
    if collapsed is not None:
        if len(collapsed) != V.num_sub_spaces:
            raise ValueError(
                f"collapsed_subspaces has {len(collapsed)} entries but V has "
                f"{V.num_sub_spaces} sub-spaces; pass V.sub(i).collapse() for every i"
            )
        for space, parent_map in collapsed:
            parent_map = np.asarray(parent_map, dtype=np.int32)
            leaves.extend(_components(space, parent_map, space.tabulate_dof_coordinates()))
        return leaves

    def descend(sub: dolfinx.fem.FunctionSpace) -> None:
        # A blocked sub-space is collapsed once for all its components (collapse is costly).
        if sub.num_sub_spaces == 0 or _is_blocked(sub):
            collapsed, maps = sub.collapse()
            parent_map = np.asarray(maps[0], dtype=np.int32)
            leaves.extend(_components(collapsed, parent_map, collapsed.tabulate_dof_coordinates()))
            return
        for i in range(sub.num_sub_spaces):
            descend(sub.sub(i))

    for i in range(V.num_sub_spaces):
        descend(V.sub(i))
    return leaves


def _is_blocked(space: dolfinx.fem.FunctionSpace) -> bool:
    """True for a vector/tensor sub-space of identical scalar components (a blocked element)."""
    return space.ufl_element().block_size > 1


class _Ownership:
    """Which rank owns which contiguous range of a distributed global numbering."""

    def __init__(self, comm: MPI.Comm, num_owned: int) -> None:
        self.comm = comm
        counts = np.asarray(comm.allgather(int(num_owned)), dtype=np.int64)
        self.starts = np.concatenate(([0], np.cumsum(counts)))
        self.start = int(self.starts[comm.rank])
        self.size = int(self.starts[-1])

    def owner(self, global_indices: np.ndarray) -> np.ndarray:
        """Rank that owns each global index: (n,) int64 -> (n,) int64."""
        return np.searchsorted(self.starts, global_indices, side="right") - 1

    def fetch(self, global_indices: np.ndarray, owned_values: np.ndarray) -> np.ndarray:
        """Values of a distributed array at arbitrary global indices.

        Args:
            global_indices: (n,) int64 global indices to look up (any owner).
            owned_values: (num_owned,) int64 values of the owned part on this rank.

        Returns:
            (n,) int64 values at ``global_indices``.
        """
        global_indices = np.asarray(global_indices, dtype=np.int64)
        owners = self.owner(global_indices)
        order = np.argsort(owners, kind="stable")
        split = np.searchsorted(owners[order], np.arange(self.comm.size + 1))
        requests = [global_indices[order[split[r] : split[r + 1]]] for r in range(self.comm.size)]
        received = self.comm.alltoall(requests)
        replies = [owned_values[np.asarray(req, dtype=np.int64) - self.start] for req in received]
        answered = self.comm.alltoall(replies)
        values = np.empty(global_indices.shape, dtype=np.int64)
        for r in range(self.comm.size):
            values[order[split[r] : split[r + 1]]] = answered[r]
        return values


class PeriodicConstraint:
    """0/1 prolongation ``K`` from a reduced numbering to the owned dofs of a function space.

    Rows of ``K`` are the owned (unrolled) dofs of ``V`` in PETSc's layout of ``V``; columns are
    a reduced numbering in which every slave dof takes its final master's column. Scalar,
    blocked (vector) and mixed (e.g. Taylor-Hood) spaces are supported: each scalar component
    is paired with the same component on the master side.

    Attributes:
        K: the prolongation, a PETSc AIJ matrix of global size (num_dofs, num_reduced_dofs).
        num_slaves: global number of eliminated (slave) dofs.
        num_reduced_dofs: global size of the reduced numbering.
        reduced_index: (num_owned,) int64 reduced global column of each owned full dof.
        slave_mask: (num_owned,) bool, True for the owned dofs that are eliminated slaves.
    """

    def __init__(
        self,
        V: dolfinx.fem.FunctionSpace,
        facet_tags: dolfinx.mesh.MeshTags,
        pairs: Sequence[PeriodicPair],
        *,
        excluded_dofs: np.ndarray | None = None,
        tol: float = 1e-8,
        collapsed_subspaces: Sequence[tuple[dolfinx.fem.FunctionSpace, np.ndarray]] | None = None,
    ) -> None:
        """Pair slave and master dofs and build ``K``.

        Args:
            V: the function space (scalar, blocked vector or mixed).
            facet_tags: facet markers holding the slave and master tags of ``pairs``.
            pairs: periodic pairs; a dof that is a slave of several pairs keeps the first one,
                and chains (a master that is itself a slave) resolve to the final master.
            excluded_dofs: (m,) int32 local unrolled dof indices of ``V`` (owned or ghost) that
                must never be slaves, typically Dirichlet dofs.
            tol: absolute distance within which ``slave + translation`` matches a master.
            collapsed_subspaces: for a mixed ``V``, the result of collapsing each top-level
                sub-space, ``[(space_i, parent_dofs_i), ...]`` with ``parent_dofs_i`` the
                (n_i,) int32 map from collapsed to ``V`` dofs. Collapsing is costly on large
                meshes, so a caller that has them already passes them here; the sub-spaces
                must be scalar or blocked (no nested mixed spaces).

        Raises:
            ValueError: on inconsistent input (wrong dimension of a translation, bad tolerance).
            PeriodicPairingError: when a slave dof has no master within ``tol``.
        """
        if not tol > 0:
            raise ValueError(f"tol must be positive, got {tol}")
        mesh = V.mesh
        self.comm: MPI.Comm = mesh.comm
        gdim = mesh.geometry.dim
        for pair in pairs:
            if len(pair.translation) != gdim:
                raise ValueError(
                    f"periodic pair {pair} has a {len(pair.translation)}-component translation "
                    f"but the mesh is {gdim}-dimensional"
                )
        if facet_tags.dim != mesh.topology.dim - 1:
            raise ValueError(
                f"facet_tags must tag facets (dim {mesh.topology.dim - 1}), got dim {facet_tags.dim}"
            )

        self.V = V
        self.pairs = tuple(pairs)
        index_map = V.dofmap.index_map
        block_size = V.dofmap.index_map_bs
        self._num_owned = index_map.size_local * block_size
        num_local = (index_map.size_local + index_map.num_ghosts) * block_size
        blocks = np.arange(num_local, dtype=np.int64) // block_size
        self._local_to_global = (
            index_map.local_to_global(blocks.astype(np.int32)).astype(np.int64) * block_size
            + np.arange(num_local, dtype=np.int64) % block_size
        )
        self._ownership = _Ownership(self.comm, self._num_owned)

        excluded_local = np.zeros(num_local, dtype=bool)
        if excluded_dofs is not None:
            excluded_dofs = np.asarray(excluded_dofs)
            if excluded_dofs.size and (excluded_dofs.min() < 0 or excluded_dofs.max() >= num_local):
                raise ValueError(
                    f"excluded_dofs must be local dof indices in [0, {num_local}); got range "
                    f"[{excluded_dofs.min()}, {excluded_dofs.max()}]"
                )
            excluded_local[excluded_dofs] = True
        # A ghost may be excluded on one rank only; the owner must know.
        excluded_owned = self._reduce_to_owner(np.where(excluded_local, 1.0, 0.0), fill=0.0) > 0

        leaves = _scalar_leaves(V, collapsed_subspaces)
        master_of = np.full(self._num_owned, -1, dtype=np.int64)
        for pair in self.pairs:
            pair_master = self._pair_masters(leaves, facet_tags, pair, tol)
            free = (master_of < 0) & (pair_master >= 0) & ~excluded_owned
            master_of[free] = pair_master[free]
        master_of = self._resolve_chains(master_of, excluded_owned)
        self._build_prolongation(master_of)

    # -- distributed helpers ---------------------------------------------------------------

    def _reduce_to_owner(self, local_values: np.ndarray, *, fill: float) -> np.ndarray:
        """Max over all ranks that know a dof (owned or ghost) of ``local_values``.

        Args:
            local_values: (num_local,) float64 values on owned + ghost dofs; ``fill`` where
                this rank has nothing to say.
            fill: the neutral value (below every meaningful value).

        Returns:
            (num_owned,) float64 maxima on the owned dofs.
        """
        index_map = self.V.dofmap.index_map
        vec = dolfinx.la.petsc.create_vector([(index_map, self.V.dofmap.index_map_bs)])
        with vec.localForm() as local:
            local.array[:] = local_values
        vec.ghostUpdate(addv=PETSc.InsertMode.MAX_VALUES, mode=PETSc.ScatterMode.REVERSE)
        owned = vec.getArray(readonly=True)[: self._num_owned].copy()
        vec.destroy()
        return np.where(np.isfinite(owned), owned, fill)

    def _pair_masters(
        self,
        leaves: list[_Leaf],
        facet_tags: dolfinx.mesh.MeshTags,
        pair: PeriodicPair,
        tol: float,
    ) -> np.ndarray:
        """Global master dof of every owned dof that is a slave of ``pair`` (-1 elsewhere).

        Returns:
            (num_owned,) int64.
        """
        comm = self.comm
        fdim = facet_tags.dim
        translation = np.zeros(3)
        translation[: len(pair.translation)] = pair.translation
        slave_facets = facet_tags.find(pair.slave)
        master_facets = facet_tags.find(pair.master)

        slave_parent, slave_points, slave_leaf = [], [], []
        master_trees: list[cKDTree | None] = []
        master_globals: list[np.ndarray] = []
        lower = np.full(3, np.inf)
        upper = np.full(3, -np.inf)
        for leaf_id, leaf in enumerate(leaves):
            slaves = dolfinx.fem.locate_dofs_topological(leaf.space, fdim, slave_facets)
            masters = dolfinx.fem.locate_dofs_topological(leaf.space, fdim, master_facets)
            slave_parent.append(leaf.parent_dofs[slaves])
            slave_points.append(leaf.coordinates[slaves] + translation)
            slave_leaf.append(np.full(slaves.size, leaf_id, dtype=np.int64))
            master_points = leaf.coordinates[masters]
            master_trees.append(cKDTree(master_points) if masters.size else None)
            master_globals.append(self._local_to_global[leaf.parent_dofs[masters]])
            if masters.size:
                lower = np.minimum(lower, master_points.min(axis=0))
                upper = np.maximum(upper, master_points.max(axis=0))
        parents = np.concatenate(slave_parent)
        points = np.concatenate(slave_points)
        leaf_ids = np.concatenate(slave_leaf)

        # Send each translated slave point only to ranks whose master bounding box holds it.
        boxes = comm.allgather((lower - tol, upper + tol))
        requests_points, requests_leaves, requests_index = [], [], []
        for box_lower, box_upper in boxes:
            inside = np.flatnonzero(np.all((points >= box_lower) & (points <= box_upper), axis=1))
            requests_index.append(inside)
            requests_points.append(points[inside])
            requests_leaves.append(leaf_ids[inside])
        received = comm.alltoall(list(zip(requests_points, requests_leaves, strict=True)))
        replies = []
        for query_points, query_leaves in received:
            found = np.full(query_leaves.size, -1, dtype=np.int64)
            for leaf_id, tree in enumerate(master_trees):
                selected = np.flatnonzero(query_leaves == leaf_id)
                if tree is None or selected.size == 0:
                    continue
                distance, nearest = tree.query(query_points[selected], distance_upper_bound=tol)
                hit = np.isfinite(distance)
                found[selected[hit]] = master_globals[leaf_id][nearest[hit]]
            replies.append(found)
        answered = comm.alltoall(replies)
        master_global = np.full(parents.size, -1, dtype=np.int64)
        for index, found in zip(requests_index, answered, strict=True):
            master_global[index] = np.maximum(master_global[index], found)

        unmatched = np.flatnonzero(master_global < 0)
        num_unmatched = comm.allreduce(int(unmatched.size), op=MPI.SUM)
        if num_unmatched:
            example = comm.allgather(points[unmatched[0]] - translation if unmatched.size else None)
            example = next(p for p in example if p is not None)
            raise PeriodicPairingError(
                f"{num_unmatched} dofs on slave boundary {pair.slave} have no dof on master "
                f"boundary {pair.master} at translation {pair.translation} within tol={tol} "
                f"(e.g. the dof at {example[: len(pair.translation)]}); the two sides must be "
                "node-matched and the translation must map one onto the other"
            )
        # Slave dofs are known to every rank holding a slave facet, not always to their owner.
        local = np.full(self._local_to_global.size, -1.0)
        local[parents] = master_global.astype(np.float64)
        return self._reduce_to_owner(local, fill=-1.0).astype(np.int64)

    def _resolve_chains(self, master_of: np.ndarray, excluded_owned: np.ndarray) -> np.ndarray:
        """Follow master links until every slave points at a dof that is not a slave.

        Args:
            master_of: (num_owned,) int64 direct master (global) of each owned dof, -1 if none.
            excluded_owned: (num_owned,) bool, dofs that must never be slaves.

        Returns:
            (num_owned,) int64 final master of each owned slave, -1 for non-slaves.
        """
        own = self._ownership
        is_slave = master_of >= 0
        final = master_of.copy()
        for _ in range(len(self.pairs) + 1):
            next_master = own.fetch(final[is_slave], master_of)
            advanced = next_master >= 0
            final_slaves = final[is_slave]
            final_slaves[advanced] = next_master[advanced]
            final[is_slave] = final_slaves
            if not self.comm.allreduce(bool(advanced.any()), op=MPI.LOR):
                break
        else:
            raise PeriodicPairingError(
                "periodic master links form a cycle; check that the pair translations are "
                "consistent (a slave boundary must not map back onto itself)"
            )
        # A slave whose master carries a Dirichlet condition would pollute the Dirichlet row.
        master_excluded = own.fetch(final[is_slave], excluded_owned.astype(np.int64)) > 0
        slave_positions = np.flatnonzero(is_slave)
        dropped = slave_positions[master_excluded]
        final[dropped] = -1
        num_dropped = self.comm.allreduce(int(dropped.size), op=MPI.SUM)
        if num_dropped and self.comm.rank == 0:
            logger.warning(
                "%d slave dofs map to excluded (Dirichlet) masters and stay unconstrained; "
                "exclude them as well for a consistent problem",
                num_dropped,
            )
        return final

    def _build_prolongation(self, final_master: np.ndarray) -> None:
        """Number the non-slave dofs and assemble ``K``."""
        is_slave = final_master >= 0
        num_reduced_owned = int(np.count_nonzero(~is_slave))
        reduced = _Ownership(self.comm, num_reduced_owned)
        reduced_index = np.full(self._num_owned, -1, dtype=np.int64)
        reduced_index[~is_slave] = reduced.start + np.arange(num_reduced_owned, dtype=np.int64)
        reduced_index[is_slave] = self._ownership.fetch(final_master[is_slave], reduced_index)
        if np.any(reduced_index < 0):
            raise RuntimeError("internal error: a periodic master was itself eliminated")

        self.reduced_index = reduced_index
        self.slave_mask = is_slave
        self.num_slaves = self.comm.allreduce(int(np.count_nonzero(is_slave)), op=MPI.SUM)
        self.num_reduced_dofs = reduced.size
        int_type = PETSc.IntType
        row_pointers = np.arange(self._num_owned + 1, dtype=int_type)
        self.K = PETSc.Mat().createAIJ(
            size=((self._num_owned, self._ownership.size), (num_reduced_owned, reduced.size)),
            csr=(row_pointers, reduced_index.astype(int_type), np.ones(self._num_owned)),
            comm=self.comm,
        )
        self.K.assemble()
        if self.comm.rank == 0:
            logger.debug(
                "periodic constraint: %d of %d dofs are slaves",
                self.num_slaves,
                self._ownership.size,
            )

    # -- public operations -------------------------------------------------------------------

    def restrict_matrix(self, A: PETSc.Mat, out: PETSc.Mat | None = None) -> PETSc.Mat:
        """Reduced operator ``K^T A K``.

        Args:
            A: assembled full matrix of ``V`` (square, PETSc layout of ``V``).
            out: a matrix returned by an earlier call with ``A`` of the same sparsity; it is
                refilled in place, which skips the symbolic product.

        Returns:
            The reduced matrix (``out`` when given).
        """
        if out is None:
            return A.PtAP(self.K)
        return A.PtAP(self.K, result=out)

    def restrict_vector(self, b: PETSc.Vec, out: PETSc.Vec | None = None) -> PETSc.Vec:
        """Reduced vector ``K^T b`` (slave entries are added to their master's entry).

        Args:
            b: full vector with ghost contributions already accumulated on owners.
            out: reduced vector to write into; created when None.

        Returns:
            The reduced vector.
        """
        if out is None:
            out = self.create_reduced_vector()
        self.K.multTranspose(b, out)
        return out

    def prolong(self, x_reduced: PETSc.Vec, x_full: PETSc.Vec) -> None:
        """Write ``x_full = K x_reduced`` and refresh the ghost entries of ``x_full``.

        Args:
            x_reduced: reduced vector.
            x_full: ghosted full vector of ``V`` (e.g. ``Function.x.petsc_vec``).
        """
        self.K.mult(x_reduced, x_full)
        x_full.ghostUpdate(addv=PETSc.InsertMode.INSERT, mode=PETSc.ScatterMode.FORWARD)

    def make_periodic(self, x_full: PETSc.Vec) -> None:
        """Replace every master value and its slaves' values by their mean, in place.

        Useful to make an arbitrary initial guess periodic before an iteration whose updates
        are prolonged (and hence periodic).

        Args:
            x_full: ghosted full vector of ``V``; ghosts are refreshed.
        """
        ones = self.K.createVecLeft()
        ones.set(1.0)
        multiplicity = self.restrict_vector(ones)
        reduced = self.restrict_vector(x_full)
        reduced.pointwiseDivide(reduced, multiplicity)
        self.prolong(reduced, x_full)
        for vec in (ones, multiplicity, reduced):
            vec.destroy()

    def create_reduced_vector(self) -> PETSc.Vec:
        """A zero vector of the reduced numbering (distributed like the columns of ``K``)."""
        vec = self.K.createVecRight()
        vec.set(0.0)
        return vec

    def destroy(self) -> None:
        """Free the PETSc matrix."""
        self.K.destroy()


def matched_translation(
    mesh: dolfinx.mesh.Mesh,
    facet_tags: dolfinx.mesh.MeshTags,
    slave: int,
    master: int,
    *,
    translation: Sequence[float] | None = None,
    names: tuple[str, str] | None = None,
    rtol: float = 1e-8,
) -> tuple[float, ...]:
    """The translation of a periodic pair of tagged surfaces, found or given, and checked.

    Without ``translation`` it is the offset between the centres of the two surfaces'
    bounding boxes. Either way every vertex of the slave surface, translated, must be a vertex
    of the master surface and the other way round (node-matched sides, as a periodic mesh
    writer such as gmsh's ``setPeriodic`` makes them); components below the tolerance are set
    to exactly 0, so that an axis-aligned pair counts as a period along its axis (see
    :func:`solvers.boundaries.periodic_lengths`). The vertices are gathered on rank 0 (two
    surfaces, not the mesh) and the result is broadcast (collective).

    Args:
        mesh: the mesh (geometric dimension d).
        facet_tags: its facet tags.
        slave: facet tag of the slave surface (a point x there is x + translation on master).
        master: facet tag of the master surface.
        translation: (d,) the user's translation, checked; None: found.
        names: the boundaries' names for the messages (default: their tags).
        rtol: match tolerance relative to the mesh's extent.

    Returns:
        (d,) float translation from the slave to the master surface.

    Raises:
        PeriodicPairingError: a translation with other than d components, an empty surface,
            or surfaces that the translation does not map onto each other (naming both and a
            vertex without a partner).
    """
    from dolfinx.mesh import entities_to_geometry

    comm = mesh.comm
    gdim = mesh.geometry.dim
    slave_name, master_name = names or (f"tag {slave}", f"tag {master}")
    what = f"periodic pair slave {slave_name!r} -> master {master_name!r}"
    if translation is not None and len(translation) != gdim:
        raise PeriodicPairingError(
            f"{what}: the translation {list(translation)} has {len(translation)} components "
            f"but the mesh is {gdim}-D"
        )
    fdim = mesh.topology.dim - 1
    mesh.topology.create_connectivity(fdim, 0)

    def surface(tag: int) -> np.ndarray:
        nodes = entities_to_geometry(mesh, fdim, facet_tags.find(tag)).reshape(-1)
        local = mesh.geometry.x[np.unique(nodes), :gdim]
        gathered = comm.gather(local, root=0)
        return np.concatenate(gathered) if comm.rank == 0 else local

    slave_points, master_points = surface(slave), surface(master)
    coordinates = mesh.geometry.x[:, :gdim]
    lower = np.min(comm.allgather(coordinates.min(axis=0, initial=np.inf)), axis=0)
    upper = np.max(comm.allgather(coordinates.max(axis=0, initial=-np.inf)), axis=0)
    extent = float(np.max(upper - lower))
    outcome: tuple[str | None, tuple[float, ...]] = (None, ())
    if comm.rank == 0:
        outcome = _match_surfaces(
            slave_points, master_points, translation, tol=rtol * max(extent, 1e-300), what=what
        )
    error, found = comm.bcast(outcome, root=0)
    if error is not None:
        raise PeriodicPairingError(error)
    return found


def _match_surfaces(
    slave_points: np.ndarray,
    master_points: np.ndarray,
    translation: Sequence[float] | None,
    *,
    tol: float,
    what: str,
) -> tuple[str | None, tuple[float, ...]]:
    """(error or None, translation) of two gathered vertex sets (see matched_translation)."""
    # a vertex shared by facets of several ranks is gathered once per rank
    slave_points = np.unique(slave_points, axis=0)
    master_points = np.unique(master_points, axis=0)
    if not len(slave_points) or not len(master_points):
        empty = "slave" if not len(slave_points) else "master"
        return f"{what}: the {empty} surface has no facets", ()
    if translation is None:
        # the offset of the bounding boxes' centres (any matched pair has it)
        shift = 0.5 * (master_points.min(axis=0) + master_points.max(axis=0))
        shift -= 0.5 * (slave_points.min(axis=0) + slave_points.max(axis=0))
        shift[np.abs(shift) <= tol] = 0.0
    else:
        shift = np.asarray(translation, dtype=np.float64)
    moved = slave_points + shift
    distance, _ = cKDTree(master_points).query(moved)
    back, _ = cKDTree(moved).query(master_points)
    unmatched = np.flatnonzero(distance > tol)
    if unmatched.size or np.any(back > tol):
        given = "the given" if translation is not None else "the surfaces' offset"
        example = (
            f"the slave vertex at {np.round(slave_points[unmatched[0]], 6).tolist()} has no "
            "master vertex there"
            if unmatched.size
            else f"the master vertex at {np.round(master_points[np.argmax(back)], 6).tolist()} "
            "has no slave vertex"
        )
        return (
            f"{what}: the surfaces do not match under {given} translation "
            f"{np.round(shift, 9).tolist()} ({example}, {len(slave_points)} slave and "
            f"{len(master_points)} master vertices); the two sides must be node-matched copies "
            "of each other (gmsh: mesh.setPeriodic)",
            (),
        )
    return None, tuple(float(value) for value in shift)
