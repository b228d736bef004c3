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

from clipsam_jax.config import DATASETS, DEFAULT_CLIP, ClipConfig
from clipsam_jax.errors import ClipSamError


def int_tuple(text: str) -> tuple[int, ...]:
    """ "3,9" → (3, 9)."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from error


def add_clip_flags(parser: argparse.ArgumentParser) -> None:
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
