"""Image-level AUROC, AP and F1-max of one class (docs/method.md §5.2).

By default an image's score is the maximum of its map and its label the non-emptiness of its
mask. Evaluation passes both explicitly: the final map's score is the peak of the fused map
before Norm (`refine.fusion.fuse_scored`), and the label is the dataset's annotation
(`Sample.label`), so a defect that vanishes when its mask is resized to S×S still counts.
"""

from __future__ import annotations

import numpy as np

from clipsam_jax.metrics.common import IMAGE_KEYS, check_image_inputs, check_maps_masks
from clipsam_jax.metrics.curves import positive_curve, roc_pr_metrics, sort_scores


def image_scores_labels(
    maps: np.ndarray,
    masks: np.ndarray,
    image_scores: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores (N,), labels bool (N,)) from maps (N, H, W) and bool masks (N, H, W): the given
    `image_scores` / `labels` (already validated, see `check_image_inputs`) where not None,
    else each map's maximum / each mask's non-emptiness."""
    scores = maps.max(axis=(1, 2)) if image_scores is None else image_scores
    return scores, masks.any(axis=(1, 2)) if labels is None else labels


def image_metrics(maps, masks, *, image_scores=None, labels=None) -> dict[str, float]:
    """Exact image metrics of one class.

    Args:
      maps: real (N, H, W); masks: bool (N, H, W).
      image_scores: optional real (N,) score of each image (default: the max of its map).
      labels: optional binary (N,) label of each image (default: its mask is non-empty).

    Returns:
      {"image_auroc", "image_ap", "image_f1_max"}; all nan without anomalous images, AUROC nan
      without normal images.

    Raises:
      MetricsInputError (a ValueError): as `check_maps_masks`, and `image_scores` or `labels`
        not of shape (N,) (see `check_image_inputs`).
    """
    maps, masks = check_maps_masks(maps, masks)
    image_scores, labels = check_image_inputs(image_scores, labels, maps.shape[0])
    return image_metrics_checked(maps, masks, image_scores, labels)


def image_metrics_checked(
    maps: np.ndarray,
    masks: np.ndarray,
    image_scores: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> dict[str, float]:
    """`image_metrics` of inputs already validated by `check_maps_masks` (masks bool) and
    `check_image_inputs`."""
    scores, labels = image_scores_labels(maps, masks, image_scores, labels)
    return dict(zip(IMAGE_KEYS, roc_pr_metrics(positive_curve(sort_scores(scores, labels)))))
