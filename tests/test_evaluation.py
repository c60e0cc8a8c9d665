import json

import numpy as np
import pytest

from tests.ddp_scripts.synthetic_cases import write_channel_cases
from vcnn.closure import load_closure
from vcnn.datasets import CaseSource
from vcnn.evaluation import case_metrics, evaluate, predict_case
from vcnn.training import TrainConfig, train

KEYS = {
    "case", "alpha", "rel_l2_percent", "max_abs_error", "integral_rel_error", "num_points",
    "cloud_size", "out_of_range_fraction", "seconds", "engine", "clouds",
    "rel_l2_percent_nonnegative", "negative_tau_points", "negative_tau_share",
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    data_dir = folder / "cases"
    write_channel_cases(data_dir, [0.5, 1.0, 1.5], nx=24, ny=10)
    config = TrainConfig.from_dict(
        {
            "data": str(data_dir), "out": str(folder / "run"),
            "validation_alphas": [1.0], "epochs": 3, "batch_size": 48, "cloud_size": 32,
            "learning_rate": 3e-3, "device": "cpu", "num_threads": 1,
            "model": {"embedding": [8, 16], "fitting": [32]},
        }
    )
    train(config)
    return data_dir, folder / "run" / "best.pt"


def test_evaluate_writes_metrics_and_figures(trained, tmp_path):
    data_dir, checkpoint = trained
    metrics = evaluate(checkpoint, data_dir, tmp_path, device="cpu")
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert [set(m) for m in written] == [KEYS] * 3
    assert [m["alpha"] for m in written] == [0.5, 1.0, 1.5]
    for entry, metric in zip(written, metrics, strict=True):
        assert entry["rel_l2_percent"] == pytest.approx(metric.rel_l2_percent)
        assert entry["engine"] == metric.engine != ""  # the backend that ran (vcnn.engines)
        assert 0 < entry["rel_l2_percent"] < 100  # trained: better than predicting zero
        assert entry["max_abs_error"] > 0 and entry["num_points"] == 240
        assert 0 <= entry["integral_rel_error"] < 1
        assert entry["cloud_size"] is None
        assert 0 <= entry["out_of_range_fraction"] < 0.5 and entry["seconds"] > 0
    for name in ("parity.png", "error_vs_alpha.png", "fields/channel_a0.500.png"):
        assert (tmp_path / name).stat().st_size > 1000, name


def test_metrics_of_full_and_sampled_clouds(trained):
    data_dir, checkpoint = trained
    closure = load_closure(checkpoint, device="cpu")
    source = CaseSource(data_dir / "channel_a1.000.npz")
    full = predict_case(closure, source)
    recomputed = case_metrics(source.load(), full.prediction, cloud_size=None)
    assert recomputed.rel_l2_percent == pytest.approx(full.metrics.rel_l2_percent)
    sampled = predict_case(closure, source, cloud_size=16, seed=1)
    assert sampled.metrics.cloud_size == 16
    assert not np.allclose(sampled.prediction, full.prediction)
    again = predict_case(closure, source, cloud_size=16, seed=1)
    np.testing.assert_array_equal(again.prediction, sampled.prediction)


def test_case_metrics_values():
    from tests.ddp_scripts.synthetic_cases import channel_case

    case = channel_case(1.0, nx=12, ny=6)
    exact = case_metrics(case, case.tau, cloud_size=None)
    assert exact.rel_l2_percent == 0 and exact.max_abs_error == 0
    doubled = case_metrics(case, 2 * case.tau, cloud_size=8)
    assert doubled.rel_l2_percent == pytest.approx(100.0)
    assert doubled.integral_rel_error == pytest.approx(1.0)


def test_evaluate_rejects_bad_cloud_size(trained, tmp_path):
    data_dir, checkpoint = trained
    with pytest.raises(ValueError, match="cloud_size"):
        evaluate(checkpoint, data_dir, tmp_path, cloud_size=0)


def test_predictions_do_not_depend_on_the_frame(trained):
    data_dir, checkpoint = trained
    closure = load_closure(checkpoint, device="cpu")
    source = CaseSource(data_dir / "channel_a1.000.npz")
    reference = predict_case(closure, source).prediction
    angle = 0.7
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    reflection = np.diag([1.0, -1.0]) @ rotation
    for frame in (rotation, reflection):
        rotated = predict_case(closure, source, frame=frame).prediction
        np.testing.assert_allclose(rotated, reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max())
    with pytest.raises(ValueError, match="orthogonal"):
        predict_case(closure, source, frame=np.eye(2) * 2)
