"""A user's 3-D gmsh mesh with boundary roles and two periodic pairs, generated end to end.

A channel with a bump (:mod:`tests.mesh3d_files`), periodic in x and z with walls at the
bottom and top, written to ``.msh`` here and solved by ``vcnn generate --mesh-file``: the
dimension comes from the mesh and the pairs' translations from the tagged surfaces. Checks
that do not depend on the discretisation: the flat channel on tetrahedra is laminar
Poiseuille flow (exact in the P2 velocity space), and the bump channel on hexahedra extruded
across the span is the 2-D case of its section, repeated (the velocity to round-off, zero spanwise
velocity; tau up to the SUPG length, which sees the layer thickness).
"""

from mpi4py import MPI  # noqa: F401  (initialise MPI before dolfinx)

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.mesh3d_files import HEIGHT, LENGTH, SPAN, bottom, bump_channel_msh
from vcnn.casefile import read_case
from vcnn.cli import main as vcnn_main

PAIRS_FOUND = """
periodic = [{ slave = "right", master = "left" }, { slave = "back", master = "front" }]
"""


def config(tmp_path, mesh, *, name, dim=3, plots=False, extra=""):
    """A generate TOML for the channel: walls bottom and top, translations left out."""
    periodic = PAIRS_FOUND if dim == 3 else '\nperiodic = [{ slave = "right", master = "left" }]\n'
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'[generate]\nname = "{name}"\nplots = {str(plots).lower()}\nxdmf = '
        f'{str(plots).lower()}\n{extra}[generate.mesh]\nkind = "file"\nfile = "{mesh}"\n'
        f'[generate.boundaries]\nwalls = ["bottom", "top"]{periodic}'
    )
    return path


def generate(tmp_path, mesh, *, name, **more):
    out = tmp_path / f"out_{name}"
    assert vcnn_main(["-q", "generate", "--config", str(config(tmp_path, mesh, name=name, **more)),
                      "--out", str(out)]) == 0
    return read_case(out / f"{name}.npz"), out


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flat3d")
    mesh = bump_channel_msh(folder / "flat.msh", bump=0.0, size=0.3)
    return generate(folder, mesh, name="flat")[0], folder


def test_flat_channel_on_tetrahedra_is_poiseuille_flow(flat):
    case, _ = flat
    assert case.dim == 3 and case.extra["cells"].shape[1] == 4
    # both periods found from the tagged surfaces
    np.testing.assert_allclose(case.period, [LENGTH, 0.0, SPAN], rtol=1e-12)
    bulk, nu = case.meta["U_b"], case.meta["nu"]
    assert case.meta["bulk_velocity_measured"] == pytest.approx(bulk, rel=1e-10)
    y = case.points[:, 1]
    poiseuille = 6.0 * bulk * y * (HEIGHT - y) / HEIGHT**2
    np.testing.assert_allclose(case.velocity[:, 0], poiseuille, rtol=0, atol=1e-8 * bulk)
    np.testing.assert_allclose(case.velocity[:, 1:], 0.0, atol=1e-8 * bulk)
    # the body force that holds the bulk velocity: 12 nu U_b / H^2 along x
    np.testing.assert_allclose(
        case.meta["body_force"], 12.0 * nu * bulk / HEIGHT**2, rtol=1e-8
    )
    np.testing.assert_allclose(case.wall_distance, np.minimum(y, HEIGHT - y), atol=1e-12)
    assert case.nodal_volume.sum() == pytest.approx(LENGTH * HEIGHT * SPAN, rel=1e-12)
    # tau depends on y only: equal at every x and z to the fully developed profile
    assert (case.tau >= 0).all() and case.tau.max() > 0
    rounded = np.round(y, 9)
    for height in np.unique(rounded):
        layer = case.tau[rounded == height]
        assert np.ptp(layer) <= 2e-2 * case.tau.max()


def test_two_ranks_give_the_serial_case(flat):
    """The surfaces' matching and the periodic pairs are collective: 2 ranks = serial."""
    serial, folder = flat
    out = folder / "two_ranks"
    command = [str(Path(sys.executable).with_name("mpiexec")), "-n", "2", sys.executable, "-m",
               "vcnn.cli", "-q", "generate", "--config", str(folder / "flat.toml"), "--out",
               str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    parallel = read_case(out / "flat.npz")
    assert parallel.meta["solver"]["num_processes"] == 2
    np.testing.assert_array_equal(parallel.period, serial.period)

    def by_position(case):
        order = np.lexsort(np.round(case.points, 9).T[::-1])
        return case.points[order], case.velocity[order], case.tau[order]

    (p1, u1, tau1), (p2, u2, tau2) = by_position(serial), by_position(parallel)
    np.testing.assert_allclose(p2, p1, rtol=0, atol=1e-13)
    np.testing.assert_allclose(u2, u1, rtol=0, atol=1e-10)
    np.testing.assert_allclose(tau2, tau1, rtol=0, atol=1e-10 * tau1.max())


@pytest.fixture(scope="module")
def extruded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("extruded3d")
    mesh3 = bump_channel_msh(folder / "bump_hex.msh", hexahedra=True)
    mesh2 = bump_channel_msh(folder / "bump_quad.msh", hexahedra=True, dim=2)
    case3, _ = generate(folder, mesh3, name="bump3d")
    case2, _ = generate(folder, mesh2, name="bump2d", dim=2)
    return case3, case2


def test_extruded_hexahedra_repeat_the_2d_case_of_the_section(extruded):
    case3, case2 = extruded
    assert case3.dim == 3 and case2.dim == 2 and case3.extra["cells"].shape[1] == 8
    np.testing.assert_allclose(case3.period, [LENGTH, 0.0, SPAN], rtol=1e-12)
    bulk = case3.meta["U_b"]
    order2 = np.lexsort(np.round(case2.points, 9).T[::-1])
    z = np.round(case3.points[:, 2], 9)
    layers = np.unique(z)
    assert len(layers) == 3  # three layers of hexahedra, z = L_z is z = 0
    for height in layers:
        (layer,) = np.nonzero(z == height)
        layer = layer[np.lexsort(np.round(case3.points[layer, :2], 9).T[::-1])]
        np.testing.assert_allclose(case3.points[layer, :2], case2.points[order2], atol=1e-12)
        np.testing.assert_allclose(
            case3.velocity[layer, :2], case2.velocity[order2], rtol=0, atol=1e-8 * bulk
        )
        # tau differs by the SUPG length only (the cell diameter includes the layer thickness)
        tau = np.linalg.norm(case3.tau[layer] - case2.tau[order2]) / np.linalg.norm(case2.tau)
        assert tau < 0.03, tau  # 1.3 % measured
        np.testing.assert_allclose(
            case3.wall_distance[layer], case2.wall_distance[order2], rtol=0, atol=1e-10
        )
    # no spanwise velocity, to round-off
    assert np.abs(case3.velocity[:, 2]).max() <= 1e-10 * bulk
    assert case3.tau_integral() == pytest.approx(SPAN * case2.tau_integral(), rel=5e-3)


def test_bump_on_tetrahedra_end_to_end_with_figures(tmp_path):
    mesh = bump_channel_msh(tmp_path / "bump.msh", bump=0.2, size=0.3)
    case, out = generate(tmp_path, mesh, name="bump", plots=True)
    for suffix in (".npz", ".xdmf", ".h5", ".png"):
        assert (out / f"bump{suffix}").is_file(), suffix
    assert "bump" in (out / "summary.md").read_text()
    np.testing.assert_allclose(case.period, [LENGTH, 0.0, SPAN], rtol=1e-12)
    assert case.meta["mesh"]["cell_type"] == "tetrahedron"
    bulk = case.meta["U_b"]
    assert case.meta["bulk_velocity_measured"] == pytest.approx(bulk, rel=1e-10)
    # the domain's volume: (H - mean bottom height) L L_z (the spline bottom to 1e-3)
    volume = (HEIGHT - 0.5 * 0.2) * LENGTH * SPAN
    assert case.nodal_volume.sum() == pytest.approx(volume, rel=1e-3)
    below = case.points[:, 1] < bottom(case.points[:, 0], 0.2) - 1e-3
    assert not below.any()
    # spanwise-invariant geometry: the spanwise velocity is a discretisation error only
    assert np.abs(case.velocity[:, 2]).max() <= 0.05 * bulk
    assert (case.tau >= -1e-12).all() and case.tau_integral() > 0
