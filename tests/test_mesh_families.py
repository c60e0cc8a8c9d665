"""Families of user meshes: mesh lists, globs and gmsh script parameters; run records; walls."""

from mpi4py import MPI

import json
import math
import tomllib

import numpy as np
import pytest

from meshes.hills import hill_period
from solvers.case_setup import (
    MeshConfig,
    boundary_spec,
    build_mesh,
    case_config,
    case_jobs,
    mesh_script,
)
from solvers.diagnostics import (
    evaluate_at_points,
    hill_flow_reversal,
    main_recirculation,
    main_wall_recirculation,
    wall_flow_reversal,
)
from solvers.generate import GenerateConfig
from vcnn.casefile import read_case
from vcnn.cli import main as vcnn_main
from vcnn.config import ConfigError

#: A channel 6 x 1 with a bump of height ``bump_height`` on its bottom wall, 1 < x < 2.
BUMP_GEO = """\
DefineConstant[ bump_height = {0.3, Name "Parameters/bump_height"} ];
lc = 0.1;
Point(1) = {0, 0, 0, lc}; Point(2) = {6, 0, 0, lc}; Point(3) = {6, 1, 0, lc};
Point(4) = {0, 1, 0, lc}; Point(5) = {1.0, 0, 0, lc/2}; Point(6) = {1.5, bump_height, 0, lc/2};
Point(7) = {2.0, 0, 0, lc/2};
Line(1) = {1, 5}; Spline(2) = {5, 6, 7}; Line(3) = {7, 2}; Line(4) = {2, 3};
Line(5) = {3, 4}; Line(6) = {4, 1};
Curve Loop(1) = {1, 2, 3, 4, 5, 6}; Plane Surface(1) = {1};
Physical Curve("bottom") = {1, 2, 3}; Physical Curve("top") = {5};
Physical Curve("inlet") = {6}; Physical Curve("outlet") = {4};
Physical Surface("fluid") = {1};
"""

BOUNDARIES = {
    "walls": ["bottom", "top"],
    "outlets": ["outlet"],
    "inlets": {"inlet": {"profile": "parabolic", "mean_velocity": 1.0}},
}

BOUNDARIES_TOML = """
[generate.boundaries]
walls = ["bottom", "top"]
outlets = ["outlet"]
[generate.boundaries.inlets.inlet]
profile = "parabolic"
mean_velocity = 1.0
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "bump.geo"
    path.write_text(BUMP_GEO)
    return path


def test_mesh_lists_globs_and_parameters_give_one_named_case_each(tmp_path, script):
    for name in ("b.msh", "a.msh"):
        (tmp_path / name).write_text("not read here")
    files = MeshConfig(kind="file", files=[str(tmp_path / "*.msh")])
    assert [p.rsplit("/", 1)[-1] for p in files.files] == ["a.msh", "b.msh"]  # sorted
    config = GenerateConfig(mesh=files, boundaries=BOUNDARIES)
    jobs = case_jobs(config)
    assert [job.name for job in jobs] == ["a", "b"]
    assert all(job.alpha is None and job.mesh.file.endswith(f"{job.name}.msh") for job in jobs)
    assert case_config(config, jobs[1]).mesh.file == jobs[1].mesh.file
    family = MeshConfig(
        kind="file", file=str(script), parameters={"bump_height": [0.1, 0.25], "lc": 2}
    )
    names = [job.name for job in case_jobs(GenerateConfig(mesh=family, boundaries=BOUNDARIES))]
    assert names == ["bump_bump_height0.1_lc2", "bump_bump_height0.25_lc2"]
    refused = [
        ({"kind": "file", "files": [str(tmp_path / "*.vtu")]}, "match no file"),
        ({"kind": "file", "file": str(script), "files": [str(script)]}, "both file and files"),
        ({"kind": "file", "files": [str(tmp_path / "a.msh")], "parameters": {"h": 1}},
         "gmsh scripts"),
        ({"kind": "file", "file": str(script), "parameters": {"h": []}}, "non-empty list"),
        ({"kind": "structured", "parameters": {"h": 1.0}}, "gmsh script"),
    ]
    for values, message in refused:
        with pytest.raises(ConfigError, match=message):
            MeshConfig(**values)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.msh").write_text("")
    twins = MeshConfig(kind="file", files=[str(tmp_path / "a.msh"), str(tmp_path / "sub/a.msh")])
    with pytest.raises(ConfigError, match="two meshes give the case 'a'"):
        case_jobs(GenerateConfig(mesh=twins, boundaries=BOUNDARIES))
    with pytest.raises(ConfigError, match="leave name out"):
        case_jobs(GenerateConfig(mesh=files, boundaries=BOUNDARIES, name="x"))


def test_a_script_parameter_sets_the_geometry(tmp_path, script):
    for height in (0.2, 0.45):
        mesh_script(script, {"bump_height": height}, tmp_path / "bump.msh")
        tagged = build_mesh(MeshConfig(kind="file", file=str(tmp_path / "bump.msh")), None,
                            comm=MPI.COMM_WORLD)
        assert tagged.mesh.geometry.x[:, 1].max() == pytest.approx(1.0)
        bottom = tagged.facet_tags.find(tagged.boundaries["bottom"])
        assert bottom.size > 0
        # the bump's crest is the highest point of the bottom wall
        from dolfinx.mesh import entities_to_geometry

        nodes = entities_to_geometry(tagged.mesh, 1, bottom).reshape(-1)
        assert tagged.mesh.geometry.x[nodes, 1].max() == pytest.approx(height, abs=1e-9)
    with pytest.raises(ConfigError, match="no parameter 'height'.*bump_height"):
        mesh_script(script, {"height": 0.1}, tmp_path / "x.msh")


def _solved_flow(config, job):
    from solvers.problem import ClosureProblem

    tagged = build_mesh(job.mesh, job.alpha, comm=MPI.COMM_WORLD)
    spec = boundary_spec(case_config(config, job), tagged)
    problem = ClosureProblem.from_tagged_mesh(tagged, spec, config.physics)
    return problem, problem.solve_flow()


def test_wall_separation_on_a_hill_matches_the_hill_diagnostic():
    config = GenerateConfig(alphas=[1.0], mesh=MeshConfig(resolution=0.25))
    (job,) = case_jobs(config)
    problem, flow = _solved_flow(config, job)
    with problem:
        walls = wall_flow_reversal(flow.u, problem.facet_tags, problem.spec.walls)
        hill = hill_flow_reversal(flow.u, 1.0)
    expected = main_recirculation(hill.separation, hill.reattachment, period=hill_period(1.0))
    assert len(walls) == 2 and not math.isnan(expected[0])  # bottom and top walls
    separation, reattachment = main_wall_recirculation(walls)
    # the same bubble from the mesh's wall facets as from the analytic hill profile
    assert separation[0] == pytest.approx(expected[0], abs=0.01)
    assert reattachment[0] == pytest.approx(expected[1], abs=0.01)


def test_wall_separation_behind_a_bump_matches_an_independent_sampling(tmp_path, script):
    config = GenerateConfig(
        mesh=MeshConfig(kind="file", file=str(script), parameters={"bump_height": 0.5}),
        boundaries=BOUNDARIES,
    )
    (job,) = case_jobs(config)
    problem, flow = _solved_flow(config, job)
    with problem:
        walls = wall_flow_reversal(flow.u, problem.facet_tags, problem.spec.walls)
        # independently: the sign of u_x just above the flat bottom wall behind the bump
        x = np.linspace(2.05, 5.95, 3901)
        u = evaluate_at_points(flow.u, np.stack([x, np.full_like(x, 2e-3)], axis=1))[:, 0]
    change = np.flatnonzero((u[:-1] < 0) & (u[1:] >= 0))
    assert change.size >= 1
    reattachment_x = x[change[-1]]
    separation, reattachment = main_wall_recirculation(walls)
    assert reattachment[1] == pytest.approx(0.0, abs=1e-9)  # on the flat wall
    assert reattachment[0] == pytest.approx(reattachment_x, abs=0.05)
    assert 1.4 < separation[0] < 2.0 and separation[1] > 0  # on the lee side of the bump
    # the top wall stays attached
    top = [w for w in walls if np.allclose(w.points[:, 1], 1.0)]
    assert len(top) == 1 and top[0].separation.size == 0


def test_generate_a_family_then_more_and_simulate_it_from_the_same_config(tmp_path, script):
    config = tmp_path / "family.toml"
    config.write_text(
        f"""
[generate]
[generate.mesh]
kind = "file"
file = "{script}"
parameters = {{bump_height = [0.2, 0.5]}}
{BOUNDARIES_TOML}"""
    )
    out = tmp_path / "out"
    flags = ["--out", str(out), "--no-xdmf", "--no-plots"]
    assert vcnn_main(["generate", "--config", str(config), *flags]) == 0
    names = ["bump_bump_height0.2", "bump_bump_height0.5"]
    cases = [read_case(out / f"{name}.npz") for name in names]
    assert [c.meta["mesh"]["parameters"] for c in cases] == [
        {"bump_height": 0.2}, {"bump_height": 0.5}
    ]
    # separation reported on the user mesh: behind the higher bump, the flow reverses
    assert cases[1].meta["separation_x"] and cases[1].meta["reattachment_x"]
    assert len(cases[1].meta["separation_points"][0]) == 2
    # a second run into the same folder: two mesh files (a list on the command line)
    for height, name in ((0.3, "low.msh"), (0.4, "high.msh")):
        mesh_script(script, {"bump_height": height}, tmp_path / name)
    second = tmp_path / "files.toml"
    second.write_text("[generate]\n" + BOUNDARIES_TOML)
    assert vcnn_main(["generate", "--config", str(second), "--mesh-file",
                      str(tmp_path / "low.msh"), str(tmp_path / "high.msh"), *flags]) == 0
    assert (out / "low.npz").is_file() and (out / "high.npz").is_file()
    summary = (out / "summary.md").read_text()
    assert summary.count("## vcnn generate") == 2
    assert summary.index("bump_bump_height0.5") < summary.index("| low |")
    runs = sorted((out / "runs").glob("*_generate.toml"))
    assert len(runs) == 2
    latest = tomllib.loads((out / "config.toml").read_text())["generate"]["mesh"]
    assert [p.rsplit("/", 1)[-1] for p in latest["files"]] == ["low.msh", "high.msh"]
    first = tomllib.loads(runs[0].read_text())["generate"]["mesh"]
    assert first["parameters"] == {"bump_height": [0.2, 0.5]}
    # the generate config runs with simulate as it is: the same cases, no unknown keys
    sim = tmp_path / "sim"
    assert vcnn_main(["simulate", "--config", str(config), "--closure", "pde", "--coupling",
                      "one-way", "--out", str(sim), "--no-xdmf", "--no-plots"]) == 0
    entries = json.loads((sim / "metrics.json").read_text())
    assert [e["case"] for e in entries] == names
    assert entries[1]["separation_x"] == pytest.approx(cases[1].meta["separation_x"][0],
                                                       abs=1e-6)
    assert entries[1]["reattachment_x"] > entries[1]["separation_x"]
