"""Frame-independent vector-cloud neural network (VCNN) and a non-invariant baseline.

The network consumes the batch contract of :mod:`vcnn.clouds` / :mod:`vcnn.features`:

* ``pos``: (B, n, d) float, relative positions ``x_i - x0`` of the cloud points,
* ``vec``: (B, n, k, d) float, per-point vectors that rotate with the frame (e.g. velocity),
* ``scal``: (B, n, s) float, per-point invariant scalars (already normalised),
* ``mask``: (B, n) bool or None, True for real points, False for padding,
* ``weight``: (B, n) float in [0, 1] or None, a smooth cutoff weight of each point,
* ``volume``: (B, n) float > 0 or None, the quadrature weight (nodal volume) of each point;
  needed by a network with ``pooling="volume"``.

Descriptor (DeepPot-SE style, docs/design.md). An embedding MLP maps the invariant inputs of
every point to ``G`` (B, n, m). The per-point vectors are stacked into ``Q`` (B, n, q, d)
(the relative position and the k input vectors, so q = k + 1), optionally with a constant
scalar channel. With ``w_i`` the point weights (mask times cutoff weight),

    L[a, c, :] = sum_i w_i G[i, a] Q[i, c, :] / sum_i w_i          (B, m, q, d)
    D[a, b]    = sum_{c, :} L[a, c, :] . L[b, c, :]   for b < m'    (B, m, m')

``D`` is invariant to rotations and reflections (O(d)), to translations (positions are relative),
to the order of the points, to padding (masked points have zero weight) and to the number of
points (the weighted mean: duplicating every point leaves ``D`` unchanged). A fitting MLP maps
``vec(D)`` to the output; the vector and tensor heads contract the fitted coefficients with
``L`` so that they co-rotate with the frame.

Pooling is a property of the model (``pooling``): ``"mean"`` weights every point alike (the
paper: the descriptor then depends on how densely a mesh samples the cloud), ``"volume"``
multiplies ``w_i`` by the point's quadrature weight, so that ``L`` is a quadrature of an
integral over the cloud region, which converges under mesh refinement and means the same for
nodal (FEM) and cell-centred (FV) data.

Factorised embedding. When ``point_scalar_columns`` is given, the embedding is
``G[i, a] = A(s_i)[a] * P(p_i)[k(a)]``: a point part ``A`` of the query-independent scalars
``s_i`` (evaluated once per mesh point, :meth:`VectorCloudNet.embed_points`) times one of
``kernels`` learned pair kernels ``P`` of the query-dependent scalars ``p_i`` (distance,
angles, normalised radius), channel ``a`` using kernel ``k(a) = a // (m / kernels)``. The
moments are then sums over the cloud of a per-entry scalar times per-point tables, which
:mod:`vcnn.engines` evaluates as sparse matrix products or C loops over whole meshes.
"""

from __future__ import annotations

import inspect
import logging
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

OutputKind = Literal["scalar", "vector", "tensor"]
ActivationName = Literal["relu", "silu", "tanh", "gelu", "softplus"]
PositionVector = Literal["raw", "direction"]
Pooling = Literal["mean", "volume"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
}
_OUTPUT_KINDS = ("scalar", "vector", "tensor")
_POSITION_VECTORS = ("raw", "direction")
POOLINGS = ("mean", "volume")
#: Widest layer of any MLP of a network (a config or checkpoint asking for more is refused).
MAX_WIDTH = 4096
#: Most layers of any MLP of a network.
MAX_LAYERS = 16
#: Most invariant scalars or vectors per point a network takes.
MAX_INPUTS = 256
#: Most parameters of a network (64 MiB of float32, the largest checkpoint member).
MAX_PARAMETERS = 1 << 24
# Softening length (squared) of |x| and x/|x|: keeps both finite with finite gradients at the
# query point itself (x_i = x0 is in its own cloud) and is far below any mesh spacing.
_SOFTENING_SQUARED = 1e-24


class CloudInputError(ValueError):
    """A cloud batch does not match the network's dimensions or is empty."""


def _checked_count(name: str, value: Any, low: int, high: int) -> int:
    """``value`` as an int in [low, high], or ValueError naming the key."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} = {value!r} must be an integer in [{low}, {high}]")
    if not low <= int(value) <= high:
        raise ValueError(f"{name} = {value!r} must lie in [{low}, {high}]")
    return int(value)


def _checked_widths(name: str, values: Any, *, allow_empty: bool = False) -> tuple[int, ...]:
    """Layer widths as a tuple of ints in [1, MAX_WIDTH], at most MAX_LAYERS of them."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise ValueError(f"{name} = {values!r} must be a list of layer widths")
    if not values and not allow_empty:
        raise ValueError(f"{name} = {list(values)!r} needs at least one layer")
    if len(values) > MAX_LAYERS:
        raise ValueError(f"{name} has {len(values)} layers; at most {MAX_LAYERS} are allowed")
    widths = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} = {list(values)!r}: layer widths must be integers")
        if not 1 <= int(value) <= MAX_WIDTH:
            raise ValueError(
                f"{name} = {list(values)!r}: layer widths must lie in [1, {MAX_WIDTH}]"
            )
        widths.append(int(value))
    return tuple(widths)


def _checked_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} = {value!r} must be true or false")
    return bool(value)


def _mlp_parameters(in_features: int, widths: Sequence[int]) -> int:
    sizes = [in_features, *widths]
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def _check_parameters(total: int) -> None:
    if total > MAX_PARAMETERS:
        raise ValueError(
            f"the network would have {total:.3g} parameters, more than {MAX_PARAMETERS} "
            f"({MAX_PARAMETERS * 4 >> 20} MiB of float32); refused"
        )


def _activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}"
        ) from None


class MLP(nn.Module):
    """A multilayer perceptron with optional residual (ResNet-style) connections.

    Args:
        in_features: width of the input.
        widths: widths of the successive layers; the last one is the output width.
        activation: name of the activation function (see ``_ACTIVATIONS``).
        activate_last: whether the activation also follows the last layer.
        residual: add the layer input to the output of every activated layer whose width equals
            the input width, or twice the input width (the input is then repeated), as in
            DeepPot-SE; this keeps deep embeddings trainable.
    """

    def __init__(
        self,
        in_features: int,
        widths: Sequence[int],
        *,
        activation: str,
        activate_last: bool,
        residual: bool = False,
    ) -> None:
        super().__init__()
        if in_features < 1 or not widths or any(int(w) < 1 for w in widths):
            raise ValueError(
                f"MLP needs a positive input width and positive layer widths, got "
                f"in_features={in_features}, widths={tuple(widths)}"
            )
        sizes = [in_features, *[int(w) for w in widths]]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.activation = _activation(activation)
        self.activate_last = activate_last
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP.

        Args:
            x: (..., in_features) float.

        Returns:
            (..., widths[-1]) float.
        """
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            y = _linear(layer, x)
            if index < last or self.activate_last:
                y = self.activation(y)
                if self.residual:
                    if y.shape[-1] == x.shape[-1]:
                        y = y + x
                    elif y.shape[-1] == 2 * x.shape[-1]:
                        y = y + torch.cat((x, x), dim=-1)
            x = y
        return x


#: Layers with at most this many outputs are evaluated as ``W @ x^T``: BLAS runs a tall input
#: times a narrow weight several times slower than the transposed product (measured: 16 -> 4
#: on 65k rows, 0.85 ms against 0.2 ms on one core).
_NARROW_OUTPUT = 8


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``; for a narrow layer on many rows as a transposed product (same values)."""
    if layer.out_features > _NARROW_OUTPUT or x.dim() < 2 or x.shape[:-1].numel() < 4096:
        return layer(x)
    rows = x.reshape(-1, x.shape[-1])
    product = torch.mm(layer.weight, rows.T)
    if layer.bias is not None:
        product = product + layer.bias[:, None]
    return product.T.reshape(*x.shape[:-1], layer.out_features)


@dataclass(frozen=True)
class VectorCloudConfig:
    """Hyper-parameters of :class:`VectorCloudNet`; JSON-serialisable through ``asdict``.

    See :class:`VectorCloudNet` for the meaning of every field.
    """

    dim: int
    num_scalars: int
    num_vectors: int
    embedding: tuple[int, ...] = (32, 64, 64)
    axis_neurons: int = 4
    fitting: tuple[int, ...] = (256, 128)
    output: str = "scalar"
    activation: str = "silu"
    use_position_scalar_feature: bool = True
    use_angle_feature: bool = True
    position_vector: str = "raw"
    scalar_channel: bool = True
    residual: bool = True
    point_scalar_columns: tuple[int, ...] | None = None
    pair_embedding: tuple[int, ...] = (16,)
    kernels: int | None = None
    point_scalars_in_kernels: bool = False
    pooling: str = "mean"
    positive_output: bool = False

    def __post_init__(self) -> None:
        # Every number is checked (type and bounds) before anything is built, so that a
        # crafted config or checkpoint is refused with the key instead of allocating GiBs.
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.dim not in (2, 3) or isinstance(self.dim, bool):
            raise ValueError(f"dim must be 2 or 3, got {self.dim!r}")
        put("dim", _checked_count("dim", self.dim, 2, 3))
        for name in ("num_scalars", "num_vectors"):
            put(name, _checked_count(name, getattr(self, name), 0, MAX_INPUTS))
        put("embedding", _checked_widths("embedding", self.embedding))
        put("fitting", _checked_widths("fitting", self.fitting))
        put("pair_embedding", _checked_widths("pair_embedding", self.pair_embedding,
                                              allow_empty=True))
        put("axis_neurons", _checked_count("axis_neurons", self.axis_neurons, 1, MAX_WIDTH))
        if self.kernels is not None:
            put("kernels", _checked_count("kernels", self.kernels, 1, MAX_WIDTH))
        if self.point_scalar_columns is not None:
            columns = self.point_scalar_columns
            if isinstance(columns, str | bytes) or not isinstance(columns, Sequence):
                raise ValueError(f"point_scalar_columns = {columns!r} must be a list of indices")
            put("point_scalar_columns", tuple(
                _checked_count("point_scalar_columns", c, 0, MAX_INPUTS) for c in columns
            ))
        for name in (
            "use_position_scalar_feature", "use_angle_feature", "scalar_channel", "residual",
            "point_scalars_in_kernels", "positive_output",
        ):
            put(name, _checked_flag(name, getattr(self, name)))
        for name in ("output", "activation", "position_vector", "pooling"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} = {getattr(self, name)!r} must be a name (a string)")
        self._validate()
        _check_parameters(self.num_parameters)

    @property
    def num_parameters(self) -> int:
        """Parameters of the network this config builds (weights and biases of its MLPs)."""
        m = self.embedding[-1]
        q = self.num_channels
        if self.point_scalar_columns is None:
            total = _mlp_parameters(self.num_embedding_inputs, self.embedding)
        else:
            total = _mlp_parameters(len(self.point_scalar_columns), self.embedding)
            total += _mlp_parameters(
                self.num_pair_inputs, (*self.pair_embedding, self.num_kernels)
            )
        out = {"scalar": 1, "vector": m * q, "tensor": (self.axis_neurons * q) ** 2}[self.output]
        return total + _mlp_parameters(m * self.axis_neurons, (*self.fitting, out))

    def _validate(self) -> None:
        if self.dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {self.dim}")
        if self.num_scalars < 0 or self.num_vectors < 0:
            raise ValueError(
                f"num_scalars and num_vectors must be >= 0, got {self.num_scalars}, "
                f"{self.num_vectors}"
            )
        if self.output not in _OUTPUT_KINDS:
            raise ValueError(f"output must be one of {_OUTPUT_KINDS}, got {self.output!r}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.position_vector not in _POSITION_VECTORS:
            raise ValueError(
                f"position_vector must be one of {_POSITION_VECTORS}, got {self.position_vector!r}"
            )
        if not self.embedding or not self.fitting:
            raise ValueError("embedding and fitting need at least one layer each")
        if not 1 <= self.axis_neurons <= self.embedding[-1]:
            raise ValueError(
                f"axis_neurons = {self.axis_neurons} (m') must lie in [1, m = embedding[-1] = "
                f"{self.embedding[-1]}]"
            )
        if self.use_angle_feature and self.num_vectors < 1:
            raise ValueError("use_angle_feature needs num_vectors >= 1 (the angle is to vec[0])")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.positive_output and self.output != "scalar":
            raise ValueError("positive_output applies to the scalar head only")
        if self.point_scalars_in_kernels and self.point_scalar_columns is None:
            raise ValueError(
                "point_scalars_in_kernels needs a factorised embedding (point_scalar_columns)"
            )
        if self.kernels is not None:
            if self.point_scalar_columns is None:
                raise ValueError("kernels needs a factorised embedding (point_scalar_columns)")
            if not (self.kernels >= 1 and self.embedding[-1] % self.kernels == 0):
                raise ValueError(
                    f"kernels must divide the embedding width m = {self.embedding[-1]}, "
                    f"got {self.kernels}"
                )
        if self.point_scalar_columns is not None:
            columns = self.point_scalar_columns
            if (
                not columns
                or len(set(columns)) != len(columns)
                or not all(0 <= c < self.num_scalars for c in columns)
            ):
                raise ValueError(
                    f"point_scalar_columns must be distinct indices in [0, {self.num_scalars}), "
                    f"got {columns}"
                )
            if self.num_pair_inputs < 1:
                raise ValueError(
                    "a factorised embedding needs at least one pair input: leave a scalar "
                    "column out of point_scalar_columns or enable the position/angle features"
                )
        elif self.num_embedding_inputs < 1:
            raise ValueError(
                "the embedding has no input: give num_scalars > 0 or enable "
                "use_position_scalar_feature / use_angle_feature"
            )

    @property
    def num_derived_pair_scalars(self) -> int:
        """Number of invariant pair scalars the net derives from ``pos`` (and ``vec``)."""
        return int(self.use_position_scalar_feature) + int(self.use_angle_feature)

    @property
    def num_embedding_inputs(self) -> int:
        """Width of the (unfactorised) embedding input."""
        return self.num_scalars + self.num_derived_pair_scalars

    @property
    def num_pair_inputs(self) -> int:
        """Width of the pair-embedding input of a factorised embedding."""
        point = len(self.point_scalar_columns or ())
        extra = point if self.point_scalars_in_kernels else 0
        return self.num_scalars - point + self.num_derived_pair_scalars + extra

    @property
    def num_channels(self) -> int:
        """Number q of vector channels in ``Q``: the position and the input vectors."""
        return self.num_vectors + 1

    @property
    def num_kernels(self) -> int:
        """Number of pair kernels of a factorised embedding (m when ``kernels`` is None)."""
        return self.embedding[-1] if self.kernels is None else self.kernels

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dictionary (tuples become lists)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> VectorCloudConfig:
        """Rebuild from :meth:`to_dict` output; unknown or missing keys raise ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(
                f"unknown VectorCloudNet config keys {unknown}; known: {sorted(known)}"
            )
        missing = sorted({"dim", "num_scalars", "num_vectors"} - set(config))
        if missing:
            raise ValueError(f"VectorCloudNet config lacks keys {missing}")
        return cls(**config)


_PRESETS: dict[str, dict[str, Any]] = {
    # Zhou, Han & Xiao (2022): embedding 7-32-64-64, m' = 4, fitting 256-128-1, ReLU. In the
    # paper's notation the first number of each stack is its input width: vec(D) has
    # m * m' = 64 * 4 = 256 entries, so the fitting net has one hidden layer of 128. The seven
    # input scalars already include the distance and upstream features, the position enters Q
    # as its direction, and Q holds no scalar channel.
    "published": dict(
        embedding=(32, 64, 64),
        axis_neurons=4,
        fitting=(128,),
        activation="relu",
        use_position_scalar_feature=False,
        use_angle_feature=False,
        position_vector="direction",
        scalar_channel=False,
        residual=False,
    ),
    # The constructor defaults: a DeepPot-SE embedding of every (query, point) pair, smooth.
    "dense": dict(
        embedding=(32, 64, 64),
        axis_neurons=4,
        fitting=(256, 128),
        activation="silu",
        use_position_scalar_feature=True,
        use_angle_feature=True,
        position_vector="raw",
        scalar_channel=True,
        residual=True,
        pooling="mean",
        positive_output=False,
    ),
    # This toolkit's default for closures: mesh-independent (volume pooling), tau >= 0
    # (softplus), and fast (a factorised embedding with eight pair kernels, whose full-cloud
    # inference is a few sparse products per mesh; see vcnn.engines). The pair inputs come
    # from the FeatureSpec (proximity, upstream cosine, normalised radius) and the point
    # scalars, so the net derives no distance or angle of its own. Eight kernels of eight
    # channels (m = 64) reached 5.0 % at alpha = 0.5 after 8 epochs of experiment (a),
    # against 5.8 % for eight kernels of four channels and 6.6 % for four of eight (m = 32),
    # at 1.1x their inference time.
    "default": dict(
        embedding=(32, 64, 64),
        axis_neurons=4,
        fitting=(256, 128),
        activation="silu",
        use_position_scalar_feature=False,
        use_angle_feature=False,
        position_vector="raw",
        scalar_channel=True,
        residual=True,
        factorised=True,
        pair_embedding=(16,),
        kernels=8,
        point_scalars_in_kernels=True,
        pooling="volume",
        positive_output=True,
    ),
}


class VectorCloudNet(nn.Module):
    """Frame-independent vector-cloud network with scalar, vector or tensor output.

    The constructor defaults (preset ``"dense"``) differ from the published configuration
    (preset ``"published"``) where the published choice is not smooth:

    * SiLU instead of ReLU: the output is then infinitely differentiable in the inputs, so the
      closure-in-the-loop fixed-point map (docs/design.md) is smooth and Newton-type
      solvers get a well-defined Jacobian; ReLU nets are only piecewise linear.
    * ``position_vector="raw"``: ``Q`` holds ``x_i - x0`` itself rather than its direction,
      which jumps where a point crosses the query point; the distance is still offered to the
      embedding as an invariant scalar and the angle to the first vector as another one.
    * A constant scalar channel in ``Q``: ``L`` then also holds the weighted mean of ``G``, an
      invariant that does not vanish in a symmetric cloud.
    * Residual connections in the embedding (where widths match or double, as in DeepPot-SE)
      and a wider fitting net (256-128): cheap, since the embedding dominates the cost.

    The preset ``"default"`` (what ``vcnn train`` builds unless told otherwise) adds volume
    pooling, a positive output and a factorised embedding with eight pair kernels.

    Args:
        dim: spatial dimension d (2 or 3).
        num_scalars: number s of invariant scalars per point.
        num_vectors: number k of vectors per point.
        embedding: widths of the embedding MLP; the last is m.
        axis_neurons: m', the number of rows of ``L`` kept in ``L*``.
        fitting: hidden widths of the fitting MLP (its output layer is added).
        output: ``"scalar"`` (B,), ``"vector"`` (B, d) or ``"tensor"`` (B, d, d) symmetric.
        activation: ``"relu"``, ``"silu"``, ``"tanh"``, ``"gelu"`` or ``"softplus"``.
        use_position_scalar_feature: feed ``|x_i - x0|`` to the embedding.
        use_angle_feature: feed the cosine between ``x_i - x0`` and ``vec[:, :, 0]``.
        position_vector: ``"raw"`` (``x_i - x0``) or ``"direction"`` (``(x_i - x0)/|x_i - x0|``,
            zero at the query point) as the position channel of ``Q``.
        scalar_channel: add a constant scalar channel to ``Q``.
        residual: residual connections in the embedding MLP(s).
        point_scalar_columns: when given, a factorised embedding
            ``G[i, a] = A(point scalars_i)[a] * P(pair scalars_i)[k(a)]``, where the columns
            of ``scal`` listed here do not depend on the query point, so ``A`` can be evaluated
            once per mesh point (:meth:`embed_points`) and passed as ``point_embedding``; the
            remaining columns plus the derived distance/angle features feed the cheap ``P``.
        pair_embedding: hidden widths of ``P``.
        point_scalars_in_kernels: feed the cloud point's point scalars to ``P`` as well, so
            that the kernels' shape may depend on the point (near a wall, in a shear layer);
            still one scalar per entry and kernel, so the sparse pass is unchanged.
        kernels: output width of ``P`` (the number of pair kernels; it must divide m, and
            channel a uses kernel ``a // (m / kernels)``); None: m (one kernel per channel).
        pooling: ``"mean"`` (every point alike) or ``"volume"`` (points weighted by their
            quadrature weight: mesh-independent descriptors); see the module docstring.
        positive_output: scalar head only: the output is ``softplus`` of the fit, so a
            predicted tau is never negative.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_scalars: int,
        num_vectors: int,
        embedding: Sequence[int] = (32, 64, 64),
        axis_neurons: int = 4,
        fitting: Sequence[int] = (256, 128),
        output: OutputKind = "scalar",
        activation: ActivationName = "silu",
        use_position_scalar_feature: bool = True,
        use_angle_feature: bool = True,
        position_vector: PositionVector = "raw",
        scalar_channel: bool = True,
        residual: bool = True,
        point_scalar_columns: Sequence[int] | None = None,
        pair_embedding: Sequence[int] = (16,),
        kernels: int | None = None,
        point_scalars_in_kernels: bool = False,
        pooling: Pooling = "mean",
        positive_output: bool = False,
    ) -> None:
        super().__init__()
        self._config = VectorCloudConfig(
            dim=dim,
            num_scalars=num_scalars,
            num_vectors=num_vectors,
            embedding=tuple(embedding),
            axis_neurons=axis_neurons,
            fitting=tuple(fitting),
            output=output,
            activation=activation,
            use_position_scalar_feature=use_position_scalar_feature,
            use_angle_feature=use_angle_feature,
            position_vector=position_vector,
            scalar_channel=scalar_channel,
            residual=residual,
            point_scalar_columns=(
                None if point_scalar_columns is None else tuple(point_scalar_columns)
            ),
            pair_embedding=tuple(pair_embedding),
            kernels=kernels,
            point_scalars_in_kernels=point_scalars_in_kernels,
            pooling=pooling,
            positive_output=positive_output,
        )
        cfg = self._config
        m = cfg.embedding[-1]
        if cfg.point_scalar_columns is None:
            self.embedding = MLP(
                cfg.num_embedding_inputs,
                cfg.embedding,
                activation=cfg.activation,
                activate_last=True,
                residual=cfg.residual,
            )
            self.pair_embedding = None
            self.register_buffer("_point_columns", None, persistent=False)
            self.register_buffer("_pair_columns", None, persistent=False)
        else:
            point_columns = cfg.point_scalar_columns
            self.embedding = MLP(
                len(point_columns),
                cfg.embedding,
                activation=cfg.activation,
                activate_last=True,
                residual=cfg.residual,
            )
            self.pair_embedding = MLP(
                cfg.num_pair_inputs,
                (*cfg.pair_embedding, cfg.num_kernels),
                activation=cfg.activation,
                activate_last=True,
                residual=cfg.residual,
            )
            pair_columns = [c for c in range(cfg.num_scalars) if c not in point_columns]
            self.register_buffer(
                "_point_columns", torch.tensor(point_columns, dtype=torch.long), persistent=False
            )
            self.register_buffer(
                "_pair_columns", torch.tensor(pair_columns, dtype=torch.long), persistent=False
            )
        q = cfg.num_channels
        if cfg.output == "scalar":
            out_features = 1
        elif cfg.output == "vector":
            out_features = m * q
        else:
            out_features = (cfg.axis_neurons * q) ** 2
        self.fitting = MLP(
            m * cfg.axis_neurons,
            (*cfg.fitting, out_features),
            activation=cfg.activation,
            activate_last=False,
        )

    # ----------------------------------------------------------------------------- config
    @property
    def config(self) -> VectorCloudConfig:
        """The hyper-parameters this network was built with."""
        return self._config

    @property
    def output_kind(self) -> str:
        """``"scalar"``, ``"vector"`` or ``"tensor"``."""
        return self._config.output

    @property
    def pooling(self) -> str:
        """``"mean"`` or ``"volume"`` (see the module docstring)."""
        return self._config.pooling

    @property
    def is_factorised(self) -> bool:
        """Whether the embedding is factorised into a point part and a pair part."""
        return self.pair_embedding is not None

    def to_config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments (rebuild with :meth:`from_config`)."""
        return self._config.to_dict()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> VectorCloudNet:
        """Build an (untrained) network from :meth:`to_config` output.

        Raises:
            ValueError: on unknown keys or invalid values.
        """
        checked = VectorCloudConfig.from_dict(dict(config))
        return cls(**checked.to_dict())

    @classmethod
    def from_preset(
        cls,
        name: str,
        *,
        dim: int,
        num_scalars: int,
        num_vectors: int,
        point_scalar_columns: Sequence[int] | None = None,
        **overrides: Any,
    ) -> VectorCloudNet:
        """Build a named configuration: ``"default"``, ``"dense"`` or ``"published"``.

        Args:
            name: preset name.
            dim: spatial dimension d.
            num_scalars: number of invariant scalars per point (7 in the published setup).
            num_vectors: number of vectors per point (1, the velocity, in the published setup).
            point_scalar_columns: the query-independent columns of the scalars (e.g.
                ``FeatureSpec.point_scalar_columns``); used by factorised presets, which need
                them, and ignored by the others.
            **overrides: constructor arguments that replace the preset's values.

        Raises:
            ValueError: for an unknown preset name, or a factorised preset without
                ``point_scalar_columns``.
        """
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(_PRESETS)}")
        kwargs = {**_PRESETS[name], **overrides}
        if kwargs.pop("factorised", False) and "point_scalar_columns" not in overrides:
            if not point_scalar_columns:
                raise ValueError(
                    f"preset {name!r} is factorised: give point_scalar_columns (the columns of "
                    "the scalars that depend on the mesh point only)"
                )
            kwargs["point_scalar_columns"] = tuple(point_scalar_columns)
        return cls(dim=dim, num_scalars=num_scalars, num_vectors=num_vectors, **kwargs)

    # ----------------------------------------------------------------------------- stages
    def embed_points(self, point_scalars: torch.Tensor) -> torch.Tensor:
        """Query-independent part of a factorised embedding, once per mesh point.

        Args:
            point_scalars: (..., len(point_scalar_columns)) float, the point-only scalars.

        Returns:
            (..., m) float; gather it per cloud point and pass it as ``point_embedding``.

        Raises:
            ValueError: when the embedding is not factorised or the width is wrong.
        """
        if not self.is_factorised:
            raise ValueError("embed_points needs a factorised net (set point_scalar_columns)")
        width = len(self._config.point_scalar_columns or ())
        if point_scalars.shape[-1] != width:
            raise CloudInputError(
                f"point_scalars must have {width} columns (point_scalar_columns), got shape "
                f"{tuple(point_scalars.shape)}"
            )
        # torch only: which backend embeds the points of a pass (the same MLP in C on the
        # CPU, vcnn.engines.fused_cpu) is decided by vcnn.engines
        return self.embedding(point_scalars.to(self._parameter_dtype()))

    def pair_inputs(
        self,
        pair_scalars: torch.Tensor,
        pos: torch.Tensor,
        vec: torch.Tensor | None,
        point_scalars: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Inputs of the pair kernels of a factorised net: pair scalars and derived scalars.

        Args:
            pair_scalars: (..., s - len(point_scalar_columns)) float, the columns of ``scal``
                that are not point columns, in order.
            pos: (..., d) float relative positions.
            vec: (..., k, d) float per-point vectors (needed with ``use_angle_feature``).
            point_scalars: (..., len(point_scalar_columns)) float, the point columns (needed
                with ``point_scalars_in_kernels``).

        Returns:
            (..., num_pair_inputs) float.
        """
        parts = [pair_scalars, *self._pair_scalars(pos, vec)]
        if self._config.point_scalars_in_kernels:
            if point_scalars is None:
                raise CloudInputError("point_scalars_in_kernels needs the point scalars")
            parts.append(point_scalars)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    @property
    def pair_columns(self) -> tuple[int, ...]:
        """Columns of ``scal`` that feed the pair kernels (factorised nets)."""
        return () if self._pair_columns is None else tuple(self._pair_columns.tolist())

    def pair_kernels(self, pair_inputs: torch.Tensor) -> torch.Tensor:
        """The learned pair kernels ``P = 1 + MLP(pair inputs)`` of a factorised net.

        The offset makes a freshly initialised net (small MLP outputs) start as a plain
        point-embedding net, ``G ~ A``, whose gradients are not damped by a small second
        factor; the kernels then learn how each point's contribution depends on where it lies
        in the cloud.

        Args:
            pair_inputs: (..., num_pair_inputs) float (see :meth:`pair_inputs`).

        Returns:
            (..., kernels) float.
        """
        if self.pair_embedding is None:
            raise ValueError("pair_kernels needs a factorised net (set point_scalar_columns)")
        return 1.0 + self.pair_embedding(pair_inputs)

    def head(self, moments: torch.Tensor, mean_features: torch.Tensor | None) -> torch.Tensor:
        """Descriptor, fitting net and output head from the pooled moments.

        Args:
            moments: (B, m, q, d) float, ``L`` = weighted mean over the cloud of ``G Q``.
            mean_features: (B, m) float, the weighted mean of ``G`` (used with
                ``scalar_channel``; may be None otherwise).

        Returns:
            (B,), (B, d) or (B, d, d) as :meth:`forward`.
        """
        cfg = self._config
        batch, _, q, d = moments.shape
        axis = cfg.axis_neurons
        # D = L L'^T over the q d components: one batched product (a third of the time of the
        # equivalent einsum, which copies its operands)
        flat = moments.reshape(batch, moments.shape[1], q * d)
        descriptor = torch.bmm(flat, flat[:, :axis].transpose(1, 2))  # (B, m, m')
        if cfg.scalar_channel:
            assert mean_features is not None
            descriptor = descriptor + mean_features[:, :, None] * mean_features[:, None, :axis]
        fitted = self.fitting(descriptor.reshape(batch, -1))
        if cfg.output == "scalar":
            value = fitted[:, 0]
            return nn.functional.softplus(value) if cfg.positive_output else value
        if cfg.output == "vector":
            coefficients = fitted.reshape(batch, -1, q)  # (B, m, q)
            return torch.einsum("bmq,bmqd->bd", coefficients, moments)
        size = axis * q
        matrix = fitted.reshape(batch, size, size)
        psi = 0.5 * (matrix + matrix.transpose(1, 2))
        frame = moments[:, :axis].reshape(batch, size, d)  # (B, m' q, d)
        tensor = frame.transpose(1, 2) @ psi @ frame  # (B, d, d)
        # Symmetric in exact arithmetic; symmetrise again so it is symmetric to the last bit.
        return 0.5 * (tensor + tensor.transpose(1, 2))

    def position_channel(self, pos: torch.Tensor) -> torch.Tensor:
        """The position channel of ``Q``: ``x_i - x0`` or its direction (zero at x0).

        Args:
            pos: (..., d) float relative positions.

        Returns:
            (..., d) float.
        """
        if self._config.position_vector == "direction":
            squared = (pos * pos).sum(dim=-1, keepdim=True) + _SOFTENING_SQUARED
            # Exactly zero at the query point itself, where the direction is undefined.
            return torch.where(squared > 2 * _SOFTENING_SQUARED, pos * torch.rsqrt(squared), 0.0)
        return pos

    # ----------------------------------------------------------------------------- forward
    def forward(
        self,
        pos: torch.Tensor,
        vec: torch.Tensor,
        scal: torch.Tensor,
        mask: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        *,
        volume: torch.Tensor | None = None,
        point_embedding: torch.Tensor | None = None,
        point_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Evaluate the network on a batch of clouds.

        Args:
            pos: (B, n, d) float, relative positions ``x_i - x0``.
            vec: (B, n, k, d) float, per-point vectors.
            scal: (B, n, s) float, per-point invariant scalars.
            mask: (B, n) bool, True for real points; None means all points are real.
            weight: (B, n) float >= 0, smooth cutoff weights; None means 1.
            volume: (B, n) float > 0, quadrature weights of the points (any common scale per
                cloud: the pooling normalises them); required when ``pooling="volume"``,
                ignored otherwise.
            point_embedding: (B, n, m) float, precomputed :meth:`embed_points` of the cloud
                points (factorised nets only); the point columns of ``scal`` are then ignored.
                With ``point_rows``: (U, m), the embedding of U distinct points.
            point_rows: (B, n) int rows of a (U, m) ``point_embedding``, one per entry (each
                distinct point embedded once; the backends of :mod:`vcnn.engines` run the same net
                on row batches, e.g. with the training kernel of :mod:`vcnn.engines.fused_rows`).

        Returns:
            (B,) for ``output="scalar"``, (B, d) for ``"vector"``, (B, d, d) symmetric for
            ``"tensor"``, in the parameters' dtype.

        Raises:
            CloudInputError: (a ValueError) on inconsistent shapes or an empty cloud.
        """
        dtype = self._parameter_dtype()
        self._check_shapes(pos, vec, scal, mask, weight, volume, point_embedding, point_rows)
        batch, n, _ = pos.shape
        device = pos.device
        pos, vec, scal = pos.to(dtype), vec.to(dtype), scal.to(dtype)

        valid = (
            torch.ones(batch, n, dtype=torch.bool, device=device)
            if mask is None
            else mask.to(device=device, dtype=torch.bool)
        )
        point_weight = self.pooling_weights(valid, weight, volume, dtype=dtype)
        total_weight = point_weight.sum(dim=1)  # (B,)
        self._check_not_empty(total_weight, point_weight)

        # Padding may hold garbage (even NaN/inf); zero it so that 0 * garbage stays 0.
        pos = torch.where(valid[..., None], pos, 0.0)
        vec = torch.where(valid[..., None, None], vec, 0.0)
        scal = torch.where(valid[..., None], scal, 0.0)
        # Weighted mean over the points: exact invariance to padding and to duplication.
        normalised = point_weight / total_weight[:, None]  # (B, n)
        if point_rows is not None:
            point_embedding = point_embedding.index_select(0, point_rows.reshape(-1))
            point_embedding = point_embedding.reshape(*point_rows.shape, -1)

        features = self._embed(pos, vec, scal, valid, point_embedding)  # (B, n, m)
        channels = torch.cat([self.position_channel(pos)[:, :, None], vec], dim=2)  # (B,n,q,d)
        weighted = features * normalised[..., None]  # (B, n, m)
        q, d = channels.shape[2], channels.shape[3]
        moments = torch.bmm(weighted.transpose(1, 2), channels.reshape(batch, n, q * d))
        moments = moments.reshape(batch, -1, q, d)  # (B, m, q, d)
        mean_features = weighted.sum(dim=1) if self._config.scalar_channel else None
        return self.head(moments, mean_features)

    def head_from_sums(self, sums: torch.Tensor) -> torch.Tensor:
        """:meth:`head` from a factorised net's pooled sums, kernel by kernel.

        Args:
            sums: (B, K, 1 + k d + d, m_k) float: per kernel, the weighted means over the cloud
                of ``G`` (channel 0), of ``G`` times each point vector's components (k d
                channels) and of ``G`` times the position channel's components (d channels);
                channel ``a`` of the net is ``k m_k + j``.

        Returns:
            As :meth:`head`.
        """
        cfg = self._config
        batch, dim, vectors = sums.shape[0], cfg.dim, cfg.num_vectors
        channels = sums.transpose(2, 3).reshape(batch, -1, sums.shape[2])  # (B, m, C)
        position = channels[:, :, None, 1 + vectors * dim :]
        point_vectors = channels[:, :, 1 : 1 + vectors * dim].unflatten(-1, (vectors, dim))
        moments = torch.cat([position, point_vectors], dim=2)  # (B, m, q, d)
        return self.head(moments, channels[:, :, 0] if cfg.scalar_channel else None)

    def pooling_weights(
        self,
        valid: torch.Tensor,
        weight: torch.Tensor | None,
        volume: torch.Tensor | None,
        *,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Unnormalised pooling weight of each point: mask x cutoff weight (x volume).

        Args:
            valid: (B, n) bool, real points.
            weight: (B, n) float cutoff weights or None.
            volume: (B, n) float quadrature weights or None (needed for volume pooling).
            dtype: floating dtype of the result.

        Returns:
            (B, n) float, zero at padding slots.
        """
        point_weight = valid.to(dtype)
        for factor in (weight, volume if self._config.pooling == "volume" else None):
            if factor is not None:
                factor = factor.to(device=valid.device, dtype=dtype)
                point_weight = point_weight * torch.where(valid, factor, torch.zeros_like(factor))
        return point_weight

    # ----------------------------------------------------------------------------- helpers
    def _parameter_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _pair_scalars(self, pos: torch.Tensor, vec: torch.Tensor | None) -> list[torch.Tensor]:
        """Invariant pair scalars derived from the geometry, each (..., 1)."""
        cfg = self._config
        out: list[torch.Tensor] = []
        if not (cfg.use_position_scalar_feature or cfg.use_angle_feature):
            return out
        if cfg.use_angle_feature and vec is None:
            raise CloudInputError("use_angle_feature needs the point vectors")
        squared = (pos * pos).sum(dim=-1, keepdim=True) + _SOFTENING_SQUARED
        if cfg.use_position_scalar_feature:
            out.append(torch.sqrt(squared))
        if cfg.use_angle_feature:
            first = vec[..., 0, :]
            first_squared = (first * first).sum(dim=-1, keepdim=True) + _SOFTENING_SQUARED
            dot = (pos * first).sum(dim=-1, keepdim=True)
            # Two rsqrt factors: their product underflows to 0 in float32 at the query point.
            out.append(dot * torch.rsqrt(squared) * torch.rsqrt(first_squared))
        return out

    def _embed(
        self,
        pos: torch.Tensor,
        vec: torch.Tensor,
        scal: torch.Tensor,
        valid: torch.Tensor,
        point_embedding: torch.Tensor | None,
    ) -> torch.Tensor:
        if not self.is_factorised:
            derived = self._pair_scalars(pos, vec)
            return self.embedding(torch.cat([scal, *derived], dim=-1))
        if point_embedding is None:
            point_part = self.embedding(scal.index_select(-1, self._point_columns))
        else:
            point_embedding = point_embedding.to(scal.dtype)
            point_part = torch.where(valid[..., None], point_embedding, 0.0)
        kernels = self.pair_kernels(self._kernel_inputs(pos, vec, scal))  # (..., K)
        count = kernels.shape[-1]
        grouped = point_part.unflatten(-1, (count, point_part.shape[-1] // count))
        return (grouped * kernels[..., None]).flatten(-2)

    def _kernel_inputs(self, pos: torch.Tensor, vec: torch.Tensor, scal: torch.Tensor) -> torch.Tensor:
        """The pair kernels' inputs from the columns of ``scal`` (factorised nets)."""
        pair_scalars = scal.index_select(-1, self._pair_columns)
        point_scalars = scal.index_select(-1, self._point_columns)
        return self.pair_inputs(pair_scalars, pos, vec, point_scalars)

    def _check_shapes(
        self,
        pos: torch.Tensor,
        vec: torch.Tensor,
        scal: torch.Tensor,
        mask: torch.Tensor | None,
        weight: torch.Tensor | None,
        volume: torch.Tensor | None,
        point_embedding: torch.Tensor | None,
        point_rows: torch.Tensor | None = None,
    ) -> None:
        _check_cloud_shapes(
            pos,
            vec,
            scal,
            mask,
            weight,
            dim=self._config.dim,
            num_vectors=self._config.num_vectors,
            num_scalars=self._config.num_scalars,
        )
        if self._config.pooling == "volume":
            if volume is None:
                raise CloudInputError(
                    "this network pools by volume: pass volume (B, n), the quadrature weight "
                    "of each point"
                )
            if tuple(volume.shape) != tuple(pos.shape[:2]):
                raise CloudInputError(
                    f"volume must be (B, n) = {tuple(pos.shape[:2])}; got {tuple(volume.shape)}"
                )
        if point_embedding is not None:
            if not self.is_factorised:
                raise CloudInputError(
                    "point_embedding is only accepted by a factorised net (point_scalar_columns)"
                )
            width = self._config.embedding[-1]
            if point_rows is not None:
                if tuple(point_rows.shape) != tuple(pos.shape[:2]):
                    raise CloudInputError(
                        f"point_rows must be (B, n) = {tuple(pos.shape[:2])}; got "
                        f"{tuple(point_rows.shape)}"
                    )
                if point_embedding.dim() != 2 or point_embedding.shape[1] != width:
                    raise CloudInputError(
                        f"with point_rows, point_embedding must be (U, {width}); got "
                        f"{tuple(point_embedding.shape)}"
                    )
                return
            expected = (*pos.shape[:2], width)
            if tuple(point_embedding.shape) != expected:
                raise CloudInputError(
                    f"point_embedding must have shape {expected} (B, n, m), got "
                    f"{tuple(point_embedding.shape)}"
                )
        elif point_rows is not None:
            raise CloudInputError("point_rows needs point_embedding, the (U, m) point table")

    @staticmethod
    def _check_not_empty(total_weight: torch.Tensor, point_weight: torch.Tensor) -> None:
        empty = total_weight <= 0
        negative = point_weight < 0
        # One host synchronisation for both checks; details only on the error path.
        if not bool(empty.any() | negative.any()):
            return
        if bool(negative.any()):
            raise CloudInputError(
                "weight and volume must be >= 0 at unmasked points (a cutoff in [0, 1], "
                "positive quadrature weights)"
            )
        clouds = torch.nonzero(empty).flatten()[:10].tolist()
        raise CloudInputError(
            f"empty cloud: clouds {clouds} of the batch have no unmasked point with a "
            f"positive weight; drop them or widen the cloud"
        )


def _check_cloud_shapes(
    pos: torch.Tensor,
    vec: torch.Tensor,
    scal: torch.Tensor,
    mask: torch.Tensor | None,
    weight: torch.Tensor | None,
    *,
    dim: int,
    num_vectors: int,
    num_scalars: int,
) -> None:
    """Raise CloudInputError unless the tensors follow the batch contract."""

    def shape(t: torch.Tensor | None) -> tuple[int, ...] | None:
        return None if t is None else tuple(t.shape)

    shapes = (
        f"pos {shape(pos)}, vec {shape(vec)}, scal {shape(scal)}, mask {shape(mask)}, "
        f"weight {shape(weight)}"
    )
    if pos.ndim != 3 or pos.shape[-1] != dim:
        raise CloudInputError(f"pos must be (B, n, d={dim}); got {shapes}")
    batch, n = pos.shape[:2]
    if n == 0:
        raise CloudInputError(f"empty cloud: n = 0 points; got {shapes}")
    if tuple(vec.shape) != (batch, n, num_vectors, dim):
        raise CloudInputError(
            f"vec must be (B, n, k, d) = {(batch, n, num_vectors, dim)}; got {shapes}"
        )
    if tuple(scal.shape) != (batch, n, num_scalars):
        raise CloudInputError(f"scal must be (B, n, s) = {(batch, n, num_scalars)}; got {shapes}")
    if mask is not None and tuple(mask.shape) != (batch, n):
        raise CloudInputError(f"mask must be (B, n) = {(batch, n)}; got {shapes}")
    if mask is not None and mask.dtype != torch.bool:
        raise CloudInputError(f"mask must be a bool tensor (True = real point), got {mask.dtype}")
    if weight is not None and tuple(weight.shape) != (batch, n):
        raise CloudInputError(f"weight must be (B, n) = {(batch, n)}; got {shapes}")


class BaselineNet(nn.Module):
    """A deliberately non-invariant baseline for the symmetry study.

    Each point's raw coordinates, vectors and scalars ``[pos, vec, scal]`` go through a
    per-point MLP; a masked (weighted) mean pools them and a second MLP maps the pooled
    features to the output. Permutation, padding and duplication invariance hold (mean
    pooling), rotation, reflection equivariance do not: that is the point of the baseline.

    Args:
        dim: spatial dimension d.
        num_scalars: number s of scalars per point.
        num_vectors: number k of vectors per point.
        point_widths: widths of the per-point MLP.
        head_widths: hidden widths of the output MLP.
        output: ``"scalar"`` (B,), ``"vector"`` (B, d) or ``"tensor"`` (B, d, d) symmetric,
            all read off the raw components, so none co-rotates with the frame.
        activation: activation name.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_scalars: int,
        num_vectors: int,
        point_widths: Sequence[int] = (64, 64),
        head_widths: Sequence[int] = (128,),
        output: OutputKind = "scalar",
        activation: ActivationName = "silu",
    ) -> None:
        super().__init__()
        if not isinstance(output, str) or output not in _OUTPUT_KINDS:
            raise ValueError(f"output must be one of {_OUTPUT_KINDS}, got {output!r}")
        if isinstance(dim, bool) or dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim!r}")
        if not isinstance(activation, str) or activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}"
            )
        dim = _checked_count("dim", dim, 2, 3)
        num_scalars = _checked_count("num_scalars", num_scalars, 0, MAX_INPUTS)
        num_vectors = _checked_count("num_vectors", num_vectors, 0, MAX_INPUTS)
        point_widths = _checked_widths("point_widths", point_widths)
        head_widths = _checked_widths("head_widths", head_widths, allow_empty=True)
        in_features = dim * (1 + num_vectors) + num_scalars
        out_features = {"scalar": 1, "vector": dim, "tensor": dim * dim}[output]
        _check_parameters(
            _mlp_parameters(in_features, point_widths)
            + _mlp_parameters(point_widths[-1], (*head_widths, out_features))
        )
        self._config = dict(
            dim=dim,
            num_scalars=num_scalars,
            num_vectors=num_vectors,
            point_widths=[int(w) for w in point_widths],
            head_widths=[int(w) for w in head_widths],
            output=output,
            activation=activation,
        )
        in_features = dim * (1 + num_vectors) + num_scalars
        self.point_net = MLP(in_features, point_widths, activation=activation, activate_last=True)
        out_features = {"scalar": 1, "vector": dim, "tensor": dim * dim}[output]
        self.head = MLP(
            int(point_widths[-1]),
            (*head_widths, out_features),
            activation=activation,
            activate_last=False,
        )

    @property
    def output_kind(self) -> str:
        """``"scalar"``, ``"vector"`` or ``"tensor"``."""
        return str(self._config["output"])

    def to_config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments."""
        return dict(self._config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BaselineNet:
        """Build an (untrained) baseline from :meth:`to_config` output.

        Raises:
            ValueError: on unknown or missing keys or invalid values (every number is
                checked before anything is built).
        """
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown BaselineNet config keys {unknown}; known: {sorted(known)}")
        missing = sorted({"dim", "num_scalars", "num_vectors"} - set(config))
        if missing:
            raise ValueError(f"BaselineNet config lacks keys {missing}")
        return cls(**config)

    def forward(
        self,
        pos: torch.Tensor,
        vec: torch.Tensor,
        scal: torch.Tensor,
        mask: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        *,
        volume: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Evaluate the baseline; same contract as :meth:`VectorCloudNet.forward`.

        Args:
            pos: (B, n, d) float.
            vec: (B, n, k, d) float.
            scal: (B, n, s) float.
            mask: (B, n) bool or None.
            weight: (B, n) float or None.
            volume: ignored (the baseline pools by a plain mean, as the paper's network).

        Returns:
            (B,), (B, d) or (B, d, d) depending on ``output``.
        """
        cfg = self._config
        _check_cloud_shapes(
            pos,
            vec,
            scal,
            mask,
            weight,
            dim=cfg["dim"],
            num_vectors=cfg["num_vectors"],
            num_scalars=cfg["num_scalars"],
        )
        dtype = next(self.parameters()).dtype
        batch, n, d = pos.shape
        valid = torch.ones(batch, n, dtype=torch.bool, device=pos.device) if mask is None else mask
        point_weight = valid.to(dtype)
        if weight is not None:
            point_weight = point_weight * torch.where(valid, weight.to(dtype), 0.0)
        total_weight = point_weight.sum(dim=1)
        VectorCloudNet._check_not_empty(total_weight, point_weight)
        inputs = torch.cat([pos.to(dtype), vec.to(dtype).flatten(2), scal.to(dtype)], dim=-1)
        inputs = torch.where(valid[..., None], inputs, 0.0)
        pooled = (self.point_net(inputs) * point_weight[..., None]).sum(1) / total_weight[:, None]
        out = self.head(pooled)
        if cfg["output"] == "scalar":
            return out[:, 0]
        if cfg["output"] == "vector":
            return out
        matrix = out.reshape(batch, d, d)
        return 0.5 * (matrix + matrix.transpose(1, 2))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def embedding_flops_per_point(model: VectorCloudNet) -> int:
    """Multiply-add FLOPs (2 per multiply-add) of the embedding for one cloud point.

    For a factorised net this is the pair part only (the point part is computed once per mesh
    point and amortised over all clouds that contain it).
    """
    net = model.pair_embedding if model.is_factorised else model.embedding
    assert net is not None
    return sum(2 * layer.in_features * layer.out_features for layer in net.layers)


def flops_per_cloud(model: VectorCloudNet, num_points: int) -> int:
    """Analytic FLOPs of one forward pass on a cloud of ``num_points`` points.

    Counts the matrix products: embedding (per point), the moments ``G^T Q``, the descriptor
    ``L L*^T`` and the fitting MLP. Elementwise work (activations, weights) is left out.
    """
    cfg = model.config
    m = cfg.embedding[-1]
    qd = cfg.num_channels * cfg.dim + int(cfg.scalar_channel)
    per_point = embedding_flops_per_point(model) + 2 * m * qd
    if model.is_factorised:
        per_point += m  # the elementwise product A * P
    descriptor = 2 * m * cfg.axis_neurons * qd
    fitting = sum(2 * layer.in_features * layer.out_features for layer in model.fitting.layers)
    return num_points * per_point + descriptor + fitting


__all__ = [
    "BaselineNet",
    "CloudInputError",
    "MLP",
    "POOLINGS",
    "VectorCloudConfig",
    "VectorCloudNet",
    "count_parameters",
    "embedding_flops_per_point",
    "flops_per_cloud",
]
