"""Reading velocity sources: case files, meshio files, OpenFOAM cases (the shipped hill case)."""

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from solvers.flow_sources import FlowSourceError, cell_centroids, read_flow_source

OPENFOAM_CASE = Path(__file__).parent / "data" / "openfoam_hill"
OPENFOAM_TIME = "341"


def test_case_file_of_cell_centres(tmp_path):
    points = np.array([[0.5, 0.5], [1.5, 0.5], [0.5, 1.5], [1.5, 1.5]])
    velocity = np.column_stack([points[:, 1], -points[:, 0]])
    np.savez(
        tmp_path / "c.npz",
        points=points,
        velocity=velocity,
        period=[2.0, 0.0],
        meta='{"case": "c"}',
    )
    source = read_flow_source(tmp_path / "c.npz")
    assert source.kind == "case" and source.field == "velocity" and source.time is None
    np.testing.assert_array_equal(source.points, points)
    np.testing.assert_array_equal(source.velocity, velocity)
    np.testing.assert_array_equal(source.period, [2.0, 0.0])
    meta = source.to_meta()
    assert meta["num_points"] == 4 and meta["source_case"] == "c" and meta["period"] == [2.0, 0.0]
    # another field by name; a missing one is named in the error with the keys present
    np.savez(tmp_path / "d.npz", points=points, U=velocity)
    assert read_flow_source(tmp_path / "d.npz", field="U").period is None
    with pytest.raises(FlowSourceError, match=r"no velocity field 'velocity'.*\['U', 'points'\]"):
        read_flow_source(tmp_path / "d.npz")


@pytest.mark.parametrize(
    "arrays, message",
    [
        (
            {"points": np.zeros((3, 2)), "velocity": np.array([[0, 0], [np.nan, 0], [0, 0]])},
            "NaN or inf at 1 of 3",
        ),
        ({"points": np.zeros((3, 2)), "velocity": np.zeros(3)}, "must be a vector per point"),
        ({"points": np.zeros((3, 2)), "velocity": np.zeros((3, 4))}, "4 components"),
        (
            {"points": np.zeros((3, 2)), "velocity": np.zeros((3, 2)), "period": [-1.0, 0]},
            "bad period",
        ),
    ],
)
def test_bad_case_file_sources(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(FlowSourceError, match=message):
        read_flow_source(tmp_path / "bad.npz")


def test_missing_and_unreadable_sources(tmp_path):
    with pytest.raises(FlowSourceError, match="does not exist"):
        read_flow_source(tmp_path / "nowhere.vtu")
    (tmp_path / "junk.vtu").write_text("not a mesh")
    with pytest.raises(FlowSourceError, match="meshio cannot read"):
        read_flow_source(tmp_path / "junk.vtu")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FlowSourceError, match="not an OpenFOAM case"):
        read_flow_source(tmp_path / "folder")
    np.savez(tmp_path / "x.npz", points=np.zeros((3, 2)), velocity=np.zeros((3, 2)))
    with pytest.raises(FlowSourceError, match="OpenFOAM cases only"):
        read_flow_source(tmp_path / "x.npz", time="5")


def test_meshio_point_and_cell_data(tmp_path):
    import meshio

    # two quads of a 2 x 1 strip, 2-D data written as VTK does (3 coordinates, 3 components)
    points = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0], [0, 1, 0], [1, 1, 0], [2, 1, 0]], float)
    quads = np.array([[0, 1, 4, 3], [1, 2, 5, 4]])
    point_velocity = np.column_stack([points[:, 1], points[:, 0], np.zeros(6)])
    lines = np.array([[0, 1], [1, 2]])
    mesh = meshio.Mesh(
        points,
        [("quad", quads), ("line", lines)],
        point_data={"U": point_velocity},
        cell_data={
            "velocity": [np.array([[1.0, 2.0, 0.0], [3.0, 4.0, 0.0]]), np.zeros((2, 3))],
            "p": [np.zeros(2), np.zeros(2)],
        },
    )
    mesh.write(tmp_path / "flow.vtu")
    nodal = read_flow_source(tmp_path / "flow.vtu")
    assert nodal.kind == "meshio-points" and nodal.field == "U"
    np.testing.assert_allclose(nodal.points, points)
    np.testing.assert_allclose(nodal.velocity, point_velocity)
    # a cell field: the samples are the centroids of the highest-dimensional cells only
    cells = read_flow_source(tmp_path / "flow.vtu", field="velocity")
    assert cells.kind == "meshio-cells" and cells.details["cell_types"] == ["quad"]
    np.testing.assert_allclose(cells.points, [[0.5, 0.5, 0.0], [1.5, 0.5, 0.0]])
    np.testing.assert_allclose(cells.velocity[:, :2], [[1, 2], [3, 4]])
    with pytest.raises(FlowSourceError, match=r"no velocity field 'W'.*point data \['U'\]"):
        read_flow_source(tmp_path / "flow.vtu", field="W")
    with pytest.raises(FlowSourceError, match="must be a vector"):
        read_flow_source(tmp_path / "flow.vtu", field="p")


def test_cell_centroids_are_exact():
    # a trapezoid (a unit square [0, 2] x [0, 1] and a triangle): the vertex mean (1.25, 0.5)
    # differs from the centroid
    points = np.array([[0.0, 0.0], [3.0, 0.0], [2.0, 1.0], [0.0, 1.0]])
    np.testing.assert_allclose(
        cell_centroids(points, "quad", np.array([[0, 1, 2, 3]])), [[19 / 15, 7 / 15]]
    )
    # a non-convex L-shaped polygon (area 3), clockwise, among ragged polygons
    ell = np.array([[0, 0], [0, 2], [1, 2], [1, 1], [2, 1], [2, 0]], float)
    square = np.array([[5, 5], [6, 5], [6, 6], [5, 6]], float)
    both = np.concatenate([ell, square])
    centres = cell_centroids(both, "polygon", [np.arange(6), np.arange(6, 10)])
    np.testing.assert_allclose(centres, [[5 / 6, 5 / 6], [5.5, 5.5]])
    # the same quad tilted into 3-D keeps its centroid
    rotation = np.array([[1, 0, 0], [0, 0.6, -0.8], [0, 0.8, 0.6]])
    tilted = np.column_stack([points, np.zeros(4)]) @ rotation.T
    np.testing.assert_allclose(
        cell_centroids(tilted, "quad", np.array([[0, 1, 2, 3]])), [rotation @ [19 / 15, 7 / 15, 0]]
    )


# -- OpenFOAM -------------------------------------------------------------------------------


@pytest.fixture
def foamlib():
    return pytest.importorskip("foamlib")


def test_openfoam_case_latest_time(foamlib):
    source = read_flow_source(OPENFOAM_CASE)
    assert source.kind == "openfoam" and source.field == "U" and source.time == OPENFOAM_TIME
    assert source.points.shape == (2976, 3) and source.velocity.shape == (2976, 3)
    assert source.details["cell_centres"] == f"{OPENFOAM_TIME}/C"
    np.testing.assert_allclose(source.period, [9.0, 0.0, 0.0], rtol=1e-12)
    # a 2-D case: one layer of cells, no out-of-plane velocity
    assert np.ptp(source.points[:, 2]) == 0.0 and np.abs(source.velocity[:, 2]).max() < 1e-15
    assert 0 < source.points[:, 0].min() and source.points[:, 0].max() < 9.0
    assert np.abs(source.velocity).max() == pytest.approx(1.39, abs=0.03)


def test_openfoam_centres_from_polymesh_match_writecellcentres(foamlib, tmp_path):
    from solvers.openfoam import cyclic_period, polymesh_cell_centres, read_polymesh

    mesh = read_polymesh(OPENFOAM_CASE / "constant" / "polyMesh")
    written = read_flow_source(OPENFOAM_CASE).points
    # OpenFOAM wrote C with 10 significant digits
    np.testing.assert_allclose(polymesh_cell_centres(mesh), written, rtol=0, atol=2e-9)
    np.testing.assert_allclose(cyclic_period(mesh), [9.0, 0.0, 0.0], rtol=1e-12)
    # without the C file the reader computes the same centres from the mesh
    case = tmp_path / "case"
    shutil.copytree(OPENFOAM_CASE, case)
    (case / OPENFOAM_TIME / "C.gz").unlink()
    source = read_flow_source(case, time=OPENFOAM_TIME)
    assert source.details["cell_centres"] == "constant/polyMesh"
    np.testing.assert_allclose(source.points, written, rtol=0, atol=2e-9)


def test_openfoam_time_selection_and_errors(foamlib, tmp_path):
    initial = read_flow_source(OPENFOAM_CASE, time="0")  # a uniform field: one value per cell
    assert initial.time == "0" and initial.points.shape == (2976, 3)
    np.testing.assert_array_equal(np.unique(initial.velocity, axis=0), [[0.721039, 0.0, 0.0]])
    assert read_flow_source(OPENFOAM_CASE, time="341.0").time == OPENFOAM_TIME
    with pytest.raises(FlowSourceError, match=r"has no time '12'; times: \['0', '341'\]"):
        read_flow_source(OPENFOAM_CASE, time="12")
    with pytest.raises(FlowSourceError, match="'latest' or a number"):
        read_flow_source(OPENFOAM_CASE, time="last")
    with pytest.raises(FlowSourceError, match=r"no velocity field \['W'\]"):
        read_flow_source(OPENFOAM_CASE, time="341", field="W")
    # no mesh and no C: nowhere to take cell centres from
    case = tmp_path / "case"
    shutil.copytree(OPENFOAM_CASE, case)
    shutil.rmtree(case / "constant" / "polyMesh")
    (case / OPENFOAM_TIME / "C.gz").unlink()
    with pytest.raises(FlowSourceError, match="neither cell centres"):
        read_flow_source(case)
    # a velocity with fewer values than cells
    case2 = tmp_path / "case2"
    shutil.copytree(OPENFOAM_CASE, case2)
    text = gzip.decompress((case2 / OPENFOAM_TIME / "U.gz").read_bytes()).decode()
    text = text.replace("\n2976\n(", "\n2975\n(", 1).replace("\n)\n", "\n)\n", 1)
    lines = text.split("\n")
    start = lines.index("2975") + 2
    del lines[start]
    (case2 / OPENFOAM_TIME / "U.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    with pytest.raises(FlowSourceError, match="2975 values but there are 2976 cells"):
        read_flow_source(case2)


# -- refused before anything is opened or computed -------------------------------------------


@pytest.fixture
def no_hang():
    """Fail (SIGALRM) instead of blocking forever on a FIFO that something opened."""
    import signal

    def expired(signum, frame):
        raise TimeoutError("blocked: the FIFO was opened")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name", ["flow.npz", "flow.vtu"])
def test_a_fifo_is_refused_without_opening_it(tmp_path, no_hang, name):
    import os

    from vcnn.inputs import check_regular_input

    os.mkfifo(tmp_path / name)
    with pytest.raises(FlowSourceError, match=r"is a FIFO \(named pipe\), not a regular file"):
        read_flow_source(tmp_path / name)
    # the helper: a folder only where one is allowed, the flag named after the path
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match=r"mesh file '.*folder' \(--mesh-file\) is a folder"):
        check_regular_input(tmp_path / "folder", what="mesh file", flag="--mesh-file",
                            error=ValueError)
    assert check_regular_input(tmp_path / "folder", what="case", allow_dir=True) == (
        tmp_path / "folder"
    )


def test_malformed_vtu_names_the_file(tmp_path):
    import meshio

    points = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], float)
    meshio.Mesh(points, [("triangle", np.array([[0, 1, 2]]))], cell_data={"U": [np.ones((1, 3))]}
                ).write(tmp_path / "good.vtu", binary=False)
    assert read_flow_source(tmp_path / "good.vtu").num_points == 1
    text = (tmp_path / "good.vtu").read_text()
    connectivity = text.index('Name="connectivity"')
    end = text.index("</DataArray>", connectivity)
    body = text[text.index(">", connectivity) + 1 : end]
    (tmp_path / "bad.vtu").write_text(
        text[: end - len(body)] + body.replace("2", "40") + text[end:]
    )
    with pytest.raises(FlowSourceError, match=r"flow source '.*bad.vtu' is malformed \(IndexError"):
        read_flow_source(tmp_path / "bad.vtu")


def test_openfoam_case_never_run_and_malformed_meshes(foamlib, tmp_path):
    never_run = tmp_path / "never_run"
    shutil.copytree(OPENFOAM_CASE, never_run, ignore=shutil.ignore_patterns(OPENFOAM_TIME))
    with pytest.raises(FlowSourceError, match=r"has no solved time: the latest time holding U is 0"):
        read_flow_source(never_run)
    # the initial field when asked for by name (a plug flow, one value per cell)
    assert read_flow_source(never_run, time="0").time == "0"
    # a time directory that holds no U beside the initial one: still not solved
    (never_run / "5").mkdir()
    (never_run / "5" / "p").write_text("")
    with pytest.raises(FlowSourceError, match="no solved time"):
        read_flow_source(never_run)

    boundary = OPENFOAM_CASE / "constant" / "polyMesh" / "boundary"
    edits = {
        "startFace       5966;": ("", r"KeyError: 'startFace'"),
        "neighbourPatch  right;": ("neighbourPatch  rigth;", r"KeyError: 'rigth'"),
    }
    for number, (old, (new, error)) in enumerate(edits.items()):
        case = tmp_path / f"case{number}"
        shutil.copytree(OPENFOAM_CASE, case)
        text = boundary.read_text()
        assert old in text
        (case / "constant" / "polyMesh" / "boundary").write_text(text.replace(old, new))
        with pytest.raises(
            FlowSourceError, match=rf"OpenFOAM mesh '.*case{number}/constant/polyMesh' is "
            rf"malformed \({error}"
        ):
            read_flow_source(case)
    # a face naming a point that does not exist (cell centres computed from the mesh)
    case = tmp_path / "faces"
    shutil.copytree(OPENFOAM_CASE, case)
    (case / OPENFOAM_TIME / "C.gz").unlink()
    faces = case / "constant" / "polyMesh" / "faces.gz"
    text = gzip.decompress(faces.read_bytes()).decode()
    first = text.index("4(")
    text = text[:first] + "4(999999" + text[text.index(" ", first) :]
    faces.write_bytes(gzip.compress(text.encode()))
    with pytest.raises(FlowSourceError, match=r"constant/polyMesh' is malformed \(IndexError"):
        read_flow_source(case)


def test_coverage_counts_the_dofs_near_or_inside_the_samples():
    from solvers.flow_import import VelocityInterpolator

    # cell centres of a 20 x 10 grid on [0, 2] x [0, 1], walls at y = 0 and y = 1
    x, y = np.meshgrid((np.arange(20) + 0.5) / 10, (np.arange(10) + 0.5) / 10)
    centres = np.column_stack([x.ravel(), y.ravel()])
    walls = np.array([[s, w] for s in np.linspace(0, 2, 21) for w in (0.0, 1.0)])
    query = np.random.default_rng(2).uniform([0, 0], [2, 1], size=(2000, 2))

    def covered(samples):
        interpolator = VelocityInterpolator(
            samples, np.ones_like(samples), period=np.zeros(2), origin=np.zeros(2),
            wall_points=walls,
        )
        return interpolator(query).covered

    # the whole domain: the wall layers (outside the centres' hull) are within a spacing
    assert covered(centres).all()
    # the left half only: the right half is not covered, though the wall samples span it
    left = covered(centres[centres[:, 0] < 1.0])
    assert left[query[:, 0] < 0.95].all()
    assert not left[query[:, 0] > 1.2].any()
