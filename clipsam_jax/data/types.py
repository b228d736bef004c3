"""The dataset record shared by every loader, and the checks and messages loaders share.

A loader turns an on-disk layout (docs/method.md §6) into `dict[class name, list[Sample]]`: classes
sorted, samples sorted by image path, so two runs over the same tree agree sample for sample.
Every loader keeps one convention: `label == 1` ⇔ `mask_path is not None` ⇔
`defect_type != "good"` (datasets that ship empty masks for normal images, MTD and KSDD2, get
`mask_path=None` for them; the pipeline gives normal images an all-False mask).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from clipsam_jax.data.image_io import IMAGE_SUFFIXES
from clipsam_jax.errors import DatasetError

GOOD = "good"  # defect_type of normal images (MVTec-AD's folder name)
PROGRESS_MIN = 200  # show a progress bar when reading more masks than this

DATA_ROOT_HINT = (
    "Pass the dataset folder with --data-root DIR (default data/<dataset>), or generate a small "
    "synthetic stand-in with `python -m clipsam_jax.data.synthetic --layout all --out data`."
)


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    image_path: the image file. mask_path: its ground-truth mask (None for normal images).
    class_name: the object/texture class as the dataset writes it (`metal_nut`).
    defect_type: the defect folder name, `"good"` for normal images.
    label: 1 anomalous, 0 normal.
    """

    image_path: Path
    mask_path: Path | None
    class_name: str
    defect_type: str
    label: int


Dataset = dict[str, list[Sample]]


def missing_dataset_error(name: str, root: Path, layout: str, source: str) -> DatasetError:
    """The error for a dataset root that does not exist or holds nothing of the layout."""
    return DatasetError(
        f"{name} not found at {root}.\nExpected layout:\n{layout.rstrip()}\n"
        f"Get it from: {source}\n{DATA_ROOT_HINT}"
    )


def image_files(folder: Path) -> list[Path]:
    """The image files directly inside `folder`, sorted by name (hidden files ignored)."""
    files = (p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return sorted(p for p in files if p.suffix.lower() in IMAGE_SUFFIXES)


def subfolders(folder: Path) -> list[Path]:
    """The visible sub-folders of `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def select_classes(
    dataset: str, available: Sequence[str], classes: Iterable[str] | str | None, root: Path
) -> list[str]:
    """The requested classes in sorted order, or all of them; an unknown one is an error.

    `classes` may be a comma-separated string (`--classes a,b`).
    """
    if classes is None:
        return sorted(available)
    if isinstance(classes, str):
        classes = [c for c in classes.split(",") if c]
    wanted = list(dict.fromkeys(classes))
    if unknown := [c for c in wanted if c not in available]:
        raise DatasetError(
            f"{dataset} at {root} has no class {', '.join(map(repr, unknown))}; "
            f"available classes: {', '.join(sorted(available))}"
        )
    return sorted(wanted)


def listed_file(path: Path, listing: Path, what: str, hint: str = "") -> Path:
    """`path`, or the error for a file that the index `listing` names but that is missing."""
    if not path.is_file():
        raise DatasetError(f"{path}: {what} listed in {listing} is missing{hint}")
    return path


def check_pairs(images: dict, masks: dict, image_suffix: str, mask_suffix: str) -> None:
    """Raise for an image without a mask or a mask without an image ({stem: path} each)."""
    for stem in sorted(set(images) - set(masks)):
        raise DatasetError(
            f"{images[stem]}: image without a mask; expected {stem}{mask_suffix} beside it"
        )
    for stem in sorted(set(masks) - set(images)):
        raise DatasetError(
            f"{masks[stem]}: mask without an image; expected {stem}{image_suffix} beside it"
        )


def reading_masks(items: list, dataset: str) -> Iterable:
    """`items`, behind a progress bar when more than PROGRESS_MIN masks are read for labels."""
    if len(items) <= PROGRESS_MIN:
        return items
    return tqdm(items, desc=f"{dataset}: reading masks for labels", unit="mask", leave=False)


def check_not_empty(dataset: Dataset, root: Path, what: str) -> Dataset:
    """Raise for a class without samples (an empty folder is a broken download, not a class)."""
    for name, samples in dataset.items():
        if not samples:
            raise DatasetError(f"{root}: class {name!r} has no images ({what})")
    return dataset


def summarize(dataset: Dataset) -> str:
    """One line per class: `name: N images (A anomalous)`."""
    return "\n".join(
        f"{name}: {len(samples)} images ({sum(s.label for s in samples)} anomalous)"
        for name, samples in dataset.items()
    )
