"""MVTec-AD layout (docs/method.md §6): class folders with train/good, test/<defect> and ground_truth.

Masks are paired with images by file stem (`test/crack/000.png` ↔
`ground_truth/crack/000_mask.png`), never by sorted position, and every pairing problem is an
error naming the file: an anomalous image without its mask would otherwise silently count as
an image without defect pixels.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

from clipsam_jax.data.types import (
    GOOD,
    Dataset,
    Sample,
    check_not_empty,
    image_files,
    missing_dataset_error,
    select_classes,
    subfolders,
)
from clipsam_jax.errors import DatasetError

SOURCE = (
    "https://www.mvtec.com/company/research/datasets/mvtec-ad "
    "(or: python -m clipsam_jax.data.download mvtec --out data/mvtec)"
)
MASK_SUFFIX = "_mask"
SPLITS = ("train", "test")
LAYOUT = """\
<root>/<class>/train/good/*.png
<root>/<class>/test/good/*.png
<root>/<class>/test/<defect>/<stem>.png
<root>/<class>/ground_truth/<defect>/<stem>_mask.png
(15 classes: bottle, cable, capsule, carpet, grid, hazelnut, leather, metal_nut, pill, screw,
tile, toothbrush, transistor, wood, zipper)"""


def load_mvtec(
    root: str | PathLike, split: str = "test", classes: list[str] | str | None = None
) -> Dataset:
    """MVTec-AD → {class: samples}. `split` is "test" (protocol) or "train" (normal only)."""
    root = Path(root)
    if split not in SPLITS:
        raise DatasetError(f"MVTec-AD has splits {', '.join(SPLITS)}, not {split!r}")
    available = [p.name for p in subfolders(root)] if root.is_dir() else []
    if not available:
        raise missing_dataset_error("MVTec-AD", root, LAYOUT, SOURCE)
    load = _test_samples if split == "test" else _train_samples
    dataset = {n: load(root / n) for n in select_classes("MVTec-AD", available, classes, root)}
    return check_not_empty(dataset, root, f"expected images under <class>/{split}/")


def _train_samples(folder: Path) -> list[Sample]:
    good = folder / "train" / GOOD
    if not good.is_dir():
        raise DatasetError(f"{good}: missing folder; expected the class's normal training images")
    return [Sample(p, None, folder.name, GOOD, 0) for p in image_files(good)]


def _test_samples(folder: Path) -> list[Sample]:
    test = folder / "test"
    if not test.is_dir():
        raise DatasetError(
            f"{test}: missing folder; expected test/<defect>/ and test/good/ image folders "
            f"in MVTec-AD layout:\n{LAYOUT}"
        )
    samples = []
    defect_folders = subfolders(test)
    for defect_folder in defect_folders:
        if defect_folder.name == GOOD:
            samples += [Sample(p, None, folder.name, GOOD, 0) for p in image_files(defect_folder)]
        else:
            samples += _defect_samples(folder, defect_folder)
    _check_orphan_mask_folders(folder, {p.name for p in defect_folders})
    return sorted(samples, key=lambda s: str(s.image_path))


def _defect_samples(folder: Path, defect_folder: Path) -> list[Sample]:
    """The images of one defect folder, each paired by stem with its mask."""
    mask_folder = folder / "ground_truth" / defect_folder.name
    images = image_files(defect_folder)
    if images and not mask_folder.is_dir():
        raise DatasetError(
            f"{mask_folder}: missing folder; expected the masks of the {len(images)} anomalous "
            f"images in {defect_folder} as <stem>{MASK_SUFFIX}.png"
        )
    masks = {_mask_stem(p): p for p in image_files(mask_folder)} if mask_folder.is_dir() else {}
    samples = []
    for image in images:
        mask = masks.pop(image.stem, None)
        if mask is None:
            raise DatasetError(
                f"{image}: anomalous image without a mask; expected "
                f"{mask_folder / (image.stem + MASK_SUFFIX + '.png')}"
            )
        samples.append(Sample(image, mask, folder.name, defect_folder.name, 1))
    if masks:
        orphan = sorted(masks.values())[0]
        raise DatasetError(
            f"{orphan}: mask without an image; expected {defect_folder / orphan.name}"
            f" with the stem {_mask_stem(orphan)!r} ({len(masks)} unpaired mask(s) in "
            f"{mask_folder})"
        )
    return samples


def _mask_stem(mask: Path) -> str:
    """`000_mask.png` → `000` (the image stem the mask belongs to)."""
    return mask.stem.removesuffix(MASK_SUFFIX)


def _check_orphan_mask_folders(folder: Path, defect_names: set[str]) -> None:
    """A ground_truth/<defect> folder whose test/<defect> folder is missing."""
    truth = folder / "ground_truth"
    for mask_folder in subfolders(truth) if truth.is_dir() else []:
        if mask_folder.name not in defect_names and image_files(mask_folder):
            raise DatasetError(
                f"{mask_folder}: masks without images; expected the folder "
                f"{folder / 'test' / mask_folder.name} holding their images"
            )
