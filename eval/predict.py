"""`python -m eval.predict IMAGE_OR_DIR --class-name bottle --checkpoint runs/visa --output out`

Anomaly maps of any images with a trained head (or `--no-umci`) and SAM refinement. Per image:
`<name>_map.png` (16-bit, value = pixel / 65535, at the original resolution; `--map-format npy`
for float32), `<name>_mask.png`, `<name>_overlay.png`, `<name>_result.json`; plus
predictions.csv / predictions.json. Details: `clipsam_jax/predict_lib.py`. SPEC §4, §7.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from clipsam_jax import cli
from clipsam_jax.config import ClipConfig


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("inputs", metavar="IMAGE_OR_DIR", help="an image file or a folder")
    parser.add_argument("--class-name", default=None,
                        help="object name for the prompts (default: 'object', Appendix A)")  # fmt: skip
    parser.add_argument("--checkpoint", default=None, help="training workdir of the head")
    parser.add_argument("--output", required=True, help="folder for the results")
    parser.add_argument("--recursive", action="store_true", help="also scan sub-folders")
    parser.add_argument("--map-format", choices=("png", "npy"), default="png",
                        help="png: 16-bit, value = pixel / 65535; npy: float32")  # fmt: skip
    parser.add_argument("--mask-threshold", type=float, default=None,
                        help="binary mask threshold (default: --threshold)")  # fmt: skip
    cli.add_clip_flags(parser, from_checkpoint=True)
    parser.add_argument("--no-umci", action="store_true", help="zero-shot map, no trained head")
    cli.add_refine_flags(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(argv)
    overrides = cli.clip_overrides(args)
    from clipsam_jax.predict_lib import PredictConfig, predict

    config = PredictConfig(
        inputs=args.inputs, output=args.output, class_name=args.class_name,
        checkpoint=args.checkpoint, no_umci=args.no_umci, recursive=args.recursive,
        map_format=args.map_format, mask_threshold=args.mask_threshold,
        batch_size=args.batch_size, seed=args.seed,
        clip=dataclasses.replace(ClipConfig(), **overrides),
        refine=cli.refine_config(args),
    )  # fmt: skip
    report = predict(config, progress=not args.no_progress, clip_overrides=overrides)
    skipped = (
        f", {len(report['skipped'])} skipped (see predictions.csv)" if report["skipped"] else ""
    )
    print(f"{report['images']} images → {report['output']}{skipped}")
    return report


def run() -> None:
    sys.exit(cli.run(main))


if __name__ == "__main__":
    run()
