"""The physical constants of the flow and the closure, in one place (docs/physics.md).

Everything that shapes the data a closure is trained on lives in :class:`Physics`: the solvers
read it to build their equations, ``vcnn generate`` records it in every case file's meta (key
``"physics"``), training reads it back from the cases, stores it in the checkpoint, and a
simulation compares the checkpoint's physics with its own before it lets a network replace the
tau equation. Pure Python: importable on a machine without the FEM stack.

The tau equation (dimensionless, hill height h = 1):

    u . grad(tau) - div(D grad tau) + zeta |tau|^p tau = gamma l_m sqrt(tau_P) |S|^2,

with l_m = min(kappa d, mixing_length_cap), tau_P = tau_p (``production = "frozen"``) or
tau_P = tau (``"coupled"``). p = 1 (``reaction_exponent``) reproduces the published data;
p = 1/2 is the form the published solver source reads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

__all__ = [
    "CHOICE_CONSTANTS",
    "CONSTANT_RANGES",
    "KAPPA",
    "MIXING_LENGTH_CAP",
    "PRODUCTION_MODES",
    "SUPG_LENGTHS",
    "Physics",
    "PhysicsMismatchError",
    "Range",
    "check_constant",
    "wall_feature_cap",
]

#: Von Karman constant of the mixing-length model.
KAPPA = 0.41
#: Cap of the mixing length, 0.09 * 1.5 (docs/physics.md).
MIXING_LENGTH_CAP = 0.09 * 1.5
#: Production modes of the tau equation.
PRODUCTION_MODES = ("frozen", "coupled")
#: Element lengths h of the tau equation's SUPG parameter (docs/physics.md).
SUPG_LENGTHS = ("diameter", "flow")
#: The constants that are names, with their allowed values.
CHOICE_CONSTANTS = {"production": PRODUCTION_MODES, "supg_length": SUPG_LENGTHS}


@dataclass(frozen=True)
class Range:
    """An interval of allowed values of a constant; every constant must also be finite.

    Attributes:
        low: lower bound.
        high: upper bound (inf: none).
        low_closed: ``low`` itself is allowed.
        high_closed: ``high`` itself is allowed.
    """

    low: float
    high: float = math.inf
    low_closed: bool = False
    high_closed: bool = False

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return math.isfinite(value) and above and below

    def __str__(self) -> str:
        high = "inf" if math.isinf(self.high) else f"{self.high:g}"
        return (
            f"{'[' if self.low_closed else '('}{self.low:g}, {high}"
            f"{']' if self.high_closed else ')'}"
        )


#: Allowed values of each constant of :class:`Physics` (and of a network closure's cloud
#: threshold ``eps``). Every constant is positive and finite, except C_k, which may be 0 (one-way
#: coupling: the flow does not see tau); eps is the decay threshold of the cloud ellipse, in
#: (0, 1).
CONSTANT_RANGES: dict[str, Range] = {
    "nu": Range(0.0),
    "bulk_velocity": Range(0.0),
    "diffusivity": Range(0.0),
    "zeta": Range(0.0),
    "reaction_exponent": Range(0.0),
    "gamma": Range(0.0),
    "tau_p": Range(0.0),
    "c_k": Range(0.0, low_closed=True),
    "eps": Range(0.0, 1.0),
}


def check_constant(name: str, value: Any, *, where: str = "physics.") -> float:
    """A constant of :data:`CONSTANT_RANGES` as a float, refused outside its range.

    Args:
        name: the constant's name (a key of :data:`CONSTANT_RANGES`).
        value: its value (a number; booleans and strings are refused).
        where: put before the name in the message (e.g. ``"[simulate.physics] "``).

    Raises:
        ValueError: naming the constant, its range and the value.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}{name} must be a number, got {value!r}")
    allowed = CONSTANT_RANGES[name]
    if float(value) not in allowed:
        raise ValueError(f"{where}{name} must be a finite number in {allowed}, got {value}")
    return float(value)


def wall_feature_cap() -> float:
    """Wall distance beyond which the mixing length saturates, ``cap / kappa``."""
    return MIXING_LENGTH_CAP / KAPPA


class PhysicsMismatchError(ValueError):
    """Two sets of physical constants that must agree do not (e.g. a model and a solver)."""


@dataclass(frozen=True)
class Physics:
    """Physical constants of the flow and of the tau equation.

    Attributes:
        nu: molecular viscosity (Re = 100 on h and the crest bulk velocity at nu = 0.01).
        bulk_velocity: target area-averaged streamwise velocity U_b of a body-force-driven flow.
        diffusivity: D of the tau equation.
        zeta: destruction coefficient.
        reaction_exponent: p of the destruction term zeta |tau|^p tau (1: the published data;
            0.5: the published solver source).
        gamma: production coefficient.
        tau_p: production level tau_P of the frozen mode.
        production: ``"frozen"`` (P fixed by tau_p) or ``"coupled"`` (tau_P = tau).
        c_k: eddy-viscosity coefficient of two-way coupling, nu_t = C_k l_m sqrt(max(tau, 0));
            0 is one-way (the flow does not see tau).
        supg_length: element length h of the tau equation's SUPG parameter: ``"diameter"``
            (the cell diameter; the published data and the shipped 2-D models) or ``"flow"``
            (the cell's extent along u, ``|u| / |J^-1 u|``, the diameter where u = 0; the
            shipped 3-D model). ``"flow"`` does not depend on the cell size across the flow,
            so an extruded 3-D case reproduces its 2-D section whatever the spanwise cells;
            use it in 3-D, where the diameter counts the span and lets tau dip below zero
            on steep hills.

    The allowed values of each constant are in :data:`CONSTANT_RANGES` (all positive and
    finite; C_k may be 0).
    """

    nu: float = 0.01
    bulk_velocity: float = 0.721039
    diffusivity: float = 0.1
    zeta: float = 3.0
    reaction_exponent: float = 1.0
    gamma: float = 200.0
    tau_p: float = 0.001
    production: str = "frozen"
    c_k: float = 0.0
    supg_length: str = "diameter"

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name in CHOICE_CONSTANTS:
                allowed = CHOICE_CONSTANTS[item.name]
                if value not in allowed:
                    raise ValueError(
                        f"physics.{item.name} must be one of {allowed}, got {value!r}"
                    )
                continue
            object.__setattr__(self, item.name, check_constant(item.name, value))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML-friendly dictionary."""
        return asdict(self)

    def flat_case_meta(self) -> dict[str, Any]:
        """The flat physics keys of a case file's meta (beside its ``physics`` dictionary).

        Case files have carried them since the first release (``D`` for the diffusivity);
        readers that know only those keep working.
        """
        return {
            "nu": self.nu,
            "D": self.diffusivity,
            "zeta": self.zeta,
            "reaction_exponent": self.reaction_exponent,
            "gamma": self.gamma,
            "tau_p": self.tau_p,
            "production": self.production,
            "c_k": self.c_k,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Physics:
        """Build from a mapping; unknown keys raise ValueError naming the known ones."""
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown physics keys {unknown}; known: {sorted(known)}")
        return cls(**dict(values))

    @classmethod
    def from_case_meta(cls, meta: Mapping[str, Any]) -> Physics | None:
        """The physics a case file was generated with (its ``meta``), or None if it says not.

        Case files of this package hold a ``"physics"`` table. Older case files (and files of
        other codes that follow the docs/design.md keys) give the constants as flat keys
        (``D``, ``zeta``, ``gamma``, ``tau_p``, ``production``, ``c_k``, ``nu``); their
        destruction exponent was 1/2 unless they say otherwise. A meta with neither (data of
        unknown origin) gives None.

        Raises:
            ValueError: when the meta records physics that are not valid.
        """
        if isinstance(meta.get("physics"), Mapping):
            return cls.from_dict(meta["physics"])
        if not any(key in meta for key in ("D", "zeta", "gamma", "tau_p", "nu")):
            return None
        flat = {
            "nu": meta.get("nu"),
            "bulk_velocity": meta.get("U_b"),
            "diffusivity": meta.get("D"),
            "zeta": meta.get("zeta"),
            "reaction_exponent": meta.get("reaction_exponent", 0.5 if "D" in meta else None),
            "gamma": meta.get("gamma"),
            "tau_p": meta.get("tau_p"),
            "production": meta.get("production"),
            "c_k": meta.get("c_k"),
        }
        return cls(**{key: value for key, value in flat.items() if value is not None})

    def with_overrides(self, **values: Any) -> Physics:
        """A copy with some constants replaced (None values are ignored)."""
        return replace(self, **{key: value for key, value in values.items() if value is not None})

    def differences(self, other: Physics, *, names: tuple[str, ...] | None = None) -> list[str]:
        """Human-readable list of the constants that differ (relative tolerance 1e-9)."""
        out = []
        for item in fields(self):
            if names is not None and item.name not in names:
                continue
            mine, theirs = getattr(self, item.name), getattr(other, item.name)
            same = (
                mine == theirs
                if isinstance(mine, str)
                else math.isclose(mine, theirs, rel_tol=1e-9, abs_tol=1e-15)
            )
            if not same:
                out.append(f"{item.name}: {mine!r} vs {theirs!r}")
        return out


#: The default constants: the defaults of every solver signature come from here.
DEFAULT_PHYSICS = Physics()
