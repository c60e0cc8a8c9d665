"""The C sources of vcnn/engines/csrc: warning-free builds, ctypes table, one library per architecture."""

import dataclasses
import functools
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.ddp_scripts.synthetic_cases import channel_case
from tests.test_fused import CONFIGS, _setup
from vcnn import cloud_quadrature
from vcnn.closure import load_closure
from vcnn.engines import fused_clouds, fused_mlp, fused_rows, kernels
from vcnn.features import FieldTable
from vcnn.network import MLP

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {
    "published": ROOT / "experiments" / "published" / "model" / "best.pt",
    "coupled": ROOT / "experiments" / "coupled" / "model" / "best.pt",
}
#: Row MLPs of tests/test_fused_mlp.py: inputs, widths, activation, activate_last, residual.
ROW_MLPS = [
    (3, (32, 64, 64), "silu", True, True),
    (5, (12, 24, 24, 8), "tanh", False, True),
    (2, (7, 14), "relu", True, True),
    (4, (8, 8), "gelu", True, False),
    (4, (16, 16), "softplus", True, True),
]


def _compiler() -> str:
    try:
        return kernels._compiler()
    except kernels.KernelUnavailable as error:
        pytest.skip(f"needs a C compiler: {error}")


def _shipped(path: Path):
    closure = load_closure(path, device="cpu")
    case = channel_case(1.3, nx=12, ny=6, seed=0)
    table = FieldTable.from_cases([case], spec=closure.spec, options=closure.cloud_options)
    return closure.model.eval(), table, closure.normalizer


@functools.cache
def _nets():
    """name -> (model, table, normaliser): the tests' nets and the shipped models."""
    nets = {name: _setup(name)[:3] for name in CONFIGS}
    nets.update({f"shipped-{name}": _shipped(path) for name, path in SHIPPED.items()})
    return nets


def _sources(file: str) -> dict[str, str]:
    """Distinct sources of one C file for the shipped models and the tests' nets."""
    if file == "cloud_quadrature.c":  # one source: no per-model defines
        return {"cloud-quadrature": cloud_quadrature.quadrature_source()}
    sources = {}
    for name, (model, table, normalizer) in _nets().items():
        spec = fused_clouds.kernel_spec(model, table, normalizer)
        if file == "fused_moments.c":
            sources.setdefault(fused_clouds.kernel_source(spec), name)
        elif file == "training_rows.c":
            spec = dataclasses.replace(spec, pair_low=(), pair_high=())
            sources.setdefault(fused_rows.training_source(spec), name)
        else:
            shape = fused_mlp._RowShape.build(model.embedding, model.config.activation)
            sources.setdefault(fused_mlp._source(shape), name)
    if file == "mlp_rows.c":
        for inputs, widths, activation, last, residual in ROW_MLPS:
            mlp = MLP(inputs, widths, activation=activation, activate_last=last, residual=residual)
            shape = fused_mlp._RowShape.build(mlp, activation)
            sources.setdefault(fused_mlp._source(shape), f"row-mlp-{widths}-{activation}")
    return {name: source for source, name in sources.items()}


def _warnings(compiler: str, source: str, folder: Path, name: str) -> str:
    """The compiler's complaints about ``source`` built as the kernels are (empty: none)."""
    path = folder / f"{name}.c"
    path.write_text(source)
    flags = [*kernels._FLAGS, *kernels._OPENMP, "-Wall", "-Wextra", "-Werror"]
    result = subprocess.run(
        [compiler, *flags, "-c", str(path), "-o", str(folder / f"{name}.o")],
        capture_output=True, text=True, timeout=300,
    )
    return "" if result.returncode == 0 else f"{name}:\n{result.stderr or result.stdout}"


@pytest.mark.parametrize(
    "file", ["fused_moments.c", "training_rows.c", "mlp_rows.c", "cloud_quadrature.c"]
)
def test_every_source_builds_without_a_warning(file, tmp_path):
    compiler = _compiler()
    sources = _sources(file)
    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = list(pool.map(
            lambda item: _warnings(compiler, item[1], tmp_path, item[0]), sources.items()
        ))
    assert not "".join(failures), "".join(failures)


def _prototypes(text: str) -> dict[str, list[str]]:
    """Exported functions of a C text: name -> parameter types (``int64_t`` or a pointer)."""
    found = {}
    for match in re.finditer(r"^int (vcnn_\w+)\(([^)]*)\)\s*\{", text, re.MULTILINE):
        kinds = []
        for parameter in match.group(2).split(","):
            declaration = " ".join(parameter.split())
            kinds.append("pointer" if "*" in declaration else declaration.rsplit(" ", 1)[0])
        found[match.group(1)] = kinds
    return found


def test_the_ctypes_table_matches_the_c_prototypes():
    names = {"int64_t": kernels.ctypes.c_int64, "pointer": kernels.ctypes.c_void_p}
    files = {file for file, _ in kernels.C_FUNCTIONS.values()}
    exported = {}
    for file in sorted(files):
        for name, kinds in _prototypes(kernels.c_file(file)).items():
            exported[name] = (file, tuple(names[kind] for kind in kinds))
    assert exported == kernels.C_FUNCTIONS


def test_the_assembled_source_holds_every_header():
    text = kernels.c_file("fused_moments.c")
    # every header of the folder inlined: the cache key covers them
    assert not re.search(r'^#include "', text, re.MULTILINE)
    for header in ("vcnn_vector_ops.h", "vcnn_entry.h", "vcnn_pair_mlp.h"):
        body = (kernels.CSRC / header).read_text().strip()
        assert body.splitlines()[-1] in text


def test_the_shipped_models_share_one_library_and_differ_in_their_numbers():
    (published, table, normalizer), (coupled, table_c, normalizer_c) = (
        _nets()["shipped-published"], _nets()["shipped-coupled"]
    )
    one = fused_clouds.kernel_spec(published, table, normalizer)
    other = fused_clouds.kernel_spec(coupled, table_c, normalizer_c)
    assert one != other  # different normalisers ...
    assert fused_clouds.kernel_source(one) == fused_clouds.kernel_source(other)  # ... one source
    assert not torch.equal(fused_clouds.kernel_constants(one), fused_clouds.kernel_constants(other))
    # no per-model number is in the source text
    for value in (*one.pair_mean, one.position_scale, one.pair_std[0]):
        assert repr(value) not in fused_clouds.kernel_source(one)
        assert float(value).hex() not in fused_clouds.kernel_source(one)
