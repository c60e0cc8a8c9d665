"""Undershoots of a discrete tau below zero: how much of a reference tau is negative.

The continuous tau of the closure transport (docs/physics.md) is non-negative: its production
is non-negative, its destruction has the sign of tau and it vanishes on walls. A Galerkin
solution on a coarse or strongly distorted mesh has no discrete maximum principle and can dip
below zero, for instance in the recirculation at the foot of a steep hill on a coarse mesh.
Such values are discretisation error of the reference, which a closure with a non-negative
output (the default head) does not reproduce: :func:`tau_undershoot` measures them, so that
generate can warn about them and evaluate can report the error against ``max(tau, 0)``
besides the error against tau itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Values below ``-NEGATIVE_TOLERANCE * max|tau|`` count as negative; smaller negatives are
#: round-off at walls.
NEGATIVE_TOLERANCE = 1e-6
#: An undershoot is reported (a warning) when the negative part holds more than this fraction
#: of ||tau||_2: 1e-3 moves a relative L2 error by up to 0.1 points.
SIGNIFICANT_SHARE = 1e-3


@dataclass(frozen=True)
class TauUndershoot:
    """How far a tau field dips below zero.

    Attributes:
        minimum: the smallest value (0 for an empty field).
        negative_points: points below ``-NEGATIVE_TOLERANCE * max|tau|``.
        negative_share: ``||min(tau, 0)||_2 / ||tau||_2`` (0 for an all-zero field): the
            relative L2 error that predicting zero at the negative points costs on its own.
    """

    minimum: float
    negative_points: int
    negative_share: float

    @property
    def significant(self) -> bool:
        """Whether the negative part holds more than :data:`SIGNIFICANT_SHARE` of the norm."""
        return self.negative_share > SIGNIFICANT_SHARE

    def describe(self) -> str:
        """One sentence for a log line."""
        return (
            f"tau is negative at {self.negative_points} points (min {self.minimum:.3g}, "
            f"{100.0 * self.negative_share:.2f} % of ||tau||): an undershoot of the "
            "discretisation (the continuous tau is non-negative), which a closure with a "
            "non-negative output does not reproduce; a finer mesh there removes it"
        )

    def to_meta(self) -> dict[str, Any]:
        """A JSON-serialisable record for a case's meta."""
        return {
            "min": self.minimum,
            "negative_points": self.negative_points,
            "negative_share": self.negative_share,
        }


def tau_undershoot(tau: np.ndarray, *, comm: Any = None) -> TauUndershoot:
    """Measure the negative part of ``tau``.

    Args:
        tau: (N,) float tau values (the owned values of this rank when ``comm`` is given).
        comm: an mpi4py communicator to reduce over (collective), or None for local data.

    Returns:
        The :class:`TauUndershoot` of the whole field.
    """
    values = np.asarray(tau, dtype=np.float64).ravel()
    if not np.all(np.isfinite(values)):
        raise ValueError("tau holds NaN or inf values")
    local_min = float(values.min()) if values.size else math.inf
    local_max = float(np.abs(values).max()) if values.size else 0.0
    if comm is not None:
        from mpi4py import MPI

        local_min = comm.allreduce(local_min, op=MPI.MIN)
        local_max = comm.allreduce(local_max, op=MPI.MAX)
    threshold = -NEGATIVE_TOLERANCE * local_max
    negative = values[values < threshold]
    sums = np.array([negative.size, float(negative @ negative), float(values @ values)])
    if comm is not None:
        sums = comm.allreduce(sums, op=MPI.SUM)
    count, negative_square, square = sums
    return TauUndershoot(
        minimum=local_min if math.isfinite(local_min) else 0.0,
        negative_points=int(count),
        negative_share=math.sqrt(negative_square / square) if square > 0 else 0.0,
    )


__all__ = ["NEGATIVE_TOLERANCE", "SIGNIFICANT_SHARE", "TauUndershoot", "tau_undershoot"]
