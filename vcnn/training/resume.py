"""Run folders of training: a new run, a resumed run or a replaced one, never a mix of two.

* :func:`check_run_folder`: a folder that already holds a run (checkpoints or a learning
  curve) is refused unless the run is resumed (``--resume``) or replaced (``--overwrite``), so
  that a new run never leaves a ``best.pt`` of the old one beside its own.
* :func:`check_resumable`: resuming continues *the same* run. Every setting that changes what
  the run computes must match the checkpoint; only the number of epochs may grow (and the
  settings of where and how fast it runs: device, threads, time limit, progress, patience).
  The one-cycle schedule is fixed by its length, so its ``epochs`` cannot change.
* :func:`check_initialisable`: a run that starts from another run's weights (``init_model``)
  must build the same network on the same inputs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vcnn.checkpoint import CheckpointError, is_exported
from vcnn.config import TRAIN_RENAMED_KEYS, ConfigError

__all__ = [
    "RUN_FILES",
    "RESUME_FREE_SETTINGS",
    "check_initialisable",
    "check_resumable",
    "check_run_folder",
    "saved_train_config",
]

#: Files that make a folder a training run.
RUN_FILES = ("last.pt", "best.pt", "lcurve.tsv")
#: Settings that may differ between the sessions of one run.
RESUME_FREE_SETTINGS = frozenset(
    {
        "epochs",
        "resume",
        "overwrite",
        "device",
        "amp",
        "progress",
        "num_threads",
        "time_limit_minutes",
        "patience",
        "data",  # the data are compared by the split's case names instead
        "out",
        "init_model",  # where the first session's weights came from; last.pt holds them now
    }
)
#: What a checkpoint that leaves a setting out meant by it, for the settings whose default
#: changed (a checkpoint of an older vcnn recorded "off" by leaving the key out).
_ABSENT_MEANS = {
    "ema_decay": 0.0,
    "queries_per_case": "all",
    "validation_queries_per_case": "all",
}
#: Settings that select the cases; compared through the resolved split.
_SPLIT_SETTINGS = frozenset(
    {
        "train_cases",
        "validation_cases",
        "test_cases",
        "train_alphas",
        "validation_alphas",
        "test_alphas",
    }
)


def check_run_folder(out_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> list[Path]:
    """Refuse to start a new run in a folder that holds another one.

    Args:
        out_dir: the run folder.
        resume: the run continues from ``last.pt``.
        overwrite: the run replaces what the folder holds.

    Returns:
        The run files present (to be removed by the caller when ``overwrite`` is set).

    Raises:
        ConfigError: for ``resume`` together with ``overwrite``, a folder that holds a run
            when neither is set, or ``resume`` without a ``last.pt`` beside other run files.
    """
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue or replace")
    present = [out_dir / name for name in RUN_FILES if (out_dir / name).is_file()]
    if not present or overwrite:
        return present
    names = ", ".join(p.name for p in present)
    if not resume:
        raise ConfigError(
            f"--out {str(out_dir)!r} already holds a training run ({names}): use --resume to "
            "continue it, --overwrite to replace it, or another --out"
        )
    if not (out_dir / "last.pt").is_file():
        raise ConfigError(
            f"--resume: {str(out_dir)!r} holds {names} but no last.pt to continue from; use "
            "--overwrite to start the run again, or another --out"
        )
    return present


def check_resumable(
    checkpoint: Mapping[str, Any],
    *,
    path: str | os.PathLike,
    config: Mapping[str, Any],
    split: Mapping[str, list[str]],
    model_config: Mapping[str, Any],
) -> None:
    """Refuse to resume from a checkpoint of another run or from an exported model.

    Args:
        checkpoint: the loaded ``last.pt``.
        path: its path (for messages).
        config: the resolved train config of this session (``TrainConfig.to_dict()``).
        split: this session's case names per split.
        model_config: the constructor arguments of this session's network.

    Raises:
        CheckpointError: naming the file and, for a mismatch, the setting with both values.
    """
    where = str(path)
    if is_exported(checkpoint):
        raise CheckpointError(
            f"--resume: {where!r} is an exported (inference-only) checkpoint without optimiser "
            "and generator state; resume needs the last.pt a training run wrote"
        )
    saved = saved_train_config(checkpoint)
    saved.setdefault("seed", checkpoint.get("seed"))
    for key, meant in _ABSENT_MEANS.items():
        saved.setdefault(key, meant)
    if saved.get("scheduler") == "onecycle" and not _same(saved.get("epochs"), config.get("epochs")):
        raise CheckpointError(
            f"--resume: {where!r} runs the onecycle schedule, whose shape is fixed by its "
            f"length ({saved.get('epochs')} epochs), so epochs cannot change to "
            f"{config.get('epochs')}; resume with epochs = {saved.get('epochs')}, or start a "
            "run with scheduler = \"cosine\", which extends smoothly"
        )
    mismatches = []
    for key in sorted(set(saved) | set(config)):
        if key in RESUME_FREE_SETTINGS or key in _SPLIT_SETTINGS:
            continue
        if not _same(saved.get(key), config.get(key)):
            mismatches.append(f"{key}: {saved.get(key)!r} in the checkpoint, {config.get(key)!r} now")
    if "split" in checkpoint and not _same(dict(checkpoint["split"]), dict(split)):
        mismatches.append(f"data (cases per split): {dict(checkpoint['split'])} in the checkpoint, "
                          f"{dict(split)} now")
    if not _same(checkpoint.get("model_config"), dict(model_config)):
        mismatches.append(
            f"model architecture: {checkpoint.get('model_config')} in the checkpoint, "
            f"{dict(model_config)} now"
        )
    if mismatches:
        raise CheckpointError(
            f"--resume: {where!r} belongs to a run with other settings ({'; '.join(mismatches)}); "
            "resume with the run's settings (only epochs may grow), or train into another --out"
        )


def saved_train_config(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The ``train_config`` a checkpoint records, under the current key names.

    A checkpoint of an earlier release records ``data_dir`` and ``out_dir``; they are read as
    ``data`` and ``out`` (:data:`vcnn.config.TRAIN_RENAMED_KEYS`), silently: the file is a
    record, not a config the user can edit.
    """
    saved = dict(checkpoint.get("train_config") or {})
    return {TRAIN_RENAMED_KEYS.get(key, key): value for key, value in saved.items()}


def check_initialisable(
    metadata: Mapping[str, Any],
    *,
    path: str | os.PathLike,
    model_kind: str,
    model_config: Mapping[str, Any],
    feature_spec: Mapping[str, Any],
) -> None:
    """Refuse to start a run from a checkpoint whose network or inputs differ from the run's.

    Args:
        metadata: the checkpoint's records (``model_kind``, ``model_config``,
            ``feature_spec``, and ``train_config`` for the message).
        path: the checkpoint (for messages).
        model_kind: the class name of this run's network.
        model_config: the constructor arguments of this run's network.
        feature_spec: this run's input specification (``FeatureSpec.to_dict()``).

    Raises:
        CheckpointError: naming the file and every differing key with both values.
    """
    differences = []
    if metadata.get("model_kind") != model_kind:
        differences.append(f"kind: {metadata.get('model_kind')!r} in it, {model_kind!r} now")
    for what, theirs, ours in (
        ("model", dict(metadata.get("model_config") or {}), dict(model_config)),
        ("features", dict(metadata.get("feature_spec") or {}), dict(feature_spec)),
    ):
        for key in sorted(set(theirs) | set(ours)):
            if not _same(theirs.get(key), ours.get(key)):
                differences.append(
                    f"{what} {key}: {theirs.get(key)!r} in it, {ours.get(key)!r} now"
                )
    if not differences:
        return
    table = (metadata.get("train_config") or {}).get("model")
    hint = f" (its run's [train.model] table: {dict(table)})" if table is not None else ""
    raise CheckpointError(
        f"--init-model {str(path)!r}: the network differs from the checkpoint's "
        f"({'; '.join(differences)}); give the checkpoint's [train.model] and [train.features] "
        f"tables{hint}"
    )


def _same(a: Any, b: Any) -> bool:
    """Equality of config values, with lists and tuples alike and floats to round-off."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b
