"""`eval.app --demo`: the app on models and images made offline, inside its work folder: a
tiny random CLIP, no head (the zero-shot map), the tiny random SAM, and generated MVTec-layout
images as examples. Its maps mean nothing; the page says so."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from clipsam_jax.app.analyzer import AppConfig
from clipsam_jax.config import ClipConfig

DEMO_NOTE = ("DEMO: tiny random models (no weights needed) on generated images. The maps "
             "exercise the app; they are NOT ClipSAM results.")  # fmt: skip
DEMO_CLASSES = ("screw", "grid", "bottle")  # the first example's map gives SAM boxes
DEMO_IMAGE_SIZE = 112


def prepare(config: AppConfig, work: Path) -> tuple[AppConfig, list[tuple[str, str]]]:
    """The demo's settings and its examples [(image path, class name)], made under `work`."""
    from clipsam_jax.clip.tiny import write_tiny_clip
    from clipsam_jax.data import synthetic
    from clipsam_jax.data.registry import load_dataset

    clip = write_tiny_clip(work / "tiny_clip", seed=0)
    data = synthetic.generate("mvtec", work / "examples", seed=0, classes=DEMO_CLASSES,
                              images_per_class=2)  # fmt: skip
    dataset = load_dataset("mvtec", data)
    examples = []
    named = work / "example_images"  # the page lists examples by file name: say what they are
    named.mkdir()
    for name in DEMO_CLASSES:
        for sample in [s for s in dataset[name] if s.label == 1][:2]:
            path = named / f"{name}_{sample.defect_type}.png"
            shutil.copy(sample.image_path, path)
            examples.append((str(path), name))
    settings = dataclasses.replace(
        config, checkpoint=None, clip=ClipConfig(model=str(clip), image_size=DEMO_IMAGE_SIZE),
        clip_given=("model", "image_size"),
        refine=dataclasses.replace(config.refine, sam="tiny-random", sam_checkpoint=None),
    )  # fmt: skip
    return settings, examples
