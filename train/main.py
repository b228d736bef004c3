"""`python -m train.main --train mvtec`: train the UMCI head on a dataset's test split.

Resumes from the last checkpoint in --workdir. See README "Train" and docs/method.md §3.
Every flag is a field of `clipsam_jax.config.TrainConfig` or of its nested configs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from clipsam_jax import cli
from clipsam_jax.config import TrainConfig
from clipsam_jax.train_lib import train


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.main", description=__doc__)
    cli.add_config(parser, TrainConfig, required=("dataset",))
    cli.add_runtime(parser, only=("clip_attention", "cache_dir"))
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config from parsed flags."""
    return cli.config_from_args(TrainConfig, args)


def main(argv: Sequence[str] | None = None):
    args = parse(argv)
    from clipsam_jax.parallel.mesh import initialize_distributed

    initialize_distributed()  # a multi-process run (python -m clipsam_jax.launch) joins here
    summary = train(
        config_from_args(args), runtime=cli.runtime_from_args(args), progress=not args.no_progress
    )
    print(f"trained {summary.step} steps in {summary.workdir} (last loss {summary.last_loss})")
    return summary


def run() -> None:
    sys.exit(cli.run(main))


if __name__ == "__main__":
    run()
