"""End-to-end dataset generation: case files, skipping, failures, user meshes, MPI agreement."""

from mpi4py import MPI  # noqa: F401  (initialise MPI before dolfinx)

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from meshes.hills import TOP_WALL_HEIGHT, hill_period, hill_profile
from solvers import generate
from solvers.generate import GenerateConfig, run_generate
from vcnn.casefile import read_case
from vcnn.cli import main as vcnn_main

RESOLUTION = 0.1  # 20 x 20 cells at alpha = 1


def hill_area(alpha):
    x = np.linspace(0, hill_period(alpha), 20001)
    return np.trapezoid(TOP_WALL_HEIGHT - hill_profile(x, alpha), x)


@pytest.fixture(scope="module")
def hill_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hills")
    config = GenerateConfig.from_dict(
        {"alphas": [1.0], "out": str(out), "mesh": {"resolution": RESOLUTION}}
    )
    return run_generate(config), out


def test_hill_case_file_contract(hill_run):
    summary, out = hill_run
    assert summary.all_succeeded
    case = read_case(out / "hill_a1.000.npz")
    meta = case.meta
    assert meta["alpha"] == 1.0 and meta["production"] == "frozen"
    assert meta["mesh"]["kind"] == "structured"
    assert meta["bulk_velocity_measured"] == pytest.approx(0.721039, rel=1e-8)
    assert "dolfinx-solver-real" in meta["versions"]
    # each point of the periodic domain stored once: no point at x = L
    length = hill_period(1.0)
    np.testing.assert_array_equal(case.period, [length, 0.0])
    assert case.points[:, 0].max() < length - 1e-9
    assert case.num_points == 21 * 20
    # nodal volumes are a quadrature of the domain: they sum to its area
    assert case.nodal_volume.sum() == pytest.approx(hill_area(1.0), rel=1e-3)
    assert case.tau_integral() == pytest.approx(meta["tau_integral"], rel=0.02)
    # walls: tau = 0 and zero velocity there; positive tau inside
    assert np.all(case.tau[case.is_wall] == 0.0)
    np.testing.assert_allclose(case.velocity[case.is_wall], 0.0, atol=1e-12)
    assert np.all(case.tau[~case.is_wall] > 0)
    assert np.all(case.wall_distance[case.is_wall] < 1e-12)
    assert case.is_wall.sum() == 2 * 20
    cells = case.extra["cells"]
    assert cells.shape == (400, 4) and cells.max() == case.num_points - 1
    for name in ("config.toml", "summary.md", "hill_a1.000.png", "hill_a1.000.xdmf"):
        assert (out / name).is_file(), name


def test_complete_cases_are_skipped_and_failures_reported(hill_run, monkeypatch):
    summary, out = hill_run
    stamp = (out / "hill_a1.000.npz").stat().st_mtime_ns
    real_build = generate.build_mesh

    def flaky_build(mesh_config, alpha, *, comm, **options):
        if alpha == 1.5:
            raise RuntimeError("mesh generator crashed")
        return real_build(mesh_config, alpha, comm=comm, **options)

    monkeypatch.setattr(generate, "build_mesh", flaky_build)
    config = GenerateConfig.from_dict(
        {"alphas": [1.0, 1.5, 0.8], "out": str(out), "mesh": {"resolution": RESOLUTION},
         "plots": False, "xdmf": False}
    )
    summary = run_generate(config)
    statuses = {case.name: case.status for case in summary.cases}
    assert statuses == {"hill_a1.000": "skipped", "hill_a1.500": "failed", "hill_a0.800": "written"}
    assert "mesh generator crashed" in summary.cases[1].error
    assert not summary.all_succeeded
    assert (out / "hill_a1.000.npz").stat().st_mtime_ns == stamp
    assert not (out / "hill_a1.500.npz").exists()
    assert read_case(out / "hill_a0.800.npz").meta["alpha"] == 0.8


@pytest.mark.parametrize(
    "values, message",
    [
        ({"alphas": [0.0]}, "positive"),
        ({"alphas": [-1.0, 1.0]}, "positive"),
        ({"production": "fancy"}, "production"),
        ({"alpah": [1.0]}, "alpah"),
        ({"mesh": {"kind": "file"}}, "mesh.file"),
        ({"mesh": {"kind": "file", "file": "x.msh"}}, "'x.msh'.*does not exist"),
        ({"mesh": {"kind": "file", "file": __file__}}, "boundaries"),
    ],
)
def test_bad_configs(values, message):
    with pytest.raises(ValueError, match=message):
        GenerateConfig.from_dict(values)


def test_cli_on_a_user_mesh(tmp_path):
    from meshes.channel import channel_with_cylinder_msh

    msh = channel_with_cylinder_msh(tmp_path / "channel.msh", size=0.06)
    config = tmp_path / "channel.toml"
    config.write_text(
        f"""
[generate]
name = "channel"
[generate.mesh]
kind = "file"
file = "{msh}"
[generate.boundaries]
walls = ["walls", "cylinder"]
outlets = ["outlet"]
[generate.boundaries.inlets.inlet]
profile = "parabolic"
mean_velocity = 1.0
"""
    )
    out = tmp_path / "out"
    assert vcnn_main(["generate", "--config", str(config), "--out", str(out), "--no-xdmf"]) == 0
    case = read_case(out / "channel.npz")
    assert case.period.tolist() == [0.0, 0.0]
    inlet = case.points[:, 0] < 1e-12
    # the parabolic inlet profile has the requested mean: integrate over the inlet height
    y = case.points[inlet, 1]
    order = np.argsort(y)
    mean = np.trapezoid(case.velocity[inlet, 0][order], y[order]) / 0.41
    assert mean == pytest.approx(1.0, rel=0.02)
    assert case.tau[inlet].max() == 0.0 and case.tau.max() > 0
    # a boundary the mesh does not have is a clear error, exit code 2, nothing written
    bad = tmp_path / "bad.toml"
    bad.write_text(config.read_text().replace('outlets = ["outlet"]', 'outlets = ["exit"]'))
    assert vcnn_main(["generate", "--config", str(bad), "--out", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "b").exists()


@pytest.mark.mpi
def test_serial_and_two_ranks_agree(tmp_path, hill_run):
    _, serial_out = hill_run
    mpiexec = Path(sys.executable).with_name("mpiexec")
    out = tmp_path / "mpi"
    command = [str(mpiexec), "-n", "2", sys.executable, "-m", "vcnn.cli", "generate", "--alphas",
               "1.0", "--resolution", str(RESOLUTION), "--out", str(out), "--no-plots", "--no-xdmf"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    serial = read_case(serial_out / "hill_a1.000.npz")
    parallel = read_case(out / "hill_a1.000.npz")
    assert parallel.meta["solver"]["num_processes"] == 2
    assert parallel.meta["tau_integral"] == pytest.approx(serial.meta["tau_integral"], rel=1e-8)
    assert parallel.meta["body_force"] == pytest.approx(serial.meta["body_force"], rel=1e-8)

    def by_position(case):
        order = np.lexsort((case.points[:, 1], case.points[:, 0]))
        return case.points[order], case.tau[order], case.velocity[order], case.nodal_volume[order]

    for a, b in zip(by_position(serial), by_position(parallel), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9)
    assert json.loads(json.dumps(parallel.meta))  # meta stays JSON
