"""Pictures: anomaly heatmaps, overlays and the evaluation panel
(image | rough map | prompts | SAM masks | final | ground truth)."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

TILE = 256


def heatmap(values: np.ndarray) -> np.ndarray:
    """float (H, W) in [0, 1] → uint8 RGB (H, W, 3), JET colours (blue low, red high)."""
    scaled = np.clip(np.nan_to_num(values), 0.0, 1.0)
    colored = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.cvtColor(colored, cv2.COLOR_BGR2RGB)


def overlay(rgb: np.ndarray, values: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The heatmap of `values` (any size) blended over uint8 RGB (H, W, 3)."""
    height, width = rgb.shape[:2]
    resized = cv2.resize(values.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    return (rgb * (1 - alpha) + heatmap(resized) * alpha).astype(np.uint8)


HEADER = 22  # the title row above each tile


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default(size=15)  # Pillow's bundled scalable font


def _tile(image: np.ndarray, title: str) -> Image.Image:
    tile = Image.fromarray(image).resize((TILE, TILE), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (TILE, TILE + HEADER), "white")
    canvas.paste(tile, (0, HEADER))
    ImageDraw.Draw(canvas).text((4, 3), title, fill="black", font=_font())
    return canvas


def _prompt_picture(rgb: np.ndarray, boxes: np.ndarray, points: np.ndarray) -> np.ndarray:
    picture = Image.fromarray(rgb.copy())
    draw = ImageDraw.Draw(picture)
    width = max(1, rgb.shape[1] // 200)
    for box in boxes:
        draw.rectangle([float(v) for v in box], outline=(0, 255, 0), width=width)
    radius = max(2, rgb.shape[1] // 100)
    for x, y in points.reshape(-1, 2)[:64]:
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(255, 0, 0))
    return np.asarray(picture)


def _mask_picture(rgb: np.ndarray, masks: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """SAM masks weighted by their scores (Eq. 9's sum), over a dimmed image."""
    if masks.size == 0:
        return (rgb * 0.4).astype(np.uint8)
    weighted = np.tensordot(scores.reshape(-1), masks.reshape(-1, *masks.shape[2:]), axes=1)
    weighted = weighted / max(float(weighted.max()), 1e-6)
    return overlay((rgb * 0.6).astype(np.uint8), weighted, alpha=0.6)


def colorbar(height: int = TILE + HEADER, width: int = 64) -> Image.Image:
    """The heatmaps' colour scale, 1 at the top and 0 at the bottom, labelled."""
    inner = height - HEADER - 8
    ramp = heatmap(np.linspace(1.0, 0.0, inner)[:, None].repeat(14, axis=1))
    canvas = Image.new("RGB", (width, height), "white")
    canvas.paste(Image.fromarray(ramp), (6, HEADER))
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for value, y in ((1.0, HEADER), (0.5, HEADER + inner // 2 - 8), (0.0, HEADER + inner - 16)):
        draw.text((24, y), f"{value:.1f}", fill="black", font=font)
    draw.text((4, 3), "scale", fill="black", font=font)
    return canvas


def panel(
    rgb: np.ndarray, rough: np.ndarray, final: np.ndarray | None,
    ground_truth: np.ndarray | None, boxes: np.ndarray | None = None,
    points: np.ndarray | None = None, masks: np.ndarray | None = None,
    scores: np.ndarray | None = None, title: str = "", *, final_map: bool = False,
    with_colorbar: bool = False, columns: int | None = None,
) -> np.ndarray:  # fmt: skip
    """One row of tiles → uint8 RGB. rgb (H, W, 3); rough / final (S, S) in [0, 1];
    ground_truth bool (S, S); boxes (q, 4) and points (q, m, 2) in image pixels; masks
    (q, k, H, W) bool with scores (q, k). Tiles whose inputs are None are left out;
    `final_map` adds the final map's heatmap before its overlay, `with_colorbar` the colour
    scale at the right, `columns` wraps the tiles into rows of that many (the web app's
    panel); default one row."""
    tiles = [_tile(rgb, title[:40] or "image"), _tile(overlay(rgb, rough), "rough map")]
    if boxes is not None:
        label = f"prompts ({len(boxes)} box{'' if len(boxes) == 1 else 'es'})"
        tiles.append(_tile(_prompt_picture(rgb, boxes, points), label))
    if masks is not None:
        tiles.append(_tile(_mask_picture(rgb, masks, scores), "SAM masks x scores"))
    if final is not None:
        if final_map:
            tiles.append(_tile(heatmap(final), "final map"))
        tiles.append(_tile(overlay(rgb, final), "overlay" if final_map else "final"))
    if ground_truth is not None:
        truth = np.repeat(ground_truth.astype(np.uint8)[..., None] * 255, 3, axis=-1)
        tiles.append(_tile(truth, "ground truth"))
    columns = columns or len(tiles)
    rows = -(-len(tiles) // columns)
    scale = colorbar(rows * (TILE + HEADER)) if with_colorbar else None
    width = columns * TILE + (scale.width if scale else 0)
    canvas = Image.new("RGB", (width, rows * (TILE + HEADER)), "white")
    for i, tile in enumerate(tiles):
        canvas.paste(tile, ((i % columns) * TILE, (i // columns) * (TILE + HEADER)))
    if scale:
        canvas.paste(scale, (columns * TILE, 0))
    return np.asarray(canvas)
