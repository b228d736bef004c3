"""`meta.json`, the dataset index of APRIL-GAN and AnomalyCLIP (docs/method.md §6), read and written.

    {"train" | "test": {class: [{"img_path", "mask_path", "cls_name", "specie_name",
                                 "anomaly"}, ...]}}

Paths are relative to the dataset root; `mask_path` is "" for normal images; `specie_name` is
the defect type ("good" for normal images; VisA's own meta writes "", read as "good" or
"anomaly"). Any loader's output can be written as a meta.json:

    python -m clipsam_jax.data.meta --layout mvtec --root data/mvtec
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

from clipsam_jax import cli
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

META_NAME = "meta.json"
KEYS = ("img_path", "mask_path", "cls_name", "specie_name", "anomaly")
LAYOUT = """\
<root>/meta.json   {"train"|"test": {class: [{"img_path": "<class>/.../x.png",
                    "mask_path": "<class>/.../x_mask.png" or "", "cls_name": class,
                    "specie_name": defect type, "anomaly": 0 or 1}, ...]}}
(paths relative to <root>)"""
SOURCE = (
    "write one from a dataset in a known layout: "
    "python -m clipsam_jax.data.meta --layout {mvtec,visa,mtd,ksdd2} --root <root>"
)
# Splits each layout's meta.json holds: MTD is used whole, as the test set.
LAYOUT_SPLITS = {"mvtec": ("train", "test"), "visa": ("train", "test"), "mtd": ("test",),
                 "ksdd2": ("train", "test")}  # fmt: skip


def read_meta(
    root: str | PathLike, split: str = "test", classes: list[str] | str | None = None
) -> Dataset:
    """`<root>/meta.json` → {class: samples} for `split`, samples sorted by image path."""
    root = Path(root)
    path = root / META_NAME
    if not path.is_file():
        raise missing_dataset_error("meta.json dataset", root, LAYOUT, SOURCE)
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(meta, dict) or split not in meta:
        keys = ", ".join(map(repr, meta)) if isinstance(meta, dict) else type(meta).__name__
        raise DatasetError(f"{path}: no {split!r} key; found {keys}. Expected:\n{LAYOUT}")
    by_class = meta[split]
    dataset = {}
    for name in select_classes("meta.json dataset", list(by_class), classes, root):
        samples = [_sample(root, path, entry) for entry in by_class[name]]
        dataset[name] = sorted(samples, key=lambda s: str(s.image_path))
    return check_not_empty(dataset, root, f"empty list in {path}[{split!r}]")


def _sample(root: Path, path: Path, entry: dict) -> Sample:
    if missing := [k for k in KEYS if k not in entry]:
        raise DatasetError(f"{path}: entry {entry} lacks {', '.join(missing)}")
    anomaly = int(entry["anomaly"])
    image = listed_file(root / entry["img_path"], path, "image")
    if anomaly == 0:
        return Sample(image, None, entry["cls_name"], GOOD, 0)
    if not entry["mask_path"]:
        raise DatasetError(
            f"{path}: anomalous image {entry['img_path']} has an empty mask_path; segmentation "
            "needs its mask"
        )
    mask = listed_file(root / entry["mask_path"], path, "mask")
    return Sample(image, mask, entry["cls_name"], entry["specie_name"] or "anomaly", 1)


def write_meta(root: str | PathLike, samples_by_split: dict[str, Dataset]) -> Path:
    """Write `<root>/meta.json` from {split: {class: samples}}; returns its path.

    Every file must lie under `root` (paths are stored relative to it).
    """
    root = Path(root)
    meta = {
        split: {name: [_entry(root, s) for s in samples] for name, samples in dataset.items()}
        for split, dataset in samples_by_split.items()
    }
    path = root / META_NAME
    path.write_text(json.dumps(meta, indent=4) + "\n")
    return path


def _entry(root: Path, sample: Sample) -> dict:
    return {"img_path": _relative(root, sample.image_path),
            "mask_path": _relative(root, sample.mask_path) if sample.mask_path else "",
            "cls_name": sample.class_name, "specie_name": sample.defect_type,
            "anomaly": int(sample.label)}  # fmt: skip


def _relative(root: Path, path: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        try:  # the same file reached through another spelling of the root (symlinks, "..")
            return Path(path).resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            raise DatasetError(f"{path}: not under the dataset root {root}") from None


def write_meta_for_layout(layout: str, root: str | PathLike) -> Path:
    """Load a dataset of a known layout and write its `meta.json` (splits per LAYOUT_SPLITS)."""
    from clipsam_jax.data.registry import load_dataset  # registry imports this module

    if layout not in LAYOUT_SPLITS:
        raise DatasetError(f"unknown layout {layout!r}; known: {', '.join(LAYOUT_SPLITS)}")
    splits = LAYOUT_SPLITS[layout]
    loaded = {s: load_dataset(layout, root, split="all" if layout == "mtd" else s) for s in splits}
    return write_meta(root, loaded)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clipsam_jax.data.meta",
        description="Write DIR/meta.json (APRIL-GAN/AnomalyCLIP format) from a dataset folder.",
    )
    parser.add_argument("--layout", required=True, choices=sorted(LAYOUT_SPLITS))
    parser.add_argument("--root", required=True, help="dataset folder (DIR)")
    return parser


def _main(argv: Sequence[str] | None) -> None:
    args = _parser().parse_args(argv)
    path = write_meta_for_layout(args.layout, args.root)
    counts = json.loads(path.read_text())
    for split, by_class in counts.items():
        print(f"{split}: {len(by_class)} classes, {sum(map(len, by_class.values()))} images")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
