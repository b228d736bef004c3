"""The offline demo behind the README's first command: `python -m eval.main --demo`.

Generates synthetic MVTec-AD- and VisA-layout datasets, writes a tiny random CLIP, trains the
UMCI head on the MVTec-layout set and evaluates on the VisA-layout set with the tiny-random SAM:
the whole protocol in a few minutes on 2 CPU cores. Its numbers come from random tiny models
on synthetic data and say nothing about ClipSAM's accuracy.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from clipsam_jax.clip.tiny import TINY_NATIVE_SIZE, write_tiny_clip
from clipsam_jax.config import (
    ClipConfig,
    EvalConfig,
    HeadConfig,
    OptimConfig,
    RefineConfig,
    RuntimeConfig,
    TrainConfig,
)
from clipsam_jax.data import synthetic
from clipsam_jax.eval_lib import evaluate
from clipsam_jax.train_lib import train

BANNER = (
    "DEMO: synthetic data, tiny random CLIP (4 layers, width 48) and tiny random SAM.\n"
    "These numbers exercise the pipeline; they are NOT ClipSAM results and not comparable "
    "with the paper."
)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    directory: str = "demo"
    seed: int = 0
    image_size: int = TINY_NATIVE_SIZE  # 16×16 token grid
    epochs: int = 12
    images_per_class: int = 8
    hidden_dim: int = 32
    pool_sizes: tuple[int, int] = (3, 9)  # Table 3's s1, s2 (a 16×16 grid pools to 5 and 1)


def run_demo(config: DemoConfig = DemoConfig(), progress: bool = True) -> dict:
    """Generate, train, evaluate; returns metrics.json's content (see `evaluate`)."""
    root = Path(config.directory)
    data = root / "data"
    for layout in ("mvtec", "visa"):
        if not (data / layout).is_dir():
            synthetic.generate(layout, data / layout, seed=config.seed,
                               images_per_class=config.images_per_class)  # fmt: skip
    clip_dir = root / "tiny_clip"
    if not (clip_dir / "config.json").is_file():
        write_tiny_clip(clip_dir, seed=config.seed)
    clip = ClipConfig(model=str(clip_dir), image_size=config.image_size, dtype="float32")
    runtime = RuntimeConfig(cache_dir=str(root / "cache"))
    train(
        TrainConfig(
            dataset="mvtec", data_root=str(data / "mvtec"), workdir=str(root / "runs" / "mvtec"),
            seed=config.seed, clip=clip, head=HeadConfig(hidden_dim=config.hidden_dim, pool_sizes=config.pool_sizes),
            optim=OptimConfig(epochs=config.epochs),
        ),
        runtime=runtime,
        progress=progress,
    )  # fmt: skip
    return evaluate(
        EvalConfig(
            dataset="visa", data_root=str(data / "visa"), checkpoint=str(root / "runs" / "mvtec"),
            output=str(root / "results" / "visa"), seed=config.seed, clip=clip,
            refine=RefineConfig(sam="tiny-random"), visualize_per_class=2,
        ),
        runtime=runtime,
        progress=progress,
    )  # fmt: skip
