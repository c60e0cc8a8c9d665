"""Checks of ``vcnn generate`` runs: case names, existing cases, sizes, figures, interrupts."""

from mpi4py import MPI  # noqa: F401  (initialise MPI before dolfinx)

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from petsc4py import PETSc

from solvers import generate
from solvers.generate import GenerateConfig, MeshConfig, hill_case_name, run_generate
from solvers.preflight import check_case_size, estimate_cells
from vcnn.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
RESOLUTION = 0.05  # 10 x 10 cells at alpha = 1


def _config(out, **values):
    base = {"alphas": [1.0], "out": str(out), "mesh": {"resolution": RESOLUTION},
            "xdmf": False}
    base.update(values)
    return GenerateConfig.from_dict(base)


@pytest.fixture(scope="module")
def one_case(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    summary = run_generate(_config(out))
    assert summary.all_succeeded
    return out


def test_case_names_never_collide_by_rounding():
    assert hill_case_name(1.0) == "hill_a1.000"
    assert hill_case_name(0.75) == "hill_a0.750"
    assert hill_case_name(1.0004) == "hill_a1.0004"
    assert hill_case_name(1 / 3) != hill_case_name(0.333)
    config = GenerateConfig.from_dict({"alphas": [1, 1.0004]})
    assert len({hill_case_name(a) for a in config.alphas}) == 2
    with pytest.raises(ConfigError, match="twice"):
        GenerateConfig.from_dict({"alphas": [1, 1.0]})


def test_a_complete_case_is_skipped_only_when_it_matches_the_run(one_case, tmp_path):
    case = one_case / "hill_a1.000.npz"
    stamp = case.stat().st_mtime_ns
    config_text = (one_case / "config.toml").read_text()
    summary = run_generate(_config(one_case))
    assert [c.status for c in summary.cases] == ["skipped"]
    for values, differs in [
        ({"mesh": {"resolution": 0.1}}, "mesh resolution 0.05 vs 0.1"),
        ({"mesh": {"kind": "unstructured", "size": 0.2}}, "mesh kind 'structured' vs"),
        ({"production": "coupled"}, "physics production"),
        ({"physics": {"zeta": 2.0}}, "physics zeta"),
    ]:
        with pytest.raises(ConfigError, match=f"other settings.*{differs}.*--overwrite"):
            run_generate(_config(one_case, **values))
    assert case.stat().st_mtime_ns == stamp
    assert (one_case / "config.toml").read_text() == config_text  # not rewritten


def test_a_missing_figure_of_a_complete_case_is_drawn_on_rerun(one_case):
    figure = one_case / "hill_a1.000.png"
    stamp = (one_case / "hill_a1.000.npz").stat().st_mtime_ns
    figure.unlink()
    summary = run_generate(_config(one_case))
    assert [c.status for c in summary.cases] == ["skipped"]
    assert figure.stat().st_size > 1000
    assert (one_case / "hill_a1.000.npz").stat().st_mtime_ns == stamp


def test_size_checks_before_meshing():
    structured = MeshConfig(resolution=0.5)
    assert estimate_cells(structured, 2.0) == (200 * 100, 100)
    with pytest.raises(ConfigError, match=r"needs about .* cells, an estimated .* GiB"):
        check_case_size(MeshConfig(resolution=50.0), 20.0, memory=64 << 30)
    with pytest.raises(ConfigError, match="only 2 cell"):
        check_case_size(MeshConfig(resolution=0.01), 1.0)
    with pytest.raises(ConfigError, match="lower --size"):
        check_case_size(MeshConfig(kind="unstructured", size=2.0), 1.0)
    check_case_size(MeshConfig(resolution=1.0), 1.0, memory=24 << 30)  # the published mesh
    for alpha in (1e-6, 1e6):
        with pytest.raises(ConfigError, match="must lie in"):
            GenerateConfig.from_dict({"alphas": [alpha]})


def test_an_interrupt_inside_a_solve_stops_the_run(tmp_path, monkeypatch):
    calls = []

    def interrupted_solve(*args, **kwargs):
        calls.append(1)
        raise PETSc.Error(59)  # what PETSc raises when its signal handler caught a signal

    monkeypatch.setattr(generate, "solve_physics", interrupted_solve)
    with pytest.raises(KeyboardInterrupt):
        run_generate(_config(tmp_path, alphas=[1.0, 1.5]))
    assert calls == [1]  # the second case was not started
    assert not list(tmp_path.glob("*.npz"))


SIGTERM_SCRIPT = """
import os, signal, sys
from solvers import generate
from vcnn.cli import main

def terminated_solve(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    raise AssertionError("SIGTERM did not stop the solve")

generate.solve_physics = terminated_solve
sys.exit(main(["generate", "--alphas", "1", "1.5", "--resolution", "0.05", "--out", sys.argv[1],
               "--no-plots", "--no-xdmf"]))
"""


def test_sigterm_stops_the_run_with_exit_143(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", SIGTERM_SCRIPT, str(out)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 143, result.stderr[-2000:]
    assert "interrupted: complete outputs are kept" in result.stderr
    assert "Traceback" not in result.stderr and "[2/2]" not in result.stderr
    assert not list(out.glob("*.npz"))


@pytest.mark.mpi
@pytest.mark.parametrize("where, code", [("config", 2), ("case", 2)])
def test_a_failure_on_rank_0_only_ends_the_run_on_every_rank(tmp_path, where, code):
    """Rank 0 fails alone (disk full) before a barrier or after a collective solve: no deadlock.

    A full disk ends the run (exit 2, one line naming the file), also in a case's write: it is
    never reported as that case's failure (see vcnn.outputs.is_disk_full).
    """
    mpiexec = Path(sys.executable).with_name("mpiexec")
    script = REPO / "tests" / "mpi_scripts" / "fail_on_root.py"
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    try:
        result = subprocess.run(
            [str(mpiexec), "-n", "2", sys.executable, str(script), where, str(out)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"deadlock: the ranks did not end after rank 0 failed ({where})")
    assert result.returncode == code, result.stderr[-3000:]
    assert f"rank 0 exit {code}" in result.stdout and f"rank 1 exit {code}" in result.stdout
    assert "No space left on device" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(out.glob("*.npz"))


def test_inlet_expressions_are_parsed_not_evaluated(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from solvers.generate import inlet_profile

    tagged = SimpleNamespace(mesh=SimpleNamespace(geometry=SimpleNamespace(dim=2)))
    x = np.array([[0.0, 0.0, 0.0], [0.0, 0.205, 0.41], [0.0, 0.0, 0.0]])
    for components in (["6 * y * (0.41 - y) / 0.41**2", "0"],
                       ["6 * x[1] * (0.41 - x[1]) / 0.41**2", "0 * x[0]"]):
        profile = inlet_profile({"profile": "expression", "components": components}, tagged, 1,
                                where="inlet 'in'")
        np.testing.assert_allclose(profile(x), [[0.0, 1.5, 0.0], [0.0, 0.0, 0.0]], atol=1e-12)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="inlet 'in'.*not allowed"):
        inlet_profile({"profile": "expression",
                       "components": ["__import__('pathlib').Path('pwned').touch()", "0"]},
                      tagged, 1, where="inlet 'in'")
    assert not (tmp_path / "pwned").exists()
