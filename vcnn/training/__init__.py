"""Training of vector-cloud networks on case files (single process or torchrun data parallel).

The run itself is :func:`train` (:mod:`vcnn.training.loop`); its configuration and records
live in :mod:`vcnn.training.config`, the learning-rate schedules in
:mod:`vcnn.training.schedule`, and the checks that decide whether a run folder can be resumed
or a checkpoint used to initialise a new run in :mod:`vcnn.training.resume`.
"""

from vcnn.training.config import (
    ALL_QUERIES,
    BATCH_GROUPINGS,
    HOLD_OUT_FRACTION,
    LCURVE_COLUMNS,
    SCHEDULERS,
    EpochRecord,
    TrainConfig,
    TrainResult,
)
from vcnn.training.loop import train
from vcnn.training.schedule import CosineToFloor, build_scheduler

__all__ = [
    "ALL_QUERIES",
    "BATCH_GROUPINGS",
    "HOLD_OUT_FRACTION",
    "LCURVE_COLUMNS",
    "SCHEDULERS",
    "CosineToFloor",
    "EpochRecord",
    "TrainConfig",
    "TrainResult",
    "build_scheduler",
    "train",
]
