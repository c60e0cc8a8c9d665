"""Bad inputs to every verb of the command line, table-driven.

Each case asserts what a user (or an attacker) must see: a non-zero exit code, ONE line on
stderr that names the problem and the file or flag, no traceback, and nothing written or lost
(the shared inputs and the case's sandbox are snapshotted before and after).
"""

from mpi4py import MPI  # noqa: F401  (initialise MPI before dolfinx)

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.ddp_scripts.synthetic_cases import channel_case, write_channel_cases
from vcnn import cli
from vcnn.casefile import write_case
from vcnn.checkpoint import export_model, is_exported_file

REPO = Path(__file__).resolve().parents[1]

TRAIN_TOML = """
[train]
validation_alphas = [1.0]
epochs = 1
batch_size = 32
cloud_size = 16
queries_per_case = 40
device = "cpu"
num_threads = 1
learning_rate = 3e-3

[train.model]
embedding = [8, 16]
fitting = [32]
axis_neurons = 4
"""


@dataclass(frozen=True)
class World:
    """Inputs shared by every case (never to be modified by a bad input)."""

    root: Path

    def __truediv__(self, name: str) -> Path:
        return self.root / name


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("world")
    w = World(root)
    write_channel_cases(w / "cases", [0.5, 1.0, 1.5], nx=12, ny=6)
    (w / "train.toml").write_text(TRAIN_TOML)
    assert cli.main(["-q", "train", "--config", str(w / "train.toml"), "--data",
                     str(w / "cases"), "--out", str(w / "run")]) == 0
    export_model(w / "run" / "last.pt", w / "model.pt")
    assert cli.main(["-q", "generate", "--alphas", "1", "--resolution", "0.05", "--out",
                     str(w / "hills"), "--no-xdmf"]) == 0
    (w / "afile").write_text("a file, not a folder\n")
    (w / "notes").mkdir()
    (w / "notes" / "notes.npz").write_text("a text file named like a case file\n")
    (w / "text.pt").write_text("e" * 101 + "\n")
    (w / "empty").mkdir()
    # a 3-point case (written without write_case, which refuses it) among good ones
    shutil.copytree(w / "cases", w / "tiny")
    case = channel_case(2.0, nx=12, ny=6)
    arrays = _arrays(case)
    np.savez(w / "tiny" / "tiny3.npz", **{k: v[:3] if k in _NODAL else v for k, v in arrays.items()})
    # a case whose velocity has the wrong shape, among good ones
    shutil.copytree(w / "cases", w / "badshape")
    np.savez(w / "badshape" / "bad_shape.npz", **{**arrays, "velocity": arrays["velocity"][:, :1]})
    # a 3-D case (a 2-D model cannot take it)
    (w / "case3d").mkdir()
    case3 = channel_case(1.0, nx=12, ny=6)
    case3.points = np.c_[case3.points, np.zeros(case3.num_points)]
    case3.velocity = np.c_[case3.velocity, np.zeros(case3.num_points)]
    case3.period = np.r_[case3.period, 0.0]
    case3.name = "channel3d"
    write_case(w / "case3d" / "channel3d.npz", case3)
    # crafted checkpoints (zip bomb, damaged record, absurd architectures) and absurd cases
    from tests.crafted_checkpoints import write_crafted

    write_crafted(w / "model.pt", w / "crafted")
    # a small tagged user mesh (walls, cylinder, inlet, outlet) for file-mesh rows
    from meshes.channel import channel_with_cylinder_msh

    channel_with_cylinder_msh(w / "channel.msh", size=0.1)
    return w


_NODAL = ("points", "velocity", "tau", "strain_rate", "wall_distance", "nodal_volume", "is_wall")


def _arrays(case) -> dict[str, np.ndarray]:
    import json

    return {
        "points": case.points, "velocity": case.velocity, "tau": case.tau,
        "strain_rate": case.strain_rate, "wall_distance": case.wall_distance,
        "nodal_volume": case.nodal_volume, "is_wall": case.is_wall, "period": case.period,
        "meta": np.array(json.dumps(case.meta)),
    }


def snapshot(*roots: Path) -> dict[str, tuple[int, str]]:
    """Every file and folder under the roots: size and content hash (folders: marked).

    Special files (a FIFO planted as an input) are recorded by their type, never opened:
    reading a FIFO would block.
    """
    found = {}
    for root in roots:
        for folder, folders, files in os.walk(root):
            for name in folders:
                found[os.path.join(folder, name)] = (-1, "dir")
            for name in files:
                path = os.path.join(folder, name)
                mode = os.stat(path).st_mode
                if not stat.S_ISREG(mode):
                    found[path] = (-1, f"special {stat.S_IFMT(mode):o}")
                    continue
                data = Path(path).read_bytes()
                found[path] = (len(data), hashlib.sha1(data).hexdigest())
    return found


# ------------------------------------------------------------------------------ the table
Argv = Callable[[World, Path], list[str]]


@dataclass(frozen=True)
class Bad:
    """One bad input: the command, the expected message and what it must name."""

    verb: str
    argv: Argv
    message: str  # regex the error line must match
    names: Callable[[World, Path], str]  # the flag or file the line must contain
    prepare: Callable[[World, Path], None] | None = None
    marks: tuple = field(default=())


def _toml(text: str) -> Callable[[World, Path], None]:
    def prepare(w: World, s: Path) -> None:
        (s / "c.toml").write_text(text.replace("WORLD", str(w.root)).replace("SANDBOX", str(s)))

    return prepare


def _copy(source: str, target: str, *, then: Callable[[World, Path], None] | None = None):
    def prepare(w: World, s: Path) -> None:
        if (w / source).is_dir():
            shutil.copytree(w / source, s / target)
        else:
            shutil.copy2(w / source, s / target)
        if then is not None:
            then(w, s)

    return prepare


def _named(text: str) -> Callable[[World, Path], str]:
    return lambda w, s: text


def _generate(*flags: str) -> Argv:
    return lambda w, s: ["generate", *[f.replace("WORLD", str(w.root)).replace("SANDBOX", str(s))
                                       for f in flags]]


def _train(*flags: str) -> Argv:
    return lambda w, s: ["train", "--config", str(w / "train.toml"), "--data", str(w / "cases"),
                         *[f.replace("WORLD", str(w.root)).replace("SANDBOX", str(s))
                           for f in flags]]


def _verb(verb: str, *flags: str) -> Argv:
    return lambda w, s: [verb, *[f.replace("WORLD", str(w.root)).replace("SANDBOX", str(s))
                                 for f in flags]]


FILE_MESH = """
[generate]
name = "NAME"
[generate.mesh]
kind = "file"
file = "WORLD/afile"
[generate.boundaries]
walls = ["walls"]
[generate.boundaries.inlets.inlet]
profile = "expression"
components = [EXPRESSION, "0.0"]
"""


def _file_mesh(expression: str, name: str = "channel") -> Callable[[World, Path], None]:
    return _toml(FILE_MESH.replace("EXPRESSION", expression).replace("NAME", name))


USER_MESH3D = """
[generate.mesh]
kind = "file"
file = "SANDBOX/m.msh"
[generate.boundaries]
walls = ["bottom", "top"]
periodic = [{ slave = "right", master = "left" }, { slave = "back", master = "front" }]
"""


def _mesh3d(text: str, **mesh) -> Callable[[World, Path], None]:
    """A coarse 3-D bump channel written to SANDBOX/m.msh, and the config ``text``."""

    def prepare(w: World, s: Path) -> None:
        from tests.mesh3d_files import bump_channel_msh

        bump_channel_msh(s / "m.msh", size=0.4, **mesh)
        _toml(text)(w, s)

    return prepare


NOT_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="permission bits do not bind root")
HAS_SYS = pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs a read-only /sys")

BAD: dict[str, Bad] = {
    # ------------------------------------------------------------------ generate
    "generate-alphas-string": Bad(
        "generate", _generate("--config", "SANDBOX/c.toml", "--out", "SANDBOX/out"),
        r"\[generate\] alphas must be a list of numbers, got the string '12'", _named("alphas"),
        _toml('[generate]\nalphas = "12"\n')),
    "generate-plots-string": Bad(
        "generate", _generate("--config", "SANDBOX/c.toml", "--out", "SANDBOX/out"),
        r"plots must be true or false, got the string 'false'", _named("[generate] plots"),
        _toml('[generate]\nplots = "false"\n')),
    "generate-resolution-string": Bad(
        "generate", _generate("--config", "SANDBOX/c.toml", "--out", "SANDBOX/out"),
        r"resolution must be a number, got the string '0.1'", _named("[generate.mesh]"),
        _toml('[generate.mesh]\nresolution = "0.1"\n')),
    "generate-unknown-key": Bad(
        "generate", _generate("--config", "SANDBOX/c.toml", "--out", "SANDBOX/out"),
        r"unknown key\(s\) \['alpah'\]", _named("[generate]"), _toml("[generate]\nalpah = [1]\n")),
    "generate-config-missing": Bad(
        "generate", _generate("--config", "SANDBOX/missing.toml", "--out", "SANDBOX/out"),
        "does not exist", _named("missing.toml")),
    "generate-config-not-toml": Bad(
        "generate", _generate("--config", "SANDBOX/c.toml", "--out", "SANDBOX/out"),
        "is not valid TOML", _named("c.toml"), _toml("[generate\nalphas = [1\n")),
    "generate-out-is-a-file": Bad(
        "generate", _generate("--alphas", "1", "--resolution", "0.05", "--out", "WORLD/afile"),
        "is a file, not a folder", lambda w, s: f"--out {str(w / 'afile')!r}"),
    "generate-out-not-permitted": Bad(
        "generate", _generate("--alphas", "1", "--resolution", "0.05", "--out", "/sys/vcnn-out"),
        "is not writable", _named("/sys/vcnn-out"), marks=(HAS_SYS,)),
    "generate-out-read-only": Bad(
        "generate", _generate("--alphas", "1", "--resolution", "0.05", "--out", "SANDBOX/ro/out"),
        "is not writable", _named("ro/out"),
        lambda w, s: ((s / "ro").mkdir(), os.chmod(s / "ro", 0o555)), marks=(NOT_ROOT,)),
    "generate-alpha-tiny": Bad(
        "generate", _generate("--alphas", "1e-6", "--out", "SANDBOX/out"),
        r"slope factors must lie in \[0.1, 20\], got \[1e-06\]", _named("1e-06")),
    "generate-alpha-huge": Bad(
        "generate", _generate("--alphas", "1e6", "--out", "SANDBOX/out"),
        r"must lie in", _named("1000000.0")),
    "generate-too-large": Bad(
        "generate", _generate("--alphas", "2", "--resolution", "100", "--out", "SANDBOX/out"),
        r"needs about [0-9.e+]+ cells, an estimated [0-9.e+]+ GiB of memory",
        _named("--resolution 100")),
    "generate-too-coarse": Bad(
        "generate", _generate("--alphas", "1", "--resolution", "0.01", "--out", "SANDBOX/out"),
        r"only 2 cell\(s\) across", _named("--resolution 0.01")),
    "generate-alpha-twice": Bad(
        "generate", _generate("--alphas", "1", "1.0", "--out", "SANDBOX/out"),
        "twice", _named("alphas")),
    "generate-mesh-file-missing": Bad(
        "generate", _generate("--mesh-file", "SANDBOX/none.msh", "--out", "SANDBOX/out"),
        "does not exist", _named("none.msh")),
    "generate-mesh-file-implies-a-file-mesh": Bad(
        "generate", _generate("--mesh-file", "WORLD/afile", "--out", "SANDBOX/out"),
        r"a file mesh needs a \[generate.boundaries\] table", _named("[generate.boundaries]")),
    "generate-mesh-file-with-hill": Bad(
        "generate", _generate("--mesh", "structured", "--mesh-file", "WORLD/afile", "--out",
                              "SANDBOX/out"),
        "--mesh-file is for --mesh file", _named("--mesh")),
    "generate-expression-code": Bad(
        "generate", _generate("--config", "SANDBOX/c.toml", "--out", "SANDBOX/out"),
        "not allowed in an expression", _named("[generate.boundaries.inlets.inlet]"),
        _file_mesh("\"__import__('os').system('touch SANDBOX/pwned')\"")),
    "generate-expression-attribute": Bad(
        "generate", _generate("--config", "SANDBOX/c.toml", "--out", "SANDBOX/out"),
        "attribute access", _named("x.__class__"), _file_mesh('"x.__class__"')),
    "generate-name-escapes-out": Bad(
        "generate", _generate("--config", "SANDBOX/c.toml", "--out", "SANDBOX/out"),
        "is not a valid case name", _named("'../escaped'"), _file_mesh('"1.0"', "../escaped")),
    "generate-existing-case-other-resolution": Bad(
        "generate", _generate("--alphas", "1", "--resolution", "0.1", "--out", "SANDBOX/hills"),
        r"other settings .*mesh resolution 0.05 vs 0.1.*--overwrite", _named("hill_a1.000.npz"),
        _copy("hills", "hills")),
    "generate-wall-size-above-size": Bad(
        "generate", _generate("--config", "SANDBOX/c.toml", "--out", "SANDBOX/out"),
        r"wall_size \(0.2\) must not exceed size \(0.1\)", _named("[generate.mesh]"),
        _toml('[generate.mesh]\nkind = "unstructured"\nsize = 0.1\nwall_size = 0.2\n')),
    "generate-config-is-a-folder": Bad(
        "generate", _generate("--config", "WORLD/empty", "--out", "SANDBOX/out"),
        "is a folder", _named("empty")),
    "generate-c-k-nan": Bad(
        "generate", _generate("--alphas", "1", "--c-k", "nan", "--out", "SANDBOX/out"),
        "must be a finite number", _named("--c-k")),
    # ------------------------------------------------------------------ train
    "train-into-an-existing-run": Bad(
        "train", _train("--out", "SANDBOX/run"),
        "already holds a training run .* use --resume .* --overwrite", _named("run"),
        _copy("run", "run")),
    "train-resume-other-batch-size": Bad(
        "train", _train("--out", "SANDBOX/run", "--resume", "--batch-size", "16"),
        r"other settings \(batch_size: 32 in the checkpoint, 16 now", _named("last.pt"),
        _copy("run", "run")),
    "train-resume-other-cloud-size": Bad(
        "train", _train("--out", "SANDBOX/run", "--resume", "--epochs", "3", "--cloud-size", "8"),
        r"cloud_size: 16 in the checkpoint, 8 now", _named("last.pt"), _copy("run", "run")),
    "train-resume-other-seed": Bad(
        "train", _train("--out", "SANDBOX/run", "--resume", "--seed", "5"),
        r"seed: 0 in the checkpoint, 5 now", _named("last.pt"), _copy("run", "run")),
    "train-resume-other-architecture": Bad(
        "train", lambda w, s: ["train", "--config", str(s / "c.toml"), "--data",
                               str(w / "cases"), "--out", str(s / "run"), "--resume"],
        r"model: .* in the checkpoint", _named("last.pt"),
        _copy("run", "run", then=lambda w, s: (s / "c.toml").write_text(
            TRAIN_TOML.replace("embedding = [8, 16]", "embedding = [8, 24]")))),
    "train-resume-from-an-export": Bad(
        "train", _train("--out", "SANDBOX/run", "--resume"),
        r"exported \(inference-only\) checkpoint", _named("last.pt"),
        _copy("run", "run", then=lambda w, s: shutil.copy2(w / "model.pt", s / "run" / "last.pt"))),
    "train-resume-and-overwrite": Bad(
        "train", _train("--out", "SANDBOX/run", "--resume", "--overwrite"),
        "not allowed with argument", _named("--overwrite")),
    "train-without-data": Bad(
        "train", _verb("train", "--out", "SANDBOX/run"), r"needs \['data'\]", _named("--data")),
    "train-data-is-a-file": Bad(
        "train", lambda w, s: ["train", "--config", str(w / "train.toml"), "--data",
                               str(w / "afile"), "--out", str(s / "run")],
        "is a file; give the folder", _named("afile")),
    "train-data-missing": Bad(
        "train", lambda w, s: ["train", "--config", str(w / "train.toml"), "--data",
                               str(s / "nothing"), "--out", str(s / "run")],
        "does not exist", _named("nothing")),
    "train-data-empty": Bad(
        "train", lambda w, s: ["train", "--config", str(w / "train.toml"), "--data",
                               str(w / "empty"), "--out", str(s / "run")],
        r"no case files \(\*\.npz\)", _named("empty")),
    "train-queries-per-case-flag-word": Bad(
        "train", _train("--out", "SANDBOX/run", "--queries-per-case", "every"),
        r"must be an integer >= 1 or 'all' \(every point\), got 'every'",
        _named("--queries-per-case")),
    "train-batch-size-0": Bad(
        "train", _train("--out", "SANDBOX/run", "--batch-size", "0"),
        "must be an integer >= 1, got 0", _named("--batch-size")),
    "train-seed-negative": Bad(
        "train", _train("--out", "SANDBOX/run", "--seed", "-1"),
        "must be an integer >= 0", _named("--seed")),
    "train-three-point-case": Bad(
        "train", lambda w, s: ["train", "--config", str(w / "train.toml"), "--data",
                               str(w / "tiny"), "--out", str(s / "run")],
        "holds only 3 points", _named("tiny3.npz")),
    "train-text-file-named-npz": Bad(
        "train", lambda w, s: ["train", "--config", str(w / "train.toml"), "--data",
                               str(w / "notes"), "--out", str(s / "run")],
        r"not an \.npz archive", _named("notes.npz")),
    "train-bad-shape": Bad(
        "train", lambda w, s: ["train", "--config", str(w / "train.toml"), "--data",
                               str(w / "badshape"), "--out", str(s / "run")],
        "velocity must have shape", _named("bad_shape.npz")),
    "train-out-is-a-file": Bad(
        "train", _train("--out", "WORLD/afile"), "is a file, not a folder", _named("afile")),
    "train-epochs-string": Bad(
        "train", lambda w, s: ["train", "--config", str(s / "c.toml"), "--data",
                               str(w / "cases"), "--out", str(s / "run")],
        "epochs must be an integer, got the string '3'", _named("epochs"),
        _toml('[train]\nepochs = "3"\n')),
    "train-one-case-no-validation": Bad(
        "train", _verb("train", "--data", "SANDBOX/one", "--out", "SANDBOX/run", "--epochs", "1"),
        r"holds 1 case\(s\) for training .* no validation case .* validation_cases",
        _named("channel_a1.000"),
        lambda w, s: (s / "one").mkdir() or shutil.copy2(w / "cases" / "channel_a1.000.npz",
                                                         s / "one")),
    "train-split-without-validation": Bad(
        "train", lambda w, s: ["train", "--config", str(s / "c.toml"), "--data",
                               str(w / "cases"), "--out", str(s / "run")],
        "no validation case: the training split is given but no validation split",
        _named("validation_alphas"), _toml("[train]\ntrain_alphas = [0.5, 1.0]\n")),
    "train-validation-tau-zero": Bad(
        "train", lambda w, s: ["train", "--config", str(s / "c.toml"), "--data",
                               str(s / "zero"), "--out", str(s / "run")],
        r"have tau = 0 at every point, so their relative error is undefined",
        _named("channel_a2.000"),
        _copy("cases", "zero", then=lambda w, s: np.savez(
            s / "zero" / "channel_a2.000.npz",
            **{**_arrays(channel_case(2.0, nx=12, ny=6)),
               "tau": np.zeros(72)}) or _toml("[train]\nvalidation_alphas = [2.0]\n")(w, s))),
    "train-queries-per-case-word": Bad(
        "train", lambda w, s: ["train", "--config", str(s / "c.toml"), "--data",
                               str(w / "cases"), "--out", str(s / "run")],
        r"queries_per_case must be an integer >= 1 or 'all' \(every point\), got 'every'",
        _named("queries_per_case"), _toml('[train]\nqueries_per_case = "every"\n')),
    "train-init-model-other-architecture": Bad(
        "train", lambda w, s: ["train", "--config", str(s / "c.toml"), "--data",
                               str(w / "cases"), "--out", str(s / "run"), "--init-model",
                               str(w / "model.pt")],
        r"the network differs from the checkpoint's \(model fitting: \[32\] in it, \[16\] now",
        _named("model.pt"),
        _toml(TRAIN_TOML.replace("fitting = [32]", "fitting = [16]"))),
    "train-init-model-with-resume": Bad(
        "train", _train("--out", "SANDBOX/run", "--resume", "--init-model", "WORLD/model.pt"),
        "exclude each other", _named("--init-model")),
    "train-init-model-missing": Bad(
        "train", _train("--out", "SANDBOX/run", "--init-model", "SANDBOX/none.pt"),
        "does not exist", _named("none.pt")),
    # ------------------------------------------------------------------ evaluate
    "evaluate-empty-folder": Bad(
        "evaluate", _verb("evaluate", "--model", "WORLD/model.pt", "--data", "WORLD/empty",
                          "--out", "SANDBOX/eval"),
        r"no case files \(\*\.npz\)", _named("--data")),
    "evaluate-model-is-text": Bad(
        "evaluate", _verb("evaluate", "--model", "WORLD/text.pt", "--data", "WORLD/cases",
                          "--out", "SANDBOX/eval"),
        "not a torch checkpoint", _named("text.pt")),
    "evaluate-model-missing": Bad(
        "evaluate", _verb("evaluate", "--model", "SANDBOX/missing.pt", "--data", "WORLD/cases",
                          "--out", "SANDBOX/eval"),
        "does not exist", _named("missing.pt")),
    "evaluate-3d-case-2d-model": Bad(
        "evaluate", _verb("evaluate", "--model", "WORLD/model.pt", "--data", "WORLD/case3d",
                          "--out", "SANDBOX/eval"),
        "is 3-D but the model .* was trained on 2-D cases", _named("channel3d.npz")),
    "evaluate-text-file-named-npz": Bad(
        "evaluate", _verb("evaluate", "--model", "WORLD/model.pt", "--data",
                          "WORLD/notes/notes.npz", "--out", "SANDBOX/eval"),
        r"not an \.npz archive", _named("notes.npz")),
    "evaluate-bad-shape": Bad(
        "evaluate", _verb("evaluate", "--model", "WORLD/model.pt", "--data", "WORLD/badshape",
                          "--out", "SANDBOX/eval"),
        "velocity must have shape", _named("bad_shape.npz")),
    "evaluate-unknown-flag": Bad(
        "evaluate", _verb("evaluate", "--model", "WORLD/model.pt", "--data", "WORLD/cases",
                          "--out", "SANDBOX/eval", "--batch-size", "0"),
        "unrecognized arguments", _named("--batch-size")),
    "evaluate-cloud-size-0": Bad(
        "evaluate", _verb("evaluate", "--model", "WORLD/model.pt", "--data", "WORLD/cases",
                          "--out", "SANDBOX/eval", "--cloud-size", "0"),
        "must be an integer >= 1, got 0", _named("--cloud-size")),
    "evaluate-out-is-a-file": Bad(
        "evaluate", _verb("evaluate", "--model", "WORLD/model.pt", "--data", "WORLD/cases",
                          "--out", "WORLD/afile"),
        "is a file, not a folder", _named("--out")),
    # ------------------------------------------------------------------ export
    "export-onto-its-input": Bad(
        "export", _verb("export", "--model", "SANDBOX/best.pt", "--out", "SANDBOX/./best.pt"),
        "is the input file itself", _named("--out"), _copy("run/best.pt", "best.pt")),
    "export-model-missing": Bad(
        "export", _verb("export", "--model", "SANDBOX/missing.pt", "--out", "SANDBOX/m.pt"),
        "does not exist", _named("missing.pt")),
    "export-model-is-text": Bad(
        "export", _verb("export", "--model", "WORLD/text.pt", "--out", "SANDBOX/m.pt"),
        "not a torch checkpoint", _named("text.pt")),
    "export-out-is-a-folder": Bad(
        "export", _verb("export", "--model", "WORLD/model.pt", "--out", "WORLD/empty"),
        "is a folder; give a file name", _named("--out")),
    "export-out-under-a-file": Bad(
        "export", _verb("export", "--model", "WORLD/model.pt", "--out", "WORLD/afile/m.pt"),
        "cannot be created: .* is a file", _named("afile")),
    "export-onto-a-training-checkpoint": Bad(
        "export", _verb("export", "--model", "WORLD/model.pt", "--out", "SANDBOX/run/last.pt"),
        r"exists and is not an exported model .* --overwrite", _named("last.pt"),
        _copy("run", "run")),
    "export-onto-another-file": Bad(
        "export", _verb("export", "--model", "WORLD/model.pt", "--out", "SANDBOX/notes.pt"),
        r"exists and is not an exported model", _named("notes.pt"),
        lambda w, s: (s / "notes.pt").write_text("my notes\n")),
    # ------------------------------------------------------------------ plot
    "plot-empty-folder": Bad(
        "plot", _verb("plot", "WORLD/empty"), r"no case files \(\*\.npz\)", _named("empty")),
    "plot-text-file-named-npz": Bad(
        "plot", _verb("plot", "WORLD/notes"), r"not an \.npz archive", _named("notes.npz")),
    "plot-missing-file": Bad(
        "plot", _verb("plot", "SANDBOX/none.npz"), "does not exist", _named("none.npz")),
    "plot-3d-case": Bad(
        "plot", _verb("plot", "WORLD/case3d", "--out", "SANDBOX/figures"),
        "draws 2-D cases", _named("channel3d.npz")),
    "plot-out-is-a-file": Bad(
        "plot", _verb("plot", "WORLD/cases", "--out", "WORLD/afile"),
        "is a file, not a folder", _named("--out")),
    # ------------------------------------------------------------------ crafted checkpoints
    "export-zip-bomb": Bad(
        "export", _verb("export", "--model", "WORLD/crafted/bomb.pt", "--out", "SANDBOX/m.pt"),
        r"member '.*pad' unpacks to 80 MiB, more than the 64 MiB", _named("bomb.pt")),
    "evaluate-zip-bomb": Bad(
        "evaluate", _verb("evaluate", "--model", "WORLD/crafted/bomb.pt", "--data",
                          "WORLD/cases", "--out", "SANDBOX/eval"),
        "unpacks to 80 MiB", _named("bomb.pt")),
    "export-damaged-record": Bad(
        "export", _verb("export", "--model", "WORLD/crafted/damaged.pt", "--out", "SANDBOX/m.pt"),
        "is damaged: its CRC-32", _named("damaged.pt")),
    "evaluate-damaged-record": Bad(
        "evaluate", _verb("evaluate", "--model", "WORLD/crafted/damaged.pt", "--data",
                          "WORLD/cases", "--out", "SANDBOX/eval"),
        "is damaged: its CRC-32", _named("damaged.pt")),
    "export-negative-width": Bad(
        "export", _verb("export", "--model", "WORLD/crafted/negative-width.pt", "--out",
                        "SANDBOX/sub/m.pt"),
        r"embedding = \[-3, 8\]: layer widths must lie in \[1, 4096\]",
        _named("negative-width.pt")),
    "evaluate-huge-width": Bad(
        "evaluate", _verb("evaluate", "--model", "WORLD/crafted/huge-width.pt", "--data",
                          "WORLD/cases", "--out", "SANDBOX/eval"),
        r"embedding = \[1000000000\]", _named("huge-width.pt")),
    "export-axis-neurons-0": Bad(
        "export", _verb("export", "--model", "WORLD/crafted/axis-neurons-0.pt", "--out",
                        "SANDBOX/m.pt"),
        "axis_neurons = 0 must lie in", _named("axis-neurons-0.pt")),
    "evaluate-empty-fitting": Bad(
        "evaluate", _verb("evaluate", "--model", "WORLD/crafted/empty-fitting.pt", "--data",
                          "WORLD/cases", "--out", "SANDBOX/eval"),
        r"fitting = \[\] needs at least one layer", _named("empty-fitting.pt")),
    "export-dim-7": Bad(
        "export", _verb("export", "--model", "WORLD/crafted/dim-7.pt", "--out", "SANDBOX/m.pt"),
        "dim must be 2 or 3, got 7", _named("dim-7.pt")),
    "evaluate-fractional-width": Bad(
        "evaluate", _verb("evaluate", "--model", "WORLD/crafted/fractional-width.pt", "--data",
                          "WORLD/cases", "--out", "SANDBOX/eval"),
        "layer widths must be integers", _named("fractional-width.pt")),
    "export-unknown-activation": Bad(
        "export", _verb("export", "--model", "WORLD/crafted/unknown-activation.pt", "--out",
                        "SANDBOX/m.pt"),
        "activation must be one of", _named("unknown-activation.pt")),
    "evaluate-period-tiny": Bad(
        "evaluate", _verb("evaluate", "--model", "WORLD/model.pt", "--data",
                          "WORLD/crafted/tiny-period", "--out", "SANDBOX/eval"),
        "period 1e-09 along axis 0 is shorter than the extent of the points",
        _named("tiny_period")),
    "evaluate-velocity-1e30": Bad(
        "evaluate", _verb("evaluate", "--model", "WORLD/model.pt", "--data",
                          "WORLD/crafted/fast", "--out", "SANDBOX/eval"),
        r"much shorter than the clouds .* wrap around the period about", _named("fast_flow")),
    "evaluate-cloud-size-huge": Bad(
        "evaluate", _verb("evaluate", "--model", "WORLD/model.pt", "--data", "WORLD/cases",
                          "--out", "SANDBOX/eval", "--cloud-size", "1000000000000"),
        r"would hold about .* entries \(~.*iB\); this machine has", _named("cloud size")),
    # ------------------------------------------------------------------ output folders
    "simulate-into-generated-cases": Bad(
        "simulate", _verb("simulate", "--closure", "pde", "--coupling", "one-way", "--resolution",
                          "0.05", "--alphas", "1", "--no-plots", "--out", "SANDBOX/hills"),
        r"holds the outputs of vcnn generate \(hill_a1.000.npz\).* --overwrite",
        lambda w, s: f"--out {str(s / 'hills')!r}", _copy("hills", "hills")),
    "train-into-case-files": Bad(
        "train", _train("--out", "SANDBOX/cases"),
        r"holds the outputs of vcnn generate .* --overwrite", lambda w, s: str(s / "cases"),
        _copy("cases", "cases")),
    "generate-into-a-simulate-folder": Bad(
        "generate", _generate("--alphas", "1", "--resolution", "0.05", "--out", "SANDBOX/sim"),
        r"holds the outputs of vcnn simulate \(metrics.json\).* --overwrite",
        lambda w, s: str(s / "sim"),
        lambda w, s: ((s / "sim").mkdir(),
                      (s / "sim" / "config.toml").write_text('[simulate]\ncoupling = "one-way"\n'),
                      (s / "sim" / "metrics.json").write_text('[{"case": "a", "coupling": "one-way"}]'))),
    "evaluate-into-a-training-run": Bad(
        "evaluate", _verb("evaluate", "--model", "WORLD/model.pt", "--data", "WORLD/cases",
                          "--out", "SANDBOX/run"),
        r"holds the outputs of vcnn train \(last.pt\).* --overwrite",
        lambda w, s: f"--out {str(s / 'run')!r}", _copy("run", "run")),
    "simulate-refused-keeps-the-earlier-config": Bad(
        "simulate", _verb("simulate", "--closure", "pde", "--coupling", "two-way", "--resolution",
                          "0.05", "--alphas", "1", "--out", "SANDBOX/sim"),
        r"two-way coupling needs C_k > 0", _named("--c-k"),
        lambda w, s: ((s / "sim").mkdir(),
                      (s / "sim" / "config.toml").write_text('[simulate]\ncoupling = "one-way"\n'))),
    # ------------------------------------------------------------------ simulate validation
    # (one-way PDE runs on the alpha = 1 hill at --resolution 0.05: 121 mesh points; -q where
    # the check builds the mesh, which logs a line)
    "simulate-flow-source-a-handful-of-points": Bad(
        "simulate", _verb("-q", "simulate", "--closure", "pde", "--coupling", "one-way", "--resolution",
                          "0.05", "--flow-from", "SANDBOX/few.npz", "--out", "SANDBOX/sim"),
        r"has 5 samples for a mesh of 121 points: at least one per 10 mesh points",
        _named("few.npz"),
        lambda w, s: np.savez(s / "few.npz", **{
            k: v[:5] for k, v in np.load(w / "hills" / "hill_a1.000.npz").items()
            if k in ("points", "velocity")})),
    "simulate-flow-source-sparse-on-purpose-still-covers-too-little": Bad(
        # flow_min_samples_per_point lowers the floor: the 5 samples then fail on coverage
        "simulate", _verb("-q", "simulate", "--config", "SANDBOX/c.toml", "--closure", "pde",
                          "--coupling", "one-way", "--resolution", "0.05", "--flow-from",
                          "SANDBOX/few.npz", "--out", "SANDBOX/sim"),
        r"does not cover the mesh|covers only [0-9.]+ % of the mesh", _named("few.npz"),
        lambda w, s: ((s / "c.toml").write_text("[simulate]\nflow_min_samples_per_point = 0.04\n"),
                      np.savez(s / "few.npz", **{
                          k: v[:5] for k, v in np.load(w / "hills" / "hill_a1.000.npz").items()
                          if k in ("points", "velocity")}))),
    "simulate-flow-min-samples-zero": Bad(
        "simulate", _verb("simulate", "--config", "SANDBOX/c.toml", "--closure", "pde",
                          "--coupling", "one-way", "--out", "SANDBOX/sim"),
        r"flow_min_samples_per_point must be a finite number in \(0, 1\], got 0",
        _named("[simulate]"), _toml("[simulate]\nflow_min_samples_per_point = 0\n")),
    "simulate-flow-source-cropped": Bad(
        "simulate", _verb("-q", "simulate", "--closure", "pde", "--coupling", "one-way", "--resolution",
                          "0.05", "--flow-from", "SANDBOX/cropped.npz", "--out", "SANDBOX/sim"),
        r"covers only [0-9.]+ % of the mesh \(at least 95 % needed\)", _named("cropped.npz"),
        lambda w, s: (lambda d: np.savez(
            s / "cropped.npz", points=d["points"][d["points"][:, 1] < 2.0],
            velocity=d["velocity"][d["points"][:, 1] < 2.0]))(
                dict(np.load(w / "hills" / "hill_a1.000.npz")))),
    "simulate-openfoam-never-run": Bad(
        "simulate", _verb("simulate", "--closure", "pde", "--coupling", "one-way", "--resolution",
                          "0.05", "--flow-from", "SANDBOX/never_run", "--out", "SANDBOX/sim"),
        r"has no solved time: the latest time holding U is 0, the initial field .* --flow-time 0",
        _named("never_run"),
        lambda w, s: shutil.copytree(REPO / "tests" / "data" / "openfoam_hill", s / "never_run",
                                     ignore=shutil.ignore_patterns("341"))),
    "simulate-openfoam-malformed-boundary": Bad(
        "simulate", _verb("simulate", "--closure", "pde", "--coupling", "one-way", "--resolution",
                          "0.05", "--flow-from", "SANDBOX/foam", "--out", "SANDBOX/sim"),
        r"OpenFOAM mesh .* is malformed \(KeyError: 'startFace'\)",
        _named("foam/constant/polyMesh"),
        lambda w, s: (shutil.copytree(REPO / "tests" / "data" / "openfoam_hill", s / "foam"),
                      (s / "foam/constant/polyMesh/boundary").write_text(
                          (s / "foam/constant/polyMesh/boundary").read_text().replace(
                              "startFace       5966;", "")))),
    "simulate-vtu-malformed": Bad(
        "simulate", _verb("simulate", "--closure", "pde", "--coupling", "one-way", "--resolution",
                          "0.05", "--flow-from", "SANDBOX/bad.vtu", "--out", "SANDBOX/sim"),
        r"flow source .* is malformed \(IndexError: index 40 is out of bounds", _named("bad.vtu"),
        lambda w, s: (s / "bad.vtu").write_text(
            '<?xml version="1.0"?>\n<VTKFile type="UnstructuredGrid" version="0.1">\n'
            '<UnstructuredGrid>\n<Piece NumberOfPoints="3" NumberOfCells="1">\n<Points>\n'
            '<DataArray type="Float64" NumberOfComponents="3" format="ascii">0 0 0 1 0 0 0 1 0'
            '</DataArray>\n</Points>\n<Cells>\n<DataArray type="Int64" Name="connectivity" '
            'format="ascii">0 1 40</DataArray>\n<DataArray type="Int64" Name="offsets" '
            'format="ascii">3</DataArray>\n<DataArray type="Int64" Name="types" format="ascii">'
            '5</DataArray>\n</Cells>\n<CellData>\n<DataArray type="Float64" Name="U" '
            'NumberOfComponents="3" format="ascii">1 0 0</DataArray>\n</CellData>\n</Piece>\n'
            '</UnstructuredGrid>\n</VTKFile>\n')),
    "simulate-flow-source-fifo": Bad(
        "simulate", _verb("simulate", "--closure", "pde", "--coupling", "one-way", "--resolution",
                          "0.05", "--flow-from", "SANDBOX/flow.npz", "--out", "SANDBOX/sim"),
        r"is a FIFO \(named pipe\), not a regular file or a folder", _named("--flow-from"),
        lambda w, s: os.mkfifo(s / "flow.npz")),
    "simulate-config-fifo": Bad(
        "simulate", _verb("simulate", "--config", "SANDBOX/c.toml", "--out", "SANDBOX/sim"),
        r"config file .* is a FIFO \(named pipe\)", _named("c.toml"),
        lambda w, s: os.mkfifo(s / "c.toml")),
    "simulate-mesh-file-fifo": Bad(
        "simulate", _verb("simulate", "--closure", "pde", "--mesh-file", "SANDBOX/m.msh",
                          "--out", "SANDBOX/sim"),
        r"mesh file .* is a FIFO \(named pipe\), not a regular file", _named("m.msh"),
        lambda w, s: os.mkfifo(s / "m.msh")),
    "simulate-file-mesh-boundary-missing": Bad(
        "simulate", _verb("-q", "simulate", "--config", "SANDBOX/c.toml", "--out", "SANDBOX/sim"),
        r"boundary 'exit' is not in the mesh", _named("'exit'"),
        _toml('[simulate]\nclosure = "pde"\ncoupling = "one-way"\n[simulate.mesh]\n'
              'kind = "file"\nfile = "WORLD/channel.msh"\n[simulate.boundaries]\n'
              'walls = ["walls", "cylinder"]\noutlets = ["exit"]\n'
              '[simulate.boundaries.inlets.inlet]\nprofile = "parabolic"\n')),
    "simulate-file-mesh-boundary-unlisted": Bad(
        # channel.msh has walls, cylinder, inlet and outlet: the outlet is given no role
        "simulate", _verb("-q", "simulate", "--config", "SANDBOX/c.toml", "--out", "SANDBOX/sim"),
        r"boundary 'outlet' of mesh file .*channel.msh' has no role in \[simulate.boundaries\]: "
        r"list it under walls, inlets, outlets, periodic, or natural", _named("'outlet'"),
        _toml('[simulate]\nclosure = "pde"\ncoupling = "one-way"\n[simulate.mesh]\n'
              'kind = "file"\nfile = "WORLD/channel.msh"\n[simulate.boundaries]\n'
              'walls = ["walls", "cylinder"]\n'
              '[simulate.boundaries.inlets.inlet]\nprofile = "parabolic"\n')),
    "generate-file-mesh-boundary-unlisted": Bad(
        "generate", _verb("-q", "generate", "--config", "SANDBOX/c.toml", "--out", "SANDBOX/out"),
        r"boundary 'cylinder' of mesh file .* has no role in \[generate.boundaries\]",
        _named("'cylinder'"),
        _toml('[generate.mesh]\nkind = "file"\nfile = "WORLD/channel.msh"\n'
              '[generate.boundaries]\nwalls = ["walls"]\nnatural = ["outlet"]\n'
              '[generate.boundaries.inlets.inlet]\nprofile = "parabolic"\n')),
    "simulate-physics-nan": Bad(
        "simulate", _verb("simulate", "--closure", "pde", "--coupling", "one-way", "--config",
                          "SANDBOX/c.toml", "--out", "SANDBOX/sim"),
        r"zeta must be a finite number in \(0, inf\), got nan", _named("[simulate.physics] zeta"),
        _toml("[simulate.physics]\nzeta = nan\n")),
    "simulate-physics-zero": Bad(
        "simulate", _verb("simulate", "--closure", "pde", "--coupling", "one-way", "--config",
                          "SANDBOX/c.toml", "--out", "SANDBOX/sim"),
        r"gamma must be a finite number in \(0, inf\), got 0.0", _named("[simulate.physics] gamma"),
        _toml("[simulate.physics]\ngamma = 0.0\n")),
    "simulate-physics-negative": Bad(
        "simulate", _verb("simulate", "--closure", "pde", "--coupling", "one-way", "--config",
                          "SANDBOX/c.toml", "--out", "SANDBOX/sim"),
        r"nu must be a finite number in \(0, inf\), got -0.01", _named("[simulate.physics] nu"),
        _toml("[simulate.physics]\nnu = -0.01\n")),
    "simulate-physics-string": Bad(
        "simulate", _verb("simulate", "--closure", "pde", "--coupling", "one-way", "--config",
                          "SANDBOX/c.toml", "--out", "SANDBOX/sim"),
        r"tau_p must be a number, got '0.001'", _named("[simulate.physics] tau_p"),
        _toml('[simulate.physics]\ntau_p = "0.001"\n')),
    "simulate-eps-one": Bad(
        "simulate", _verb("simulate", "--closure", "pde", "--coupling", "one-way", "--config",
                          "SANDBOX/c.toml", "--out", "SANDBOX/sim"),
        r"eps must be a finite number in \(0, 1\), got 1.0", _named("[simulate.physics] eps"),
        _toml("[simulate.physics]\neps = 1.0\n")),
    "simulate-tol-inf": Bad(
        "simulate", _verb("simulate", "--closure", "pde", "--config", "SANDBOX/c.toml", "--out",
                          "SANDBOX/sim"),
        r"tol must be a finite number in \(0, 1\), got inf", _named("[simulate] tol"),
        _toml("[simulate]\ntol = inf\n")),
    "simulate-history-size-0": Bad(
        "simulate", _verb("simulate", "--closure", "pde", "--config", "SANDBOX/c.toml", "--out",
                          "SANDBOX/sim"),
        r"history_size must be an integer from 1 to 100, got 0", _named("[simulate] history_size"),
        _toml("[simulate]\nhistory_size = 0\n")),
    "simulate-history-size-huge": Bad(
        "simulate", _verb("simulate", "--closure", "pde", "--config", "SANDBOX/c.toml", "--out",
                          "SANDBOX/sim"),
        r"history_size must be an integer from 1 to 100, got 1000000000",
        _named("[simulate] history_size"), _toml("[simulate]\nhistory_size = 1000000000\n")),
    "simulate-max-iterations-huge": Bad(
        "simulate", _verb("simulate", "--closure", "pde", "--config", "SANDBOX/c.toml", "--out",
                          "SANDBOX/sim"),
        r"max_iterations must be an integer from 1 to 10000, got 100000000",
        _named("[simulate] max_iterations"), _toml("[simulate]\nmax_iterations = 100000000\n")),
    "simulate-negative-tau-tolerance-1": Bad(
        "simulate", _verb("simulate", "--closure", "pde", "--config", "SANDBOX/c.toml", "--out",
                          "SANDBOX/sim"),
        r"negative_tau_tolerance must be a finite number in \[0, 1\), got 1.0",
        _named("[simulate] negative_tau_tolerance"),
        _toml("[simulate]\nnegative_tau_tolerance = 1.0\n")),
    "simulate-too-large-with-history": Bad(
        "simulate", _verb("simulate", "--closure", "pde", "--coupling", "two-way", "--c-k", "0.1",
                          "--alphas", "2", "--resolution", "100", "--out", "SANDBOX/sim"),
        r"needs about [0-9.e+]+ cells, an estimated [0-9.e+]+ GiB of memory \([0-9.e+-]+ GiB "
        r"of them for a history of 10 iterates\)", _named("--resolution 100")),
    "generate-flow-source-a-handful-of-points": Bad(
        "generate", _verb("-q", "generate", "--alphas", "1", "--resolution", "0.05", "--flow-from",
                              "SANDBOX/few.npz", "--out", "SANDBOX/out"),
        r"has 5 samples for a mesh of 121 points", _named("few.npz"),
        lambda w, s: np.savez(s / "few.npz", **{
            k: v[:5] for k, v in np.load(w / "hills" / "hill_a1.000.npz").items()
            if k in ("points", "velocity")})),
    "generate-openfoam-never-run": Bad(
        "generate", _generate("--alphas", "1", "--resolution", "0.05", "--flow-from",
                              "SANDBOX/never_run", "--out", "SANDBOX/out"),
        r"has no solved time", _named("never_run"),
        lambda w, s: shutil.copytree(REPO / "tests" / "data" / "openfoam_hill", s / "never_run",
                                     ignore=shutil.ignore_patterns("341"))),
    "generate-flow-source-fifo": Bad(
        "generate", _generate("--alphas", "1", "--flow-from", "SANDBOX/flow.vtu", "--out",
                              "SANDBOX/out"),
        r"is a FIFO \(named pipe\)", _named("--flow-from / [generate] flow_from"),
        lambda w, s: os.mkfifo(s / "flow.vtu")),
    "generate-physics-zero": Bad(
        "generate", _generate("--config", "SANDBOX/c.toml", "--out", "SANDBOX/out"),
        r"physics.tau_p must be a finite number in \(0, inf\), got 0.0", _named("tau_p"),
        _toml("[generate.physics]\ntau_p = 0.0\n")),
    # ------------------------------------------------------------------ integral target
    "train-integral-resume": Bad(
        "train", _verb("train", "--config", "SANDBOX/c.toml", "--data", "WORLD/cases", "--out",
                       "SANDBOX/run", "--resume"),
        r"target = 'integral' trains in one session", _named("--resume"),
        _toml('[train]\ntarget = "integral"\nvalidation_alphas = [1.0]\n')),
    "train-integral-pair-scalars": Bad(
        "train", _verb("train", "--config", "SANDBOX/c.toml", "--data", "WORLD/cases", "--out",
                       "SANDBOX/run"),
        r"has no query point", _named("pair_scalars"),
        _toml('[train]\ntarget = "integral"\n[train.features]\npair_scalars = ["proximity"]\n')),
    "train-integral-mean-pooling": Bad(
        "train", _verb("train", "--config", "SANDBOX/c.toml", "--data", "WORLD/cases", "--out",
                       "SANDBOX/run"),
        r"needs pooling = 'volume'", _named("[model]"),
        _toml('[train]\ntarget = "integral"\nvalidation_alphas = [1.0]\n'
              '[train.model]\npooling = "mean"\n')),
    "simulate-an-integral-checkpoint": Bad(
        "simulate", _verb("simulate", "--closure", "network", "--model", "SANDBOX/int/best.pt",
                          "--coupling", "one-way", "--resolution", "0.05", "--out", "SANDBOX/sim"),
        r"of kind 'integral', not a pointwise closure", _named("best.pt"),
        lambda w, s: cli.main(["-q", "train", "--config", str(_integral_toml(s)), "--data",
                               str(w / "cases"), "--out", str(s / "int")])),
    # ------------------------------------------------------------------ mesh families
    "generate-mesh-files-match-nothing": Bad(
        "generate", _generate("--mesh-file", "SANDBOX/none/*.msh", "--out", "SANDBOX/out"),
        r"mesh files .* match no file", _named("none/*.msh")),
    "generate-mesh-parameter-without-value": Bad(
        "generate", _generate("--mesh-parameter", "bump_height", "--out", "SANDBOX/out"),
        r"give NAME=VALUE\[,VALUE...\]", _named("--mesh-parameter 'bump_height'")),
    "generate-mesh-script-unknown-parameter": Bad(
        "generate", _generate("--config", "SANDBOX/c.toml", "--mesh-parameter", "height=0.1",
                              "--out", "SANDBOX/out"),
        r"has no parameter 'height'; its parameters: \['bump_height'\]", _named("bump.geo"),
        lambda w, s: (_toml('[generate]\nmesh = {kind = "file", file = "SANDBOX/bump.geo"}\n'
                            '[generate.boundaries]\nwalls = ["wall"]\n')(w, s),
                      (s / "bump.geo").write_text(
                          'DefineConstant[ bump_height = {0.3, Name "Parameters/bump_height"} ];\n'
                          "Point(1) = {0, 0, 0, 0.5}; Point(2) = {1, 0, 0, 0.5};\n"
                          "Point(3) = {0, 1, 0, 0.5};\nLine(1) = {1, 2}; Line(2) = {2, 3};\n"
                          "Line(3) = {3, 1};\nCurve Loop(1) = {1, 2, 3};\n"
                          "Plane Surface(1) = {1};\nPhysical Curve(\"wall\") = {1, 2, 3};\n"
                          "Physical Surface(\"fluid\") = {1};\n"))),
    "generate-old-and-new-key": Bad(
        "generate", _generate("--config", "SANDBOX/c.toml"),
        r"\[generate\] gives both 'output' and 'out'", _named("'output'"),
        _toml('[generate]\noutput = "SANDBOX/a"\nout = "SANDBOX/b"\n')),
    # -------------------------------------------------------------- shipped model names
    "simulate-model-neither-a-file-nor-a-shipped-name": Bad(
        "simulate", _verb("simulate", "--model", "publsihed", "--resolution", "0.05", "--out",
                          "SANDBOX/sim"),
        r"'publsihed' does not exist and is no shipped model name; shipped models: published "
        r"\(experiments/published/model/best.pt\), coupled", _named("publsihed")),
    "train-init-model-unknown-name": Bad(
        "train", _train("--out", "SANDBOX/run", "--init-model", "coupld"),
        r"--init-model 'coupld' does not exist and is no shipped model name; shipped models: "
        r"published .*, coupled", _named("coupld")),
    # -------------------------------------------------------------- one name per concept (keys)
    "train-old-and-new-key": Bad(
        "train", _verb("train", "--config", "SANDBOX/c.toml", "--data", "WORLD/cases"),
        r"\[train\] gives both 'out_dir' and 'out'", _named("'out_dir'"),
        _toml('[train]\nout_dir = "SANDBOX/a"\nout = "SANDBOX/b"\n')),
    "plot-old-and-new-key": Bad(
        "plot", _verb("plot", "--config", "SANDBOX/c.toml"),
        r"\[plot\] gives both 'cases' and 'data'", _named("'cases'"),
        _toml('[plot]\ncases = ["WORLD/cases"]\ndata = ["WORLD/cases"]\n')),
    # ------------------------------------------------------------------ 3-D hills
    "generate-crest-amplitudes-without-dim-3": Bad(
        "generate", _generate("--crest-amplitudes", "0.1", "--out", "SANDBOX/out"),
        r"crest_amplitudes \(--crest-amplitudes\) is a setting of the 3-D hills: give --dim 3",
        _named("--crest-amplitudes")),
    "generate-span-cells-without-dim-3": Bad(
        "generate", _generate("--span-cells", "3", "--out", "SANDBOX/out"),
        r"span_cells \(--span-cells\) is a setting of the 3-D hills", _named("--span-cells")),
    "generate-3d-crest-amplitude-out-of-range": Bad(
        "generate", _generate("--dim", "3", "--crest-amplitudes", "0.5", "--out", "SANDBOX/out"),
        r"crest amplitudes must lie in \[0, 0.3\]", _named("[0.5]")),
    "generate-3d-flow-from-2d-source": Bad(
        # a 2-D hill case as the flow of a 3-D hill
        "generate", _generate("-q", "--dim", "3", "--resolution", "0.05", "--span-cells", "2",
                              "--flow-from", "WORLD/hills/hill_a1.000.npz", "--out",
                              "SANDBOX/out"),
        r"is 2-D but the mesh is 3-D", _named("hill_a1.000.npz")),
    "generate-3d-too-large": Bad(
        "generate", _generate("--dim", "3", "--resolution", "1", "--out", "SANDBOX/out"),
        r"3-D alpha = 1 with --resolution 1 needs about 1.12e\+06 hexahedra",
        _named("--span-cells")),
    # ------------------------------------------------------------------ 3-D user meshes
    "generate-3d-periodic-surfaces-do-not-match": Bad(
        "generate", _verb("-q", "generate", "--config", "SANDBOX/c.toml", "--out", "SANDBOX/out"),
        r"periodic pair slave 'back' -> master 'front': the surfaces do not match",
        _named("'back'"), _mesh3d(USER_MESH3D, periodic_span=False)),
    "generate-3d-translation-of-2-components": Bad(
        "generate", _verb("-q", "generate", "--config", "SANDBOX/c.toml", "--out", "SANDBOX/out"),
        r"translation \[-2.0, 0.0\] has 2 components but the mesh is 3-D", _named("'right'"),
        _mesh3d(USER_MESH3D.replace('master = "left"', 'master = "left", '
                                     'translation = [-2.0, 0.0]'))),
    "generate-3d-mesh-boundaries-without-roles": Bad(
        "generate", _verb("-q", "generate", "--config", "SANDBOX/c.toml", "--out", "SANDBOX/out"),
        r"boundary 'back' of mesh file .*m.msh' has no role in \[generate.boundaries\]",
        _named("'front', 'left', 'right'"),
        _mesh3d('[generate.mesh]\nkind = "file"\nfile = "SANDBOX/m.msh"\n'
                '[generate.boundaries]\nwalls = ["bottom", "top"]\n')),
    # ------------------------------------------------------------------ 3-D simulate
    "simulate-3d-with-a-2d-model": Bad(
        "simulate", _verb("simulate", "--dim", "3", "--model", "WORLD/model.pt", "--resolution",
                          "0.05", "--span-cells", "2", "--coupling", "one-way", "--out",
                          "SANDBOX/out"),
        "the closure was trained in 2-D, the mesh is 3-D", _named("3-D")),
}


def _integral_toml(sandbox: Path) -> Path:
    """A two-epoch integral run's config (the simulate refusal needs its checkpoint)."""
    path = sandbox / "integral.toml"
    path.write_text('[train]\ntarget = "integral"\nvalidation_alphas = [1.0]\nepochs = 2\n'
                    'num_threads = 1\n')
    return path


def _params():
    return [pytest.param(bad, id=name, marks=list(bad.marks)) for name, bad in BAD.items()]


def test_the_table_covers_every_verb_with_at_least_30_cases():
    verbs = {bad.verb for bad in BAD.values()}
    assert verbs >= {"generate", "train", "evaluate", "export", "plot", "simulate"}
    assert len(BAD) >= 30


@pytest.mark.parametrize("bad", _params())
def test_bad_input(bad, world, tmp_path, capsys):
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    if bad.prepare is not None:
        bad.prepare(world, sandbox)
    argv = bad.argv(world, sandbox)
    before = snapshot(world.root, sandbox)
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, f"not one line:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    assert re.search(bad.message, lines[0]), lines[0]
    assert bad.names(world, sandbox) in lines[0], lines[0]
    assert "Traceback" not in err
    assert snapshot(world.root, sandbox) == before, "something was written or lost"


@pytest.mark.parametrize(
    "name", ["generate-out-is-a-file", "train-into-an-existing-run", "export-onto-its-input"],
)
def test_no_traceback_reaches_stderr_of_the_command(name, world, tmp_path):
    bad = BAD[name]
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    if bad.prepare is not None:
        bad.prepare(world, sandbox)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "vcnn.cli", *bad.argv(world, sandbox)],
                            cwd=sandbox, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr and re.search(bad.message, result.stderr)


def test_verbose_shows_the_traceback_of_a_user_error(world, tmp_path, capsys):
    code = cli.main(["-v", "plot", str(world / "notes")])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback (most recent call last)" in err and "CaseFileError" in err
    assert err.rstrip().splitlines()[-1].startswith("error: case file")


@pytest.mark.parametrize("bug", [ZeroDivisionError("division by zero"), ValueError("a bug")])
def test_a_bug_is_not_disguised_as_a_user_error(bug, world, monkeypatch, capsys):
    def broken(args):
        raise bug

    monkeypatch.setattr(cli, "_cmd_plot", broken)
    code = cli.main(["plot", str(world / "cases")])
    err = capsys.readouterr().err
    assert code == 1
    assert "internal error" in err and "Traceback" in err and type(bug).__name__ in err
    assert "error: a bug" not in err


def test_an_interrupt_exits_130_and_says_what_is_kept(world, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_plot", interrupted)
    assert cli.main(["plot", str(world / "cases")]) == 130
    assert "interrupted: complete outputs are kept" in capsys.readouterr().err


def test_plot_and_export_still_work_on_good_inputs(world, tmp_path):
    # the checks must not refuse what the verbs can do (evaluate: see tests/test_demo.py)
    assert cli.main(["-q", "plot", str(world / "cases"), "--out", str(tmp_path / "fig")]) == 0
    assert len(list((tmp_path / "fig").glob("*.png"))) == 3
    assert cli.main(["-q", "export", "--model", str(world / "run" / "best.pt"), "--out",
                     str(tmp_path / "m.pt")]) == 0
    # an export may replace an earlier export, and --overwrite a training checkpoint
    assert cli.main(["-q", "export", "--model", str(world / "run" / "last.pt"), "--out",
                     str(tmp_path / "m.pt")]) == 0
    shutil.copy2(world / "run" / "last.pt", tmp_path / "last.pt")
    assert cli.main(["-q", "export", "--model", str(world / "run" / "best.pt"), "--out",
                     str(tmp_path / "last.pt"), "--overwrite"]) == 0
    assert is_exported_file(tmp_path / "last.pt")
