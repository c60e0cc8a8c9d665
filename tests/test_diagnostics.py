from mpi4py import MPI

import math

import numpy as np
import pytest
from dolfinx import fem, mesh

from solvers.diagnostics import evaluate_at_points, flow_reversal, main_recirculation


def test_main_recirculation_drops_flickers_and_wraps():
    # a flicker pair 2.5e-4 long inside the bubble and one near its end are ignored
    separation = [0.4616, 1.48334, 7.51690]
    reattachment = [1.48310, 7.51666, 7.73590]
    assert main_recirculation(separation, reattachment, period=9.0) == (0.4616, 7.7359)
    # a bubble across the periodic seam
    assert main_recirculation([8.0], [1.0], period=9.0) == (8.0, 1.0)
    assert all(math.isnan(x) for x in main_recirculation([], [], period=9.0))


def test_flow_reversal_finds_the_zero_of_the_wall_velocity():
    domain = mesh.create_rectangle(MPI.COMM_WORLD, [[0, 0], [4, 1]], [16, 4])
    V = fem.functionspace(domain, ("Lagrange", 2, (2,)))
    u = fem.Function(V)
    # reversed flow for 1 < x < 3 (quadratic: exact in P2)
    u.interpolate(lambda x: np.stack([(x[0] - 1) * (x[0] - 3), 0 * x[0]]))
    x = np.linspace(0, 4, 401)
    points = np.stack([x, np.zeros_like(x)], axis=1)
    tangents = np.tile([1.0, 0.0], (x.size, 1))
    reversal = flow_reversal(u, points, tangents, offset=1e-3)
    np.testing.assert_allclose(reversal.separation, [1.0], atol=1e-9)
    np.testing.assert_allclose(reversal.reattachment, [3.0], atol=1e-9)
    values = evaluate_at_points(u, np.array([[2.0, 0.5], [9.0, 9.0]]))
    assert values[0, 0] == pytest.approx(-1.0)
    assert np.isnan(values[1]).all()  # outside the mesh
