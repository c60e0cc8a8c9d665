from mpi4py import MPI

import subprocess
import sys
from pathlib import Path

import basix.ufl
import numpy as np
import pytest
import ufl
from dolfinx import fem
from dolfinx.fem import petsc as fem_petsc
from petsc4py import PETSc

from solvers.boundaries import PeriodicPair
from solvers.periodic import PeriodicConstraint, PeriodicPairingError
from tests.mpi_scripts.flow_channel import BOTTOM, LEFT, RIGHT, TOP, tagged_rectangle

COMM = MPI.COMM_WORLD
X_PAIR = PeriodicPair(RIGHT, LEFT, (-1.0, 0.0))
Y_PAIR = PeriodicPair(TOP, BOTTOM, (0.0, -1.0))


def _lu(A: PETSc.Mat) -> PETSc.KSP:
    ksp = PETSc.KSP().create(A.comm)
    ksp.setOperators(A)
    ksp.setType("preonly")
    ksp.getPC().setType("lu")
    ksp.getPC().setFactorSolverType("mumps")
    return ksp


def _solve_periodic_poisson(n: int, degree: int, *, quadrilateral: bool = False):
    """-div grad u = f on the unit square, u = 0 at y = 0, 1, periodic in x."""
    mesh, tags = tagged_rectangle(COMM, (0.0, 0.0), (1.0, 1.0), (n, n), quadrilateral=quadrilateral)
    V = fem.functionspace(mesh, ("Lagrange", degree))
    x = ufl.SpatialCoordinate(mesh)
    exact = ufl.sin(2 * ufl.pi * x[0] + 0.3) * ufl.sin(ufl.pi * x[1]) + x[1] * (1 - x[1]) * ufl.cos(
        2 * ufl.pi * x[0]
    )
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    a = fem.form(ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx)
    L = fem.form(-ufl.div(ufl.grad(exact)) * v * ufl.dx)
    wall_dofs = fem.locate_dofs_topological(
        V, 1, np.concatenate([tags.find(BOTTOM), tags.find(TOP)])
    )
    bc = fem.dirichletbc(0.0, wall_dofs, V)
    A = fem_petsc.assemble_matrix(a, bcs=[bc])
    A.assemble()
    b = fem_petsc.assemble_vector(L)
    fem_petsc.apply_lifting(b, [a], [[bc]])
    b.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
    fem_petsc.set_bc(b, [bc])
    constraint = PeriodicConstraint(V, tags, [X_PAIR], excluded_dofs=wall_dofs)
    reduced = constraint.create_reduced_vector()
    _lu(constraint.restrict_matrix(A)).solve(constraint.restrict_vector(b), reduced)
    uh = fem.Function(V)
    constraint.prolong(reduced, uh.x.petsc_vec)
    error = fem.assemble_scalar(fem.form((uh - exact) ** 2 * ufl.dx))
    return uh, float(np.sqrt(COMM.allreduce(error, op=MPI.SUM))), constraint


def _values_on_sides(uh: fem.Function) -> tuple[np.ndarray, np.ndarray]:
    """Values at x = 1 and at the matching points x = 0, sorted by y (serial)."""
    points = uh.function_space.tabulate_dof_coordinates()
    left = np.flatnonzero(np.isclose(points[:, 0], 0.0))
    right = np.flatnonzero(np.isclose(points[:, 0], 1.0))
    left = left[np.argsort(points[left, 1])]
    right = right[np.argsort(points[right, 1])]
    np.testing.assert_allclose(points[left, 1], points[right, 1], atol=1e-12)
    return uh.x.array[left], uh.x.array[right]


@pytest.mark.parametrize("degree, expected_rate", [(1, 2.0), (2, 3.0)])
def test_periodic_poisson_converges_at_the_optimal_rate(degree, expected_rate):
    errors = [_solve_periodic_poisson(n, degree)[1] for n in (8, 16, 32)]
    rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all(np.abs(rates - expected_rate) < 0.1), rates


@pytest.mark.parametrize("quadrilateral", [False, True])
def test_periodic_solution_is_equal_on_both_sides(quadrilateral):
    uh, error, constraint = _solve_periodic_poisson(8, 2, quadrilateral=quadrilateral)
    assert error < 1e-2
    if COMM.size == 1:
        left, right = _values_on_sides(uh)
        np.testing.assert_allclose(right, left, rtol=0, atol=1e-14)
        assert np.abs(left).max() > 0.1  # the test sees a non-trivial solution
    # P2 side: 2 n + 1 dofs, the two wall corners are Dirichlet and stay out.
    assert constraint.num_slaves == 2 * 8 + 1 - 2


def test_doubly_periodic_corner_chains_resolve_to_one_master():
    # -div grad u + u = f, periodic in x and y: the corner (1, 1) is a slave of (0, 1) through
    # the x pair, which is itself a slave of (0, 0) through the y pair.
    n = 8
    mesh, tags = tagged_rectangle(COMM, (0.0, 0.0), (1.0, 1.0), (n, n))
    V = fem.functionspace(mesh, ("Lagrange", 2))
    constraint = PeriodicConstraint(V, tags, [X_PAIR, Y_PAIR])
    # P2 has 2 n + 1 nodes per side: the right side and the top side less the shared corner.
    assert constraint.num_slaves == 2 * (2 * n + 1) - 1
    assert constraint.num_reduced_dofs == (2 * n) ** 2

    x = ufl.SpatialCoordinate(mesh)
    exact = ufl.cos(2 * ufl.pi * x[0]) * ufl.sin(2 * ufl.pi * x[1] + 0.5)
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    a = fem.form((ufl.inner(ufl.grad(u), ufl.grad(v)) + u * v) * ufl.dx)
    L = fem.form((-ufl.div(ufl.grad(exact)) + exact) * v * ufl.dx)
    A = fem_petsc.assemble_matrix(a)
    A.assemble()
    b = fem_petsc.assemble_vector(L)
    b.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
    reduced = constraint.create_reduced_vector()
    _lu(constraint.restrict_matrix(A)).solve(constraint.restrict_vector(b), reduced)
    uh = fem.Function(V)
    constraint.prolong(reduced, uh.x.petsc_vec)
    if COMM.size == 1:
        points = V.tabulate_dof_coordinates()
        corners = [
            np.flatnonzero(np.isclose(points[:, 0], cx) & np.isclose(points[:, 1], cy))[0]
            for cx in (0.0, 1.0)
            for cy in (0.0, 1.0)
        ]
        corner_values = uh.x.array[corners]
        np.testing.assert_allclose(corner_values, corner_values[0], rtol=0, atol=1e-14)
    error = np.sqrt(COMM.allreduce(fem.assemble_scalar(fem.form((uh - exact) ** 2 * ufl.dx))))
    assert error < 0.01


def test_mixed_space_pairs_each_component_with_itself():
    n = 4
    mesh, tags = tagged_rectangle(COMM, (0.0, 0.0), (1.0, 1.0), (n, n))
    velocity = basix.ufl.element("Lagrange", mesh.basix_cell(), 2, shape=(2,))
    pressure = basix.ufl.element("Lagrange", mesh.basix_cell(), 1)
    W = fem.functionspace(mesh, basix.ufl.mixed_element([velocity, pressure]))
    constraint = PeriodicConstraint(W, tags, [X_PAIR])
    # Two velocity components on 2 n + 1 P2 nodes, one pressure on n + 1 P1 nodes.
    assert constraint.num_slaves == 2 * (2 * n + 1) + (n + 1)

    # Prolong a reduced vector that encodes each column's identity: every slave must read the
    # same sub-space component and position as its master.
    full = fem.Function(W)
    reduced = constraint.create_reduced_vector()
    start, end = reduced.getOwnershipRange()
    reduced.array[:] = np.arange(start, end, dtype=np.float64)
    constraint.prolong(reduced, full.x.petsc_vec)
    ones = constraint.K.createVecLeft()
    constraint.K.mult(constraint.create_reduced_vector() + 1.0, ones)
    assert np.all(ones.array == 1.0)  # exactly one 1 per row
    if COMM.size == 1:
        for sub in range(2):
            space, maps = W.sub(sub).collapse()
            block_size = space.dofmap.index_map_bs
            values = full.x.array[np.asarray(maps[0])].reshape(-1, block_size)
            points = space.tabulate_dof_coordinates()
            left = np.flatnonzero(np.isclose(points[:, 0], 0.0))
            right = np.flatnonzero(np.isclose(points[:, 0], 1.0))
            left = left[np.argsort(points[left, 1])]
            right = right[np.argsort(points[right, 1])]
            np.testing.assert_array_equal(values[right], values[left])
            # Components of one node stay distinct columns.
            if block_size == 2:
                assert np.all(values[left, 0] != values[left, 1])


def test_make_periodic_averages_slave_and_master():
    mesh, tags = tagged_rectangle(COMM, (0.0, 0.0), (1.0, 1.0), (4, 4))
    V = fem.functionspace(mesh, ("Lagrange", 1))
    constraint = PeriodicConstraint(V, tags, [X_PAIR])
    uh = fem.Function(V)
    uh.interpolate(lambda x: x[0])
    constraint.make_periodic(uh.x.petsc_vec)
    if COMM.size == 1:
        left, right = _values_on_sides(uh)
        np.testing.assert_allclose(left, 0.5)
        np.testing.assert_allclose(right, 0.5)
        interior = V.tabulate_dof_coordinates()[:, 0]
        inside = (interior > 1e-12) & (interior < 1 - 1e-12)
        np.testing.assert_allclose(uh.x.array[inside], interior[inside])


def test_unmatched_sides_raise_a_clear_error():
    mesh, tags = tagged_rectangle(COMM, (0.0, 0.0), (1.0, 1.0), (4, 4))
    V = fem.functionspace(mesh, ("Lagrange", 1))
    with pytest.raises(PeriodicPairingError, match="node-matched"):
        PeriodicConstraint(V, tags, [PeriodicPair(RIGHT, LEFT, (-0.9, 0.0))])
    with pytest.raises(ValueError, match="translation"):
        PeriodicConstraint(V, tags, [PeriodicPair(RIGHT, LEFT, (-1.0, 0.0, 0.0))])
    with pytest.raises(ValueError, match="excluded_dofs"):
        PeriodicConstraint(V, tags, [X_PAIR], excluded_dofs=np.array([10**6], dtype=np.int32))


def test_excluded_dofs_are_never_slaves():
    n = 4
    mesh, tags = tagged_rectangle(COMM, (0.0, 0.0), (1.0, 1.0), (n, n))
    V = fem.functionspace(mesh, ("Lagrange", 1))
    right_dofs = fem.locate_dofs_topological(V, 1, tags.find(RIGHT))
    constraint = PeriodicConstraint(V, tags, [X_PAIR], excluded_dofs=right_dofs)
    assert constraint.num_slaves == 0
    wall_dofs = fem.locate_dofs_topological(V, 1, tags.find(BOTTOM))
    constraint = PeriodicConstraint(V, tags, [X_PAIR], excluded_dofs=wall_dofs)
    # The bottom-right corner is excluded itself; the top-right one is still a slave.
    assert constraint.num_slaves == n


@pytest.mark.mpi
def test_periodic_suite_passes_on_two_ranks():
    # The checks above are written for any communicator size; rerun them on two ranks.
    if COMM.size > 1:
        pytest.skip("already running under MPI")
    mpiexec = Path(sys.executable).parent / "mpiexec"
    completed = subprocess.run(
        [
            str(mpiexec),
            "-n",
            "2",
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "-m",
            "not mpi",
            __file__,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
