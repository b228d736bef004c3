"""Dataset names → loaders, with the protocol's split for each (docs/method.md §3, §5).

The default split is the one the protocol evaluates on, which is also the one the cross-dataset
training uses (it has masks): MVTec-AD and VisA test, MTD all images, KSDD2 test, meta.json
"test".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from os import PathLike

from clipsam_jax.data.ksdd2 import load_ksdd2
from clipsam_jax.data.meta import read_meta
from clipsam_jax.data.mtd import load_mtd
from clipsam_jax.data.mvtec import load_mvtec
from clipsam_jax.data.types import Dataset
from clipsam_jax.data.visa import load_visa
from clipsam_jax.errors import DatasetError

Loader = Callable[..., Dataset]

LOADERS: dict[str, Loader] = {
    "mvtec": load_mvtec,
    "visa": load_visa,
    "mtd": load_mtd,
    "ksdd2": load_ksdd2,
    "meta": read_meta,
}
DEFAULT_SPLITS = {"mvtec": "test", "visa": "test", "mtd": "all", "ksdd2": "test", "meta": "test"}


def load_dataset(
    name: str,
    root: str | PathLike,
    split: str | None = None,
    classes: Iterable[str] | str | None = None,
) -> Dataset:
    """{class: samples} of dataset `name` under `root`.

    split: None = the protocol's split (DEFAULT_SPLITS). classes: names to keep (a list or
    "a,b"); an unknown one raises `DatasetError` listing the available classes.
    """
    if name not in LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(LOADERS)}")
    if classes is not None and not isinstance(classes, str):
        classes = list(classes)
    return LOADERS[name](root, split or DEFAULT_SPLITS[name], classes=classes)


# Where each dataset keeps normal images outside its evaluated split: the few-shot references
# (MVTec-AD train/good, VisA's and meta.json's train entries, KSDD2's defect-free train images).
# MTD has no such split.
REFERENCE_SPLITS = {"mvtec": "train", "visa": "train", "ksdd2": "train", "meta": "train"}


def reference_split(name: str) -> str:
    """The split of dataset `name` holding few-shot reference candidates; `DatasetError` for a
    dataset without one (checked before any data is read)."""
    if name not in REFERENCE_SPLITS:
        raise DatasetError(
            f"{name} has no normal training images to draw few-shot references from; "
            f"--shots needs one of {', '.join(REFERENCE_SPLITS)} (or eval.predict's "
            "--reference-dir)"
        )
    return REFERENCE_SPLITS[name]


def reference_candidates(
    name: str, root: str | PathLike, classes: Iterable[str] | str | None = None
) -> Dataset:
    """{class: normal samples} of dataset `name` that can serve as few-shot references: its
    reference split (`reference_split`), anomalous images left out."""
    dataset = load_dataset(name, root, reference_split(name), classes)
    return {cls: [s for s in samples if s.label == 0] for cls, samples in dataset.items()}
