"""Command-line flags generated from config dataclasses: one source of truth.

Every field becomes `--field-name` with the field's type and default; booleans become
`--flag/--no-flag`; a field's `metadata["help"]` is its help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(the scalar type, whether None is allowed) for annotations like `int | None`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, title: str | None = None) -> None:
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, optional = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                               help=help_text)
        elif typing.get_origin(kind) is tuple:
            inner = typing.get_args(kind)[0]
            group.add_argument(flag, dest=f.name, type=inner, nargs="*", default=default,
                               help=f"{help_text} (default: {' '.join(map(str, default)) or 'none'})")
        else:
            converter = _optional(kind) if optional else kind
            choices = f.metadata.get("choices")
            group.add_argument(flag, dest=f.name, type=converter, default=default, choices=choices,
                               help=f"{help_text} (default: {default})")


def _optional(kind: type):
    def convert(text: str):
        return None if text.lower() in ("none", "") else kind(text)
    convert.__name__ = kind.__name__
    return convert


def dataclass_from_args(cls: type, namespace: argparse.Namespace):
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)}
    for k, v in values.items():
        if isinstance(v, list):
            values[k] = tuple(v)
    return cls(**values)


class OneLineErrorParser(argparse.ArgumentParser):
    """A flag argparse cannot parse (unknown flag, bad type or choice) ends like any other bad
    input: one line on stderr, exit code 2; argparse's default also prints the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_configs(argv: list[str] | None, prog: str, description: str, groups: dict[str, type],
                  defaults: dict[str, Any]) -> list[Any]:
    """Parse `argv` into one instance per dataclass in `groups` (title -> class), with
    `defaults` overriding the classes' own field defaults."""
    parser = OneLineErrorParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for title, cls in groups.items():
        add_dataclass_arguments(parser, cls, title)
    parser.set_defaults(**defaults)
    ns = parser.parse_args(argv)
    return [dataclass_from_args(cls, ns) for cls in groups.values()]
