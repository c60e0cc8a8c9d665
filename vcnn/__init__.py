"""Vector-cloud neural networks for learned nonlocal closures.

Pure numpy/scipy/torch: nothing here imports dolfinx, gmsh or ``solvers`` at module level, so
training and inference run on a machine that has only torch.

The public API:

- case files: :class:`Case`, :func:`read_case`, :func:`write_case`;
- physics: :class:`Physics` (the constants of the flow and the tau equation);
- clouds: :class:`CloudSampler` (ellipse, ball or k-nearest clouds, full or sampled),
  :class:`CloudOptions`;
- features: :class:`FeatureSpec`, :class:`FieldTable`, :func:`build_batch`,
  :class:`FeatureNormalizer`;
- networks: :class:`VectorCloudNet` (scalar, vector and tensor heads), :class:`BaselineNet`;
- trained closures: :func:`load_closure` -> :class:`Closure` (``.predict(case)``);
- the backends of the per-entry pass (C kernels, sparse torch, padded reference) and their
  priority list: :mod:`vcnn.engines`;
- symmetry: :func:`check_frame_independence`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vcnn.casefile import Case, CaseFileError, read_case, write_case
    from vcnn.closure import Closure, ClosurePrediction, load_closure
    from vcnn.clouds import CloudEntries, CloudOptions, Clouds, CloudSampler, PaddedClouds
    from vcnn.features import (
        CloudBatch,
        FeatureNormalizer,
        FeatureSpec,
        FieldTable,
        build_batch,
        gather_inputs,
        point_features,
    )
    from vcnn.network import BaselineNet, CloudInputError, VectorCloudNet
    from vcnn.physics import Physics
    from vcnn.symmetry import SymmetryReport, check_frame_independence

#: The distribution whose metadata holds the version (``pyproject.toml``: the one source).
DISTRIBUTION = "vcnn-closures"

#: Where each public name lives. The submodules import torch, so they are imported on first
#: use of a name (PEP 562): ``import vcnn`` and the command line's ``--help`` stay fast.
_PUBLIC = {
    "vcnn.casefile": ("Case", "CaseFileError", "read_case", "write_case"),
    "vcnn.closure": ("Closure", "ClosurePrediction", "load_closure"),
    "vcnn.clouds": ("CloudEntries", "CloudOptions", "Clouds", "CloudSampler", "PaddedClouds"),
    "vcnn.features": (
        "CloudBatch",
        "FeatureNormalizer",
        "FeatureSpec",
        "FieldTable",
        "build_batch",
        "gather_inputs",
        "point_features",
    ),
    "vcnn.network": ("BaselineNet", "CloudInputError", "VectorCloudNet"),
    "vcnn.physics": ("Physics",),
    "vcnn.symmetry": ("SymmetryReport", "check_frame_independence"),
}
_MODULE_OF = {name: module for module, names in _PUBLIC.items() for name in names}


def _version() -> str:
    """The installed version of :data:`DISTRIBUTION` (``0+unknown`` when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "0+unknown"


def __getattr__(name: str) -> Any:
    """Import a public name's submodule on first use (PEP 562)."""
    if name == "__version__":
        value: Any = _version()
    elif name in _MODULE_OF:
        value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later look-ups do not come here
    return value


def __dir__() -> list[str]:
    """The module's names, the lazily imported public ones included."""
    return sorted({*globals(), *__all__})


__all__ = [
    "BaselineNet",
    "Case",
    "CaseFileError",
    "CloudBatch",
    "CloudEntries",
    "CloudInputError",
    "CloudOptions",
    "CloudSampler",
    "Closure",
    "ClosurePrediction",
    "Clouds",
    "FeatureNormalizer",
    "FeatureSpec",
    "FieldTable",
    "PaddedClouds",
    "Physics",
    "SymmetryReport",
    "VectorCloudNet",
    "build_batch",
    "check_frame_independence",
    "gather_inputs",
    "load_closure",
    "point_features",
    "read_case",
    "write_case",
]
