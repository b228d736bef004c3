"""Image-level AUROC, AP and F1-max: image score = max of its map, label = mask non-empty."""

from __future__ import annotations

import numpy as np

from clipsam_jax.metrics.common import IMAGE_KEYS, check_maps_masks
from clipsam_jax.metrics.curves import positive_curve, roc_pr_metrics, sort_scores


def image_scores_labels(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores (N,), labels bool (N,)) from maps (N, H, W) and bool masks (N, H, W)."""
    return maps.max(axis=(1, 2)), masks.any(axis=(1, 2))


def image_metrics(maps, masks) -> dict[str, float]:
    """Exact image metrics of one class.

    Args:
      maps: real (N, H, W); masks: bool (N, H, W).

    Returns:
      {"image_auroc", "image_ap", "image_f1_max"}; all nan without anomalous images, AUROC nan
      without normal images.
    """
    maps, masks = check_maps_masks(maps, masks)
    return image_metrics_checked(maps, masks)


def image_metrics_checked(maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """`image_metrics` of inputs already validated by `check_maps_masks` (masks bool)."""
    scores, labels = image_scores_labels(maps, masks)
    return dict(zip(IMAGE_KEYS, roc_pr_metrics(positive_curve(sort_scores(scores, labels)))))
