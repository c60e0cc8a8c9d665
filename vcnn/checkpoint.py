"""Training checkpoints: atomic, ``weights_only``-loadable files, and model loading for inference.

A checkpoint is a plain nested dictionary of tensors, dicts, lists, strings and numbers, so that
``torch.load(path, weights_only=True)`` reads it without unpickling arbitrary objects. Its keys:

==========================  ===============================================================
key                         meaning
==========================  ===============================================================
``format``                  ``"vcnn-checkpoint"``
``format_version``          integer, bumped when the layout changes
``model_kind``              ``"VectorCloudNet"`` or ``"BaselineNet"``
``model_config``            constructor arguments (``model.to_config()``)
``model_state``             ``model.state_dict()``
``feature_normalizer``      input normaliser state (a dict of tensors/numbers) or None
``target_scale``            float, tau is learnt as ``tau / target_scale``
``feature_spec``            feature options (dict) the inputs were built with
``cloud_options``           cloud-sampler options (dict) the clouds were drawn with, resolved
``physics``                 the :class:`vcnn.physics.Physics` of the training data (dict)
``dimension``               spatial dimension of the training data
``cloud_size``              points per training cloud
``optimizer_state``         optimiser ``state_dict()`` (training checkpoints only)
``scheduler_state``         scheduler ``state_dict()``
``rng_state``               torch / CUDA / numpy generator states as tensors
``epoch``                   last completed epoch (1-based)
``seed``                    the run's seed
``best``                    best validation metrics so far and the patience counter
``train_config``            the resolved :class:`vcnn.training.TrainConfig` as a dict
``versions``                package versions (python, torch, numpy, vcnn)
``init_model``              the checkpoint a fine-tuning run started from (``--init-model``)
==========================  ===============================================================

Loading is defensive, because a checkpoint may come from anywhere. Before ``torch.load`` sees
a file, :func:`load_checkpoint` opens it as the zip archive it must be and refuses it (a
:class:`CheckpointError` naming the file) when

* it has more than :data:`MAX_MEMBERS` members, a member larger than :data:`MAX_MEMBER_BYTES`
  (64 MiB) uncompressed, or more than :data:`MAX_TOTAL_BYTES` (256 MiB) in all: a checkpoint
  of this toolkit holds a few MB, and these sizes bound the memory a load can take;
* a member over 1 MiB expands more than :data:`MAX_COMPRESSION_RATIO` times (``torch.save``
  stores its members uncompressed: a high ratio is a decompression bomb);
* the CRC-32 of a member does not match its data (``zipfile.ZipFile.testzip``, which reads
  every member once, under the size limits above: about a millisecond for a shipped model).

The file is then read with ``weights_only=True`` (no pickled objects), and every number of
the model's architecture is checked (:func:`vcnn.network.VectorCloudNet.from_config`: positive
integers, at most :data:`vcnn.network.MAX_WIDTH` wide and :data:`vcnn.network.MAX_LAYERS`
layers deep, at most :data:`vcnn.network.MAX_PARAMETERS` parameters, known names) before a
model is built.
"""

from __future__ import annotations

import logging
import os
import pickle
import platform
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vcnn.atomic import atomic_write

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "vcnn-checkpoint"
CHECKPOINT_FORMAT_VERSION = 2
#: Versions this package reads: version 1 had pooling as a cloud option and no physics.
_READABLE_VERSIONS = (1, 2)
_MODEL_KEYS = ("format", "model_kind", "model_config", "model_state")

#: Largest uncompressed member of a checkpoint archive (bytes).
MAX_MEMBER_BYTES = 64 << 20
#: Largest uncompressed size of all members of a checkpoint archive together (bytes).
MAX_TOTAL_BYTES = 256 << 20
#: Most members of a checkpoint archive (one per tensor storage, plus a few records).
MAX_MEMBERS = 10_000
#: Largest expansion of a compressed member over :data:`_RATIO_CHECKED_BYTES`.
MAX_COMPRESSION_RATIO = 100
_RATIO_CHECKED_BYTES = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or not a vcnn checkpoint."""


@dataclass
class LoadedModel:
    """A trained model ready for inference, with what is needed to build its inputs.

    Attributes:
        model: the network in eval mode on the requested device.
        feature_normalizer_state: state of the input normaliser (None when inputs were not
            normalised); rebuild it with ``FeatureNormalizer.load_state_dict``.
        target_scale: predictions of the network times this scale are tau.
        metadata: everything else in the checkpoint that describes the run (feature spec,
            cloud options, cloud size, epoch, seed, best metrics, train config, versions).
    """

    model: nn.Module
    feature_normalizer_state: dict[str, Any] | None
    target_scale: float
    metadata: dict[str, Any]


def package_versions() -> dict[str, str]:
    """Versions of the interpreter and the packages a checkpoint depends on."""
    from vcnn import __version__

    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a TorchVersion object is not weights-only loadable
        "numpy": str(np.__version__),
        "vcnn": str(__version__),
    }


def save_checkpoint(
    path: str | os.PathLike,
    payload: dict[str, Any],
    *,
    validate: Callable[[Path], object] | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary file in the same folder, fsync, rename).

    Args:
        path: target file (conventionally ``best.pt`` or ``last.pt``).
        payload: the checkpoint dictionary (see the module docstring); ``format`` and
            ``format_version`` are filled in.
        validate: called with the complete temporary file before it replaces ``path``; when
            it raises, nothing is written (see :func:`vcnn.atomic.atomic_write`).

    Returns:
        The path written.
    """
    _check_plain(payload, "checkpoint")
    path = Path(path)
    payload = {**payload, "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION}
    atomic_write(path, lambda stream: torch.save(payload, stream), validate=validate)
    return path


_PLAIN_SCALARS = (str, int, float, bool, type(None))


def _check_plain(value: Any, where: str) -> None:
    """Fail at save time on anything ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN_SCALARS:
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if type(key) not in _PLAIN_SCALARS:
                raise TypeError(f"{where}: key {key!r} of type {type(key).__name__}")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if type(value) in (list, tuple):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    raise TypeError(
        f"{where} holds a {type(value).__module__}.{type(value).__name__}, which a weights-only "
        "checkpoint cannot store; convert it to a tensor, dict, list, str or number"
    )


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``weights_only=True`` and check that it is a vcnn checkpoint.

    Args:
        path: the checkpoint file.
        map_location: device the tensors are mapped to.

    Returns:
        The checkpoint dictionary.

    Raises:
        CheckpointError: naming the file when it is missing, truncated, corrupt, holds pickled
            objects, or lacks the keys of a model checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a folder; give the .pt file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not zipfile.is_zipfile(path):
        # torch.save writes zip archives; anything else (a text file, a truncated copy) would
        # reach the unpickler and fail with a bare KeyError or similar.
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a torch checkpoint (no zip archive: a text file, "
            "or a copy cut short?)"
        )
    check_archive(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
        AttributeError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
    ) as error:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or not a weights-only torch file "
            f"(interrupted copy?); delete it or resume from another one: {error}"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is a torch file but not a vcnn checkpoint")
    missing = [key for key in _MODEL_KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks keys {missing}")
    version = payload.get("format_version")
    if version not in _READABLE_VERSIONS:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format version {version}; this vcnn reads versions "
            f"{list(_READABLE_VERSIONS)}"
        )
    if version == 1:
        _upgrade_version_1(payload)
    return payload


def check_archive(path: str | os.PathLike) -> None:
    """Refuse a checkpoint archive that is too large unpacked, a zip bomb, or corrupt.

    Reads the central directory, checks the sizes against :data:`MAX_MEMBERS`,
    :data:`MAX_MEMBER_BYTES`, :data:`MAX_TOTAL_BYTES` and :data:`MAX_COMPRESSION_RATIO`, then
    reads every member once to check its CRC-32 (bounded by the size checks). See the module
    docstring.

    Raises:
        CheckpointError: naming the file (and the member) and what is wrong.
    """
    name = str(path)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if len(members) > MAX_MEMBERS:
                raise CheckpointError(
                    f"checkpoint {name!r} holds {len(members)} archive members, more than the "
                    f"{MAX_MEMBERS} a checkpoint may hold; refused"
                )
            total = 0
            for member in members:
                size, packed = member.file_size, member.compress_size
                if size > MAX_MEMBER_BYTES:
                    raise CheckpointError(
                        f"checkpoint {name!r}: member {member.filename!r} unpacks to "
                        f"{_mib(size)}, more than the {_mib(MAX_MEMBER_BYTES)} a member may "
                        f"hold ({_mib(packed)} on disk); refused"
                    )
                if size > _RATIO_CHECKED_BYTES and size > MAX_COMPRESSION_RATIO * max(packed, 1):
                    raise CheckpointError(
                        f"checkpoint {name!r}: member {member.filename!r} unpacks from "
                        f"{_mib(packed)} to {_mib(size)}, more than {MAX_COMPRESSION_RATIO} "
                        "times (a decompression bomb; torch stores members uncompressed); refused"
                    )
                total += size
            if total > MAX_TOTAL_BYTES:
                raise CheckpointError(
                    f"checkpoint {name!r} unpacks to {_mib(total)}, more than the "
                    f"{_mib(MAX_TOTAL_BYTES)} a checkpoint may hold; refused"
                )
            bad = archive.testzip()
    except CheckpointError:
        raise
    except (
        zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError, ValueError
    ) as error:
        raise CheckpointError(
            f"checkpoint {name!r} is a damaged zip archive (interrupted copy?): {error}"
        ) from error
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {name!r}: member {bad!r} is damaged: its CRC-32 or header does not "
            "match its data (the file changed after it was written); use another copy"
        )


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.3g} MiB"


def _upgrade_version_1(payload: dict[str, Any]) -> None:
    """Version 1 kept the pooling among the cloud options and recorded no physics."""
    cloud = dict(payload.get("cloud_options") or {})
    volume_weighted = bool(cloud.pop("volume_weighted", False))
    cloud.setdefault("cutoff_start", "none")  # version 1 had no cutoff unless it said so
    payload["cloud_options"] = cloud
    if payload.get("model_kind") == "VectorCloudNet":
        config = dict(payload["model_config"])
        config.setdefault("pooling", "volume" if volume_weighted else "mean")
        payload["model_config"] = config
    payload.setdefault("physics", None)
    payload.setdefault("dimension", payload["model_config"].get("dim"))


def build_model(kind: str, config: dict[str, Any], *, source: str | None = None) -> nn.Module:
    """Build an untrained network from its kind and constructor arguments.

    Every architecture number is checked by the network's ``from_config`` before anything is
    allocated (see :data:`vcnn.network.MAX_WIDTH` and its neighbours).

    Args:
        kind: ``"VectorCloudNet"`` or ``"BaselineNet"``.
        config: the constructor arguments (``model.to_config()``).
        source: the checkpoint file they come from, named in errors.

    Raises:
        CheckpointError: for an unknown model kind or an invalid or absurd config, naming the
            key.
    """
    from vcnn.network import BaselineNet, VectorCloudNet

    where = f"checkpoint {source!r}: " if source is not None else ""
    kinds: dict[str, Any] = {"VectorCloudNet": VectorCloudNet, "BaselineNet": BaselineNet}
    if not isinstance(kind, str) or kind not in kinds:
        raise CheckpointError(f"{where}unknown model kind {kind!r}; known: {sorted(kinds)}")
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}model_config is a {type(config).__name__}, not a dict")
    try:
        return kinds[kind].from_config(dict(config))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{where}model_config: {error}") from error


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a trained network for inference.

    Args:
        path: a checkpoint written by :func:`vcnn.training.train` (``best.pt`` or ``last.pt``).
        device: where the model's parameters go.

    Returns:
        The model (eval mode, float32), the normaliser state, the target scale and the metadata.

    Raises:
        CheckpointError: when the file is unusable or its state does not fit the model config.
    """
    payload = load_checkpoint(path, map_location="cpu")
    model = _built_model(payload, path)
    model.to(device=device, dtype=torch.float32).eval()
    metadata = {
        key: value
        for key, value in payload.items()
        if key
        not in (
            "model_state",
            "optimizer_state",
            "scheduler_state",
            "rng_state",
            "training_model_state",
            "feature_normalizer",
        )
    }
    return LoadedModel(
        model=model,
        feature_normalizer_state=payload.get("feature_normalizer"),
        target_scale=float(payload.get("target_scale", 1.0)),
        metadata=metadata,
    )


def _built_model(payload: dict[str, Any], path: str | os.PathLike) -> nn.Module:
    """The checkpoint's network with its weights (CPU), every number checked.

    Raises:
        CheckpointError: naming the file when the config is invalid, the weights do not fit
            it, or a weight is NaN or infinite.
    """
    model = build_model(payload["model_kind"], payload["model_config"], source=str(path))
    state = payload["model_state"]
    try:
        if not isinstance(state, dict):
            raise TypeError(f"model_state is a {type(state).__name__}, not a dict")
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: the saved weights do not fit the saved model config: "
            f"{error}"
        ) from error
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"checkpoint {str(path)!r}: weight {name!r} holds {bad} NaN/inf value(s)"
            )
    return model


#: Entries only a resumed training run needs; an exported model leaves them out.
TRAINING_ONLY_KEYS = ("optimizer_state", "scheduler_state", "rng_state", "training_model_state")
#: What every resumable checkpoint holds (``training_model_state`` only with a weight average).
_RESUME_KEYS = ("optimizer_state", "scheduler_state", "rng_state")


def export_model(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write an inference-only copy of a checkpoint (no optimiser, scheduler or RNG state).

    The copy is a few hundred KB instead of a few MB, loads with :func:`load_model` (and
    ``torch.load(weights_only=True)``) and keeps the model config, normalisers, cloud options,
    seed, split, training config and package versions.

    Nothing is written unless the copy loads: the input is checked (archive, architecture,
    weights) before writing, and the copy is written to a temporary file in the target folder,
    loaded with :func:`load_model`, and only then renamed to ``out``; on any failure the
    temporary file is removed and an existing ``out`` is left as it was.

    Returns:
        The path written.

    Raises:
        CheckpointError: when the input is unusable or the copy does not load.
    """
    if Path(out).resolve() == Path(checkpoint).resolve():
        raise CheckpointError(
            f"export would overwrite its input {str(checkpoint)!r} (and strip its training "
            "state); give --out another file"
        )
    payload = load_checkpoint(checkpoint, map_location="cpu")
    _built_model(payload, checkpoint)  # refuse a bad input before writing anything
    for key in TRAINING_ONLY_KEYS:
        payload.pop(key, None)
    payload["exported_from"] = str(checkpoint)
    out = Path(out)

    def loads(temporary: Path) -> None:
        # an export that cannot be loaded must fail here, not at the user's
        try:
            load_model(temporary)
        except CheckpointError as error:
            raise CheckpointError(f"export to {str(out)!r} does not load back: {error}") from error

    save_checkpoint(out, payload, validate=loads)
    return out


def is_exported(payload: dict[str, Any]) -> bool:
    """Whether a checkpoint is an inference-only export (it cannot resume training)."""
    return "exported_from" in payload or any(key not in payload for key in _RESUME_KEYS)


def is_exported_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a readable inference-only export (which an export may replace).

    A training checkpoint, a file that is not a vcnn checkpoint, or one that cannot be read
    is not: :func:`export_model` is not to write over it unless the user says so.
    """
    try:
        return is_exported(load_checkpoint(path, map_location="cpu"))
    except CheckpointError:
        return False


def capture_rng_state() -> dict[str, Any]:
    """Generator states of torch (CPU and CUDA) and numpy's legacy global generator, as tensors."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_kind": str(kind),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_position": int(position),
        "numpy_has_gauss": int(has_gauss),
        "numpy_cached_gaussian": float(cached_gaussian),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the generator states captured by :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    np.random.set_state(
        (
            state["numpy_kind"],
            state["numpy_keys"].cpu().numpy().astype(np.uint32),
            int(state["numpy_position"]),
            int(state["numpy_has_gauss"]),
            float(state["numpy_cached_gaussian"]),
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu().to(torch.uint8) for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning(
                "checkpoint holds %d CUDA generator states, this machine has %d devices: "
                "CUDA generators not restored",
                len(cuda_states),
                torch.cuda.device_count(),
            )


__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_FORMAT_VERSION",
    "CheckpointError",
    "LoadedModel",
    "build_model",
    "capture_rng_state",
    "check_archive",
    "is_exported",
    "is_exported_file",
    "load_checkpoint",
    "load_model",
    "package_versions",
    "restore_rng_state",
    "save_checkpoint",
]
