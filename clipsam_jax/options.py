"""Config fields that carry their own command-line face, and the argparse bridge built from them.

An option is one dataclass field made by `option(...)` (default, help, choices, valid range).
`add_options` makes flags of them, `from_args` builds the config from the parsed flags, and
`check` validates a config built in code as the flags validate what a user types.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from clipsam_jax.errors import ConfigError

_NO_DEFAULT = dataclasses.MISSING


def option(default: Any = _NO_DEFAULT, help: str = "", *, flag: str | None = None,
           choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None,
           minimum: float | None = None, maximum: float | None = None, odd: bool = False,
           inverted: bool = False, cli: bool = True) -> Any:  # fmt: skip
    """A dataclass field with its flag: `flag` (default `--field-name`), `help`, `choices`
    (default: the field's `Literal` values; a callable is read when the flags are made), the
    valid range [`minimum`, `maximum`], `odd`; `inverted` for a bool whose flag turns it off
    (`--no-feature-cache` for `feature_cache=True`); `cli=False` for a field without a flag."""
    metadata = dict(help=help, flag=flag, choices=choices, minimum=minimum, maximum=maximum,
                    odd=odd, inverted=inverted, cli=cli)  # fmt: skip
    if default is _NO_DEFAULT:
        return dataclasses.field(metadata=metadata)
    if dataclasses.is_dataclass(default) or isinstance(default, (list, dict, set)):
        raise TypeError("use dataclasses.field(default_factory=...) for mutable defaults")
    return dataclasses.field(default=default, metadata=metadata)


class _Spec(typing.NamedTuple):
    name: str  # the field's name
    flag: str  # --flag-name
    kind: type  # int, float, str or bool (of the items, for tuples)
    is_tuple: bool
    optional: bool  # None allowed
    choices: tuple | None
    meta: dict


def _unwrap(annotation) -> tuple[Any, bool]:
    """(annotation without None, whether None is allowed)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return inner, True
    return annotation, False


def _spec(cls: type, f: dataclasses.Field) -> _Spec:
    annotation, optional = _unwrap(typing.get_type_hints(cls)[f.name])
    is_tuple = typing.get_origin(annotation) is tuple
    if is_tuple:
        annotation = typing.get_args(annotation)[0]
    choices = f.metadata.get("choices")
    if callable(choices):  # a registry's names, read when the flags are made
        choices = choices()
    kind = annotation
    if typing.get_origin(annotation) is Literal:
        literal = typing.get_args(annotation)
        choices, kind = tuple(choices or literal), type(literal[0])
    flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
    return _Spec(f.name, flag, kind, is_tuple, optional,
                 None if choices is None else tuple(choices), dict(f.metadata))  # fmt: skip


def specs(cls: type) -> list[_Spec]:
    """The option specs of `cls`'s own (non-nested) fields declared with `option`."""
    return [_spec(cls, f) for f in dataclasses.fields(cls) if "help" in f.metadata]


def _problem(spec: _Spec, value: Any) -> str | None:
    """Why `value` is not valid for the option, or None."""
    if value is None:
        return None if spec.optional else "must be given"
    meta = spec.meta
    for item in value if spec.is_tuple else (value,):
        if spec.choices is not None and item not in spec.choices:
            return f"must be one of {', '.join(map(str, spec.choices))}, got {item!r}"
        if meta["minimum"] is not None and item < meta["minimum"]:
            return f"must be >= {meta['minimum']}, got {item}"
        if meta["maximum"] is not None and item > meta["maximum"]:
            return f"must be <= {meta['maximum']}, got {item}"
        if meta["odd"] and item % 2 == 0:
            return f"must be odd, got {item}"
    return None


def _parse_value(spec: _Spec) -> Callable[[str], Any]:
    """argparse `type=` for the option: conversion plus its range check."""

    def convert(text: str) -> Any:
        try:
            if spec.is_tuple:
                value = tuple(spec.kind(v.strip()) for v in text.split(",") if v.strip())
            else:
                value = spec.kind(text)
        except ValueError as error:
            noun = {int: "integer", float: "number"}.get(spec.kind, spec.kind.__name__)
            article = "an" if noun[0] in "aeiou" else "a"
            what = f"comma-separated {noun}s" if spec.is_tuple else f"{article} {noun}"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from error
        problem = _problem(spec, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    convert.__name__ = spec.kind.__name__  # argparse names the type in its messages
    return convert


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    prefix: str = "",
    only: Iterable[str] | None = None,
    required: Iterable[str] = (),
    unset: Iterable[str] = (),
    given_only: bool = False,
) -> None:
    """Add a flag for each option of `cls` (all, or those named in `only`, in that order).

    The flags store under `prefix + field name`. `required`: fields whose flag must be given.
    `unset`: fields whose flag defaults to None (the caller decides whether they are needed).
    `given_only`: flags left out are absent from the namespace instead of holding the default
    (for settings that replace another source's only where given, see `given`)."""
    table = {s.name: s for s in specs(cls)}
    names = list(only) if only is not None else list(table)
    for name in names:
        spec = table[name]
        if not spec.meta["cli"]:
            continue
        default = next(f for f in dataclasses.fields(cls) if f.name == name).default
        kwargs: dict[str, Any] = dict(dest=prefix + name, help=spec.meta["help"],
                                      default=argparse.SUPPRESS if given_only else default)  # fmt: skip
        if spec.kind is bool and not spec.is_tuple:
            kwargs["action"] = "store_false" if spec.meta["inverted"] else "store_true"
        else:
            kwargs["type"] = _parse_value(spec)
            if spec.choices is not None and not spec.is_tuple:
                kwargs["choices"] = spec.choices
            if spec.choices is None or spec.is_tuple:
                kwargs["metavar"] = spec.flag.lstrip("-").upper().replace("-", "_")
                kwargs["metavar"] += ",..." if spec.is_tuple else ""
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            if default in (None, dataclasses.MISSING) or name in unset:
                pass  # nothing to show
            elif given_only:
                kwargs["help"] += f" (default: a trained head's own; {shown} without one)"
            elif "(default" not in spec.meta["help"]:
                kwargs["help"] += f" (default: {shown})"
            if name in required:
                kwargs["required"] = True
            elif name in unset:
                kwargs["default"] = None
        parser.add_argument(spec.flag, **kwargs)


def given(cls: type, args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """{field: value} of the options of `cls` whose flags were given (see `given_only`)."""
    values = vars(args)
    return {s.name: values[prefix + s.name] for s in specs(cls) if prefix + s.name in values}


def from_args(cls: type, args: argparse.Namespace, prefix: str = "", **fields: Any) -> Any:
    """`cls` from the parsed flags of its options (those absent keep their defaults), plus
    `fields` (nested configs, or fields without a flag)."""
    return cls(**given(cls, args, prefix), **fields)


def check(config: Any, path: str = "") -> None:
    """Raise `ConfigError` naming the flag (and field) of the first invalid option of `config`
    or of its nested configs: the same rules the flags apply to what a user types."""
    cls = type(config)
    for spec in specs(cls):
        problem = _problem(spec, getattr(config, spec.name))
        if problem:
            where = spec.flag if spec.meta["cli"] else f"{path}{spec.name}"
            raise ConfigError(f"{where}: {problem}")
    for f in dataclasses.fields(cls):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            check(value, f"{path}{f.name}.")


def to_argv(
    config: Any, names: Iterable[str] | None = None, always: Iterable[str] = ()
) -> list[str]:
    """The flags that rebuild `config`'s own options from the command line (the inverse of
    `from_args`): those whose value differs from the default, or named in `always`;
    `names` limits them to those fields. A value no flag can express raises `ValueError`."""
    cls, always = type(config), set(always)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    argv = []
    for spec in specs(cls):
        value, default = getattr(config, spec.name), defaults[spec.name]
        wanted = names is None or spec.name in names
        if not spec.meta["cli"] or not wanted or (value == default and spec.name not in always):
            continue
        if spec.kind is bool and not spec.is_tuple:
            argv += [spec.flag] if value != default else []  # the flag flips the default
        elif value is None:
            raise ValueError(f"{cls.__name__}.{spec.name}: no flag sets None")
        else:
            argv += [spec.flag, ",".join(map(str, value)) if spec.is_tuple else str(value)]
    return argv
