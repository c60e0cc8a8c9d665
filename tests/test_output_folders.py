"""Outputs never destroy other results: folder ownership, the run lock, atomic XDMF, full disks.

The rules live in :mod:`vcnn.outputs`; here each is tested where a verb meets it: a verb
refuses a folder with another verb's primary outputs unless ``--overwrite``, one run at a time
holds a folder, XDMF/HDF5 pairs appear whole or not at all, and a full disk ends the run with
one line naming the file while the previous results stay as they were.
"""

from mpi4py import MPI

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from tests.ddp_scripts.synthetic_cases import channel_case
from vcnn import cli
from vcnn.atomic import atomic_write, atomic_write_text
from vcnn.casefile import write_case
from vcnn.errors import UsageError
from vcnn.outputs import (
    LOCK_NAME,
    OutputLock,
    check_output_owner,
    disk_full_error,
    output_lock,
    output_owners,
)

REPO = Path(__file__).resolve().parents[1]
#: The cheapest simulate: the tau PDE on a fixed flow, on a coarse hill.
SIMULATE = ["simulate", "--closure", "pde", "--coupling", "one-way", "--resolution", "0.05",
            "--alphas", "1", "--no-plots"]


def digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) -> its content hash."""
    return {
        str(path.relative_to(folder)): hashlib.sha1(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def stray(folder: Path) -> list[str]:
    """Temporary files and folders, lock files: what no finished run may leave behind."""
    return [p.name for p in folder.rglob("*") if p.name.startswith(".")]


def run(argv: list[str], capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = cli.main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, lines


@pytest.fixture(scope="module")
def hills(tmp_path_factory) -> Path:
    """A folder of generated cases (generate's: case file, XDMF pair, config.toml)."""
    folder = tmp_path_factory.mktemp("generated") / "hills"
    assert cli.main(["-q", "generate", "--alphas", "1", "--resolution", "0.05", "--no-plots",
                     "--out", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Path:
    """A folder of one simulate run (its case file, XDMF pair, metrics.json, config.toml)."""
    folder = tmp_path_factory.mktemp("simulated") / "sim"
    assert cli.main(["-q", *SIMULATE, "--out", str(folder)]) == 0
    return folder


# ------------------------------------------------------------------------------ ownership
def _case(path: Path, **meta) -> None:
    case = channel_case(1.0, nx=12, ny=6)
    case.meta = {**case.meta, **meta}
    write_case(path, case)


def test_owners_are_read_from_the_primary_outputs(tmp_path):
    assert output_owners(tmp_path / "missing") == {}
    _case(tmp_path / "gen" / "a.npz")
    _case(tmp_path / "sim" / "a.npz", simulate={"coupling": "one-way"})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "lcurve.tsv").write_text("epoch\n")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps([{"case": "a", "rel_l2_percent": 1}]))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.toml").write_text('[simulate]\ncoupling = "one-way"\n')
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.npz").write_text("not a case file\n")
    (tmp_path / "other" / "metrics.json").write_text('{"not": "ours"}')
    found = {name: sorted(output_owners(tmp_path / name)) for name in
             ("gen", "sim", "run", "eval", "cfg", "other")}
    assert found == {"gen": ["generate"], "sim": ["simulate"], "run": ["train"],
                     "eval": ["evaluate"], "cfg": ["simulate"], "other": []}


def test_a_verb_adds_to_its_own_folder_and_refuses_another_verbs(tmp_path):
    _case(tmp_path / "a.npz")
    check_output_owner(tmp_path, verb="generate", overwrite=False)
    with pytest.raises(UsageError) as refused:
        check_output_owner(tmp_path, verb="simulate", overwrite=False, flag="--out")
    message = str(refused.value)
    assert str(tmp_path) in message and "vcnn generate" in message and "--overwrite" in message
    check_output_owner(tmp_path, verb="simulate", overwrite=True)
    # train's --resume continues its own run beside cases accepted when it began
    (tmp_path / "last.pt").write_bytes(b"")
    check_output_owner(tmp_path, verb="train", overwrite=False, continuing=True)
    with pytest.raises(UsageError, match="vcnn generate"):
        check_output_owner(tmp_path, verb="train", overwrite=False)


def test_simulate_into_generated_cases_is_refused_and_the_cases_stay(hills, tmp_path, capsys):
    folder = tmp_path / "hills"
    shutil.copytree(hills, folder)
    before = digest(folder)
    code, lines = run([*SIMULATE, "--out", str(folder)], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and str(folder) in lines[0]
    assert "vcnn generate" in lines[0] and "--overwrite" in lines[0]
    assert digest(folder) == before  # the PDE truth, its XDMF and config.toml: byte-identical
    code, lines = run(["-q", *SIMULATE, "--out", str(folder), "--overwrite"], capsys)
    assert code == 0, lines
    assert (folder / "metrics.json").is_file() and not stray(folder)
    assert digest(folder)["hill_a1.000.npz"] != before["hill_a1.000.npz"]


def test_generate_into_a_simulate_folder_is_refused(simulated, tmp_path, capsys):
    folder = tmp_path / "sim"
    shutil.copytree(simulated, folder)
    before = digest(folder)
    code, lines = run(["generate", "--alphas", "1", "--resolution", "0.05", "--out",
                       str(folder)], capsys)
    assert code == 2 and len(lines) == 1 and "vcnn simulate" in lines[0], lines
    assert digest(folder) == before


def test_a_refused_simulate_writes_nothing(simulated, tmp_path, capsys):
    folder = tmp_path / "sim"
    shutil.copytree(simulated, folder)
    before = digest(folder)
    bad = ["simulate", "--closure", "pde", "--coupling", "two-way", "--resolution", "0.05",
           "--alphas", "1"]  # two-way without C_k: refused up front
    for out in (folder, tmp_path / "new" / "out"):
        code, lines = run([*bad, "--out", str(out)], capsys)
        assert code == 2 and len(lines) == 1 and "C_k > 0" in lines[0], lines
    assert digest(folder) == before  # config.toml of the earlier run included
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------ the lock
HOLDER = """
import sys
from vcnn.outputs import OutputLock
lock = OutputLock(sys.argv[1], verb="generate")
lock.acquire()
print("held", flush=True)
sys.stdin.read()
"""


def test_a_second_run_into_a_held_folder_is_refused_with_the_holders_pid(
    simulated, tmp_path, capsys
):
    folder = tmp_path / "sim"
    shutil.copytree(simulated, folder)
    before = digest(folder)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, lines = run([*SIMULATE, "--out", str(folder)], capsys)
        assert code == 2 and len(lines) == 1, lines
        assert f"pid {holder.pid}" in lines[0] and str(folder) in lines[0], lines[0]
        assert "in use by another run" in lines[0] and "vcnn generate" in lines[0]
        assert {k: v for k, v in digest(folder).items() if k != LOCK_NAME} == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # the holder ended: its lock went with it, and the next run works (and leaves no lock)
    code, lines = run(["-q", *SIMULATE, "--out", str(folder)], capsys)
    assert code == 0, lines
    assert not stray(folder)
    code, lines = run(["-q", *SIMULATE, "--out", str(folder)], capsys)
    assert code == 0, lines


def test_the_lock_is_released_on_errors_and_a_stale_lock_file_does_not_block(tmp_path):
    folder = tmp_path / "a" / "b"
    (tmp_path / "a").mkdir()
    with pytest.raises(RuntimeError, match="boom"), output_lock(folder, verb="train"):
        record = (folder / LOCK_NAME).read_text()
        assert f"pid={os.getpid()}" in record and "verb=train" in record
        with pytest.raises(UsageError, match=f"in use by another run .*pid {os.getpid()}"):
            OutputLock(folder, verb="evaluate").acquire()
        raise RuntimeError("boom")
    assert not folder.exists()  # created by the lock, nothing written: removed again
    folder.mkdir()
    (folder / LOCK_NAME).write_text("pid=999999 verb=simulate\n")  # a killed run's file
    with output_lock(folder, verb="evaluate"):
        (folder / "metrics.json").write_text("[]\n")
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.json"]


def test_a_planted_lock_link_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / LOCK_NAME).symlink_to(victim)
    with pytest.raises(OSError) as raised:
        OutputLock(tmp_path / "out", verb="simulate").acquire()
    assert raised.value.errno == errno.ELOOP
    assert victim.read_text() == "precious\n"


def test_a_refusal_under_the_lock_releases_it(tmp_path):
    def refuse() -> None:
        raise UsageError("holds the outputs of vcnn train")

    with pytest.raises(UsageError):
        OutputLock(tmp_path / "new", verb="simulate", then=refuse).acquire()
    assert not (tmp_path / "new").exists()
    with output_lock(tmp_path / "new", verb="simulate"):
        pass


# ------------------------------------------------------------------------------ XDMF
@pytest.fixture(scope="module")
def fields():
    from dolfinx import fem, mesh

    square = mesh.create_unit_square(MPI.COMM_SELF, 8, 8)
    space = fem.functionspace(square, ("Lagrange", 1))
    u = fem.Function(space, name="u")
    u.interpolate(lambda x: x[0] + 2 * x[1])
    return square, {"u": u}


def test_xdmf_is_written_as_a_pair_that_references_its_h5(fields, tmp_path):
    from solvers.generate import write_xdmf

    square, functions = fields
    write_xdmf(tmp_path / "case.xdmf", square, functions)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.h5", "case.xdmf"]
    text = (tmp_path / "case.xdmf").read_text()
    assert ">case.h5:/Mesh/" in text and "xdmf-tmp" not in text


def test_a_failed_xdmf_write_keeps_the_previous_pair(fields, tmp_path, monkeypatch):
    from dolfinx import io

    from solvers.generate import write_xdmf

    square, functions = fields
    write_xdmf(tmp_path / "case.xdmf", square, functions)
    before = digest(tmp_path)

    def broken(self, *args, **kwargs):
        raise RuntimeError("injected after the mesh was written")

    monkeypatch.setattr(io.XDMFFile, "write_function", broken)
    with pytest.raises(RuntimeError, match="injected"):
        write_xdmf(tmp_path / "case.xdmf", square, functions)
    assert digest(tmp_path) == before and not stray(tmp_path)


def test_a_failure_between_h5_and_xdmf_leaves_no_half_pair(fields, tmp_path, monkeypatch):
    from solvers.generate import write_xdmf

    square, functions = fields
    replace = os.replace

    def failing(source, target, *args, **kwargs):
        if str(target).endswith(".xdmf"):
            raise OSError(errno.EIO, "injected", str(target))
        return replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="injected"):
        write_xdmf(tmp_path / "case.xdmf", square, functions)
    assert list(tmp_path.iterdir()) == []  # no .h5 without its .xdmf, no temporary folder


# ------------------------------------------------------------------------------ full disks
def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "[1]\n")

    def fill(stream):
        stream.write(b"x" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # no file name, like write()

    with pytest.raises(OSError) as raised:
        atomic_write(target, fill)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    assert target.read_text() == "[1]\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "metrics.json"]
    # a library's own words for it (torch, HDF5) on a disk with room: not taken for one
    assert disk_full_error(RuntimeError("file write failed"), target) is None
    quota = RuntimeError("write failed")
    quota.__cause__ = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert disk_full_error(quota, target).errno == errno.EDQUOT


def test_simulate_on_a_full_disk_ends_with_one_line_and_keeps_metrics(
    simulated, tmp_path, monkeypatch, capsys
):
    import solvers.simulate

    folder = tmp_path / "sim"
    shutil.copytree(simulated, folder)
    before = digest(folder)

    def full_disk_write_case(path, case):
        def fill(stream):
            stream.write(b"PK" + b"\0" * 8192)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        atomic_write(path, fill)

    monkeypatch.setattr(solvers.simulate, "write_case", full_disk_write_case)
    code, lines = run(["-q", *SIMULATE, "--out", str(folder)], capsys)
    assert code == 2 and len(lines) == 1, lines
    target = folder / "hill_a1.000.npz"
    assert lines[0] == f"error: No space left on device: {str(target)!r}"
    after = digest(folder)
    assert {k: after[k] for k in ("metrics.json", "hill_a1.000.npz", "hill_a1.000.xdmf",
                                  "hill_a1.000.h5")} == {
        k: before[k] for k in ("metrics.json", "hill_a1.000.npz", "hill_a1.000.xdmf",
                               "hill_a1.000.h5")}
    assert not stray(folder)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs (root only; skipped where it cannot be mounted)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        # lazy: HDF5 keeps a file it failed to write open until the process ends
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_disk(tiny_disk, capfd):
    from dolfinx import fem, mesh

    from solvers.generate import write_xdmf

    (tiny_disk / "config.toml").write_text("[generate]\n")
    # a plain file: named, and the old one kept
    atomic_write_text(tiny_disk / "metrics.json", "[]\n")
    with pytest.raises(OSError) as raised:
        atomic_write(tiny_disk / "metrics.json", lambda stream: stream.write(np.zeros(40000)))
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == str(tiny_disk / "metrics.json")
    assert (tiny_disk / "metrics.json").read_text() == "[]\n"
    # torch says "PytorchStreamWriter failed writing file": still a full disk, named
    import torch

    with pytest.raises(OSError) as raised:
        atomic_write(tiny_disk / "last.pt", lambda stream: torch.save(torch.zeros(40000), stream))
    assert raised.value.errno == errno.ENOSPC and raised.value.filename.endswith("last.pt")
    # an XDMF pair: HDF5 says "Failed to write HDF5 local dataset" and prints its stack
    big = mesh.create_unit_square(MPI.COMM_SELF, 120, 120)
    u = fem.Function(fem.functionspace(big, ("Lagrange", 1)), name="u")
    capfd.readouterr()
    with pytest.raises(OSError) as raised:
        write_xdmf(tiny_disk / "case.xdmf", big, {"u": u})
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == str(tiny_disk / "case.xdmf")
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["config.toml", "metrics.json"]
    assert "HDF5-DIAG" not in capfd.readouterr().err  # HDF5's stack is not the user's message


def test_run_records_sort_in_the_order_of_the_runs(tmp_path):
    # runs/<stamp>_<verb>.toml: consecutive runs, and runs of one stamp, sort in run order
    from solvers.run_folder import RUNS_FOLDER, locked_run, run_stamp

    stamps = [run_stamp(), run_stamp()]
    stamps.append(stamps[-1])  # a third run of the same stamp
    for number, stamp in enumerate(stamps):
        with locked_run(tmp_path, verb="generate", resolved={"run": number},
                        check_owner=lambda: None, stamp=stamp, comm=MPI.COMM_SELF):
            pass
    records = sorted((tmp_path / RUNS_FOLDER).glob("*_generate.toml"))
    assert [tomllib.loads(path.read_text())["generate"]["run"] for path in records] == [0, 1, 2]
