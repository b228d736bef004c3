"""`python -m eval.predict`: outputs and their sizes/scales, SAM on/off, zero-shot, folders with
bad files, naming, and the user errors (tiny CLIP, a 3-step head, tiny-random SAM)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsam_jax import cli
from clipsam_jax.predict_lib import PNG_SCALE, output_names
from eval.predict import main

S = 112  # 8×8 token grid of the tiny CLIP


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_clip_dir) -> dict[str, Path]:
    """The session's tiny CLIP and a UMCI head trained for 3 steps on a one-class synthetic
    MVTec (the head and optimizer settings of tests/test_train.py, so its compiled step is
    reused)."""
    from clipsam_jax.config import ClipConfig, HeadConfig, OptimConfig, TrainConfig
    from clipsam_jax.data.synthetic import generate
    from clipsam_jax.train_lib import train

    root = tmp_path_factory.mktemp("predict")
    clip_dir = tiny_clip_dir
    data = generate("mvtec", root / "mvtec", classes=["bottle"], images_per_class=2, image_size=64)
    clip = ClipConfig(model=str(clip_dir), image_size=S, dtype="float32")
    train(
        TrainConfig(
            dataset="mvtec", data_root=str(data), workdir=str(root / "run"), max_steps=3,
            feature_cache_dir=str(root / "features"), clip=clip,
            head=HeadConfig(hidden_dim=16, pool_sizes=(2, 4)), optim=OptimConfig(batch_size=4, epochs=3, learning_rate=1e-3),
        ),
        progress=False,
    )  # fmt: skip
    return {"clip": clip_dir, "run": root / "run", "data": data}


def _image(path: Path, mode: str = "RGB", size: tuple[int, int] = (80, 50)) -> Path:
    """A small textured image of PIL `mode`, `size` = (W, H)."""
    rng = np.random.default_rng(len(str(path)))
    values = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    if mode == "I;16":
        image = Image.fromarray(values[..., 0].astype(np.uint16) * 257)
    else:
        image = Image.fromarray(values, "RGBA").convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _flags(tiny, *extra: str) -> list[str]:
    return ["--checkpoint", str(tiny["run"]), "--sam-device", "cpu", "--no-progress", *extra]


def test_non_square_image_with_tiny_sam(tiny, tmp_path):
    image = _image(tmp_path / "in" / "part.png", size=(80, 50))
    out = tmp_path / "out"
    # --threshold 0: the whole map is one component, so SAM really runs.
    report = main([str(image), "--class-name", "bottle", "--output", str(out),
                   *_flags(tiny, "--sam", "tiny-random", "--threshold", "0")])  # fmt: skip
    assert report["images"] == 1 and not report["skipped"]
    result = json.loads((out / "part_result.json").read_text())
    assert result["files"] == {"map": "part_map.png", "mask": "part_mask.png",
                               "overlay": "part_overlay.png"}  # fmt: skip
    saved = Image.open(out / "part_map.png")
    assert saved.size == (80, 50)  # the original (W, H), not S×S
    values = np.asarray(saved)
    assert values.dtype == np.uint16 and 0 <= values.min() <= values.max() <= PNG_SCALE
    assert result["map_max"] == pytest.approx(values.max() / PNG_SCALE, abs=1 / PNG_SCALE)
    assert result["grid_score"] >= result["map_max"] - 1e-6  # bilinear never exceeds the grid
    # The image score (docs/method.md §5.2, as eval.main): the fused map's peak BEFORE Norm, so
    # at least the normalized map's maximum, which Norm "max" brings to 1 when the peak is above.
    assert result["score"] >= result["grid_score"] - 1e-6
    if result["score"] > 1.0:
        assert result["grid_score"] == pytest.approx(1.0, abs=1e-6)
    # Independent check: with Norm "none" the written map IS the pre-Norm sum (same prompts and
    # masks), so its maximum is the score the default Norm reports.
    plain = tmp_path / "plain"
    main([str(image), "--class-name", "bottle", "--output", str(plain), "--map-format", "npy",
          *_flags(tiny, "--sam", "tiny-random", "--threshold", "0", "--fusion-norm", "none")])  # fmt: skip
    unnormed = json.loads((plain / "part_result.json").read_text())
    assert unnormed["sam_boxes"] == result["sam_boxes"]
    assert result["score"] == pytest.approx(unnormed["grid_score"], rel=1e-6)
    assert unnormed["score"] == pytest.approx(unnormed["grid_score"], rel=1e-6)
    assert result["rough_score"] == result["rough_grid_score"] == unnormed["rough_score"]
    mask = np.asarray(Image.open(out / "part_mask.png"))
    assert mask.shape == (50, 80) and set(np.unique(mask)) <= {0, 255}
    assert Image.open(out / "part_overlay.png").size == (80, 50)
    assert result["sam_boxes"] >= 1 and result["class_name"] == "bottle"
    model = result["model"]
    assert model["sam"] == "tiny-random" and model["checkpoint_step"] == 3
    assert model["clip_fingerprint"] and model["clip"]["image_size"] == S
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [r["path"] for r in rows] == [str(image)]
    assert float(rows[0]["score"]) == pytest.approx(result["score"])


def test_batch_size_changes_no_map_and_bad_files_inside_batches(tiny, tmp_path):
    # Reading ahead in threads, CLIP one batch ahead and SAM batched over the images of a batch
    # give what one image at a time gives, with an unreadable file inside a batch skipped. CLIP's
    # maps and SAM's mask logits round differently per batch size, so a rare mask pixel at the
    # threshold may flip and move the final map there: all but a few pixels must agree.
    folder = tmp_path / "in"
    for i, size in enumerate([(80, 50), (64, 64), (50, 90), (70, 70), (96, 40)]):
        _image(folder / f"part{i}.png", size=size)
    (folder / "part2b.png").write_bytes(b"not a png")
    maps, boxes = {}, {}
    for batch in (1, 3):
        out = tmp_path / f"out{batch}"
        report = main([str(folder), "--output", str(out), "--map-format", "npy",
                       "--batch-size", str(batch),
                       *_flags(tiny, "--sam", "tiny-random", "--threshold", "0.2",
                               "--sam-attention", "stock")])  # fmt: skip
        assert report["images"] == 5 and [Path(s["path"]).name for s in report["skipped"]] == [
            "part2b.png"
        ]
        rows = list(csv.DictReader((out / "predictions.csv").open()))
        assert [Path(r["path"]).name for r in rows] == [f"part{i}.png" for i in (0, 1, 2)] + [
            "part2b.png", "part3.png", "part4.png"
        ]  # fmt: skip
        maps[batch] = {i: np.load(out / f"part{i}_map.npy") for i in range(5)}
        boxes[batch] = [json.loads((out / f"part{i}_result.json").read_text())["sam_boxes"]
                        for i in range(5)]  # fmt: skip
    assert boxes[3] == boxes[1] and sum(boxes[1]) > 0  # SAM really ran, on the same prompts
    for i in range(5):
        assert maps[3][i].shape == maps[1][i].shape
        assert (np.abs(maps[3][i] - maps[1][i]) > 1e-5).mean() <= 0.01, f"part{i}"


def test_npy_map_without_sam_and_mask_threshold(tiny, tmp_path):
    image = _image(tmp_path / "x.jpg", size=(64, 96))
    png = main([str(image), "--output", str(tmp_path / "png"), *_flags(tiny, "--sam", "none")])
    main([str(image), "--output", str(tmp_path / "npy"), "--map-format", "npy",
          "--mask-threshold", "0.5", *_flags(tiny, "--sam", "none")])  # fmt: skip
    assert png["class_name"] is None and png["prompt_object"] == "object"  # Appendix A
    result = json.loads((tmp_path / "npy" / "x_result.json").read_text())
    values = np.load(tmp_path / "npy" / "x_map.npy")
    assert values.dtype == np.float32 and values.shape == (96, 64)
    assert result["map_max"] == float(values.max())  # exact: the saved map's max
    # Without SAM the image score is the S×S rough map's maximum (as eval.main's rough stage);
    # bilinear upsampling never exceeds it.
    assert result["score"] == result["grid_score"] == result["rough_grid_score"]
    assert values.max() <= result["score"] + 1e-6
    assert result["rough_score"] == result["score"] and result["sam_boxes"] == 0
    quantized = np.asarray(Image.open(tmp_path / "png" / "x_map.png")) / PNG_SCALE
    np.testing.assert_allclose(quantized, np.clip(values, 0, 1), atol=0.5 / PNG_SCALE + 1e-7)
    mask = np.asarray(Image.open(tmp_path / "npy" / "x_mask.png"))
    np.testing.assert_array_equal(mask, np.where(values > 0.5, 255, 0))


def test_folder_zero_shot_bad_file_modes_and_names(tiny, tmp_path, caplog):
    """--no-umci without a checkpoint; grayscale, RGBA, 16-bit; a corrupt file is skipped."""
    folder = tmp_path / "in"
    for name, mode in (("gray.png", "L"), ("rgba.png", "RGBA"), ("deep.png", "I;16"),
                       ("a.jpg", "RGB"), ("a.png", "RGB"), ("sub/a.PNG", "RGB")):  # fmt: skip
        _image(folder / name, mode)
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = [str(folder), "--recursive", "--no-umci", "--clip", str(tiny["clip"]), "--image-size",
            str(S), "--output", str(out), "--sam", "none", "--batch-size", "4",
            "--no-progress"]  # fmt: skip
    with pytest.warns(UserWarning, match="16-bit"):
        assert cli.run(main, argv) == 0
    assert "bad.png" in caplog.text
    assert (out / "keep.txt").read_text() == "mine"  # other files are left alone
    rows = {Path(r["path"]).relative_to(folder).as_posix(): r
            for r in csv.DictReader((out / "predictions.csv").open())}  # fmt: skip
    assert list(rows) == ["a.jpg", "a.png", "bad.png", "deep.png", "gray.png", "rgba.png",
                          "sub/a.PNG"]  # fmt: skip
    assert rows["bad.png"]["error"] and not rows["bad.png"]["score"]
    names = {k: r["name"] for k, r in rows.items() if k != "bad.png"}
    assert names == {"a.jpg": "a", "a.png": "a_png", "deep.png": "deep", "gray.png": "gray",
                     "rgba.png": "rgba", "sub/a.PNG": "sub__a"}  # fmt: skip
    for name in names.values():
        assert Image.open(out / f"{name}_map.png").size == (80, 50)
        result = json.loads((out / f"{name}_result.json").read_text())
        assert result["model"]["head"] == "zero-shot" and result["model"]["checkpoint"] is None
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["images"] == 6 and summary["complete"]
    assert [s["path"] for s in summary["skipped"]] == [str(folder / "bad.png")]
    assert not list(out.glob(".*.partial"))


def test_all_images_unreadable_is_an_error(tiny, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad.jpg").write_bytes(b"nope")
    argv = [str(tmp_path / "in"), "--no-umci", "--clip", str(tiny["clip"]), "--image-size",
            str(S), "--output", str(tmp_path / "out"), "--sam", "none", "--no-progress"]  # fmt: skip
    assert cli.run(main, argv) == 2
    assert "none of the 1 images" in capsys.readouterr().err
    assert "bad.jpg" in (tmp_path / "out" / "predictions.csv").read_text()


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_input", "no such file or folder"),
        ("no_images", "no image files"),
        ("missing_checkpoint", "--no-umci"),
        ("no_checkpoint", "--no-umci"),
        ("output_is_input", "is the input folder"),
    ],
)
def test_user_errors(tmp_path, capsys, case, message):
    folder = tmp_path / "in"
    folder.mkdir()
    if case != "no_images":
        _image(folder / "x.png")
    (folder / "readme.txt").write_text("no images here")
    target = tmp_path / "missing" if case == "missing_input" else folder
    argv = [str(target), "--output", str(folder if case == "output_is_input" else tmp_path / "o")]
    if case != "no_checkpoint":
        argv += ["--checkpoint", str(tmp_path / "no_run")]
    assert cli.run(main, [*argv, "--sam", "none", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if case in ("missing_input", "missing_checkpoint"):
        assert str(target if case == "missing_input" else tmp_path / "no_run") in err
    assert not (tmp_path / "o").exists()


def test_output_names_and_output_folder_inside_input(tmp_path):
    root = tmp_path
    paths = [root / p for p in ("x.png", "X.jpg", "x.jpg", "d/x.png", "d__x.png")]
    assert output_names(paths, root) == ["x", "X_jpg", "x_jpg_2", "d__x", "d__x_png"]
    from clipsam_jax.predict_lib import find_images

    _image(root / "x.png")
    _image(root / "out" / "x_overlay.png")  # an earlier run's output inside the input folder
    _image(root / ".hidden" / "y.png")
    found, base = find_images(root, recursive=True, exclude=root / "out")
    assert found == [root / "x.png"] and base == root


def test_exif_orientation_is_applied(tiny, tmp_path):
    """A photo stored 200x100 with an EXIF tag "rotate 90° to display" is 100x200 on screen:
    its map, mask and overlay are too, and the map follows the displayed picture."""
    stored = np.zeros((100, 200, 3), np.uint8)
    stored[:, :100] = 255  # the stored left half white: the top half once displayed
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # EXIF orientation 6: rotate 90° clockwise to display
    path = tmp_path / "in" / "phone.jpg"
    path.parent.mkdir()
    image.save(path, exif=exif)
    out = tmp_path / "out"
    main([str(path), "--output", str(out), "--no-umci", "--clip", str(tiny["clip"]),
          "--image-size", str(S), "--sam", "none", "--no-progress"])  # fmt: skip
    for suffix in ("map", "mask", "overlay"):
        assert Image.open(out / f"phone_{suffix}.png").size == (100, 200), suffix  # (W, H)
    overlay = np.asarray(Image.open(out / "phone_overlay.png").convert("L"), np.float64)
    assert overlay[:100].mean() > overlay[100:].mean()  # the white half on top, as displayed
