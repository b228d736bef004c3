"""The entry points' flags, derived from the config classes, and the wrapper that runs them.

The entry points only parse flags, build a config and call a library function; user errors
(`ClipSamError`) print one clear message and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from clipsam_jax import options
from clipsam_jax.config import RuntimeConfig
from clipsam_jax.errors import ClipSamError


def add_config(parser: argparse.ArgumentParser, cls: type, *, required: Sequence[str] = (),
               unset: Sequence[str] = (), given_only: Sequence[str] = ()) -> None:  # fmt: skip
    """The flags of config class `cls` and of its nested configs (one argument group each,
    stored under "<field>." prefixes). `given_only`: nested configs whose flags replace
    another source's values only where given (a trained head's CLIP settings)."""
    options.add_options(parser, cls, required=required, unset=unset)
    for f in dataclasses.fields(cls):
        if not dataclasses.is_dataclass(f.default_factory):
            continue
        nested = f.default_factory
        title = (nested.__doc__ or nested.__name__).strip().splitlines()[0].rstrip(".")
        group = parser.add_argument_group(title)
        options.add_options(group, nested, prefix=f"{f.name}.", given_only=f.name in given_only)


def config_from_args(cls: type, args: argparse.Namespace, **fields) -> Any:
    """`cls` from flags added by `add_config`; `fields` replace or complete them. A nested
    config's fields given on the command line are also listed in `<name>_given` when `cls`
    has such a field (see `config.resolve_clip`)."""
    for f in dataclasses.fields(cls):
        if f.name in fields or not dataclasses.is_dataclass(f.default_factory):
            continue
        values = options.given(f.default_factory, args, f"{f.name}.")
        fields[f.name] = f.default_factory(**values)
        if f"{f.name}_given" in {g.name for g in dataclasses.fields(cls)}:
            fields[f"{f.name}_given"] = tuple(values)
    return options.from_args(cls, args, **fields)


def config_argv(config: Any, always: Sequence[str] = ()) -> list[str]:
    """The flags of `add_config` that rebuild `config` (fields away from their defaults, and
    those in `always`). A nested config with a `<name>_given` field gives only those fields,
    as `config_from_args` reads them back."""
    argv = options.to_argv(config, always=always)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            names = getattr(config, f"{f.name}_given", None)
            argv += options.to_argv(value, names=names)
    return argv


def add_runtime(parser: argparse.ArgumentParser, only: Sequence[str]) -> None:
    """The flags of the `RuntimeConfig` fields named in `only` (speed and placement only)."""
    group = parser.add_argument_group("runtime (speed and placement only: the same results)")
    options.add_options(group, RuntimeConfig, prefix="runtime.", only=only)


def runtime_from_args(args: argparse.Namespace) -> RuntimeConfig:
    """The `RuntimeConfig` of the flags added by `add_runtime` (defaults for the others)."""
    return options.from_args(RuntimeConfig, args, "runtime.")


# Library loggers whose INFO lines mean nothing to a user: orbax (through absl) logs every save,
# JAX logs its search for a TPU on every start.
QUIET_LOGGERS = ("absl", "jax._src.xla_bridge")


def setup_logging() -> None:
    """Our INFO lines on the console. Importing orbax already gives the root logger a console
    handler at level WARNING, which leaves `basicConfig` without effect and our lines unshown:
    the level is set here and that handler (or a new one) gets our format."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    consoles = [h for h in root.handlers if type(h) is logging.StreamHandler]
    if not consoles:
        consoles = [logging.StreamHandler()]
        root.addHandler(consoles[0])
    for handler in consoles:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def run(
    main: Callable[[Sequence[str] | None], object],
    argv: Sequence[str] | None = None,
    configure_logging: bool = True,
) -> int:
    """Run an entry point: configure logging (unless told not to), turn `ClipSamError` into a
    message + status 2 and Ctrl-C into status 130."""
    if configure_logging:
        setup_logging()
    try:
        main(argv)
    except ClipSamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
