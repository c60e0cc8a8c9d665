"""The configuration reference (``docs/configuration.md``), generated from the config classes.

``python -m vcnn.config_reference > docs/configuration.md`` (or ``make docs``) writes one table
per TOML table of every verb: each key's type, default, allowed values, the flag that sets it
and its meaning. Keys, types and defaults come from the config dataclasses
(:class:`vcnn.training.TrainConfig`, :class:`solvers.generate.GenerateConfig`,
:class:`solvers.simulate.SimulateConfig` and the tables inside them); meanings from their
docstrings' ``Attributes:`` sections; allowed values from the range tables of the code
(:data:`vcnn.physics.CONSTANT_RANGES`, :data:`solvers.simulate.NUMBER_RANGES`), from the
choices of the verb's flags, and for the rest from :data:`CHECKED_RANGES` here (a test checks
that the config classes refuse a value outside each of those). The tables of ``evaluate``,
``export`` and ``plot`` are their flags (see :func:`vcnn.cli._flags_from_config`).

``solvers`` (dolfinx) is imported only inside :func:`render`, so importing this module needs
torch at most.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Allowed values that the config classes check in code rather than in a range table:
#: ``"table.key"`` -> text. ``tests/test_docs.py`` checks that each is enforced.
CHECKED_RANGES: dict[str, str] = {
    "train.epochs": "integer >= 1",
    "train.batch_size": "integer >= 1",
    "train.cloud_size": "integer >= 1",
    "train.step_size": "integer >= 1",
    "train.queries_per_case": 'integer >= 1, or "all"',
    "train.validation_queries_per_case": 'integer >= 1, or "all"',
    "train.learning_rate": "> 0",
    "train.weight_decay": ">= 0",
    "train.gamma": "(0, 1]",
    "train.min_learning_rate": ">= 0, at most learning_rate (cosine)",
    "train.patience": "integer >= 1, or unset",
    "train.min_delta": ">= 0",
    "train.ema_decay": "[0, 1) (0: no moving average)",
    "train.num_threads": "integer >= 1, or unset",
    "train.time_limit_minutes": "> 0, or unset",
    "train.device": '"auto", "cpu", "cuda" or "cuda:N"',
    "generate.c_k": ">= 0, finite",
    "generate.flow_min_samples_per_point": "(0, 1]",
    "mesh.resolution": "> 0, finite",
    "mesh.size": "> 0, finite",
    "mesh.wall_size": "> 0, at most size",
    "mesh.cell_type": '"quadrilateral" or "triangle"',
    "cloud.eps": "(0, 1)",
    "cloud.cutoff_start": '[0, 1), or "none"',
    "features.wall_distance_cap": "> 0, finite",
    "features.proximity_length": "> 0, finite",
    "features.upstream_speed_floor": "> 0, finite",
    "simulate.alphas": "each in [0.1, 20]",
}

#: The roles of ``[generate.boundaries]`` / ``[simulate.boundaries]`` (see
#: ``solvers.case_setup.BOUNDARY_ROLES``; a test checks that the two agree).
BOUNDARY_ROLE_MEANINGS: dict[str, tuple[str, str]] = {
    "walls": ("list of group names", "no slip (u = 0), tau = 0"),
    "inlets": (
        "table of inlet tables",
        '`[....inlets.NAME]`: `profile = "parabolic"` (with `mean_velocity`), `"uniform"` '
        '(with `velocity = [ux, uy]`) or `"expression"` (with `components`, arithmetic of '
        "x, y, z); tau = 0 on every inlet (no other value can be set)",
    ),
    "outlets": (
        "list of group names",
        "do-nothing for u (which also fixes the pressure level), zero diffusive flux for tau",
    ),
    "natural": (
        "list of group names",
        "an outlet's conditions on an open boundary that is not an outflow (far field, open top)",
    ),
    "periodic": (
        "list of tables",
        "`{ slave = NAME, master = NAME, translation = [dx, dy(, dz)] }`: a point x on the "
        "slave is x + translation on the master; the translation's length is the case's "
        "period. `translation` may be left out: it is then found from the two tagged "
        "surfaces; given or found, every vertex of each surface must land on one of the other",
    ),
}

#: Keys of ``[train.model]`` that the training run fills in itself (not settable).
_DERIVED_MODEL_KEYS = ("dim", "num_scalars", "num_vectors", "point_scalar_columns")


@dataclass(frozen=True)
class KeyDoc:
    """One row of the reference.

    Attributes:
        key: the key as written in its TOML table.
        type: its Python type, as annotated.
        default: the default, as written in TOML (or a sentence when it has none).
        allowed: the allowed values ("" when any value of the type is).
        flag: the command-line flag that sets it ("" when none does).
        meaning: what it does.
    """

    key: str
    type: str
    default: str
    allowed: str
    flag: str
    meaning: str


@dataclass(frozen=True)
class TableDoc:
    """One TOML table of the reference.

    Attributes:
        name: the table's name, e.g. ``train.cloud``.
        intro: a paragraph above the table.
        rows: its keys.
    """

    name: str
    intro: str
    rows: tuple[KeyDoc, ...]


def docstring_section(obj: Any, section: str = "Attributes") -> dict[str, str]:
    """The entries of a Google-style docstring section, one line of text each.

    Args:
        obj: a class or function with a docstring.
        section: the section's title (``Attributes``, ``Args``).

    Returns:
        name -> description, Sphinx roles and double backquotes turned into Markdown code.
    """
    lines = (inspect.getdoc(obj) or "").splitlines()
    entries: dict[str, list[str]] = {}
    inside = False
    name: str | None = None
    for line in lines:
        if line.strip() == f"{section}:":
            inside = True
            continue
        if not inside:
            continue
        if line and not line.startswith(" "):  # the section (or the docstring's text) ends
            break
        match = re.match(r"^    (\*{0,2}\w+)(?: \([^)]*\))?: ?(.*)$", line)
        if match:
            name = match.group(1)
            entries[name] = [match.group(2)]
        elif name is not None and line.strip():
            entries[name].append(line.strip())
    return {key: _markdown(" ".join(text)) for key, text in entries.items()}


def _markdown(text: str) -> str:
    """Docstring markup as Markdown that fits in a table cell."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    text = text.replace("``", "`")
    return text.replace("|", "\\|").strip()


def toml_value(value: Any) -> str:
    """A default as it is written in TOML."""
    if value is dataclasses.MISSING:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{}" if not value else "{" + ", ".join(
            f"{key} = {toml_value(item)}" for key, item in value.items()
        ) + "}"
    return str(value)


def _field_default(item: dataclasses.Field) -> Any:
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return dataclasses.MISSING


def _type_text(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return text.replace("|", "\\|")


def _choices(values: Iterable[Any]) -> str:
    return ", ".join(f'"{value}"' for value in values)


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def dataclass_rows(
    config_class: type,
    *,
    table: str,
    allowed: Mapping[str, str],
    flags: Mapping[str, str],
    meanings: Mapping[str, str] | None = None,
    skip: Iterable[str] = (),
) -> list[KeyDoc]:
    """The rows of a config dataclass's table.

    Args:
        config_class: the dataclass.
        table: the reference's table name (for :data:`CHECKED_RANGES`, e.g. ``train``).
        allowed: key -> allowed values from the code's range tables and flag choices.
        flags: key -> the flag that sets it.
        meanings: key -> meaning; default: the class docstring's ``Attributes:`` section.
        skip: keys left out (tables documented on their own).
    """
    meanings = docstring_section(config_class) if meanings is None else meanings
    rows = []
    for item in dataclasses.fields(config_class):
        if item.name in skip:
            continue
        default = _field_default(item)
        if dataclasses.is_dataclass(default) or (
            isinstance(default, dict) and item.name in ("mesh", "physics", "boundaries")
        ):
            shown = f"table `[{table.split('.')[0]}.{item.name}]`"
        else:
            shown = _code(toml_value(default))
        rows.append(
            KeyDoc(
                key=item.name,
                type=_code(_type_text(item.type)),
                default=shown,
                allowed=CHECKED_RANGES.get(f"{table}.{item.name}") or allowed.get(item.name, ""),
                flag=_code(flags.get(item.name, "")),
                meaning=meanings.get(item.name, ""),
            )
        )
    return rows


def _verb_parsers() -> dict[str, argparse.ArgumentParser]:
    from vcnn.cli import build_parser

    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise RuntimeError("the vcnn parser has no verbs")


def _flag_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    hidden = {"help", "config", "verb_verbose", "verb_quiet", "verbose", "quiet"}
    return [
        action
        for action in parser._actions
        if action.option_strings and action.dest not in hidden and action.help != argparse.SUPPRESS
    ]


def flag_map(parser: argparse.ArgumentParser) -> tuple[dict[str, str], dict[str, str]]:
    """The flag of each config key of a verb, and the choices its flag allows.

    Returns:
        (key -> flag, key -> allowed values), keys as ``key`` or ``table.key``.
    """
    config_keys = getattr(parser, "config_keys", {})
    flags: dict[str, str] = {}
    choices: dict[str, str] = {}
    for action in _flag_actions(parser):
        key = config_keys.get(action.dest, action.dest)
        flag = max(action.option_strings, key=len)
        if action.nargs == 0 and flag.startswith("--no-"):  # --no-plots sets plots = false
            key = config_keys.get(flag[5:].replace("-", "_"), flag[5:].replace("-", "_"))
        flags.setdefault(key, flag)
        if action.choices is not None:
            choices[key] = _choices(action.choices)
    return flags, choices


def _sub(mapping: Mapping[str, str], prefix: str) -> dict[str, str]:
    """The entries of ``mapping`` under ``prefix.``, with the prefix removed."""
    return {key[len(prefix) + 1 :]: value for key, value in mapping.items()
            if key.startswith(prefix + ".")}


def _range_texts(ranges: Mapping[str, Any]) -> dict[str, str]:
    """Ranges (:class:`vcnn.physics.Range` or integer bounds) as text: ``> 0, finite``."""
    texts = {}
    for key, allowed in ranges.items():
        if isinstance(allowed, tuple):
            texts[key] = f"integer from {allowed[0]} to {allowed[1]}"
        elif math.isinf(allowed.high):
            texts[key] = f"{'>=' if allowed.low_closed else '>'} {allowed.low:g}, finite"
        else:
            texts[key] = f"{allowed}, finite"
    return texts


def flag_rows(parser: argparse.ArgumentParser) -> list[KeyDoc]:
    """The rows of a verb whose ``[verb]`` table holds its flags' long names (evaluate, ...)."""
    rows = []
    for action in _flag_actions(parser):
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:
            kind, default = "bool", "`false`"
        else:
            many = action.nargs in ("+", "*")
            base = getattr(action.type, "__name__", "str") if action.type else "str"
            base = {"Path": "str", "parse": "int", "_number": "float"}.get(base, base)
            kind = f"list[{base}]" if many else base
            if "required" in (action.help or ""):
                default = "required"
            elif action.default is None and hasattr(action, "none_means"):
                default = f"unset: {action.none_means}"
            else:
                default = _code(toml_value(action.default))
        help_text = re.sub(r"\s*\((?:default|required)[^)]*\)$", "", action.help or "")
        rows.append(
            KeyDoc(
                key=action.dest,
                type=_code(kind),
                default=default,
                allowed=_choices(action.choices) if action.choices else "",
                flag=_code(flag),
                meaning=_markdown(help_text),
            )
        )
    positional = [a for a in parser._actions if not a.option_strings and a.dest != "help"]
    for action in positional:
        rows.append(
            KeyDoc(
                key=action.dest,
                type=_code("list[str]" if action.nargs in ("+", "*") else "str"),
                default="required",
                allowed="",
                flag=_code(action.metavar or action.dest.upper()) + " (positional)",
                meaning=_markdown(action.help or ""),
            )
        )
    return rows


def model_rows() -> list[KeyDoc]:
    """The rows of ``[train.model]``: the kind, the preset and the network's arguments."""
    from vcnn.network import _PRESETS, VectorCloudNet

    meanings = docstring_section(VectorCloudNet.__init__, "Args") or docstring_section(
        VectorCloudNet, "Args"
    )
    signature = inspect.signature(VectorCloudNet.__init__)
    preset = _PRESETS["default"]
    rows = [
        KeyDoc("kind", "`str`", '`"VectorCloudNet"`', '"VectorCloudNet", "BaselineNet"', "",
               "the network class (`BaselineNet`: the non-invariant baseline of experiment (c))"),
        KeyDoc("preset", "`str`", '`"default"`', _choices(_PRESETS), "",
               "a named set of the arguments below (VectorCloudNet only); any argument given "
               "in the table overrides the preset's value"),
    ]
    for name, parameter in signature.parameters.items():
        if name in ("self", *_DERIVED_MODEL_KEYS) or parameter.kind is parameter.VAR_KEYWORD:
            continue
        default = preset.get(name, parameter.default)
        rows.append(
            KeyDoc(
                key=name,
                type=_code(_type_text(parameter.annotation)),
                default=_code(toml_value(default)),
                allowed="",
                flag="",
                meaning=meanings.get(name, ""),
            )
        )
    return rows


def reference_tables() -> list[TableDoc]:
    """Every table of the reference, in the order of the page.

    Raises:
        ImportError: when the FEM stack (``solvers``, dolfinx) is not installed.
    """
    from solvers.case_setup import BOUNDARY_ROLES
    from solvers.generate import PHYSICS_TABLE_KEYS as GENERATE_PHYSICS_KEYS
    from solvers.generate import GenerateConfig, MeshConfig
    from solvers.simulate import NUMBER_RANGES, SimulateConfig
    from solvers.simulate import PHYSICS_TABLE_KEYS as SIMULATE_PHYSICS_KEYS
    from vcnn.clouds import CloudOptions
    from vcnn.features import FeatureSpec
    from vcnn.physics import CHOICE_CONSTANTS, CONSTANT_RANGES, Physics
    from vcnn.training import TrainConfig
    from vcnn.training.config import BATCH_GROUPINGS, SCHEDULERS

    if set(BOUNDARY_ROLES) != set(BOUNDARY_ROLE_MEANINGS):
        raise RuntimeError(f"boundary roles {BOUNDARY_ROLES} are not all documented")
    parsers = _verb_parsers()
    constants = _range_texts(CONSTANT_RANGES)
    constants.update({
        name: ", ".join(f'"{value}"' for value in values)
        for name, values in CHOICE_CONSTANTS.items()
    })
    physics_meanings = docstring_section(Physics)
    tables: list[TableDoc] = []

    def physics_rows(
        keys: Iterable[str],
        *,
        default: Callable[[str], str],
        flags: Mapping[str, str] | None = None,
    ) -> list[KeyDoc]:
        types = {item.name: item.type for item in dataclasses.fields(Physics)}
        cloud = docstring_section(CloudOptions)
        return [
            KeyDoc(
                key=key,
                type=_code(_type_text(types.get(key, "float"))),
                default=default(key),
                allowed=constants.get(key, ""),
                flag=_code((flags or {}).get(key, "")),
                meaning=physics_meanings.get(key) or cloud.get(key, ""),
            )
            for key in sorted(keys, key=lambda k: list(types).index(k) if k in types else 99)
        ]

    def mesh_table(verb: str, flags: Mapping[str, str], choices: Mapping[str, str]) -> TableDoc:
        return TableDoc(
            f"{verb}.mesh",
            "Which mesh each case is solved on.",
            tuple(dataclass_rows(MeshConfig, table="mesh", allowed=_sub(choices, "mesh"),
                                 flags=_sub(flags, "mesh"))),
        )

    def boundaries_table(verb: str) -> TableDoc:
        return TableDoc(
            f"{verb}.boundaries",
            "File meshes only: the role of every boundary group of the mesh, by the group's "
            "name; a group that no role lists is refused. The conditions of each role are in "
            "[physics](physics.md#boundary-conditions).",
            tuple(KeyDoc(role, _code(kind), "", "", "", meaning)
                  for role, (kind, meaning) in BOUNDARY_ROLE_MEANINGS.items()),
        )

    # generate
    flags, choices = flag_map(parsers["generate"])
    tables.append(TableDoc(
        "generate",
        "`vcnn generate`: solve cases and write case files.",
        tuple(dataclass_rows(GenerateConfig, table="generate", allowed=choices, flags=flags)),
    ))
    tables.append(mesh_table("generate", flags, choices))
    defaults = Physics()
    tables.append(TableDoc(
        "generate.physics",
        "The physical constants ([physics](physics.md)); `production` and `c_k` are keys of "
        "`[generate]` itself.",
        tuple(physics_rows(GENERATE_PHYSICS_KEYS,
                           default=lambda key: _code(toml_value(getattr(defaults, key))),
                           flags=_sub(flags, "physics"))),
    ))
    tables.append(boundaries_table("generate"))
    # simulate
    flags, choices = flag_map(parsers["simulate"])
    allowed = {**choices, **_range_texts(NUMBER_RANGES)}
    tables.append(TableDoc(
        "simulate",
        "`vcnn simulate`: a closure in the loop of the flow solver, against the PDE truth.",
        tuple(dataclass_rows(SimulateConfig, table="simulate", allowed=allowed, flags=flags)),
    ))
    tables.append(mesh_table("simulate", flags, choices))
    tables.append(TableDoc(
        "simulate.physics",
        "Constants that differ from the closure's record are refused unless "
        "`allow_physics_mismatch`; unset keys come from the closure (or the defaults of "
        "`[generate.physics]` for `closure = \"pde\"`).",
        tuple(physics_rows(SIMULATE_PHYSICS_KEYS, default=lambda key: "the closure's")),
    ))
    tables.append(boundaries_table("simulate"))
    # train
    flags, choices = flag_map(parsers["train"])
    tables.append(TableDoc(
        "train",
        "`vcnn train`: train a network on case files. The defaults are the CPU recipe "
        "`experiments/published/train_cpu.toml` of the shipped `published` model.",
        tuple(dataclass_rows(
            TrainConfig,
            table="train",
            allowed={**choices, "scheduler": _choices(SCHEDULERS),
                     "batch_grouping": _choices(BATCH_GROUPINGS)},
            flags=flags,
            skip=("model", "cloud", "features"),
        )),
    ))
    tables.append(TableDoc(
        "train.model",
        "The network; the defaults are those of the `default` preset.",
        tuple(model_rows()),
    ))
    from vcnn.clouds import _REGIONS
    from vcnn.features import BUILTIN_PAIR_SCALARS

    tables.append(TableDoc(
        "train.cloud",
        "Which points form the cloud of a query point; stored with the model.",
        tuple(dataclass_rows(CloudOptions, table="cloud",
                             allowed={"region": _choices(_REGIONS)},
                             flags={})),
    ))
    tables.append(TableDoc(
        "train.features",
        "Which inputs the network sees; stored with the model.",
        tuple(dataclass_rows(FeatureSpec, table="features", allowed={
            "pair_scalars": "any of " + _choices(BUILTIN_PAIR_SCALARS)
        }, flags={})),
    ))
    # the verbs whose table is their flags
    for verb, intro in (
        ("evaluate", "`vcnn evaluate`: a-priori errors of a trained closure on case files."),
        ("export", "`vcnn export`: an inference-only copy of a checkpoint."),
        ("plot", "`vcnn plot`: figures of case files."),
    ):
        tables.append(TableDoc(
            verb,
            intro + " The table's keys are the long names of the flags, with `_`.",
            tuple(flag_rows(parsers[verb])),
        ))
    return tables


def _renamed_keys_text() -> str:
    """The paragraph on the keys renamed so that one concept has one name in every verb."""
    from vcnn.config import PLOT_RENAMED_KEYS, RENAMED_KEYS, TRAIN_RENAMED_KEYS

    renames = [
        (table, old, new)
        for tables, renamed in (
            (("generate", "simulate"), RENAMED_KEYS),
            (("train",), TRAIN_RENAMED_KEYS),
            (("plot",), PLOT_RENAMED_KEYS),
        )
        for table in tables
        for old, new in renamed.items()
    ]
    listed = ", ".join(f"`{old}` -> `{new}` in `[{table}]`" for table, old, new in renames)
    return (
        "One concept has one name in every verb: `out` is the output folder (`--out`), `data` "
        "the case files or folders read (`--data`), `model` a checkpoint or a shipped model's "
        "name (`--model` of simulate, evaluate and export; `[train]` starts from one with "
        "`init_model`, its `[train.model]` table is the network to build). Renamed keys: "
        f"{listed}. The old names are still read, with a "
        "one-line deprecation notice; a table that gives both names of a key is refused."
    )


def render(tables: Sequence[TableDoc] | None = None) -> str:
    """The Markdown page of the reference."""
    tables = reference_tables() if tables is None else tables
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m vcnn.config_reference > docs/configuration.md` "
        "(`make docs`) from the config classes; do not edit by hand. -->",
        "",
        "Every verb of `vcnn` reads the `[verb]` table of a TOML file given with `--config` "
        "(or the whole file when it has no such table); flags given on the command line win. "
        "Nested tables are written `[verb.table]`. Each run writes its resolved configuration "
        "as `config.toml` into its output folder, so a run can be repeated with "
        "`--config <out>/config.toml`. Unknown keys, values of the wrong type and values "
        "outside the allowed range are refused with one line naming the key (exit code 2).",
        "",
        _renamed_keys_text(),
        "",
        "Tables: " + ", ".join(f"[`[{t.name}]`](#{t.name.replace('.', '')})" for t in tables) + ".",
        "",
    ]
    for table in tables:
        lines += [f"## {table.name}", "", table.intro, ""]
        lines += [
            "| key | type | default | allowed | flag | meaning |",
            "|---|---|---|---|---|---|",
        ]
        for row in table.rows:
            cells = (f"`{row.key}`", row.type, row.default, row.allowed, row.flag, row.meaning)
            lines.append("| " + " | ".join(cell.replace("\n", " ") for cell in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the reference (``python -m vcnn.config_reference > docs/configuration.md``)."""
    parser = argparse.ArgumentParser(description="Print the configuration reference (Markdown).")
    parser.parse_args(argv)
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
