"""The fused CPU kernel of the full-cloud pass: a cloud's inputs, pair kernels and moments in one loop.

For a factorised net (:mod:`vcnn.inference`), everything that is computed per cloud entry is a
short chain of arithmetic: the entry's inputs (:func:`vcnn.features.entry_inputs`), their
normalisation, the pair kernels (a small MLP), the pooling weight ``w``, and the products
``s[e, k] = w_e P[e, k]`` summed against the point embedding ``A``:

    sums[q, k, c] = sum_{e in q} s[e, k] c_e A[i_e, k, :]      (c_e: 1, the point vectors'
                                                                components, the position channel)

Done with torch operations, each intermediate makes a round trip through memory and each of the
``K (1 + k d + d)`` sums re-reads the cloud structure: on two cores that ran at 8 % of the
machine's matmul rate. This kernel does the same arithmetic per cloud in registers and L1, one
SIMD vector of entries at a time, and never writes a per-entry value.

The C is ``vcnn/engines/csrc/fused_moments.c`` and its headers, with a header of ``#define``s
for one architecture (sizes, layer widths, activation, feature and cloud options, so every loop
has a fixed trip count: :func:`kernel_defines`); the per-model numbers (weights, normaliser
statistics, region, cutoff and frame constants: :func:`kernel_constants`) are arguments at run
time, so one library serves every model of one architecture. It is compiled with the system C
compiler (``$CC``, else ``cc``) once per source and machine, and cached on disk in the private per-user
cache of :mod:`vcnn.engines.kernels` (``$VCNN_CACHE_DIR/kernels``, else ``~/.cache/vcnn/kernels``);
compilation takes well under a second.

The formulas mirror :func:`vcnn.features.entry_inputs`, :class:`vcnn.features.FeatureNormalizer`
and the pair-kernel and pooling methods of :class:`vcnn.network.VectorCloudNet`, which stay the
reference: ``tests/test_fused.py`` checks the kernel against them for every feature, region,
pooling and position option it covers (float32 round-off). A configuration it does not cover,
a missing compiler or a failed build raises :class:`KernelUnavailable` with the reason, and the
caller keeps the torch pass.

Threads: the queries are split into ``torch.get_num_threads()`` parts of equal entry counts,
run by the threads of torch's own OpenMP runtime (``VCNN_FOR_EACH_PART`` of ``vcnn_common.h``).
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

import numpy as np
import torch

from vcnn.engines.kernels import (
    KernelUnavailable,
    MlpShape,
    activation_define,
    bind,
    c_source,
    compiled_library,
    mlp_layer_defines,
    split_queries,
)
from vcnn.features import FeatureNormalizer, FieldTable, normalized_point_scalars
from vcnn.network import VectorCloudNet

logger = logging.getLogger(__name__)

__all__ = ["FusedMoments", "FusedPass", "KernelUnavailable", "kernel_spec"]

@dataclass(frozen=True)
class KernelSpec(MlpShape):
    """Everything the kernel depends on (hashable).

    The architecture (:func:`kernel_defines`) and the per-model numbers
    (:func:`kernel_constants`): the pair MLP's shape (:class:`vcnn.engines.kernels.MlpShape`) and the
    following.

    Attributes:
        dim: spatial dimension d.
        vectors: point vector types k.
        point_scalars: normalised point scalars read by the pair kernels (0 when they read
            none).
        pair_names: the spec's pair scalars, in order.
        proximity_length: L of the proximity feature.
        frame: (d, d) rotation of the relative positions (row-major), or None.
        radius: whether the region has a normalised radius (ellipse and ball).
        across_inverse_squared: 1 / b^2 of the region's cross-flow semi-axis.
        cutoff_start: start of the smooth cutoff, or None.
        volume_pooling: weights times the volume ratio.
        position_direction: position channel x / |x| instead of x.
        position_scalar: derived pair input |x| (``use_position_scalar_feature``).
        angle: derived pair input cos(x, v_0) (``use_angle_feature``).
        position_scale: the normaliser's position scale (1: none).
        pair_mean: the normaliser's means of the pair scalars.
        pair_std: their standard deviations.
        pair_low: lower ends of their training ranges (with the normaliser's margin), or ().
        pair_high: upper ends, or ().
        width: channels per kernel, m_k.
        lanes: floats per vector of the sums (a divisor of m_k).
    """

    dim: int
    vectors: int
    point_scalars: int
    pair_names: tuple[str, ...]
    proximity_length: float
    frame: tuple[float, ...] | None
    radius: bool
    across_inverse_squared: float
    cutoff_start: float | None
    volume_pooling: bool
    position_direction: bool
    position_scalar: bool
    angle: bool
    position_scale: float
    pair_mean: tuple[float, ...]
    pair_std: tuple[float, ...]
    pair_low: tuple[float, ...]
    pair_high: tuple[float, ...]
    width: int
    lanes: int

    @property
    def channels(self) -> int:
        """Pooled channels per kernel: the scalar one, ``k d`` vector components, d positions."""
        return 1 + (self.vectors + 1) * self.dim

    @property
    def record(self) -> dict[str, tuple[int, int]]:
        """Layout of the per-point float32 record: name -> (offset, length)."""
        fields = [
            ("direction", self.dim),
            ("inverse_along_squared", 1),
            ("upstream", self.dim),
            ("vectors", self.vectors * self.dim),
            ("point_scalars", self.point_scalars),
            ("volume", 1),
            ("outside", 1),
        ]
        layout, offset = {}, 0
        for name, length in fields:
            layout[name] = (offset, length)
            offset += length
        return layout

    @property
    def record_width(self) -> int:
        """Floats per point record."""
        return sum(length for _, length in self.record.values())


def kernel_spec(model: VectorCloudNet, table: FieldTable, normalizer: FeatureNormalizer | None) -> KernelSpec:
    """The kernel spec of a factorised net on a table.

    Raises:
        KernelUnavailable: for a configuration the kernel does not cover.
    """
    config = model.config
    if not isinstance(model, VectorCloudNet) or not model.is_factorised:
        raise KernelUnavailable("the network is not factorised")
    activation_define(config.activation)  # raises for an activation without a C form
    if table.points.device.type != "cpu":
        raise KernelUnavailable("the table is not on the CPU")
    if table.dtype != torch.float32 or next(model.parameters()).dtype != torch.float32:
        raise KernelUnavailable("the kernel computes in float32 only")
    point_count = table.point_scalars.shape[-1]
    if config.point_scalar_columns != tuple(range(point_count)):
        raise KernelUnavailable("the net's point columns are not the feature spec's point scalars")
    if table.num_points >= 2**31:
        raise KernelUnavailable("more than 2^31 points")
    width = config.embedding[-1] // config.num_kernels
    names = table.spec.pair_scalars
    radius = table.inverse_along_squared is not None and (
        "normalized_radius" in names or table.options.cutoff_start is not None
    )
    low = high = ()
    if normalizer is not None and normalizer.has_ranges:
        # the thresholds of FeatureNormalizer.outside_range, as float32 like the values
        columns = slice(point_count, None)
        lower = torch.tensor(normalizer.scalar_min[columns], dtype=torch.float64)
        upper = torch.tensor(normalizer.scalar_max[columns], dtype=torch.float64)
        margin = 1e-6 * (upper - lower).clamp_min(1e-12)
        low = tuple((lower - margin).to(torch.float32).tolist())
        high = tuple((upper + margin).to(torch.float32).tolist())
    pair_count = len(names)
    return KernelSpec(
        dim=table.dim,
        vectors=table.vectors.shape[1],
        point_scalars=point_count if config.point_scalars_in_kernels else 0,
        pair_names=names,
        proximity_length=float(table.spec.proximity_length),
        frame=None if table.frame is None else tuple(float(v) for v in table.frame.to(torch.float32).reshape(-1)),
        radius=radius,
        across_inverse_squared=float(1.0 / table.across**2) if radius else 0.0,
        cutoff_start=None if not radius else table.options.cutoff_start,
        volume_pooling=config.pooling == "volume",
        position_direction=config.position_vector == "direction",
        position_scalar=config.use_position_scalar_feature,
        angle=config.use_angle_feature,
        position_scale=1.0 if normalizer is None else float(normalizer.position_scale),
        pair_mean=(0.0,) * pair_count if normalizer is None else tuple(normalizer.scalar_mean[point_count:]),
        pair_std=(1.0,) * pair_count if normalizer is None else tuple(normalizer.scalar_std[point_count:]),
        pair_low=low,
        pair_high=high,
        width=width,
        lanes=next(lanes for lanes in (8, 4, 2, 1) if width % lanes == 0),
        **MlpShape.of(model.pair_embedding, config.activation).fields(),
    )


#: The pair scalars the kernel computes (``VCNN_PAIR_SCALARS`` of ``vcnn_entry.h``).
_PAIR_KINDS = ("proximity", "distance", "normalized_radius", "upstream_cosine")


def constant_layout(spec: KernelSpec) -> dict[str, tuple[int, int]]:
    """Layout of the per-model numbers passed at run time: name -> (offset, length)."""
    pairs = len(spec.pair_names)
    fields = [
        ("MEAN", pairs), ("STD", pairs), ("LOW", pairs), ("HIGH", pairs), ("POSITION_SCALE", 1),
        ("PROXIMITY", 1), ("ACROSS", 1), ("CUTOFF_START", 1), ("CUTOFF_SPAN", 1),
        ("FRAME", spec.dim * spec.dim),
    ]
    layout, offset = {}, 0
    for name, length in fields:
        layout[name] = (offset, length)
        offset += length
    return layout


def kernel_constants(spec: KernelSpec) -> torch.Tensor:
    """(C,) float32 per-model numbers in :func:`constant_layout` (each rounded once to float32).

    The normaliser's pair means and deviations, the ends of the pair scalars' ranges (0 when
    there is no range test), the position scale, -1 / L of the proximity, 1 / b^2 of the
    region, the cutoff's start and 1 - start, and the frame's rotation (identity without one).
    """
    pairs = len(spec.pair_names)
    values = {
        "MEAN": spec.pair_mean,
        "STD": spec.pair_std,
        "LOW": spec.pair_low or (0.0,) * pairs,
        "HIGH": spec.pair_high or (0.0,) * pairs,
        "POSITION_SCALE": (spec.position_scale,),
        "PROXIMITY": (-1.0 / spec.proximity_length,),
        "ACROSS": (spec.across_inverse_squared,),
        "CUTOFF_START": (spec.cutoff_start or 0.0,),
        "CUTOFF_SPAN": (1.0 - (spec.cutoff_start or 0.0),),
        "FRAME": spec.frame or tuple(np.eye(spec.dim).reshape(-1)),
    }
    flat = [float(v) for name in constant_layout(spec) for v in values[name]]
    return torch.tensor(np.asarray(flat, dtype=np.float64).astype(np.float32))


def kernel_defines(spec: KernelSpec) -> dict[str, object]:
    """The ``#define``s of ``fused_moments.c`` and ``training_rows.c`` for one spec.

    Sizes and options only (the architecture), never a per-model number.

    Raises:
        KernelUnavailable: for a pair scalar or an input count the kernel does not cover.
    """
    unknown = [name for name in spec.pair_names if name not in _PAIR_KINDS]
    if unknown:
        raise KernelUnavailable(f"pair scalars {unknown} have no kernel form")
    inputs = len(spec.pair_names) + spec.position_scalar + spec.angle + spec.point_scalars
    if inputs != spec.layer_inputs:
        raise KernelUnavailable(f"the pair kernels read {spec.layer_inputs} inputs, the kernel has {inputs}")
    pairs = " ".join(f"X({index}, {name.upper()})" for index, name in enumerate(spec.pair_names))
    return {
        "LANES": spec.entry_lanes,
        "ROW": spec.lanes,
        "GROUP": spec.group,
        "DIM": spec.dim,
        "VECTORS": spec.vectors,
        "POINT_SCALARS": spec.point_scalars,
        "KERNELS": spec.kernels,
        "WIDTH": spec.width,
        "PAIRS": len(spec.pair_names),
        "INPUTS": spec.layer_inputs,
        "PARAMETERS": spec.parameters,
        "RECORD": spec.record_width,
        **{f"RECORD_{name.upper()}": offset for name, (offset, _) in spec.record.items()},
        **{f"CONST_{name}": offset for name, (offset, _) in constant_layout(spec).items()},
        activation_define(spec.activation): None,
        "VCNN_PAIR_SCALARS(X)": pairs,
        "VCNN_UPSTREAM": int("upstream_cosine" in spec.pair_names),
        "VCNN_RADIUS": int(spec.radius),
        "VCNN_FRAME": int(spec.frame is not None),
        "VCNN_CUTOFF": int(spec.cutoff_start is not None),
        "VCNN_VOLUME_POOLING": int(spec.volume_pooling),
        "VCNN_RANGE_TEST": int(bool(spec.pair_low)),
        "VCNN_POSITION_SCALAR": int(spec.position_scalar),
        "VCNN_ANGLE": int(spec.angle),
        "VCNN_POSITION_DIRECTION": int(spec.position_direction),
        **mlp_layer_defines(spec),
    }


def kernel_source(spec: KernelSpec) -> str:
    """The C source of the inference kernel for one spec (``fused_moments.c``)."""
    return c_source("fused_moments.c", kernel_defines(spec))


@dataclass
class FusedMoments:
    """Un-normalised moments of a set of clouds and their input-range counts.

    Attributes:
        sums: (Q, K, channels, m_k) float32: per kernel k and channel c,
            ``sum_e s[e, k] c_e A[i_e, k]`` with ``s = w (1 + P)`` and ``c_e`` 1, the point
            vectors' components, then the position channel's components.
        totals: (Q,) float32 total pooling weight ``sum_e w_e``.
        outside_entries: entries with some raw scalar input outside the training range.
        outside_by_pair_column: (s_pair,) int64, entries outside per pair scalar.
        uses: (N,) int64 entries per point, or None (counted only when some point scalar is
            outside its range).
    """

    sums: torch.Tensor
    totals: torch.Tensor
    outside_entries: int
    outside_by_pair_column: torch.Tensor
    uses: torch.Tensor | None


class FusedPass:
    """The fused kernel bound to one net, table and normaliser.

    Build it with :meth:`build`; call it on the clouds of the table's points.
    """

    def __init__(
        self,
        spec: KernelSpec,
        library: ctypes.CDLL,
        *,
        model: VectorCloudNet,
        table: FieldTable,
        normalizer: FeatureNormalizer | None,
        point_outside: torch.Tensor,
        embedded: torch.Tensor,
    ) -> None:
        self.spec = spec
        self._function = bind(library, "vcnn_fused_moments")
        self.count_uses = bool(point_outside.any())
        self._coords = table.points.contiguous()
        self._periods = point_periods(table)
        self._records = point_records(spec, model, table, normalizer, point_outside)
        self._constants = kernel_constants(spec)
        self._parameters = torch.cat(
            [t.reshape(-1) for layer in model.pair_embedding.layers for t in (layer.weight, layer.bias)]
        ).detach().to(torch.float32).contiguous()
        self.table = embedded.detach().reshape(table.num_points, spec.kernels, spec.width).to(torch.float32).contiguous()

    @classmethod
    def build(
        cls,
        model: VectorCloudNet,
        table: FieldTable,
        normalizer: FeatureNormalizer | None,
        *,
        point_outside: torch.Tensor,
        embedded: torch.Tensor,
    ) -> FusedPass:
        """Assemble the source, compile it (or load it from the cache) and bind the kernel.

        Args:
            model: a factorised net (eval mode).
            table: the per-point tensors (CPU, float32).
            normalizer: the net's normaliser (None: raw inputs).
            point_outside: (N,) bool, points with some point scalar outside the training range.
            embedded: (N, m) float, the point embedding of every row
                (:func:`vcnn.inference.point_embedding`).

        Raises:
            KernelUnavailable: see :class:`KernelUnavailable`.
        """
        spec = kernel_spec(model, table, normalizer)
        return cls(
            spec,
            compiled_library(kernel_source(spec), symbols=("vcnn_fused_moments",)),
            model=model,
            table=table,
            normalizer=normalizer,
            point_outside=point_outside,
            embedded=embedded,
        )

    def __call__(
        self,
        offsets: np.ndarray,
        indices: np.ndarray,
        queries: np.ndarray,
        *,
        image_points: np.ndarray | None = None,
        weights: np.ndarray | None = None,
        threads: int | None = None,
    ) -> FusedMoments:
        """The moments of Q clouds (validated: offsets, indices and queries of this table).

        Args:
            offsets: (Q + 1,) int64 entry offsets, offsets[0] == 0.
            indices: (E,) int table rows of the entries, or with ``image_points`` their ids
                in a set of point images (:attr:`vcnn.clouds.Clouds.image_ids`).
            queries: (Q,) int table rows of the query points.
            image_points: (M,) int table row of every image id, or None.
            weights: (E,) float32 pooling weights that replace the computed ones, or None.
            threads: parallel parts (default ``torch.get_num_threads()``).

        Returns:
            The moments and the range counts.
        """
        spec = self.spec
        count = self._coords.shape[0]
        offsets = torch.as_tensor(np.ascontiguousarray(offsets, dtype=np.int64))
        points = torch.as_tensor(np.ascontiguousarray(indices, dtype=np.int32))
        query_rows = torch.as_tensor(np.ascontiguousarray(queries, dtype=np.int64))
        entries = points.numel()
        num_queries = query_rows.numel()
        if offsets.shape != (num_queries + 1,) or int(offsets[0]) != 0 or int(offsets[-1]) != entries:
            raise ValueError("offsets, indices and queries do not describe the same clouds")
        if num_queries and bool((torch.diff(offsets) < 1).any()):
            raise ValueError("every cloud needs at least one point (the query itself)")
        images = None
        if image_points is not None:
            images = torch.as_tensor(np.ascontiguousarray(image_points, dtype=np.int32))
            if entries and (int(points.min()) < 0 or int(points.max()) >= images.numel()):
                raise ValueError("a cloud entry is not an image id")
        given = None
        if weights is not None:
            given = torch.as_tensor(np.ascontiguousarray(weights, dtype=np.float32))
            if given.shape != (entries,):
                raise ValueError("weights must hold one value per cloud entry")
        for rows in (points if images is None else images, query_rows):
            if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= count):
                raise ValueError("a cloud entry or query is not a row of the table")
        sums = torch.empty(num_queries, spec.kernels, spec.channels, spec.width, dtype=torch.float32)
        totals = torch.empty(num_queries, dtype=torch.float32)
        bounds = split_queries(offsets, threads or torch.get_num_threads())
        parts = bounds.numel() - 1
        counts = torch.zeros(parts, 1 + len(spec.pair_names), dtype=torch.int64)
        uses = torch.zeros(parts, count, dtype=torch.int64) if self.count_uses else None
        status = self._function(
            parts,
            bounds.data_ptr(),
            offsets.data_ptr(),
            points.data_ptr(),
            None if images is None else images.data_ptr(),
            None if given is None else given.data_ptr(),
            *[
                t.data_ptr()
                for t in (query_rows, self._coords, self._periods, self._records,
                          self._constants, self._parameters, self.table, sums, totals, counts)
            ],
            None if uses is None else uses.data_ptr(),
            count,
        )
        if status:
            raise RuntimeError(f"the fused kernel failed with status {status}")
        counts = counts.sum(0)
        return FusedMoments(
            sums=sums,
            totals=totals,
            outside_entries=int(counts[0]),
            outside_by_pair_column=counts[1:],
            uses=None if uses is None else uses.sum(0),
        )


def point_periods(table: FieldTable) -> torch.Tensor:
    """(N, d, 2) float64 per point and axis: the period and its inverse (0 where not periodic)."""
    periods = torch.zeros(table.num_points, table.dim, 2, dtype=torch.float64)
    for axis, (length, inverse) in table.periodic_axes.items():
        periods[:, axis, 0] = length
        periods[:, axis, 1] = inverse
    return periods.contiguous()


def point_records(
    spec: KernelSpec,
    model: VectorCloudNet,
    table: FieldTable,
    normalizer: FeatureNormalizer | None,
    point_outside: torch.Tensor,
) -> torch.Tensor:
    """The per-point float32 records (layout :attr:`KernelSpec.record`)."""
    count = table.num_points
    parts = {
        "direction": table.direction.T,
        "inverse_along_squared": (
            table.inverse_along_squared[:, None]
            if table.inverse_along_squared is not None
            else torch.zeros(count, 1)
        ),
        "upstream": table.upstream_direction.T,
        "vectors": (table.vectors if normalizer is None else normalizer.vectors(table.vectors)).reshape(count, -1),
        "point_scalars": normalized_point_scalars(table, normalizer)[:, : spec.point_scalars],
        "volume": table.volume_lowp[:, None],
        "outside": point_outside.to(torch.float32)[:, None],
    }
    columns = [parts[name].to(torch.float32).reshape(count, length) for name, (_, length) in spec.record.items()]
    return torch.cat(columns, dim=1).contiguous()


def probe(spec: KernelSpec, name: str, values: torch.Tensor) -> torch.Tensor:
    """The kernel's ``exp`` or ``activation`` on float32 values (for tests).

    Args:
        spec: the kernel.
        name: ``"exp"`` or ``"activation"``.
        values: (n,) float32, n a multiple of ``entry_lanes * group``.

    Returns:
        (n,) float32.
    """
    symbol = f"vcnn_probe_{name}"
    function = bind(compiled_library(kernel_source(spec), symbols=(symbol,)), symbol)
    values = values.to(torch.float32).contiguous()
    if values.numel() % (spec.entry_lanes * spec.group):
        raise ValueError("probe: n must be a multiple of entry_lanes * group")
    out = torch.empty_like(values)
    function(values.data_ptr(), out.data_ptr(), values.numel())
    return out
