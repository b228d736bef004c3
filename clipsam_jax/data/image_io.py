"""Image and mask decoding and the CLIP preprocessing shared by training, evaluation and predict.

Images of any PIL mode become uint8 RGB: grayscale and palette images are replicated or
expanded, alpha is dropped, 16-bit and float images are scaled to 8 bits with a note
(`ImageConversionWarning`). Preprocessing squashes to S×S (no crop, aspect ratio ignored) with
PIL's bicubic filter and applies the CLIP mean/std (docs/method.md §1).
"""

from __future__ import annotations

import warnings
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipsam_jax.errors import ImageReadError

# OpenAI CLIP normalization (docs/method.md §1).
CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageConversionWarning(UserWarning):
    """An image was converted in a way that loses information (16-bit or float to 8 bits)."""


EXIF_ORIENTATION = 0x0112  # the EXIF tag that says how the stored pixels are turned


def _open(path: str | PathLike, orientation: int = 1) -> tuple[Image.Image, int]:
    """The decoded image as every viewer shows it: its EXIF orientation tag (cameras, phones)
    applied, or `orientation` when it has none (a mask drawn on its tagged image's pixels);
    with the orientation applied (1: as stored)."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    try:
        image = Image.open(path)
        image.load()  # force decoding now so a truncated file fails here, with its name
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(
            f"{path}: cannot decode this image ({error}). The file is corrupt, truncated or not "
            "an image: re-download it or remove it from the dataset."
        ) from error
    if image.width == 0 or image.height == 0:
        raise ImageReadError(f"{path}: image has zero size ({image.width}x{image.height})")
    exif = image.getexif()
    if not exif.get(EXIF_ORIENTATION):
        if orientation == 1:
            return image, 1
        exif[EXIF_ORIENTATION] = orientation  # turned as its image is
    return ImageOps.exif_transpose(image), exif[EXIF_ORIENTATION]


def pil_to_rgb(image: Image.Image, source: str = "<array>") -> np.ndarray:
    """A PIL image of any mode → uint8 RGB array (H, W, 3)."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image)
        if values.dtype.kind == "f":
            finite = values[np.isfinite(values)]
            low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            if low >= 0.0 and high <= 1.0:
                scaled, how = values * 255.0, "float in [0, 1] scaled by 255"
            else:
                span = max(high - low, 1e-12)
                scaled, how = (
                    (values - low) / span * 255.0,
                    f"float min-max scaled from [{low:g}, {high:g}]",
                )
        elif mode == "I" and values.size and values.max() <= 255 and values.min() >= 0:
            scaled, how = values.astype(np.float64), None  # 8-bit data stored in 32-bit ints
        else:
            scaled, how = values.astype(np.float64) / 257.0, "16-bit scaled to 8 bits (value / 257)"
        if how is not None:
            warnings.warn(f"{source}: {how}", ImageConversionWarning, stacklevel=3)
        gray = np.clip(np.rint(np.nan_to_num(scaled)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode != "RGB":
        image = image.convert("RGB")  # L, 1, P, LA, RGBA, CMYK, YCbCr, ...
    return np.asarray(image, dtype=np.uint8)


def read_image(path: str | PathLike) -> np.ndarray:
    """Decode an image file → uint8 RGB (H, W, 3), EXIF orientation applied. Raises
    `ImageReadError` naming the file."""
    return pil_to_rgb(_open(path)[0], source=str(path))


def read_image_oriented(path: str | PathLike) -> tuple[np.ndarray, int]:
    """`read_image`, and the EXIF orientation it applied (1: none), for the image's mask."""
    image, orientation = _open(path)
    return pil_to_rgb(image, source=str(path)), orientation


def image_size(path: str | PathLike) -> tuple[int, int]:
    """(height, width) of an image file, reading only its header."""
    try:
        with Image.open(path) as image:
            turned = image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8)  # 90° or 270°
            return (image.width, image.height) if turned else (image.height, image.width)
    except (UnidentifiedImageError, OSError) as error:
        raise ImageReadError(f"{path}: cannot decode this image ({error})") from error


def read_mask(path: str | PathLike, expected_hw: tuple[int, int] | None = None,
              orientation: int = 1) -> np.ndarray:  # fmt: skip
    """Decode a ground-truth mask → bool (H, W), True where any channel is > 0 (docs/method.md §5).

    VisA masks hold defect ids 1..N rather than 255, hence `> 0`. A mask without an EXIF tag of
    its own is turned by `orientation`, its image's tag, so the two stay aligned. With
    `expected_hw`, a mask whose size differs from its image's raises `ImageReadError`.
    """
    values = np.asarray(_open(path, orientation)[0])
    mask = values > 0
    if mask.ndim == 3:
        mask = mask.any(axis=-1)
    if expected_hw is not None and mask.shape != tuple(expected_hw):
        raise ImageReadError(
            f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is "
            f"{expected_hw[1]}x{expected_hw[0]}; masks must match their image pixel for pixel"
        )
    return mask


def resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 RGB (H, W, 3) → uint8 (size, size, 3), squashed with PIL bicubic (docs/method.md §1)."""
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC))


def normalize(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) → float32 (..., 3) with CLIP mean/std."""
    return (rgb.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD


def preprocess(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 RGB (H, W, 3) → normalized float32 (size, size, 3), the CLIP input."""
    return normalize(resize_rgb(rgb, size))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """bool (H, W) → bool (size, size): bilinear resize of the 0/1 mask, then `> 0.5` (docs/method.md §5)."""
    if mask.shape == (size, size):
        return mask.astype(bool)
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    resized = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))
    return resized > 127  # uint8 x/255 > 0.5
