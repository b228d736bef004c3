"""`python -m eval.main --test visa`: ClipSAM on a dataset (CLIP + UMCI rough maps, SAM MMR).

Writes OUTPUT/metrics.json, table.md / table.csv, panels/ and (--save-maps) maps/. `--demo`
runs the whole protocol offline on generated data with tiny random models. SPEC §4, §5, §7.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from clipsam_jax import cli
from clipsam_jax.config import DATASETS, ClipConfig, EvalConfig


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval.main", description=__doc__)
    add = parser.add_argument
    add(
        "--demo",
        action="store_true",
        help="generated data + tiny random CLIP and SAM; the numbers are not results",
    )
    add("--test", choices=DATASETS, help="dataset to evaluate (its protocol split)")
    add("--data-root", default=None, help="dataset folder (default data/<dataset>)")
    add(
        "--checkpoint",
        default=None,
        help="training workdir of the head (default runs/<the other dataset>)",
    )
    add("--output", default=None, help="results folder (default results/<dataset>)")
    add("--classes", default=None, help="comma-separated subset of classes")
    cli.add_clip_flags(parser, from_checkpoint=True)
    add("--batch-size", type=int, default=8)
    add(
        "--no-umci",
        action="store_true",
        help="zero-shot similarity map instead of a trained head (Table 2), MMR still on",
    )
    cli.add_refine_flags(parser)
    add(
        "--pro",
        choices=("mvtec", "cflow"),
        default="mvtec",
        help="PRO definition (cflow = APRIL-GAN/AnomalyCLIP's cal_pro_score)",
    )
    add(
        "--metrics",
        choices=("exact", "streaming"),
        default="exact",
        help="streaming: binned APPROXIMATE pixel metrics in constant memory (huge sets)",
    )
    add(
        "--overlap-classes",
        choices=("auto", "on", "off"),
        default="auto",
        help="score a class while the next one's maps are made (auto: on accelerators; "
        "memory: two classes' maps)",
    )
    add("--save-maps", action="store_true", help="write maps/<class>.npz")
    add("--panels", type=int, default=4, help="visualized images per class")
    add("--seed", type=int, default=0)
    add("--no-progress", action="store_true")
    args = parser.parse_args(argv)  # fmt: skip
    if not args.demo and args.test is None:
        parser.error("--test DATASET is required (or --demo)")
    return args


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

    overrides = cli.clip_overrides(args)
    config = EvalConfig(
        dataset=args.test, data_root=args.data_root, checkpoint=args.checkpoint,
        output=args.output, no_umci=args.no_umci, pro_mode=args.pro, save_maps=args.save_maps,
        metrics=args.metrics, overlap_classes=args.overlap_classes,
        visualize_per_class=args.panels, batch_size=args.batch_size, seed=args.seed,
        classes=tuple(c for c in args.classes.split(",") if c) if args.classes else None,
        clip=dataclasses.replace(ClipConfig(), **overrides), refine=cli.refine_config(args),
    )  # fmt: skip
    report = evaluate(config, progress=not args.no_progress, clip_overrides=overrides)
    print((Path(report["config"]["output"]) / "table.md").read_text())
    return report


def run() -> None:
    sys.exit(cli.run(main))


if __name__ == "__main__":
    run()
