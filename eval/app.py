"""`python -m eval.app`: a local web page to inspect images with ClipSAM.

Drop a photo of a part, type what it is, and see every stage (rough map, SAM's prompts and
masks, final map, overlay) with the image score and each stage's time; download the map and
mask. A second tab runs a folder or zip of images as `eval.predict` does. `--demo` serves tiny
random models and generated examples, with no weights. Serves 127.0.0.1 unless --host says
otherwise (see the README before using 0.0.0.0). Needs the `[app]` extra (Gradio).
Every flag but --demo is a field of `clipsam_jax.app.analyzer.AppConfig` or of its nested
configs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from clipsam_jax import cli
from eval.main import RUNTIME_FLAGS


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    from clipsam_jax.app.analyzer import AppConfig

    parser = argparse.ArgumentParser(prog="python -m eval.app", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--demo", action="store_true",
                        help="tiny random models and generated example images: no weights "
                        "needed, the maps mean nothing")  # fmt: skip
    cli.add_config(parser, AppConfig, given_only=("clip",))
    cli.add_runtime(parser, only=[f for f in RUNTIME_FLAGS if f != "overlap_classes"])
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace):
    """The app's `AppConfig` from parsed flags."""
    from clipsam_jax.app.analyzer import AppConfig

    return cli.config_from_args(AppConfig, args)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    from clipsam_jax.parallel.processes import refuse_processes

    refuse_processes("eval.app")  # several processes would each do all of it
    try:
        from clipsam_jax.app import server
    except ModuleNotFoundError as error:
        from clipsam_jax.errors import ConfigError

        raise ConfigError(f"the app needs the package {error.name!r}: install the [app] extra "
                          '(pip install -e ".[app]")') from error  # fmt: skip
    server.start(config_from_args(args), cli.runtime_from_args(args), demo=args.demo, block=True)


def run() -> None:
    sys.exit(cli.run(main))


if __name__ == "__main__":
    run()
