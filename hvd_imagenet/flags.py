"""Dataclasses as command-line flags, both ways: one `--field-name` flag per field (`add_flags`), the dataclass
from parsed flags (`from_args`), and the flags that rebuild a given instance (`to_argv`), which every launcher
that re-invokes the CLI uses (bench ranks, study runs).

A field's metadata holds its help and its bounds, checked in one place (`check`, called by each dataclass's
__post_init__), so that every command says "--name must be >= 1, not 0" the same way:
    opt("help", min=1)          >= 1          opt("help", above=0)      > 0
    opt("help", above=0, max=1) in (0, 1]     opt("help", choices=C)    one of C (each item, for a tuple field)
A nested dataclass field (TrainConfig.lr) contributes its own fields' flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import typing
from dataclasses import field

from .errors import UserError
from .recipes import RECIPES


def opt(
    help: str = "",
    default=dataclasses.MISSING,
    *,
    min=None,
    above=None,
    max=None,
    choices=None,
    default_factory=dataclasses.MISSING,
):
    """A dataclass field that is a flag: its help, its default and its bounds."""
    metadata = {"help": help, "min": min, "above": above, "max": max, "choices": choices}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def check(instance) -> None:
    """Every bound in the fields' metadata, for a dataclass instance: a UserError naming the flag."""
    for f in dataclasses.fields(instance):
        value, meta = getattr(instance, f.name), f.metadata
        if value is None or not meta:
            continue
        values, name, shown = value if isinstance(value, tuple) else (value,), flag_name(f.name), _show(value)
        choices, low, above, high = meta["choices"], meta["min"], meta["above"], meta["max"]
        wrong = [v for v in values if choices is not None and v not in choices]
        if wrong:
            raise UserError(f"{name} must be one of {', '.join(choices)}; invalid choice: {wrong[0]!r}")
        if low is not None and any(v < low for v in values):
            raise UserError(f"{name} must be >= {low}, not {shown}")
        if above is not None and high is not None and not all(above < v <= high for v in values):
            raise UserError(f"{name} must be in ({above}, {high}], not {shown}")
        if above is not None and any(v <= above for v in values):
            raise UserError(f"{name} must be > {above}, not {shown}")
        if high is not None and any(v > high for v in values):
            raise UserError(f"{name} must be <= {high}, not {shown}")


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


@functools.cache
def _types(cls) -> dict[str, type]:
    return typing.get_type_hints(cls)


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _item_type(annotation) -> type:
    """int for `int`, `int | None` and `tuple[int, ...]`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None) and a is not Ellipsis]
    return args[0] if args else annotation


def _comma_list(item_type: type):
    def parse(text: str) -> tuple:
        try:
            items = tuple(item_type(item.strip()) for item in text.split(",") if item.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {item_type.__name__} values, got {text!r}"
            ) from None
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return items

    parse.__name__ = f"{item_type.__name__} list"
    return parse


class _ExtendList(argparse.Action):
    """A tuple flag: `--x a,b` or `--x a --x b`; the first use replaces the default, later ones add."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, f"_given_{self.dest}", False)
        setattr(namespace, self.dest, (getattr(namespace, self.dest) if given else ()) + values)
        setattr(namespace, f"_given_{self.dest}", True)


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """--field-name for every field of a dataclass (nested dataclasses' fields too)."""
    for f in dataclasses.fields(cls):
        annotation = _types(cls)[f.name]
        if dataclasses.is_dataclass(annotation):
            add_flags(parser, annotation)
            continue
        default = _default(f)
        help_text = f.metadata.get("help", "")
        kwargs = {"default": default}
        if default is dataclasses.MISSING:
            kwargs = {"required": True}
        elif help_text is not argparse.SUPPRESS and annotation is not bool:  # BooleanOptionalAction adds its own
            shown = _show(default) if isinstance(default, tuple) else "%(default)s"
            help_text += f" (default: {shown})"
        choices = f.metadata.get("choices")
        named = "{" + ",".join(choices) + "}" if isinstance(choices, tuple) else None  # shown in --help
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is tuple:
            item = _item_type(annotation)
            kwargs.update(
                type=_comma_list(item), metavar=f"{named or ('N' if item is int else 'A')},...", action=_ExtendList
            )
        else:
            kwargs.update(type=_item_type(annotation), metavar=named)
        parser.add_argument(flag_name(f.name), help=help_text, **kwargs)


def from_args(cls, args: argparse.Namespace):
    """The dataclass from parsed flags; its __post_init__ checks the bounds."""
    values = {}
    for f in dataclasses.fields(cls):
        annotation = _types(cls)[f.name]
        values[f.name] = from_args(annotation, args) if dataclasses.is_dataclass(annotation) else getattr(args, f.name)
    return cls(**values)


def field_defaults(cls) -> dict:
    """Every field's default by name, nested dataclasses' fields too (as their flags are)."""
    found = {}
    for f in dataclasses.fields(cls):
        annotation = _types(cls)[f.name]
        found.update(field_defaults(annotation) if dataclasses.is_dataclass(annotation) else {f.name: _default(f)})
    return found


def to_argv(instance, names: tuple[str, ...] | None = None, recipe: dict | None = None) -> list[str]:
    """The flags that rebuild `instance` through add_flags/from_args: the fields that differ from their
    defaults, which its --recipe sets (a readable command line), or exactly the fields `names` (nested
    dataclasses' fields too)."""
    if recipe is None:
        recipe = RECIPES.get(getattr(instance, "recipe", None), {})
    argv = []
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            argv += to_argv(value, names, recipe)
            continue
        wanted = f.name in names if names is not None else value != recipe.get(f.name, _default(f))
        if not wanted or value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag_name(f.name) if value else "--no-" + flag_name(f.name)[2:])
        else:
            argv += [flag_name(f.name), _show(value) if isinstance(value, tuple) else repr_flag(value)]
    return argv


def repr_flag(value) -> str:
    """A value as a flag's text that parses back to the same value (floats exactly)."""
    return repr(value) if isinstance(value, float) else str(value)


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand, defined in the module whose code it drives; cli.py only assembles them."""

    options: type  # a dataclass: its fields are the flags
    run: typing.Callable  # run(options) -> exit status or None (0)
    description: str = ""
    epilog: typing.Callable[[], str] | None = None  # text after the flags in --help, as written
