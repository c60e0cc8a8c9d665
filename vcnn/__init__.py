"""Vector-cloud neural networks for learned nonlocal closures.

Pure numpy/scipy/torch: nothing here imports dolfinx, gmsh or ``solvers`` at module level, so
training and inference run on a machine that has only torch.

The public API:

- case files: :class:`Case`, :func:`read_case`, :func:`write_case`;
- clouds: :class:`CloudSampler` (ellipse, ball or k-nearest clouds, full or sampled);
- features: :class:`FeatureSpec`, :func:`build_batch`, :class:`FeatureNormalizer`;
- networks: :class:`VectorCloudNet` (scalar, vector and tensor heads), :class:`BaselineNet`;
- symmetry: :func:`check_frame_independence`.
"""

from vcnn.casefile import Case, CaseFileError, read_case, write_case
from vcnn.clouds import CloudEntries, Clouds, CloudSampler, PaddedClouds
from vcnn.features import (
    CloudBatch,
    FeatureNormalizer,
    FeatureSpec,
    build_batch,
    pair_features,
    point_features,
)
from vcnn.network import BaselineNet, CloudInputError, VectorCloudNet
from vcnn.symmetry import SymmetryReport, check_frame_independence

__version__ = "0.1.0"

__all__ = [
    "BaselineNet",
    "Case",
    "CaseFileError",
    "CloudBatch",
    "CloudEntries",
    "CloudInputError",
    "CloudSampler",
    "Clouds",
    "FeatureNormalizer",
    "FeatureSpec",
    "PaddedClouds",
    "SymmetryReport",
    "VectorCloudNet",
    "build_batch",
    "check_frame_independence",
    "pair_features",
    "point_features",
    "read_case",
    "write_case",
]
