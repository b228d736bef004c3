"""Flags shared by the command-line entry points and the wrapper that runs them.

The entry points (`train/main.py`, `eval/main.py`, `eval/predict.py`) only parse flags, build
a config and call a library function; user errors (`ClipSamError`) print one clear message and
exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from clipsam_jax.config import DATASETS, DEFAULT_CLIP, ClipConfig, RefineConfig
from clipsam_jax.errors import ClipSamError


def int_tuple(text: str) -> tuple[int, ...]:
    """ "3,9" → (3, 9)."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from error


def add_clip_flags(parser: argparse.ArgumentParser, from_checkpoint: bool = False) -> None:
    """CLIP flags. With `from_checkpoint`, they default to None: a trained head's own CLIP
    settings apply, and only the flags actually given replace them (`clip_overrides`)."""
    group = parser.add_argument_group("CLIP backbone (SPEC §1)")
    group.add_argument(
        "--clip",
        default=DEFAULT_CLIP,
        help="hub id or local directory of a CLIP checkpoint (PyTorch or Flax)",
    )
    group.add_argument(
        "--image-size",
        type=int,
        default=518,
        help="input size S, a multiple of 14 (518: APRIL-GAN protocol; 336 native)",
    )
    group.add_argument(
        "--feature-layers",
        type=int_tuple,
        default=None,
        help="encoder layers feeding the head (default: quarters, 6,12,18,24)",
    )
    group.add_argument("--templates", choices=("clipsam29", "aprilgan35"), default="clipsam29")
    group.add_argument(
        "--object-name",
        choices=("as_written", "spaced", "object"),
        default="as_written",
        help="object word in the prompts",
    )
    group.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="CLIP compute dtype (auto: bf16 on accelerators, fp32 on CPU)",
    )
    group.add_argument("--cache-dir", default=None,
                       help="cache of converted CLIP params and text features")  # fmt: skip
    if from_checkpoint:
        parser.set_defaults(clip=None, image_size=None, templates=None, object_name=None,
                            dtype=None)  # fmt: skip


def clip_overrides(args: argparse.Namespace) -> dict:
    """The CLIP settings given on the command line (flags left at None are absent)."""
    given = {"model": args.clip, "image_size": args.image_size, "cache_dir": args.cache_dir,
             "feature_layers": args.feature_layers, "templates": args.templates,
             "object_name": args.object_name, "dtype": args.dtype}  # fmt: skip
    return {k: v for k, v in given.items() if v is not None}


def add_refine_flags(parser: argparse.ArgumentParser) -> None:
    refine = parser.add_argument_group("MMR / SAM (SPEC §4)")
    refine.add_argument(
        "--sam",
        choices=("vit_h", "vit_l", "vit_b", "tiny-random", "none"),
        default="vit_h",
        help="SAM variant; none = rough maps only",
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
    refine.add_argument("--fusion-norm", choices=("max", "minmax", "none"), default="max")  # fmt: skip


def refine_config(args: argparse.Namespace) -> RefineConfig:
    return RefineConfig(
        sam=args.sam, sam_checkpoint=args.sam_checkpoint, download_sam=args.download_sam,
        threshold=args.threshold, points=args.points, point_sampling=args.point_sampling,
        fusion_norm=args.fusion_norm, device=args.sam_device,
    )  # fmt: skip


def clip_config(args: argparse.Namespace) -> ClipConfig:
    return ClipConfig(
        model=args.clip, image_size=args.image_size, feature_layers=args.feature_layers,
        templates=args.templates, object_name=args.object_name, dtype=args.dtype,
        cache_dir=args.cache_dir,
    )  # fmt: skip


def add_dataset_flag(parser: argparse.ArgumentParser, name: str, help_text: str) -> None:
    parser.add_argument(name, choices=DATASETS, help=help_text)
    parser.add_argument("--data-root", default=None, help="dataset folder (default data/<dataset>)")


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run an entry point: configure logging, turn `ClipSamError` into a message + status 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save at INFO
    try:
        main(argv)
    except ClipSamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
