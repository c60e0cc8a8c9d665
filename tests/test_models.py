"""Shipped models by short name: ``--model published`` / ``--model coupled`` in every verb.

The names resolve against the repository (not the current folder); an existing file of the
same name wins; an unknown name or a missing path is one error naming it and listing the
shipped names.
"""

from pathlib import Path

import pytest

from tests.ddp_scripts.synthetic_cases import write_channel_cases
from vcnn import cli
from vcnn.checkpoint import CheckpointError, is_exported_file
from vcnn.models import REPOSITORY, SHIPPED_MODELS, resolve_model


def test_every_shipped_name_is_a_checkpoint_of_the_repository():
    assert set(SHIPPED_MODELS) == {"published", "coupled"}
    for relative in SHIPPED_MODELS.values():
        assert (REPOSITORY / relative).is_file(), relative


def test_a_name_resolves_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, relative in SHIPPED_MODELS.items():
        assert resolve_model(name) == REPOSITORY / relative


def test_an_existing_file_wins_over_a_name_and_a_folder_does_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("coupled").write_bytes(b"my own checkpoint")
    assert resolve_model("coupled") == Path("coupled")
    Path("published").mkdir()  # a folder cannot be a checkpoint: the name is meant
    assert resolve_model("published") == REPOSITORY / SHIPPED_MODELS["published"]
    Path("runs").mkdir()  # a folder that is no name is left to the loader to refuse
    assert resolve_model("runs") == Path("runs")
    assert resolve_model(tmp_path / "coupled") == tmp_path / "coupled"


@pytest.mark.parametrize("value", ["publsihed", "runs/coupled/best.pt"])
def test_a_missing_model_names_the_path_and_lists_the_shipped_names(value, tmp_path,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as error:
        resolve_model(value, flag="--init-model")
    message = str(error.value)
    assert f"--init-model {value!r} does not exist" in message
    for name, relative in SHIPPED_MODELS.items():
        assert f"{name} ({relative})" in message


def test_the_help_of_every_model_flag_lists_the_shipped_names():
    parser = cli.build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    for verb, flag in [("simulate", "--model"), ("evaluate", "--model"), ("export", "--model"),
                       ("train", "--init-model")]:
        action = next(a for a in verbs[verb]._actions if flag in a.option_strings)
        assert all(name in action.help for name in SHIPPED_MODELS), (verb, action.help)
        assert "existing file wins" in action.help


def test_export_and_evaluate_take_a_name_on_the_command_line_and_in_toml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["-q", "export", "--model", "coupled", "--out", "coupled.pt"]) == 0
    assert is_exported_file(tmp_path / "coupled.pt")
    write_channel_cases(tmp_path / "cases", [1.0], nx=12, ny=6)
    Path("evaluate.toml").write_text('[evaluate]\nmodel = "published"\ndevice = "cpu"\n')
    assert cli.main(["-q", "evaluate", "--config", "evaluate.toml", "--data", "cases",
                     "--out", "eval"]) == 0
    assert (tmp_path / "eval" / "metrics.json").is_file()


def test_load_closure_takes_a_name(tmp_path, monkeypatch):
    # the Python API, and the path vcnn simulate loads its --model / model = "..." through
    from vcnn import load_closure

    monkeypatch.chdir(tmp_path)
    closure = load_closure("coupled", device="cpu")
    assert closure.physics["c_k"] == pytest.approx(0.14)


def test_train_init_model_takes_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_channel_cases(tmp_path / "cases", [0.5, 1.0, 1.5], nx=12, ny=6)
    Path("train.toml").write_text(
        '[train]\ninit_model = "published"\nvalidation_alphas = [1.0]\nepochs = 1\n'
        'batch_size = 32\ncloud_size = 16\nqueries_per_case = 32\n'
        'validation_queries_per_case = 32\ndevice = "cpu"\nnum_threads = 1\n'
    )
    assert cli.main(["-q", "train", "--config", "train.toml", "--data", "cases", "--out",
                     "run"]) == 0
    recorded = (tmp_path / "run" / "config.toml").read_text()
    assert f'init_model = "{REPOSITORY / SHIPPED_MODELS["published"]}"' in recorded
