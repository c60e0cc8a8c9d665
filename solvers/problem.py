"""One geometry set up once for flow and closure solves: :class:`ClosureProblem`.

Like dolfinx's problem classes, a :class:`ClosureProblem` is built from a tagged mesh, its
boundary roles and the physical constants, and owns everything that does not change while a
case is solved: the P1 space of the closure, its periodic constraint, the wall distance and
mixing length, the nodal volumes, the closure points (:class:`ClosurePoints`: the gather and
scatter structure of the case files) and a :class:`solvers.flow.FlowSolver` whose
Taylor-Hood space, forms, boundary conditions and periodic constraint are built once. Then it

- solves the flow for the current eddy viscosity, warm-started (:meth:`solve_flow`);
- sets the eddy viscosity nu_t = C_k l_m sqrt(max(tau, 0)) from tau at the closure points
  (:meth:`set_eddy_viscosity`);
- gathers the current state at the closure points into a :class:`vcnn.Case` on rank 0
  (:meth:`case`), and writes closure-point values back into P1 Functions: an (N,) array on
  rank 0 in the case's order (:meth:`scatter`) or each rank's owned part
  (:meth:`to_function`).

``vcnn generate``, the PDE-coupled solve and ``vcnn simulate`` all run on it. Free its PETSc
objects with :meth:`close` (or use it as a context manager).
"""

from __future__ import annotations

from mpi4py import MPI

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import dolfinx
import numpy as np
import ufl
from dolfinx import fem

from solvers.boundaries import BoundarySpec, periodic_lengths
from solvers.closure_points import ClosurePoints
from solvers.fields import (
    LumpedProjector,
    mixing_length,
    nodal_volumes,
    strain_rate_expression,
    wall_distance_function,
)
from solvers.flow import FlowSolution, FlowSolver
from solvers.flow_sources import MIN_SAMPLES_PER_MESH_POINT
from vcnn.casefile import Case
from vcnn.physics import Physics

logger = logging.getLogger(__name__)

__all__ = ["NO_WALL_DISTANCE", "ClosureProblem", "periodic_lengths"]

#: Wall distance of a problem without walls: large enough that the mixing length takes its cap.
NO_WALL_DISTANCE = 1e300


class ClosureProblem:
    """A geometry with its spaces, closure points and flow solver, built once.

    Attributes:
        mesh: the mesh.
        facet_tags: its facet markers.
        spec: boundary roles.
        physics: the physical constants (nu, U_b, the tau equation's constants, C_k).
        period: (d,) periodic lengths, 0 where not periodic (stored in the case files).
        V: the scalar P1 space of the closure.
        constraint: the periodic constraint of ``V`` (None when not periodic).
        wall_distance: P1 Function of the exact wall distance.
        volumes: P1 Function of the nodal volumes (periodic copies joined).
        points: the closure points.
        two_way: whether the momentum equation carries nu_t (:attr:`eddy_viscosity`).
        eddy_viscosity: P1 Function of nu_t (zero until :meth:`set_eddy_viscosity`).
        flow_solver: the flow solver (None for a given flow); :attr:`velocity` and
            :attr:`pressure` are its current solution (forms may be built on them: they follow
            the flow; a given flow has no pressure).
        setup_seconds: wall time of the set-up per part (on rank 0).
    """

    def __init__(
        self,
        mesh: dolfinx.mesh.Mesh,
        facet_tags: dolfinx.mesh.MeshTags,
        spec: BoundarySpec,
        physics: Physics,
        *,
        period: np.ndarray | None = None,
        two_way: bool | None = None,
        flow: str = "solve",
        degree: int = 2,
        petsc_options: Mapping[str, object] | None = None,
    ) -> None:
        """Build the spaces, fields, closure points and the flow solver (collective).

        Args:
            mesh: the dolfinx mesh.
            facet_tags: facet markers used by ``spec``.
            spec: walls, inlets, outlets and periodic pairs.
            physics: constants of the flow and the tau equation, and C_k.
            period: (d,) periodic lengths; by default those of the spec's axis-aligned
                periodic pairs (:func:`periodic_lengths`).
            two_way: build the momentum equation with the eddy viscosity; default: when
                ``physics.c_k > 0``.
            flow: ``"solve"`` (a :class:`FlowSolver`) or ``"given"``: the velocity comes from
                elsewhere (another code, :mod:`solvers.flow_import`) through
                :meth:`set_velocity`; no flow solver is built and the coupling is one-way.
            degree: velocity degree of the Taylor-Hood pair.
            petsc_options: overrides of the flow's MUMPS options.
        """
        clock = time.perf_counter()
        self.setup_seconds: dict[str, float] = {}

        def lap(part: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            self.setup_seconds[part] = now - clock
            clock = now

        self.mesh = mesh
        self.facet_tags = facet_tags
        self.spec = spec
        self.physics = physics
        self.comm: MPI.Comm = mesh.comm
        gdim = mesh.geometry.dim
        if period is None or not np.any(np.asarray(period) > 0):
            period = periodic_lengths(spec, gdim)
        self.period = np.asarray(period, dtype=np.float64)
        self.V = fem.functionspace(mesh, ("Lagrange", 1))
        self.constraint = None
        if spec.periodic:
            from solvers.periodic import PeriodicConstraint
            from solvers.transport import dirichlet_dofs

            self.constraint = PeriodicConstraint(
                self.V,
                facet_tags,
                spec.periodic,
                excluded_dofs=dirichlet_dofs(self.V, facet_tags, spec.dirichlet_tags),
            )
        self.points = ClosurePoints(self.V, self.constraint, facet_tags, spec)
        lap("P1 space, periodic map, closure points")

        if spec.walls:
            self.wall_distance = wall_distance_function(
                self.V, facet_tags, spec.walls, period=self.period
            )
        else:
            self.wall_distance = fem.Function(self.V, name="wall_distance")
            self.wall_distance.x.array[:] = NO_WALL_DISTANCE
        self._mixing_length = mixing_length(self.wall_distance.x.array)
        self.volumes = nodal_volumes(self.V, constraint=self.constraint)
        # Static closure-point data, gathered once: a wall-corner copy's patch belongs to the
        # point it stands for.
        self.point_volumes = self.points.add_copies(self.points.values(self.volumes), self.volumes)
        self.point_wall_distance = self.points.values(self.wall_distance)
        self.point_mixing_length = mixing_length(self.point_wall_distance)
        self._gathered_volumes = self.points.gather(self.point_volumes)
        self._gathered_distance = self.points.gather(self.point_wall_distance)
        lap("wall distance, volumes")

        if flow not in ("solve", "given"):
            raise ValueError(f"flow must be 'solve' or 'given', got {flow!r}")
        self.two_way = physics.c_k > 0 if two_way is None else bool(two_way)
        if flow == "given" and self.two_way:
            raise ValueError("a given flow cannot be coupled to tau: two-way needs flow='solve'")
        self.eddy_viscosity = fem.Function(self.V, name="nu_t")
        self._tau_input = fem.Function(self.V, name="tau_input")
        self.flow_solver: FlowSolver | None = None
        if flow == "solve":
            self.flow_solver = FlowSolver(
                mesh,
                facet_tags,
                spec,
                nu=physics.nu,
                bulk_velocity=physics.bulk_velocity,
                nu_t=self.eddy_viscosity if self.two_way else None,
                degree=degree,
                petsc_options=petsc_options,
            )
            self.velocity = self.flow_solver.velocity
            self.pressure = self.flow_solver.pressure
        else:
            space = fem.functionspace(mesh, ("Lagrange", degree, (gdim,)))
            self.velocity = fem.Function(space, name="velocity")
            self.pressure = None
        self._strain_rate = LumpedProjector(
            strain_rate_expression(self.velocity),
            self.V,
            constraint=self.constraint,
            name="strain_rate",
        )
        vector_p1 = fem.functionspace(mesh, ("Lagrange", 1, (gdim,)))
        self._velocity_p1 = fem.Function(vector_p1, name="velocity")
        self._closed = False
        lap("flow solver")

    @classmethod
    def from_tagged_mesh(cls, tagged, spec: BoundarySpec, physics: Physics, **options: Any):
        """Build from a :class:`meshes.tagged.TaggedMesh` (its period, when it has one)."""
        return cls(tagged.mesh, tagged.facet_tags, spec, physics, period=tagged.period, **options)

    def __enter__(self) -> ClosureProblem:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Free the PETSc objects (flow solver, constraints, closure maps); idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.flow_solver is not None:
            self.flow_solver.close()
        self.points.destroy()
        if self.constraint is not None:
            self.constraint.destroy()

    # -- flow ---------------------------------------------------------------------------------

    def reset(self) -> None:
        """Back to the state after set-up: no flow, nu_t = 0; the next flow solve starts cold.

        Two runs on one problem (a network and the PDE truth) each start from rest, so
        neither inherits the other's converged flow as its warm start.
        """
        self.flow_solver.reset()
        self.eddy_viscosity.x.array[:] = 0.0

    def solve_flow(self, **newton_options: Any) -> FlowSolution:
        """Solve the flow for the current eddy viscosity, from the previous flow.

        Args:
            **newton_options: ``rtol``, ``atol``, ``max_iterations`` or ``initial_guess`` of
                :meth:`solvers.flow.FlowSolver.solve`.
        """
        if self.flow_solver is None:
            raise RuntimeError("this problem's flow is given (set_velocity), not solved")
        return self.flow_solver.solve(**newton_options)

    def set_velocity(self, velocity: fem.Function) -> None:
        """Take the velocity from elsewhere (a problem built with ``flow="given"``).

        Args:
            velocity: a vector Function on the mesh (interpolated into :attr:`velocity`;
                exact for the same element, e.g. :func:`solvers.flow_import.import_flow`'s).
        """
        if self.flow_solver is not None:
            raise RuntimeError("this problem solves its flow: build it with flow='given'")
        self.velocity.interpolate(velocity)
        self.velocity.x.scatter_forward()

    def import_flow(
        self,
        source: str | os.PathLike[str],
        *,
        field: str | None = None,
        time: str = "latest",
        min_samples_per_point: float = MIN_SAMPLES_PER_MESH_POINT,
    ):
        """Read a velocity field of another code and take it as this problem's flow.

        The source is interpolated onto the mesh (:func:`solvers.flow_import.import_flow`)
        and set with :meth:`set_velocity` (a problem built with ``flow="given"``).

        Args:
            source: a case file, a meshio-readable file or an OpenFOAM case directory.
            field: the velocity field's name (None: ``U``, then ``velocity``).
            time: OpenFOAM source: ``"latest"`` or a time directory.
            min_samples_per_point: fewest source samples per mesh point.

        Returns:
            The :class:`solvers.flow_import.ImportedFlow` (velocity and its provenance).
        """
        from solvers.flow_import import import_flow, load_flow_source

        loaded = load_flow_source(source, field=field, time=time, comm=self.comm)
        flow = import_flow(
            loaded,
            self.mesh,
            self.facet_tags,
            self.spec,
            min_samples_per_point=min_samples_per_point,
        )
        self.set_velocity(flow.u)
        return flow

    def set_eddy_viscosity(self, tau: np.ndarray) -> float:
        """Set nu_t = C_k l_m sqrt(max(tau, 0)) from tau at the owned closure points.

        Args:
            tau: (n,) float64 tau at the owned closure points.

        Returns:
            The global l2 norm of the change of nu_t over the dofs (collective).
        """
        if not self.two_way:
            raise RuntimeError("this problem was built one-way: its flow has no eddy viscosity")
        self.points.to_function(tau, self._tau_input)
        new = (
            self.physics.c_k
            * self._mixing_length
            * np.sqrt(np.maximum(self._tau_input.x.array, 0.0))
        )
        owned = self.V.dofmap.index_map.size_local
        change = new[:owned] - self.eddy_viscosity.x.array[:owned]
        self.eddy_viscosity.x.array[:] = new
        return float(np.sqrt(self.comm.allreduce(float(change @ change), op=MPI.SUM)))

    def strain_rate(self) -> fem.Function:
        """|S| of the current velocity, lumped-projected onto P1 (a Function reused per call)."""
        return self._strain_rate.project()

    # -- closure points ----------------------------------------------------------------------

    def values(self, function: fem.Function) -> np.ndarray:
        """Values of a P1 Function at the owned closure points, (n,) or (n, b)."""
        return self.points.values(function)

    def to_function(self, local: np.ndarray, function: fem.Function | None = None):
        """Closure-point values into a scalar P1 Function (a new one when None); returns it."""
        if function is None:
            function = fem.Function(self.V)
        self.points.to_function(local, function)
        return function

    def scatter(
        self, values: np.ndarray | None, function: fem.Function | None = None
    ) -> fem.Function:
        """Values of all closure points held by rank 0 into a scalar P1 Function (collective).

        Args:
            values: (N,) float64 in the case's point order on rank 0 (ignored elsewhere), e.g.
                a network's prediction on :meth:`case`.
            function: the Function to write (a new one on :attr:`V` when None).

        Returns:
            The Function, every dof set (periodic copies take their point's value).
        """
        return self.to_function(self.points.distribute(values), function)

    def velocity_values(self) -> np.ndarray:
        """The current velocity at the owned closure points, (n, d) float64.

        Exactly zero at wall points: no slip holds there, and the interpolation would leave
        round-off of ~1e-17 whose direction is noise (a closure input built on the direction
        of u, such as the upstream cosine, would change with the rank count).
        """
        self._velocity_p1.interpolate(self.velocity)
        values = self.points.values(self._velocity_p1)
        values[self.points.local_is_wall] = 0.0
        return values

    def weighted_norm(self, local: np.ndarray) -> float:
        """Discrete L2 norm ``sqrt(sum_i V_i a_i^2)`` over the closure points (collective).

        Args:
            local: (n,) or (n, b) values at the owned closure points.
        """
        squares = np.asarray(local, dtype=np.float64) ** 2
        if squares.ndim > 1:
            squares = squares.sum(axis=1)
        total = float(self.point_volumes @ squares)
        return float(np.sqrt(self.comm.allreduce(total, op=MPI.SUM)))

    def integral(self, function: fem.Function) -> float:
        """The finite-element integral of a Function over the domain (collective)."""
        form = fem.form(function * ufl.dx(domain=self.mesh))
        return float(self.comm.allreduce(fem.assemble_scalar(form), op=MPI.SUM))

    def tau_integral(self, tau: np.ndarray) -> float:
        """Integral of tau by the nodal quadrature, sum_i V_i tau_i (collective)."""
        return float(self.comm.allreduce(float(self.point_volumes @ tau), op=MPI.SUM))

    def case(
        self,
        tau: np.ndarray,
        *,
        name: str,
        meta: dict[str, Any] | None = None,
        extra: Mapping[str, np.ndarray] | None = None,
        velocity: np.ndarray | None = None,
        strain_rate: np.ndarray | None = None,
    ) -> Case | None:
        """The current state at the closure points as a :class:`vcnn.Case` on rank 0.

        Collective: every rank calls it with its owned values.

        Args:
            tau: (n,) float64 tau at the owned closure points.
            name: case name.
            meta: the case's meta (JSON-serialisable).
            extra: more (n, ...) arrays at the owned closure points, stored as extra keys.
            velocity: (n, d) velocity to store instead of the current flow's.
            strain_rate: (n,) |S| to store instead of the current flow's.

        Returns:
            The case on rank 0 (``cells`` included for plots), None on the other ranks.
        """
        if velocity is None:
            velocity = self.velocity_values()
        if strain_rate is None:
            strain_rate = self.values(self.strain_rate())
        gathered = {
            "velocity": self.points.gather(velocity),
            "strain_rate": self.points.gather(strain_rate),
            "tau": self.points.gather(np.asarray(tau, dtype=np.float64)),
        }
        extras = {key: self.points.gather(value) for key, value in (extra or {}).items()}
        if self.comm.rank != 0:
            return None
        return Case(
            points=self.points.points,
            velocity=gathered["velocity"],
            tau=gathered["tau"],
            strain_rate=gathered["strain_rate"],
            wall_distance=self._gathered_distance,
            nodal_volume=self._gathered_volumes,
            is_wall=self.points.is_wall,
            period=self.period,
            meta=dict(meta or {}),
            extra={"cells": self.points.cells, **extras},
            name=name,
        )
