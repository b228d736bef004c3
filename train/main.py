"""`python -m train.main --train mvtec`: train the UMCI head on a dataset's test split.

Resumes from the last checkpoint in --workdir. See README "Training" and SPEC §3, §7.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from clipsam_jax import cli
from clipsam_jax.config import HeadConfig, LossConfig, OptimConfig, TrainConfig
from clipsam_jax.train_lib import train


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.main", description=__doc__)
    cli.add_dataset_flag(parser, "--train", "dataset whose test split trains the head")
    parser.add_argument("--workdir", default=None, help="run folder (default runs/<dataset>)")
    cli.add_clip_flags(parser)
    parser.add_argument("--head", choices=("umci", "aprilgan"), default="umci")
    parser.add_argument("--paths", choices=("both", "strip", "scale"), default="both")
    parser.add_argument("--hidden-dim", type=int, default=384, help="c_h (Table 3)")
    parser.add_argument("--pool-sizes", type=cli.int_tuple, default=(3, 9), help="s1,s2 (Table 3)")
    parser.add_argument("--gru-reading", choices=("carry", "sequence"), default="carry")
    parser.add_argument(
        "--separate-projections",
        action="store_true",
        help="one Linear per path instead of one shared (SPEC §2 option)",
    )
    parser.add_argument("--loss-resolution", choices=("image", "grid"), default="image")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=200, help="steps between saves")
    parser.add_argument("--max-to-keep", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument(
        "--no-feature-cache",
        action="store_true",
        help="recompute CLIP features every epoch instead of caching them",
    )
    parser.add_argument(
        "--feature-cache",
        default=None,
        help="feature cache folder (default <workdir>/../feature_cache)",
    )
    parser.add_argument("--mosaic", action="store_true", help="APRIL-GAN mosaic augmentation")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)  # fmt: skip


def main(argv: Sequence[str] | None = None):
    args = parse(argv)
    config = TrainConfig(
        dataset=args.train, data_root=args.data_root, workdir=args.workdir, seed=args.seed,
        checkpoint_every_steps=args.checkpoint_every, max_to_keep=args.max_to_keep,
        feature_cache=not args.no_feature_cache, feature_cache_dir=args.feature_cache,
        mosaic=args.mosaic, max_steps=args.max_steps, clip=cli.clip_config(args),
        head=HeadConfig(kind=args.head, hidden_dim=args.hidden_dim, pool_sizes=args.pool_sizes,
                        paths=args.paths, gru_reading=args.gru_reading,
                        shared_projection=not args.separate_projections),
        loss=LossConfig(resolution=args.loss_resolution),
        optim=OptimConfig(learning_rate=args.lr, weight_decay=args.weight_decay,
                          batch_size=args.batch_size, epochs=args.epochs),
    )  # fmt: skip
    summary = train(config, progress=not args.no_progress)
    print(f"trained {summary.step} steps in {summary.workdir} (last loss {summary.last_loss})")
    return summary


def run() -> None:
    sys.exit(cli.run(main))


if __name__ == "__main__":
    run()
