"""Channel-with-cylinder .msh writer and read_mesh (gmsh and meshio files, error cases)."""


import json

import numpy as np
import pytest

from meshes.channel import CHANNEL_BOUNDARIES, CHANNEL_FLUID_TAG, channel_with_cylinder_msh
from meshes.io import read_mesh
from meshes.tagged import MeshError
from tests.mesh_measures import boundary_lengths, mesh_area

LENGTH, HEIGHT, RADIUS = 2.2, 0.41, 0.05


@pytest.fixture(scope="module")
def channel_msh(tmp_path_factory):
    path = tmp_path_factory.mktemp("channel") / "channel.msh"
    return channel_with_cylinder_msh(path, size=0.06)


@pytest.fixture(scope="module")
def channel_arrays(channel_msh):
    """Points, triangles, tagged lines of the channel mesh as plain arrays (via meshio)."""
    import meshio

    data = meshio.read(channel_msh)
    tags = data.cell_data["gmsh:physical"]
    triangles = np.concatenate([b.data for b in data.cells if b.type == "triangle"])
    triangle_tags = np.concatenate([t for b, t in zip(data.cells, tags) if b.type == "triangle"])
    lines = np.concatenate([b.data for b in data.cells if b.type == "line"])
    line_tags = np.concatenate([t for b, t in zip(data.cells, tags) if b.type == "line"])
    return data.points, triangles, triangle_tags, lines, line_tags


def check_channel(tagged, names):
    lengths = boundary_lengths(tagged)
    assert lengths[names["inlet"]] == pytest.approx(HEIGHT, rel=1e-12)
    assert lengths[names["outlet"]] == pytest.approx(HEIGHT, rel=1e-12)
    assert lengths[names["walls"]] == pytest.approx(2 * LENGTH, rel=1e-12)
    assert lengths[names["cylinder"]] == pytest.approx(2 * np.pi * RADIUS, rel=1e-2)
    assert mesh_area(tagged.mesh) == pytest.approx(LENGTH * HEIGHT - np.pi * RADIUS**2, rel=1e-3)
    assert tagged.mesh.geometry.dim == 2
    assert tagged.kind == "file"
    np.testing.assert_array_equal(tagged.period, [0.0, 0.0])
    json.dumps(tagged.info)


def test_channel_msh_round_trip(channel_msh):
    tagged = read_mesh(channel_msh)
    assert tagged.boundaries == CHANNEL_BOUNDARIES
    assert tagged.info["format"] == "gmsh"
    check_channel(tagged, {name: name for name in CHANNEL_BOUNDARIES})
    assert tagged.cell_tags is not None
    assert set(np.unique(tagged.cell_tags.values)) == {CHANNEL_FLUID_TAG}
    assert tagged.facets("cylinder").size > 0


def test_boundaries_override_names(channel_msh):
    tagged = read_mesh(channel_msh, boundaries={"inflow": 1, "obstacle": 4})
    assert tagged.boundaries == {"inflow": 1, "obstacle": 4}
    assert tagged.facets("inflow").size > 0
    with pytest.raises(MeshError, match="inlet"):
        tagged.tag("inlet")


@pytest.mark.parametrize(("suffix", "tag_key"), [(".vtu", "cell_tags"), (".mesh", "medit:ref")])
def test_meshio_formats(tmp_path, channel_arrays, suffix, tag_key):
    import meshio

    points, triangles, triangle_tags, lines, line_tags = channel_arrays
    # An unused extra point must not break the import; lines are listed first on purpose.
    points = np.vstack([points, [[9.0, 9.0, 0.0]]])
    path = tmp_path / f"channel{suffix}"
    meshio.Mesh(
        points, [("line", lines), ("triangle", triangles)], cell_data={tag_key: [line_tags, triangle_tags]}
    ).write(path)

    tagged = read_mesh(path)
    assert tagged.boundaries == {f"boundary_{v}": v for v in CHANNEL_BOUNDARIES.values()}
    check_channel(tagged, {name: f"boundary_{v}" for name, v in CHANNEL_BOUNDARIES.items()})
    assert tagged.info["num_vertices"] == len(points) - 1
    assert tagged.cell_tags is not None

    named = read_mesh(path, boundaries=CHANNEL_BOUNDARIES)
    check_channel(named, {name: name for name in CHANNEL_BOUNDARIES})


def test_meshio_quadrilaterals_are_reordered(tmp_path):
    import meshio

    # 3 x 2 quads on [0, 3] x [0, 2] in VTK (counter-clockwise) order, with a z column of zeros.
    nx, ny = 3, 2
    xs, ys = np.meshgrid(np.arange(nx + 1.0), np.arange(ny + 1.0))
    points = np.column_stack([xs.ravel(), ys.ravel(), np.zeros(xs.size)])
    node = np.arange(xs.size).reshape(ny + 1, nx + 1)
    quads = np.column_stack(
        [node[:-1, :-1].ravel(), node[:-1, 1:].ravel(), node[1:, 1:].ravel(), node[1:, :-1].ravel()]
    )
    bottom = np.column_stack([node[0, :-1], node[0, 1:]])
    left = np.column_stack([node[:-1, 0], node[1:, 0]])
    path = tmp_path / "quads.vtu"
    meshio.Mesh(
        points,
        [("quad", quads), ("line", np.vstack([bottom, left]))],
        cell_data={"gmsh:physical": [np.zeros(len(quads)), np.r_[np.full(nx, 7), np.full(ny, 8)]]},
    ).write(path)

    tagged = read_mesh(path, boundaries={"bottom": 7, "left": 8})
    assert tagged.mesh.topology.cell_name() == "quadrilateral"
    assert tagged.mesh.geometry.dim == 2
    # A wrong vertex order would give twisted cells and a wrong area.
    assert mesh_area(tagged.mesh) == pytest.approx(6.0, rel=1e-12)
    lengths = boundary_lengths(tagged)
    assert lengths == pytest.approx({"bottom": 3.0, "left": 2.0}, rel=1e-12)


def test_missing_file(tmp_path):
    with pytest.raises(MeshError, match="does not exist"):
        read_mesh(tmp_path / "nowhere.msh")


@pytest.mark.parametrize("suffix", [".msh", ".vtu", ".xdmf"])
def test_garbage_file(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_text("this is not a mesh\n1 2 3\n")
    with pytest.raises(MeshError, match="cannot read"):
        read_mesh(path)


def test_msh_without_facet_tags(tmp_path):
    from meshes.unstructured import gmsh_session, write_msh_atomic

    path = tmp_path / "untagged.msh"
    with gmsh_session("untagged") as gmsh:
        surface = gmsh.model.occ.addRectangle(0, 0, 0, 1, 1)
        gmsh.model.occ.synchronize()
        gmsh.model.addPhysicalGroup(2, [surface], 1, name="domain")
        gmsh.option.setNumber("Mesh.MeshSizeMax", 0.5)
        gmsh.model.mesh.generate(2)
        write_msh_atomic(gmsh, path)
    with pytest.raises(MeshError, match="no tagged boundary facets"):
        read_mesh(path)


def test_meshio_file_without_facet_tags(tmp_path, channel_arrays):
    import meshio

    points, triangles, *_ = channel_arrays
    path = tmp_path / "untagged.vtu"
    meshio.Mesh(points, [("triangle", triangles)]).write(path)
    with pytest.raises(MeshError, match="no tagged boundary facets"):
        read_mesh(path)


def test_file_without_domain_cells(tmp_path, channel_arrays):
    import meshio

    points, _, _, lines, line_tags = channel_arrays
    path = tmp_path / "lines_only.vtu"
    meshio.Mesh(points, [("line", lines)], cell_data={"cell_tags": [line_tags]}).write(path)
    with pytest.raises(MeshError, match="no first-order"):
        read_mesh(path)


def test_unknown_boundary_tag(channel_msh):
    with pytest.raises(MeshError, match=r"inflow.*1 \(inlet\)"):
        read_mesh(channel_msh, boundaries={"inflow": 9})


def test_channel_rejects_bad_geometry(tmp_path):
    with pytest.raises(ValueError, match="inside the channel"):
        channel_with_cylinder_msh(tmp_path / "c.msh", center=(0.02, 0.2))
    with pytest.raises(ValueError, match="cylinder_size"):
        channel_with_cylinder_msh(tmp_path / "c.msh", size=0.03, cylinder_size=0.1)
    with pytest.raises(MeshError, match=".msh"):
        channel_with_cylinder_msh(tmp_path / "c.vtu")
    assert not list(tmp_path.iterdir())
