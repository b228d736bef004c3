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
