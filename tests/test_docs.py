"""The documentation in docs/: current, linked, self-contained, and its API reference builds."""

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
#: The folders and files that must not cite a document outside the repository.
CHECKED_FOR_CITATIONS = ["vcnn", "solvers", "meshes", "experiments", "docs", "tests", "README.md"]
#: A citation of the design notes that lived outside the repository ("DESIGN 3.3").
OUTSIDE_CITATION = re.compile(r"\bDESIGN\b")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _need_fem():
    """Skip without the FEM stack (mpi4py.MPI must come before dolfinx)."""
    pytest.importorskip("mpi4py.MPI")
    pytest.importorskip("dolfinx")


def test_configuration_reference_is_current():
    _need_fem()
    from vcnn.config_reference import render

    expected = render()
    actual = (DOCS / "configuration.md").read_text()
    assert actual == expected, (
        "docs/configuration.md is stale: regenerate it with "
        "`python -m vcnn.config_reference > docs/configuration.md` (or `make docs`)"
    )


def test_configuration_reference_covers_every_key():
    _need_fem()
    from dataclasses import fields

    from solvers.generate import GenerateConfig
    from solvers.simulate import SimulateConfig
    from vcnn.config_reference import reference_tables
    from vcnn.training import TrainConfig

    tables = {table.name: {row.key for row in table.rows} for table in reference_tables()}
    for name, config_class in (
        ("generate", GenerateConfig),
        ("simulate", SimulateConfig),
        ("train", TrainConfig),
    ):
        documented = tables[name] | {key.split(".")[1] for key in tables if key.startswith(name + ".")}
        missing = {item.name for item in fields(config_class)} - documented
        assert not missing, f"[{name}] keys missing from the reference: {sorted(missing)}"
    for table in reference_tables():
        for row in table.rows:
            assert row.meaning, f"[{table.name}] {row.key} has no meaning in its docstring"


#: A value just outside and one on the edge of each documented range of ``[train]``.
TRAIN_RANGE_PROBES = {
    "epochs": (0, 1),
    "batch_size": (0, 1),
    "cloud_size": (0, 1),
    "step_size": (0, 1),
    "queries_per_case": (0, "all"),
    "validation_queries_per_case": (0, "all"),
    "learning_rate": (0.0, 1e-9),
    "weight_decay": (-1e-9, 0.0),
    "gamma": (0.0, 1.0),
    "min_learning_rate": (-1e-9, 0.0),
    "patience": (0, 1),
    "min_delta": (-1e-9, 0.0),
    "ema_decay": (1.0, 0.0),
    "num_threads": (0, 1),
    "time_limit_minutes": (0.0, 1e-3),
    "device": ("gpu", "cuda:1"),
}


def test_documented_train_ranges_are_enforced():
    from vcnn.config import ConfigError
    from vcnn.config_reference import CHECKED_RANGES
    from vcnn.training import TrainConfig

    documented = {key.split(".", 1)[1] for key in CHECKED_RANGES if key.startswith("train.")}
    assert documented == set(TRAIN_RANGE_PROBES), "every documented [train] range needs a probe"
    for key, (outside, edge) in TRAIN_RANGE_PROBES.items():
        base = {"data": "d", "out": "o", "min_learning_rate": 0.0}  # any learning rate
        TrainConfig.from_dict({**base, key: edge})
        with pytest.raises(ConfigError):
            TrainConfig.from_dict({**base, key: outside})


def test_documented_cloud_and_feature_ranges_are_enforced():
    from vcnn.clouds import CloudOptions
    from vcnn.features import FeatureSpec

    for outside in (0.0, 1.0):
        with pytest.raises(ValueError):
            CloudOptions(eps=outside)
    with pytest.raises(ValueError):
        CloudOptions(cutoff_start=1.0)
    assert CloudOptions.from_dict({"cutoff_start": "none"}).cutoff_start is None
    for key in ("wall_distance_cap", "proximity_length", "upstream_speed_floor"):
        with pytest.raises(ValueError):
            FeatureSpec(**{key: 0.0})


def test_api_reference_builds(tmp_path):
    pdoc = pytest.importorskip("pdoc")
    import vcnn

    pdoc.render.configure(docformat="google")
    pdoc.pdoc("vcnn", output_directory=tmp_path)
    page = (tmp_path / "vcnn.html").read_text()
    missing = [name for name in vcnn.__all__ if f'id="{name}"' not in page]
    assert not missing, f"public names missing from the API reference: {missing}"


def _checked_files():
    for entry in CHECKED_FOR_CITATIONS:
        path = ROOT / entry
        files = [path] if path.is_file() else sorted(path.rglob("*"))
        for file in files:
            if (
                file.is_file()
                and file.suffix in {".py", ".md", ".toml", ".txt", ".c", ".h", ""}
                and file != Path(__file__).resolve()
                and "api" not in file.relative_to(ROOT).parts[:2]
                and "__pycache__" not in file.parts
            ):
                yield file


def test_no_citation_outside_repository():
    cited = []
    for file in _checked_files():
        try:
            text = file.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if OUTSIDE_CITATION.search(line):
                cited.append(f"{file.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not cited, "cite docs/ pages instead of the design notes:\n" + "\n".join(cited)


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = unicodedata.normalize("NFKC", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    inside_fence = False
    anchors = set()
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            inside_fence = not inside_fence
        elif not inside_fence and (match := re.match(r"^#{1,6} (.*)$", line)):
            anchors.add(_slug(match.group(1)))
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_point_to_files_that_exist(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target}: no heading with that anchor in {file.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_index_links_every_page():
    index = (DOCS / "index.md").read_text()
    for page in DOCS.glob("*.md"):
        if page.name != "index.md":
            assert f"({page.name})" in index, f"docs/index.md does not link {page.name}"
