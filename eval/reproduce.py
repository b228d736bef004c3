"""`python -m eval.reproduce`: the paper's Tables 1-4 and its open choices, beside its numbers.

Trains and evaluates every cell of the plan (each distinct training and evaluation once, CLIP
features once per dataset and size), then writes OUTPUT/report.md, report.json and figures/.
Rerunning skips finished cells; a failed cell is recorded and the others still run. `--plan`
prints the cells and a time estimate; `--demo` runs it all on generated data with tiny models.
Every other flag is a field of `clipsam_jax.reproduce.plan.ReproduceConfig` or a runtime one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from clipsam_jax import cli, options
from clipsam_jax.reproduce.plan import ReproduceConfig
from eval.main import RUNTIME_FLAGS


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval.reproduce", description=__doc__)
    parser.add_argument("--plan", action="store_true",
                        help="print every cell, what it trains and evaluates, and an estimate "
                        "of the time on this machine; run nothing")  # fmt: skip
    parser.add_argument("--demo", action="store_true",
                        help="the whole plan on generated data with tiny random models "
                        "(minutes on 2 CPU cores); the numbers are not results")  # fmt: skip
    options.add_options(parser, ReproduceConfig)
    cli.add_runtime(parser, only=(*RUNTIME_FLAGS, "compilation_cache"))
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(argv)
    from clipsam_jax.parallel.processes import refuse_processes

    refuse_processes("eval.reproduce")  # several processes would each do all of it
    settings = options.from_args(ReproduceConfig, args)
    runtime = cli.runtime_from_args(args)
    if args.demo:
        from clipsam_jax.reproduce.demo import prepare
        from clipsam_jax.reproduce.report import DEMO_NOTE

        print(DEMO_NOTE)
        settings, runtime = prepare(settings, runtime)
    from clipsam_jax.reproduce.run import reproduce

    report = reproduce(settings, runtime=runtime, plan_only=args.plan, demo=args.demo,
                       progress=not args.no_progress)  # fmt: skip
    if not args.plan:
        output = Path(settings.output)
        print((output / "report.md").read_text())
        print(f"report: {output / 'report.md'}, figures in {output / 'figures'}")
    return report


def run() -> None:
    sys.exit(cli.run(main))


if __name__ == "__main__":
    run()
