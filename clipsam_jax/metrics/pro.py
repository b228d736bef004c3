"""PRO (per-region overlap) in two definitions, both from the single sort of `curves`.

Regions are the 8-connected components of each image's mask, labelled once. Each anomalous
pixel of region r carries the weight 1 / (|r| · R), R = number of regions of the class, so the
cumulative weight of the pixels scoring above a threshold *is* the mean per-region overlap
(PRO), and FPR is the share of normal pixels above it: the whole curve is a weighted ROC curve
and comes from the same sort as the pixel AUROC (`curves.PositiveCurve`).

`mvtec` (MVTec AD's official definition; the default):
  every distinct threshold t, prediction score ≥ t; curve (FPR, PRO) starting at (0, 0);
  trapezoidal area over FPR ∈ [0, 0.3] with linear interpolation at FPR = 0.3, divided by 0.3.

`cflow` (reproduces `cal_pro_score` of APRIL-GAN / AnomalyCLIP, from CFLOW-AD):
  200 thresholds `np.arange(min, max, (max - min) / 200)` computed in the maps' dtype (float
  rounding can make it 201), prediction score > th (strict); keep the points with FPR < 0.3;
  rescale those FPRs to [0, 1] by (fpr - min) / (max - min); area by the trapezoid rule in
  threshold order (sklearn.metrics.auc). No division by 0.3. Identical to the reference for
  float16 / float32 maps; float64 maps are compared after rounding the scores to float32.

Where they differ: ≥ vs >, exact curve vs 200 thresholds, interpolation at 0.3 vs dropping the
points at FPR ≥ 0.3, dividing by 0.3 vs stretching the kept FPR range to [0, 1]. The stretch
matters most: when the kept FPRs span far less than [0, 0.3] (e.g. most normal pixels tie at
the minimum score, so even the lowest threshold has a small FPR), `cflow` reports the area over
that short FPR range as if it were the whole axis.

Undefined cases return nan: no region or no normal pixel; `cflow` also when fewer than two
thresholds have FPR < 0.3, when their FPRs are all equal, or when the maps are constant.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from clipsam_jax.metrics.curves import PositiveCurve, SortedScores, threshold_codes_above

MAX_FPR = 0.3
CFLOW_STEPS = 200
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of one mask: (int32 (H, W) labels 0..k, k)."""
    labels, k = ndimage.label(mask, structure=EIGHT_CONNECTED)
    return labels, int(k)


def region_weights(region_sizes: np.ndarray) -> np.ndarray:
    """Per-group weights (R + 1,): 0 for group 0 (normal), 1 / (size · R) for region r ≥ 1."""
    sizes = np.asarray(region_sizes, dtype=np.float64)
    weights = np.zeros(sizes.size + 1)
    weights[1:] = 1.0 / (sizes * sizes.size)
    return weights


def mvtec_pro(curve: PositiveCurve, max_fpr: float = MAX_FPR) -> float:
    """MVTec AD PRO: area under the exact (FPR, PRO) curve over [0, max_fpr], / max_fpr.

    The exact curve (every distinct threshold) is the polyline (0, 0), then for each distinct
    anomalous score s_j: (fp_above_j / N, W_{j−1}) and (fp_j / N, W_j), then (1, 1); the
    thresholds in between hold only normal pixels and lie on its flat stretches.

    Args:
      curve: with `weight` = cumulative region weights (PRO at each s_j).

    Returns:
      PRO in [0, 1]; nan without normal pixels or without regions.
    """
    if curve.n_neg == 0 or curve.n_pos == 0:
        return float("nan")
    x, y = np.zeros(2 * curve.tp.size + 2), np.zeros(2 * curve.tp.size + 2)  # from (0, 0)
    x[1:-1:2] = curve.fp_above / curve.n_neg
    y[1:-1:2] = np.concatenate(([0.0], curve.weight[:-1]))
    x[2:-1:2] = curve.fp / curve.n_neg
    y[2:-1:2] = curve.weight
    x[-1], y[-1] = 1.0, curve.weight[-1]
    return trapezoid_up_to(x, y, max_fpr) / max_fpr


def trapezoid_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area of the polyline (x, y) (x non-decreasing, (K,)) over [x[0], x_max],
    interpolating y linearly at x_max (as MVTec AD's `trapezoid(..., x_max)`)."""
    k = int(np.searchsorted(x, x_max, side="right"))  # points with x ≤ x_max
    area = 0.5 * float(np.dot(np.diff(x[:k]), y[1:k] + y[: k - 1]))
    if 0 < k < x.size:
        x0, y0, x1, y1 = x[k - 1], y[k - 1], x[k], y[k]
        y_cut = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * float(y0 + y_cut) * (x_max - x0)
    return area


def cflow_thresholds(lo, hi, steps: int = CFLOW_STEPS) -> np.ndarray:
    """The thresholds of `cal_pro_score`: float64 (K,), K = 200 or, by rounding, 201.

    Args:
      lo, hi: min and max of all maps, as numpy scalars of the maps' dtype (the reference
        computes the step in that dtype).
    """
    if not hi > lo:
        return np.zeros(0)
    delta = (hi - lo) / steps
    return np.asarray(np.arange(lo, hi, delta), dtype=np.float64)  # same call as the reference


def cflow_pro(
    scores: SortedScores,
    group_weights: np.ndarray,
    thresholds: np.ndarray,
    max_fpr: float = MAX_FPR,
) -> float:
    """`cal_pro_score` from the sorted scores: (FPR, PRO) at each threshold (score > th).

    Args:
      scores: the class's sorted scores, positives grouped by region.
      group_weights: float64 (R + 1,) from `region_weights`.
      thresholds: float64 (K,) increasing, from `cflow_thresholds`.

    Returns:
      The reference's value; nan when undefined (see the module docstring).
    """
    if scores.n_neg == 0 or scores.n_pos == 0:
        return float("nan")
    codes = threshold_codes_above(thresholds)
    fprs = scores.neg_at_or_above(codes) / scores.n_neg
    n_above = scores.n_pos - np.searchsorted(scores.pos, codes.astype(np.uint64) << 32)
    weight_desc = np.concatenate(([0.0], scores.pos_weight_desc(group_weights)))
    return cflow_area(fprs, weight_desc[n_above], max_fpr)


def cflow_area(fprs: np.ndarray, pros: np.ndarray, max_fpr: float = MAX_FPR) -> float:
    """Area of `cal_pro_score` from per-threshold FPR and PRO (K,), thresholds increasing."""
    keep = fprs < max_fpr
    if np.count_nonzero(keep) < 2:
        return float("nan")
    x, y = fprs[keep], pros[keep]
    span = x.max() - x.min()
    if span == 0:
        return float("nan")
    x = (x - x.min()) / span
    # FPR falls as the threshold rises, so sklearn.metrics.auc flips the sign of the trapezoid
    return -0.5 * float(np.dot(np.diff(x), y[1:] + y[:-1]))
