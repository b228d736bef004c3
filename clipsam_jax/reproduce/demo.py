"""`python -m eval.reproduce --demo`: the whole plan on generated data with tiny random models.

Writes the four synthetic datasets (MVTec-AD, VisA, MTD and KSDD2 layouts, a few images per
kind and class) and a tiny random CLIP under the output folder, then runs every cell with the tiny
random SAM at S = 140 (a 10×10 token grid: Table 3's largest pool, 10, still fits). Its numbers
say nothing about ClipSAM's accuracy; the report says so on every page.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from clipsam_jax.clip.tiny import write_tiny_clip
from clipsam_jax.config import RuntimeConfig
from clipsam_jax.data import synthetic
from clipsam_jax.reproduce.plan import ReproduceConfig

DEMO_IMAGE_SIZE = 140  # patch 14: grid 10
# The training sets hold 24 images, three full batches of 8: a partial last batch would be
# another program to compile for every training. (dataset: (classes, images per kind))
DEMO_DATA = {"mvtec": (("bottle", "grid", "screw"), 4), "visa": (None, 4), "mtd": (None, 2),
             "ksdd2": (None, 2)}  # fmt: skip
DEMO_EPOCHS = 2
DEMO_OUTPUT = "reproduction-demo"


def _once(target: Path, make) -> None:
    """make(folder) into a temporary folder renamed to `target`: a killed run leaves no
    half-written dataset or model that the next run would take as complete."""
    if target.is_dir():
        return
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    make(partial)
    partial.rename(target)


def _generate(folder: Path, seed: int) -> None:
    for layout, (classes, count) in DEMO_DATA.items():
        synthetic.generate(layout, folder / layout, seed=seed, classes=classes,
                           images_per_class=count)  # fmt: skip


# The other families' tiny models, each beside the tiny SAM where its extra is installed.
DEMO_REFINERS = {"segment_anything_hq": "tiny-random-hq", "sam2": "tiny-random-sam2"}


def _demo_refiners() -> tuple[str, ...] | None:
    """The tiny refiners of the installed families (None: the tiny SAM alone)."""
    import importlib.util

    names = tuple(name for package, name in DEMO_REFINERS.items()
                  if importlib.util.find_spec(package))  # fmt: skip
    return names or None


def prepare(
    settings: ReproduceConfig, runtime: RuntimeConfig
) -> tuple[ReproduceConfig, RuntimeConfig]:
    """Generate the demo's data and CLIP (once) and point the settings at them."""
    output = Path(DEMO_OUTPUT if settings.output == ReproduceConfig.output else settings.output)
    output.mkdir(parents=True, exist_ok=True)
    _once(output / "data", lambda folder: _generate(folder, settings.seed))
    _once(output / "tiny_clip", lambda folder: write_tiny_clip(folder, seed=settings.seed))
    settings = dataclasses.replace(
        settings, output=str(output), data_root=str(output / "data"),
        clip=str(output / "tiny_clip"), image_size=DEMO_IMAGE_SIZE, sam="tiny-random",
        epochs=settings.epochs or DEMO_EPOCHS,
        panels=1 if settings.panels is None else settings.panels,
        refiners=settings.refiners or _demo_refiners(),
    )  # fmt: skip
    return settings, dataclasses.replace(
        runtime, cache_dir=runtime.cache_dir or str(output / "cache")
    )
