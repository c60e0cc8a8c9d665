"""The XDMF outputs of ``generate`` and ``simulate`` read back in Python (h5py, declared).

dolfinx writes one grid per function, which ``meshio.read`` refuses; ``read_xdmf_fields``
reads them all. Each field read back equals the case file's values at the same points.
"""

from mpi4py import MPI  # noqa: F401  (initialise MPI before dolfinx)

import tomllib
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from meshes.io import read_xdmf_fields
from solvers.generate import GenerateConfig, run_generate
from solvers.simulate import SimulateConfig, run_simulate
from tests.closure_double import LocalEquilibriumClosure
from vcnn.casefile import read_case

REPO = Path(__file__).resolve().parents[1]
RESOLUTION = 0.05


def _at_case_points(fields: dict[str, np.ndarray], points: np.ndarray) -> np.ndarray:
    """Index of the XDMF node at each case point (the XDMF also holds periodic images)."""
    distance, index = cKDTree(fields["points"]).query(points)
    assert distance.max() < 1e-12
    return index


def test_h5py_is_declared_with_meshio():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    (fem,) = [deps for deps in extras.values() if any(d.startswith("meshio") for d in deps)]
    assert any(d.startswith("h5py") for d in fem)


def test_generate_xdmf_reads_back(tmp_path):
    out = tmp_path / "gen"
    config = GenerateConfig.from_dict(
        {"alphas": [1.0], "out": str(out), "plots": False, "mesh": {"resolution": RESOLUTION}})
    assert run_generate(config).all_succeeded
    fields = read_xdmf_fields(out / "hill_a1.000.xdmf")
    case = read_case(out / "hill_a1.000.npz")
    assert set(fields) == {"points", "cells", "velocity", "pressure", "tau", "strain_rate",
                           "wall_distance", "nodal_volume"}
    assert fields["points"].shape[1] == 2 and fields["cells"].shape[1] == 4
    assert fields["cells"].max() == len(fields["points"]) - 1
    index = _at_case_points(fields, case.points)
    for name, values in (("tau", case.tau), ("strain_rate", case.strain_rate),
                         ("wall_distance", case.wall_distance)):
        np.testing.assert_allclose(fields[name][index], values, rtol=1e-10, atol=1e-14,
                                   err_msg=name)
    np.testing.assert_allclose(fields["velocity"][index, :2], case.velocity, rtol=1e-10,
                               atol=1e-14)
    assert np.all(fields["velocity"][:, 2] == 0.0)  # dolfinx pads 2-D vectors


def test_simulate_xdmf_holds_truth_network_a_priori_and_differences(tmp_path):
    out = tmp_path / "sim"
    config = SimulateConfig.from_dict(
        {"alphas": [1.0], "out": str(out), "model": "test double", "coupling": "two-way",
         "compare": True, "plots": False, "mesh": {"resolution": RESOLUTION}})
    assert run_simulate(config, model=LocalEquilibriumClosure({"c_k": 0.15})).all_succeeded
    fields = read_xdmf_fields(out / "hill_a1.000.xdmf")
    case = read_case(out / "hill_a1.000.npz")
    index = _at_case_points(fields, case.points)
    expected = {
        "tau": case.tau,
        "tau_truth": case.extra["tau_truth"],
        "tau_a_priori": case.extra["tau_a_priori"],
        "nu_t": case.extra["nu_t"],
        "nu_t_truth": case.extra["nu_t_truth"],
        "tau_minus_truth": case.tau - case.extra["tau_truth"],
        "tau_a_priori_minus_truth": case.extra["tau_a_priori"] - case.extra["tau_truth"],
    }
    for name, values in expected.items():
        np.testing.assert_allclose(fields[name][index], values, rtol=1e-9,
                                   atol=1e-12 * np.abs(case.tau).max(), err_msg=name)
    # the network in the loop, the truth and the a priori prediction differ: the differences
    # are not trivially zero
    assert np.abs(expected["tau_minus_truth"]).max() > 1e-6 * np.abs(case.tau).max()
    assert np.abs(expected["tau_a_priori_minus_truth"]).max() > 1e-6 * np.abs(case.tau).max()
    for name in ("velocity", "velocity_truth", "pressure", "pressure_truth"):
        assert fields[name].shape[0] == len(fields["points"]), name


def test_a_missing_h5_is_one_clear_error(tmp_path):
    from meshes.tagged import MeshError

    (tmp_path / "a.xdmf").write_text(
        '<?xml version="1.0"?><Xdmf Version="3.0"><Domain><Grid Name="mesh">'
        '<Topology TopologyType="Triangle" NumberOfElements="1" NodesPerElement="3">'
        '<DataItem Dimensions="1 3" NumberType="Int" Format="HDF">a.h5:/Mesh/mesh/topology'
        '</DataItem></Topology><Geometry GeometryType="XY"><DataItem Dimensions="3 2" '
        'Format="XML">0 0 1 0 0 1</DataItem></Geometry></Grid></Domain></Xdmf>')
    with pytest.raises(MeshError, match=r"cannot read .*a\.h5'"):
        read_xdmf_fields(tmp_path / "a.xdmf")
