"""``vcnn generate --dim 3``: 3-D hill cases against the 2-D case of the same section.

One coarse run (alpha = 1, r = 0.1: 20 x 20 cells in-plane, 2 span layers) of the extruded
hill (a = 0) and of a crest-varying hill (a = 0.2), and the 2-D case at r = 0.1.
"""

from mpi4py import MPI  # noqa: F401  (initialise MPI before dolfinx)

import numpy as np
import pytest

from meshes.hills3d import SPAN_LENGTH
from meshes.io import read_xdmf_fields
from solvers.case_setup import MeshConfig, case_jobs, hill_case_name
from solvers.generate import GenerateConfig, run_generate
from solvers.preflight import check_case_size, estimate_cells3d
from vcnn.casefile import read_case
from vcnn.cli import main as vcnn_main
from vcnn.config import ConfigError

RESOLUTION = 0.1
SPAN_CELLS = 2
EXTRUDED = "hill3d_a1.000_crest0.000"
CRESTED = "hill3d_a1.000_crest0.200"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out3d = tmp_path_factory.mktemp("hills3d")
    out2d = tmp_path_factory.mktemp("hills2d")
    config = GenerateConfig.from_dict(
        {
            "alphas": [1.0],
            "dim": 3,
            "crest_amplitudes": [0.0, 0.2],
            "out": str(out3d),
            "mesh": {"resolution": RESOLUTION, "span_cells": SPAN_CELLS},
        }
    )
    summary = run_generate(config)
    assert summary.all_succeeded, summary.table()
    flat = GenerateConfig.from_dict(
        {"alphas": [1.0], "out": str(out2d), "mesh": {"resolution": RESOLUTION},
         "plots": False, "xdmf": False}
    )
    assert run_generate(flat).all_succeeded
    return out3d, read_case(out2d / "hill_a1.000.npz")


def _section(case, z: float) -> np.ndarray:
    """Indices of the points of the layer at ``z``, in the order of (x, y)."""
    (layer,) = np.nonzero(np.abs(case.points[:, 2] - z) < 1e-12)
    rounded = np.round(case.points[layer], 9)  # x = +-1e-17 are the same column
    return layer[np.lexsort((rounded[:, 1], rounded[:, 0]))]


def test_case_names_carry_alpha_and_crest_amplitude():
    assert hill_case_name(1.0, 0.2) == CRESTED
    assert hill_case_name(1.0) == "hill_a1.000"  # 2-D unchanged
    config = GenerateConfig.from_dict(
        {"alphas": [1.0, 1.5], "dim": 3, "crest_amplitudes": [0.0, 0.1, 0.3]}
    )
    jobs = case_jobs(config)
    assert len(jobs) == 6 and len({job.name for job in jobs}) == 6
    assert {(job.alpha, job.crest_amplitude) for job in jobs} == {
        (a, c) for a in (1.0, 1.5) for c in (0.0, 0.1, 0.3)
    }
    assert GenerateConfig.from_dict({"dim": 3}).crest_amplitudes == [0.0]


def test_3d_case_files_and_outputs(runs):
    out, _ = runs
    for name in (EXTRUDED, CRESTED):
        for suffix in (".npz", ".xdmf", ".h5", ".png"):
            assert (out / f"{name}{suffix}").is_file(), name + suffix
    case = read_case(out / f"{CRESTED}.npz")
    # x and z periodic: 20 columns, 21 rows, 2 layers; each point of the domain once
    assert case.dim == 3 and case.num_points == 20 * 21 * SPAN_CELLS
    assert case.points.shape == case.velocity.shape == (case.num_points, 3)
    np.testing.assert_allclose(case.period, [9.0, 0.0, SPAN_LENGTH])
    assert case.points[:, 2].max() < SPAN_LENGTH - 1e-9
    assert case.extra["cells"].shape == (20 * 20 * SPAN_CELLS, 8)
    meta = case.meta
    assert meta["crest_amplitude"] == 0.2 and meta["alpha"] == 1.0
    assert meta["mesh"]["cell_type"] == "hexahedron" and meta["mesh"]["span_cells"] == SPAN_CELLS
    assert np.all(case.tau[case.is_wall] == 0.0) and np.all(case.tau[~case.is_wall] > 0)
    fields = read_xdmf_fields(out / f"{CRESTED}.xdmf")
    assert fields["points"].shape[1] == 3 and fields["cells"].shape[1] == 8
    assert {"velocity", "pressure", "tau", "wall_distance", "nodal_volume"} <= set(fields)
    assert fields["velocity"].shape[1] == 3


def test_extruded_case_sections_are_the_2d_case(runs):
    out, flat = runs
    case = read_case(out / f"{EXTRUDED}.npz")
    rounded = np.round(flat.points, 9)
    order2d = np.lexsort((rounded[:, 1], rounded[:, 0]))
    bulk = case.meta["U_b"]
    for z in np.arange(SPAN_CELLS) * SPAN_LENGTH / SPAN_CELLS:
        layer = _section(case, z)
        np.testing.assert_allclose(case.points[layer, :2], flat.points[order2d], atol=1e-13)
        velocity, reference = case.velocity[layer], flat.velocity[order2d]
        assert np.abs(velocity[:, 2]).max() <= 1e-6 * bulk
        # equal to the Newton tolerance of the flow solves (6e-9 measured)
        difference = np.linalg.norm(velocity[:, :2] - reference) / np.linalg.norm(reference)
        assert difference < 1e-6, difference
        # the wall distance is exact in 3-D too (quadrilateral wall facets split in two)
        np.testing.assert_allclose(
            case.wall_distance[layer], flat.wall_distance[order2d], rtol=0, atol=1e-12
        )
        np.testing.assert_array_equal(case.is_wall[layer], flat.is_wall[order2d])
        # lumped mass of an extruded cell column: the 2-D patch times the layer thickness
        np.testing.assert_allclose(
            case.nodal_volume[layer],
            flat.nodal_volume[order2d] * SPAN_LENGTH / SPAN_CELLS,
            rtol=1e-12,
        )
        # tau differs by the SUPG length (the cell diameter includes the span of 2.25 against
        # about 0.45 in-plane): 8 % here
        tau = np.linalg.norm(case.tau[layer] - flat.tau[order2d]) / np.linalg.norm(flat.tau)
        assert tau < 0.1, tau


def test_crest_varying_case_differs_and_fills_its_mesh(runs):
    import ufl
    from dolfinx import fem

    from meshes.hills3d import structured_hill3d_mesh

    out, _ = runs
    extruded = read_case(out / f"{EXTRUDED}.npz")
    crested = read_case(out / f"{CRESTED}.npz")
    # the same nodes in x and z; the crest varies across the span, and so does the flow
    np.testing.assert_allclose(crested.points[:, [0, 2]], extruded.points[:, [0, 2]])
    change = np.linalg.norm(crested.velocity - extruded.velocity) / np.linalg.norm(
        extruded.velocity
    )
    assert change > 0.01, change
    # crest 1.2 at z = 0, 0.8 at z = L_z / 2: the two layers' flows differ (the extruded
    # hill's are equal); both layers are mirror planes, so u_z vanishes on them
    for case, differs in ((crested, True), (extruded, False)):
        first, second = _section(case, 0.0), _section(case, SPAN_LENGTH / 2)
        between = np.linalg.norm(case.velocity[first] - case.velocity[second])
        assert (between > 0.01 * np.linalg.norm(case.velocity[first])) == differs, between
    tagged = structured_hill3d_mesh(
        1.0, crest_amplitude=0.2, resolution=RESOLUTION, span_cells=SPAN_CELLS, comm=MPI.COMM_SELF
    )
    one = fem.Constant(tagged.mesh, 1.0)
    volume = fem.assemble_scalar(fem.form(one * ufl.dx(domain=tagged.mesh)))
    np.testing.assert_allclose(crested.nodal_volume.sum(), volume, rtol=1e-12)
    # mean of h(z) over the span is 1: the same volume as the extruded hill, up to the
    # piecewise-linear crest of 2 layers
    assert abs(volume / extruded.nodal_volume.sum() - 1.0) < 0.05


def test_3d_cases_are_skipped_when_complete_and_refused_when_settings_differ(runs):
    out, _ = runs
    base = {"alphas": [1.0], "dim": 3, "crest_amplitudes": [0.0], "out": str(out)}
    same = GenerateConfig.from_dict({**base, "mesh": {"resolution": RESOLUTION,
                                                      "span_cells": SPAN_CELLS}})
    assert [case.status for case in run_generate(same).cases] == ["skipped"]
    other = GenerateConfig.from_dict({**base, "mesh": {"resolution": RESOLUTION,
                                                       "span_cells": 3}})
    with pytest.raises(ConfigError, match="span_cells 2 vs 3"):
        run_generate(other)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"crest_amplitudes": [0.1]}, "crest_amplitudes.*--dim 3"),
        ({"dim": 4}, "dim must be 2 or 3"),
        ({"dim": 3, "crest_amplitudes": [0.5]}, r"crest amplitudes must lie in \[0, 0.3\]"),
        ({"dim": 3, "crest_amplitudes": [0.1, 0.1]}, "crest_amplitudes lists 0.1 twice"),
        ({"dim": 3, "mesh": {"cell_type": "triangle"}}, "dim = 3: the structured 3-D hill"),
        ({"dim": 3, "mesh": {"span_cells": 0}}, "span_cells must be a positive"),
    ],
)
def test_3d_settings_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        GenerateConfig.from_dict(values)


def test_coupled_3d_generate_is_the_two_way_pde_simulation(tmp_path):
    # c_k > 0 in 3-D: the flow and tau solved together (Anderson on the closure loop), the same
    # loop as `vcnn simulate --closure pde --coupling two-way`: equal to its tolerance
    flags = ["--dim", "3", "--alphas", "1", "--crest-amplitudes", "0.2", "--resolution", "0.05",
             "--span-cells", "2", "--c-k", "0.14", "--no-xdmf", "--no-plots"]
    assert vcnn_main(["generate", *flags, "--out", str(tmp_path / "generate")]) == 0
    assert vcnn_main(["simulate", "--closure", "pde", "--coupling", "two-way", *flags,
                      "--out", str(tmp_path / "simulate")]) == 0
    name = "hill3d_a1.000_crest0.200.npz"
    generated = read_case(tmp_path / "generate" / name)
    simulated = read_case(tmp_path / "simulate" / name)
    assert generated.meta["physics"]["c_k"] == 0.14
    assert generated.meta["solver"]["coupling_iterations"] > 1

    def relative(a, b):
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    assert relative(generated.tau, simulated.tau) < 1e-6
    assert relative(generated.velocity, simulated.velocity) < 1e-6
    # and the coupling changes the solution: not the one-way case
    one_way = [flag for flag in flags if flag not in ("--c-k", "0.14")]
    assert vcnn_main(["generate", *one_way, "--out", str(tmp_path / "one_way")]) == 0
    assert relative(read_case(tmp_path / "one_way" / name).tau, generated.tau) > 1e-2


def test_span_cells_needs_3d():
    with pytest.raises(ConfigError, match="span_cells .* --dim 3"):
        case_jobs(GenerateConfig.from_dict({"mesh": {"span_cells": 3}}))


def test_3d_size_estimate_and_refusal():
    mesh = MeshConfig(resolution=0.25)
    assert estimate_cells3d(mesh, 1.0) == (50 * 50 * 7, 50)  # default 7 layers at r = 0.25
    assert estimate_cells3d(MeshConfig(resolution=0.1, span_cells=2), 1.0)[0] == 800
    check_case_size(mesh, 1.0, memory=24 << 30, crest_amplitude=0.0)
    with pytest.raises(ConfigError, match="3-D alpha = 1 .*--span-cells"):
        check_case_size(MeshConfig(resolution=1.0), 1.0, memory=24 << 30, crest_amplitude=0.0)
    with pytest.raises(ConfigError, match="raise --size"):
        check_case_size(
            MeshConfig(kind="unstructured", size=0.05), 1.0, memory=24 << 30, crest_amplitude=0.1
        )


def test_cli_generate_3d_flags(tmp_path, capsys):
    out = tmp_path / "cli3d"
    code = vcnn_main(
        ["-q", "generate", "--dim", "3", "--alphas", "1", "--crest-amplitudes", "0.1",
         "--resolution", "0.05", "--span-cells", "2", "--out", str(out), "--no-xdmf",
         "--no-plots"]
    )
    assert code == 0
    case = read_case(out / "hill3d_a1.000_crest0.100.npz")
    assert case.dim == 3 and case.meta["mesh"]["span_cells"] == 2
    assert case.meta["mesh"]["resolution"] == 0.05
    assert "hill3d_a1.000_crest0.100" in capsys.readouterr().out
