"""Signals and MPI: SIGINT exits 130 and SIGTERM 143 with one line, also under ``mpiexec -n 2``
(every rank ends within seconds), and a bad input on one rank ends every rank with exit code 2.
"""

from __future__ import annotations

from mpi4py import MPI  # noqa: F401  (MPI before PETSc)

import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from petsc4py import PETSc

from solvers.collective import config_digest
from solvers.linalg import is_interrupt
from vcnn import cli
from vcnn.casefile import read_case
from vcnn.errors import INTERRUPTED_MESSAGE, Terminated, reset_interrupts

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).with_name("mpiexec")
SCRIPTS = REPO / "tests" / "mpi_scripts"


@pytest.fixture(autouse=True)
def _forget_signals():
    """A signal handled in one test must not make the next one look interrupted."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    reset_interrupts()
    yield
    reset_interrupts()
    root.handlers[:] = handlers  # main() logs to the captured stderr of this test only
    root.setLevel(level)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ------------------------------------------------------------------------- serial: exit codes
def _wrapped_in_petsc_error(error: BaseException) -> PETSc.Error:
    """What petsc4py raises when a Python callback (a SNES residual) raised ``error``."""
    wrapped = PETSc.Error(101)
    wrapped.__cause__ = error
    return wrapped


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
@pytest.mark.parametrize("wrap", ["keyboard-interrupt", "petsc-error"])
def test_a_signal_exits_with_its_code_whatever_the_error_became(
    world_dir, monkeypatch, capsys, signum, code, wrap
):
    """The code on the way turns Terminated into KeyboardInterrupt or a PETSc.Error: still 143."""

    def interrupted(args):
        try:
            os.kill(os.getpid(), signum)  # the handler raises here
            time.sleep(5)
        except KeyboardInterrupt as error:
            if wrap == "petsc-error":
                raise _wrapped_in_petsc_error(error) from error
            raise KeyboardInterrupt("interrupted in case x") from error
        raise AssertionError("the signal did not interrupt")

    monkeypatch.setattr(cli, "_cmd_plot", interrupted)
    assert cli.main(["plot", str(world_dir)]) == code
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [INTERRUPTED_MESSAGE]


def test_an_error_is_not_an_interrupt_without_a_signal(world_dir, monkeypatch, capsys):
    def broken(args):
        raise _wrapped_in_petsc_error(ValueError("a bug"))

    monkeypatch.setattr(cli, "_cmd_plot", broken)
    assert cli.main(["plot", str(world_dir)]) == 1
    assert "internal error" in capsys.readouterr().err


def test_is_interrupt_sees_through_petsc_and_after_a_signal():
    assert is_interrupt(_wrapped_in_petsc_error(Terminated("signal 15")))
    assert not is_interrupt(_wrapped_in_petsc_error(ValueError("diverged")))
    cli.handle_interrupts()
    with pytest.raises(Terminated):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert is_interrupt(RuntimeError("whatever the interrupt became on the way up"))


def test_an_interrupted_run_writes_no_failed_state(tmp_path):
    """simulate's _guarded writes the last state of a *failed* run; an interrupt is not one."""
    from solvers.simulate import _guarded

    def run():
        raise _wrapped_in_petsc_error(Terminated("signal 15"))

    # problem and config are only used to write failed/: None makes any such attempt fail
    with pytest.raises(PETSc.Error) as caught:
        _guarded(run, None, None, "hill_a1.000", 1.0, None, "truth")
    assert isinstance(caught.value.__cause__, Terminated)
    assert not list(tmp_path.rglob("*"))


def test_config_digest_is_canonical():
    a = {"alphas": [1.0], "mesh": {"resolution": 0.25, "kind": "structured"}, "out": Path("x")}
    b = {"out": "x", "mesh": {"kind": "structured", "resolution": 0.25}, "alphas": [1.0]}
    assert config_digest(a) == config_digest(b)
    assert config_digest(a) != config_digest({**b, "alphas": [1.5]})


@pytest.fixture
def world_dir(tmp_path):
    """A folder for verbs that never get to read it (their handler is replaced)."""
    folder = tmp_path / "cases"
    folder.mkdir()
    return folder


# --------------------------------------------------------------------- MPI: one rank differs
@pytest.mark.mpi
@pytest.mark.parametrize(
    "mode, message",
    [
        ("resolution", r"^error: the MPI ranks were given different configurations: rank 1 "
                       r"differs from rank 0 in mesh\.resolution = 0\.1 \(rank 0: 0\.05\)"),
        ("config", r"^error: MPI rank 1: config file '.*-missing\.toml' does not exist"),
        ("flag", r"^error: MPI rank 1: vcnn: unrecognized arguments: --no-such-flag"),
    ],
)
def test_a_bad_input_on_one_rank_ends_every_rank_with_exit_2(tmp_path, mode, message):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    try:
        result = subprocess.run(
            [str(MPIEXEC), "-n", "2", sys.executable, str(SCRIPTS / "per_rank_argv.py"), mode,
             str(out)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"deadlock: a bad input on rank 1 only ({mode}) left the ranks waiting")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "rank 0 exit 2" in result.stdout and "rank 1 exit 2" in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()


# --------------------------------------------------------------- MPI: signals to mpiexec -n 2
def _children(pid: int) -> list[int]:
    """Every descendant process of ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in parents.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _signal_trial(out: Path, signum: int, delay: float) -> dict:
    """Start ``mpiexec -n 2 vcnn generate``, signal mpiexec ``delay`` s after the ranks are up."""
    command = [str(MPIEXEC), "-n", "2", sys.executable, "-m", "vcnn.cli", "generate", "--alphas",
               "1", "1.5", "2", "2.5", "--resolution", "0.25", "--no-xdmf", "--no-plots",
               "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[tuple[float, str]] = []
    up = threading.Event()

    def read_stderr():
        for line in process.stderr:
            lines.append((time.monotonic(), line.rstrip("\n")))
            if "mesh done" in line:  # the ranks are up, in the first case's collective work
                up.set()

    readers = [threading.Thread(target=read_stderr, daemon=True),
               threading.Thread(target=process.stdout.read, daemon=True)]
    for reader in readers:
        reader.start()
    try:
        assert up.wait(120), "the run did not start: " + "\n".join(l for _, l in lines)
        time.sleep(delay)
        assert process.poll() is None, "the run ended before the signal: make it longer"
        processes = _children(process.pid)
        sent = time.monotonic()
        process.send_signal(signum)
        while time.monotonic() - sent < 10 and (
            process.poll() is None or any(map(_alive, processes))
        ):
            time.sleep(0.02)
        seconds = time.monotonic() - sent
        left = [pid for pid in processes if _alive(pid)]
        code = process.poll()
    finally:
        if process.poll() is None or any(map(_alive, _children(process.pid))):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        for reader in readers:
            reader.join(5)
    after = [line for at, line in lines if at >= sent]
    return {"code": code, "seconds": seconds, "left": left, "after": after,
            "processes": processes}


def _check_signal_trials(tmp_path: Path, trials: int) -> None:
    rng = random.Random()
    results = []
    for trial in range(trials):
        signum = (signal.SIGTERM, signal.SIGINT)[trial % 2]
        out = tmp_path / f"out{trial}"
        result = _signal_trial(out, signum, delay=rng.uniform(0.0, 3.0))
        expected = 143 if signum == signal.SIGTERM else 130
        assert len(result["processes"]) >= 3, result  # the proxy and the two ranks
        assert not result["left"], f"trial {trial}: processes left after 10 s: {result}"
        assert result["code"] == expected, f"trial {trial}: {result}"
        # one line, the last (a progress line logged before the handler ran may precede it)
        assert result["after"][-1:] == [INTERRUPTED_MESSAGE], f"trial {trial}: {result}"
        assert result["after"].count(INTERRUPTED_MESSAGE) == 1, f"trial {trial}: {result}"
        noise = ("Traceback", "error", "ERROR", "BAD TERMINATION", "Abort", "signal")
        assert not [line for line in result["after"][:-1] if any(w in line for w in noise)]
        for path in out.glob("*.npz"):  # complete outputs are kept, and only complete ones
            read_case(path)
        results.append(result["seconds"])
    print(f"{trials} trials ended in {min(results):.2f}-{max(results):.2f} s")


@pytest.mark.mpi
def test_a_signal_to_mpiexec_ends_every_rank_with_one_line(tmp_path):
    _check_signal_trials(tmp_path, trials=3)


@pytest.mark.mpi
@pytest.mark.slow
def test_a_signal_to_mpiexec_ends_every_rank_10_of_10(tmp_path):
    _check_signal_trials(tmp_path, trials=10)
