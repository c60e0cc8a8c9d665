"""Numerical check of the frame independence of any cloud model (and of a point-set scalar).

:func:`check_point_set_symmetry` does the same for a scalar of a whole point set and its
gradient (a potential energy and the negative forces, :mod:`vcnn.atoms`): the value must be
invariant and the gradient equivariant under rotations, reflections (any, or the cube's
symmetries for a periodic cubic box: :func:`random_cube_symmetry`), translations and
permutations of the points.

:func:`check_frame_independence` transforms a batch of clouds and compares the model's outputs
with what an invariant (scalar) or equivariant (vector, tensor) model must return:

* ``rotation`` / ``reflection``: random orthogonal matrices R with det +1 / det -1 (QR of a
  Gaussian matrix, deterministic from the seed) applied to ``pos`` and ``vec``; a scalar output
  must not change, a vector must become ``R y``, a tensor ``R T R^T``.
* ``translation``: the model sees relative positions ``x_i - x0``, so invariance to a shift of
  the frame's origin is structural. What can still go wrong is the arithmetic of a pipeline
  that forms them: the check rebuilds absolute positions ``x_i = x0 + pos`` around a random
  query point, shifts both by a random vector ``t`` and feeds ``(x_i + t) - (x0 + t)``. For a
  relative-position model the deviation is round-off only.
* ``permutation``: an independent random reordering of the points of each cloud.
* ``padding``: ``extra_padding`` masked slots filled with large random garbage (weights too).
* ``duplication``: every point appears twice; a model that normalises by the number (or the
  total weight) of points returns the same output.

The model only needs the contract ``model(pos, vec, scal, mask=..., weight=...)`` of
:class:`vcnn.network.VectorCloudNet` (and ``volume=...`` when given, or when the model pools by
volume), so users can check their own models.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

TRANSFORMATIONS = ("rotation", "reflection", "translation", "permutation", "padding", "duplication")
_DEFAULT_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2}
_OUTPUT_KINDS = ("scalar", "vector", "tensor")
# Padding garbage is large so that any leak of a masked slot into the output is visible.
_GARBAGE_SCALE = 1e3


@dataclass(frozen=True)
class SymmetryReport:
    """Largest output deviations of a model under each transformation.

    Attributes:
        output_kind: ``"scalar"``, ``"vector"`` or ``"tensor"``.
        dtype: the output dtype, e.g. ``"torch.float64"``.
        reference_scale: ``max |y|`` over the untransformed batch, the scale of the relative
            deviations.
        num_trials: random draws per transformation.
        absolute: transformation name -> ``max |y(transformed) - expected|``.
        relative: transformation name -> absolute deviation / ``reference_scale``.
    """

    output_kind: str
    dtype: str
    reference_scale: float
    num_trials: int
    absolute: dict[str, float] = field(default_factory=dict)
    relative: dict[str, float] = field(default_factory=dict)

    @property
    def rotation(self) -> float:
        """Largest absolute deviation under proper rotations."""
        return self.absolute["rotation"]

    @property
    def reflection(self) -> float:
        """Largest absolute deviation under improper orthogonal maps (det -1)."""
        return self.absolute["reflection"]

    @property
    def translation(self) -> float:
        """Largest absolute deviation under translations of the absolute cloud."""
        return self.absolute["translation"]

    @property
    def permutation(self) -> float:
        """Largest absolute deviation under reordering of the points."""
        return self.absolute["permutation"]

    @property
    def padding(self) -> float:
        """Largest absolute deviation when masked garbage slots are appended."""
        return self.absolute["padding"]

    @property
    def duplication(self) -> float:
        """Largest absolute deviation when every point appears twice."""
        return self.absolute["duplication"]

    @property
    def max_relative(self) -> float:
        """Largest relative deviation over all transformations."""
        return max(self.relative.values())

    def default_tolerance(self) -> float:
        """Relative tolerance of the output dtype: 1e-10 (float64), 1e-5 (float32)."""
        dtype = getattr(torch, self.dtype.removeprefix("torch."), None)
        return _DEFAULT_TOLERANCE.get(dtype, 1e-5)

    def failures(self, tol: float | None = None) -> list[str]:
        """Names of the transformations whose relative deviation exceeds ``tol``."""
        limit = self.default_tolerance() if tol is None else tol
        return [name for name, value in self.relative.items() if not value <= limit]

    def passed(self, tol: float | None = None) -> bool:
        """Whether every relative deviation is at most ``tol`` (dtype default when None)."""
        return not self.failures(tol)

    def to_markdown(self) -> str:
        """A Markdown table of the absolute and relative deviations."""
        lines = [
            f"| transformation | max abs deviation | relative ({self.output_kind}, {self.dtype}) |",
            "|---|---|---|",
        ]
        for name in self.absolute:
            lines.append(f"| {name} | {self.absolute[name]:.3e} | {self.relative[name]:.3e} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def random_orthogonal(dim: int, *, determinant: int, rng: np.random.Generator) -> np.ndarray:
    """A random orthogonal matrix with the requested determinant.

    Args:
        dim: size d.
        determinant: +1 (rotation) or -1 (reflection).
        rng: numpy random generator.

    Returns:
        (d, d) float64 orthogonal matrix, Haar-distributed within its component of O(d).
    """
    if determinant not in (1, -1):
        raise ValueError(f"determinant must be +1 or -1, got {determinant}")
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    q = q * np.sign(np.diag(r))
    if np.sign(np.linalg.det(q)) != determinant:
        q[:, 0] = -q[:, 0]
    return q


def _as_tensor(value: Any, *, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    tensor = torch.as_tensor(np.asarray(value), device=device)
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor


def _infer_output_kind(model: Any, output: torch.Tensor, batch: int, dim: int) -> str:
    declared = getattr(model, "output_kind", None)
    if isinstance(declared, str) and declared in _OUTPUT_KINDS:
        return declared
    shape = tuple(output.shape)
    if shape in ((batch,), (batch, 1)):
        return "scalar"
    if shape == (batch, dim):
        return "vector"
    if shape == (batch, dim, dim):
        return "tensor"
    raise ValueError(
        f"cannot tell the output kind from the output shape {shape} (B={batch}, d={dim}); "
        f"pass output_kind='scalar', 'vector' or 'tensor'"
    )


def _transform_output(output: torch.Tensor, rotation: torch.Tensor, kind: str) -> torch.Tensor:
    """What an equivariant model must return for inputs mapped by ``rotation`` (d, d)."""
    if kind == "scalar":
        return output
    if kind == "vector":
        return output @ rotation.T
    return rotation @ output @ rotation.T


def check_frame_independence(
    model: Callable[..., torch.Tensor],
    pos: torch.Tensor | np.ndarray,
    vec: torch.Tensor | np.ndarray,
    scal: torch.Tensor | np.ndarray,
    mask: torch.Tensor | np.ndarray | None = None,
    *,
    weight: torch.Tensor | np.ndarray | None = None,
    volume: torch.Tensor | np.ndarray | None = None,
    num_trials: int = 3,
    seed: int = 0,
    extra_padding: int = 5,
    output_kind: str | None = None,
) -> SymmetryReport:
    """Measure how far a cloud model is from frame independence on one batch.

    Args:
        model: callable ``model(pos, vec, scal, mask=..., weight=...)``; a ``torch.nn.Module``
            is evaluated in eval mode under ``torch.no_grad`` and its mode restored after.
        pos: (B, n, d) float, relative positions ``x_i - x0``.
        vec: (B, n, k, d) float, per-point vectors.
        scal: (B, n, s) float, per-point invariant scalars.
        mask: (B, n) bool or None (all points real).
        weight: (B, n) float or None; passed to the model only when given.
        volume: (B, n) float > 0 or None: quadrature weights of the points, passed to the
            model when given; for a model that pools by volume (``model.pooling ==
            "volume"``) random volumes in [0.5, 1.5] are drawn when none are given.
        num_trials: random draws per transformation (rotation, reflection, translation,
            permutation, padding).
        seed: seed of every random draw; the same seed gives the same report.
        extra_padding: number of masked garbage slots appended for the padding check (>= 1).
        output_kind: ``"scalar"``, ``"vector"`` or ``"tensor"``; None reads
            ``model.output_kind`` or infers it from the output shape.

    Returns:
        A :class:`SymmetryReport`; ``report.passed(tol)`` checks all relative deviations.

    Raises:
        ValueError: on invalid options, inputs that are not (B, n, d)-shaped, or an output
            kind that cannot be inferred.
    """
    if num_trials < 1:
        raise ValueError(f"num_trials must be >= 1, got {num_trials}")
    if extra_padding < 1:
        raise ValueError(f"extra_padding must be >= 1, got {extra_padding}")
    if output_kind is not None and output_kind not in _OUTPUT_KINDS:
        raise ValueError(f"output_kind must be one of {_OUTPUT_KINDS} or None, got {output_kind!r}")

    parameters = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
    device = parameters[0].device if parameters else torch.device("cpu")
    float_dtype = parameters[0].dtype if parameters else None
    pos = _as_tensor(pos, device=device, dtype=float_dtype)
    vec = _as_tensor(vec, device=device, dtype=float_dtype)
    scal = _as_tensor(scal, device=device, dtype=float_dtype)
    if pos.ndim != 3 or vec.ndim != 4 or scal.ndim != 3:
        raise ValueError(
            f"expected pos (B, n, d), vec (B, n, k, d), scal (B, n, s); got shapes "
            f"{tuple(pos.shape)}, {tuple(vec.shape)}, {tuple(scal.shape)}"
        )
    batch, n, dim = pos.shape
    device = pos.device
    mask = (
        torch.ones(batch, n, dtype=torch.bool, device=device)
        if mask is None
        else _as_tensor(mask, device=device, dtype=None).to(torch.bool)
    )
    if weight is not None:
        weight = _as_tensor(weight, device=device, dtype=float_dtype)

    rng = np.random.default_rng(seed)
    if volume is None and getattr(model, "pooling", None) == "volume":
        volume = 0.5 + rng.random((batch, n))
    if volume is not None:
        volume = _as_tensor(volume, device=device, dtype=float_dtype)

    def to_device(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(array, device=device, dtype=like.dtype)

    was_training = model.training if isinstance(model, torch.nn.Module) else None
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        with torch.no_grad():

            def evaluate(
                p: torch.Tensor,
                v: torch.Tensor,
                s: torch.Tensor,
                m: torch.Tensor,
                w: torch.Tensor | None,
                vol: torch.Tensor | None = volume,
            ) -> torch.Tensor:
                options = {} if w is None else {"weight": w}
                if vol is not None:
                    options["volume"] = vol
                return model(p, v, s, mask=m, **options)

            reference = evaluate(pos, vec, scal, mask, weight)
            kind = output_kind or _infer_output_kind(model, reference, batch, dim)
            if kind == "scalar" and reference.ndim == 2:
                reference = reference[:, 0]
            absolute: dict[str, float] = dict.fromkeys(TRANSFORMATIONS, 0.0)

            def record(name: str, output: torch.Tensor, expected: torch.Tensor) -> None:
                output = output.reshape(expected.shape)
                deviation = float((output - expected).abs().max())
                if not np.isfinite(deviation):
                    deviation = float("inf")
                absolute[name] = max(absolute[name], deviation)

            length_scale = float(pos[mask].abs().max()) if bool(mask.any()) else 1.0
            length_scale = length_scale or 1.0
            for _ in range(num_trials):
                for name, determinant in (("rotation", 1), ("reflection", -1)):
                    matrix = to_device(
                        random_orthogonal(dim, determinant=determinant, rng=rng), pos
                    )
                    output = evaluate(pos @ matrix.T, vec @ matrix.T, scal, mask, weight)
                    record(name, output, _transform_output(reference, matrix, kind))

                anchor = to_device(rng.standard_normal((batch, 1, dim)) * length_scale, pos)
                shift = to_device(rng.standard_normal(dim) * length_scale, pos)
                absolute_positions = anchor + pos
                moved = (absolute_positions + shift) - (anchor + shift)
                record("translation", evaluate(moved, vec, scal, mask, weight), reference)

                order = torch.as_tensor(
                    np.argsort(rng.random((batch, n)), axis=1), device=device, dtype=torch.long
                )
                output = evaluate(
                    torch.take_along_dim(pos, order[..., None], dim=1),
                    torch.take_along_dim(vec, order[..., None, None], dim=1),
                    torch.take_along_dim(scal, order[..., None], dim=1),
                    torch.take_along_dim(mask, order, dim=1),
                    None if weight is None else torch.take_along_dim(weight, order, dim=1),
                    None if volume is None else torch.take_along_dim(volume, order, dim=1),
                )
                record("permutation", output, reference)

                def garbage(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
                    return to_device(rng.standard_normal(shape) * _GARBAGE_SCALE, like)

                padded_weight = (
                    None
                    if weight is None
                    else torch.cat([weight, garbage((batch, extra_padding), weight)], dim=1)
                )
                output = evaluate(
                    torch.cat([pos, garbage((batch, extra_padding, dim), pos)], dim=1),
                    torch.cat([vec, garbage((batch, extra_padding, *vec.shape[2:]), vec)], dim=1),
                    torch.cat([scal, garbage((batch, extra_padding, scal.shape[2]), scal)], dim=1),
                    torch.cat(
                        [mask, torch.zeros(batch, extra_padding, dtype=torch.bool, device=device)],
                        dim=1,
                    ),
                    padded_weight,
                    None
                    if volume is None
                    else torch.cat([volume, garbage((batch, extra_padding), volume)], dim=1),
                )
                record("padding", output, reference)

            output = evaluate(
                torch.cat([pos, pos], dim=1),
                torch.cat([vec, vec], dim=1),
                torch.cat([scal, scal], dim=1),
                torch.cat([mask, mask], dim=1),
                None if weight is None else torch.cat([weight, weight], dim=1),
                None if volume is None else torch.cat([volume, volume], dim=1),
            )
            record("duplication", output, reference)
    finally:
        if isinstance(model, torch.nn.Module) and was_training:
            model.train()

    scale = float(reference.abs().max())
    denominator = scale if scale > 0 and np.isfinite(scale) else 1.0
    report = SymmetryReport(
        output_kind=kind,
        dtype=str(reference.dtype),
        reference_scale=scale,
        num_trials=num_trials,
        absolute=absolute,
        relative={name: value / denominator for name, value in absolute.items()},
    )
    logger.debug("frame-independence check:\n%s", report)
    return report


def random_cube_symmetry(dim: int, *, determinant: int, rng: np.random.Generator) -> np.ndarray:
    """A random symmetry of the cube (a signed permutation matrix) with a given determinant.

    These are the orthogonal maps that carry a periodic cubic lattice onto itself, hence the
    rotations and reflections under which a system in a periodic cubic box is symmetric.

    Args:
        dim: size d.
        determinant: +1 (rotation) or -1 (reflection).
        rng: numpy random generator.

    Returns:
        (d, d) float64 matrix with one entry +-1 in each row and column.
    """
    if determinant not in (1, -1):
        raise ValueError(f"determinant must be +1 or -1, got {determinant}")
    matrix = np.eye(dim)[rng.permutation(dim)] * rng.choice([-1.0, 1.0], size=dim)[:, None]
    if np.sign(np.linalg.det(matrix)) != determinant:
        matrix[0] = -matrix[0]
    return matrix


@dataclass(frozen=True)
class PointSetSymmetryReport:
    """How far a scalar of a point set and its gradient are from invariance / equivariance.

    Attributes:
        value: deviations of the scalar (must be invariant), per transformation.
        gradient: deviations of its gradient with respect to the points (must transform as
            the points: ``R g`` per point under ``x -> R x``, reordered under a permutation,
            unchanged under a translation).
    """

    value: SymmetryReport
    gradient: SymmetryReport

    def failures(self, tol: float | None = None) -> list[str]:
        """``value:<name>`` / ``gradient:<name>`` of every deviation above ``tol``."""
        return [f"value:{name}" for name in self.value.failures(tol)] + [
            f"gradient:{name}" for name in self.gradient.failures(tol)
        ]

    def passed(self, tol: float | None = None) -> bool:
        """Whether every relative deviation is at most ``tol`` (dtype default when None)."""
        return not self.failures(tol)

    def to_markdown(self) -> str:
        """A Markdown table: transformation, relative deviation of the value and gradient."""
        lines = [
            f"| transformation | value (relative, {self.value.dtype}) | gradient (relative) |",
            "|---|---|---|",
        ]
        for name in self.value.relative:
            lines.append(
                f"| {name} | {self.value.relative[name]:.2e} | "
                f"{self.gradient.relative[name]:.2e} |"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


POINT_SET_TRANSFORMATIONS = ("rotation", "reflection", "translation", "permutation")


def check_point_set_symmetry(
    function: Callable[[torch.Tensor], torch.Tensor],
    points: torch.Tensor | np.ndarray,
    *,
    num_trials: int = 3,
    seed: int = 0,
    orthogonal: Callable[..., np.ndarray] = random_orthogonal,
    translation_scale: float | None = None,
) -> PointSetSymmetryReport:
    """Check a scalar of a whole point set (e.g. a potential energy) and its gradient.

    ``function`` maps points (n, d) to a scalar (an energy E); its gradient (the negative
    forces) comes from autograd. Under ``x -> R x`` (rotation, reflection), ``x -> x + t`` and
    a reordering of the points, E must be unchanged and each point's gradient must rotate with
    R, stay, or move with its point.

    Args:
        function: callable (n, d) float tensor -> scalar tensor (0-d or one element),
            differentiable in the points.
        points: (n, d) float, the point set (float64 for a round-off check).
        num_trials: random draws per transformation.
        seed: seed of every draw.
        orthogonal: draws the maps: ``orthogonal(d, determinant=+-1, rng=...)``;
            :func:`random_orthogonal` (any rotation, for a free point set) or
            :func:`random_cube_symmetry` (for a periodic cubic box).
        translation_scale: standard deviation of the random translations (default: the
            largest coordinate magnitude).

    Returns:
        A :class:`PointSetSymmetryReport` (scalar and vector :class:`SymmetryReport`).
    """
    if num_trials < 1:
        raise ValueError(f"num_trials must be >= 1, got {num_trials}")
    points = torch.as_tensor(points)
    if points.ndim != 2:
        raise ValueError(f"points must be (n, d), got shape {tuple(points.shape)}")
    count, dim = points.shape
    rng = np.random.default_rng(seed)

    def evaluate(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            leaf = x.detach().clone().requires_grad_(True)
            value = function(leaf).reshape(())
            (gradient,) = torch.autograd.grad(value, leaf)
        return value.detach(), gradient

    reference, reference_gradient = evaluate(points)
    scale = translation_scale
    if scale is None:
        scale = float(points.abs().max()) or 1.0
    value_deviation = dict.fromkeys(POINT_SET_TRANSFORMATIONS, 0.0)
    gradient_deviation = dict.fromkeys(POINT_SET_TRANSFORMATIONS, 0.0)

    def record(name: str, x: torch.Tensor, expected_gradient: torch.Tensor) -> None:
        value, gradient = evaluate(x)
        value_deviation[name] = max(value_deviation[name], float((value - reference).abs()))
        gradient_deviation[name] = max(
            gradient_deviation[name], float((gradient - expected_gradient).abs().max())
        )

    for _ in range(num_trials):
        for name, determinant in (("rotation", 1), ("reflection", -1)):
            matrix = torch.as_tensor(
                orthogonal(dim, determinant=determinant, rng=rng), dtype=points.dtype
            )
            record(name, points @ matrix.T, reference_gradient @ matrix.T)
        shift = torch.as_tensor(rng.standard_normal(dim) * scale, dtype=points.dtype)
        record("translation", points + shift, reference_gradient)
        order = torch.as_tensor(rng.permutation(count))
        record("permutation", points[order], reference_gradient[order])

    def report(kind: str, reference_value: torch.Tensor, deviation: dict) -> SymmetryReport:
        size = float(reference_value.abs().max())
        denominator = size if size > 0 and np.isfinite(size) else 1.0
        return SymmetryReport(
            output_kind=kind,
            dtype=str(points.dtype),
            reference_scale=size,
            num_trials=num_trials,
            absolute=dict(deviation),
            relative={name: value / denominator for name, value in deviation.items()},
        )

    result = PointSetSymmetryReport(
        value=report("scalar", reference, value_deviation),
        gradient=report("vector", reference_gradient, gradient_deviation),
    )
    logger.debug("point-set symmetry check:\n%s", result)
    return result


__all__ = [
    "POINT_SET_TRANSFORMATIONS",
    "TRANSFORMATIONS",
    "PointSetSymmetryReport",
    "SymmetryReport",
    "check_frame_independence",
    "check_point_set_symmetry",
    "random_cube_symmetry",
    "random_orthogonal",
]
