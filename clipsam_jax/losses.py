"""Focal + soft dice per stage, weighted over stages (Sec. 3.4, Eq. 10-12, docs/method.md §3)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from clipsam_jax.config import LossConfig
from clipsam_jax.models.heads import upsample_logits


def _batch_mean(per_image: jax.Array, weights: jax.Array | None) -> jax.Array:
    """The mean of (B,) per-image values; with `weights` (B,) the weighted mean: rows of weight 0
    are padding (a batch filled up to the device count) and count for nothing."""
    if weights is None:
        return jnp.mean(per_image)
    return jnp.sum(weights * per_image) / jnp.sum(weights)


def focal_loss(logits: jax.Array, masks: jax.Array, gamma: float = 2.0,
               weights: jax.Array | None = None) -> jax.Array:  # fmt: skip
    """Mean over all pixels of -(1 - p_t)^γ log p_t (Eq. 10), p_t the probability of each
    pixel's true class (mask True → class 1), through log-softmax for stability.

    logits (B, H, W, 2), masks bool (B, H, W), weights float (B,) or None → scalar.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    log_p_true = jnp.where(masks, log_probs[..., 1], log_probs[..., 0])
    focal = -((1.0 - jnp.exp(log_p_true)) ** gamma) * log_p_true
    if weights is None:
        return jnp.mean(focal)
    return _batch_mean(jnp.mean(focal, axis=tuple(range(1, focal.ndim))), weights)


def dice_loss(logits: jax.Array, masks: jax.Array, smooth: float = 1.0,
              weights: jax.Array | None = None) -> jax.Array:  # fmt: skip
    """Soft dice on the anomaly probability, per image, averaged over the batch (Eq. 11 with
    squared sums; smoothing in numerator and denominator so defect-free images are defined).

    logits (B, H, W, 2), masks bool (B, H, W), weights float (B,) or None → scalar.
    """
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1]
    y = masks.astype(jnp.float32)
    axes = tuple(range(1, p.ndim))
    overlap = jnp.sum(y * p, axis=axes)
    total = jnp.sum(y * y, axis=axes) + jnp.sum(p * p, axis=axes)
    return _batch_mean(1.0 - (2.0 * overlap + smooth) / (total + smooth), weights)


def downsample_masks(masks: jax.Array, height: int, width: int) -> jax.Array:
    """bool (B, S, S) → bool (B, height, width): antialiased bilinear then > 0.5 ("grid" loss)."""
    resized = jax.image.resize(masks.astype(jnp.float32), (masks.shape[0], height, width), "linear")
    return resized > 0.5


def total_loss(
    stage_logits: Sequence[jax.Array],
    masks: jax.Array,
    config: LossConfig,
    align_corners: bool = False,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Σ_i λ_i (focal_i + dice_i) (Eq. 12) and its per-stage parts.

    stage_logits: sequence of (B, H, W, 2); masks bool (B, S, S); weights (B,) or None: each
    image's weight in the batch means (0 for padding rows; None: a plain mean). With resolution "image" the
    logits are upsampled to S×S (docs/method.md §3 choice); with "grid" the masks come down to H×W.
    """
    if len(config.stage_weights) != len(stage_logits):
        raise ValueError(
            f"{len(config.stage_weights)} stage weights for {len(stage_logits)} stages"
        )
    total = jnp.zeros((), jnp.float32)
    parts = {}
    for i, (weight, logits) in enumerate(zip(config.stage_weights, stage_logits)):
        if config.resolution == "image":
            target, stage_masks = upsample_logits(logits, masks.shape[-1], align_corners), masks
        else:
            target, stage_masks = logits, downsample_masks(masks, *logits.shape[1:3])
        focal = focal_loss(target, stage_masks, config.focal_gamma, weights)
        dice = dice_loss(target, stage_masks, config.dice_smooth, weights)
        parts[f"focal_{i}"], parts[f"dice_{i}"] = focal, dice
        total = total + weight * (focal + dice)
    return total, parts
