"""VisA layout (docs/method.md §6): images and masks listed by the 1-class split file `split_csv/1cls.csv`.

The csv (`object,split,label,image,mask`) names every image relative to the root, with
`label` `normal` or `anomaly` and an empty mask for normal rows. VisA has no defect types:
anomalous samples get `defect_type="anomaly"`. Its masks hold region ids 1..N, binarized
`> 0` by `image_io.read_mask` (docs/method.md §5).
"""

from __future__ import annotations

import csv
from os import PathLike
from pathlib import Path

from clipsam_jax.data.types import (
    GOOD,
    Dataset,
    Sample,
    check_not_empty,
    listed_file,
    missing_dataset_error,
    select_classes,
)
from clipsam_jax.errors import DatasetError

SPLIT_CSV = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
ANOMALY = "anomaly"
NORMAL = "normal"
SOURCE = (
    "https://github.com/amazon-science/spot-diff (images: the VisA tar linked there; the split "
    "file: split_csv/1cls.csv of that repository, copied to <root>/split_csv/1cls.csv; or: "
    "python -m clipsam_jax.data.download visa --out data/visa)"
)
LAYOUT = """\
<root>/split_csv/1cls.csv          (object,split,label,image,mask)
<root>/<class>/Data/Images/Normal/*.JPG
<root>/<class>/Data/Images/Anomaly/*.JPG
<root>/<class>/Data/Masks/Anomaly/*.png
(12 classes: candle, capsules, cashew, chewinggum, fryum, macaroni1, macaroni2, pcb1, pcb2,
pcb3, pcb4, pipe_fryum)"""
MISSING_HINT = f"; expected the VisA layout:\n{LAYOUT}"


def load_visa(
    root: str | PathLike, split: str = "test", classes: list[str] | str | None = None
) -> Dataset:
    """VisA → {class: samples} for `split` ("test" for the protocol, or "train")."""
    root = Path(root)
    rows = read_split_csv(root)
    splits = sorted({row["split"] for row in rows})
    if split not in splits:
        raise DatasetError(
            f"{root / SPLIT_CSV}: no rows with split {split!r}; splits present: {', '.join(splits)}"
        )
    rows = [row for row in rows if row["split"] == split]
    available = sorted({row["object"] for row in rows})
    dataset: Dataset = {}
    for name in select_classes("VisA", available, classes, root):
        samples = [_sample(root, row) for row in rows if row["object"] == name]
        dataset[name] = sorted(samples, key=lambda s: str(s.image_path))
    return check_not_empty(dataset, root, f"no {split} rows in {SPLIT_CSV}")


def read_split_csv(root: Path) -> list[dict[str, str]]:
    """The rows of `<root>/split_csv/1cls.csv` as dicts keyed by `COLUMNS`."""
    path = root / SPLIT_CSV
    if not path.is_file():
        if root.is_dir():
            raise DatasetError(
                f"{path}: missing VisA split file. It comes from the VisA repository "
                "(https://github.com/amazon-science/spot-diff, split_csv/1cls.csv); copy it "
                f"there. Expected layout:\n{LAYOUT}"
            )
        raise missing_dataset_error("VisA", root, LAYOUT, SOURCE)
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if missing := [c for c in COLUMNS if c not in (reader.fieldnames or [])]:
            raise DatasetError(
                f"{path}: missing column(s) {', '.join(missing)}; expected the header "
                f"{','.join(COLUMNS)}"
            )
        return [{c: (row[c] or "").strip() for c in COLUMNS} for row in reader]


def _sample(root: Path, row: dict[str, str]) -> Sample:
    """One csv row → Sample, checking that its files exist (a partial download fails here)."""
    label = row["label"]
    if label not in (NORMAL, ANOMALY):
        raise DatasetError(
            f"{root / SPLIT_CSV}: row for {row['image']} has label {label!r}; expected "
            f"{NORMAL!r} or {ANOMALY!r}"
        )
    image = listed_file(root / row["image"], root / SPLIT_CSV, "image", MISSING_HINT)
    if label == NORMAL:
        return Sample(image, None, row["object"], GOOD, 0)
    if not row["mask"]:
        raise DatasetError(
            f"{root / SPLIT_CSV}: anomalous image {image} has no mask in the csv; expected a "
            "path like <class>/Data/Masks/Anomaly/<stem>.png"
        )
    mask = listed_file(root / row["mask"], root / SPLIT_CSV, "mask", MISSING_HINT)
    return Sample(image, mask, row["object"], ANOMALY, 1)
