"""3-D tau transport: manufactured rates on both cell types, the extruded hill, the iterative
path against the direct solver."""

from mpi4py import MPI

import numpy as np
import pytest
from dolfinx import fem

from experiments.verification3d.cases import hill_section_comparison, tau_mms_error
from meshes.hills import TOP_WALL_HEIGHT
from meshes.hills3d import structured_hill3d_mesh
from solvers.boundaries import hill_boundary_spec
from solvers.fields import strain_rate_magnitude, wall_distance_function
from solvers.linalg import ITERATIVE_SCALAR_OPTIONS
from solvers.periodic import PeriodicConstraint
from solvers.transport import solve_tau

COMM = MPI.COMM_WORLD


@pytest.mark.parametrize("cell_type", ["hexahedron", "tetrahedron"])
def test_tau_manufactured_solution_converges_in_3d(cell_type):
    errors = np.array([tau_mms_error(n, cell_type) for n in (2, 4)])
    rate = np.log2(errors[0] / errors[1])
    assert rate > 1.5, errors


@pytest.mark.slow
@pytest.mark.parametrize("cell_type", ["hexahedron", "tetrahedron"])
def test_tau_manufactured_rates_on_finer_meshes(cell_type):
    errors = np.array([tau_mms_error(n, cell_type) for n in (4, 8)])
    assert np.log2(errors[0] / errors[1]) > 1.7, errors


def test_extruded_hill_tau_is_close_to_the_two_dimensional_tau():
    if COMM.size > 1:
        pytest.skip("serial comparison")
    result = hill_section_comparison(resolution=0.05, span_cells=2)
    # The SUPG parameter uses the cell diameter, which on the extruded hexahedra includes the
    # spanwise cell size: tau differs from 2-D by a few per cent on this coarse mesh (the
    # 0.5 % goal needs a flow-aligned element length, docs/results.md).
    assert result["tau_rel_l2"] < 0.06
    assert result["tau_integral_rel"] < 0.01


def test_iterative_tau_path_matches_the_direct_solver():
    tagged = structured_hill3d_mesh(1.0, crest_amplitude=0.2, resolution=0.05, span_cells=2)
    spec = hill_boundary_spec(tagged.boundaries, tagged.period)
    V = fem.functionspace(tagged.mesh, ("Lagrange", 1))
    fdim = tagged.mesh.topology.dim - 1
    walls = [fem.locate_dofs_topological(V, fdim, tagged.facet_tags.find(t)) for t in spec.walls]
    boundary = np.unique(np.concatenate(walls)).astype(np.int32)
    constraint = PeriodicConstraint(V, tagged.facet_tags, spec.periodic, excluded_dofs=boundary)
    velocity = fem.Function(fem.functionspace(tagged.mesh, ("Lagrange", 2, (3,))))
    velocity.interpolate(
        lambda x: np.vstack([x[1] * (TOP_WALL_HEIGHT - x[1]), 0.1 * np.sin(x[2]), 0 * x[0]])
    )
    strain = strain_rate_magnitude(velocity, V, constraint=constraint)
    distance = wall_distance_function(V, tagged.facet_tags, spec.walls, period=tagged.period)
    solutions = [
        solve_tau(
            V,
            velocity,
            strain,
            distance,
            tagged.facet_tags,
            spec,
            constraint=constraint,
            petsc_options=options,
        )
        for options in ({}, ITERATIVE_SCALAR_OPTIONS)
    ]
    direct, iterative = (solution.tau.x.array for solution in solutions)
    difference = COMM.allreduce(np.sum((iterative - direct) ** 2), op=MPI.SUM)
    reference = COMM.allreduce(np.sum(direct**2), op=MPI.SUM)
    assert reference > 0
    assert np.sqrt(difference / reference) <= 10 * ITERATIVE_SCALAR_OPTIONS["ksp_rtol"]
