"""One name per concept: renamed config keys, a generate config read by simulate, run records."""

from mpi4py import MPI

import io
import logging
import tomllib
from pathlib import Path

import pytest

from solvers.generate import GenerateConfig
from solvers.run_folder import CaseProgress, append_summary
from solvers.simulate import SimulateConfig, simulate_table
from tests.ddp_scripts.synthetic_cases import write_channel_cases
from vcnn import cli
from vcnn import config as config_module
from vcnn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vcnn.config import TRAIN_RENAMED_KEYS, ConfigError, renamed_keys
from vcnn.training import TrainConfig, train
from vcnn.training.resume import saved_train_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_notices(monkeypatch):
    monkeypatch.setattr(config_module, "_NOTICES_GIVEN", set())


def _notices(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and "deprecated" in r.message]


def test_an_old_key_is_read_with_one_notice(caplog, tmp_path):
    caplog.set_level(logging.WARNING)
    first = GenerateConfig.from_dict({"output": str(tmp_path / "a")})
    second = GenerateConfig.from_dict({"output": str(tmp_path / "b")})
    assert first.out == str(tmp_path / "a") and second.output == str(tmp_path / "b")
    (notice,) = _notices(caplog)  # once per process, not once per read
    assert "[generate] key 'output' is deprecated" in notice.message and "'out'" in notice.message
    assert "\n" not in notice.message
    # the current name: no notice; the flag (an override) wins over the file's old key
    caplog.clear()
    assert GenerateConfig.from_dict({"out": "x"}).out == "x"
    flagged = SimulateConfig.from_dict(
        {"output": "from-file", "closure": "pde", "coupling": "one-way"},
        overrides={"out": "from-flag"},
    )
    assert flagged.out == "from-flag"
    assert [n.message for n in _notices(caplog)] == [
        "[simulate] key 'output' is deprecated: it is now called 'out'"
    ]
    assert "output" not in GenerateConfig().to_dict() and "out" in GenerateConfig().to_dict()


def test_both_names_at_once_are_refused():
    with pytest.raises(ConfigError, match="gives both 'output' and 'out'"):
        renamed_keys({"output": "a", "out": "b"}, {"output": "out"}, "[generate]")
    assert renamed_keys({"x": 1}, {"output": "out"}, "[t]") == {"x": 1}


def test_simulate_reads_the_cases_of_a_generate_config():
    document = {
        "generate": {
            "alphas": [0.8, 1.2],
            "mesh": {"resolution": 0.25},
            "production": "frozen",
            "plots": False,
            "out": "data/x",
        }
    }
    table = simulate_table(document)
    assert table == {"alphas": [0.8, 1.2], "mesh": {"resolution": 0.25}}
    config = SimulateConfig.from_dict(table, overrides={"closure": "pde", "coupling": "one-way"})
    assert config.alphas == [0.8, 1.2] and config.mesh.resolution == 0.25
    # [simulate] wins where it says the same thing; a bare table stays what it is
    both = {**document, "simulate": {"alphas": [1.0]}}
    assert simulate_table(both) == {"alphas": [1.0], "mesh": {"resolution": 0.25}}
    assert simulate_table({"alphas": [2.0]}) == {"alphas": [2.0]}
    with pytest.raises(ConfigError, match=r"\[generate\] must be a table"):
        simulate_table({"generate": 3})


def test_summary_keeps_a_dated_section_per_run(tmp_path):
    (tmp_path / "summary.md").write_text("| case |\n|---|\n| old |\n")  # an older bare table
    append_summary(tmp_path, "| case |\n|---|\n| a |", verb="generate",
                   stamp="20261204T101500.000000Z")
    append_summary(tmp_path, "| case |\n|---|\n| b |", verb="simulate",
                   stamp="20261204T111500.000000Z")
    text = (tmp_path / "summary.md").read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == [
        "## earlier run",
        "## vcnn generate, 2026-12-04 10:15:00 UTC",
        "## vcnn simulate, 2026-12-04 11:15:00 UTC",
    ]
    assert text.index("| old |") < text.index("| a |") < text.index("| b |")


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_case_bar_shows_only_on_a_terminal_and_is_erased(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    with CaseProgress(3, verb="generate", comm=MPI.COMM_WORLD) as progress:
        assert not progress.enabled
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with CaseProgress(2, verb="generate", comm=MPI.COMM_WORLD) as progress:
        assert progress.enabled
        progress.start("case_a")
        progress.done()
        assert "generate" in terminal.getvalue()
    # the bar is cleared when the run ends: the last thing written blanks its line
    assert terminal.getvalue().endswith("\r") or terminal.getvalue().rstrip(" ").endswith("\r")


# ------------------------------------------------------------------ [train] and [plot]
#: A tiny run on the synthetic channel cases: seconds on one thread.
TINY_RUN = (
    'validation_alphas = [1.25]\ntrain_alphas = [0.75, 1.0]\nbatch_size = 32\n'
    'cloud_size = 16\nema_decay = 0.0\ndevice = "cpu"\nnum_threads = 1\nseed = 5\n'
    '[train.model]\nembedding = [8, 16]\nfitting = [32]\naxis_neurons = 4\n'
)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cases")
    write_channel_cases(folder, [0.75, 1.0, 1.25], nx=12, ny=6)
    return folder


def test_old_train_keys_are_read_with_one_notice_each(caplog):
    caplog.set_level(logging.WARNING)
    first = TrainConfig.from_dict({"data_dir": "cases", "out_dir": "run"})
    second = TrainConfig.from_dict({"data_dir": "more", "out_dir": "run2"})
    assert (first.data, first.out, second.data, second.out) == ("cases", "run", "more", "run2")
    assert sorted(notice.message for notice in _notices(caplog)) == [
        "[train] key 'data_dir' is deprecated: it is now called 'data'",
        "[train] key 'out_dir' is deprecated: it is now called 'out'",
    ]
    # what a run records (config.toml, checkpoints) has the current names only
    written = first.to_dict()
    assert written["data"] == "cases" and not set(TRAIN_RENAMED_KEYS) & set(written)
    # a flag (override) wins over the file's old key; an unset flag (None) leaves it
    flagged = TrainConfig.from_dict(
        {"data_dir": "from-file", "out_dir": "run"}, overrides={"data": "from-flag", "out": None}
    )
    assert (flagged.data, flagged.out) == ("from-flag", "run")


def test_old_and_new_train_keys_together_are_refused():
    with pytest.raises(ConfigError, match="gives both 'data_dir' and 'data'"):
        TrainConfig.from_dict({"data_dir": "a", "data": "b", "out": "o"})
    with pytest.raises(ConfigError, match=r"needs \['out'\]: give --out"):
        TrainConfig.from_dict({"data": "a"})


def test_a_last_pt_written_before_the_rename_resumes(cases, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = tmp_path / "old.toml"  # a recipe of the release before the rename
    recipe.write_text(f'[train]\ndata_dir = "{cases}"\nout_dir = "{run}"\nepochs = 1\n{TINY_RUN}')
    code = cli.main(["train", "--config", str(recipe)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "best validation relative L2 error" in printed.out
    notices = [line for line in printed.err.splitlines() if "deprecated" in line]
    assert notices == [
        "[train] key 'data_dir' is deprecated: it is now called 'data'",
        "[train] key 'out_dir' is deprecated: it is now called 'out'",
    ]
    recorded = tomllib.loads((run / "config.toml").read_text())["train"]
    assert (recorded["data"], recorded["out"]) == (str(cases), str(run))
    assert not set(TRAIN_RENAMED_KEYS) & set(recorded)
    # last.pt as that release wrote it: its train_config under the old names
    payload = load_checkpoint(run / "last.pt")
    old_names = {new: old for old, new in TRAIN_RENAMED_KEYS.items()}
    payload["train_config"] = {old_names.get(k, k): v for k, v in payload["train_config"].items()}
    save_checkpoint(run / "last.pt", payload)
    assert "data_dir" in load_checkpoint(run / "last.pt")["train_config"]
    # resumed with the current names and one more epoch: the names are no mismatch ...
    table = tomllib.loads(f'[train]\ndata = "{cases}"\nout = "{run}"\n{TINY_RUN}')["train"]
    with pytest.raises(CheckpointError, match="seed: 5 in the checkpoint, 6 now") as refused:
        train(TrainConfig.from_dict({**table, "epochs": 2, "resume": True, "seed": 6}))
    assert "data_dir" not in str(refused.value) and "out_dir" not in str(refused.value)
    # ... and the run continues where it stopped
    resumed = train(TrainConfig.from_dict({**table, "epochs": 2, "resume": True}))
    assert [record.epoch for record in resumed.history] == [1, 2]


@pytest.mark.parametrize("name", ["published", "coupled"])
def test_the_shipped_checkpoints_keep_their_old_names_and_read_as_the_new(name):
    payload = load_checkpoint(REPO / "experiments" / name / "model" / "best.pt")
    recorded = payload["train_config"]
    assert {"data_dir", "out_dir"} <= set(recorded)  # written before the rename
    config = TrainConfig.from_dict(saved_train_config(payload))
    assert (config.data, config.out) == (recorded["data_dir"], recorded["out_dir"])


def test_an_integral_run_says_its_error_is_the_rms_integral_error(cases, tmp_path, capsys):
    recipe = tmp_path / "integral.toml"
    recipe.write_text('[train]\ntarget = "integral"\nvalidation_alphas = [1.25]\nepochs = 2\n'
                      'num_threads = 1\nema_decay = 0.0\n')
    code = cli.main(["-q", "train", "--config", str(recipe), "--data", str(cases), "--out",
                     str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("best validation RMS relative integral error ")
    assert "relative L2" not in line


def test_plot_reads_its_case_files_as_data_and_the_old_cases_key(cases, tmp_path, capsys):
    case = sorted(cases.glob("*.npz"))[0]
    notices = []
    for key, out in (("data", tmp_path / "new"), ("cases", tmp_path / "old")):
        config = tmp_path / f"{key}.toml"
        config.write_text(f'[plot]\n{key} = ["{case}"]\nout = "{out}"\n')
        code = cli.main(["plot", "--config", str(config)])
        printed = capsys.readouterr()
        assert code == 0, printed.err
        assert (out / f"{case.stem}.png").is_file()
        notices += [line for line in printed.err.splitlines() if "deprecated" in line]
    assert notices == ["[plot] key 'cases' is deprecated: it is now called 'data'"]
    # the positional is still called CASES on the command line and in the help
    with pytest.raises(SystemExit):
        cli.main(["plot", "--help"])
    assert "[CASES ...]" in capsys.readouterr().out
