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

The C source is generated for one net, feature spec, normaliser and cloud options (so every loop
has a fixed trip count and every constant is a literal), compiled with the system C compiler
(``$CC``, else ``cc``) once per source and machine, and cached on disk in the private per-user
cache of :mod:`vcnn.kernels` (``$VCNN_CACHE_DIR/kernels``, else ``~/.cache/vcnn/kernels``);
compilation takes well under a second.

The formulas mirror :func:`vcnn.features.entry_inputs`, :class:`vcnn.features.FeatureNormalizer`
and the pair-kernel and pooling methods of :class:`vcnn.network.VectorCloudNet`, which stay the
reference: ``tests/test_fused.py`` checks the kernel against them for every feature, region,
pooling and position option it covers (float32 round-off). A configuration it does not cover,
a missing compiler or a failed build raises :class:`KernelUnavailable` with the reason, and the
caller keeps the torch pass.

Threads: the queries are split into ``torch.get_num_threads()`` parts of equal entry counts,
run by the threads of torch's own OpenMP runtime (:func:`vcnn.kernels.c_parallel_driver`).
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

import numpy as np
import torch

from vcnn.features import FeatureNormalizer, FieldTable, normalized_point_scalars
from vcnn.kernels import (
    C_HELPERS,
    C_INCLUDES,
    KernelUnavailable,
    MlpShape,
    c_mlp_forward,
    c_parallel_driver,
    c_reciprocal,
    c_widened,
    compiled_library,
    split_queries,
)
from vcnn.network import VectorCloudNet

logger = logging.getLogger(__name__)

__all__ = ["FusedMoments", "FusedPass", "KernelUnavailable", "kernel_spec"]

#: Vector forms of the activations (``vexp`` is the kernel's own vectorised exp).
_ACTIVATION_CODE = {
    "relu": "blend(x > 0.0f, x, zero)",
    "silu": "x * reciprocal(1.0f + vexp(-x))",
    "tanh": "1.0f - 2.0f * reciprocal(vexp(2.0f * x) + 1.0f)",
}
#: Activations run lane by lane through libm (correct, slower).
_SCALAR_ACTIVATION_CODE = {
    "gelu": "0.5f * v * (1.0f + erff(v * 0.70710678118654752f))",
    # torch's softplus: beta 1, threshold 20
    "softplus": "v > 20.0f ? v : log1pf(expf(v))",
}
_SOFTENING_SQUARED = 1e-24  # as vcnn.network



@dataclass(frozen=True)
class KernelSpec(MlpShape):
    """Everything the generated source depends on (hashable).

    The pair MLP's shape (:class:`vcnn.kernels.MlpShape`) and the following.

    Attributes:
        dim: spatial dimension d.
        vectors: point vector types k.
        point_scalars: normalised point scalars read by the pair kernels (0 when they read
            none).
        pair_names: the spec's pair scalars, in order.
        proximity_length: L of the proximity feature.
        periodic: axes with a periodic wrap.
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
    periodic: tuple[int, ...]
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
    if config.activation not in _ACTIVATION_CODE and config.activation not in _SCALAR_ACTIVATION_CODE:
        raise KernelUnavailable(f"activation {config.activation!r} has no kernel form")
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
        periodic=tuple(sorted(table.periodic_axes)),
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


def _literal(value: float) -> str:
    """A float32 C literal that is exactly ``value`` rounded to float32."""
    return f"{float(np.float32(value)).hex()}f"


def kernel_source(spec: KernelSpec) -> str:
    """The C source of the kernel for one spec (GCC/Clang vector extensions)."""
    lines = [*c_header(spec), *c_pair_kernels(spec), *entry_source(spec), *_main_source(spec), _PROBES]
    return "\n".join(lines) + "\n"


def c_header(spec: KernelSpec) -> list[str]:
    """Includes, vector types, sizes and the helpers (exp, reciprocal, activation) of a kernel."""
    lanes, entries = spec.lanes, spec.entry_lanes
    lines = [
        *C_INCLUDES,
        "/* vf, vi: one value per entry of a step; vr: a piece of a row of the embedding */",
        f"typedef float vf __attribute__((vector_size({4 * entries})));",
        f"typedef float vfu __attribute__((vector_size({4 * entries}), aligned(4)));",
        f"typedef int32_t vi __attribute__((vector_size({4 * entries})));",
        f"typedef float vr __attribute__((vector_size({4 * lanes})));",
        f"typedef float vru __attribute__((vector_size({4 * lanes}), aligned(4)));",
        f"#define LANES {entries}",
        f"#define ROW {lanes}",
        f"#define DIM {spec.dim}",
        f"#define KERNELS {spec.kernels}",
        f"#define WIDTH {spec.width}",
        f"#define CHANNELS {spec.channels}",
        f"#define RECORD {spec.record_width}",
        f"#define PAIRS {len(spec.pair_names)}",
        f"#define INPUTS {spec.layer_inputs}",
        f"#define PARAMETERS {spec.parameters}",
        f"#define BLOCK {max(64, entries)}",
        f"#define GROUP {spec.group}",
        f"typedef float vg __attribute__((vector_size({4 * entries * spec.group})));",
        f"typedef int32_t vgi __attribute__((vector_size({4 * entries * spec.group})));",
        f"#define GLANES {entries * spec.group}",
    ]
    activation = ["static inline vf activation(vf x) {", "  const vf zero = {};", "  (void)zero;"]
    if spec.activation in _ACTIVATION_CODE:
        activation.append(f"  return {_ACTIVATION_CODE[spec.activation]};")
    else:
        activation += [
            "  vf y;",
            "  for (int b = 0; b < LANES; ++b) {",
            "    float v = x[b];",
            f"    y[b] = {_SCALAR_ACTIVATION_CODE[spec.activation]};",
            "  }",
            "  return y;",
        ]
    activation.append("}")
    # The same functions on GROUP vectors at once (type vg): each operation becomes GROUP
    # independent hardware operations in program order, which hides the exp's latency.
    lines += [C_HELPERS, c_reciprocal("vf", 4 * entries), c_widened(C_HELPERS)]
    lines += [c_reciprocal("vg", 4 * entries * spec.group).replace("reciprocal", "reciprocal_g")]
    lines += ["\n".join(activation), c_widened("\n".join(activation))]
    return lines


def c_pair_kernels(spec: KernelSpec) -> list[str]:
    """The pair kernels on one vector of entries (lanes = entries)."""
    last = len(spec.layers) - 1
    return [
        "static inline void pair_kernels(const vf* x, const float* params, vf* out) {",
        "  const vf zero = {};",
        *[f"  vf h{index}[{width}];" for index, width in enumerate(spec.layers)],
        *c_mlp_forward(spec, slopes=False),
        f"  for (int k = 0; k < KERNELS; ++k) out[k] = h{last}[k];",
        "}",
    ]


def entry_source(spec: KernelSpec) -> list[str]:
    """C function ``entry_values``: one SIMD vector of a cloud's entries, from table rows.

    It mirrors :func:`vcnn.features.entry_inputs`, the normaliser and the pooling weight: from
    the entries' rows, the query's origin, periods and record, it writes the pair kernels'
    normalised inputs ``x``, the channels besides the constant one ``extra`` and the raw pair
    scalars ``raw`` (for the range test), and returns the pooling weight (0 in lanes that are
    not ``valid``; not yet divided by the cloud's total). The inference kernel and the training
    kernel (:mod:`vcnn.fused_training`) both call it.
    """
    record = spec.record
    dim = spec.dim
    f = _literal
    gather = []  # per-lane loads of point fields
    for name in ("upstream", "vectors", "point_scalars", "volume", "outside"):
        start, length = record[name]
        needed = {
            "upstream": "upstream_cosine" in spec.pair_names,
            "vectors": spec.vectors > 0,
            "point_scalars": spec.point_scalars > 0,
            "volume": spec.volume_pooling,
            "outside": bool(spec.pair_low),
        }[name]
        if needed and length:
            gather.append(f"  vf {name}[{length}];")
            gather.append(f"  for (int b = 0; b < LANES; ++b) for (int i = 0; i < {length}; ++i)")
            gather.append(f"    {name}[i][b] = records[(int64_t)row[b] * RECORD + {start} + i];")
    code = [
        "static inline vf entry_values(const int32_t* row, vi valid, const double* origin,",
        "                              const double* length, const double* inverse,",
        "                              const float* own, const double* coords,",
        "                              const float* records, vf* x, vf* extra, vf* raw,",
        "                              vf* point_outside) {",
        "  const vf zero = {};",
        "  (void)length; (void)inverse; (void)own; (void)raw; (void)point_outside;",
        "  vf rel[DIM];",
        "  for (int b = 0; b < LANES; ++b) {",
        "    const double* c = coords + (int64_t)row[b] * DIM;",
        "    for (int a = 0; a < DIM; ++a) {",
        "      double r = c[a] - origin[a];",
    ]
    if spec.periodic:
        axes = " || ".join(f"a == {axis}" for axis in spec.periodic)
        code.append(f"      if ({axes}) {{ double t = r * inverse[a]; r = r - length[a] * nearbyint(t); }}")
    code += [
        "      rel[a][b] = (float)r;",
        "    }",
        "  }",
    ]
    if spec.frame is not None:
        code.append("  vf turned[DIM];")
        for r in range(dim):
            terms = " + ".join(f"{f(spec.frame[r * dim + c])} * rel[{c}]" for c in range(dim))
            code.append(f"  turned[{r}] = {terms};")
        code.append("  memcpy(rel, turned, sizeof rel);")
    squared = " + ".join(f"rel[{a}] * rel[{a}]" for a in range(dim))
    code += [f"  const vf distance_squared = {squared};", "  const vf distance = vsqrt(distance_squared);"]
    if spec.radius:
        parallel = " + ".join(f"rel[{a}] * own[{record['direction'][0] + a}]" for a in range(dim))
        across = f(spec.across_inverse_squared)
        code += [
            f"  const vf parallel = {parallel};",
            f"  const vf radius_squared = parallel * parallel * (own[{record['inverse_along_squared'][0]}] - {across})"
            f" + distance_squared * {across};",
            "  const vf radius = vsqrt(blend(radius_squared > 0.0f, radius_squared, zero));",
        ]
    code += gather
    if spec.pair_low:
        code.append("  *point_outside = outside[0];")
    # raw pair scalars, in the spec's order
    for index, name in enumerate(spec.pair_names):
        if name == "proximity":
            value = f"vexp(distance * {f(-1.0 / spec.proximity_length)})"
        elif name == "distance":
            value = "distance"
        elif name == "normalized_radius":
            value = "radius"
        else:
            dot = " + ".join(f"rel[{a}] * upstream[{a}]" for a in range(dim))
            value = (
                f"blend(distance > 0.0f, ({dot}) / blend(distance > 1e-30f, distance, zero + 1e-30f), zero)"
            )
        code.append(f"  raw[{index}] = {value};")
    # normalised pair-kernel inputs: pair scalars, derived scalars, point scalars
    position = [f"(rel[{a}] / {f(spec.position_scale)})" for a in range(dim)]
    code.append(f"  vf position[DIM] = {{{', '.join(position)}}};")
    inputs = [
        f"(raw[{index}] - {f(spec.pair_mean[index])}) / {f(spec.pair_std[index])}"
        for index in range(len(spec.pair_names))
    ]
    soft = f(_SOFTENING_SQUARED)
    position_squared = " + ".join(f"position[{a}] * position[{a}]" for a in range(dim))
    if spec.position_scalar or spec.angle or spec.position_direction:
        code.append(f"  const vf softened = {position_squared} + {soft};")
    if spec.position_scalar:
        inputs.append("vsqrt(softened)")
    if spec.angle:
        first = [f"vectors[{a}]" for a in range(dim)]
        dot = " + ".join(f"position[{a}] * {first[a]}" for a in range(dim))
        first_squared = " + ".join(f"{v} * {v}" for v in first)
        inputs.append(f"({dot}) * (1.0f / vsqrt(softened)) * (1.0f / vsqrt({first_squared} + {soft}))")
    inputs += [f"point_scalars[{i}]" for i in range(spec.point_scalars)]
    if len(inputs) != spec.layer_inputs:
        raise KernelUnavailable(
            f"the pair kernels read {spec.layer_inputs} inputs, the kernel has {len(inputs)}"
        )
    code += [f"  x[{index}] = {value};" for index, value in enumerate(inputs)]
    # pooling weight
    weight = "zero + 1.0f"
    if spec.cutoff_start is not None:
        start = spec.cutoff_start
        code += [
            f"  vf t = (radius - {f(start)}) / {f(1.0 - start)};",
            "  t = blend(t > 1.0f, zero + 1.0f, blend(t > 0.0f, t, zero));",
            "  vf cut = 1.0f - t * t * t * (t * (6.0f * t - 15.0f) + 10.0f);",
            "  cut = blend(cut > 1.0f, zero + 1.0f, blend(cut > 0.0f, cut, zero));",
        ]
        weight = "cut"
    if spec.volume_pooling:
        weight = f"({weight}) * (volume[0] / own[{record['volume'][0]}])"
    # channels: the point vectors' components, then the position channel
    extra = [f"vectors[{i}]" for i in range(spec.vectors * dim)]
    if spec.position_direction:
        code.append(
            f"  const vf unit = blend(softened > {f(2 * _SOFTENING_SQUARED)}, 1.0f / vsqrt(softened), zero);"
        )
        extra += [f"position[{a}] * unit" for a in range(dim)]
    else:
        extra += [f"position[{a}]" for a in range(dim)]
    code += [f"  extra[{index}] = {value};" for index, value in enumerate(extra)]
    code += [f"  return blend(valid, {weight}, zero);", "}"]
    return code


def _main_source(spec: KernelSpec) -> list[str]:
    """The kernel's entry point: inputs, range test, pair kernels and sums per cloud."""
    f = _literal
    code = [
        "/* The clouds first..last-1; counts and uses: this part's own (see c_parallel_driver). */",
        "static int moments_part(int64_t first, int64_t last, int64_t part, const int64_t* offsets,",
        "                        const int32_t* points, const int32_t* images,",
        "                        const int64_t* queries, const double* coords,",
        "                        const double* periods, const float* records, const float* params,",
        "                        const float* table, float* sums, float* totals, int64_t* counts,",
        "                        int64_t* uses, int64_t rows_count) {",
        "  counts += part * (PAIRS + 1);",
        "  if (uses) uses += part * rows_count;",
        "  const vf zero = {};",
        "  vf lane;",
        "  for (int b = 0; b < LANES; ++b) lane[b] = (float)b;",
        "  float scaled[KERNELS][CHANNELS][BLOCK] __attribute__((aligned(128)));",
        "  int32_t block_rows[BLOCK];",
        "  vi outside_any = {};",
        "  vi outside_pair[PAIRS + 1];",
        "  for (int j = 0; j < PAIRS + 1; ++j) outside_pair[j] = (vi){};",
        "  for (int64_t q = first; q < last; ++q) {",
        "    const int64_t begin = offsets[q], end = offsets[q + 1];",
        "    const int64_t query = queries[q];",
        "    const float* own = records + query * RECORD;",
        "    double origin[DIM], length[DIM], inverse[DIM];",
        "    for (int a = 0; a < DIM; ++a) {",
        "      origin[a] = coords[query * DIM + a];",
        "      length[a] = periods[query * 2 * DIM + 2 * a];",
        "      inverse[a] = periods[query * 2 * DIM + 2 * a + 1];",
        "    }",
        "    vr acc[KERNELS][CHANNELS][WIDTH / ROW];",
        "    memset(acc, 0, sizeof acc);",
        "    vf total = zero;",
        "    for (int64_t block = begin; block < end; block += BLOCK) {",
        "      const int64_t size = end - block < BLOCK ? end - block : BLOCK;",
        "      for (int64_t v = 0; v < size; v += LANES) {",
        "      /* lanes past the cloud's end repeat its last entry and weigh nothing */",
        "      const int64_t e = block + v;",
        "      const vi valid = lane < (float)(end - e);",
        "      int32_t row[LANES];",
        "      for (int b = 0; b < LANES; ++b) {",
        "        /* an entry is a point, or with images an image id of a point */",
        "        const int32_t id = points[e + b < end ? e + b : end - 1];",
        "        row[b] = images ? images[id] : id;",
        "        block_rows[v + b] = row[b];",
        "      }",
        "      vf x[INPUTS], extra[CHANNELS - 1], raw[PAIRS + 1], point_outside;",
        "      const vf w = entry_values(row, valid, origin, length, inverse, own, coords, records,",
        "                                x, extra, raw, &point_outside);",
    ]
    if spec.pair_low:
        code.append("      vi any = point_outside > 0.5f;")
        for index in range(len(spec.pair_names)):
            low, high = f(spec.pair_low[index]), f(spec.pair_high[index])
            code += [
                f"      const vi out{index} = (raw[{index}] < {low}) | (raw[{index}] > {high});",
                f"      outside_pair[{index}] -= out{index} & valid;",
                f"      any |= out{index};",
            ]
        code.append("      outside_any -= any & valid;")
        code.append("      if (uses) for (int b = 0; b < LANES; ++b) if (valid[b]) uses[row[b]] += 1;")
    code += [
        "      vf out[KERNELS];",
        "      pair_kernels(x, params, out);",
        "      total += w;",
        "      for (int k = 0; k < KERNELS; ++k) {",
        "        const vf s = w + w * out[k];",
        "        *(vfu*)(scaled[k][0] + v) = s;",
        "        for (int c = 1; c < CHANNELS; ++c) *(vfu*)(scaled[k][c] + v) = s * extra[c - 1];",
        "      }",
        "      }",
        *c_pooled_sums("block_rows", "table", "size").splitlines(),
        "    }",
        "    float whole = 0.0f;",
        "    for (int b = 0; b < LANES; ++b) whole += total[b];",
        "    totals[q] = whole;",
        "    memcpy(sums + q * KERNELS * CHANNELS * WIDTH, acc, sizeof acc);",
        "  }",
        "  for (int b = 0; b < LANES; ++b) {",
        "    counts[0] += outside_any[b];",
        "    for (int j = 0; j < PAIRS; ++j) counts[1 + j] += outside_pair[j][b];",
        "  }",
        "  return 0;",
        "}",
        c_parallel_driver(
            "vcnn_fused_moments",
            "moments_part",
            "const int64_t* offsets, const int32_t* points, const int32_t* images, "
            "const int64_t* queries, "
            "const double* coords, const double* periods, const float* records, "
            "const float* params, const float* table, float* sums, float* totals, "
            "int64_t* counts, int64_t* uses, int64_t rows_count",
            "offsets, points, images, queries, coords, periods, records, params, table, sums, "
            "totals, "
            "counts, uses, rows_count",
        ),
    ]
    return code


def c_pooled_sums(rows: str, table: str, size: str) -> str:
    """C block: adds ``scaled[k][c][v]`` times table row ``rows[v]`` to ``acc[k][c]``, v < size.

    Two sets of sums (even and odd entries): the additions of one set wait on each other, two
    sets keep the multiply-add units busy.
    """
    return f"""      for (int k = 0; k < KERNELS; ++k) {{
        vr sum[CHANNELS][WIDTH / ROW], odd[CHANNELS][WIDTH / ROW];
        memcpy(sum, acc[k], sizeof sum);
        memset(odd, 0, sizeof odd);
        int64_t v = 0;
        for (; v + 1 < {size}; v += 2) {{
          const vru* even_row = (const vru*)({table} + ((int64_t){rows}[v] * KERNELS + k) * WIDTH);
          const vru* odd_row = (const vru*)({table} + ((int64_t){rows}[v + 1] * KERNELS + k) * WIDTH);
          for (int c = 0; c < WIDTH / ROW; ++c) {{
            const vr a = even_row[c], b = odd_row[c];
            for (int h = 0; h < CHANNELS; ++h) {{
              sum[h][c] += scaled[k][h][v] * a;
              odd[h][c] += scaled[k][h][v + 1] * b;
            }}
          }}
        }}
        if (v < {size}) {{
          const vru* row = (const vru*)({table} + ((int64_t){rows}[v] * KERNELS + k) * WIDTH);
          for (int c = 0; c < WIDTH / ROW; ++c)
            for (int h = 0; h < CHANNELS; ++h) sum[h][c] += scaled[k][h][v] * row[c];
        }}
        for (int h = 0; h < CHANNELS; ++h)
          for (int c = 0; c < WIDTH / ROW; ++c) acc[k][h][c] = sum[h][c] + odd[h][c];
      }}"""


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
        self._function = library.vcnn_fused_moments
        self._function.restype = ctypes.c_int
        self._function.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 14 + [ctypes.c_int64]
        self.count_uses = bool(point_outside.any())
        self._coords = table.points.contiguous()
        self._periods = point_periods(table)
        self._records = point_records(spec, model, table, normalizer, point_outside)
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
        """Generate, compile (or load from the cache) and bind the kernel.

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
        threads: int | None = None,
    ) -> FusedMoments:
        """The moments of Q clouds (validated: offsets, indices and queries of this table).

        Args:
            offsets: (Q + 1,) int64 entry offsets, offsets[0] == 0.
            indices: (E,) int table rows of the entries, or with ``image_points`` their ids
                in a set of point images (:attr:`vcnn.clouds.Clouds.image_ids`).
            queries: (Q,) int table rows of the query points.
            image_points: (M,) int table row of every image id, or None.
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
            *[
                t.data_ptr()
                for t in (query_rows, self._coords, self._periods, self._records,
                          self._parameters, self.table, sums, totals, counts)
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
    function = getattr(compiled_library(kernel_source(spec), symbols=(symbol,)), symbol)
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    values = values.to(torch.float32).contiguous()
    if values.numel() % (spec.entry_lanes * spec.group):
        raise ValueError("probe: n must be a multiple of entry_lanes * group")
    out = torch.empty_like(values)
    function(values.data_ptr(), out.data_ptr(), values.numel())
    return out


# Entry points for tests: the kernel's exp and activation on n values (n a multiple of GLANES).
_PROBES = "\n".join(
    f"""void vcnn_probe_{name}(const float* x, float* y, int64_t n) {{
  for (int64_t i = 0; i + GLANES <= n; i += GLANES) {{
    vg v;
    memcpy(&v, x + i, sizeof v);
    v = {function}(v);
    memcpy(y + i, &v, sizeof v);
  }}
}}"""
    for name, function in (("exp", "vexp_g"), ("activation", "activation_g"))
)
