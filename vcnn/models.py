"""The models shipped with the repository, reachable by a short name.

Every verb that takes a model (``vcnn evaluate``, ``simulate``, ``export``, ``train
--init-model``, :func:`vcnn.load_closure`) accepts a path or one of these names::

    vcnn simulate --model coupled --alphas 1.45 --coupling two-way --compare --out results/sim
    vcnn evaluate --model published --data data/hills --out results/evaluate

``published`` is the network of ``experiments/published`` (one-way, frozen production: the
published recipe) and ``coupled`` the one of ``experiments/coupled`` (trained on two-way coupled
cases). The names resolve against the repository this package was imported from, never the
current folder, so they work from anywhere. A file that exists wins over a name: a checkpoint
saved as ``./coupled`` is that file, not the shipped model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from vcnn.checkpoint import CheckpointError

logger = logging.getLogger("vcnn")

#: The repository root: the folder above the ``vcnn`` package (an editable install or a clone).
REPOSITORY = Path(__file__).resolve().parents[1]

#: Each shipped model's name and its checkpoint, relative to :data:`REPOSITORY`.
SHIPPED_MODELS: dict[str, str] = {
    "published": "experiments/published/model/best.pt",
    "coupled": "experiments/coupled/model/best.pt",
}


def shipped_model_names() -> str:
    """The shipped names for a message: ``published (experiments/...), coupled (...)``."""
    return ", ".join(f"{name} ({path})" for name, path in SHIPPED_MODELS.items())


def resolve_model(model: str | os.PathLike, *, flag: str = "--model") -> Path:
    """The checkpoint a ``--model`` value means: an existing file, else a shipped model's.

    Args:
        model: a checkpoint path, or a name of :data:`SHIPPED_MODELS`.
        flag: the flag or config key that gave it, for the message.

    Returns:
        ``model`` itself when it is an existing file (or a folder that is no shipped name, left
        to the loader to refuse), else the shipped checkpoint of that name.

    Raises:
        CheckpointError: naming the path and listing the shipped names, when ``model`` is
            neither an existing file nor a shipped name, or names a shipped model that this
            installation lacks (a wheel without the repository's ``experiments/``).
    """
    path = Path(model)
    text = str(model)
    if path.is_file() or (path.exists() and text not in SHIPPED_MODELS):
        return path
    if text not in SHIPPED_MODELS:
        raise CheckpointError(
            f"{flag} {text!r} does not exist and is no shipped model name; shipped models: "
            f"{shipped_model_names()}"
        )
    shipped = REPOSITORY / SHIPPED_MODELS[text]
    if not shipped.is_file():
        raise CheckpointError(
            f"{flag} {text!r}: the shipped model is not at {str(shipped)!r} (the models ship "
            "with the repository: use a clone and `pip install -e .`, or give a checkpoint path)"
        )
    if path.exists():  # a folder named like the model: it cannot be a checkpoint, say which won
        logger.info("%s %s: the folder ./%s is no checkpoint; using %s", flag, text, text, shipped)
    return shipped


__all__ = ["REPOSITORY", "SHIPPED_MODELS", "resolve_model", "shipped_model_names"]
