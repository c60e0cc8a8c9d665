import tomllib

import pytest

from vcnn.config import ConfigError, check_keys, dumps_toml, load_toml, merge, write_resolved_config


def test_toml_round_trip(tmp_path):
    config = {
        "generate": {
            "alphas": [0.5, 1.0, 2.0],
            "mesh": {"kind": "structured", "resolution": 0.25},
            "out": "data/hills",
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


def test_types_are_checked_against_the_dataclass_schema():
    from dataclasses import dataclass, field

    from vcnn.config import check_types

    @dataclass
    class Table:
        alphas: list[float] = field(default_factory=list)
        plots: bool = True
        resolution: float = 1.0
        name: str | None = None
        count: int = 1

    check_types({"alphas": [1, 2.5], "plots": False, "resolution": 1, "name": None}, Table, "[t]")
    for values, message in [
        ({"alphas": "12"}, r"\[t\] alphas must be a list of numbers, got the string '12'"),
        ({"alphas": [1, "2"]}, "alphas must be a list of numbers"),
        ({"plots": "false"}, "plots must be true or false, got the string 'false'"),
        ({"resolution": "0.1"}, "resolution must be a number, got the string '0.1'"),
        ({"resolution": True}, "resolution must be a number, got true"),
        ({"name": 3}, "name must be a string, got 3"),
        ({"count": 2.0}, "count must be an integer, got 2.0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_types(values, Table, "[t]")
