"""The priority list of the backends and the one function that picks among them.

:data:`ENGINES` lists the backends fastest first. :func:`bind` binds the requested one, or
with ``"auto"`` the first whose :meth:`~vcnn.engines.base.Engine.supports` passes and that
binds; it is the only place that handles a backend's unavailability: a backend that applies
but cannot be built here (no C compiler, ``VCNN_KERNELS=0``) is reported once per process and
reason (:func:`vcnn.engines.kernels.warn_unavailable`) and the next one runs; a requested backend that
cannot run is refused with its reason.
"""

from __future__ import annotations

import logging

from torch import nn

from vcnn.engines import device, fused_cpu, kernels, reference, sparse
from vcnn.engines.base import (
    CLOUDS,
    CloudForward,
    Engine,
    EngineUnavailable,
    PassData,
    PassKind,
    RowForward,
)

logger = logging.getLogger(__name__)

__all__ = ["ALIASES", "ENGINES", "REQUESTS", "bind", "resolve"]

#: The backends, in the order ``"auto"`` tries them. The device backend applies to data on a
#: CUDA device only, so it is first there and passed over on the CPU.
ENGINES: tuple[Engine, ...] = (device.ENGINE, fused_cpu.ENGINE, sparse.ENGINE, reference.ENGINE)

#: Other names of the backends accepted by ``engine=`` (the modules' names).
ALIASES = {"fused_cpu": "fused", "reference": "padded"}

#: Every value ``engine=`` accepts, in the order of the error message.
REQUESTS = ("auto", *(engine.name for engine in ENGINES))

#: What a kernel that did not bind is called in the warning, per form of the pass.
_KERNEL_NOUN = {"clouds": "closure", "rows": "training"}


def resolve(requested: str) -> Engine | None:
    """The backend of an ``engine=`` value (None for ``"auto"``).

    Raises:
        ValueError: for an unknown value.
    """
    name = ALIASES.get(requested, requested) if isinstance(requested, str) else requested
    if name == "auto":
        return None
    for engine in ENGINES:
        if engine.name == name:
            return engine
    choices = ", ".join(repr(value) for value in REQUESTS[:-1]) + f" or {REQUESTS[-1]!r}"
    raise ValueError(f"engine must be {choices}, got {requested!r}")


def bind(
    kind: PassKind, model: nn.Module, data: PassData, *, engine: str = "auto"
) -> CloudForward | RowForward:
    """The pass of a network on a data set, bound by the backend that runs it.

    Args:
        kind: ``"clouds"`` (the full-cloud forward) or ``"rows"`` (the training-rows
            forward).
        model: the network.
        data: its data set (table and normaliser); the device is the table's.
        engine: ``"auto"`` (the first backend of :data:`ENGINES` that runs), or a backend's
            name (:data:`REQUESTS`, :data:`ALIASES`).

    Returns:
        The bound forward; its ``engine`` attribute names the backend.

    Raises:
        ValueError: an unknown ``engine``.
        EngineUnavailable: a requested backend that does not apply (with its reason).
        KernelUnavailable: a requested backend that applies but cannot be built here.
    """
    requested = resolve(engine)
    candidates = ENGINES if requested is None else (requested,)
    for candidate in candidates:
        reason = candidate.supports(model, data, data.device)
        if reason is not None:
            if requested is not None:
                raise EngineUnavailable(f"the {candidate.name} engine cannot run: {reason}")
            continue
        try:
            if kind == CLOUDS:
                return candidate.full_clouds(model, data)
            return candidate.training_rows(model, data)
        except kernels.KernelUnavailable as error:
            if requested is not None:
                raise
            kernels.warn_unavailable(
                logger, f"{candidate.name} {_KERNEL_NOUN[kind]} kernel", error
            )
    raise EngineUnavailable(f"no engine runs this network ({', '.join(REQUESTS[1:])} refused)")
