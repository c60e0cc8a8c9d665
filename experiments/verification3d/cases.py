"""The 3-D verification cases, shared by ``run.py`` and the tests.

Used by tests/test_flow3d.py, tests/test_transport3d.py and tests/mpi_scripts/hill3d.py.

- :func:`kovasznay3d_errors`: Taylor-Hood flow on a box against an exact 3-D Navier-Stokes
  solution (the Kovasznay flow in the plane spanned by x and (y + z)/sqrt 2, uniform along
  (y - z)/sqrt 2), Dirichlet data on the whole boundary.
- :func:`tau_mms_error`: the SUPG transport (advection, diffusion, the |t| t reaction of the
  tau equation) against a manufactured 3-D solution.
- :func:`hill_section_comparison`: the extruded hill (a = 0) against the 2-D hill of the same
  section at the same in-plane resolution, flow and frozen tau.
- :func:`hill3d_summary`: integral quantities of flow and tau on a coarse 3-D hill.
"""

from __future__ import annotations

from mpi4py import MPI

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import ufl
from dolfinx import fem
from dolfinx import mesh as dmesh
from scipy.spatial import cKDTree

from meshes.hills3d import structured_hill3d_mesh, unstructured_hill3d_mesh
from meshes.structured import structured_hill_mesh
from meshes.tagged import TaggedMesh
from solvers.boundaries import BoundarySpec, hill_boundary_spec
from solvers.fields import strain_rate_magnitude, wall_distance_function
from solvers.flow import FlowSolution, solve_flow
from solvers.periodic import PeriodicConstraint
from solvers.transport import (
    TauSolution,
    regularized_abs_power,
    solve_nonlinear,
    solve_tau,
    transport_residual_form,
)

KOVASZNAY_NU = 1.0 / 40.0
KOVASZNAY_LAMBDA = 1 / (2 * KOVASZNAY_NU) - np.sqrt(1 / (4 * KOVASZNAY_NU**2) + 4 * np.pi**2)
CELL_TYPES = {"hexahedron": dmesh.CellType.hexahedron, "tetrahedron": dmesh.CellType.tetrahedron}
_BOUNDARY_TAG = 1


def box_mesh(comm: MPI.Comm, n: int, cell_type: str) -> tuple[dmesh.Mesh, dmesh.MeshTags]:
    """Unit cube with n cells per side, every boundary facet tagged 1."""
    mesh = dmesh.create_unit_cube(comm, n, n, n, CELL_TYPES[cell_type])
    fdim = mesh.topology.dim - 1
    mesh.topology.create_connectivity(fdim, fdim + 1)
    facets = np.sort(dmesh.exterior_facet_indices(mesh.topology)).astype(np.int32)
    tags = dmesh.meshtags(mesh, fdim, facets, np.full(facets.size, _BOUNDARY_TAG, np.int32))
    return mesh, tags


def _l2(expression, mesh: dmesh.Mesh) -> float:
    value = fem.assemble_scalar(fem.form(expression**2 * ufl.dx(domain=mesh)))
    return float(np.sqrt(mesh.comm.allreduce(value, op=MPI.SUM)))


def _kovasznay_numpy(x: np.ndarray) -> np.ndarray:
    lam = KOVASZNAY_LAMBDA
    s = (x[1] + x[2]) / np.sqrt(2.0)
    along = lam / (2 * np.pi) * np.exp(lam * x[0]) * np.sin(2 * np.pi * s) / np.sqrt(2.0)
    return np.vstack([1 - np.exp(lam * x[0]) * np.cos(2 * np.pi * s), along, along])


def kovasznay3d_errors(
    n: int, cell_type: str, comm: MPI.Comm = MPI.COMM_WORLD
) -> tuple[float, float]:
    """L2 errors (velocity, mean-free pressure) of Taylor-Hood on an n^3 box.

    Returns:
        (velocity_error, pressure_error) float.
    """
    mesh, tags = box_mesh(comm, n, cell_type)
    spec = BoundarySpec(inlets={_BOUNDARY_TAG: _kovasznay_numpy})
    solution = solve_flow(mesh, tags, spec, nu=KOVASZNAY_NU)
    x = ufl.SpatialCoordinate(mesh)
    lam = KOVASZNAY_LAMBDA
    s = (x[1] + x[2]) / np.sqrt(2.0)
    along = lam / (2 * ufl.pi) * ufl.exp(lam * x[0]) * ufl.sin(2 * ufl.pi * s) / np.sqrt(2.0)
    exact_u = ufl.as_vector([1 - ufl.exp(lam * x[0]) * ufl.cos(2 * ufl.pi * s), along, along])
    exact_p = 0.5 * (1 - ufl.exp(2 * lam * x[0]))
    mean_h = comm.allreduce(fem.assemble_scalar(fem.form(solution.p * ufl.dx)), op=MPI.SUM)
    mean_exact = comm.allreduce(fem.assemble_scalar(fem.form(exact_p * ufl.dx)), op=MPI.SUM)
    return (
        _l2(solution.u - exact_u, mesh),
        _l2((solution.p - mean_h) - (exact_p - mean_exact), mesh),
    )


class ManufacturedTau(NamedTuple):
    """A manufactured-solution solve of the tau transport: its L2 error and Newton history."""

    error: float
    residual_history: list[float]


def manufactured_tau(
    mesh: dmesh.Mesh,
    exact: ufl.core.expr.Expr,
    velocity: ufl.core.expr.Expr,
    *,
    diffusivity: float,
    exponent: float = 1.0,
    supg_length: str = "diameter",
) -> ManufacturedTau:
    """P1 SUPG transport with the reaction 3 |t|^p t and the source that makes ``exact`` solve it.

    Dirichlet data from ``exact`` on the whole boundary; any dimension and cell type.

    Args:
        mesh: the mesh.
        exact: the manufactured solution (UFL, of the mesh's coordinates).
        velocity: (d,) advecting velocity (UFL).
        diffusivity: D > 0.
        exponent: p of the reaction.
        supg_length: the SUPG element length (:func:`solvers.transport.element_length`).
    """
    V = fem.functionspace(mesh, ("Lagrange", 1))

    def reaction(value):
        return 3.0 * regularized_abs_power(value, exponent, 1e-8) * value

    source = (
        ufl.dot(velocity, ufl.grad(exact))
        - diffusivity * ufl.div(ufl.grad(exact))
        + reaction(exact)
    )
    tau = fem.Function(V)
    residual = transport_residual_form(
        tau, velocity, diffusivity=diffusivity, reaction=reaction(tau), source=source,
        supg_length=supg_length,
    )
    boundary_values = fem.Function(V)
    boundary_values.interpolate(fem.Expression(exact, V.element.interpolation_points))
    fdim = mesh.topology.dim - 1
    mesh.topology.create_connectivity(fdim, mesh.topology.dim)
    dofs = fem.locate_dofs_topological(V, fdim, dmesh.exterior_facet_indices(mesh.topology))
    result = solve_nonlinear(residual, tau, [fem.dirichletbc(boundary_values, dofs)])
    return ManufacturedTau(_l2(tau - exact, mesh), list(result.residual_history))


def tau_mms_error(n: int, cell_type: str, comm: MPI.Comm = MPI.COMM_WORLD) -> float:
    """L2 error of the P1 SUPG transport (D = 0.1, reaction 3 |t| t) on an n^3 box."""
    mesh, _ = box_mesh(comm, n, cell_type)
    x = ufl.SpatialCoordinate(mesh)
    exact = (
        1.0
        + 0.5 * ufl.sin(2 * ufl.pi * x[0]) * ufl.cos(ufl.pi * x[1]) * ufl.cos(ufl.pi * x[2])
        + x[0] * x[1] * x[2]
    )
    velocity = ufl.as_vector([ufl.cos(x[1]), ufl.sin(x[0]) + 0.5, ufl.cos(x[0] + x[1])])
    return manufactured_tau(mesh, exact, velocity, diffusivity=0.1).error


@dataclass
class HillSolution:
    """Flow and frozen tau on one hill mesh (serial helpers: fields stay on their ranks).

    Attributes:
        tagged: the mesh.
        flow: the flow solution.
        taus: the frozen tau with each SUPG element length asked for (``"diameter"``,
            ``"flow"``: :func:`solvers.transport.element_length`).
    """

    tagged: TaggedMesh
    flow: FlowSolution
    taus: dict[str, TauSolution]


def solve_hill(
    tagged: TaggedMesh, *, supg_lengths: tuple[str, ...] = ("diameter",)
) -> HillSolution:
    """Flow (Re = 100, bulk velocity held) and frozen tau (p = 1) on a tagged hill mesh."""
    spec = hill_boundary_spec(tagged.boundaries, tagged.period)
    flow = solve_flow(tagged.mesh, tagged.facet_tags, spec)
    V = fem.functionspace(tagged.mesh, ("Lagrange", 1))
    boundary = np.unique(
        np.concatenate(
            [
                fem.locate_dofs_topological(
                    V, tagged.mesh.topology.dim - 1, tagged.facet_tags.find(t)
                )
                for t in spec.dirichlet_tags
            ]
        )
    ).astype(np.int32)
    constraint = PeriodicConstraint(V, tagged.facet_tags, spec.periodic, excluded_dofs=boundary)
    strain = strain_rate_magnitude(flow.u, V, constraint=constraint)
    distance = wall_distance_function(V, tagged.facet_tags, spec.walls, period=tagged.period)
    taus = {
        length: solve_tau(
            V, flow.u, strain, distance, tagged.facet_tags, spec, constraint=constraint,
            supg_length=length,
        )
        for length in supg_lengths
    }
    return HillSolution(tagged=tagged, flow=flow, taus=taus)


def _relative_difference_on_section(
    field3d: fem.Function, field2d: fem.Function, components: int
) -> float:
    """Nodal relative l2 difference of a 3-D field and the 2-D field at the same (x, y)."""
    coords3 = field3d.function_space.tabulate_dof_coordinates()
    coords2 = field2d.function_space.tabulate_dof_coordinates()
    distance, index = cKDTree(coords2[:, :2]).query(coords3[:, :2])
    if distance.max() > 1e-9:
        raise RuntimeError("3-D dofs do not sit above 2-D dofs: meshes are not matched")
    values3 = field3d.x.array.reshape(-1, field3d.function_space.dofmap.index_map_bs)
    values2 = field2d.x.array.reshape(-1, field2d.function_space.dofmap.index_map_bs)
    difference = values3[:, :components] - values2[index, :components]
    return float(np.linalg.norm(difference) / np.linalg.norm(values2[index, :components]))


def hill_section_comparison(
    *, alpha: float = 1.0, resolution: float = 0.05, span_cells: int = 2, kind: str = "hexahedron"
) -> dict[str, float]:
    """Extruded hill (a = 0) against the 2-D hill of the same section. Serial only.

    Returns:
        ``velocity_rel_l2`` (in-plane components), ``tau_rel_l2`` and ``tau_rel_l2_flow_length``
        (the SUPG element length: the cell diameter, the default, and the flow-aligned length),
        ``spanwise_velocity`` (max |u_z| / bulk velocity), ``body_force_rel`` and
        ``tau_integral_rel`` (the 3-D integral per unit span against the 2-D one, diameter
        length), and the sizes.
    """
    section = structured_hill_mesh(alpha, resolution=resolution, comm=MPI.COMM_SELF)
    if kind == "hexahedron":
        tagged = structured_hill3d_mesh(
            alpha, resolution=resolution, span_cells=span_cells, comm=MPI.COMM_SELF
        )
    else:
        tagged = unstructured_hill3d_mesh(alpha, size=span_cells, comm=MPI.COMM_SELF)
    lengths = ("diameter", "flow")
    two = solve_hill(section, supg_lengths=lengths)
    three = solve_hill(tagged, supg_lengths=lengths)
    span = tagged.period[2]
    velocity = three.flow.u.x.array.reshape(-1, 3)
    tau_difference = {
        length: _relative_difference_on_section(three.taus[length].tau, two.taus[length].tau, 1)
        for length in lengths
    }
    return {
        "velocity_rel_l2": _relative_difference_on_section(three.flow.u, two.flow.u, 2),
        "tau_rel_l2": tau_difference["diameter"],
        "tau_rel_l2_flow_length": tau_difference["flow"],
        "spanwise_velocity": float(np.abs(velocity[:, 2]).max() / three.flow.bulk_velocity),
        "body_force_rel": abs(three.flow.body_force / two.flow.body_force - 1),
        "tau_integral_rel": abs(
            three.taus["diameter"].integral / span / two.taus["diameter"].integral - 1
        ),
        "flow_dofs_2d": two.flow.num_dofs,
        "flow_dofs_3d": three.flow.num_dofs,
    }


def hill3d_summary(
    *,
    crest_amplitude: float = 0.2,
    resolution: float = 0.05,
    span_cells: int = 2,
    comm: MPI.Comm = MPI.COMM_WORLD,
) -> dict[str, float]:
    """Body force, tau integral and extreme values of flow and tau on a coarse 3-D hex hill."""
    tagged = structured_hill3d_mesh(
        1.0,
        crest_amplitude=crest_amplitude,
        resolution=resolution,
        span_cells=span_cells,
        comm=comm,
    )
    solution = solve_hill(tagged)
    velocity = solution.flow.u.x.array
    tau = solution.taus["diameter"].tau.x.array
    return {
        "body_force": solution.flow.body_force,
        "bulk_velocity": solution.flow.bulk_velocity,
        "tau_integral": solution.taus["diameter"].integral,
        "max_velocity": comm.allreduce(float(np.abs(velocity).max()), op=MPI.MAX),
        "max_tau": comm.allreduce(float(tau.max()), op=MPI.MAX),
        "num_dofs": solution.flow.num_dofs,
        "ranks": comm.size,
    }
