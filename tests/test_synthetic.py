"""Synthetic datasets: the mask invariant on the arrays, determinism, layout quirks, speed."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from clipsam_jax.data import synthetic
from clipsam_jax.data.synthetic import (
    DEFECTS,
    KSDD2_SPEC,
    MTD_SPEC,
    MVTEC_CLASSES,
    VISA_CLASSES,
    generate,
    render,
)
from clipsam_jax.errors import DatasetError

ALL_SPECS = (*MVTEC_CLASSES, *VISA_CLASSES, MTD_SPEC, KSDD2_SPEC)


def _digest(root) -> dict[str, str]:
    """Relative path → SHA-256 of every file under `root`."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("kind", DEFECTS)
def test_changed_pixels_lie_inside_the_mask(spec, kind):
    for seed in range(3):
        for defects in ([kind], [kind, kind]):
            r = render(spec, 96, 128, np.random.default_rng([seed, 7]), defects)
            assert r.image.shape == r.clean.shape and r.image.dtype == np.uint8
            assert r.image.ndim == (2 if spec.grayscale else 3)
            changed = r.image != r.clean
            changed = changed.any(axis=-1) if changed.ndim == 3 else changed
            assert not (changed & (r.mask == 0)).any(), "a pixel changed outside the mask"
            assert changed.any(), "the defect is invisible"
            assert set(np.unique(r.mask)) == set(range(len(defects) + 1)), "ids must be 1..N"
            area = (r.mask > 0).mean()
            assert 0.005 <= area <= 0.12, f"defect area {area:.3f} of the image"


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.name)
def test_normal_render_is_clean(spec):
    r = render(spec, 80, 64, np.random.default_rng(3))
    assert np.array_equal(r.image, r.clean)
    assert not r.mask.any()


def test_defects_are_visible_in_luminance():
    """Learnability: a defect changes its region clearly (mean |Δ| well above noise)."""
    for spec in ALL_SPECS:
        for kind in spec.defects:
            r = render(spec, 128, 128, np.random.default_rng(11), [kind])
            inside = r.mask > 0
            diff = np.abs(r.image.astype(np.float32) - r.clean.astype(np.float32))
            diff = diff.mean(axis=-1) if diff.ndim == 3 else diff
            assert diff[inside].mean() > 15, f"{spec.name}/{kind} too faint"


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    for layout in synthetic.LAYOUTS:
        a = _digest(generate(layout, tmp_path / "a" / layout, seed=5, images_per_class=2))
        b = _digest(generate(layout, tmp_path / "b" / layout, seed=5, images_per_class=2))
        c = _digest(generate(layout, tmp_path / "c" / layout, seed=6, images_per_class=2))
        assert a == b, layout
        assert a.keys() == c.keys()
        images = [k for k in a if not k.endswith((".json", ".csv"))]
        assert any(a[k] != c[k] for k in images), layout


def test_regenerating_replaces_only_generated_folders(tmp_path):
    root = generate("ksdd2", tmp_path / "k", images_per_class=1)
    (root / "stale.png").write_bytes(b"x")
    generate("ksdd2", root, images_per_class=1)  # a generated root may be replaced
    assert not (root / "stale.png").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not empty"):
        generate("mvtec", foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_layout_quirks(tmp_path):
    root = generate("all", tmp_path, images_per_class=3)
    # MVTec: grayscale classes stored as mode-L PNG; carpet has no test/good.
    assert Image.open(root / "mvtec/grid/test/good/000.png").mode == "L"
    assert Image.open(root / "mvtec/screw/train/good/000.png").mode == "L"
    assert Image.open(root / "mvtec/bottle/test/good/000.png").mode == "RGB"
    assert not (root / "mvtec/carpet/test/good").exists()
    assert (root / "mvtec/carpet/train/good").is_dir()
    # VisA: non-square .JPG, masks with ids 1..N in mode L, the split csv.
    image = Image.open(root / "visa/candle/Data/Images/Anomaly/000.JPG")
    assert image.format == "JPEG" and image.width != image.height
    ids = set()
    for mask_path in (root / "visa").glob("*/Data/Masks/Anomaly/*.png"):
        mask = Image.open(mask_path)
        assert mask.mode == "L"
        values = set(np.unique(np.asarray(mask)).tolist()) - {0}
        assert values == set(range(1, max(values) + 1))
        ids |= values
    assert 2 in ids, "some VisA mask should hold two regions"
    header = (root / "visa/split_csv/1cls.csv").read_text().splitlines()[0]
    assert header == "object,split,label,image,mask"
    # MTD: images of differing sizes, .jpg + same-stem .png.
    sizes = {Image.open(p).size for p in (root / "mtd").glob("MT_*/Imgs/*.jpg")}
    assert len(sizes) > 3
    # KSDD2: portrait images with _GT masks.
    image = Image.open(root / "ksdd2/test/20000.png")
    assert image.height > 2 * image.width
    assert (root / "ksdd2/test/20000_GT.png").is_file()
    for layout in synthetic.LAYOUTS:
        assert (root / layout / "meta.json").is_file()


def test_generates_hundreds_of_images(tmp_path):
    """`images_per_class=8` over every layout gives the few hundred images the test suite and
    the demos rely on (no timing check: how fast depends on the machine)."""
    root = generate("all", tmp_path, images_per_class=8)
    images = [
        p
        for p in root.rglob("*")
        if p.suffix in (".png", ".jpg", ".JPG")
        and "_mask" not in p.stem
        and "_GT" not in p.stem
        and "Masks" not in p.parts
        and not (p.suffix == ".png" and "mtd" in p.parts)
    ]
    assert len(images) >= 200


def test_command_line(tmp_path, capsys):
    out = tmp_path / "v"
    assert synthetic.main(["--layout", "visa", "--out", str(out), "--images-per-class", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (out / "split_csv/1cls.csv").is_file()
    with pytest.raises(SystemExit):
        synthetic.main(["--layout", "nope", "--out", str(out)])


def test_unknown_class_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="known: bottle"):
        generate("mvtec", tmp_path / "m", classes=["nope"])
