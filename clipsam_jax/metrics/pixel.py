"""Pixel-level AUROC, AP, F1-max and PRO of one class from a single sort of all its pixels.

Memory: the normal pixels' order codes take 4 bytes per pixel (one uint32 array, sorted in
place), the anomalous pixels 8 bytes each plus ~50 bytes per distinct anomalous score for the
curve; order codes and region labels are computed image by image. Nothing else is full-size:
the peak extra memory is about 4-7 bytes per pixel plus a few MiB (~0.3 GiB for a 54 M-pixel
VisA class with 5 % anomalous pixels).
"""

from __future__ import annotations

import numpy as np

from clipsam_jax.metrics.common import PIXEL_KEYS, check_maps_masks, check_pro_mode
from clipsam_jax.metrics.curves import (
    SortedScores,
    float32_order_key,
    pack_positive_keys,
    positive_curve,
    roc_pr_metrics,
)
from clipsam_jax.metrics.pro import (
    cflow_pro,
    cflow_thresholds,
    label_regions,
    mvtec_pro,
    region_weights,
)


def sort_pixel_scores(maps: np.ndarray, masks: np.ndarray) -> tuple[SortedScores, np.ndarray]:
    """Sort all pixels of a class, anomalous ones tagged with their region.

    Args:
      maps: real (N, H, W); masks: bool (N, H, W).

    Returns:
      scores: SortedScores; each anomalous pixel's group is its class-wide region id 1..R
        (8-connected components of each image's mask, numbered image after image).
      region_sizes: int64 (R,), pixels of region r at index r - 1.
    """
    n_pos = int(np.count_nonzero(masks))
    neg = np.empty(masks.size - n_pos, dtype=np.uint32)
    pos = np.empty(n_pos, dtype=np.uint64)
    sizes = []
    n_regions = n_neg_done = n_pos_done = 0
    for i in range(maps.shape[0]):
        codes = float32_order_key(maps[i])
        box = _mask_box(masks[i])
        normal = codes.ravel() if box is None else codes[~masks[i]]  # box None: a normal image
        neg[n_neg_done : n_neg_done + normal.size] = normal
        n_neg_done += normal.size
        if box is None:
            continue
        # labelling the mask's bounding box only: defects are small
        labels, k = label_regions(masks[i][box])
        inside = labels > 0
        groups = labels[inside].astype(np.uint64) + np.uint64(n_regions)
        anomalous = pack_positive_keys(codes[box][inside], groups)
        pos[n_pos_done : n_pos_done + anomalous.size] = anomalous
        n_pos_done += anomalous.size
        sizes.append(np.bincount(labels.ravel(), minlength=k + 1)[1:])
        n_regions += k
    neg.sort()  # in place: the one big sort
    pos.sort()
    region_sizes = np.concatenate(sizes) if sizes else np.zeros(0, dtype=np.int64)
    return SortedScores(neg, pos), region_sizes


def _mask_box(mask: np.ndarray) -> tuple[slice, slice] | None:
    """Bounding box (row slice, column slice) of a (H, W) mask, None if it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def pixel_metrics(maps, masks, pro_mode: str = "mvtec") -> dict[str, float]:
    """Exact pixel metrics of one class (all its pixels pooled).

    Args:
      maps: real (N, H, W) anomaly maps (float16/float32; others are rounded to float32).
      masks: bool (N, H, W) ground truth.
      pro_mode: "mvtec" or "cflow" (see `clipsam_jax.metrics.pro`).

    Returns:
      {"pixel_auroc", "pixel_ap", "pixel_f1_max", "pro"}; all nan without anomalous pixels,
      AUROC and PRO nan without normal pixels.
    """
    maps, masks = check_maps_masks(maps, masks)
    return pixel_metrics_checked(maps, masks, check_pro_mode(pro_mode))


def pixel_metrics_checked(maps: np.ndarray, masks: np.ndarray, pro_mode: str) -> dict[str, float]:
    """`pixel_metrics` of inputs already validated by `check_maps_masks` (masks bool)."""
    scores, region_sizes = sort_pixel_scores(maps, masks)
    weights = region_weights(region_sizes)
    curve = positive_curve(scores, weights)
    if pro_mode == "mvtec":
        pro = mvtec_pro(curve)
    else:
        pro = cflow_pro(scores, weights, cflow_thresholds(maps.min(), maps.max()))
    return dict(zip(PIXEL_KEYS, (*roc_pr_metrics(curve), pro)))
