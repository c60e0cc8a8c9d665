import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.ddp_scripts.synthetic_cases import write_channel_cases
from vcnn.config import ConfigError
from vcnn.training import LCURVE_COLUMNS, TrainConfig, train

ALPHAS = [0.5, 0.75, 1.0, 1.25, 1.5]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cases")
    write_channel_cases(folder, ALPHAS, nx=24, ny=10)
    return folder


def _config(data_dir, out_dir, **overrides):
    values = {
        "data": str(data_dir),
        "out": str(out_dir),
        "validation_alphas": [1.25],
        "test_alphas": [0.5],
        "epochs": 4,
        "batch_size": 48,
        "cloud_size": 32,
        "learning_rate": 3e-3,
        "scheduler": "cosine",
        "seed": 3,
        "device": "cpu",
        "num_threads": 1,
        "ema_decay": 0.0,  # no weight average (the default's spans more steps than these runs)
        "model": {"embedding": [16, 32], "fitting": [64, 32], "axis_neurons": 4},
    }
    values.update(overrides)
    return TrainConfig.from_dict(values)


def _constant_predictor_error(data_dir, alpha):
    """Relative L2 error (%) of the best constant guess: the mean of the training tau."""
    from vcnn.datasets import discover_cases, select_by_alpha

    sources = discover_cases(data_dir)
    train = [s.load() for s in select_by_alpha(sources, [0.75, 1.0, 1.5])]
    mean = np.concatenate([c.tau for c in train]).mean()
    tau = select_by_alpha(sources, [alpha])[0].load().tau
    return 100 * np.linalg.norm(tau - mean) / np.linalg.norm(tau)


def test_short_training_learns_the_nonlocal_target(data_dir, tmp_path):
    result = train(_config(data_dir, tmp_path / "run", epochs=25))
    first, last = result.history[0], result.history[-1]
    assert last.train_loss < 0.2 * first.train_loss
    # Justification of the threshold: a constant prediction (the training mean) has a
    # relative error of about 45 % on this validation case; a network that learns the
    # nonlocal functional must get well under half of that in 25 short epochs.
    baseline = _constant_predictor_error(data_dir, 1.25)
    assert result.best_validation_rel_l2_percent < 0.5 * baseline
    out = tmp_path / "run"
    for name in ("best.pt", "last.pt", "config.toml", "lcurve.tsv", "lcurve.png"):
        assert (out / name).is_file(), name
    rows = (out / "lcurve.tsv").read_text().splitlines()
    assert rows[0].split("\t") == list(LCURVE_COLUMNS)
    assert len(rows) == 26
    checkpoint = torch.load(out / "best.pt", weights_only=True)
    assert checkpoint["seed"] == 3 and checkpoint["epoch"] == result.best_epoch
    assert checkpoint["split"]["test"] == ["channel_a0.500"]
    assert "seed = 3" in (out / "config.toml").read_text()
    assert result.clouds_per_second > 0


def test_resume_after_interruption_equals_uninterrupted_run(data_dir, tmp_path):
    reference = train(_config(data_dir, tmp_path / "straight"))

    class Interrupt(Exception):
        pass

    def stop_after_two(record):
        if record.epoch == 2:
            raise Interrupt

    interrupted = _config(data_dir, tmp_path / "resumed")
    with pytest.raises(Interrupt):
        train(interrupted, on_epoch_end=stop_after_two)
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["epoch"] == 2
    resumed = train(_config(data_dir, tmp_path / "resumed", resume=True))
    assert [r.epoch for r in resumed.history] == [1, 2, 3, 4]
    for key, value in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, atol=1e-6, rtol=0)
    np.testing.assert_allclose(
        [r.validation_rel_l2_percent for r in resumed.history],
        [r.validation_rel_l2_percent for r in reference.history],
        rtol=1e-6,
    )


def test_early_stopping_with_patience(data_dir, tmp_path):
    # A vanishing learning rate cannot improve the validation error by 50 percentage points.
    result = train(
        _config(data_dir, tmp_path / "run", epochs=10, patience=2, min_delta=50.0,
                learning_rate=1e-9, scheduler="constant")
    )
    assert result.stopped_early
    assert len(result.history) == 3


def test_time_limit_stops_after_the_epoch_that_passes_it(data_dir, tmp_path):
    # a limit of 1e-6 min (60 microseconds) is passed during the first epoch
    result = train(_config(data_dir, tmp_path / "run", epochs=10, time_limit_minutes=1e-6))
    assert len(result.history) == 1
    assert (tmp_path / "run" / "last.pt").is_file()
    with pytest.raises(ConfigError, match="time_limit_minutes"):
        TrainConfig.from_dict({"data": "d", "out": "o", "time_limit_minutes": 0})


def test_config_round_trip_and_errors():
    config = TrainConfig.from_dict({"data": "d", "out": "o", "epochs": 3})
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown key"):
        TrainConfig.from_dict({"data": "d", "out": "o", "epoch": 3})
    with pytest.raises(ConfigError, match="needs"):
        TrainConfig.from_dict({"data": "d"})
    with pytest.raises(ConfigError, match="scheduler"):
        TrainConfig.from_dict({"data": "d", "out": "o", "scheduler": "warp"})
    with pytest.raises(ConfigError, match="features"):
        TrainConfig.from_dict({"data": "d", "out": "o", "features": {"pair_scalars": ["x"]}})
    with pytest.raises(ConfigError, match=r"\[cloud\]"):
        TrainConfig.from_dict({"data": "d", "out": "o", "cloud": {"shape": "x"}})


@pytest.mark.slow
def test_data_parallel_ranks_end_identical(data_dir, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "-m", "tests.ddp_scripts.ddp_train",
         str(data_dir), str(tmp_path)],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    rank0 = torch.load(tmp_path / "params_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "params_rank1.pt", weights_only=True)
    for key, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][key]), key
    assert rank0["history"] == rank1["history"]  # metrics are reduced over the ranks
    # DistributedDataParallel wraps the training pass: the ranks run the C kernels where a
    # single process would
    kernels_off = os.environ.get("VCNN_KERNELS", "").lower() in ("0", "off", "no", "false")
    compiler = shutil.which("cc") or shutil.which("gcc")
    expected = "fused" if compiler and not kernels_off else "sparse"
    assert rank0["engine"] == rank1["engine"] == expected
    assert (tmp_path / "run" / "last.pt").is_file()
    assert not (tmp_path / "run" / "params_rank1.pt").exists()


def test_a_diverging_run_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(
    data_dir, tmp_path, monkeypatch
):
    import vcnn.training.loop as training
    from vcnn.errors import TrainingDivergedError

    out = tmp_path / "run"
    # Adam with a learning rate of 1e30 sends the weights to inf in the first epoch.
    with pytest.raises(TrainingDivergedError, match="epoch 1: the training loss is nan; no checkpoint"):
        train(_config(data_dir, out, learning_rate=1e30, scheduler="constant", epochs=3))
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()

    # From the second epoch on, the network's output is NaN.
    real_predict, poisoned = training._predict, []

    def predict(*args, **kwargs):
        prediction = real_predict(*args, **kwargs)
        return prediction * float("nan") if poisoned else prediction

    monkeypatch.setattr(training, "_predict", predict)
    out = tmp_path / "run2"
    with pytest.raises(TrainingDivergedError, match="epoch 2.*last.pt keeps epoch 1, best.pt epoch 1"):
        train(_config(data_dir, out, epochs=4), on_epoch_end=lambda record: poisoned.append(1))
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["epoch"] == 1
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in last["model_state"].values())
    assert len((out / "lcurve.tsv").read_text().splitlines()) == 2  # header and epoch 1


def test_a_folder_that_holds_a_run_is_resumed_or_replaced_never_mixed(data_dir, tmp_path):
    from vcnn.checkpoint import CheckpointError

    out = tmp_path / "run"
    train(_config(data_dir, out, epochs=1))
    before = (out / "best.pt").read_bytes()
    with pytest.raises(ConfigError, match="already holds a training run.*--resume.*--overwrite"):
        train(_config(data_dir, out, epochs=1, seed=4))
    assert (out / "best.pt").read_bytes() == before
    for change, setting in [
        ({"cloud_size": 16}, "cloud_size"),
        ({"batch_size": 16}, "batch_size"),
        ({"seed": 4}, "seed"),
        ({"model": {"embedding": [8, 32], "fitting": [64, 32], "axis_neurons": 4}}, "model"),
        ({"features": {"proximity_length": 0.3}}, "features"),
        ({"validation_alphas": [1.5], "test_alphas": [0.5]}, "data"),
    ]:
        with pytest.raises(CheckpointError, match=f"other settings.*{setting}"):
            train(_config(data_dir, out, epochs=2, resume=True, **change))
    assert (out / "best.pt").read_bytes() == before
    resumed = train(_config(data_dir, out, epochs=2, resume=True))  # more epochs: allowed
    assert [r.epoch for r in resumed.history] == [1, 2]
    replaced = train(_config(data_dir, out, epochs=1, overwrite=True, seed=4))
    assert [r.epoch for r in replaced.history] == [1]
    assert torch.load(out / "last.pt", weights_only=True)["seed"] == 4


def test_weight_average_is_what_is_validated_saved_and_resumed(data_dir, tmp_path):
    from vcnn.checkpoint import load_checkpoint

    full = train(_config(data_dir, tmp_path / "full", epochs=3, ema_decay=0.9))
    checkpoint = load_checkpoint(tmp_path / "full" / "last.pt")
    averaged, raw = checkpoint["model_state"], checkpoint["training_model_state"]
    assert any(not torch.equal(averaged[k], raw[k]) for k in averaged)
    assert all(torch.equal(v, full.model.state_dict()[k]) for k, v in averaged.items())

    class Interrupt(Exception):
        pass

    def stop_after_one(record):
        if record.epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(_config(data_dir, tmp_path / "cut", epochs=3, ema_decay=0.9), on_epoch_end=stop_after_one)
    resumed = train(_config(data_dir, tmp_path / "cut", epochs=3, ema_decay=0.9, resume=True))
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="ema_decay"):
        _config(data_dir, tmp_path / "x", ema_decay=1.0)
