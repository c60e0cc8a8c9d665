"""A periodic user mesh read from a file takes its period from the boundary spec.

The unstructured hill is written to a .msh file and read back through ``vcnn generate
--mesh file`` with a periodic pair in ``[generate.boundaries]``: the case file must be the one
of the built-in hill (same points, period, volumes, wall distance and tau).
"""

from mpi4py import MPI  # noqa: F401  (initialise MPI before dolfinx)

import numpy as np
import pytest

from meshes.hills import hill_period
from solvers.generate import GenerateConfig, run_generate
from vcnn.casefile import read_case
from vcnn.cli import main as vcnn_main

SIZE = 0.3
ALPHA = 1.0


def by_position(case):
    rounded = np.round(case.points, 9)
    order = np.lexsort((rounded[:, 1], rounded[:, 0]))
    return {
        key: getattr(case, key)[order]
        for key in (
            "points",
            "velocity",
            "tau",
            "strain_rate",
            "wall_distance",
            "nodal_volume",
            "is_wall",
        )
    }


def test_a_hill_read_from_msh_gives_the_built_in_hill_case(tmp_path):
    from meshes.unstructured import unstructured_hill_mesh

    built_in = tmp_path / "built_in"
    summary = run_generate(
        GenerateConfig.from_dict(
            {
                "alphas": [ALPHA],
                "out": str(built_in),
                "plots": False,
                "xdmf": False,
                "mesh": {"kind": "unstructured", "size": SIZE},
            }
        )
    )
    assert summary.all_succeeded
    msh = tmp_path / "hill.msh"
    unstructured_hill_mesh(ALPHA, size=SIZE, msh_path=msh)
    length = hill_period(ALPHA)
    config = tmp_path / "hill.toml"
    config.write_text(
        f"""
[generate]
name = "hill_from_msh"
plots = false
xdmf = false
[generate.mesh]
kind = "file"
file = "{msh}"
[generate.boundaries]
walls = ["bottom", "top"]
periodic = [{{ slave = "right", master = "left", translation = [{-length!r}, 0.0] }}]
"""
    )
    out = tmp_path / "file"
    assert vcnn_main(["generate", "--config", str(config), "--out", str(out)]) == 0
    reference = read_case(built_in / "hill_a1.000.npz")
    case = read_case(out / "hill_from_msh.npz")
    np.testing.assert_array_equal(case.period, [length, 0.0])
    np.testing.assert_array_equal(case.period, reference.period)
    assert case.num_points == reference.num_points
    ours, theirs = by_position(case), by_position(reference)
    np.testing.assert_allclose(ours["points"], theirs["points"], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(ours["is_wall"], theirs["is_wall"])
    # the wall distance sees the periodic images of the walls, as for the built-in hill
    np.testing.assert_allclose(ours["wall_distance"], theirs["wall_distance"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours["nodal_volume"], theirs["nodal_volume"], rtol=1e-10)
    np.testing.assert_allclose(ours["velocity"], theirs["velocity"], rtol=0, atol=1e-8)
    np.testing.assert_allclose(ours["tau"], theirs["tau"], rtol=0, atol=1e-8 * theirs["tau"].max())
    assert case.meta["tau_integral"] == pytest.approx(reference.meta["tau_integral"], rel=1e-9)
