"""Parameterised periodic-hill bottom wall (pure numpy).

The ERCOFTAC periodic-hill profile is defined piecewise in native units (hill height 28) on
``0 <= x <= 126`` and mirrored about ``x = 126``. The slope factor ``alpha`` stretches both hill
flanks in x and shifts the flat floor so that the period becomes
``L = (252 - 108 (1 - alpha)) / 28`` in hill-height units (docs/physics.md). Everything this
module returns is in hill-height units (h = 1).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = [
    "HILL_HEIGHT",
    "TOP_WALL_HEIGHT",
    "hill_flank_length",
    "hill_period",
    "hill_profile",
    "hill_profile_derivative",
]

#: Height of the hill crest, the length unit of every returned coordinate.
HILL_HEIGHT: float = 1.0

#: Height of the flat top wall, in hill heights.
TOP_WALL_HEIGHT: float = 85.0 / 28.0

# Native units: the profile tables use h = 28.
_NATIVE_HEIGHT = 28.0
_NATIVE_FLANK = 54.0  # x-extent of one hill flank before stretching
_NATIVE_HALF_PERIOD = 126.0
_NATIVE_PERIOD = 252.0

# Piecewise cubics y = c0 + c1 x + c2 x^2 + c3 x^3 on [lower, upper) in native units, as written
# in the published mesh generator (the first piece is deliberately not capped at 28).
_BREAKS = np.array([0.0, 9.0, 14.0, 20.0, 30.0, 40.0, 54.0])
_COEFFICIENTS = np.array(
    [
        [28.0, 0.0, 6.775070969851e-3, -2.124527775800e-3],
        [25.07355893131, 0.9754803562315, -1.016116352781e-1, 1.889794677828e-3],
        [25.79601052357, 0.8206693007457, -9.055370274339e-2, 1.626510569859e-3],
        [40.46435022819, -1.379581654948, 1.945884504128e-2, -2.070318932190e-4],
        [17.92461334664, 0.8743920332081, -5.567361123058e-2, 6.277731764683e-4],
        [56.39011190988, -2.010520359035, 1.644919857549e-2, 2.674976141766e-5],
    ]
)


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not np.isfinite(alpha) or alpha <= 0.0:
        raise ValueError(
            f"slope factor alpha must be a finite number > 0 (alpha = 1 is the ERCOFTAC hill, "
            f"the published family uses 0.5..2), got alpha={alpha!r}"
        )
    return alpha


def hill_period(alpha: float) -> float:
    """Streamwise period of the hill geometry.

    Args:
        alpha: slope factor (> 0); 1 gives the ERCOFTAC periodic hill.

    Returns:
        Period ``L = (252 - 108 (1 - alpha)) / 28`` in hill heights (9 at alpha = 1).

    Raises:
        ValueError: if alpha is not a finite positive number.
    """
    alpha = _check_alpha(alpha)
    return (_NATIVE_PERIOD - 2.0 * _NATIVE_FLANK * (1.0 - alpha)) / _NATIVE_HEIGHT


def hill_flank_length(alpha: float) -> float:
    """Streamwise extent of one stretched hill flank (``54 alpha / 28``), in hill heights.

    The bottom wall is flat (y = 0) for ``flank <= x <= L - flank``.

    Args:
        alpha: slope factor (> 0).

    Returns:
        Flank length in hill heights.
    """
    alpha = _check_alpha(alpha)
    return _NATIVE_FLANK * alpha / _NATIVE_HEIGHT


def _native_abscissa(x: npt.ArrayLike, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Map stretched x (h = 1) to the unstretched half-profile abscissa (native units).

    Returns the abscissa in ``[0, 126]`` on which the tabulated cubics are evaluated, and the
    derivative ``d(abscissa)/dx`` (signed: negative on the mirrored right half).
    """
    period_native = hill_period(alpha) * _NATIVE_HEIGHT
    flank = _NATIVE_FLANK * alpha
    x_stretched = np.mod(np.asarray(x, dtype=np.float64) * _NATIVE_HEIGHT, period_native)
    # Rounding in np.mod can return exactly the period; that point is the crest at x = 0.
    x_stretched = np.where(x_stretched >= period_native, 0.0, x_stretched)

    left_flank = x_stretched < flank
    right_flank = x_stretched > period_native - flank
    x_native = np.where(
        left_flank,
        x_stretched / alpha,
        np.where(
            right_flank,
            _NATIVE_PERIOD - (period_native - x_stretched) / alpha,
            x_stretched + _NATIVE_FLANK * (1.0 - alpha),
        ),
    )
    slope = np.where(left_flank | right_flank, 1.0 / alpha, 1.0)
    mirrored = x_native > _NATIVE_HALF_PERIOD
    abscissa = np.where(mirrored, _NATIVE_PERIOD - x_native, x_native)
    return abscissa, np.where(mirrored, -slope, slope)


def _piece_index(abscissa: np.ndarray) -> np.ndarray:
    # Pieces are closed on the left, so x = 9 belongs to the second cubic.
    return np.searchsorted(_BREAKS, abscissa, side="right") - 1


def _piece_coefficients(abscissa: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whether each native abscissa lies on a hill flank, and its cubic's coefficients.

    Returns:
        on_hill: bool, same shape as ``abscissa``; coefficients: (4, ...) c0..c3 of the piece
        (those of the last piece off the hill, where the caller uses 0).
    """
    piece = _piece_index(abscissa)
    on_hill = piece < len(_COEFFICIENTS)
    coefficients = _COEFFICIENTS[np.minimum(piece, len(_COEFFICIENTS) - 1)]
    return on_hill, np.moveaxis(coefficients, -1, 0)


def hill_profile(x: npt.ArrayLike, alpha: float = 1.0) -> np.ndarray:
    """Height of the bottom wall of the periodic hill.

    Args:
        x: streamwise positions in hill heights, any shape, float; wrapped periodically with
            ``hill_period(alpha)``, so any real x is accepted.
        alpha: slope factor (> 0).

    Returns:
        Bottom-wall height in hill heights, same shape as ``x``, float64. 1 at the crests
        (x = 0 and x = L), 0 on the flat floor.

    Raises:
        ValueError: if alpha is not a finite positive number.
    """
    abscissa, _ = _native_abscissa(x, alpha)
    on_hill, (c0, c1, c2, c3) = _piece_coefficients(abscissa)
    height = c0 + abscissa * (c1 + abscissa * (c2 + abscissa * c3))
    # The last cubic dips below zero just before x = 54; the published profile clips it.
    height = np.where(on_hill, np.maximum(height, 0.0), 0.0)
    return height / _NATIVE_HEIGHT


def hill_profile_derivative(x: npt.ArrayLike, alpha: float = 1.0) -> np.ndarray:
    """Slope dy/dx of the bottom wall (dimensionless).

    Args:
        x: streamwise positions in hill heights, any shape, float; wrapped periodically.
        alpha: slope factor (> 0).

    Returns:
        Slope of :func:`hill_profile`, same shape as ``x``, float64 (one-sided where the
        profile's pieces join; 0 where the clipped last piece is flat).

    Raises:
        ValueError: if alpha is not a finite positive number.
    """
    abscissa, dabscissa_dx = _native_abscissa(x, alpha)
    on_hill, (c0, c1, c2, c3) = _piece_coefficients(abscissa)
    height = c0 + abscissa * (c1 + abscissa * (c2 + abscissa * c3))
    slope_native = c1 + abscissa * (2.0 * c2 + abscissa * 3.0 * c3)
    slope_native = np.where(on_hill & (height > 0.0), slope_native, 0.0)
    # Heights and abscissae are both in native units, so only the stretch factor remains.
    return slope_native * dabscissa_dx
