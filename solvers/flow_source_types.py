"""What a flow source yields: velocity samples, and the one error its readers raise.

The readers (:mod:`solvers.flow_sources` for case files and meshio files,
:mod:`solvers.openfoam` for OpenFOAM cases) all build a :class:`FlowSource`; this module is
their common ground, so that neither reader imports the other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "SOURCE_KINDS",
    "VELOCITY_NAMES",
    "FlowSource",
    "FlowSourceError",
    "malformed_source",
]

#: Names tried, in order, for the velocity field when none is given.
VELOCITY_NAMES: tuple[str, ...] = ("U", "velocity")
#: Values of :attr:`FlowSource.kind`.
SOURCE_KINDS: tuple[str, ...] = ("case", "meshio-points", "meshio-cells", "openfoam")


class FlowSourceError(ValueError):
    """A flow source is missing, unreadable or holds no usable velocity."""


#: What a reader meets in a file whose body does not hold what its header promises: indices out
#: of range, missing entries, sizes that do not fit, values of the wrong kind.
_MALFORMED_ERRORS = (IndexError, KeyError, ValueError, TypeError, AttributeError)


@contextlib.contextmanager
def malformed_source(what: str) -> Iterator[None]:
    """Raise the errors of reading a malformed file as one FlowSourceError naming it.

    Args:
        what: the file, as the message names it (e.g. ``"flow source 'flow.vtu'"``).

    Raises:
        FlowSourceError: ``"<what> is malformed (<error>)"``; a FlowSourceError raised inside
            passes unchanged.
    """
    try:
        yield
    except FlowSourceError:
        raise
    except _MALFORMED_ERRORS as error:
        raise FlowSourceError(f"{what} is malformed ({type(error).__name__}: {error})") from None


@dataclass(frozen=True)
class FlowSource:
    """Velocity samples from another code (or another run of this one).

    Attributes:
        points: (M, s) float64 sample coordinates, s = 2 or 3 (as written by the source; a
            2-D flow may come as s = 3 with a constant z).
        velocity: (M, s) float64 velocity at the samples.
        kind: one of :data:`SOURCE_KINDS`.
        path: the source's path as given.
        field: name of the velocity field read.
        time: OpenFOAM time directory read (None for the other kinds).
        period: (s,) float64 periodic lengths the source declares (0 where not periodic), or
            None when it declares nothing.
        details: further JSON-serialisable facts (e.g. where cell centres came from).
    """

    points: np.ndarray
    velocity: np.ndarray
    kind: str
    path: str
    field: str
    time: str | None = None
    period: np.ndarray | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise FlowSourceError(f"source kind must be one of {SOURCE_KINDS}, got {self.kind!r}")
        points = np.asarray(self.points, dtype=np.float64)
        velocity = np.asarray(self.velocity, dtype=np.float64)
        where = f"{self.kind} source {self.path!r}"
        if points.ndim != 2 or points.shape[1] not in (2, 3):
            raise FlowSourceError(
                f"{where}: points must have shape (M, 2) or (M, 3), got {points.shape}"
            )
        if points.shape[0] == 0:
            raise FlowSourceError(f"{where} holds no points")
        if velocity.ndim != 2 or velocity.shape[0] != points.shape[0] or velocity.shape[1] < 2:
            raise FlowSourceError(
                f"{where}: field {self.field!r} must be a vector per point, shape "
                f"({points.shape[0]}, {points.shape[1]}); got {velocity.shape}"
            )
        if velocity.shape[1] != points.shape[1]:
            # 2-D data in 3-D containers (VTK) carry a third coordinate or component.
            if velocity.shape[1] == 3 and points.shape[1] == 2:
                points = np.column_stack([points, np.zeros(points.shape[0])])
            elif velocity.shape[1] == 2 and points.shape[1] == 3:
                velocity = np.column_stack([velocity, np.zeros(velocity.shape[0])])
            else:
                raise FlowSourceError(
                    f"{where}: field {self.field!r} has {velocity.shape[1]} components but the "
                    f"points have {points.shape[1]} coordinates"
                )
        for name, array in (("points", points), (f"velocity {self.field!r}", velocity)):
            bad = int(np.count_nonzero(~np.isfinite(array).all(axis=1)))
            if bad:
                raise FlowSourceError(
                    f"{where}: {name} is NaN or inf at {bad} of {array.shape[0]} samples"
                )
        period = None
        if self.period is not None:
            period = np.asarray(self.period, dtype=np.float64).reshape(-1)
            if period.shape[0] == 2 and points.shape[1] == 3:
                period = np.append(period, 0.0)
            if (
                period.shape != (points.shape[1],)
                or np.any(~np.isfinite(period))
                or np.any(period < 0)
            ):
                raise FlowSourceError(f"{where}: bad period {self.period!r}")
        object.__setattr__(self, "points", points)
        object.__setattr__(self, "velocity", velocity)
        object.__setattr__(self, "period", period)

    @property
    def num_points(self) -> int:
        """Number of samples M."""
        return int(self.points.shape[0])

    def to_meta(self) -> dict[str, Any]:
        """JSON-serialisable description for a case file's meta."""
        return {
            "path": self.path,
            "kind": self.kind,
            "field": self.field,
            "time": self.time,
            "num_points": self.num_points,
            "period": None if self.period is None else self.period.tolist(),
            **self.details,
        }
