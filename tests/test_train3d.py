"""``vcnn train`` and ``vcnn evaluate`` on 3-D hill cases (the coarse family of the session).

The family and the tiny model are built once (``coarse_3d_model`` in ``tests/conftest.py``).
"""

from mpi4py import MPI  # noqa: F401  (initialise MPI before dolfinx)

import json

import numpy as np
import pytest
import torch

from tests.hills3d_model import EPOCHS, HELD_OUT
from vcnn import load_closure
from vcnn.casefile import read_case
from vcnn.cli import main as vcnn_main
from vcnn.evaluation import evaluate


def test_a_3d_model_trains_and_its_loss_falls(coarse_3d_model):
    history = coarse_3d_model.history
    losses = [record.train_loss for record in history]
    assert len(losses) == EPOCHS and all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
    validation = [record.validation_rel_l2_percent for record in history]
    assert min(validation[1:]) < validation[0], validation
    checkpoint = torch.load(coarse_3d_model.model, map_location="cpu", weights_only=False)
    assert checkpoint["dimension"] == 3 and checkpoint["model_config"]["dim"] == 3
    assert checkpoint["split"]["validation"] == [HELD_OUT]


def test_the_3d_closure_loads_and_predicts_a_3d_case(coarse_3d_model):
    closure = load_closure(coarse_3d_model.model, device="cpu")
    assert closure.dimension == 3 and closure.physics["dimension"] == 3
    case = read_case(coarse_3d_model.cases / f"{HELD_OUT}.npz")
    assert case.dim == 3
    tau = closure.predict(case)
    assert tau.shape == (case.num_points,) and np.all(np.isfinite(tau))
    # the clouds see the periodic images in x and z: a point on the periodic side x = 0 and
    # its column's points near x = L are in each other's clouds, so a shift of the case by
    # a period changes nothing
    shifted = read_case(coarse_3d_model.cases / f"{HELD_OUT}.npz")
    shifted.points = shifted.points + np.where(case.period > 0, 0.5 * case.period, 0.0)
    shifted.points = np.where(case.period > 0, np.mod(shifted.points, np.where(
        case.period > 0, case.period, 1.0)), shifted.points)
    np.testing.assert_allclose(closure.predict(shifted), tau, rtol=1e-4, atol=1e-5 * tau.max())


def test_evaluate_on_3d_cases_writes_metrics_and_mid_span_figures(coarse_3d_model, tmp_path):
    out = tmp_path / "eval"
    metrics = evaluate(coarse_3d_model.model, coarse_3d_model.cases, out, device="cpu")
    assert [m.case for m in metrics] == ["hill3d_a1.000_crest0.000", HELD_OUT]
    stored = json.loads((out / "metrics.json").read_text())
    for entry, metric in zip(stored, metrics, strict=True):
        assert entry["rel_l2_percent"] == pytest.approx(metric.rel_l2_percent)
        assert 0.0 < metric.rel_l2_percent < 100.0
    # the stored error is the one of the closure's prediction on the case
    case = read_case(coarse_3d_model.cases / f"{HELD_OUT}.npz")
    tau = load_closure(coarse_3d_model.model, device="cpu").predict(case)
    error = 100 * np.linalg.norm(tau - case.tau) / np.linalg.norm(case.tau)
    assert metrics[1].rel_l2_percent == pytest.approx(error, rel=1e-5)
    for name in ("parity.png", "fields/hill3d_a1.000_crest0.000.png", f"fields/{HELD_OUT}.png"):
        assert (out / name).stat().st_size > 10_000, name


def test_cli_evaluate_3d(coarse_3d_model, tmp_path, capsys):
    code = vcnn_main(["-q", "evaluate", "--model", str(coarse_3d_model.model), "--data",
                      str(coarse_3d_model.cases), "--out", str(tmp_path / "e"), "--device", "cpu"])
    assert code == 0
    assert HELD_OUT in capsys.readouterr().out
