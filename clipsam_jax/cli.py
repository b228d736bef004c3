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
    add = group.add_argument
    add(
        "--clip",
        default=DEFAULT_CLIP,
        help="hub id or local directory of a CLIP checkpoint (PyTorch or Flax)",
    )
    add(
        "--image-size",
        type=int,
        default=518,
        help="input size S, a multiple of 14 (518: APRIL-GAN protocol; 336 native)",
    )
    add(
        "--feature-layers",
        type=int_tuple,
        default=None,
        help="encoder layers feeding the head (default: quarters, 6,12,18,24)",
    )
    add(
        "--templates",
        choices=("clipsam29", "aprilgan35"),
        default="clipsam29",
        help="prompt templates: Figure 7's 29 or APRIL-GAN's 35",
    )
    add(
        "--object-name",
        choices=("as_written", "spaced", "object"),
        default="as_written",
        help="object word in the prompts",
    )
    add(
        "--prompt-normalization",
        choices=("sentence_and_mean", "mean"),
        default="sentence_and_mean",
        help="normalize each sentence embedding before averaging (default) or the mean only",
    )
    add(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="CLIP and head compute dtype (auto: bf16 on accelerators, fp32 on CPU)",
    )
    add(
        "--clip-attention",
        choices=("auto", "reference", "fused", "blocked", "cudnn"),
        default="auto",
        help="CLIP vision attention, the same function in each form (auto: blocked on CPU, "
        "cudnn on GPUs in bf16 where it compiles, else reference; cudnn: cuDNN's fused kernel)",
    )
    add("--cache-dir", default=None, help="cache of converted CLIP params and text features")
    if from_checkpoint:
        parser.set_defaults(
            clip=None,
            image_size=None,
            templates=None,
            object_name=None,
            prompt_normalization=None,
            dtype=None,
            clip_attention=None,
        )


def clip_overrides(args: argparse.Namespace) -> dict:
    """The CLIP settings given on the command line (flags left at None are absent)."""
    given = {
        "model": args.clip,
        "image_size": args.image_size,
        "cache_dir": args.cache_dir,
        "feature_layers": args.feature_layers,
        "templates": args.templates,
        "object_name": args.object_name,
        "dtype": args.dtype,
        "prompt_normalization": args.prompt_normalization,
        "attention": args.clip_attention,
    }
    return {k: v for k, v in given.items() if v is not None}


def clip_config(args: argparse.Namespace) -> ClipConfig:
    return ClipConfig(
        model=args.clip,
        image_size=args.image_size,
        feature_layers=args.feature_layers,
        templates=args.templates,
        object_name=args.object_name,
        dtype=args.dtype,
        cache_dir=args.cache_dir,
        prompt_normalization=args.prompt_normalization,
        attention=args.clip_attention,
    )


def add_refine_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("MMR / SAM (SPEC §4)")
    add = group.add_argument
    add(
        "--sam",
        choices=("vit_h", "vit_l", "vit_b", "tiny-random", "none"),
        default="vit_h",
        help="SAM variant; none = rough maps only",
    )
    add("--sam-checkpoint", default=None, help="e.g. sam_vit_h_4b8939.pth")
    add(
        "--download-sam",
        action="store_true",
        help="fetch the official SAM checkpoint (hash prefix verified)",
    )
    add("--sam-device", default="auto", help="torch device for SAM")
    add(
        "--sam-dtype",
        choices=("fp32", "fp16", "bf16", "auto"),
        default="fp32",
        help="SAM autocast on CUDA (auto: bf16 where supported)",
    )
    add("--sam-images-per-call", type=int, default=4, help="images per SAM encoder call")
    add(
        "--sam-attention",
        choices=("stock", "sdpa", "flash"),
        default="flash",
        help="SAM encoder attention, the same function each way: the relative positions folded "
        "into the query/key vectors (flash, default), PyTorch's fused SDPA with them as mask "
        "(sdpa), or segment_anything's own (stock)",
    )
    add(
        "--sam-compile",
        action="store_true",
        help="torch.compile SAM's image encoder: about a minute of compilation, then a faster "
        "encoder (1.8x for ViT-H on an H200 in bf16); pays off on large sets",
    )
    add("--threshold", type=float, default=0.47, help="binarization (Table 3)")
    add(
        "--connectivity",
        type=int,
        choices=(4, 8),
        default=8,
        help="connected components of the binarized map",
    )
    add("--points", type=int, default=5, help="m random points per image")
    add("--point-sampling", choices=("shared", "per_component"), default="shared")
    add(
        "--single-mask",
        action="store_true",
        help="one SAM mask per box instead of three (multimask_output=False)",
    )
    add("--fusion-norm", choices=("max", "minmax", "none"), default="max")


def refine_config(args: argparse.Namespace) -> RefineConfig:
    return RefineConfig(
        sam=args.sam,
        sam_checkpoint=args.sam_checkpoint,
        download_sam=args.download_sam,
        threshold=args.threshold,
        points=args.points,
        point_sampling=args.point_sampling,
        fusion_norm=args.fusion_norm,
        device=args.sam_device,
        connectivity=args.connectivity,
        multimask=not args.single_mask,
        sam_dtype=args.sam_dtype,
        sam_images_per_call=args.sam_images_per_call,
        sam_attention=args.sam_attention,
        sam_compile=args.sam_compile,
    )


def add_dataset_flag(parser: argparse.ArgumentParser, name: str, help_text: str) -> None:
    parser.add_argument(name, choices=DATASETS, help=help_text)
    parser.add_argument("--data-root", default=None, help="dataset folder (default data/<dataset>)")


def run(
    main: Callable[[Sequence[str] | None], object],
    argv: Sequence[str] | None = None,
    configure_logging: bool = True,
) -> int:
    """Run an entry point: configure logging (unless told not to), turn `ClipSamError` into a
    message + status 2 and Ctrl-C into status 130."""
    if configure_logging:
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
