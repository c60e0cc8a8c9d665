"""Hostile inputs for the checkpoint loader and the prediction path, built from a good model.

Used by ``tests/test_bad_inputs.py`` (the shared ``world``) and ``tests/test_checkpoint_safety.py``.
Every file is small on disk (the zip bomb about 100 KB more than its model) and quick to build.
"""

from __future__ import annotations

import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

from tests.ddp_scripts.synthetic_cases import channel_case
from vcnn.casefile import write_case

#: Architecture changes written into copies of a good checkpoint: file stem -> (key, value).
ABSURD_CONFIGS: dict[str, tuple[str, object]] = {
    "negative-width": ("embedding", [-3, 8]),
    "huge-width": ("embedding", [10**9]),
    "axis-neurons-0": ("axis_neurons", 0),
    "empty-fitting": ("fitting", []),
    "dim-7": ("dim", 7),
    "fractional-width": ("fitting", [32.5]),
    "unknown-activation": ("activation", "rm -rf"),
}


def zip_bomb(model: Path, out: Path, *, member_bytes: int = 80 << 20, name: str = "pad") -> Path:
    """A copy of ``model`` with one extra deflated member of ``member_bytes`` zeros.

    The member compresses about a thousand times, so the file grows by under 100 KB while the
    archive claims ``member_bytes`` more when unpacked.
    """
    with zipfile.ZipFile(model) as source, zipfile.ZipFile(out, "w") as target:
        prefix = source.namelist()[0].split("/")[0]
        for info in source.infolist():
            target.writestr(info, source.read(info))
        info = zipfile.ZipInfo(f"{prefix}/data/{name}")
        info.compress_type = zipfile.ZIP_DEFLATED
        chunk = bytes(1 << 20)
        with target.open(info, "w", force_zip64=True) as stream:
            for _ in range(member_bytes >> 20):
                stream.write(chunk)
    return out


def corrupted_record(model: Path, out: Path) -> tuple[Path, str]:
    """A copy of ``model`` with bytes flipped inside its largest stored member's data.

    Returns:
        The file and the name of the damaged member (its CRC no longer matches).
    """
    shutil.copyfile(model, out)
    with zipfile.ZipFile(out) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    assert info.compress_type == zipfile.ZIP_STORED and info.file_size >= 64
    with open(out, "r+b") as stream:
        stream.seek(info.header_offset)
        header = stream.read(30)
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + name_length + extra_length
        stream.seek(start + info.file_size // 2)
        data = stream.read(8)
        stream.seek(start + info.file_size // 2)
        stream.write(bytes(b ^ 0x5A for b in data))
    return out, info.filename


def absurd_config(model: Path, out: Path, key: str, value: object) -> Path:
    """A copy of ``model`` whose ``model_config[key]`` is ``value`` (weights unchanged)."""
    payload = torch.load(model, weights_only=True)
    payload["model_config"] = {**payload["model_config"], key: value}
    torch.save(payload, out)
    return out


def write_crafted(model: Path, folder: Path) -> Path:
    """Every crafted checkpoint and case of this module, in ``folder``.

    Files: ``bomb.pt``, ``damaged.pt``, ``<stem>.pt`` for each of :data:`ABSURD_CONFIGS`, and
    case folders ``tiny-period/`` (period 1e-9 along x) and ``fast/`` (velocity times 1e30).
    """
    folder.mkdir(parents=True, exist_ok=True)
    zip_bomb(model, folder / "bomb.pt")
    corrupted_record(model, folder / "damaged.pt")
    for stem, (key, value) in ABSURD_CONFIGS.items():
        absurd_config(model, folder / f"{stem}.pt", key, value)
    case = channel_case(1.0, nx=12, ny=6)
    case.period = np.array([1e-9, 0.0])
    case.name = "tiny_period"
    write_case(folder / "tiny-period" / "tiny_period.npz", case)
    case = channel_case(1.0, nx=12, ny=6)
    case.velocity = case.velocity * 1e30
    case.name = "fast_flow"
    write_case(folder / "fast" / "fast_flow.npz", case)
    return folder
