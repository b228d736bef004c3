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


def _tile(image: np.ndarray, title: str) -> Image.Image:
    tile = Image.fromarray(image).resize((TILE, TILE), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (TILE, TILE + 18), "white")
    canvas.paste(tile, (0, 18))
    ImageDraw.Draw(canvas).text((4, 3), title, fill="black", font=ImageFont.load_default())
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


def panel(
    rgb: np.ndarray, rough: np.ndarray, final: np.ndarray | None, ground_truth: np.ndarray,
    boxes: np.ndarray | None = None, points: np.ndarray | None = None,
    masks: np.ndarray | None = None, scores: np.ndarray | None = None, title: str = "",
) -> np.ndarray:  # fmt: skip
    """One row of tiles → uint8 RGB. rgb (H, W, 3); rough / final (S, S) in [0, 1];
    ground_truth bool (S, S); boxes (q, 4) and points (q, m, 2) in image pixels; masks
    (q, k, H, W) bool with scores (q, k). Tiles whose inputs are None are left out."""
    tiles = [_tile(rgb, title[:40] or "image"), _tile(overlay(rgb, rough), "rough map")]
    if boxes is not None:
        tiles.append(_tile(_prompt_picture(rgb, boxes, points), f"prompts ({len(boxes)} boxes)"))
    if masks is not None:
        tiles.append(_tile(_mask_picture(rgb, masks, scores), "SAM masks x scores"))
    if final is not None:
        tiles.append(_tile(overlay(rgb, final), "final"))
    truth = np.repeat(ground_truth.astype(np.uint8)[..., None] * 255, 3, axis=-1)
    tiles.append(_tile(truth, "ground truth"))
    canvas = Image.new("RGB", (TILE * len(tiles), TILE + 18), "white")
    for i, tile in enumerate(tiles):
        canvas.paste(tile, (i * TILE, 0))
    return np.asarray(canvas)
