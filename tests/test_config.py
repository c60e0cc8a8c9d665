import tomllib

import pytest

from vcnn.config import ConfigError, check_keys, dumps_toml, load_toml, merge, write_resolved_config


def test_toml_round_trip(tmp_path):
    config = {
        "generate": {
            "alphas": [0.5, 1.0, 2.0],
            "mesh": {"kind": "structured", "resolution": 0.25},
            "output": "data/hills",
            "overwrite": False,
            "seed": 7,
            "boundaries": {"periodic": [{"slave": "right", "master": "left", "translation": [-9.0, 0.0]}]},
        }
    }
    path = write_resolved_config(tmp_path, config)
    assert path.name == "config.toml"
    assert load_toml(path) == config
    assert tomllib.loads(dumps_toml({"a b": "x\"y"})) == {"a b": "x\"y"}


def test_merge_overrides_and_skips_none():
    base = {"a": 1, "t": {"x": 1, "y": 2}}
    assert merge(base, {"a": None, "t": {"y": 3}}) == {"a": 1, "t": {"x": 1, "y": 3}}
    assert base == {"a": 1, "t": {"x": 1, "y": 2}}
    assert merge({}, {"t": {"x": None, "y": 1}}) == {"t": {"y": 1}}


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("alphas = [1, 2\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad)
    with pytest.raises(ConfigError, match="alhpas"):
        check_keys({"alhpas": [1]}, {"alphas"}, "[generate]")
