"""Small synthetic stand-ins for MVTec-AD, VisA, MTD and KSDD2, in their on-disk layouts.

For tests and the offline demo: seeded, hundreds of images in seconds, with the quirks of the
real datasets (grayscale classes saved as mode-L PNG, non-square VisA `.JPG` with masks holding
region ids 1..N and `split_csv/1cls.csv`, an MVTec class without `test/good`, MTD images of
differing sizes and defect-folder images with empty masks, KSDD2 `_GT` masks). Each root also
gets a `meta.json`.

Scenes are textures (smooth noise, weave, grid, tile, brushed metal) or objects (disc, screw-like
bar, ellipse, several discs, circuit board) on a background. Defects are the same on every
layout so a model trained on one transfers to another: dark scratches, holes and cracks,
colored stains, and missing parts (painted with the background). Each defect's region is drawn
first and only its pixels are painted, so every pixel that differs from the defect-free render
lies inside the mask (checked on the arrays before encoding; JPEG blurs it afterwards).

    python -m clipsam_jax.data.synthetic --layout all --out data --seed 0
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import shutil
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from clipsam_jax import cli
from clipsam_jax.errors import DatasetError

LAYOUTS = ("mvtec", "visa", "mtd", "ksdd2")
DEFECTS = ("scratch", "hole", "stain", "crack", "missing")
MARKER = ".synthetic.json"  # written into each root; a root holding it may be regenerated
AREA_RANGE = (0.01, 0.10)  # defect area as a fraction of the image (all regions together)
MIN_CONTRAST = 20.0  # mean |gray change| over a region, so every defect is visible
STAIN_COLORS = ((175, 60, 30), (50, 60, 170), (235, 205, 70), (40, 140, 150), (200, 90, 170))
BOARD_PADS = ((0.2, 0.15, 0.35, 0.45), (0.55, 0.6, 0.8, 0.85), (0.6, 0.15, 0.7, 0.4))  # y0 x0 y1 x1
Array = np.ndarray


@dataclass(frozen=True)
class ClassSpec:
    """How to render one class: a scene kind, its colors, and the defects it gets."""

    name: str
    scene: str
    color: tuple[int, int, int]
    defects: tuple[str, ...]
    grayscale: bool = False
    test_good: bool = True  # False: no test/good folder (MVTec layout quirk)
    size: tuple[float, float] = (1.0, 1.0)  # (height, width) relative to the layout's size


@dataclass(frozen=True)
class Rendered:
    """One rendered image before encoding.

    image, clean: uint8 (H, W, 3) RGB, or (H, W) for grayscale classes; `clean` is the same
    render without defects. mask: uint8 (H, W), 0 outside defects, k in region k (1..N).
    """

    image: Array
    clean: Array
    mask: Array
    defects: tuple[str, ...]


MVTEC_CLASSES = (
    ClassSpec("bottle", "disc", (70, 115, 60), ("crack", "stain", "missing")),
    ClassSpec("carpet", "weave", (150, 95, 75), ("hole", "scratch", "stain"), test_good=False),
    ClassSpec("grid", "grid", (150, 150, 150), ("scratch", "hole", "missing"), grayscale=True),
    ClassSpec("screw", "bar", (95, 95, 95), ("scratch", "stain", "missing"), grayscale=True),
)
VISA_CLASSES = (
    ClassSpec("candle", "discs", (238, 233, 225), ("stain", "hole", "missing"), size=(0.75, 1.0)),
    ClassSpec("cashew", "ellipse", (205, 165, 105), ("scratch", "crack", "stain", "missing"),
              size=(0.7, 1.0)),
    ClassSpec("pcb1", "board", (35, 115, 60), ("scratch", "hole", "stain"), size=(0.8, 1.1)),
)  # fmt: skip
MTD_FOLDERS = {  # folder → defect kind (None: defect-free)
    "MT_Blowhole": "hole", "MT_Break": "missing", "MT_Crack": "crack", "MT_Fray": "scratch",
    "MT_Free": None, "MT_Uneven": "stain",
}  # fmt: skip
MTD_EMPTY_MASK_FOLDERS = ("MT_Fray", "MT_Uneven")  # their last image: no defect, empty mask
MTD_SPEC = ClassSpec("magnetic_tile", "tile", (115, 115, 115), tuple(DEFECTS), grayscale=True)
KSDD2_SPEC = ClassSpec("ksdd2", "brushed", (128, 130, 118), ("scratch", "hole", "stain", "crack"))
DEFAULT_SIZES = {"mvtec": 160, "visa": 160, "mtd": 128, "ksdd2": 176}  # side / width / – / height


# --------------------------------------------------------------------------- scenes


def _smooth(rng: np.random.Generator, h: int, w: int, cell: float) -> Array:
    """float32 (h, w) smooth noise, about unit amplitude, with features of about `cell` pixels."""
    cell = max(cell, 1.0)
    low = rng.standard_normal((int(h / cell) + 3, int(w / cell) + 3)).astype(np.float32)
    return cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)


def _coords(h: int, w: int) -> tuple[Array, Array]:
    return np.mgrid[0:h, 0:w].astype(np.float32)


def _jitter(rng: np.random.Generator, color: Sequence[int], amount: float = 0.05) -> Array:
    return np.asarray(color, np.float32) * (1.0 + amount * rng.standard_normal())


def _flat(h: int, w: int, color: Sequence[float]) -> Array:
    return np.broadcast_to(np.asarray(color, np.float32), (h, w, 3)).copy()


def _texture(rng, h, w, spec, pattern: Array) -> tuple[Array, Array, Array]:
    """A texture covering the image: (image, all-True object mask, dark background)."""
    m = np.sqrt(h * w)
    base = _jitter(rng, spec.color)
    shade = pattern + 6.0 * _smooth(rng, h, w, m / 8) + 2.0 * rng.standard_normal((h, w))
    image = base + shade[..., None].astype(np.float32)
    return image, np.ones((h, w), bool), _flat(h, w, (18, 18, 18))


def _scene_weave(rng, h, w, spec):
    y, x = _coords(h, w)
    period = np.sqrt(h * w) / 14
    phase = rng.uniform(0, 2 * np.pi, 2)
    weave = np.cos(2 * np.pi * x / period + phase[0]) * np.cos(2 * np.pi * y / period + phase[1])
    return _texture(rng, h, w, spec, 20.0 * weave)


def _scene_grid(rng, h, w, spec):
    y, x = _coords(h, w)
    period, width = np.sqrt(h * w) / 7, max(2.0, np.sqrt(h * w) / 70)
    off = rng.uniform(0, period, 2)
    lines = ((x + off[0]) % period < width) | ((y + off[1]) % period < width)
    return _texture(rng, h, w, spec, -55.0 * lines)


def _scene_tile(rng, h, w, spec):
    lighting = 18.0 * _smooth(rng, h, w, np.sqrt(h * w) / 2)
    return _texture(rng, h, w, spec, lighting + 3.0 * _smooth(rng, h, w, 3))


def _scene_brushed(rng, h, w, spec):
    streaks = cv2.resize(rng.standard_normal((h, max(w // 16, 2))).astype(np.float32), (w, h))
    return _texture(rng, h, w, spec, 7.0 * streaks)


def _object(rng, h, w, spec, mask: Array, background: Array, shade: Array):
    """Paint a colored object (bool mask) with a shading (float (h, w)) over a background."""
    obj = _jitter(rng, spec.color) + (shade + 3.0 * _smooth(rng, h, w, 4))[..., None]
    image = np.where(mask[..., None], obj, background)
    return image.astype(np.float32), mask, background


def _background(rng, h, w, color) -> Array:
    noise = 3.0 * _smooth(rng, h, w, np.sqrt(h * w) / 6) + 1.5 * rng.standard_normal((h, w))
    return _flat(h, w, _jitter(rng, color, 0.03)) + noise[..., None].astype(np.float32)


def _scene_disc(rng, h, w, spec):
    y, x = _coords(h, w)
    m = min(h, w)
    cy, cx = h / 2 + rng.uniform(-0.03, 0.03) * m, w / 2 + rng.uniform(-0.03, 0.03) * m
    r = 0.4 * m * (1 + 0.02 * rng.standard_normal())
    d = np.hypot(y - cy, x - cx) / r
    ring = 25.0 * np.exp(-(((d - 0.62) / 0.06) ** 2))
    return _object(rng, h, w, spec, d < 1, _background(rng, h, w, (28, 28, 28)), ring - 30 * d**2)


def _scene_bar(rng, h, w, spec):
    y, x = _coords(h, w)
    m = min(h, w)
    angle = rng.uniform(0, np.pi)
    cy, cx = h / 2 + rng.uniform(-0.05, 0.05) * m, w / 2 + rng.uniform(-0.05, 0.05) * m
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)  # along the bar
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    length, width = 0.34 * m, 0.09 * m
    head = np.hypot(u + length, v) < 1.5 * width
    mask = ((np.abs(u) < length) & (np.abs(v) < width)) | head
    thread = np.where(head, 0.0, 14.0 * np.sin(2 * np.pi * u / (0.7 * width)))
    return _object(rng, h, w, spec, mask, _background(rng, h, w, (190, 190, 190)), thread)


def _scene_ellipse(rng, h, w, spec):
    y, x = _coords(h, w)
    m = min(h, w)
    angle = rng.uniform(-0.25, 0.25)
    cy, cx = h / 2 + rng.uniform(-0.04, 0.04) * m, w / 2 + rng.uniform(-0.04, 0.04) * m
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    d = np.hypot(u / (0.42 * w), v / (0.36 * h))
    shade = -35.0 * d**4 + 10.0 * _smooth(rng, h, w, m / 6)
    return _object(rng, h, w, spec, d < 1, _background(rng, h, w, (225, 222, 214)), shade)


def _scene_discs(rng, h, w, spec):
    y, x = _coords(h, w)
    mask, shade = np.zeros((h, w), bool), np.zeros((h, w), np.float32)
    r = 0.2 * min(h, w)
    for fy in (0.28, 0.72):
        for fx in (0.28, 0.72):
            cy, cx = fy * h + rng.uniform(-0.03, 0.03) * h, fx * w + rng.uniform(-0.03, 0.03) * w
            d = np.hypot(y - cy, x - cx) / r
            mask |= d < 1
            shade = np.where(d < 1, -20.0 * d**2, shade)
    return _object(rng, h, w, spec, mask, _background(rng, h, w, (55, 48, 48)), shade)


def _scene_board(rng, h, w, spec):
    y, x = _coords(h, w)
    margin = 0.06 * min(h, w) + rng.uniform(-1, 1)
    mask = (y > margin) & (y < h - margin) & (x > margin) & (x < w - margin)
    pads = np.zeros((h, w), np.float32)
    for fy0, fx0, fy1, fx1 in BOARD_PADS:
        box = (y > fy0 * h) & (y < fy1 * h) & (x > fx0 * w) & (x < fx1 * w)
        pads = np.where(box, 130.0, pads)  # silver pads: the green base plus 130 gray
    return _object(rng, h, w, spec, mask, _background(rng, h, w, (22, 22, 22)), pads)


SCENES: dict[str, Callable] = {
    f.__name__.removeprefix("_scene_"): f
    for f in (_scene_weave, _scene_grid, _scene_tile, _scene_brushed, _scene_disc, _scene_bar,
              _scene_ellipse, _scene_discs, _scene_board)
}  # fmt: skip


# --------------------------------------------------------------------------- defects


def _pick(rng: np.random.Generator, mask: Array) -> tuple[int, int]:
    """A random (y, x) where `mask` is True."""
    ys, xs = np.nonzero(mask)
    k = rng.integers(len(ys))
    return int(ys[k]), int(xs[k])


# Each draws its region with value 1 on `canvas` (uint8 (H, W) zeros) and returns it.


def _region_scratch(rng, inner, obj, m, canvas):
    y, x = _pick(rng, inner)
    angle, length = rng.uniform(0, np.pi), rng.uniform(0.3, 0.55) * m
    dy, dx = np.sin(angle) * length / 2, np.cos(angle) * length / 2
    points = (round(x - dx), round(y - dy)), (round(x + dx), round(y + dy))
    return cv2.line(canvas, points[0], points[1], 1, max(3, round(0.03 * m)))


def _region_crack(rng, inner, obj, m, canvas):
    y, x = _pick(rng, inner)
    angle, step = rng.uniform(0, 2 * np.pi), 0.04 * m
    points = [(x, y)]
    for _ in range(rng.integers(10, 18)):
        angle += rng.uniform(-0.7, 0.7)
        x, y = x + step * np.cos(angle), y + step * np.sin(angle)
        points.append((x, y))
    thickness = max(2, round(0.02 * m))
    return cv2.polylines(canvas, [np.round(points).astype(np.int32)], False, 1, thickness)


def _region_hole(rng, inner, obj, m, canvas):
    y, x = _pick(rng, inner)
    return cv2.circle(canvas, (x, y), max(3, round(rng.uniform(0.05, 0.09) * m)), 1, -1)


def _region_stain(rng, inner, obj, m, canvas):
    y, x = _pick(rng, inner)
    for _ in range(rng.integers(2, 5)):
        center = (round(x + rng.uniform(-0.05, 0.05) * m), round(y + rng.uniform(-0.05, 0.05) * m))
        a, b = rng.uniform(0.04, 0.09) * m, rng.uniform(0.03, 0.07) * m
        axes = (max(2, round(a)), max(2, round(b)))
        cv2.ellipse(canvas, center, axes, rng.uniform(0, 180), 0, 360, 1, -1)
    return canvas


def _region_missing(rng, inner, obj, m, canvas):
    """A bite out of the object's edge (or of the image border, for a texture)."""
    edge = obj & ~cv2.erode(obj.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    if obj.all():  # texture: the edge is the image border
        edge = np.ones_like(obj)
        edge[1:-1, 1:-1] = False
    y, x = _pick(rng, edge)
    return cv2.circle(canvas, (x, y), max(3, round(rng.uniform(0.1, 0.16) * m)), 1, -1)


REGIONS = {
    f.__name__.removeprefix("_region_"): f
    for f in (_region_scratch, _region_crack, _region_hole, _region_stain, _region_missing)
}


def _luma(rgb: Array) -> Array:
    return rgb @ np.array([0.299, 0.587, 0.114], np.float32)


def _paint(rng, kind: str, image: Array, region: Array, background: Array) -> None:
    """Paint defect `kind` over `region` of `image` (float (H, W, 3)), in place, nowhere else."""
    if kind in ("scratch", "crack"):
        image[region] = image[region] * 0.25 + 8.0
    elif kind == "hole":
        image[region] = image[region] * 0.12 + 10.0
    elif kind == "stain":
        local = float(_luma(image[region]).mean())
        far = [c for c in STAIN_COLORS if abs(float(_luma(np.float32(c))) - local) > 50]
        far = far or STAIN_COLORS
        color = np.float32(far[rng.integers(len(far))])
        image[region] = 0.3 * image[region] + 0.7 * color
    else:  # missing: the background shows through
        image[region] = background[region]


def _defect_regions(rng, kinds: Sequence[str], obj: Array) -> list[Array]:
    """Disjoint regions inside the object, one per kind, of total area in AREA_RANGE."""
    if not kinds:
        return []
    h, w = obj.shape
    m = np.sqrt(h * w)
    margin = max(1, round(0.06 * min(h, w)))
    inner = cv2.erode(obj.astype(np.uint8), np.ones((margin, margin), np.uint8)).astype(bool)
    inner = inner if inner.any() else obj
    regions: list[Array] = []
    for _ in range(40):  # redraw until the sizes fit; the last draw is kept otherwise
        drawn = [REGIONS[k](rng, inner, obj, m, np.zeros((h, w), np.uint8)) for k in kinds]
        regions = [d.astype(bool) & obj for d in drawn]
        area = sum(r.sum() for r in regions) / (h * w)
        apart = all(
            not (cv2.dilate(a.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool) & b).any()
            for a, b in itertools.combinations(regions, 2)
        )
        if AREA_RANGE[0] <= area <= AREA_RANGE[1] and apart and all(r.any() for r in regions):
            break
    return regions


def _to_uint8(image: Array, grayscale: bool) -> Array:
    rgb = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return _to_uint8(_luma(rgb.astype(np.float32)), False) if grayscale else rgb


def render(
    spec: ClassSpec, height: int, width: int, rng: np.random.Generator, defects: Sequence[str] = ()
) -> Rendered:
    """Render one image of `spec` with the given defect kinds (none: a normal image)."""
    clean, obj, background = SCENES[spec.scene](rng, height, width, spec)
    image = clean.copy()
    mask = np.zeros((height, width), np.uint8)
    for k, (kind, region) in enumerate(zip(defects, _defect_regions(rng, defects, obj)), 1):
        before = _luma(image[region]) if region.any() else None
        _paint(rng, kind, image, region, background)
        if before is not None and np.abs(_luma(image[region]) - before).mean() < MIN_CONTRAST:
            image[region] += np.float32(-60.0 if before.mean() > 100 else 60.0)  # stay visible
        mask[region] = k
    gray = spec.grayscale
    return Rendered(_to_uint8(image, gray), _to_uint8(clean, gray), mask, tuple(defects))


# --------------------------------------------------------------------------- writing


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    """A generator for one image, independent of every other image (stable string hashing)."""
    ints = [k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys]
    return np.random.default_rng([seed, *ints])


def _save(path: Path, array: Array, quality: int | None = None) -> None:
    """Write an image; PNG losslessly, `.jpg`/`.JPG` with JPEG `quality`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)  # uint8 (H, W) → mode L, (H, W, 3) → RGB
    image.save(path, format="PNG" if quality is None else "JPEG", quality=quality)


def _binary(mask: Array) -> Array:
    return np.where(mask > 0, 255, 0).astype(np.uint8)


def _defect_count(rng: np.random.Generator) -> int:
    return 1 if rng.random() < 0.7 else 2


def _class_size(spec: ClassSpec, size: int) -> tuple[int, int]:
    return max(32, round(spec.size[0] * size)), max(32, round(spec.size[1] * size))


def _select(specs: Sequence[ClassSpec], classes: Sequence[str] | None) -> list[ClassSpec]:
    if classes is None:
        return list(specs)
    known = {s.name: s for s in specs}
    if unknown := [c for c in classes if c not in known]:
        raise DatasetError(f"no synthetic class {', '.join(unknown)}; known: {', '.join(known)}")
    return [known[c] for c in classes]


def _write_mvtec(root: Path, seed: int, n: int, size: int, classes) -> None:
    for spec in _select(MVTEC_CLASSES, classes):
        h, w = _class_size(spec, size)
        folder = root / spec.name
        for split, key in (("train", "train"), ("test", "good"))[: 1 + spec.test_good]:
            for i in range(n):
                rendered = render(spec, h, w, _rng(seed, "mvtec", spec.name, key, i))
                _save(folder / split / "good" / f"{i:03d}.png", rendered.image)
        for i in range(n):
            kind = spec.defects[i % len(spec.defects)]
            rng = _rng(seed, "mvtec", spec.name, "defect", i)
            rendered = render(spec, h, w, rng, [kind] * _defect_count(rng))
            stem = f"{i // len(spec.defects):03d}"
            _save(folder / "test" / kind / f"{stem}.png", rendered.image)
            _save(folder / "ground_truth" / kind / f"{stem}_mask.png", _binary(rendered.mask))


def _write_visa(root: Path, seed: int, n: int, size: int, classes) -> None:
    rows = [["object", "split", "label", "image", "mask"]]
    for spec in _select(VISA_CLASSES, classes):
        h, w = _class_size(spec, size)
        data = Path(spec.name) / "Data"
        for i in range(2 * n):  # the first n normal images train, the others test
            rendered = render(spec, h, w, _rng(seed, "visa", spec.name, "normal", i))
            image = data / "Images" / "Normal" / f"{i:04d}.JPG"
            _save(root / image, rendered.image, quality=92)
            rows.append([spec.name, "train" if i < n else "test", "normal", image.as_posix(), ""])
        for i in range(n):
            rng = _rng(seed, "visa", spec.name, "anomaly", i)
            kinds = rng.choice(spec.defects, size=_defect_count(rng), replace=False)
            rendered = render(spec, h, w, rng, list(kinds))
            image = data / "Images" / "Anomaly" / f"{i:03d}.JPG"
            mask = data / "Masks" / "Anomaly" / f"{i:03d}.png"
            _save(root / image, rendered.image, quality=92)
            _save(root / mask, rendered.mask)  # region ids 1..N, as VisA's masks
            rows.append([spec.name, "test", "anomaly", image.as_posix(), mask.as_posix()])
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)


def _write_mtd(root: Path, seed: int, n: int, size: int, classes) -> None:
    if classes not in (None, [MTD_SPEC.name], (MTD_SPEC.name,)):
        raise DatasetError(f"MTD has one class, {MTD_SPEC.name}")
    for folder, kind in MTD_FOLDERS.items():
        count = 2 * n if kind is None else n
        for i in range(count):
            rng = _rng(seed, "mtd", folder, i)
            h, w = (round(size * f) for f in rng.uniform((0.6, 0.6), (1.0, 1.3)))
            empty = kind is None or (folder in MTD_EMPTY_MASK_FOLDERS and i == count - 1)
            rendered = render(MTD_SPEC, h, w, rng, [] if empty else [kind])
            stem = f"exp{1 + i % 3}_num_{1000 + 37 * i + 7 * len(folder)}"
            _save(root / folder / "Imgs" / f"{stem}.jpg", rendered.image, quality=92)
            _save(root / folder / "Imgs" / f"{stem}.png", _binary(rendered.mask))


def _write_ksdd2(root: Path, seed: int, n: int, size: int, classes) -> None:
    if classes not in (None, [KSDD2_SPEC.name], (KSDD2_SPEC.name,)):
        raise DatasetError(f"KSDD2 has one class, {KSDD2_SPEC.name}")
    h, w = size, max(16, round(size * 230 / 630))  # KSDD2 images are about 230×630 (W×H)
    for split, offset in (("train", 10000), ("test", 20000)):
        for i in range(2 * n):
            rng = _rng(seed, "ksdd2", split, i)
            kinds = [KSDD2_SPEC.defects[rng.integers(4)]] * _defect_count(rng) if i % 3 == 0 else []
            rendered = render(KSDD2_SPEC, h, w, rng, kinds)
            _save(root / split / f"{offset + i}.png", rendered.image)
            _save(root / split / f"{offset + i}_GT.png", _binary(rendered.mask))


WRITERS = {"mvtec": _write_mvtec, "visa": _write_visa, "mtd": _write_mtd, "ksdd2": _write_ksdd2}


def _prepare_root(root: Path) -> None:
    """Empty `root` for a new dataset: only a folder we generated (marker) is replaced."""
    if root.exists() and any(root.iterdir()):
        if not (root / MARKER).is_file():
            raise DatasetError(
                f"{root}: folder is not empty and was not made by this generator; choose "
                "another --out or remove it"
            )
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)


def generate(
    layout: str, out_dir: str | PathLike, *, seed: int = 0, classes: Sequence[str] | None = None,
    images_per_class: int = 6, image_size: int | None = None, write_meta_json: bool = True,
) -> Path:  # fmt: skip
    """Write a synthetic dataset in `layout` (or all four into `out_dir/<layout>`).

    images_per_class: MVTec: train/good, test/good and test defect images per class (each);
    VisA: train normal, test normal and test anomaly images per class; MTD: images per defect
    folder (MT_Free twice as many); KSDD2: 2× per split, one in three anomalous.
    image_size: MVTec side, VisA width, MTD nominal side, KSDD2 height (DEFAULT_SIZES).
    Returns the dataset root (`out_dir` itself for "all"). Seeded: the same arguments give the
    same bytes. A non-empty `out_dir` not made by this generator is an error.
    """
    if layout == "all":
        if classes is not None:
            raise DatasetError("classes= selects classes of one layout, not of 'all'")
        options = dict(seed=seed, images_per_class=images_per_class, image_size=image_size)
        for name in LAYOUTS:
            generate(name, Path(out_dir) / name, write_meta_json=write_meta_json, **options)
        return Path(out_dir)
    if layout not in WRITERS:
        raise DatasetError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}, all")
    if images_per_class < 1:
        raise DatasetError("images_per_class must be at least 1")
    root = Path(out_dir)
    _prepare_root(root)
    size = image_size or DEFAULT_SIZES[layout]
    WRITERS[layout](root, seed, images_per_class, size, classes)
    settings = {"layout": layout, "seed": seed, "classes": classes, "size": size}
    (root / MARKER).write_text(json.dumps({**settings, "images_per_class": images_per_class}))
    if write_meta_json:
        from clipsam_jax.data.meta import write_meta_for_layout  # meta → registry → loaders

        write_meta_for_layout(layout, root)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


def _main(argv: Sequence[str] | None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m clipsam_jax.data.synthetic",
        description="Generate small synthetic anomaly-segmentation datasets in real layouts.",
    )
    parser.add_argument("--layout", required=True, choices=[*LAYOUTS, "all"])
    parser.add_argument("--out", required=True, help="dataset folder (a folder per layout for all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images-per-class", type=int, default=6)
    parser.add_argument("--size", type=int, default=None, help="image size (see generate())")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    root = generate(args.layout, args.out, seed=args.seed,
                    images_per_class=args.images_per_class, image_size=args.size)  # fmt: skip
    files = sum(1 for p in root.rglob("*") if p.is_file())
    print(f"wrote {files} files under {root} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
