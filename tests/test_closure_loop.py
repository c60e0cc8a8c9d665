"""The problem set-up built once, the closure interface and the one-way/two-way loop."""

from mpi4py import MPI

import numpy as np
import pytest
from dolfinx import fem
from petsc4py import PETSc

from meshes.structured import structured_hill_mesh
from solvers.boundaries import hill_boundary_spec
from solvers.closure_loop import (
    CoupledDivergedError,
    OuterOptions,
    solve_one_way,
    solve_two_way,
)
from solvers.closures import ClosureError, NetworkClosure, PdeClosure, resolve_physics
from solvers.problem import ClosureProblem
from tests.closure_double import LocalEquilibriumClosure
from tests.reference_coupled import reference_coupled
from vcnn.physics import Physics, PhysicsMismatchError

COMM = MPI.COMM_WORLD
RESOLUTION = 0.1  # 20 x 20 cells at alpha = 1


@pytest.fixture(scope="module")
def hill():
    tagged = structured_hill_mesh(1.0, resolution=RESOLUTION, comm=COMM)
    return tagged, hill_boundary_spec(tagged.boundaries, tagged.period)


def _relative(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_closure_points_round_trip(hill):
    tagged, spec = hill
    with ClosureProblem.from_tagged_mesh(tagged, spec, Physics()) as problem:
        points = problem.points
        assert points.num_points == 21 * 20  # each point of the periodic domain once
        x = problem.V.tabulate_dof_coordinates()[:, 0]
        function = fem.Function(problem.V)
        function.x.array[:] = np.cos(2 * np.pi * x / tagged.period[0])  # periodic field
        local = problem.values(function)
        # values -> P1 Function reproduces the field at every dof, slaves and ghosts included
        back = problem.to_function(local)
        np.testing.assert_allclose(back.x.array, function.x.array, atol=1e-12)
        gathered = points.gather(local)
        np.testing.assert_array_equal(points.distribute(gathered), local)
        scattered = problem.scatter(gathered)  # (N,) on rank 0, case order -> P1 Function
        np.testing.assert_allclose(scattered.x.array, function.x.array, atol=1e-12)
        case = problem.case(local, name="probe")
        if COMM.rank == 0:
            np.testing.assert_allclose(case.tau, np.cos(2 * np.pi * case.points[:, 0] / 9.0),
                                       atol=1e-12)
            assert case.nodal_volume.sum() == pytest.approx(
                problem.integral(fem.Constant(problem.mesh, 1.0)), rel=1e-12
            )


@pytest.mark.parametrize("production, c_k", [("frozen", 0.15), ("coupled", 0.04)])
def test_two_way_with_the_pde_reproduces_the_reference_coupled_solve(hill, production, c_k):
    tagged, spec = hill
    physics = Physics(production=production, c_k=c_k)
    reference_tau, reference_force, reference_iterations = reference_coupled(
        tagged.mesh, tagged.facet_tags, spec, physics
    )
    options = {"tol": 1e-9, "negative_tolerance": None}
    with (
        ClosureProblem.from_tagged_mesh(tagged, spec, physics) as problem,
        PdeClosure(problem) as closure,
    ):
        for method in ("picard", "anderson"):
            problem.reset()
            result = solve_two_way(problem, closure, OuterOptions(method=method, **options))
            assert result.converged and result.method == method
            tau = problem.to_function(result.tau)
            assert _relative(tau.x.array, reference_tau.x.array) < 1e-6, method
            assert result.flow.body_force == pytest.approx(reference_force, rel=1e-7)
            if method == "picard":
                # the same relaxed Picard iteration: as many flow solves, give or take one
                assert abs(result.evaluations - reference_iterations) <= 1
            else:
                assert result.evaluations < 0.75 * reference_iterations


def test_options_and_petsc_objects_are_released(hill):
    tagged, spec = hill
    before = PETSc.Options().getAll()
    physics = Physics(c_k=0.15)
    with (
        ClosureProblem.from_tagged_mesh(tagged, spec, physics) as problem,
        PdeClosure(problem) as closure,
    ):
        solve_two_way(problem, closure, OuterOptions(method="anderson", tol=1e-6))
        problem.reset()
        solve_two_way(problem, closure, OuterOptions(method="picard", tol=1e-6))
    assert PETSc.Options().getAll() == before


def test_one_way_network_is_the_models_prediction_on_the_gathered_state(hill):
    tagged, spec = hill
    model = LocalEquilibriumClosure()
    with ClosureProblem.from_tagged_mesh(tagged, spec, Physics()) as problem:
        network = NetworkClosure(model, COMM)
        result = solve_one_way(problem, network)
        case = problem.case(result.tau, name="one-way")
        if COMM.rank == 0:
            np.testing.assert_allclose(case.tau, model.predict(case), rtol=1e-12, atol=1e-14)
            assert result.out_of_range_fraction == 0.0


def test_two_way_network_converges_with_few_flow_solves(hill):
    tagged, spec = hill
    model = LocalEquilibriumClosure({"c_k": 0.15})
    physics = Physics(c_k=0.15)
    with ClosureProblem.from_tagged_mesh(tagged, spec, physics) as problem:
        network = NetworkClosure(model, COMM)
        result = solve_two_way(problem, network, OuterOptions(tol=1e-8))
        assert result.converged and result.evaluations <= 12
        assert result.history[-1].change <= 1e-8
        # a fixed point: nu_t of the final tau gives the final flow back
        problem.set_eddy_viscosity(result.tau)
        again = problem.solve_flow(rtol=1e-12)
        assert again.body_force == pytest.approx(result.flow.body_force, rel=1e-6)


@pytest.mark.parametrize(
    "model, options, message",
    [
        (LocalEquilibriumClosure({"c_k": 0.15}, nan_from_call=3), {}, "NaN or inf tau"),
        (LocalEquilibriumClosure({"c_k": 0.15}, negative_from_call=2), {},
         "negative where it feeds nu_t"),
        (LocalEquilibriumClosure({"c_k": 0.15}, growing=1e-4), {"method": "picard"},
         "grew beyond"),
        (LocalEquilibriumClosure({"c_k": 0.15}), {"max_iterations": 2}, "in 2 evaluations"),
    ],
)
def test_failures_stop_with_a_clear_error_and_keep_the_last_state(hill, model, options, message):
    tagged, spec = hill
    with ClosureProblem.from_tagged_mesh(tagged, spec, Physics(c_k=0.15)) as problem:
        network = NetworkClosure(model, COMM)
        with pytest.raises(CoupledDivergedError, match=message) as info:
            solve_two_way(problem, network, OuterOptions(**options))
        error = info.value
        assert error.steps, "the evaluations that ran are reported"
        assert error.tau is not None and error.tau.shape == (problem.points.local_dofs.size,)
        if "NaN" in message:
            assert isinstance(error.__cause__, ClosureError)
            assert np.all(np.isfinite(error.tau))  # the last usable tau, not the NaN one
        # the problem keeps the last flow: the state can be written as a case
        assert problem.case(error.tau, name="last") is not None or COMM.rank != 0


def test_anderson_falls_back_to_picard_when_its_change_grows(hill):
    tagged, spec = hill
    model = LocalEquilibriumClosure({"c_k": 0.15}, growing=1e-4)
    with ClosureProblem.from_tagged_mesh(tagged, spec, Physics(c_k=0.15)) as problem:
        network = NetworkClosure(model, COMM)
        with pytest.raises(CoupledDivergedError, match="anderson then picard"):
            solve_two_way(problem, network, OuterOptions(max_iterations=20))


def test_physics_defaults_to_the_closure_and_mismatches_are_named():
    record = {**Physics(c_k=0.15, production="coupled").to_dict(), "eps": 0.2, "dimension": 2}
    resolved = resolve_physics({}, record, dimension=2, coupling="two-way")
    assert resolved.physics.c_k == 0.15 and resolved.physics.production == "coupled"
    assert resolved.eps == 0.2 and not resolved.mismatches
    asked = {"c_k": 0.3, "zeta": 2.0, "production": "coupled", "eps": 0.2}
    with pytest.raises(PhysicsMismatchError) as info:
        resolve_physics(asked, record, dimension=2, coupling="two-way")
    text = str(info.value)
    assert "c_k: 0.15 (closure) vs 0.3 (requested)" in text
    assert "zeta: 3.0 (closure) vs 2.0 (requested)" in text
    assert "production" not in text and "--allow-physics-mismatch" in text
    allowed = resolve_physics(asked, record, dimension=2, coupling="two-way",
                              allow_mismatch=True)
    assert allowed.physics.c_k == 0.3 and allowed.physics.zeta == 2.0
    assert len(allowed.mismatches) == 2
    # one-way: the flow does not see tau, so C_k is neither compared nor used
    one_way = resolve_physics({"c_k": 0.3}, record, dimension=2, coupling="one-way")
    assert one_way.physics.c_k == 0.0
    with pytest.raises(PhysicsMismatchError, match="trained in 2-D, the mesh is 3-D"):
        resolve_physics({}, record, dimension=3, coupling="two-way", allow_mismatch=True)
    pde = resolve_physics({"c_k": 0.1}, None, dimension=2, coupling="two-way")
    assert pde.physics == Physics(c_k=0.1) and pde.eps is None


def test_flow_solver_is_set_up_once_and_warm_started(hill):
    from solvers.flow import FlowSolver, solve_flow

    tagged, spec = hill
    before = PETSc.Options().getAll()
    V = fem.functionspace(tagged.mesh, ("Lagrange", 1))
    nu_t = fem.Function(V)
    nu_t.x.array[:] = 0.002
    with FlowSolver(tagged.mesh, tagged.facet_tags, spec, nu_t=nu_t) as solver:
        first = solver.solve()
        assert first.newton_iterations >= 4
        nu_t.x.array[:] = 0.0021  # a small change of nu_t, as late in a coupled loop
        warm = solver.solve(rtol=1e-12, reuse_factorization=True)
        assert warm.newton_iterations <= 6 and warm.factorizations <= 1
        assert first.u.x.array is not warm.u.x.array  # solutions are copies
    fresh = solve_flow(tagged.mesh, tagged.facet_tags, spec, nu_t=nu_t)
    assert warm.body_force == pytest.approx(fresh.body_force, rel=1e-9)
    np.testing.assert_allclose(warm.u.x.array, fresh.u.x.array, atol=1e-8)  # fresh: rtol 1e-10
    assert PETSc.Options().getAll() == before
