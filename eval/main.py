"""`python -m eval.main --test visa`: ClipSAM on a dataset (CLIP + UMCI rough maps, SAM MMR).

Writes OUTPUT/metrics.json, table.md / table.csv, classes/, panels/<class>/ and (--save-maps)
maps/. `--demo` runs the whole protocol offline on generated data with tiny random models.
Every flag but --demo and --no-progress is a field of `clipsam_jax.config.EvalConfig` or of its
nested configs; the CLIP flags replace a trained head's own settings only where given.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from clipsam_jax import cli
from clipsam_jax.config import EvalConfig

RUNTIME_FLAGS = ("clip_attention", "cache_dir", "overlap_classes", "sam_device",
                 "sam_images_per_call", "sam_attention", "sam_compile", "few_shot_chunk")  # fmt: skip


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval.main", description=__doc__)
    parser.add_argument(
        "--demo",
        action="store_true",
        help="generated data + tiny random CLIP and SAM; the numbers are not results",
    )
    cli.add_config(parser, EvalConfig, unset=("dataset",), given_only=("clip",))
    cli.add_runtime(parser, only=RUNTIME_FLAGS)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if not args.demo and args.dataset is None:
        parser.error("--test DATASET is required (or --demo)")
    return args


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The evaluation's config from parsed flags."""
    return cli.config_from_args(EvalConfig, args)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(argv)
    if args.demo:
        from clipsam_jax.demo import BANNER, DemoConfig, run_demo

        print(BANNER)
        report = run_demo(DemoConfig(directory=args.output or "demo"), not args.no_progress)
        directory = Path(report["config"]["output"])
        print((directory / "table.md").read_text() + BANNER + f"\nresults in {directory}")
        return report
    from clipsam_jax.eval_lib import evaluate
    from clipsam_jax.parallel.mesh import initialize_distributed
    from clipsam_jax.parallel.processes import is_primary

    initialize_distributed()  # a multi-process run (python -m clipsam_jax.launch) joins here
    report = evaluate(
        config_from_args(args), runtime=cli.runtime_from_args(args), progress=not args.no_progress
    )
    if is_primary():
        print((Path(report["config"]["output"]) / "table.md").read_text())
    return report


def run() -> None:
    sys.exit(cli.run(main))


if __name__ == "__main__":
    run()
