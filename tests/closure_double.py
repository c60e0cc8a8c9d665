"""A stand-in for a trained closure (the contract of ``vcnn.load_closure``), for tests only.

:class:`LocalEquilibriumClosure` predicts the local-equilibrium tau of the tau equation, where
production balances destruction point by point (no transport):

    zeta tau^(1+p) = gamma l_m sqrt(tau_P) |S|^2,

with tau_P = tau_p (frozen) or tau (coupled), from the strain rate and the wall distance of
the case it is given. It has the contract's ``physics`` record, ``predict`` and
``predict_detailed``, and modes that misbehave on purpose (NaN, negative or growing output).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from vcnn.physics import KAPPA, MIXING_LENGTH_CAP, Physics


class LocalEquilibriumClosure:
    """Algebraic local-equilibrium tau with the interface of a loaded network closure.

    Args:
        physics: constants of :class:`vcnn.physics.Physics` (defaults for missing ones).
        eps: the cloud threshold recorded in ``physics``.
        dimension: the dimension recorded in ``physics``.
        nan_from_call: from this call on (1-based), predict NaN at a few points.
        negative_from_call: from this call on, predict tau of the opposite sign.
        growing: multiply the output by exp(growing * (-3)^k) at call k, a positive
            oscillation that grows (the fixed-point map is made to diverge).
    """

    def __init__(
        self,
        physics: dict | None = None,
        *,
        eps: float = 0.2,
        dimension: int = 2,
        nan_from_call: int | None = None,
        negative_from_call: int | None = None,
        growing: float = 0.0,
    ) -> None:
        self._physics = Physics.from_dict(physics or {})
        self._eps = eps
        self._dimension = dimension
        self._nan_from_call = nan_from_call
        self._negative_from_call = negative_from_call
        self._growing = growing
        self.calls = 0

    @property
    def physics(self) -> dict:
        return {**self._physics.to_dict(), "eps": self._eps, "dimension": self._dimension}

    def _equilibrium(self, case) -> np.ndarray:
        physics = self._physics
        length = np.minimum(KAPPA * case.wall_distance, MIXING_LENGTH_CAP)
        drive = physics.gamma * length * case.strain_rate**2 / physics.zeta
        p = physics.reaction_exponent
        if physics.production == "frozen":
            return (np.sqrt(physics.tau_p) * drive) ** (1.0 / (1.0 + p))
        return drive ** (1.0 / (p + 0.5))

    def predict(self, case) -> np.ndarray:
        self.calls += 1
        tau = self._equilibrium(case)
        if self._growing:
            tau = tau * np.exp(self._growing * (-3.0) ** self.calls)
        if self._negative_from_call is not None and self.calls >= self._negative_from_call:
            tau = -tau
        if self._nan_from_call is not None and self.calls >= self._nan_from_call:
            tau = tau.copy()
            tau[:3] = np.nan
        return tau

    def predict_detailed(self, case) -> SimpleNamespace:
        return SimpleNamespace(tau=self.predict(case), out_of_range_fraction=0.0)
