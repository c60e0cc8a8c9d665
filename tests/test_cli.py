"""Conventions of the command line: --version, help (examples, defaults), --config for every
verb, -v/-q after the verb, the result table whatever the verbosity, a fast ``vcnn --help``."""

from mpi4py import MPI  # noqa: F401  (initialise MPI before dolfinx)

import argparse
import dataclasses
import importlib.metadata
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ddp_scripts.synthetic_cases import write_channel_cases
from vcnn import cli

REPO = Path(__file__).resolve().parents[1]
VERBS = ("generate", "simulate", "train", "evaluate", "export", "plot")
TABLE_VERBS = ("evaluate", "export", "plot")  # their [verb] table holds the flags' names

TRAIN_TOML = """
[train]
validation_alphas = [1.0]
epochs = 1
batch_size = 32
cloud_size = 16
queries_per_case = 40
device = "cpu"
num_threads = 1

[train.model]
embedding = [8, 16]
fitting = [32]
axis_neurons = 4
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Three tiny channel cases and a model trained on them for one epoch."""
    root = tmp_path_factory.mktemp("cli")
    write_channel_cases(root / "cases", [0.5, 1.0, 1.5], nx=12, ny=6)
    (root / "train.toml").write_text(TRAIN_TOML)
    argv = ["-q", "train", "--config", str(root / "train.toml"), "--data", str(root / "cases"),
            "--out", str(root / "run")]
    assert cli.main(argv) == 0
    return root


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (verbs,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(verbs.choices)


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_version_is_the_package_metadata(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    version = importlib.metadata.version("vcnn-closures")
    assert capsys.readouterr().out.strip() == f"vcnn {version}"


@pytest.mark.parametrize("verb", VERBS)
def test_help_of_every_verb_has_an_example_with_paths_that_exist(verb):
    parser = _subparsers()[verb]
    text = parser.format_help()
    examples = text.split("example")[-1]
    assert f"vcnn {verb} " in examples, text
    for path in re.findall(r"experiments/\S+", examples):
        assert (REPO / path).exists(), path


@pytest.mark.parametrize("verb", VERBS)
def test_every_flag_has_help_and_shows_its_default(verb):
    parser = _subparsers()[verb]
    parser.format_help()  # fills in the defaults
    for action in parser._actions:
        if not action.option_strings:
            continue
        assert action.help, f"{verb} {action.option_strings} has no help"
        if action.nargs != 0:  # a flag that takes a value: its default, or that it is required
            assert re.search(r"default|required", action.help), (verb, action.help)


@pytest.mark.parametrize(
    ("verb", "config_class"),
    [("generate", "solvers.generate:GenerateConfig"),
     ("simulate", "solvers.simulate:SimulateConfig"),
     ("train", "vcnn.training:TrainConfig")],
)
def test_defaults_in_the_help_are_the_config_classes(verb, config_class):
    module, name = config_class.split(":")
    fields = {f.name: f for f in dataclasses.fields(getattr(__import__(module, fromlist=[name]),
                                                            name))}
    parser = _subparsers()[verb]
    parser.format_help()
    checked = 0
    for action in parser._actions:
        field = fields.get(parser.config_keys.get(action.dest, action.dest))
        if field is None or action.nargs == 0 or field.default in (None, dataclasses.MISSING):
            continue
        if isinstance(field.default, int | float | str) and "default: U" not in action.help:
            assert f"(default: {cli._format_default(field.default)})" in action.help
            checked += 1
    assert checked >= 3


def test_help_imports_neither_torch_nor_numpy():
    code = ("import sys\nimport vcnn.cli\n"
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules\n"
            "try:\n    vcnn.cli.main(['--help'])\nexcept SystemExit as stop:\n"
            "    assert stop.code == 0\n"
            "assert 'torch' not in sys.modules, 'vcnn --help imported torch'\n"
            "from vcnn import load_closure, __version__\nassert 'torch' in sys.modules\n")
    result = _run("-c", code)
    assert result.returncode == 0, result.stderr
    result = _run("-m", "vcnn.cli", "--help")
    assert result.returncode == 0 and "generate" in result.stdout


def test_config_for_evaluate_export_and_plot(world, tmp_path, capsys):
    config = tmp_path / "verbs.toml"
    config.write_text(
        f'[evaluate]\nmodel = "{world / "run" / "best.pt"}"\ndata = ["{world / "cases"}"]\n'
        f'out = "{tmp_path / "evaluation"}"\ndevice = "cpu"\ncloud_size = 8\n'
        f'[export]\nmodel = "{world / "run" / "best.pt"}"\nout = "{tmp_path / "m.pt"}"\n'
        f'[plot]\ndata = ["{world / "cases"}"]\nout = "{tmp_path / "figures"}"\n'
    )
    for verb in ("evaluate", "export", "plot"):
        assert cli.main(["-q", verb, "--config", str(config)]) == 0, capsys.readouterr().err
    assert (tmp_path / "evaluation" / "metrics.json").is_file()
    assert (tmp_path / "m.pt").is_file()
    assert len(list((tmp_path / "figures").glob("*.png"))) == 3
    # a flag wins over the table
    assert cli.main(["-q", "export", "--config", str(config), "--out", str(tmp_path / "f.pt")]) == 0
    assert (tmp_path / "f.pt").is_file()


@pytest.mark.parametrize(
    ("verb", "table", "message"),
    [(verb, "colour = 1", r"unknown key\(s\) \['colour'\]") for verb in TABLE_VERBS]
    + [(verb, "out = 3", rf"\[{verb}\] .*: out must be a string") for verb in TABLE_VERBS]
    + [("evaluate", 'overwrite = "yes"', r"overwrite must be true or false"),
       ("evaluate", 'device = "tpu"', r"device must be one of \['auto', 'cpu', 'cuda'\]"),
       ("evaluate", "cloud_size = 0", r"cloud_size must be an integer >= 1"),
       ("evaluate", 'data = [1]', r"data must be a string")],
)
def test_config_table_refuses_what_the_flags_refuse(verb, table, message, tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text(f"[{verb}]\n{table}\n")
    capsys.readouterr()
    assert cli.main([verb, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and re.search(message, err), err
    assert sorted(tmp_path.iterdir()) == [config]  # nothing written


def test_a_needed_flag_missing_from_flags_and_table_is_one_line(tmp_path, capsys):
    assert cli.main(["export", "--model", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give --out" in err and "[export]" in err


@pytest.mark.parametrize(
    ("argv", "level"),
    [(["export", "-v"], logging.DEBUG), (["export", "-q"], logging.WARNING),
     (["-q", "export", "-v"], logging.INFO), (["-v", "export", "-v"], logging.DEBUG - 10)],
)
def test_verbosity_after_the_verb_adds_to_the_one_before(argv, level, world, tmp_path):
    out = tmp_path / "m.pt"
    verb = argv.index("export")
    argv = [*argv[:verb + 1], "--model", str(world / "run" / "best.pt"), "--out", str(out),
            *argv[verb + 1:]]
    assert cli.main(argv) == 0
    assert logging.getLogger().level == level


def test_quiet_keeps_the_result_table_of_evaluate_and_plot(world, tmp_path, capsys):
    capsys.readouterr()
    assert cli.main(["-q", "evaluate", "--model", str(world / "run" / "best.pt"), "--data",
                     str(world / "cases"), "--out", str(tmp_path / "e"), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "| case | alpha | rel L2 % |" in captured.out
    assert len(re.findall(r"^\| channel", captured.out, flags=re.M)) == 3, captured.out
    assert "| case" not in captured.err  # the table is the output, not a log message
    assert cli.main(["-q", "plot", str(world / "cases"), "--out", str(tmp_path / "f")]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("wrote ") == 3 and captured.err == ""


def test_generate_prints_its_table_and_logs_newton_steps_only_with_v(tmp_path, capsys):
    argv = ["generate", "--alphas", "1", "--resolution", "0.05", "--no-xdmf", "--no-plots",
            "--out", str(tmp_path / "hills")]
    capsys.readouterr()
    assert cli.main(["-q", *argv]) == 0
    quiet = capsys.readouterr()
    assert "| hill_a1.000 | 1 | written |" in quiet.out and quiet.err == ""
    assert cli.main([*argv, "--overwrite"]) == 0
    normal = capsys.readouterr()
    assert "| hill_a1.000 | 1 | written |" in normal.out
    assert "flow done" in normal.err and "Newton" not in normal.err
    assert cli.main([*argv, "--overwrite", "-v"]) == 0
    verbose = capsys.readouterr()
    assert re.search(r"^Newton \d+: residual", verbose.err, flags=re.M)
    assert re.search(r"^tau \(frozen\): \d+ Newton iterations", verbose.err, flags=re.M)


def test_queries_per_case_takes_every_point_on_the_command_line_too():
    args = cli.build_parser().parse_args(["train", "--queries-per-case", "all"])
    assert args.queries_per_case == "all"
    args = cli.build_parser().parse_args(["train", "--queries-per-case", "300"])
    assert args.queries_per_case == 300
