"""Every command in the README and docs/*.md runs as written in a fresh clone (its paths).

The shell commands are the lines of the fenced code blocks (untagged, ``bash``, ``sh``,
``shell`` or ``console``; a ``$ `` prompt is dropped, a trailing ``\\`` continues the line)
that start with ``vcnn ``, ``python `` or ``mpiexec``. For each page, in order:

* a ``vcnn`` command must parse (``vcnn.cli.build_parser``, nothing is run);
* every INPUT path (``--config``, ``--model``, ``--init-model``, ``--data``, ``--mesh-file``,
  ``--flow-from``, the cases of ``vcnn plot``, and the same keys of the verb's table in the
  ``--config`` file) must be a file of a fresh clone (tracked or not ignored by git), or made
  by an earlier command of the same page (inside its output), or, for a model, a shipped
  model's name (:mod:`vcnn.models`);
* every OUTPUT (``--out``, or the config's ``out``) must not exist in a fresh clone and must
  not be, or lie inside, or hold the output of another command of the same page;
* ``python SCRIPT`` and ``python -m MODULE`` must name a script or module of the repository.
"""

from __future__ import annotations

import glob
import re
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest

from vcnn.cli import build_parser
from vcnn.config import load_toml
from vcnn.errors import UsageError
from vcnn.models import SHIPPED_MODELS

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
SHELL_TAGS = {"", "bash", "sh", "shell", "console"}
COMMAND = re.compile(r"^(vcnn|python3?|mpiexec)(\s|$)")


@dataclass(frozen=True)
class Command:
    """One shell command of a page: its line number and its words."""

    line: int
    words: tuple[str, ...]

    def __str__(self) -> str:
        return f"line {self.line}: {shlex.join(self.words)}"


@dataclass
class Paths:
    """What a command reads and writes (relative to the repository root)."""

    inputs: list[tuple[str, str]] = field(default_factory=list)  # (what, path)
    models: list[tuple[str, str]] = field(default_factory=list)  # may be a shipped name
    outputs: list[str] = field(default_factory=list)


def shell_commands(text: str) -> Iterator[Command]:
    """The commands of the shell code blocks of a Markdown page, in order."""
    fence: str | None = None
    shell = False
    pending: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if match and (fence is None or match.group(1).startswith(fence)):
            if fence is None:
                fence, shell = match.group(1), match.group(2).lower() in SHELL_TAGS
            else:
                fence, pending = None, []
            continue
        if fence is None or not shell:
            continue
        stripped = line.strip()
        if not pending:
            stripped = stripped.removeprefix("$ ")
            if not COMMAND.match(stripped):
                continue
            start = number
        pending.append(stripped.removesuffix("\\").strip())
        if stripped.endswith("\\"):
            continue
        words = tuple(shlex.split(" ".join(pending), comments=True))
        pending = []
        yield Command(start, words)


def fresh_clone_files() -> set[str]:
    """The files a fresh clone holds: tracked, or untracked and not ignored (committed next)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO, capture_output=True, check=True, timeout=60,
        ).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("git is needed to know the files of a fresh clone")
    return {name for name in listed.split("\0") if name and (REPO / name).exists()}


def _normal(path: str) -> str:
    return str(PurePosixPath(*PurePosixPath(path).parts)) if path else path


def _inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies inside it (both relative, normalised)."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


class Clone:
    """The files of a fresh clone, and the folders that hold them."""

    def __init__(self, files: set[str]) -> None:
        self.files = files
        self.folders = {str(parent) for name in files for parent in PurePosixPath(name).parents}

    def exists(self, path: str) -> bool:
        path = _normal(path)
        if glob.has_magic(path):
            return any(PurePosixPath(name).match(path) for name in self.files)
        return path in self.files or path in self.folders

    def holds_anything_at(self, path: str) -> bool:
        path = _normal(path)
        return path in self.folders or any(_inside(name, path) for name in self.files)


def _table(config: str | None, verb: str) -> dict:
    """The ``[verb]`` table of a config file of the repository ({} when none or unreadable)."""
    if config is None or not (REPO / config).is_file():
        return {}
    document = load_toml(REPO / config)
    table = document.get(verb, document)
    return table if isinstance(table, dict) else {}


def _first(*values):
    return next((value for value in values if value not in (None, [], "")), None)


def vcnn_paths(argv: list[str]) -> Paths:
    """Parse a ``vcnn`` command line (raises UsageError) and name its inputs and outputs."""
    args = build_parser().parse_args(argv)
    verb = args.verb
    config = None if getattr(args, "config", None) is None else str(args.config)
    table = _table(config, verb)
    paths = Paths()
    if config is not None:
        paths.inputs.append(("--config", config))

    def listed(value) -> list[str]:
        if value is None:
            return []
        return [str(item) for item in (value if isinstance(value, list | tuple) else [value])]

    if verb in ("generate", "simulate"):
        mesh = table.get("mesh", {}) if isinstance(table.get("mesh"), dict) else {}
        for item in listed(_first(args.mesh_file, mesh.get("files"), mesh.get("file"))):
            paths.inputs.append(("--mesh-file", item))
        for item in listed(_first(args.flow_from, table.get("flow_from"))):
            paths.inputs.append(("--flow-from", item))
        out = _first(args.out, table.get("out"), table.get("output"))
        if verb == "simulate":
            for item in listed(_first(args.model, table.get("model"))):
                paths.models.append(("--model", item))
    elif verb == "train":
        for item in listed(_first(args.data, table.get("data"), table.get("data_dir"))):
            paths.inputs.append(("--data", item))
        for item in listed(_first(args.init_model, table.get("init_model"))):
            paths.models.append(("--init-model", item))
        out = _first(args.out, table.get("out"), table.get("out_dir"))
    else:  # evaluate, export, plot: the table's keys are the flags'
        for item in listed(_first(getattr(args, "model", None), table.get("model"))):
            paths.models.append(("--model", item))
        for item in listed(_first(getattr(args, "data", None), table.get("data"))):
            paths.inputs.append(("--data", item))
        for item in listed(_first(getattr(args, "cases", None), table.get("cases"))):
            paths.inputs.append(("case", item))
        out = _first(args.out, table.get("out"))
    if out is not None:
        paths.outputs.append(_normal(str(out)))
    return paths


def python_paths(words: list[str]) -> tuple[list[str], Paths]:
    """Problems of a ``python`` command line, and its ``--config`` inputs."""
    problems: list[str] = []
    paths = Paths()
    rest = words[1:]
    if rest[:1] == ["-m"] and len(rest) > 1:
        module = rest[1].replace(".", "/")
        if rest[1].split(".")[0] not in ("vcnn", "solvers", "meshes", "experiments", "tests"):
            return problems, paths  # a tool of the environment (pip, pytest, ...)
        if not ((REPO / f"{module}.py").is_file() or (REPO / module / "__init__.py").is_file()):
            problems.append(f"no module {rest[1]!r} in the repository")
        rest = rest[2:]
    elif rest and not rest[0].startswith("-"):
        if not (REPO / rest[0]).is_file():
            problems.append(f"no script {rest[0]!r} in the repository")
        rest = rest[1:]
    for flag, value in zip(rest, rest[1:], strict=False):
        if flag == "--config":
            paths.inputs.append(("--config", value))
    return problems, paths


def page_problems(text: str, clone: Clone) -> list[str]:
    """Every problem of the commands of one page (empty: every command runs as written)."""
    problems: list[str] = []
    outputs: list[tuple[str, Command]] = []
    for command in shell_commands(text):
        words = list(command.words)
        if words[0] == "mpiexec":
            words = words[1:]
            while words and words[0].startswith("-"):  # -n 2, -np 2
                words = words[2:] if words[0] in ("-n", "-np") else words[1:]
            if not words:
                continue
        found: list[str] = []
        if words[0] == "vcnn":
            if any(word in ("-h", "--help", "--version") for word in words[1:]):
                continue
            try:
                paths = vcnn_paths(words[1:])
            except UsageError as error:
                problems.append(f"{command}: does not parse: {error}")
                continue
        elif words[0].startswith("python"):
            found, paths = python_paths(words)
        else:
            continue
        produced = [out for out, _ in outputs]
        for what, path in paths.inputs:
            if not (clone.exists(path) or any(_inside(_normal(path), o) for o in produced)):
                found.append(f"{what} {path!r} is in no fresh clone and made by no earlier "
                             "command of the page")
        for what, path in paths.models:
            if path in SHIPPED_MODELS:
                continue
            if not (clone.exists(path) or any(_inside(_normal(path), o) for o in produced)):
                found.append(f"{what} {path!r} is no shipped model name, in no fresh clone and "
                             "made by no earlier command of the page")
        for out in paths.outputs:
            if clone.holds_anything_at(out):
                found.append(f"--out {out!r} already exists in a fresh clone")
            for earlier, other in outputs:
                if _inside(out, earlier) or _inside(earlier, out):
                    found.append(f"--out {out!r} collides with the output {earlier!r} of "
                                 f"{other}")
            outputs.append((out, command))
        problems.extend(f"{command}: {problem}" for problem in found)
    return problems


@pytest.fixture(scope="module")
def clone() -> Clone:
    return Clone(fresh_clone_files())


def test_the_pages_have_commands():
    commands = [c for page in PAGES for c in shell_commands(page.read_text(encoding="utf-8"))]
    assert any(c.words[0] == "vcnn" for c in commands), "no vcnn command found in the docs"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_command_of_the_page_runs_as_written(page, clone):
    problems = page_problems(page.read_text(encoding="utf-8"), clone)
    assert not problems, f"{page.relative_to(REPO)}:\n" + "\n".join(problems)


def test_the_checker_finds_what_it_is_for():
    clone = Clone({"experiments/coupled/generate.toml", "tests/data/openfoam_hill/system/x"})
    page = """
Some text, then an untagged block:

```
vcnn generate --alphas 1 --resolution 0.25 --out data/hills   # a comment
vcnn evaluate --model published --data data/hills/hill_a1.000.npz \\
    --out results/evaluate
vcnn evaluate --model runs/coupled/best.pt --data data/hills --out results/evaluate/more
vcnn simulate --model best.pt --alphas 1 --out results/simulate
vcnn generate --flow-from tests/data/openfoam_hill --out experiments/coupled
vcnn generate --bogus 1 --out data/zero
vcnn evaluate --model coupled --data data/elsewhere --out results/other
python experiments/nothing_here.py
mpiexec -n 2 vcnn simulate --model published --alphas 1 --out results/mpi
```

```python
vcnn = "not a shell command"
```
"""
    problems = page_problems(page, clone)
    text = "\n".join(problems)
    assert len(problems) == 7, text
    assert "line 8: vcnn evaluate --model runs/coupled/best.pt" in text
    assert "--model 'runs/coupled/best.pt' is no shipped model name" in text
    assert "collides with the output 'results/evaluate' of line 6" in text
    assert "--model 'best.pt' is no shipped model name" in text
    assert "--out 'experiments/coupled' already exists in a fresh clone" in text
    assert "line 11: vcnn generate --bogus 1 --out data/zero: does not parse" in text
    assert "--data 'data/elsewhere' is in no fresh clone" in text
    assert "no script 'experiments/nothing_here.py'" in text
    # a shipped name, a path made by an earlier command, mpiexec: nothing to say
    assert not [p for p in problems if p.startswith(("line 5:", "line 6:", "line 14:"))], text
