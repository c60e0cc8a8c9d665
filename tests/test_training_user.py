"""Training that does what a user means: defaults, the held-out split, resume, init-model."""

import logging
import math
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.ddp_scripts.synthetic_cases import write_channel_cases
from vcnn import cli
from vcnn.checkpoint import CheckpointError, export_model, load_checkpoint
from vcnn.config import ConfigError
from vcnn.datasets import DatasetError, discover_cases, hold_out_cases
from vcnn.training import HOLD_OUT_FRACTION, TrainConfig, train
from vcnn.training.loop import _build_network

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "experiments" / "published" / "train_cpu.toml"
ALPHAS = [0.5, 0.75, 1.0, 1.25, 1.5]
TINY_NET = {"embedding": [8, 16], "fitting": [32], "axis_neurons": 4}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cases")
    write_channel_cases(folder, ALPHAS, nx=14, ny=8)
    return folder


def _config(data_dir, out_dir, **overrides) -> TrainConfig:
    values = {
        "data": str(data_dir),
        "out": str(out_dir),
        "validation_alphas": [1.25],
        "train_alphas": [0.75, 1.0, 1.5],
        "epochs": 3,
        "batch_size": 32,
        "cloud_size": 24,
        "learning_rate": 3e-3,
        "min_learning_rate": 1e-4,
        "ema_decay": 0.0,
        "seed": 3,
        "device": "cpu",
        "num_threads": 1,
        "model": dict(TINY_NET),
    }
    values.update(overrides)
    return TrainConfig.from_dict(values)


def _interrupt_after(epoch: int):
    class Interrupt(Exception):
        pass

    def stop(record):
        if record.epoch == epoch:
            raise Interrupt

    return Interrupt, stop


# ------------------------------------------------------------------------------ defaults
#: What the recipe sets that is no default: its data and split, and the machine it ran on.
NOT_DEFAULTS = {
    "data", "out", "train_alphas", "validation_alphas", "time_limit_minutes",
    "num_threads",
}


def test_defaults_equal_the_documented_cpu_recipe():
    recipe = tomllib.loads(RECIPE.read_text())["train"]
    defaults = TrainConfig(data="d", out="o")
    compared = set(recipe) - NOT_DEFAULTS - {"model"}
    assert set(recipe) - compared - {"model"} == NOT_DEFAULTS  # nothing else left out
    for key in sorted(compared):
        assert getattr(defaults, key) == recipe[key], key
    # the recipe's network is the default network
    spec = defaults.feature_spec()
    recipe_net = _build_network(
        TrainConfig(data="d", out="o", model=recipe["model"]), dim=2, spec=spec
    )
    default_net = _build_network(defaults, dim=2, spec=spec)
    assert recipe_net.to_config() == default_net.to_config()
    # the defaults round-trip through config.toml (TOML has no null: "off" values are written)
    assert TrainConfig.from_dict(defaults.to_dict()) == defaults
    assert defaults.to_dict()["ema_decay"] > 0


@pytest.mark.parametrize(
    "recipe", sorted(REPO.glob("experiments/*/train*.toml")), ids=lambda p: str(p.parent.name)
)
def test_every_shipped_recipe_states_what_differs_from_the_defaults(recipe):
    config = TrainConfig.from_dict(tomllib.loads(recipe.read_text())["train"])
    if recipe.name == "train.toml" and recipe.parent.name == "published":  # the paper's set-up
        assert config.queries() is None and config.queries(validation=True) is None
    if recipe.name == "train.toml":  # these runs had no moving average of the weights
        assert config.ema_decay == 0.0


def test_off_values_are_written_and_read_back():
    config = TrainConfig.from_dict(
        {"data": "d", "out": "o", "ema_decay": 0, "queries_per_case": "all"}
    )
    assert config.queries() is None and config.queries(validation=True) == 2500
    assert TrainConfig.from_dict(config.to_dict()) == config
    legacy = TrainConfig(data="d", out="o", ema_decay=None, queries_per_case=None)
    assert legacy.ema_decay == 0.0 and legacy.queries_per_case == "all"
    for bad, match in (
        ({"queries_per_case": "every"}, "queries_per_case must be an integer >= 1 or 'all'"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"learning_rate": 1e-5}, "min_learning_rate"),
        ({"init_model": "m.pt", "resume": True}, "exclude each other"),
    ):
        with pytest.raises(ConfigError, match=match):
            TrainConfig.from_dict({"data": "d", "out": "o", **bad})


# ------------------------------------------------------------------------------ the split
def test_hold_out_is_by_whole_cases_chosen_by_the_seed(tmp_path):
    paths = write_channel_cases(tmp_path, [0.5 + 0.1 * i for i in range(10)], nx=6, ny=4)
    sources = discover_cases(tmp_path)
    kept, held = hold_out_cases(sources, fraction=HOLD_OUT_FRACTION, seed=0)
    assert len(held) == 2 and len(kept) == 8
    assert {s.name for s in kept} | {s.name for s in held} == {p.stem for p in paths}
    # the same seed, the same cases, whatever the order of discovery
    _, again = hold_out_cases(sources[::-1], fraction=HOLD_OUT_FRACTION, seed=0)
    assert {s.name for s in again} == {s.name for s in held}
    chosen = {
        frozenset(s.name for s in hold_out_cases(sources, fraction=0.2, seed=seed)[1])
        for seed in range(6)
    }
    assert len(chosen) > 1  # the seed chooses
    assert len(hold_out_cases(sources[:3], fraction=0.2, seed=0)[1]) == 1  # at least one
    with pytest.raises(DatasetError, match="need two or more"):
        hold_out_cases(sources[:1], fraction=0.2, seed=0)


def test_no_split_holds_out_a_case_and_says_which(data_dir, tmp_path, caplog):
    config = _config(
        data_dir, tmp_path / "run", epochs=1, train_alphas=None, validation_alphas=None
    )
    with caplog.at_level(logging.INFO, logger="vcnn.training"):
        result = train(config)
    (held,) = result.split["validation"]  # 20 % of 5 cases
    assert len(result.split["train"]) == 4 and held not in result.split["train"]
    lines = [r.getMessage() for r in caplog.records if "holding out" in r.getMessage()]
    assert len(lines) == 1 and held in lines[0] and "validation_alphas" in lines[0]
    assert math.isfinite(result.best_validation_rel_l2_percent)
    assert math.isfinite(result.history[0].validation_rel_l2_percent)
    recorded = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert recorded["split"]["validation"] == [held]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_a_run_without_a_validation_case_is_refused_by_the_cli(data_dir, tmp_path, capsys):
    one = tmp_path / "one"
    one.mkdir()
    (one / "channel_a1.000.npz").write_bytes((data_dir / "channel_a1.000.npz").read_bytes())
    capsys.readouterr()
    code = cli.main(["train", "--data", str(one), "--out", str(tmp_path / "run"),
                     "--epochs", "1", "--device", "cpu"])
    line = _one_error_line(capsys)
    assert code == 2 and line.startswith("error: ")
    assert "channel_a1.000" in line and "validation_cases" in line
    assert not (tmp_path / "run").exists()
    # a training split without a validation split: refused too, with the fix
    config = tmp_path / "c.toml"
    config.write_text("[train]\ntrain_alphas = [0.5, 1.0]\nepochs = 1\n")
    code = cli.main(["train", "--config", str(config), "--data", str(data_dir), "--out",
                     str(tmp_path / "run"), "--device", "cpu"])
    line = _one_error_line(capsys)
    assert code == 2 and "no validation case" in line and "validation_alphas" in line
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ resume
def _lrs(result) -> list[float]:
    return [record.learning_rate for record in result.history]


def _cosine(start: float, floor: float, steps: int, span: int) -> list[float]:
    return [floor + (start - floor) * 0.5 * (1 + math.cos(math.pi * t / span))
            for t in range(steps)]


def test_resumed_cosine_with_more_epochs_continues_down_without_a_jump(data_dir, tmp_path):
    lr, floor = 3e-3, 1e-4
    straight = train(_config(data_dir, tmp_path / "straight", epochs=4))
    np.testing.assert_allclose(_lrs(straight), _cosine(lr, floor, 4, 4), rtol=1e-9)

    Interrupt, stop = _interrupt_after(2)
    with pytest.raises(Interrupt):
        train(_config(data_dir, tmp_path / "run", epochs=4), on_epoch_end=stop)
    longer = train(_config(data_dir, tmp_path / "run", epochs=8, resume=True))
    rates = _lrs(longer)
    assert len(rates) == 8 and rates[:3] == pytest.approx(_lrs(straight)[:3], rel=1e-8)
    assert all(later <= earlier for earlier, later in zip(rates, rates[1:], strict=False))
    # from the resume point on: a cosine from the reached rate to the floor at the new end
    np.testing.assert_allclose(rates[2:], _cosine(rates[2], floor, 6, 6), rtol=1e-9)

    # the extended schedule is part of last.pt: interrupting it again changes nothing
    Interrupt, stop = _interrupt_after(2)
    with pytest.raises(Interrupt):
        train(_config(data_dir, tmp_path / "twice", epochs=4), on_epoch_end=stop)
    Interrupt, stop = _interrupt_after(5)
    with pytest.raises(Interrupt):
        train(_config(data_dir, tmp_path / "twice", epochs=8, resume=True), on_epoch_end=stop)
    again = train(_config(data_dir, tmp_path / "twice", epochs=8, resume=True))
    assert _lrs(again) == pytest.approx(rates, rel=1e-8)  # lcurve.tsv keeps 9 digits
    for key, value in longer.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[key], value, atol=1e-6, rtol=0)


def test_a_finished_cosine_run_extended_stays_at_the_floor(data_dir, tmp_path):
    train(_config(data_dir, tmp_path / "run", epochs=2))
    extended = train(_config(data_dir, tmp_path / "run", epochs=4, resume=True))
    rates = _lrs(extended)
    assert all(later <= earlier for earlier, later in zip(rates, rates[1:], strict=False))
    assert rates[2:] == pytest.approx([1e-4, 1e-4], rel=1e-9)


def test_resumed_step_schedule_equals_the_longer_run(data_dir, tmp_path):
    step = {"scheduler": "step", "step_size": 2, "gamma": 0.5}
    reference = train(_config(data_dir, tmp_path / "long", epochs=5, **step))
    train(_config(data_dir, tmp_path / "run", epochs=3, **step))
    resumed = train(_config(data_dir, tmp_path / "run", epochs=5, resume=True, **step))
    assert _lrs(resumed) == _lrs(reference) == pytest.approx([3e-3, 3e-3, 1.5e-3, 1.5e-3, 7.5e-4])


def test_a_onecycle_run_cannot_change_its_length(data_dir, tmp_path):
    train(_config(data_dir, tmp_path / "run", epochs=2, scheduler="onecycle"))
    with pytest.raises(CheckpointError, match="onecycle.*epochs = 2"):
        train(_config(data_dir, tmp_path / "run", epochs=3, scheduler="onecycle", resume=True))


# ------------------------------------------------------------------------------ init-model
@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained") / "run"
    result = train(_config(data_dir, out, epochs=3))
    return out, result


def test_init_model_starts_from_the_checkpoint_weights(data_dir, pretrained, tmp_path):
    source, first = pretrained
    best = first.history[first.best_epoch - 1]
    # Other training cases (a refitted normaliser or target scale would differ), the same
    # validation clouds, a vanishing learning rate: the first epoch validates the
    # checkpoint's own weights, so its validation loss is the checkpoint's.
    tune = {"train_alphas": [0.5, 0.75], "epochs": 1, "learning_rate": 1e-12,
            "scheduler": "constant", "min_learning_rate": 0.0}
    tuned = train(_config(data_dir, tmp_path / "tuned", init_model=str(source / "best.pt"),
                          **tune))
    assert tuned.history[0].validation_loss == pytest.approx(best.validation_loss, rel=1e-5)
    fresh = train(_config(data_dir, tmp_path / "fresh", **tune))
    assert abs(fresh.history[0].validation_loss - best.validation_loss) > 0.1 * best.validation_loss

    before = load_checkpoint(source / "best.pt")
    after = load_checkpoint(tmp_path / "tuned" / "last.pt")
    assert after["target_scale"] == before["target_scale"]
    for key, value in before["feature_normalizer"].items():
        np.testing.assert_array_equal(np.asarray(after["feature_normalizer"][key]),
                                      np.asarray(value))
    assert after["init_model"]["path"] == str((source / "best.pt").resolve())
    assert after["init_model"]["epoch"] == first.best_epoch
    steps = {int(s["step"]) for s in after["optimizer_state"]["state"].values()}
    batches = 2 * math.ceil(14 * 8 / 32)  # two cases of 112 points, batches of 32 per case
    assert steps == {batches}  # a fresh optimiser: only this run's steps
    recorded = tomllib.loads((tmp_path / "tuned" / "config.toml").read_text())
    assert recorded["train"]["init_model"] == str(source / "best.pt")


def test_init_model_takes_an_export_and_refuses_another_network(data_dir, pretrained, tmp_path):
    source, _ = pretrained
    exported = export_model(source / "best.pt", tmp_path / "model.pt")
    result = train(_config(data_dir, tmp_path / "ok", epochs=1, init_model=str(exported)))
    assert result.history[0].epoch == 1
    other = {**TINY_NET, "fitting": [16]}
    with pytest.raises(CheckpointError, match=r"model fitting: \[32\] in it, \[16\] now"):
        train(_config(data_dir, tmp_path / "other", init_model=str(exported), model=other))
    assert not (tmp_path / "other").exists()
    with pytest.raises(CheckpointError, match="features wall_distance_cap"):
        train(_config(data_dir, tmp_path / "inputs", init_model=str(exported),
                      features={"wall_distance_cap": 0.123}))


def test_init_model_from_the_cli_and_resume_of_a_tuned_run(data_dir, pretrained, tmp_path, capsys):
    source, _ = pretrained
    config = tmp_path / "c.toml"
    config.write_text(
        "[train]\ntrain_alphas = [0.5, 0.75]\nvalidation_alphas = [1.25]\nema_decay = 0\n"
        "batch_size = 32\ncloud_size = 24\nnum_threads = 1\n"
        "[train.model]\nembedding = [8, 16]\nfitting = [32]\naxis_neurons = 4\n"
    )
    run = ["-q", "train", "--config", str(config), "--data", str(data_dir), "--device", "cpu",
           "--out", str(tmp_path / "run")]
    assert cli.main([*run, "--epochs", "1", "--init-model", str(source / "best.pt")]) == 0
    code = cli.main([*run, "--epochs", "2", "--init-model", str(source / "best.pt"),
                     "--resume"])
    assert code == 2 and "exclude each other" in _one_error_line(capsys)
    assert cli.main([*run, "--epochs", "2", "--resume"]) == 0  # continues the tuned run
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["epoch"] == 2 and last["init_model"]["path"] == str((source / "best.pt").resolve())


def test_a_cosine_state_of_an_older_checkpoint_continues_as_it_was():
    from vcnn.training import CosineToFloor

    weights = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(weights.parameters(), lr=1e-3)
    old = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=6, eta_min=1e-5)
    for _ in range(2):
        optimizer.step()
        old.step()
    again = torch.optim.Adam(weights.parameters(), lr=1e-3)
    new = CosineToFloor(again, epochs=6, min_lr=1e-5)
    new.load_state_dict(old.state_dict())
    for _ in range(3):
        optimizer.step(), old.step(), again.step(), new.step()
        assert new.get_last_lr() == pytest.approx(old.get_last_lr(), rel=1e-12)


def test_the_progress_bar_is_a_tqdm_bar_per_epoch_and_is_cleared(data_dir, tmp_path, capsys):
    train(_config(data_dir, tmp_path / "run", epochs=2, progress=True))
    err = capsys.readouterr().err
    # tqdm's bar of each epoch (percentage, bar, batch counter and unit), cleared at its end
    bars = re.findall(r"\repoch (\d)/2: +\d+%\|.*?\| \d+/(\d+) \[.*?batch/s.*?\]", err)
    assert [epoch for epoch, _ in bars[:1]] == ["1"] and "2" in {epoch for epoch, _ in bars}, err
    assert len(re.findall(r"\r +\r", err)) == 2, err  # two bars, each erased (leave=False)


def test_no_progress_bar_when_it_is_off(data_dir, tmp_path, capsys):
    train(_config(data_dir, tmp_path / "run", epochs=1, progress=False))
    assert "batch/s" not in capsys.readouterr().err
