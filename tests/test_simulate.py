"""``vcnn simulate``: outputs, metrics, the one inference path, errors, MPI agreement."""

from mpi4py import MPI

import dataclasses
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from petsc4py import PETSc

from solvers.simulate import SimulateConfig, run_simulate
from solvers.simulate_metrics import METRIC_KEYS
from tests.closure_double import LocalEquilibriumClosure
from vcnn import load_closure
from vcnn.casefile import read_case
from vcnn.cli import main as vcnn_main
from vcnn.physics import PhysicsMismatchError

COMM = MPI.COMM_WORLD
RESOLUTION = 0.1
MPIEXEC = Path(sys.executable).with_name("mpiexec")


@pytest.fixture(scope="module")
def coupled_model(tmp_path_factory):
    """A tiny closure trained for a few epochs on three coarse two-way coupled hill cases."""
    from solvers.generate import GenerateConfig, run_generate
    from vcnn.training import TrainConfig, train

    folder = tmp_path_factory.mktemp("coupled_model")
    cases = GenerateConfig.from_dict(
        {"alphas": [0.9, 1.0, 1.2], "out": str(folder / "cases"), "c_k": 0.15,
         "plots": False, "xdmf": False, "mesh": {"resolution": RESOLUTION}}
    )
    assert run_generate(cases).all_succeeded
    train(TrainConfig.from_dict(
        {"data": str(folder / "cases"), "out": str(folder / "run"),
         "validation_alphas": [1.0], "epochs": 4, "batch_size": 64, "cloud_size": 32,
         "learning_rate": 3e-3, "device": "cpu", "num_threads": 1, "ema_decay": 0.0,
         "model": {"embedding": [8, 16], "fitting": [32]}}
    ))
    return folder / "run" / "best.pt"


def _config(out, **values):
    base = {"alphas": [1.0], "out": str(out), "model": "test double",
            "mesh": {"resolution": RESOLUTION}}
    return SimulateConfig.from_dict({**base, **values})


@pytest.fixture(scope="module")
def two_way_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_way")
    options_before = PETSc.Options().getAll()
    summary = run_simulate(
        _config(out, coupling="two-way", compare=True),
        model=LocalEquilibriumClosure({"c_k": 0.15}),
    )
    return summary, out, options_before


def test_two_way_outputs_and_metrics(two_way_run):
    summary, out, options_before = two_way_run
    assert summary.all_succeeded
    assert PETSc.Options().getAll() == options_before
    for name in ("config.toml", "metrics.json", "summary.md", "hill_a1.000.npz",
                 "hill_a1.000.xdmf", "hill_a1.000.png"):
        assert (out / name).is_file(), name
    (entry,) = json.loads((out / "metrics.json").read_text())
    assert set(METRIC_KEYS) <= set(entry)
    assert entry["converged"] and entry["outer"] == "anderson" and entry["error"] is None
    assert 3 <= entry["iterations"] <= 15 and entry["truth_iterations"] <= 15
    for key in ("tau_rel_l2_percent", "a_priori_tau_rel_l2_percent", "velocity_rel_l2_percent",
                "tau_integral_rel_error", "body_force_rel_error", "reattachment_x_error",
                "wall_seconds", "truth_wall_seconds"):
        assert isinstance(entry[key], float) and np.isfinite(entry[key]), key
    case = read_case(out / "hill_a1.000.npz")
    for key in ("tau_truth", "velocity_truth", "strain_rate_truth", "nu_t_truth",
                "tau_a_priori", "nu_t", "cells"):
        assert key in case.extra, key
    # the metrics are those of the stored fields
    error = np.linalg.norm(case.tau - case.extra["tau_truth"]) / np.linalg.norm(
        case.extra["tau_truth"])
    assert 100 * error == pytest.approx(entry["tau_rel_l2_percent"], rel=1e-9)
    prior = np.linalg.norm(case.extra["tau_a_priori"] - case.extra["tau_truth"]) / np.linalg.norm(
        case.extra["tau_truth"])
    assert 100 * prior == pytest.approx(entry["a_priori_tau_rel_l2_percent"], rel=1e-9)
    # the network in the loop differs from the truth: the a posteriori flow is not the truth's
    assert entry["velocity_rel_l2_percent"] > 0.1
    assert case.meta["simulate"]["converged"] and case.meta["physics"]["c_k"] == 0.15
    resolved = tomllib.loads((out / "config.toml").read_text())["simulate"]
    assert resolved["c_k"] == 0.15 and resolved["physics"]["eps"] == 0.2


def test_one_way_tau_is_the_models_predict_on_the_written_flow(tmp_path):
    model = LocalEquilibriumClosure()
    summary = run_simulate(_config(tmp_path, coupling="one-way", compare=True, xdmf=False),
                           model=model)
    assert summary.all_succeeded
    case = read_case(tmp_path / "hill_a1.000.npz")
    case.tau = np.zeros_like(case.tau)  # predict must not read it
    prediction = model.predict(case)
    stored = read_case(tmp_path / "hill_a1.000.npz").tau
    np.testing.assert_allclose(stored, prediction, rtol=1e-6, atol=1e-6 * np.abs(stored).max())
    (entry,) = summary.entries
    assert entry["iterations"] == 1 and entry["velocity_rel_l2_percent"] == 0.0
    assert entry["tau_rel_l2_percent"] == pytest.approx(entry["a_priori_tau_rel_l2_percent"])


def test_mismatched_physics_is_refused_before_any_solve(tmp_path):
    model = LocalEquilibriumClosure({"c_k": 0.15})
    with pytest.raises(PhysicsMismatchError, match=r"c_k: 0.15 \(closure\) vs 0.3 \(requested\)"):
        run_simulate(_config(tmp_path, c_k=0.3), model=model)
    assert not list(tmp_path.glob("*.npz"))
    with pytest.raises(ValueError, match="C_k > 0"):
        run_simulate(_config(tmp_path), model=LocalEquilibriumClosure())


def test_nan_from_the_model_fails_the_case_and_keeps_the_last_state(tmp_path):
    model = LocalEquilibriumClosure({"c_k": 0.15}, nan_from_call=3)
    summary = run_simulate(_config(tmp_path, xdmf=False, plots=False), model=model)
    assert not summary.all_succeeded
    (entry,) = summary.entries
    assert "NaN or inf tau" in entry["error"] and entry["iterations"] == 2
    last = read_case(tmp_path / "failed" / "hill_a1.000.npz")
    assert "NaN" in last.meta["failure"]["error"]
    assert len(last.meta["failure"]["history"]) == 2 and np.all(np.isfinite(last.tau))
    assert json.loads((tmp_path / "metrics.json").read_text())[0]["converged"] is False


def test_cli_pde_closure_and_config_errors(tmp_path):
    out = tmp_path / "pde"
    code = vcnn_main(["simulate", "--closure", "pde", "--coupling", "two-way", "--c-k", "0.15",
                      "--outer", "picard", "--alphas", "1", "--resolution", str(RESOLUTION),
                      "--out", str(out), "--no-xdmf", "--no-plots"])
    assert code == 0
    (entry,) = json.loads((out / "metrics.json").read_text())
    assert entry["closure"] == "pde" and entry["outer"] == "picard" and entry["converged"]
    assert entry["tau_rel_l2_percent"] is None  # no truth to compare with
    # a network without a model, two-way without C_k, --compare of the truth with itself
    assert vcnn_main(["simulate", "--out", str(tmp_path / "a")]) == 2
    assert vcnn_main(["simulate", "--closure", "pde", "--out", str(tmp_path / "b")]) == 2
    assert vcnn_main(["simulate", "--closure", "pde", "--compare", "--c-k", "0.1",
                      "--out", str(tmp_path / "c")]) == 2
    assert vcnn_main(["simulate", "--model", str(tmp_path / "missing.pt"), "--out",
                      str(tmp_path / "d")]) == 2


def _by_position(case, *keys):
    order = np.lexsort((case.points[:, 1], case.points[:, 0]))
    return [case.points[order]] + [
        (getattr(case, key) if hasattr(case, key) else case.extra[key])[order] for key in keys
    ]


def test_trained_network_in_the_loop_converges_against_the_truth(coupled_model, tmp_path):
    out = tmp_path / "network"
    code = vcnn_main(["simulate", "--model", str(coupled_model), "--alphas", "1.45",
                      "--resolution", str(RESOLUTION), "--compare", "--device", "cpu",
                      "--out", str(out), "--no-xdmf"])
    assert code == 0
    (entry,) = json.loads((out / "metrics.json").read_text())
    assert entry["converged"] and entry["iterations"] <= 20 and entry["error"] is None
    assert entry["outer"] == "anderson"
    # a few epochs of training: a rough closure, but a finite, consistent a posteriori run
    assert 0 < entry["a_priori_tau_rel_l2_percent"] < 60
    assert 0 < entry["tau_rel_l2_percent"] < 60 and entry["velocity_rel_l2_percent"] < 5
    assert 0 <= entry["out_of_range_fraction"] < 0.5
    case = read_case(out / "hill_a1.450.npz")
    assert case.meta["simulate"]["eps"] == 0.2 and case.meta["physics"]["c_k"] == 0.15
    # the one inference path: the stored a-priori tau is load_closure's predict on the truth
    closure = load_closure(coupled_model, device="cpu")
    truth = dataclasses.replace(case, velocity=case.extra["velocity_truth"],
                                strain_rate=case.extra["strain_rate_truth"],
                                tau=np.zeros(case.num_points))
    np.testing.assert_allclose(case.extra["tau_a_priori"], closure.predict(truth), rtol=1e-6,
                               atol=1e-6 * np.abs(case.tau).max())
    # the case records the backend that ran the network (vcnn.engines), the one auto picks here
    assert case.meta["simulate"]["engine"] == closure.predict_detailed(truth).engine != ""


def test_one_way_cli_equals_the_closures_predict(coupled_model, tmp_path):
    out = tmp_path / "one_way"
    code = vcnn_main(["simulate", "--model", str(coupled_model), "--coupling", "one-way",
                      "--alphas", "1.3", "--resolution", str(RESOLUTION), "--device", "cpu",
                      "--out", str(out), "--no-xdmf", "--no-plots"])
    assert code == 0
    case = read_case(out / "hill_a1.300.npz")
    prediction = load_closure(coupled_model, device="cpu").predict(
        dataclasses.replace(case, tau=np.zeros(case.num_points)))
    np.testing.assert_allclose(case.tau, prediction, rtol=1e-6, atol=1e-6 * prediction.max())
    assert case.meta["physics"]["c_k"] == 0.0  # one-way: the flow does not see tau


@pytest.mark.parametrize("threshold", [None, 0.0])
def test_auto_clouds_are_decided_once_per_case(coupled_model, tmp_path, monkeypatch, threshold):
    # clouds = "auto" (the default): full clouds on this coarse mesh (a few dozen points per
    # cloud); with the threshold at 0 the quadrature, recorded in metrics and case meta
    import vcnn.cloud_quadrature

    if threshold is not None:
        monkeypatch.setattr(vcnn.cloud_quadrature, "AUTO_QUADRATURE_CLOUD_SIZE", threshold)
    summary = run_simulate(
        _config(tmp_path, model=str(coupled_model), coupling="one-way", device="cpu",
                plots=False, xdmf=False)
    )
    assert summary.all_succeeded
    (entry,) = summary.entries
    expected = "full" if threshold is None else "quadrature"
    assert entry["clouds"] == expected
    case = read_case(tmp_path / "hill_a1.000.npz")
    assert case.meta["simulate"]["clouds"] == expected
    prediction = load_closure(coupled_model, device="cpu").predict(
        dataclasses.replace(case, tau=np.zeros(case.num_points)), clouds=expected)
    np.testing.assert_allclose(case.tau, prediction, rtol=1e-6, atol=1e-6 * prediction.max())


def test_checkpoint_with_other_physics_is_refused(coupled_model, tmp_path, capsys):
    out = tmp_path / "mismatch"
    arguments = ["simulate", "--model", str(coupled_model), "--alphas", "1",
                 "--resolution", str(RESOLUTION), "--device", "cpu", "--out", str(out),
                 "--no-xdmf", "--no-plots", "--c-k", "0.3", "--production", "coupled"]
    assert vcnn_main(arguments) == 2
    error = capsys.readouterr().err
    assert "c_k: 0.15 (closure) vs 0.3 (requested)" in error
    assert "production: 'frozen' (closure) vs 'coupled' (requested)" in error
    assert not out.exists() or not list(out.glob("*.npz"))


@pytest.mark.mpi
def test_serial_and_two_ranks_agree(coupled_model, tmp_path):
    if COMM.size > 1:
        pytest.skip("launches its own MPI runs")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    arguments = ["simulate", "--model", str(coupled_model), "--compare", "--alphas", "1",
                 "--resolution", str(RESOLUTION), "--tol", "1e-7", "--device", "cpu",
                 "--no-plots", "--no-xdmf", "--out"]
    assert vcnn_main([*arguments, str(tmp_path / "serial")]) == 0
    command = [str(MPIEXEC), "-n", "2", sys.executable, "-m", "vcnn.cli", *arguments,
               str(tmp_path / "parallel")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    serial, parallel = (read_case(tmp_path / run / "hill_a1.000.npz")
                        for run in ("serial", "parallel"))
    assert parallel.meta["simulate"]["num_processes"] == 2
    keys = ["tau", "velocity", "tau_truth", "velocity_truth", "tau_a_priori"]
    for a, b in zip(_by_position(serial, *keys), _by_position(parallel, *keys), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7 * np.abs(a).max())
    assert parallel.meta["body_force"] == pytest.approx(serial.meta["body_force"], rel=1e-7)
    assert parallel.meta["metrics"]["iterations"] == serial.meta["metrics"]["iterations"]


def test_unstructured_mesh_run_and_figure(tmp_path):
    config = _config(tmp_path, coupling="one-way", compare=True, xdmf=False,
                     mesh={"kind": "unstructured", "size": 0.4})
    summary = run_simulate(config, model=LocalEquilibriumClosure())
    assert summary.all_succeeded
    assert (tmp_path / "hill_a1.000.png").is_file()  # triangles: the figure draws them thrice
    case = read_case(tmp_path / "hill_a1.000.npz")
    assert case.extra["cells"].shape[1] == 3 and case.extra["cells"].max() < case.num_points


def test_one_way_on_a_flow_from_a_case_file(coupled_model, tmp_path):
    source = coupled_model.parent.parent / "cases" / "hill_a1.000.npz"
    out = tmp_path / "imported"
    config = _config(out, alphas=[1.0], coupling="one-way", compare=True, flow_from=str(source),
                     xdmf=True, plots=False)
    summary = run_simulate(config, model=LocalEquilibriumClosure())
    assert summary.all_succeeded
    (entry,) = summary.entries
    assert entry["body_force"] is None and entry["velocity_rel_l2_percent"] == 0.0
    case, original = read_case(out / "hill_a1.000.npz"), read_case(source)
    # the same mesh: the imported flow at the points is the source's
    np.testing.assert_allclose(case.velocity, original.velocity, atol=1e-10)
    assert case.meta["flow_source"]["path"].endswith("hill_a1.000.npz")
    assert (out / "hill_a1.000.xdmf").is_file()
    with pytest.raises(ValueError, match="one-way"):
        _config(out, coupling="two-way", flow_from=str(source))
