"""The demo (the quick version of `make demo`) runs end to end and passes its own check."""

from mpi4py import MPI  # noqa: F401  (initialise MPI before dolfinx)

import json
import re
from pathlib import Path

import pytest

from vcnn.demo import QUICK, main


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys):
    assert main(["--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    output = capsys.readouterr()
    _check_announced_files(output.out + output.err, tmp_path)
    metrics = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert [m["alpha"] for m in metrics] == [1.45, 1.9]
    assert all(m["rel_l2_percent"] < QUICK.tolerance_percent for m in metrics)
    assert (tmp_path / "run" / "best.pt").is_file()
    assert (tmp_path / "run" / "lcurve.tsv").read_text().count("\n") >= 2
    assert (tmp_path / "cases" / "hill_a1.000.png").is_file()
    (entry,) = json.loads((tmp_path / "simulate" / "metrics.json").read_text())
    assert entry["converged"] and entry["alpha"] == 1.45
    assert entry["tau_rel_l2_percent"] < QUICK.simulate_tolerance_percent


def _check_announced_files(text: str, out: Path) -> None:
    """Every folder and file the demo announces exists, and no XDMF is claimed without one."""
    listing = text.split("demo finished in", 1)[1]
    folders = re.findall(r"^  ([a-z ]+): (/\S+) \((.*)\)$", listing, flags=re.M)
    assert {label for label, _, _ in folders} == {
        "cases", "training run", "evaluation", "coupled simulation"}
    for _, folder, contents in folders:
        folder = Path(folder)
        assert folder.is_dir() and folder.is_relative_to(out.resolve()), folder
        for item in contents.split(", "):
            counted = re.fullmatch(r"(\d+) (\.\w+)", item)
            if counted:
                assert len(list(folder.glob(f"*{counted[2]}"))) == int(counted[1]), item
            else:
                assert (folder / item).is_file(), item
    # the simulation writes its XDMF (with the differences to the truth); a line that
    # mentions XDMF files in a folder is true of that folder
    assert list((out / "simulate").glob("*.xdmf"))
    for line in text.splitlines():
        if "XDMF" in line:
            for folder in re.findall(r"(/\S+)", line):
                assert list(Path(folder.rstrip(".,)")).glob("*.xdmf")), line
