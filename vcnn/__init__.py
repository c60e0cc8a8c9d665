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

__version__ = "0.1.0"

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
