"""Generated C kernels: compiled once per source and machine, cached on disk, loaded with ctypes.

The kernels of :mod:`vcnn.fused` (inference) and :mod:`vcnn.pooled_sums` (training) are C
sources generated for one network's shapes. This module compiles a source with the system C
compiler (``$CC``, else ``cc``) into a shared library named after the hash of the source, the
compiler, the flags and the CPU's instruction set (the code is built with ``-march=native``),
keeps it in ``$VCNN_CACHE_DIR/kernels``, else ``$XDG_CACHE_HOME/vcnn/kernels``, else
``~/.cache/vcnn/kernels`` (a per-user temporary folder when that cannot be written), and loads
it once per process. Any failure raises :class:`KernelUnavailable`, whose message says why, and
is remembered for the process; callers then use their torch implementation. ``VCNN_KERNELS=0``
turns the kernels off (the torch implementations run everywhere).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "C_INCLUDES",
    "c_activation_slope",
    "C_HELPERS",
    "ENTRY_LANES",
    "GROUP",
    "KernelUnavailable",
    "MlpShape",
    "c_reciprocal",
    "c_widened",
    "c_mlp_forward",
    "c_parallel_driver",
    "compiled_library",
    "even_parts",
    "kernel_cache_dir",
    "split_queries",
    "warn_unavailable",
]

#: Compiler flags. No -ffast-math: NaN and inf must propagate. OpenMP: the kernels' threads
#: come from the OpenMP runtime torch has loaded (the same libgomp.so.1), so they never compete
#: with torch's spinning threads; without OpenMP support the kernels are built serial.
_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-shared", "-fPIC")
_OPENMP = ("-fopenmp",)


class KernelUnavailable(RuntimeError):
    """A generated kernel cannot run on this machine or for this net (the message says why)."""


_LIBRARIES: dict[str, ctypes.CDLL | KernelUnavailable] = {}
_LOCK = threading.Lock()


def compiled_library(source: str) -> ctypes.CDLL:
    """The loaded library of a C source, built once per process (and cached on disk).

    Raises:
        KernelUnavailable: no C compiler, or the build failed (remembered for the process).
    """
    if os.environ.get("VCNN_KERNELS", "").strip().lower() in ("0", "off", "no", "false"):
        raise KernelUnavailable("the C kernels are turned off (VCNN_KERNELS)")
    with _LOCK:
        known = _LIBRARIES.get(source)
        if known is None:
            try:
                known = _build(source)
            except KernelUnavailable as error:
                known = error
            _LIBRARIES[source] = known
    if isinstance(known, KernelUnavailable):
        raise known
    return known


_WARNED: set[tuple[str, str]] = set()


def warn_unavailable(log: logging.Logger, what: str, error: KernelUnavailable) -> None:
    """Warn once per process and reason that a kernel does not run and torch takes over."""
    key = (what, str(error))
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning("%s unavailable (%s); using torch operations", what, error)


def split_queries(offsets: torch.Tensor, parts: int) -> torch.Tensor:
    """(P + 1,) int64 bounds of P ranges of rows (queries) of about equal entry counts.

    Args:
        offsets: (Q + 1,) int64 row offsets.
        parts: at most this many ranges.
    """
    queries = offsets.numel() - 1
    parts = max(1, min(parts, queries))
    targets = np.linspace(0, int(offsets[-1]), parts + 1)[1:-1]
    cuts = np.searchsorted(offsets.numpy(), targets)
    bounds = [0, *sorted({int(c) for c in cuts} - {0, queries}), max(queries, 0)]
    return torch.tensor(bounds, dtype=torch.int64)


def c_parallel_driver(name: str, part: str, parameters: str, arguments: str) -> str:
    """C source of ``int name(int64_t parts, const int64_t* bounds, <parameters>)``.

    It calls ``part(bounds[p], bounds[p + 1], p, <arguments>)`` for every part p, the parts
    shared among the threads of an OpenMP team when the source is built with OpenMP (part p
    owns any per-part output buffer p, so no two threads write the same memory), and returns
    the bitwise or of the parts' statuses.
    """
    return "\n".join(
        [
            "#ifdef _OPENMP",
            "#include <omp.h>",
            "#endif",
            f"int {name}(int64_t parts, const int64_t* bounds, {parameters}) {{",
            "  int status = 0;",
            "#ifdef _OPENMP",
            "#pragma omp parallel num_threads((int)parts) reduction(|:status)",
            "#endif",
            "  {",
            "    int team = 1, me = 0;",
            "#ifdef _OPENMP",
            "    team = omp_get_num_threads();",
            "    me = omp_get_thread_num();",
            "#endif",
            "    for (int64_t p = me; p < parts; p += team)",
            f"      status |= {part}(bounds[p], bounds[p + 1], p, {arguments});",
            "  }",
            "  return status;",
            "}",
        ]
    )


def even_parts(count: int, parts: int | None = None) -> torch.Tensor:
    """(P + 1,) int64 bounds of P about equal ranges of ``count`` items (P: torch's threads)."""
    parts = max(1, min(parts or torch.get_num_threads(), max(count, 1)))
    return torch.tensor([round(count * p / parts) for p in range(parts + 1)], dtype=torch.int64)


def kernel_cache_dir() -> Path:
    """Where compiled kernels are kept between processes."""
    if os.environ.get("VCNN_CACHE_DIR"):
        return Path(os.environ["VCNN_CACHE_DIR"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vcnn" / "kernels"


def _machine_key() -> str:
    """The CPU's instruction-set flags (the kernel is built with -march=native)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _build(source: str) -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None or shutil.which(compiler) is None:
        raise KernelUnavailable(f"no C compiler found ({compiler or 'cc'}; install gcc or set CC)")
    key = hashlib.sha256("\n".join([source, compiler, " ".join(_FLAGS), _machine_key()]).encode())
    failures = []
    for folder in (kernel_cache_dir(), Path(tempfile.gettempdir()) / f"vcnn-kernels-{os.getuid()}"):
        try:
            return _load_or_compile(compiler, source, folder, key.hexdigest()[:24])
        except OSError as error:  # an unwritable cache, a library that does not load
            failures.append(f"{folder}: {error}")
    raise KernelUnavailable("could not build a kernel: " + "; ".join(failures))


def _load_or_compile(compiler: str, source: str, folder: Path, key: str) -> ctypes.CDLL:
    """The cached library (OpenMP build, else serial build), compiled when missing."""
    threaded, serial = folder / f"kernel_{key}_omp.so", folder / f"kernel_{key}.so"
    try:
        if not threaded.exists():
            _compile(compiler, source, folder, threaded, extra=_OPENMP)
        return ctypes.CDLL(str(threaded))
    except (KernelUnavailable, OSError) as error:
        # no OpenMP for this compiler, or a runtime the process cannot bind: a serial build
        logger.info("using the kernel without OpenMP (%s)", error)
    if not serial.exists():
        _compile(compiler, source, folder, serial)
    return ctypes.CDLL(str(serial))


def _compile(
    compiler: str, source: str, folder: Path, library: Path, *, extra: tuple[str, ...] = ()
) -> None:
    """Compile ``source`` into ``library`` (atomic: concurrent builders write the same file)."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        source_path = Path(scratch) / "kernel.c"
        source_path.write_text(source)
        built = Path(scratch) / "kernel.so"
        try:
            result = subprocess.run(
                [compiler, *_FLAGS, *extra, str(source_path), "-o", str(built), "-lm"],
                capture_output=True,
                text=True,
                timeout=300,
            )
        except subprocess.SubprocessError as error:
            raise KernelUnavailable(f"compiling a kernel with {compiler}: {error}") from error
        if result.returncode != 0:
            message = (result.stderr or result.stdout).strip().splitlines()
            raise KernelUnavailable(
                f"compiling a kernel with {compiler} failed: "
                + (message[0] if message else f"exit status {result.returncode}")
            )
        os.replace(built, library)


#: Entries per step of the per-entry arithmetic (KernelSpec.entry_lanes), and hidden units
#: whose activations are evaluated together (KernelSpec.group). Measured on the published
#: model (2-core AMD EPYC, AVX-512): 8 x 2 took 0.64 s where 8 x 1 took 0.78 s, 16 x 1 0.65 s,
#: 8 x 4 and 32 x 1 over 1 s (register spills).
ENTRY_LANES = 8
GROUP = 2


@dataclass(frozen=True)
class MlpShape:
    """The shape of a pair-kernel MLP (:class:`vcnn.network.MLP`) as generated C sees it.

    Attributes:
        layers: output width of each layer; the last is the number of kernels K.
        layer_inputs: input width of the first layer.
        residual: per layer, 0 (none), 1 (add the input) or 2 (add the input twice over).
        activate_last: whether the last layer is activated.
        activation: activation name.
        entry_lanes: entries per SIMD step (:data:`ENTRY_LANES`).
        group: hidden units whose activations run together (:data:`GROUP`): the exp is a long
            chain of dependent operations, and GROUP independent chains in program order keep
            the floating-point units busy.
    """

    layers: tuple[int, ...]
    layer_inputs: int
    residual: tuple[int, ...]
    activate_last: bool
    activation: str
    entry_lanes: int
    group: int

    @property
    def kernels(self) -> int:
        """Number of pair kernels K (the last layer's width)."""
        return self.layers[-1]

    @property
    def parameters(self) -> int:
        """Weights and biases of all layers (the flat layout: per layer, weight then bias)."""
        inputs = (self.layer_inputs, *self.layers[:-1])
        return sum(out * (size + 1) for size, out in zip(inputs, self.layers, strict=True))

    @classmethod
    def of(cls, mlp, activation: str) -> MlpShape:
        """The shape of an MLP with ``layers``, ``residual`` and ``activate_last``."""
        layers = tuple(layer.out_features for layer in mlp.layers)
        residual, previous = [], mlp.layers[0].in_features
        for index, out in enumerate(layers):
            activated = index < len(layers) - 1 or mlp.activate_last
            kind = 0
            if mlp.residual and activated:
                kind = 1 if out == previous else 2 if out == 2 * previous else 0
            residual.append(kind)
            previous = out
        return cls(
            layers=layers,
            layer_inputs=mlp.layers[0].in_features,
            residual=tuple(residual),
            activate_last=bool(mlp.activate_last),
            activation=activation,
            entry_lanes=ENTRY_LANES,
            group=GROUP,
        )

    def fields(self) -> dict:
        """The fields by name (to build a subclass instance from this shape)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def mlp_layers(shape: MlpShape) -> list[tuple[int, str, int, int, int, int, bool]]:
    """Per layer: index, input's C name, input width, width, weight offset, bias offset, activated.

    Layer i reads ``x`` (i = 0) or ``h{i-1}`` and writes ``h{i}``; the flat parameters hold,
    per layer, the weight (row-major) and then the bias.
    """
    layers, offset = [], 0
    previous, size = "x", shape.layer_inputs
    for index, width in enumerate(shape.layers):
        bias = offset + width * size
        activated = index < len(shape.layers) - 1 or shape.activate_last
        layers.append((index, previous, size, width, offset, bias, activated))
        offset = bias + width
        previous, size = f"h{index}", width
    return layers


def c_mlp_forward(shape: MlpShape, *, slopes: bool) -> list[str]:
    """C lines of the pair MLP's forward on one vector of entries ``x`` (one lane per entry).

    Layer i's output goes to ``h{i}`` (declared by the caller), with ``slopes`` the derivative of
    its activation to ``s{i}`` (functions ``act_slope``/``act_slope_g``; else ``activation`` and
    ``activation_g``). The weights are scalars read from ``params``: every layer is broadcast
    multiply-adds, unrolled so that the units' independent chains overlap, and activations run
    GROUP units at a time (the exp is a long chain of dependent operations).
    """
    lines = []
    for index, previous, size, width, weights, bias, activated in mlp_layers(shape):
        lines += [
            f'  _Pragma("GCC unroll 64") for (int j = 0; j < {width}; ++j) {{',
            f"    vf sum = zero + params[{bias} + j];",
            f'    _Pragma("GCC unroll 64") for (int i = 0; i < {size}; ++i)',
            f"      sum += params[{weights} + j * {size} + i] * {previous}[i];",
            f"    h{index}[j] = sum;",
        ]
        lines += [f"    s{index}[j] = zero + 1.0f;"] if slopes else []
        lines.append("  }")
        if activated:
            grouped = width - width % shape.group
            if slopes:
                group = ["    vg t, u;", f"    memcpy(&t, &h{index}[j], sizeof t);",
                         "    t = act_slope_g(t, &u);", f"    memcpy(&h{index}[j], &t, sizeof t);",
                         f"    memcpy(&s{index}[j], &u, sizeof u);"]
                single = f"h{index}[j] = act_slope(h{index}[j], &s{index}[j]);"
            else:
                group = ["    vg t;", f"    memcpy(&t, &h{index}[j], sizeof t);",
                         "    t = activation_g(t);", f"    memcpy(&h{index}[j], &t, sizeof t);"]
                single = f"h{index}[j] = activation(h{index}[j]);"
            lines += [f"  for (int j = 0; j < {grouped}; j += GROUP) {{", *group, "  }",
                      f"  for (int j = {grouped}; j < {width}; ++j) {single}"]
        kind = shape.residual[index]
        if kind:
            source = f"{previous}[j]" if kind == 1 else f"{previous}[j % {size}]"
            lines.append(f"  for (int j = 0; j < {width}; ++j) h{index}[j] += {source};")
    return lines



#: Activation and its derivative (slope) from the pre-activation z, vector forms (type vf).
_SLOPE_CODE = {
    "silu": [
        "  const vf sigma = reciprocal(1.0f + vexp(-z));",
        "  *slope = sigma * (1.0f + z * (1.0f - sigma));",
        "  return z * sigma;",
    ],
    "tanh": [
        "  const vf t = 1.0f - 2.0f * reciprocal(vexp(2.0f * z) + 1.0f);",
        "  *slope = 1.0f - t * t;",
        "  return t;",
    ],
    "relu": [
        "  *slope = blend(z > 0.0f, zero + 1.0f, zero);",
        "  return blend(z > 0.0f, z, zero);",
    ],
    # lane by lane through libm
    "gelu": [
        "  vf y, s;",
        "  for (int b = 0; b < LANES; ++b) {",
        "    const float v = z[b], phi = 0.5f * (1.0f + erff(v * 0.70710678118654752f));",
        "    y[b] = v * phi;",
        "    s[b] = phi + v * expf(-0.5f * v * v) * 0.39894228040143268f;",
        "  }",
        "  *slope = s;",
        "  return y;",
    ],
    "softplus": [
        "  vf y, s;",
        "  for (int b = 0; b < LANES; ++b) {",
        "    const float v = z[b];",
        "    y[b] = v > 20.0f ? v : log1pf(expf(v));",
        "    s[b] = v > 20.0f ? 1.0f : 1.0f / (1.0f + expf(-v));",
        "  }",
        "  *slope = s;",
        "  return y;",
    ],
}


def c_activation_slope(activation: str, *, vector: str = "vf") -> str:
    """C ``act_slope(z, &slope)``: an activation and its derivative on a vector type.

    Args:
        activation: the activation's name.
        vector: the vector type (``LANES`` floats), e.g. ``vf`` or a wider one.

    Raises:
        KernelUnavailable: for an activation without a kernel form.
    """
    if activation not in _SLOPE_CODE:
        raise KernelUnavailable(f"activation {activation!r} has no kernel form")
    lines = [
        "static inline vf act_slope(vf z, vf* slope) {",
        "  const vf zero = {};",
        "  (void)zero;",
        *_SLOPE_CODE[activation],
        "}",
    ]
    return re.sub(r"\bvf\b", vector, "\n".join(lines))


def c_reciprocal(kind: str, size: int) -> str:
    """``1 / d`` for a vector type of ``size`` bytes.

    With AVX-512 a 14-bit estimate and one Newton step (relative error about 2^-27, NaN
    propagates) is several times cheaper than a division, which otherwise bounds the
    activations' throughput; elsewhere a division.
    """
    guards = {16: ("__AVX512VL__", "_mm_rcp14_ps", "__m128"),
              32: ("__AVX512VL__", "_mm256_rcp14_ps", "__m256"),
              64: ("__AVX512F__", "_mm512_rcp14_ps", "__m512")}
    lines = [f"static inline {kind} reciprocal({kind} d) {{"]
    if size in guards:
        guard, intrinsic, native = guards[size]
        lines += [
            f"#if defined({guard})",
            f"  {kind} r = ({kind}){intrinsic}(({native})d);",
            "  return r * (2.0f - d * r);",
            "#else",
            "  return 1.0f / d;",
            "#endif",
        ]
    else:
        lines.append("  return 1.0f / d;")
    lines.append("}")
    return "\n".join(lines)


def c_widened(code: str) -> str:
    """The helpers' code for the GROUP-vector type vg (names suffixed ``_g``)."""
    replacements = {
        "vf": "vg", "vi": "vgi", "LANES": "GLANES", "blend": "blend_g", "vsqrt": "vsqrt_g",
        "vexp": "vexp_g", "activation": "activation_g", "reciprocal": "reciprocal_g",
    }
    return re.sub(r"\b(" + "|".join(replacements) + r")\b", lambda m: replacements[m.group(1)], code)


#: The headers every generated kernel includes (AVX-512 intrinsics where the target has them).
C_INCLUDES = (
    "#include <math.h>",
    "#include <stdint.h>",
    "#include <string.h>",
    "#if defined(__AVX512F__)",
    "#include <immintrin.h>",
    "#endif",
)

#: C helpers shared by the generated kernels (types vf, vi and LANES defined by the caller):
#: a lane select, a square root, and a vectorised single-precision exp.
C_HELPERS = r"""
static inline vf blend(vi mask, vf yes, vf no) {
  vi bits = ((vi)yes & mask) | ((vi)no & ~mask);
  return (vf)bits;
}
static inline vf vsqrt(vf x) {
  vf y;
  for (int b = 0; b < LANES; ++b) y[b] = __builtin_sqrtf(x[b]);
  return y;
}
/* exp for the activations and the proximity: arguments clamped to [-87, 88] (both saturate
   there), Cody-Waite reduction, a degree-6 polynomial; about 2 ulp; NaN propagates. */
static inline vf vexp(vf x) {
  const vf zero = {};
  const vf magic = zero + 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
  vf clamped = blend(x > 88.0f, zero + 88.0f, blend(x < -87.0f, zero - 87.0f, x));
  vf shifted = clamped * 1.44269504088896341f + magic;
  vf n = shifted - magic;
  vf r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = zero + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vi exponent = ((vi)shifted - (vi)magic + 127) << 23;
  return p * (vf)exponent;
}
"""
