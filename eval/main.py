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
from clipsam_jax.config import ClipConfig, EvalConfig, RefineConfig


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval.main", description=__doc__)
    parser.add_argument(
        "--demo",
        action="store_true",
        help="generated data + tiny random CLIP and SAM; numbers are not results",
    )
    parser.add_argument("--test", choices=("mvtec", "visa", "mtd", "ksdd2", "meta"))
    parser.add_argument("--data-root", default=None, help="dataset folder (default data/<dataset>)")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="training workdir of the head (default runs/<other dataset>)",
    )
    parser.add_argument("--output", default=None, help="results folder (default results/<dataset>)")
    parser.add_argument("--classes", default=None, help="comma-separated subset of classes")
    cli.add_clip_flags(parser)
    parser.set_defaults(clip=None, image_size=None)  # None: the checkpoint's own settings
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--no-umci",
        action="store_true",
        help="zero-shot similarity map instead of a trained head (Table 2)",
    )
    refine = parser.add_argument_group("MMR / SAM (SPEC §4)")
    refine.add_argument(
        "--sam", choices=("vit_h", "vit_l", "vit_b", "tiny-random", "none"), default="vit_h"
    )
    refine.add_argument("--sam-checkpoint", default=None, help="e.g. sam_vit_h_4b8939.pth")
    refine.add_argument(
        "--download-sam",
        action="store_true",
        help="fetch the official SAM checkpoint (hash prefix verified)",
    )
    refine.add_argument("--sam-device", default="auto", help="torch device for SAM")
    refine.add_argument("--threshold", type=float, default=0.47, help="binarization (Table 3)")
    refine.add_argument("--points", type=int, default=5, help="m random points per image")
    refine.add_argument("--point-sampling", choices=("shared", "per_component"), default="shared")
    refine.add_argument("--fusion-norm", choices=("max", "minmax", "none"), default="max")
    parser.add_argument(
        "--pro",
        choices=("mvtec", "cflow"),
        default="mvtec",
        help="PRO definition (cflow = APRIL-GAN/AnomalyCLIP's cal_pro_score)",
    )
    parser.add_argument("--save-maps", action="store_true", help="write maps/<class>.npz")
    parser.add_argument("--panels", type=int, default=4, help="visualized images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)  # fmt: skip
    if not args.demo and args.test is None:
        parser.error("--test DATASET is required (or --demo)")
    return args


def main(argv: Sequence[str] | None = None):
    args = parse(argv)
    if args.demo:
        from clipsam_jax.demo import BANNER, DemoConfig, run_demo

        print(BANNER)
        report = run_demo(DemoConfig(directory=args.output or "demo"), not args.no_progress)
        directory = Path(report["config"]["output"])
        print((directory / "table.md").read_text() + BANNER + f"\nresults in {directory}")
        return report
    defaults = ClipConfig()
    clip = dataclasses.replace(cli.clip_config(args), model=args.clip or defaults.model,
                               image_size=args.image_size or defaults.image_size)  # fmt: skip
    config = EvalConfig(
        dataset=args.test, data_root=args.data_root, checkpoint=args.checkpoint,
        output=args.output, no_umci=args.no_umci, pro_mode=args.pro, save_maps=args.save_maps,
        visualize_per_class=args.panels, batch_size=args.batch_size, seed=args.seed, clip=clip,
        classes=tuple(c for c in args.classes.split(",") if c) if args.classes else None,
        refine=RefineConfig(sam=args.sam, sam_checkpoint=args.sam_checkpoint,
                            download_sam=args.download_sam, threshold=args.threshold,
                            points=args.points, point_sampling=args.point_sampling,
                            fusion_norm=args.fusion_norm, device=args.sam_device),
    )  # fmt: skip
    from clipsam_jax.eval_lib import evaluate

    overrides = {k: v for k, v in (("model", args.clip), ("image_size", args.image_size)) if v}
    report = evaluate(config, progress=not args.no_progress, clip_overrides=overrides)
    print((Path(report["config"]["output"]) / "table.md").read_text())
    return report


def run() -> None:
    sys.exit(cli.run(main))


if __name__ == "__main__":
    run()
