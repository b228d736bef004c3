"""Image decoding and CLIP preprocessing against an independent PIL computation; bad images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clipsam_jax.data.image_io import (
    ImageConversionWarning,
    preprocess,
    read_image,
    read_mask,
    resize_mask,
)
from clipsam_jax.errors import ImageReadError


def reference_preprocess(path, size: int) -> np.ndarray:
    """Independent: PIL → RGB → bicubic squash → /255 → CLIP mean/std (numbers of OpenAI CLIP)."""
    image = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(image, np.float64) / 255.0
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    return (x - mean) / std


@pytest.mark.parametrize(
    ("mode", "suffix", "size_wh"),
    [("RGB", ".png", (64, 48)), ("L", ".png", (40, 40)), ("RGBA", ".png", (30, 50)),
     ("P", ".png", (33, 21)), ("RGB", ".jpg", (97, 41)), ("1", ".png", (16, 16))],
)  # fmt: skip
def test_preprocess_matches_pil_reference(tmp_path, mode, suffix, size_wh):
    rng = np.random.default_rng(0)
    w, h = size_wh
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    image = rgb.convert(mode) if mode != "RGBA" else rgb.convert("RGBA")
    path = tmp_path / f"img{suffix}"
    image.save(path)
    ours = preprocess(read_image(path), 70)
    assert ours.shape == (70, 70, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference_preprocess(path, 70), atol=1e-5)


def test_grayscale_is_replicated_to_three_channels(tmp_path):
    values = np.arange(48, dtype=np.uint8).reshape(6, 8)
    Image.fromarray(values, "L").save(tmp_path / "gray.png")
    rgb = read_image(tmp_path / "gray.png")
    assert rgb.shape == (6, 8, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], values)


def test_16bit_image_scaled_with_a_note(tmp_path):
    values = np.array([[0, 257, 65535], [1000, 30000, 514]], np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with pytest.warns(ImageConversionWarning, match=r"deep\.png: 16-bit scaled"):
        rgb = read_image(tmp_path / "deep.png")
    np.testing.assert_array_equal(rgb[..., 0], np.rint(values / 257.0).astype(np.uint8))


def test_float_image_scaled_with_a_note(tmp_path):
    values = np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)
    Image.fromarray(values, "F").save(tmp_path / "float.tif")
    with pytest.warns(ImageConversionWarning, match="float in"):
        rgb = read_image(tmp_path / "float.tif")
    np.testing.assert_array_equal(rgb[..., 1], [[0, 128], [255, 64]])


def test_unreadable_file_names_path(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"this is not a png")
    with pytest.raises(ImageReadError, match=r"broken\.png: cannot decode.*re-download"):
        read_image(path)


def test_truncated_jpeg_names_path(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ImageReadError, match=r"cut\.jpg"):
        read_image(path)


def test_missing_file_names_path(tmp_path):
    with pytest.raises(ImageReadError, match=r"nothing\.png: no such file"):
        read_image(tmp_path / "nothing.png")


def test_zero_size_image_rejected(tmp_path):
    # PIL cannot write a 0×0 image: forge a PNG whose IHDR says 0×0 (valid chunk layout).
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 0, 0, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    path = tmp_path / "empty.png"
    path.write_bytes(png)
    with pytest.raises(ImageReadError, match=r"empty\.png"):
        read_image(path)


def test_mask_binarized_above_zero_and_size_checked(tmp_path):
    ids = np.array([[0, 1, 2], [0, 0, 3]], np.uint8)  # VisA-style defect ids
    Image.fromarray(ids).save(tmp_path / "mask.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "mask.png"), ids > 0)
    with pytest.raises(ImageReadError, match=r"mask is 3x2 \(WxH\) but its image is 4x2"):
        read_mask(tmp_path / "mask.png", expected_hw=(2, 4))


def test_resize_mask_threshold_half():
    mask = np.zeros((4, 4), bool)
    mask[:, :2] = True
    resized = resize_mask(mask, 2)
    np.testing.assert_array_equal(resized, [[True, False], [True, False]])
    assert resize_mask(mask, 4) is not mask and resize_mask(mask, 4).dtype == bool


# ---------------------------------------------------------------- mutation-testing additions
# (benchmarks/mutation/README.md: each test below kills mutants that survived the first run)


def test_image_suffixes_are_the_formats_read(tmp_path):
    # predict and the dataset scanners accept exactly these (lower-case) suffixes; each one is a
    # format that PIL writes and read_image decodes back to the same RGB pixels (lossless ones).
    from clipsam_jax.data.image_io import IMAGE_SUFFIXES

    assert IMAGE_SUFFIXES == (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    for suffix in IMAGE_SUFFIXES:
        path = tmp_path / f"img{suffix}"
        Image.fromarray(rgb).save(path, **({"lossless": True} if suffix == ".webp" else {}))
        out = read_image(path)
        assert out.shape == (5, 7, 3) and out.dtype == np.uint8
        if suffix not in (".jpg", ".jpeg"):
            np.testing.assert_array_equal(out, rgb)


def test_error_messages_exact(tmp_path):
    from clipsam_jax.data.image_io import image_size

    missing = tmp_path / "nothing.png"
    with pytest.raises(ImageReadError) as info:
        read_image(missing)
    assert str(info.value) == f"{missing}: no such file"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a png")
    with pytest.raises(ImageReadError) as info:
        read_image(broken)
    message = str(info.value)
    assert message.startswith(f"{broken}: cannot decode this image (")
    assert message.endswith(
        "). The file is corrupt, truncated or not an image: re-download it or remove it from "
        "the dataset."
    )
    with pytest.raises(ImageReadError) as info:
        image_size(broken)
    assert str(info.value).startswith(f"{broken}: cannot decode this image (")
    assert str(info.value).endswith(")") and "re-download" not in str(info.value)


def test_image_size_reads_height_width(tmp_path):
    from clipsam_jax.data.image_io import image_size

    Image.fromarray(np.zeros((3, 11, 3), np.uint8)).save(tmp_path / "wide.png")
    assert image_size(tmp_path / "wide.png") == (3, 11)


@pytest.mark.parametrize("hw", [(1, 5), (5, 1), (1, 1)])
def test_one_pixel_wide_or_high_images_are_read(tmp_path, hw):
    values = np.arange(hw[0] * hw[1] * 3, dtype=np.uint8).reshape(*hw, 3)
    Image.fromarray(values).save(tmp_path / "thin.png")
    np.testing.assert_array_equal(read_image(tmp_path / "thin.png"), values)


@pytest.mark.parametrize(("mode", "dtype"), [("I;16", "<u2"), ("I;16L", "<u2"),
                                             ("I;16B", ">u2"), ("I;16N", "=u2")])  # fmt: skip
def test_every_16bit_mode_scaled_by_257_even_when_small(mode, dtype):
    from clipsam_jax.data.image_io import pil_to_rgb

    # values ≤ 255 too: a 16-bit image is always divided by 257 (only mode "I" can hold 8-bit data)
    values = np.array([[0, 100, 255], [257, 1000, 65535]], np.uint16)
    image = Image.frombuffer(mode, (3, 2), values.astype(dtype).tobytes(), "raw", mode, 0, 1)
    with pytest.warns(ImageConversionWarning) as record:
        rgb = pil_to_rgb(image)
    assert [str(w.message) for w in record] == ["<array>: 16-bit scaled to 8 bits (value / 257)"]
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    expected = np.array([[0, 0, 1], [1, 4, 255]], np.uint8)  # rint(v / 257) by hand
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)


def test_int32_image_with_8bit_values_kept_without_note():
    import warnings

    from clipsam_jax.data.image_io import pil_to_rgb

    values = np.array([[0, 1, 128], [200, 254, 255]], np.int32)  # min exactly 0, max exactly 255
    image = Image.fromarray(values)
    assert image.mode == "I"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rgb = pil_to_rgb(image)
    assert rgb.shape == (2, 3, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], values)


@pytest.mark.parametrize(
    ("values", "expected"),
    [([[0, 256], [128, 1]], [[0, 1], [0, 0]]),  # max exactly 256 > 255: / 257
     ([[0, 256], [514, 70000]], [[0, 1], [2, 255]]),  # 70000 / 257 clips to 255
     ([[-1, 255], [514, 1]], [[0, 1], [2, 0]])],  # min −1 < 0: / 257, −1/257 clips to 0
)  # fmt: skip
def test_int32_image_outside_8bit_scaled_by_257(values, expected):
    from clipsam_jax.data.image_io import pil_to_rgb

    image = Image.fromarray(np.array(values, np.int32))
    assert image.mode == "I"
    with pytest.warns(ImageConversionWarning, match="16-bit scaled"):
        rgb = pil_to_rgb(image, source="deep.tif")
    np.testing.assert_array_equal(rgb[..., 2], expected)


def test_float_image_in_unit_range_times_255(tmp_path):
    values = np.array([[0.0, 0.75], [1.0, 0.1]], np.float32)  # 0.75·255 = 191.25 → 191
    Image.fromarray(values, "F").save(tmp_path / "unit.tif")
    with pytest.warns(ImageConversionWarning) as record:
        rgb = read_image(tmp_path / "unit.tif")
    assert [str(w.message) for w in record] == [
        f"{tmp_path / 'unit.tif'}: float in [0, 1] scaled by 255"
    ]
    # the note points at the caller of read_image (stacklevel), i.e. this file
    assert record[0].filename == __file__
    np.testing.assert_array_equal(rgb[..., 0], [[0, 191], [255, 26]])


@pytest.mark.parametrize(
    ("values", "expected", "note"),
    [
        # [2, 6]: (v − 2) / 4 · 255 → 0, 191.25 → 191, 255, 63.75 → 64
        ([[2.0, 5.0], [6.0, 3.0]], [[0, 191], [255, 64]], "[2, 6]"),
        # [0, 1.5] (max above 1): v / 1.5 · 255 → 0, 85, 255, 127.5 → 128 (round half to even)
        ([[0.0, 0.5], [1.5, 0.75]], [[0, 85], [255, 128]], "[0, 1.5]"),
        # [-0.5, 0.5] (min below 0): (v + 0.5) · 255 → 0, 255, 127.5 → 128, 191.25 → 191
        ([[-0.5, 0.5], [0.0, 0.25]], [[0, 255], [128, 191]], "[-0.5, 0.5]"),
    ],
)
def test_float_image_outside_unit_range_min_max_scaled(values, expected, note):
    from clipsam_jax.data.image_io import pil_to_rgb

    image = Image.fromarray(np.array(values, np.float32), "F")
    with pytest.warns(ImageConversionWarning) as record:
        rgb = pil_to_rgb(image, source="x.tif")
    assert [str(w.message) for w in record] == [f"x.tif: float min-max scaled from {note}"]
    np.testing.assert_array_equal(rgb[..., 1], expected)


def test_float_image_without_finite_values_is_black_with_unit_note():
    from clipsam_jax.data.image_io import pil_to_rgb

    image = Image.fromarray(np.full((2, 2), np.nan, np.float32), "F")
    with pytest.warns(ImageConversionWarning) as record:
        rgb = pil_to_rgb(image, source="nan.tif")
    assert [str(w.message) for w in record] == ["nan.tif: float in [0, 1] scaled by 255"]
    np.testing.assert_array_equal(rgb, np.zeros((2, 2, 3), np.uint8))


def test_rgb_mask_any_channel_above_zero(tmp_path):
    values = np.zeros((2, 3, 3), np.uint8)
    values[0, 1, 2] = 7  # only the blue channel
    values[1, 2, 0] = 255  # only the red channel
    Image.fromarray(values).save(tmp_path / "rgb_mask.png")
    mask = read_mask(tmp_path / "rgb_mask.png", expected_hw=(2, 3))
    np.testing.assert_array_equal(mask, [[False, True, False], [False, False, True]])


def test_resize_mask_threshold_at_127_and_128():
    # Independent: PIL's own uint8 bilinear output, then x / 255 > 0.5 (i.e. 127 → False and
    # 128 → True). Seed 3 gives one cell at exactly 127 and one at exactly 128.
    mask = np.random.default_rng(3).random((13, 13)) > 0.5
    levels = np.asarray(
        Image.fromarray(mask.astype(np.uint8) * 255).resize((5, 5), Image.Resampling.BILINEAR)
    )
    assert (levels == 127).sum() == 1 and (levels == 128).sum() == 1
    out = resize_mask(mask, 5)
    np.testing.assert_array_equal(out, levels / 255.0 > 0.5)
    assert not out[levels == 127].any() and out[levels == 128].all()
