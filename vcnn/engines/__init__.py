"""The per-entry pass of a network (inputs -> pair kernels -> pooled moments) behind one interface.

Backends (:class:`~vcnn.engines.base.Engine`), in the order ``engine="auto"`` tries them
(:data:`~vcnn.engines.registry.ENGINES`):

* :mod:`~vcnn.engines.device` (``"device"``): data on a CUDA device only: clouds searched and
  training batches drawn on the device, pooled moments by a fused Triton kernel;
* :mod:`~vcnn.engines.fused_cpu` (``"fused"``): generated C kernels, factorised float32 nets on
  the CPU;
* :mod:`~vcnn.engines.sparse` (``"sparse"``): factorised nets by torch operations and sparse
  products, on any device;
* :mod:`~vcnn.engines.reference` (``"padded"``): the network's own ``forward`` on padded clouds,
  any network: the reference the others are tested against.

Each has a full-cloud forward (inference) and a training-rows forward with autograd (training,
validation); :func:`~vcnn.engines.registry.bind` picks and binds one, and is the only place that
handles a backend's unavailability. :class:`~vcnn.engines.training_pass.TrainingPass` is the
training pass as a module (what DistributedDataParallel wraps).
"""

from vcnn.engines.base import (
    CLOUDS,
    ROWS,
    CloudSet,
    Engine,
    EngineUnavailable,
    FullCloudResult,
    PassData,
    point_embedding,
)
from vcnn.engines.registry import ALIASES, ENGINES, REQUESTS, bind, resolve
from vcnn.engines.training_pass import TrainingPass

__all__ = [
    "ALIASES",
    "CLOUDS",
    "ENGINES",
    "REQUESTS",
    "ROWS",
    "CloudSet",
    "Engine",
    "EngineUnavailable",
    "FullCloudResult",
    "PassData",
    "TrainingPass",
    "bind",
    "point_embedding",
    "resolve",
]
