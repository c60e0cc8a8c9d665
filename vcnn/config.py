"""TOML configuration: reading, merging with command-line flags, writing the resolved config.

Every verb of the command line reads an optional TOML file, lets flags override it, and writes
the resolved configuration into its output folder so that a run can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vcnn.atomic import atomic_write_text
from vcnn.inputs import check_regular_input

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration file or value is missing or malformed."""


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML file.

    Raises:
        ConfigError: when the file is missing, a folder or not a regular file (a FIFO is
            refused without being opened), or not valid TOML (the parser's message, with line
            and column, is kept).
    """
    path = check_regular_input(path, what="config file", allow_dir=True, error=ConfigError)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder; give the .toml file")
    try:
        with path.open("rb") as stream:
            return tomllib.load(stream)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {error}") from error


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``override`` into a copy of ``base``; ``None`` values do not override."""
    merged = dict(base)
    for key, value in override.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            merged[key] = merge(merged.get(key) or {}, value)
        else:
            merged[key] = value
    return merged


#: Config keys of ``[generate]`` and ``[simulate]`` that were renamed so that one concept has
#: one name across verbs and flags (``out`` is the output folder, as the flag ``--out``): the
#: old key -> its name now. The old keys are still read, with a deprecation notice
#: (:func:`renamed_keys`).
RENAMED_KEYS: dict[str, str] = {"output": "out"}
#: The renamed keys of ``[train]`` (:class:`vcnn.training.TrainConfig`): ``data`` is the folder
#: of case files read (the flag ``--data``, as in ``[evaluate]``), ``out`` the run folder (the
#: flag ``--out``). The checkpoints of earlier releases record the old names in their
#: ``train_config``; the readers of checkpoints map them with this table too.
TRAIN_RENAMED_KEYS: dict[str, str] = {"data_dir": "data", "out_dir": "out"}
#: The renamed keys of ``[plot]``: ``data`` holds the case files or folders read, as in
#: ``[evaluate]`` and ``[train]``.
PLOT_RENAMED_KEYS: dict[str, str] = {"cases": "data"}

_NOTICES_GIVEN: set[tuple[str, str]] = set()


def renamed_keys(
    values: Mapping[str, Any], renames: Mapping[str, str], where: str
) -> dict[str, Any]:
    """A config table with its old key names replaced by the current ones.

    Each old key is reported once per process (logging WARNING, one line naming the table,
    the old and the new key).

    Args:
        values: the table as read.
        renames: old key -> current key (a subset of :data:`RENAMED_KEYS` for the table).
        where: the table's name in messages, e.g. ``"[generate]"``.

    Raises:
        ConfigError: the table gives both an old key and its current name.
    """
    renamed = dict(values)
    for old, new in renames.items():
        if old not in renamed:
            continue
        if new in renamed:
            raise ConfigError(
                f"{where} gives both {old!r} and {new!r}: {old!r} is the old name of {new!r}, "
                f"keep {new!r}"
            )
        renamed[new] = renamed.pop(old)
        if (where, old) not in _NOTICES_GIVEN:
            _NOTICES_GIVEN.add((where, old))
            logger.warning(
                "%s key %r is deprecated: it is now called %r", where, old, new
            )
    return renamed


def check_keys(section: Mapping[str, Any], allowed: set[str], where: str) -> None:
    """Reject unknown keys so that a typo in a config never passes silently.

    Raises:
        ConfigError: naming the unknown keys and the allowed ones.
    """
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(allowed)}")


def check_types(values: Mapping[str, Any], schema: type, where: str) -> None:
    """Check the values of a config table against the field types of a dataclass.

    The schema is the dataclass's own annotations (``list[float]``, ``bool``, ``str | None``,
    a nested dataclass for a sub-table ...), so the config classes declare their types once.
    Numbers are not read from strings and booleans are not numbers: ``alphas = "12"``,
    ``plots = "false"`` and ``resolution = "0.1"`` are refused, not reinterpreted.

    Args:
        values: the table (keys not in the schema are left to :func:`check_keys`).
        schema: a dataclass type.
        where: the table's name in messages, e.g. ``"[generate]"``.

    Raises:
        ConfigError: naming the table, the key, the expected type and the value.
    """
    hints = typing.get_type_hints(schema)
    for key, value in values.items():
        if key in hints and not _matches(value, hints[key]):
            raise ConfigError(
                f"{where} {key} must be {_describe_type(hints[key])}, got {_describe_value(value)}"
            )


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(hint))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str | os.PathLike)
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, list | tuple):
            return False
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return all(_matches(v, item) for v in value)
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return isinstance(value, Mapping)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, Mapping | hint)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe_type(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [o for o in typing.get_args(hint) if o is not type(None)]
        return " or ".join(_describe_type(o) for o in options)
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1] or (Any,)
        names = {float: "numbers", int: "integers", str: "strings", bool: "booleans"}
        return f"a list of {names.get(item, 'values')}"
    simple = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
    }
    if hint in simple:
        return simple[hint]
    return "a table"


def _describe_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, Mapping):
        return f"a table {dict(value)!r}"
    if isinstance(value, list | tuple):
        return f"the list {list(value)!r}"
    return f"{value!r}"


def dumps_toml(config: Mapping[str, Any]) -> str:
    """Serialise a nested mapping of TOML-compatible values (tables, arrays of tables)."""
    lines: list[str] = []
    _write_table(lines, config, ())
    return "\n".join(lines).lstrip("\n") + "\n"


def write_resolved_config(folder: str | os.PathLike, config: Mapping[str, Any]) -> Path:
    """Write ``config.toml`` into ``folder`` atomically and return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = dumps_toml(config)
    tomllib.loads(text)  # a resolved config that cannot be read back is a bug: fail loudly
    return atomic_write_text(folder / "config.toml", text)


def _write_table(lines: list[str], table: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
    scalars = {k: v for k, v in table.items() if not _is_table(v) and not _is_table_array(v)}
    if prefix and (scalars or not table):
        lines.append(f"\n[{'.'.join(_key(p) for p in prefix)}]")
    for key, value in scalars.items():
        if value is None:
            continue
        lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in table.items():
        if _is_table(value):
            _write_table(lines, value, (*prefix, key))
        elif _is_table_array(value):
            for item in value:
                lines.append(f"\n[[{'.'.join(_key(p) for p in (*prefix, key))}]]")
                for sub_key, sub_value in item.items():
                    lines.append(f"{_key(sub_key)} = {_value(sub_value)}")


def _is_table(value: Any) -> bool:
    return isinstance(value, Mapping)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list | tuple) and bool(value) and all(_is_table(v) for v in value)


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _value(str(key))


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str | Path):
        escaped = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if hasattr(value, "item"):  # numpy scalars
        return _value(value.item())
    raise ConfigError(f"cannot write a value of type {type(value).__name__} to TOML")
