"""Kolektor Surface-Defect Dataset 2 (KSDD2) layout (docs/method.md §6): `{train,test}/<id>.png` + `<id>_GT.png`.

One class. Every image has a ground-truth file, empty for defect-free images, so the label is
the mask's non-emptiness (read when listing). The protocol uses the test split (Appendix C.4).
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

from clipsam_jax.data.image_io import read_mask
from clipsam_jax.data.types import (
    GOOD,
    Dataset,
    Sample,
    check_not_empty,
    check_pairs,
    image_files,
    missing_dataset_error,
    reading_masks,
    select_classes,
)
from clipsam_jax.errors import DatasetError

CLASS_NAME = "ksdd2"
DEFECT = "defect"  # KSDD2 has no defect types
MASK_SUFFIX = "_GT"
SPLITS = ("train", "test")
SOURCE = "https://www.vicos.si/resources/kolektorsdd2/"
LAYOUT = """\
<root>/train/<id>.png   <root>/train/<id>_GT.png
<root>/test/<id>.png    <root>/test/<id>_GT.png    (mask; empty for defect-free images)"""


def load_ksdd2(
    root: str | PathLike, split: str = "test", classes: list[str] | str | None = None
) -> Dataset:
    """KSDD2 → {"ksdd2": samples}; label 1 where the `_GT` mask has a nonzero pixel."""
    root = Path(root)
    if split not in SPLITS:
        raise DatasetError(f"KSDD2 has splits {', '.join(SPLITS)}, not {split!r}")
    if not root.is_dir() or not any((root / s).is_dir() for s in SPLITS):
        raise missing_dataset_error("KSDD2", root, LAYOUT, SOURCE)
    folder = root / split
    if not folder.is_dir():
        raise DatasetError(f"{folder}: missing folder; expected the {split} images and masks")
    select_classes("KSDD2", [CLASS_NAME], classes, root)
    samples = [_sample(image, mask) for image, mask in reading_masks(_pairs(folder), "KSDD2")]
    return check_not_empty({CLASS_NAME: samples}, root, f"expected {split}/<id>.png")


def _pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of a split folder, paired by id, sorted by image path."""
    files = image_files(folder)
    masks = {p.stem.removesuffix(MASK_SUFFIX): p for p in files if p.stem.endswith(MASK_SUFFIX)}
    images = {p.stem: p for p in files if not p.stem.endswith(MASK_SUFFIX)}
    check_pairs(images, masks, ".png", f"{MASK_SUFFIX}.png")
    return [(images[stem], masks[stem]) for stem in sorted(images, key=lambda s: str(images[s]))]


def _sample(image: Path, mask: Path) -> Sample:
    if read_mask(mask).any():
        return Sample(image, mask, CLASS_NAME, DEFECT, 1)
    return Sample(image, None, CLASS_NAME, GOOD, 0)
