"""Command-line flags generated from config dataclasses: one source of truth.

Every field of a stage's configs becomes `--field-name` with the field's type, its
`metadata["help"]` and `metadata["choices"]`, and as default the value in the default instance
the stage passes (so `--help` shows what a run uses); booleans become `--flag/--no-flag`.
A field that holds a model config (e.g. the stage's `adapter: AdapterConfig`) contributes the
fields its `metadata["only"]` names, under the flag names its `metadata["flags"]` gives
(`layer` -> `--adapter-layer`); the parsed values replace those fields of the nested config.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import OneLineErrorParser
from .run_folder import check_keeps_inputs_and_data, check_run_paths
from .setup import RunConfig


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(the scalar type, whether None is allowed) for annotations like `int | None`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


@dataclasses.dataclass(frozen=True)
class Flag:
    path: tuple[str, ...]  # field names from the top config down, e.g. ("adapter", "layer")
    name: str  # the flag without dashes, also the argparse dest: "adapter_layer"
    kind: type
    optional: bool
    help: str
    choices: tuple | None


def config_flags(cls: type, prefix: tuple[str, ...] = (), names: dict[str, str] | None = None,
                 only: tuple[str, ...] | None = None) -> Iterator[Flag]:
    """The flags of a config dataclass, nested model configs flattened into them."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        kind, optional = _base_type(hints[f.name])
        if dataclasses.is_dataclass(kind):
            yield from config_flags(kind, (*prefix, f.name), f.metadata.get("flags", {}), f.metadata.get("only"))
            continue
        choices = f.metadata.get("choices")
        yield Flag((*prefix, f.name), (names or {}).get(f.name, f.name), kind, optional, f.metadata.get("help", ""),
                   tuple(choices) if choices else None)


def _get(config: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        config = getattr(config, name)
    return config


def _replace(config: Any, changes: dict[tuple[str, ...], Any]) -> Any:
    """`config` with each field at a path set to its value, nested frozen configs rebuilt; each
    config is built once, so validation never sees a half-applied set of changes."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[tuple[str, ...], Any]] = {}
    for (head, *rest), value in changes.items():
        if rest:
            nested.setdefault(head, {})[tuple(rest)] = value
        else:
            top[head] = value
    top.update({head: _replace(getattr(config, head), sub) for head, sub in nested.items()})
    return dataclasses.replace(config, **top) if top else config


def _optional(kind: type):
    def convert(text: str):
        if not text.strip():  # an unset shell variable (--resume "$CKPT") must not mean "unset" silently
            raise argparse.ArgumentTypeError(f"empty ({text!r}; an unset shell variable?): give a value, or none "
                                             "for the default")
        return None if text.lower() == "none" else kind(text)
    convert.__name__ = kind.__name__
    return convert


def _with_default(text: str, default: str) -> str:
    """Help text ending in its default, unless the text already says what the default is."""
    return text if "(default:" in text else f"{text} (default: {default})"


def _add(group, flag: Flag, default: Any) -> None:
    option = "--" + flag.name.replace("_", "-")
    if flag.kind is bool:
        group.add_argument(option, dest=flag.name, action=argparse.BooleanOptionalAction, default=default,
                           help=_with_default(flag.help, str(default)))
    elif typing.get_origin(flag.kind) is tuple:
        group.add_argument(option, dest=flag.name, type=typing.get_args(flag.kind)[0], nargs="*", default=default,
                           help=_with_default(flag.help, " ".join(map(str, default)) or "none"))
    else:
        group.add_argument(option, dest=flag.name, type=_optional(flag.kind) if flag.optional else flag.kind,
                           default=default, choices=flag.choices, help=_with_default(flag.help, str(default)))


def parse_configs(argv: list[str] | None, prog: str, description: str, defaults: dict[str, Any],
                  extra: Callable[[argparse.ArgumentParser], None] | None = None) -> list[Any]:
    """Parse `argv` into one config per entry of `defaults` (group title -> default instance):
    each is its default with the flags given replaced. `extra` may add flags the stage handles
    itself (they are parsed and ignored here). A RunConfig's output folder and --resume are
    checked here, before any work (run_folder.check_run_paths), and so is a stage's saved model
    replacing one it reads, or its run folder holding its data (run_folder.check_keeps_inputs_and_data)."""
    parser = OneLineErrorParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    flags = {}
    for title, config in defaults.items():
        group = parser.add_argument_group(title)
        flags[title] = list(config_flags(type(config)))
        for flag in flags[title]:
            _add(group, flag, _get(config, flag.path))
    if extra is not None:
        extra(parser)
    ns = parser.parse_args(argv)
    configs = []
    for title, config in defaults.items():
        changes = {}
        for flag in flags[title]:
            value = getattr(ns, flag.name)
            value = tuple(value) if isinstance(value, list) else value
            if value != _get(config, flag.path):
                changes[flag.path] = value
        configs.append(_replace(config, changes))
    for config in configs:
        if isinstance(config, RunConfig):
            check_run_paths(config)
            for stage in configs:
                check_keeps_inputs_and_data(config.output_dir, stage)
    return configs
