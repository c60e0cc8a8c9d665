"""Boundary roles of a flow problem: walls, inlets, outlets and periodic pairs.

A :class:`BoundarySpec` names what each facet tag of a mesh means to the solvers. The hill
family has a fixed spec (:func:`hill_boundary_spec`); a user mesh gets one from its config.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

#: Velocity profile of an inlet: ``profile(x)`` with ``x: (3, M) float64`` coordinates returns
#: ``(d, M)`` velocity components.
InletProfile = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class PeriodicPair:
    """Two boundaries identified by a translation.

    A point ``x`` on the ``slave`` boundary is the same point as ``x + translation`` on the
    ``master`` boundary.

    Attributes:
        slave: facet tag of the boundary whose dofs are eliminated.
        master: facet tag of the boundary whose dofs are kept.
        translation: (d,) float64 vector from a slave point to its master point.
    """

    slave: int
    master: int
    translation: tuple[float, ...]


@dataclass(frozen=True)
class BoundarySpec:
    """What each facet tag means to the flow and closure solvers.

    Attributes:
        walls: tags with no slip (u = 0) and tau = 0.
        inlets: tag -> inlet velocity profile; tau = 0 there as well.
        outlets: tags with the natural (do-nothing) condition for u and zero flux for tau.
        periodic: periodic pairs; with a pair and no inlet, the flow is driven by a body force
            that fixes the bulk velocity along the first pair's translation.
    """

    walls: tuple[int, ...] = ()
    inlets: Mapping[int, InletProfile] = field(default_factory=dict)
    outlets: tuple[int, ...] = ()
    periodic: tuple[PeriodicPair, ...] = ()

    def __post_init__(self) -> None:
        used: list[int] = [*self.walls, *self.inlets, *self.outlets]
        for pair in self.periodic:
            used += [pair.slave, pair.master]
        duplicates = sorted({tag for tag in used if used.count(tag) > 1})
        if duplicates:
            raise ValueError(f"facet tags {duplicates} are given more than one boundary role")
        if not self.walls and not self.inlets:
            raise ValueError("a flow problem needs at least one wall or inlet boundary")

    @property
    def dirichlet_tags(self) -> tuple[int, ...]:
        """Tags where both velocity and tau carry Dirichlet conditions (walls and inlets)."""
        return (*self.walls, *self.inlets)

    @property
    def body_force_driven(self) -> bool:
        """True when the flow is driven by a body force (periodic, no inlet)."""
        return bool(self.periodic) and not self.inlets


def hill_boundary_spec(boundaries: Mapping[str, int], period: Sequence[float]) -> BoundarySpec:
    """Boundary spec of the periodic-hill family.

    Args:
        boundaries: name -> tag with keys ``bottom``, ``top``, ``left``, ``right``.
        period: (d,) periodic lengths; ``period[0]`` is the hill period L.

    Returns:
        Walls at bottom and top, the right side periodic with the left one (translation -L).
    """
    missing = {"bottom", "top", "left", "right"} - set(boundaries)
    if missing:
        raise ValueError(f"hill mesh lacks boundary tags {sorted(missing)}")
    length = float(period[0])
    if not length > 0:
        raise ValueError(f"hill period must be positive, got {length}")
    translation = (-length,) + (0.0,) * (len(period) - 1)
    return BoundarySpec(
        walls=(boundaries["bottom"], boundaries["top"]),
        periodic=(PeriodicPair(boundaries["right"], boundaries["left"], translation),),
    )
