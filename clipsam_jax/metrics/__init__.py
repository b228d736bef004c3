"""Exact, memory-bounded anomaly-segmentation metrics (docs/method.md §5).

    compute_metrics(maps, masks, pro_mode="mvtec") -> Metrics (a dict[str, float])

One class at a time: all pixels of the class are pooled (normal and anomalous images). Pixel
AUROC, AP (step-wise) and F1-max equal scikit-learn's `roc_auc_score`,
`average_precision_score` and the max F1 over `precision_recall_curve`, ties included; PRO
follows MVTec AD (`pro_mode="mvtec"`) or the `cal_pro_score` of APRIL-GAN / AnomalyCLIP
(`pro_mode="cflow"`), see `clipsam_jax.metrics.pro`. Image metrics use, by default, the max of
each map as the image score and the mask's non-emptiness as the label; `image_scores` and
`labels` replace them (evaluation passes the final map's pre-Norm peak and the dataset's
annotation, docs/method.md §5.2).

Scores are evaluated as float32 (float16 exactly; float64 maps are rounded, so values that
round to the same float32 tie). Undefined metrics are float('nan'), never an exception:
  - no anomalous pixel: all pixel metrics and PRO;  no normal pixel: pixel AUROC and PRO;
  - no anomalous image: all image metrics;          no normal image: image AUROC;
  - `cflow` PRO also when fewer than two of its thresholds have FPR < 0.3.
Average over classes with `report.mean_over_classes`, which skips nan.

`StreamingPixelMetrics` is a binned, APPROXIMATE alternative for sets too large for the exact
computation (memory O(bins)).
"""

from __future__ import annotations

from clipsam_jax.metrics.common import (
    IMAGE_KEYS,
    METRIC_KEYS,
    PIXEL_KEYS,
    PRO_MODES,
    Metrics,
    MetricsInputError,
    check_image_inputs,
    check_maps_masks,
    check_pro_mode,
)
from clipsam_jax.metrics.curves import binary_metrics
from clipsam_jax.metrics.image import image_metrics, image_metrics_checked
from clipsam_jax.metrics.pixel import pixel_metrics, pixel_metrics_checked
from clipsam_jax.metrics.report import format_table, mean_over_classes
from clipsam_jax.metrics.streaming import StreamingPixelMetrics

__all__ = ["IMAGE_KEYS", "METRIC_KEYS", "PIXEL_KEYS", "PRO_MODES", "Metrics", "MetricsInputError",
           "StreamingPixelMetrics", "binary_metrics", "compute_metrics", "format_table",
           "image_metrics", "mean_over_classes", "pixel_metrics"]  # fmt: skip


def compute_metrics(
    maps, masks, pro_mode: str = "mvtec", *, image_scores=None, labels=None
) -> Metrics:
    """All metrics of one class.

    Args:
      maps: float (N, H, W) anomaly maps (float16 or float32; higher = more anomalous).
      masks: bool (N, H, W) ground truth (0/1 integer masks are accepted and converted).
      pro_mode: "mvtec" (exact MVTec AD PRO, integral to FPR 0.3 / 0.3) or "cflow"
        (APRIL-GAN / AnomalyCLIP `cal_pro_score`, 200 thresholds, FPR rescaled).
      image_scores: optional real (N,) image scores for the image metrics (default: the max of
        each map), e.g. the final maps' peaks before Norm.
      labels: optional binary (N,) image labels for the image metrics (default: the mask is
        non-empty), e.g. the dataset's annotation. Pixel metrics always use `masks`.

    Returns:
      Metrics (a dict) with Python floats in [0, 1] (or nan, see the module docstring) for
      "pixel_auroc", "pixel_ap", "pixel_f1_max", "pro", "image_auroc", "image_ap",
      "image_f1_max"; its `pro_mode` attribute names the PRO definition used.

    Raises:
      MetricsInputError (a ValueError): shape mismatch (also `image_scores` or `labels` not of
        shape (N,)), NaN/inf in maps or image scores, non-binary masks or labels, unknown
        pro_mode.
    """
    check_pro_mode(pro_mode)
    maps, masks = check_maps_masks(maps, masks)  # once, for both levels
    image_scores, labels = check_image_inputs(image_scores, labels, maps.shape[0])
    values = pixel_metrics_checked(maps, masks, pro_mode)
    values.update(image_metrics_checked(maps, masks, image_scores, labels))
    return Metrics({k: float(values[k]) for k in METRIC_KEYS}, pro_mode=pro_mode)
