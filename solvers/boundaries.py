"""Boundary roles of a flow problem: walls, inlets, outlets and periodic pairs.

A :class:`BoundarySpec` names what each facet tag of a mesh means to the solvers. The hill
family has a fixed spec (:func:`hill_boundary_spec`); a user mesh gets one from its config
(:func:`solvers.case_setup.boundary_spec`), which gives every boundary group of the mesh a role
and refuses a group it does not list.
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

    A facet tag in none of the roles gets the natural conditions of the weak forms, those of an
    outlet. The config of a user mesh therefore lists every boundary group: one that is open
    without being an outlet (a far field, an open top) goes under ``natural`` there and lands
    in ``outlets`` here.

    Attributes:
        walls: tags with no slip (u = 0) and tau = 0.
        inlets: tag -> inlet velocity profile. Tau is zero on an inlet (a homogeneous
            Dirichlet condition, as on walls, whatever the profile): the inflow carries no
            tau in, and tau is made inside the domain by its production term. There is no
            setting for another inlet value.
        outlets: tags with the natural conditions: do-nothing for u (zero traction, which
            also fixes the pressure level; without any outlet the pressure is pinned at one
            point) and zero diffusive flux for tau (tau is advected out freely).
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
        boundaries: name -> tag with keys ``bottom``, ``top``, ``left``, ``right`` (and
            ``front``, ``back`` for the 3-D hills).
        period: (d,) periodic lengths; ``period[0]`` is the hill period L, ``period[2]`` the
            spanwise period L_z of a 3-D hill.

    Returns:
        Walls at bottom and top, the right side periodic with the left one (translation -L);
        in 3-D with a spanwise period, the back side (z = L_z) periodic with the front one
        (translation -L_z) as a second pair (the first pair keeps driving the flow along x).
    """
    missing = {"bottom", "top", "left", "right"} - set(boundaries)
    if missing:
        raise ValueError(f"hill mesh lacks boundary tags {sorted(missing)}")
    length = float(period[0])
    if not length > 0:
        raise ValueError(f"hill period must be positive, got {length}")
    translation = (-length,) + (0.0,) * (len(period) - 1)
    pairs = [PeriodicPair(boundaries["right"], boundaries["left"], translation)]
    if len(period) == 3 and float(period[2]) > 0:
        missing = {"front", "back"} - set(boundaries)
        if missing:
            raise ValueError(f"spanwise periodic hill mesh lacks boundary tags {sorted(missing)}")
        span = (0.0, 0.0, -float(period[2]))
        pairs.append(PeriodicPair(boundaries["back"], boundaries["front"], span))
    return BoundarySpec(walls=(boundaries["bottom"], boundaries["top"]), periodic=tuple(pairs))


def periodic_lengths(spec: BoundarySpec, gdim: int) -> tuple[float, ...]:
    """Periodic length along each axis from the spec's axis-aligned periodic pairs.

    Returns:
        (gdim,) lengths, 0 where not periodic. A pair whose translation is not along an axis
        contributes nothing (its wall images are then not included in the wall distance).
    """
    lengths = np.zeros(gdim)
    for pair in spec.periodic:
        translation = np.abs(np.asarray(pair.translation, dtype=float))
        nonzero = np.flatnonzero(translation > 0)
        if nonzero.size == 1:
            lengths[nonzero[0]] = translation[nonzero[0]]
    return tuple(float(length) for length in lengths)
