"""``--flow-from`` in 3-D: VTU, OpenFOAM and case-file sources onto a 3-D user mesh.

The project mesh is the flat 3-D channel of :mod:`tests.mesh3d_files` (tetrahedra, periodic
in x and z, walls at y = 0 and 1). Each source samples a known smooth field, periodic in x
and z and zero on the walls, on a structured grid of n cells per unit length; the
interpolation error at the project's velocity dofs must be small and shrink with the
source's spacing (piecewise-linear: about 4x per halving).
"""

from mpi4py import MPI

import numpy as np
import pytest

from solvers.boundaries import BoundarySpec, PeriodicPair
from solvers.flow_import import FlowImportError, import_flow, load_flow_source
from solvers.flow_sources import FlowSourceError
from tests.mesh3d_files import HEIGHT, LENGTH, SPAN, bump_channel_msh
from vcnn.casefile import read_case
from vcnn.cli import main as vcnn_main


def field(x: np.ndarray) -> np.ndarray:
    """(M, 3) -> (M, 3): periodic in x (L) and z (L_z), zero at y = 0 and y = H."""
    profile = x[:, 1] * (HEIGHT - x[:, 1])
    phase_x = 2 * np.pi * x[:, 0] / LENGTH
    phase_z = 2 * np.pi * x[:, 2] / SPAN
    return np.column_stack([
        profile * (1.0 + 0.3 * np.sin(phase_x) * np.cos(phase_z)),
        0.2 * profile * np.sin(phase_x + phase_z),
        0.1 * profile * np.cos(phase_x),
    ])


@pytest.fixture(scope="module")
def channel(tmp_path_factory):
    from meshes.io import read_mesh

    folder = tmp_path_factory.mktemp("channel3d")
    mesh_file = bump_channel_msh(folder / "flat.msh", bump=0.0, size=0.3)
    tagged = read_mesh(mesh_file, comm=MPI.COMM_WORLD)
    tag = tagged.boundaries
    spec = BoundarySpec(
        walls=(tag["bottom"], tag["top"]),
        periodic=(
            PeriodicPair(tag["right"], tag["left"], (-LENGTH, 0.0, 0.0)),
            PeriodicPair(tag["back"], tag["front"], (0.0, 0.0, -SPAN)),
        ),
    )
    return tagged, spec, mesh_file, folder


def grid(cells_per_unit: int, *, centres: bool):
    """Nodes (or cell centres) and hexahedra of a structured grid of the channel's box."""
    counts = [max(2, round(cells_per_unit * side)) for side in (LENGTH, HEIGHT, SPAN)]
    axes = [np.linspace(0, side, n + 1) for side, n in zip((LENGTH, HEIGHT, SPAN), counts)]
    if centres:
        axes = [0.5 * (a[1:] + a[:-1]) for a in axes]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    nx, ny, nz = (len(a) for a in axes)
    index = np.arange(nx * ny * nz).reshape(nx, ny, nz)
    corners = [index[i : nx - 1 + i, j : ny - 1 + j, k : nz - 1 + k].reshape(-1)
               for i, j, k in ((0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 1, 0),
                               (0, 0, 1), (1, 0, 1), (1, 1, 1), (0, 1, 1))]
    return points, np.stack(corners, axis=1)  # VTK hexahedron order


def import_error(channel, path, **options) -> float:
    """Largest error of the imported velocity at the dofs, relative to the largest speed."""
    tagged, spec, _, _ = channel
    source = load_flow_source(path, **options)
    flow = import_flow(source, tagged.mesh, tagged.facet_tags, spec)
    coordinates = flow.u.function_space.tabulate_dof_coordinates()
    values = flow.u.x.array.reshape(-1, 3)
    exact = field(coordinates)
    return float(np.abs(values - exact).max() / np.abs(exact).max())


def write_vtu(path, cells_per_unit: int):
    import meshio

    points, hexahedra = grid(cells_per_unit, centres=False)
    meshio.Mesh(points, [("hexahedron", hexahedra)], point_data={"U": field(points)}).write(path)
    return path


def test_vtu_point_data_in_3d_converges(channel, tmp_path):
    errors = [import_error(channel, write_vtu(tmp_path / f"u{n}.vtu", n)) for n in (6, 12)]
    assert errors[1] < 0.02, errors  # measured 4.2 % and 1.1 %
    assert errors[1] < errors[0] / 2.5, errors


def write_openfoam(case, cells_per_unit: int):
    """A cell-centred OpenFOAM case: ``1/C`` (cell centres) and ``1/U``, ASCII."""
    centres, _ = grid(cells_per_unit, centres=True)
    (case / "system").mkdir(parents=True)
    (case / "system" / "controlDict").write_text(_foam_header("dictionary", "controlDict"))
    (case / "1").mkdir()
    for name, values in (("C", centres), ("U", field(centres))):
        rows = "\n".join(f"({a:.12g} {b:.12g} {c:.12g})" for a, b, c in values)
        (case / "1" / name).write_text(
            _foam_header("volVectorField", name)
            + f"dimensions [0 1 -1 0 0 0 0];\ninternalField nonuniform List<vector>\n"
            f"{len(values)}\n(\n{rows}\n)\n;\nboundaryField\n{{\n}}\n"
        )
    return case


def _foam_header(kind: str, name: str) -> str:
    return (
        "FoamFile\n{\n    version 2.0;\n    format ascii;\n"
        f"    class {kind};\n    object {name};\n}}\n"
    )


def test_openfoam_cell_centres_in_3d_converge(channel, tmp_path):
    pytest.importorskip("foamlib")
    errors = [
        import_error(channel, write_openfoam(tmp_path / f"case{n}", n)) for n in (6, 12)
    ]
    assert errors[1] < 0.02, errors  # measured 4.8 % and 1.2 %
    assert errors[1] < errors[0] / 2.5, errors


def test_case_file_source_in_3d_and_generate_end_to_end(channel, tmp_path):
    tagged, _, mesh_file, _ = channel
    errors = []
    for n in (6, 12):
        points, _ = grid(n, centres=True)
        np.savez(tmp_path / f"c{n}.npz", points=points, velocity=field(points),
                 period=[LENGTH, 0.0, SPAN])
        errors.append(import_error(channel, tmp_path / f"c{n}.npz"))
    assert errors[1] < 0.02 and errors[1] < errors[0] / 2.5, errors
    # through the command line: tau on the imported 3-D flow, case file and meta
    config = tmp_path / "c.toml"
    config.write_text(
        f'[generate]\nname = "imported"\nplots = false\nxdmf = false\n[generate.mesh]\n'
        f'kind = "file"\nfile = "{mesh_file}"\n[generate.boundaries]\n'
        'walls = ["bottom", "top"]\n'
        'periodic = [{ slave = "right", master = "left" }, { slave = "back", master = "front" }]\n'
    )
    out = tmp_path / "out"
    assert vcnn_main(["-q", "generate", "--config", str(config), "--out", str(out),
                      "--flow-from", str(tmp_path / "c12.npz")]) == 0
    case = read_case(out / "imported.npz")
    assert case.dim == 3 and case.meta["flow_source"]["kind"] == "case"
    exact = field(case.points)
    assert np.abs(case.velocity - exact).max() <= 0.02 * np.abs(exact).max()
    assert (case.tau >= -1e-12).all() and case.tau_integral() > 0


def test_3d_sources_that_do_not_fit_are_refused(channel, tmp_path):
    tagged, spec, _, _ = channel

    def attempt(points, velocity, name, **arrays):
        np.savez(tmp_path / name, points=points, velocity=velocity, **arrays)
        source = load_flow_source(tmp_path / name)
        import_flow(source, tagged.mesh, tagged.facet_tags, spec)

    points, _ = grid(12, centres=True)
    # a 2-D source on the 3-D mesh
    with pytest.raises(FlowImportError, match="is 2-D but the mesh is 3-D"):
        attempt(points[:, :2], field(points)[:, :2], "flat.npz")
    # NaN in the velocity
    bad = field(points)
    bad[5, 2] = np.nan
    with pytest.raises(FlowSourceError, match="NaN or inf at 1 of"):
        attempt(points, bad, "nan.npz")
    # half the span only: most of the mesh is not covered
    half = points[points[:, 2] < 0.5 * SPAN]
    with pytest.raises(FlowImportError, match="cover"):
        attempt(half, field(half), "half.npz")
