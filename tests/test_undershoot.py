"""Undershoots of tau below zero: the measure, the evaluation metrics and generate's report."""

from mpi4py import MPI

import dataclasses
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.ddp_scripts.synthetic_cases import channel_case
from vcnn.evaluation import case_metrics
from vcnn.undershoot import NEGATIVE_TOLERANCE, TauUndershoot, tau_undershoot

MPIEXEC = Path(sys.executable).with_name("mpiexec")


def test_the_negative_part_is_measured_and_round_off_is_not():
    tau = np.array([0.0, 1.0, 2.0, -0.5, -1e-12, 2.0])
    undershoot = tau_undershoot(tau)
    assert undershoot.minimum == -0.5
    assert undershoot.negative_points == 1  # -1e-12 is round-off against max |tau| = 2
    assert undershoot.negative_share == pytest.approx(0.5 / math.sqrt(1 + 4 + 0.25 + 1e-24 + 4))
    assert undershoot.significant
    assert "negative at 1 points" in undershoot.describe()
    assert undershoot.to_meta() == {
        "min": -0.5, "negative_points": 1, "negative_share": undershoot.negative_share
    }
    clean = tau_undershoot(np.array([0.0, 0.3, -0.5 * NEGATIVE_TOLERANCE * 0.3]))
    assert clean.negative_points == 0 and clean.negative_share == 0 and not clean.significant
    assert tau_undershoot(np.zeros(3)) == TauUndershoot(0.0, 0, 0.0)
    assert tau_undershoot(np.zeros(0)) == TauUndershoot(0.0, 0, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        tau_undershoot(np.array([1.0, np.nan]))


def test_the_reduced_measure_equals_the_local_one():
    comm = MPI.COMM_WORLD
    tau = np.linspace(-1.0, 3.0, 41)
    mine = np.array_split(tau, comm.size)[comm.rank]
    assert tau_undershoot(mine, comm=comm) == tau_undershoot(tau)


def test_evaluation_reports_the_error_against_the_nonnegative_reference():
    case = channel_case(1.0, nx=12, ny=6)
    tau = case.tau.copy()
    inside = np.flatnonzero(~case.is_wall)[:2]
    tau[inside] = -0.1 * tau.max()
    undershooting = dataclasses.replace(case, tau=tau)
    # the prediction that is exact where tau >= 0 and zero where it undershoots
    prediction = np.maximum(tau, 0.0)
    metrics = case_metrics(undershooting, prediction, cloud_size=None)
    assert metrics.rel_l2_percent_nonnegative == 0.0
    assert metrics.negative_tau_points == 2
    share = np.linalg.norm(tau[inside]) / np.linalg.norm(tau)
    assert metrics.negative_tau_share == pytest.approx(share)
    # predicting zero there costs exactly the negative part's share
    assert metrics.rel_l2_percent == pytest.approx(100 * share)
    exact = case_metrics(case, case.tau, cloud_size=None)
    assert exact.negative_tau_points == 0 and exact.rel_l2_percent_nonnegative == 0.0


def test_generate_records_and_reports_a_coarse_mesh_undershoot(tmp_path, caplog):
    if MPI.COMM_WORLD.size > 1:
        pytest.skip("serial")
    from solvers.generate import GenerateConfig, run_generate
    from vcnn.casefile import read_case

    # the steepest hill on a tenth of the published resolution: tau dips below zero at the
    # foot of the next hill (no discrete maximum principle there); at r = 0.15 it does not
    cases = {}
    for resolution in (0.1, 0.15):
        out = tmp_path / f"r{resolution}"
        config = GenerateConfig.from_dict({
            "alphas": [0.5], "out": str(out), "plots": False, "xdmf": False,
            "mesh": {"kind": "structured", "resolution": resolution},
        })
        with caplog.at_level(logging.WARNING, logger="solvers.generate"):
            assert run_generate(config).all_succeeded
        cases[resolution] = read_case(out / "hill_a0.500.npz")
    coarse = cases[0.1].meta["tau_undershoot"]
    assert coarse["negative_points"] > 0 and coarse["min"] < 0
    assert coarse == tau_undershoot(cases[0.1].tau).to_meta()
    assert "an undershoot of the discretisation" in caplog.text
    assert cases[0.15].meta["tau_undershoot"]["negative_points"] == 0


def test_3d_generate_takes_the_flow_length_and_warns_about_the_diameter(tmp_path, capsys):
    if MPI.COMM_WORLD.size > 1:
        pytest.skip("serial")
    from vcnn import cli
    from vcnn.casefile import read_case

    common = ["generate", "--dim", "3", "--alphas", "0.5", "--resolution", "0.05",
              "--span-cells", "2", "--no-plots", "--no-xdmf"]
    lengths = {}
    for length in ("diameter", "flow"):
        out = tmp_path / length
        # the CLI sets up its own logging to stderr
        assert cli.main([*common, "--out", str(out), "--supg-length", length]) == 0
        warned = "supg_length = 'diameter'" in capsys.readouterr().err
        assert warned == (length == "diameter")
        case = read_case(out / "hill3d_a0.500_crest0.000.npz")
        assert case.meta["physics"]["supg_length"] == length
        lengths[length] = case.meta["tau_undershoot"]
    # on this coarse steep hill the diameter (2.25 across the span) over-stabilises tau below
    # zero; the flow length keeps it non-negative
    assert lengths["diameter"]["negative_points"] > 0
    assert lengths["flow"]["negative_points"] == 0


@pytest.mark.mpi
def test_two_ranks_record_the_serial_undershoot(tmp_path):
    if MPI.COMM_WORLD.size > 1:
        pytest.skip("launches its own MPI runs")
    from vcnn.casefile import read_case

    command = ["-m", "vcnn.cli", "-q", "generate", "--alphas", "0.5", "--resolution", "0.1",
               "--no-plots", "--no-xdmf", "--out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    records = []
    for launcher, out in (([], tmp_path / "serial"), ([str(MPIEXEC), "-n", "2"], tmp_path / "mpi")):
        result = subprocess.run([*launcher, sys.executable, *command, str(out)], env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        records.append(read_case(out / "hill_a0.500.npz").meta["tau_undershoot"])
    serial, parallel = records
    # the owned values of two ranks reduce to the whole field's measure
    assert serial["negative_points"] > 0
    assert parallel["negative_points"] == serial["negative_points"]
    assert parallel["min"] == pytest.approx(serial["min"], rel=1e-7)
    assert parallel["negative_share"] == pytest.approx(serial["negative_share"], rel=1e-7)
