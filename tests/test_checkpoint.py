import pytest
import torch

from vcnn.checkpoint import (
    CheckpointError,
    capture_rng_state,
    export_model,
    load_checkpoint,
    load_model,
    restore_rng_state,
    save_checkpoint,
)
from vcnn.network import VectorCloudNet
from vcnn.training import SCHEDULERS, TrainConfig, build_scheduler


def _payload():
    model = VectorCloudNet(dim=2, num_scalars=3, num_vectors=1, embedding=(8, 16), fitting=(16,))
    return model, {
        "model_kind": "VectorCloudNet",
        "model_config": model.to_config(),
        "model_state": model.state_dict(),
        "feature_normalizer": None,
        "target_scale": 2.5,
        "rng_state": capture_rng_state(),
        "versions": {"torch": str(torch.__version__)},
    }


def test_checkpoint_round_trip_is_weights_only(tmp_path):
    model, payload = _payload()
    path = save_checkpoint(tmp_path / "best.pt", payload)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "vcnn-checkpoint"
    loaded = load_model(path)
    assert loaded.target_scale == 2.5
    pos = torch.randn(4, 6, 2)
    vec = torch.randn(4, 6, 1, 2)
    scal = torch.randn(4, 6, 3)
    torch.testing.assert_close(loaded.model(pos, vec, scal), model.eval()(pos, vec, scal))
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_export_keeps_the_model_and_drops_the_training_state(tmp_path):
    model, payload = _payload()
    payload["optimizer_state"] = {"big": torch.zeros(10000)}
    path = save_checkpoint(tmp_path / "best.pt", payload)
    exported = export_model(path, tmp_path / "model.pt")
    raw = torch.load(exported, weights_only=True)
    assert "optimizer_state" not in raw and raw["exported_from"] == str(path)
    assert exported.stat().st_size < path.stat().st_size - 30000
    pos, vec, scal = torch.randn(3, 5, 2), torch.randn(3, 5, 1, 2), torch.randn(3, 5, 3)
    torch.testing.assert_close(load_model(exported).model(pos, vec, scal), model.eval()(pos, vec, scal))


def test_corrupt_or_foreign_checkpoint_names_the_file(tmp_path):
    _, payload = _payload()
    path = save_checkpoint(tmp_path / "last.pt", payload)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a vcnn checkpoint"):
        load_model(foreign)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing.pt")


def test_objects_that_weights_only_cannot_load_are_refused_at_save(tmp_path):
    _, payload = _payload()
    payload["bad"] = {"value": object()}
    with pytest.raises(TypeError, match=r"\['bad'\]\['value'\]"):
        save_checkpoint(tmp_path / "x.pt", payload)
    assert not (tmp_path / "x.pt").exists()


def test_rng_state_round_trip():
    import numpy as np

    state = capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3))
    restore_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_scheduler_state_is_weights_only_loadable(tmp_path, name):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(model.parameters())
    config = TrainConfig(data=".", out=".", scheduler=name, epochs=5)
    scheduler = build_scheduler(optimizer, config)
    optimizer.step()
    scheduler.step()
    path = tmp_path / "s.pt"
    torch.save({"s": scheduler.state_dict(), "o": optimizer.state_dict()}, path)
    loaded = torch.load(path, weights_only=True)
    fresh = build_scheduler(torch.optim.Adam(model.parameters()), config)
    fresh.load_state_dict(loaded["s"])
    assert fresh.get_last_lr() == scheduler.get_last_lr()


def test_text_file_and_self_export_are_clear_errors(tmp_path):
    text = tmp_path / "model.pt"
    text.write_text("e" * 101 + "\n")  # torch.load gives a bare KeyError: 101 on this
    with pytest.raises(CheckpointError, match=r"model\.pt.*not a torch checkpoint"):
        load_checkpoint(text)
    _, payload = _payload()
    path = save_checkpoint(tmp_path / "best.pt", payload)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="overwrite its input"):
        export_model(path, tmp_path / "." / "best.pt")
    assert path.read_bytes() == before
