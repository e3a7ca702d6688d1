"""One reading of a run's configuration: its normal form, its settings, its id and its method label.

:func:`identity` turns a configuration parsed by the run's own parser (the LightningCLI of
:mod:`ftbench.runcli`; ``ftbench fit`` in ``before_instantiate_classes``, the sweep through
:func:`ftbench.runcli.read_run`) into its **normal form**: the configuration as that parser serialises
it (``--config`` files and YAML values read and merged by jsonargparse, class paths as it resolves
them, numbers as numbers), less every value that equals its default (the parser's, and each class's
own under its ``init_args``), with a pipeline stage's upstream weights as ``run:<its run id>``. So
giving a default (``--model.init_args.beta 0.1`` where 0.1 is the default) is the same run as not
giving it, and a new option with a default leaves existing ids alone.

The normal form less :data:`ftbench.naming.NOT_SETTINGS` is the run's **settings**: the run id digests
them, the record keeps them (``run_info.settings``) and the report groups records by them less the
seed. The method label comes from the same configuration and the classes' own names (:func:`label_of`).
"""

from __future__ import annotations

import functools
import importlib
import json
from dataclasses import dataclass
from typing import Any

from ftbench import naming


@dataclass(frozen=True)
class RunIdentity:
    """What makes a run this run, read from its parsed configuration by :func:`identity`."""

    subcommand: str
    #: the normal form less :data:`ftbench.naming.NOT_SETTINGS` (the record keeps it as ``run_info.settings``)
    settings: dict[str, Any]
    #: the method label, ``objective+tuner[+quantization]``
    label: str

    @property
    def run_id(self) -> str:
        return naming.run_id(self.label, self.subcommand, self.settings)


def identity(cli, config) -> RunIdentity:
    """The identity of the run that ``cli``'s parser parsed into ``config`` (the whole namespace,
    subcommand included).

    ``cli`` is the LightningCLI whose parser it was (its ``_parser(subcommand)`` serialises the
    subcommand's part). jsonargparse's ``dump(skip_default=True)`` was checked: it keeps the defaults
    under a ``class_path`` whose key has no default (``model``, ``data``, ``tuner``), so the walk over
    defaults (:func:`_without_defaults`) is written here."""
    subcommand = config.get("subcommand")
    parser = cli._parser(subcommand)
    given = json.loads(parser.dump(config[subcommand] if subcommand else config, format="json",
                                   skip_validation=True, skip_unset=False))
    normal = _without_defaults(given, _parser_defaults(parser))
    for key in naming.UPSTREAM_KEYS:
        *parents, last = key.split(".")
        node = normal
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node:
            node[last] = naming.upstream_ref(node[last])
    return RunIdentity(subcommand or "run", naming.drop_keys(normal, naming.NOT_SETTINGS), label_of(given))


def label_of(config: dict[str, Any]) -> str:
    """The method label of a serialised configuration: the objective's and the tuner's own ``name``
    (a tuner whose name depends on its arguments says so in ``label_for``), and the backbone's quantization."""
    model, tuner = config.get("model"), config.get("tuner")
    objective = _class(model["class_path"]).name if isinstance(model, dict) else "run"
    trains = _class(tuner["class_path"]).label_for(tuner.get("init_args") or {}) if isinstance(tuner, dict) else "run"
    return naming.method_label(objective, trains, (config.get("backbone") or {}).get("quantization"))


def _class(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


_MISSING = object()


@functools.lru_cache(maxsize=8)
def _parser_defaults(parser) -> dict[str, Any]:
    """A (sub)command parser's defaults, serialised (one parser per process reads many points)."""
    return _serialised_defaults(parser)


def _serialised_defaults(parser) -> dict[str, Any]:
    return json.loads(parser.dump(parser.get_defaults(skip_validation=True), format="json", skip_validation=True,
                                  skip_unset=False))


@functools.lru_cache(maxsize=None)
def _class_defaults(class_path: str) -> dict[str, Any]:
    """The ``init_args`` a class gets when none is given, as jsonargparse reads its signature."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(_class(class_path), fail_untyped=False)
    return _serialised_defaults(parser)


def _is_class(value: Any) -> bool:
    return isinstance(value, dict) and "class_path" in value


def _class_without_defaults(value: dict[str, Any]) -> dict[str, Any]:
    init_args = _without_defaults(value.get("init_args") or {}, _class_defaults(value["class_path"]))
    return {"class_path": value["class_path"], **({"init_args": init_args} if init_args else {})}


def _without_defaults(values: dict[str, Any], defaults: Any) -> dict[str, Any]:
    """``values`` less the entries equal to ``defaults``' (see :func:`identity`)."""
    out = {}
    for key, value in values.items():
        default = defaults.get(key, _MISSING) if isinstance(defaults, dict) else _MISSING
        if _is_class(value):
            value = _class_without_defaults(value)
            default = (_class_without_defaults(default) if _is_class(default)
                       else {"class_path": default} if isinstance(default, str) else default)
        elif isinstance(value, dict) and isinstance(default, dict) and set(default) == set(value):
            # a group (trainer, backbone, evaluate): entry by entry. A dict-valued option whose value has
            # its default's keys is walked so too, and then reads as a value of only its changed entries would
            value = _without_defaults(value, default)
            default = {}
        elif isinstance(value, list):
            value = [_class_without_defaults(v) if _is_class(v) else v for v in value]
        if value == default and isinstance(value, bool) == isinstance(default, bool):
            continue
        out[key] = value
    return out
