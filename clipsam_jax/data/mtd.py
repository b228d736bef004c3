"""Magnetic Tile Defect (MTD) layout (docs/method.md §6): six `MT_<type>/Imgs` folders, one class.

Each `Imgs/<stem>.jpg` has a same-stem `.png` mask beside it. The label is the mask's
non-emptiness, not the folder (some images in defect folders have empty masks), so the masks
are read when the dataset is listed; they are small. The protocol uses all images as the test
set (Appendix C.5): split "all" (alias "test").
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
    missing_dataset_error,
    reading_masks,
    select_classes,
    subfolders,
)
from clipsam_jax.errors import DatasetError

CLASS_NAME = "magnetic_tile"  # the object name in the text prompts (AnomalyCLIP lists no MTD)
FOLDERS = ("MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Free", "MT_Uneven")
NORMAL_FOLDER = "MT_Free"
SPLITS = ("all", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg")
SOURCE = "https://github.com/abin24/Magnetic-tile-defect-datasets."
LAYOUT = """\
<root>/MT_{Blowhole,Break,Crack,Fray,Free,Uneven}/Imgs/<stem>.jpg
<root>/MT_{Blowhole,Break,Crack,Fray,Free,Uneven}/Imgs/<stem>.png   (mask, same stem)"""


def load_mtd(
    root: str | PathLike, split: str = "all", classes: list[str] | str | None = None
) -> Dataset:
    """MTD → {"magnetic_tile": samples}; label 1 where the mask has a nonzero pixel."""
    root = Path(root)
    if split not in SPLITS:
        raise DatasetError(f"MTD is used whole (splits {', '.join(SPLITS)}), not {split!r}")
    folders = _type_folders(root)
    select_classes("MTD", [CLASS_NAME], classes, root)
    pairs = [pair for folder in folders for pair in _pairs(folder)]
    samples = [_sample(*pair) for pair in reading_masks(pairs, "MTD")]
    dataset = {CLASS_NAME: sorted(samples, key=lambda s: str(s.image_path))}
    return check_not_empty(dataset, root, "expected MT_*/Imgs/*.jpg")


def _type_folders(root: Path) -> list[Path]:
    folders = [p for p in subfolders(root) if p.name.startswith("MT_")] if root.is_dir() else []
    if not folders:
        raise missing_dataset_error("MTD", root, LAYOUT, SOURCE)
    for folder in folders:
        if not (folder / "Imgs").is_dir():
            raise DatasetError(f"{folder / 'Imgs'}: missing folder; expected images and masks")
    return folders


def _pairs(folder: Path) -> list[tuple[Path, Path, Path]]:
    """(type folder, image, mask) for each image of `folder/Imgs`, masks paired by stem."""
    files = [p for p in (folder / "Imgs").iterdir() if p.is_file() and not p.name.startswith(".")]
    images = {p.stem: p for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
    masks = {p.stem: p for p in files if p.suffix.lower() == ".png"}
    check_pairs(images, masks, ".jpg", ".png")
    return [(folder, images[stem], masks[stem]) for stem in sorted(images)]


def _sample(folder: Path, image: Path, mask: Path) -> Sample:
    if not read_mask(mask).any():
        return Sample(image, None, CLASS_NAME, GOOD, 0)
    if folder.name == NORMAL_FOLDER:
        raise DatasetError(f"{mask}: mask with defect pixels in {NORMAL_FOLDER} (defect-free)")
    return Sample(image, mask, CLASS_NAME, folder.name.removeprefix("MT_").lower(), 1)
