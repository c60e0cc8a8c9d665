"""Crafted checkpoints, devices and absurd cases: refused up front with one clear error.

The command-line view of the same inputs (exit 2, one line, nothing written) is in
``tests/test_bad_inputs.py``; here the library calls are checked.
"""

import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.crafted_checkpoints import (
    ABSURD_CONFIGS,
    absurd_config,
    corrupted_record,
    zip_bomb,
)
from tests.ddp_scripts.synthetic_cases import channel_case
from vcnn import checkpoint as checkpoint_module
from vcnn import system
from vcnn.atomic import atomic_write
from vcnn.casefile import CaseFileError
from vcnn.checkpoint import CheckpointError, check_archive, export_model, load_model
from vcnn.closure import load_closure
from vcnn.clouds import CloudSampler
from vcnn.config import ConfigError
from vcnn.errors import is_user_error
from vcnn.network import MAX_WIDTH, BaselineNet, VectorCloudNet
from vcnn.system import TooLargeError

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SHIPPED = [EXPERIMENTS / "published" / "model" / "best.pt", EXPERIMENTS / "coupled" / "model" / "best.pt"]
MODEL = SHIPPED[0]


@pytest.fixture(scope="module")
def closure():
    return load_closure(MODEL, device="cpu")


# ------------------------------------------------------------------ the archive
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.parent.parent.name)
def test_shipped_models_pass_the_integrity_check_quickly(path):
    start = time.perf_counter()
    check_archive(path)
    seconds = time.perf_counter() - start
    print(f"integrity check of {path.name} ({path.stat().st_size / 1024:.0f} KB): "
          f"{1e3 * seconds:.2f} ms")
    loaded = load_model(path)
    assert sum(p.numel() for p in loaded.model.parameters()) > 1000
    assert seconds < 1.0


def test_a_zip_bomb_is_refused_before_anything_is_unpacked(tmp_path):
    bomb = zip_bomb(MODEL, tmp_path / "bomb.pt")
    assert bomb.stat().st_size < MODEL.stat().st_size + (200 << 10)  # small on disk
    with pytest.raises(CheckpointError, match=r"member '.*pad' unpacks to 80 MiB, more than the 64"):
        load_model(bomb)


def test_a_member_that_expands_a_hundredfold_is_refused(tmp_path):
    bomb = zip_bomb(MODEL, tmp_path / "ratio.pt", member_bytes=8 << 20)  # under 64 MiB
    with pytest.raises(CheckpointError, match="more than 100 times .* decompression bomb"):
        load_model(bomb)


def test_the_total_unpacked_size_is_bounded(monkeypatch):
    monkeypatch.setattr(checkpoint_module, "MAX_TOTAL_BYTES", 100 << 10)
    with pytest.raises(CheckpointError, match=r"unpacks to 0\.40\d MiB, more than the 0\.0977 MiB"):
        load_model(MODEL)


def test_a_damaged_record_fails_its_crc_and_is_refused(tmp_path):
    damaged, member = corrupted_record(MODEL, tmp_path / "damaged.pt")
    with pytest.raises(CheckpointError, match=f"member '{member}' is damaged: its CRC-32") as error:
        load_model(damaged)
    assert is_user_error(error.value) and "damaged.pt" in str(error.value)


def test_a_damaged_central_directory_is_refused(tmp_path):
    data = bytearray(MODEL.read_bytes())
    with zipfile.ZipFile(MODEL) as archive:
        member = archive.infolist()[-1]
    data[member.header_offset : member.header_offset + 4] = b"XXXX"  # its local header
    (tmp_path / "cut.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"cut.pt': member '{member.filename}' is damaged"):
        load_model(tmp_path / "cut.pt")


# ------------------------------------------------------------------ the architecture
@pytest.mark.parametrize("stem", sorted(ABSURD_CONFIGS))
def test_absurd_architectures_are_refused_naming_the_key(stem, tmp_path):
    key, value = ABSURD_CONFIGS[stem]
    crafted = absurd_config(MODEL, tmp_path / f"{stem}.pt", key, value)
    with pytest.raises(CheckpointError) as error:
        load_model(crafted)
    message = str(error.value)
    assert f"{stem}.pt" in message and key in message and "\n" not in message


@pytest.mark.parametrize(
    "change, message",
    [
        ({"embedding": [8, MAX_WIDTH + 1]}, r"embedding = \[8, 4097\]"),
        ({"fitting": [16] * 17}, "fitting has 17 layers; at most 16"),
        ({"axis_neurons": 32, "embedding": [8, 16]}, r"axis_neurons = 32 .* embedding\[-1\] = 16"),
        ({"num_scalars": -1}, "num_scalars = -1 must lie in"),
        ({"dim": True}, "dim must be 2 or 3, got True"),
        ({"residual": "no"}, "residual = 'no' must be true or false"),
        ({"embedding": [4096, 4096, 4096]}, "parameters, more than 16777216"),
        ({"pooling": ["volume"]}, "pooling"),
    ],
)
def test_the_network_checks_every_number_of_its_config(change, message):
    config = {"dim": 2, "num_scalars": 3, "num_vectors": 1, **change}
    with pytest.raises(ValueError, match=message):
        VectorCloudNet.from_config(config)


def test_the_baseline_checks_its_config_too():
    with pytest.raises(ValueError, match=r"point_widths = \[0\]"):
        BaselineNet.from_config({"dim": 2, "num_scalars": 1, "num_vectors": 1, "point_widths": [0]})
    with pytest.raises(ValueError, match="unknown BaselineNet config keys"):
        BaselineNet.from_config({"dim": 2, "num_scalars": 1, "num_vectors": 1, "depth": 3})
    assert BaselineNet.from_config({"dim": 3, "num_scalars": 1, "num_vectors": 1}).output_kind


def test_nan_weights_are_refused(tmp_path):
    payload = torch.load(MODEL, weights_only=True)
    name = next(iter(payload["model_state"]))
    payload["model_state"][name] = payload["model_state"][name].clone()
    payload["model_state"][name].view(-1)[0] = float("nan")
    torch.save(payload, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=f"weight '{name}' holds 1 NaN/inf"):
        load_model(tmp_path / "nan.pt")


# ------------------------------------------------------------------ export writes all or nothing
def test_export_of_a_bad_checkpoint_writes_nothing_and_keeps_the_target(tmp_path):
    target = tmp_path / "out" / "model.pt"
    target.parent.mkdir()
    target.write_bytes(b"an older export")
    crafted = absurd_config(MODEL, tmp_path / "bad.pt", "embedding", [-3, 8])
    with pytest.raises(CheckpointError, match=r"embedding = \[-3, 8\]"):
        export_model(crafted, target)
    assert target.read_bytes() == b"an older export"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.pt"]
    with pytest.raises(CheckpointError):
        export_model(crafted, tmp_path / "fresh" / "model.pt")
    assert not (tmp_path / "fresh").exists()


def test_export_that_does_not_load_back_is_removed(tmp_path, monkeypatch):
    target = tmp_path / "model.pt"
    target.write_bytes(b"an older export")
    seen = []

    def refuse(path, **kwargs):
        seen.append(Path(path))
        assert Path(path).stat().st_size > 1000  # the complete copy, under a temporary name
        raise CheckpointError(f"checkpoint {str(path)!r}: simulated unreadable copy")

    monkeypatch.setattr(checkpoint_module, "load_model", refuse)
    with pytest.raises(CheckpointError, match="does not load back: .*simulated"):
        export_model(MODEL, target)
    assert seen and seen[0].parent == tmp_path and seen[0] != target
    assert target.read_bytes() == b"an older export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    monkeypatch.undo()
    export_model(MODEL, target)  # and a good export replaces it
    assert load_model(target).metadata["exported_from"] == str(MODEL)


def test_atomic_write_validates_before_replacing(tmp_path):
    target = tmp_path / "file"
    target.write_text("old")

    def refuse(path):
        assert path.read_text() == "new" and path != target
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        atomic_write(target, lambda stream: stream.write(b"new"), validate=refuse)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["file"]


# ------------------------------------------------------------------ devices
@pytest.mark.parametrize("device", ["cpu", "auto", torch.device("cpu")])
def test_load_closure_accepts_the_documented_devices(device):
    closure = load_closure(MODEL, device=device)
    expected = "cuda" if device == "auto" and torch.cuda.is_available() else "cpu"
    assert closure.device.type == expected


@pytest.mark.parametrize(
    "device", ["mps", "CPU", " cpu", "cuda:", "cuda:-1", "cuda:x", "cuda:0 ", "gpu", 0, None,
               torch.device("meta")],
)
def test_load_closure_refuses_other_devices(device):
    with pytest.raises(ConfigError, match="device must be") as error:
        load_closure(MODEL, device=device)
    assert is_user_error(error.value) and isinstance(error.value, ValueError)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:7"])
def test_cuda_devices_need_cuda(device):
    if torch.cuda.is_available() and device != "cuda:7":
        assert load_closure(MODEL, device=device).device.type == "cuda"
        return
    with pytest.raises(ConfigError, match=f"device '{device}' requested but torch sees"):
        load_closure(MODEL, device=device)


# ------------------------------------------------------------------ predictions
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("nodal_volume", 0.0, r"nodal_volume is zero or negative at 3 of 72 points"),
        ("nodal_volume", -1.0, r"nodal_volume is zero or negative at 3 of 72 points"),
        ("velocity", np.nan, r"velocity holds 6 NaN/inf value\(s\) of 144"),
        ("points", np.inf, r"points holds 6 NaN/inf value\(s\) of 144"),
        ("strain_rate", np.nan, r"strain_rate holds 3 NaN/inf value\(s\) of 72"),
        ("wall_distance", -np.inf, r"wall_distance holds 3 NaN/inf value\(s\) of 72"),
    ],
)
def test_predictions_refuse_a_case_changed_after_it_was_built(closure, field, value, message):
    case = channel_case(1.0, nx=12, ny=6)  # valid when built, as a solver's state is
    getattr(case, field)[:3] = value
    with pytest.raises(CaseFileError, match=f"case 'channel_a1.000': {message}"):
        closure.predict(case)


def test_an_absurd_period_is_refused_before_allocating(closure):
    case = channel_case(1.0, nx=12, ny=6)
    case.period = np.array([1e-9, 0.0])
    with pytest.raises(TooLargeError, match=r"case 'channel_a1.000': period 1e-09 along axis 0 "
                       r"is shorter than the extent of the points .* about 2.8e\+09 times"):
        closure.predict(case)
    points, velocity = case.points, case.velocity
    with pytest.raises(TooLargeError, match=r"wrap around the period about .* times"):
        CloudSampler(points, velocity * 1e12, period=[3.0, 0.0])


def test_clouds_that_do_not_fit_are_refused_with_the_estimate(closure, monkeypatch):
    case = channel_case(1.0, nx=12, ny=6)
    with pytest.raises(TooLargeError, match=r"clouds of 1000000000000 points for 72 queries "
                       r"would hold about 7.2e\+13 entries \(~3.07 PiB\); this machine has"):
        closure.predict(case, cloud_size=10**12)
    monkeypatch.setattr(system, "machine_bytes", lambda: 20 << 10)
    with pytest.raises(TooLargeError, match=r"periodic images of the points would hold about "
                       r"1.9e\+02 points \(~23.6 KiB\); this machine has 20 KiB"):
        closure.predict(case)
    case.period = np.zeros(2)
    with pytest.raises(TooLargeError, match=r"full clouds of 72 points would hold about .* "
                       r"entries \(~.* KiB\); this machine has 20 KiB"):
        closure.predict(case)
    assert is_user_error(TooLargeError("x")) and issubclass(TooLargeError, MemoryError)


def test_the_memory_of_the_machine_is_known():
    total = system.machine_bytes()
    assert 64 << 20 < total < 1 << 50
    assert system.format_bytes(3 << 30) == "3 GiB"


def test_a_padded_archive_within_the_limits_still_loads(tmp_path):
    # the crafted archives are well-formed: only the limits refuse the larger ones
    bomb = zip_bomb(MODEL, tmp_path / "bomb.pt", member_bytes=1 << 20)
    with zipfile.ZipFile(bomb) as archive:
        assert archive.testzip() is None
    load_model(bomb)  # 1 MiB of padding is within the limits: loads
