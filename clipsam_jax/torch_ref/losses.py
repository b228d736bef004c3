"""Training losses of ClipSAM (paper Sec. 3.4, Eq. 10-12; docs/method.md §3), PyTorch reference.

Logits are channels-last (B, H, W, 2), channel 1 anomalous; masks are bool, True = anomalous.
focal_loss and dice_loss take logits and mask on the same grid; total_loss brings them there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from clipsam_jax.torch_ref.umci import resize_bilinear_nhwc

STAGE_WEIGHTS = (0.1, 0.1, 0.1, 0.7)  # λ_i, Eq. 12
RESOLUTIONS = ("image", "grid")


def _check_grid(logits: torch.Tensor, mask: torch.Tensor) -> None:
    if logits.ndim != 4 or logits.shape[-1] != 2 or mask.shape != logits.shape[:3]:
        raise ValueError(
            f"expected logits (B, H, W, 2) and mask (B, H, W), got {tuple(logits.shape)} and "
            f"{tuple(mask.shape)}"
        )


def focal_loss(
    logits_bhw2: torch.Tensor, mask_bool: torch.Tensor, gamma: float = 2.0
) -> torch.Tensor:
    """Focal loss (Eq. 10): mean over every pixel of the batch of -(1 - p_t)^γ log p_t.

    p_t is the probability of the pixel's true class (mask True -> class 1), from a
    log-softmax so log p_t stays finite for confident logits. Returns a scalar.
    """
    _check_grid(logits_bhw2, mask_bool)
    log_probs = F.log_softmax(logits_bhw2, dim=-1)
    log_pt = torch.where(mask_bool, log_probs[..., 1], log_probs[..., 0])  # (B, H, W)
    pt = torch.exp(log_pt)
    return (-torch.pow(1.0 - pt, gamma) * log_pt).mean()


def dice_loss(
    logits_bhw2: torch.Tensor, mask_bool: torch.Tensor, smooth: float = 1.0
) -> torch.Tensor:
    """Soft dice on the anomaly probability p (Eq. 11, squared sums), per image, batch mean.

    1 - (2 Σ y p + smooth) / (Σ y² + Σ p² + smooth); the smoothing keeps images without a
    defect well defined. Returns a scalar.
    """
    _check_grid(logits_bhw2, mask_bool)
    p = torch.softmax(logits_bhw2, dim=-1)[..., 1]  # (B, H, W)
    y = mask_bool.to(p.dtype)
    inter = (y * p).sum(dim=(1, 2))
    denom = (y * y).sum(dim=(1, 2)) + (p * p).sum(dim=(1, 2))
    return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()


def downsample_mask(
    masks: torch.Tensor, size: Sequence[int], antialias: bool = True
) -> torch.Tensor:
    """Bool masks (B, S, S) -> (B, h, w): bilinear resize (half-pixel centres), then > 0.5.
    antialias=True widens the kernel by the downscale factor, as jax.image.resize does."""
    resized = F.interpolate(masks[:, None].to(torch.float32), size=tuple(size), mode="bilinear",
                            align_corners=False, antialias=antialias)  # fmt: skip
    return resized[:, 0] > 0.5


def total_loss(
    stage_logits: Sequence[torch.Tensor], masks: torch.Tensor,
    weights: Sequence[float] = STAGE_WEIGHTS, gamma: float = 2.0, smooth: float = 1.0,
    resolution: str = "image", *, mask_antialias: bool = True, align_corners: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """Σ_i λ_i (focal_i + dice_i) (Eq. 12) over the stages.

    stage_logits: list of (B, H, W, 2); masks: bool (B, S, S). resolution="image" resizes each
    stage's logits bilinearly to S×S (docs/method.md §3 choice); "grid" instead downsamples the mask to
    H×W (see downsample_mask) and leaves the logits alone. Returns (total, parts) with parts
    {"focal_i", "dice_i"} per stage i, all scalar tensors still attached to the graph.
    """
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")
    if len(stage_logits) == 0 or len(weights) != len(stage_logits):
        raise ValueError(f"{len(weights)} weights for {len(stage_logits)} stages")
    masks = masks.to(torch.bool)
    total = None
    parts: dict[str, torch.Tensor] = {}
    for i, (weight, logits) in enumerate(zip(weights, stage_logits)):
        grid = tuple(logits.shape[1:3])
        mask = masks
        if resolution == "image" and grid != tuple(masks.shape[1:3]):
            logits = resize_bilinear_nhwc(logits, masks.shape[1:3], align_corners)
        elif resolution == "grid" and grid != tuple(masks.shape[1:3]):
            mask = downsample_mask(masks, grid, antialias=mask_antialias)
        parts[f"focal_{i}"] = focal_loss(logits, mask, gamma)
        parts[f"dice_{i}"] = dice_loss(logits, mask, smooth)
        term = weight * (parts[f"focal_{i}"] + parts[f"dice_{i}"])
        total = term if total is None else total + term
    return total, parts
