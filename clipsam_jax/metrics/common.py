"""Shared pieces of the metrics package: metric keys, the result type and input validation.

Validation is cheap on purpose: NaN and ±inf are found through `maps.min()` / `maps.max()`
(both propagate NaN) instead of a full-size boolean temporary.
"""

from __future__ import annotations

import numpy as np

from clipsam_jax.errors import ClipSamError

PRO_MODES: tuple[str, ...] = ("mvtec", "cflow")
PIXEL_KEYS: tuple[str, ...] = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pro")
IMAGE_KEYS: tuple[str, ...] = ("image_auroc", "image_ap", "image_f1_max")
METRIC_KEYS: tuple[str, ...] = PIXEL_KEYS + IMAGE_KEYS


class MetricsInputError(ClipSamError, ValueError):
    """Maps or masks that cannot be evaluated (wrong shape, dtype, values)."""


class Metrics(dict):
    """A plain `dict[str, float]` of metric values that also records how they were computed.

    Attributes:
      pro_mode: "mvtec" or "cflow": the PRO definition behind the `pro` key (None if absent).
      exact: False for the binned streaming approximation.

    It serializes with `json.dumps` like any dict; store `pro_mode` next to it when saving.
    """

    def __init__(self, values: dict[str, float], *, pro_mode: str | None, exact: bool = True):
        super().__init__(values)
        self.pro_mode = pro_mode
        self.exact = exact

    def __repr__(self) -> str:
        kind = "exact" if self.exact else "approximate"
        return f"Metrics({dict.__repr__(self)}, pro_mode={self.pro_mode!r}, {kind})"


def check_pro_mode(pro_mode: str) -> str:
    """Return `pro_mode` if it is a known PRO definition, else raise MetricsInputError."""
    if pro_mode not in PRO_MODES:
        raise MetricsInputError(f"pro_mode must be one of {PRO_MODES}, got {pro_mode!r}")
    return pro_mode


def check_maps_masks(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    """Validate one class of anomaly maps and ground-truth masks.

    Args:
      maps: real-valued (N, H, W); float16/float32 are used as they are, other real dtypes
        are evaluated after rounding to float32.
      masks: bool (N, H, W); integer or float masks holding only 0 and 1 are converted.

    Returns:
      (maps, masks) as arrays, masks bool. Neither is copied unless masks need converting.

    Raises:
      MetricsInputError (a ValueError): wrong rank or shape, non-numeric maps, NaN or ±inf in
        maps, masks with values other than 0/1.
    """
    maps, masks = np.asarray(maps), np.asarray(masks)
    if maps.ndim != 3:
        raise MetricsInputError(f"maps must be (N, H, W), got shape {maps.shape}")
    if masks.shape != maps.shape:
        raise MetricsInputError(
            f"maps and masks must have the same shape, got maps {maps.shape} "
            f"and masks {masks.shape}"
        )
    if maps.size == 0:
        raise MetricsInputError(f"maps are empty (shape {maps.shape})")
    check_finite_scores(maps, "maps")
    return maps, as_bool_mask(masks, "masks")


def check_scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """Validate 1-D scores (n,) and binary labels (n,) for `binary_metrics`."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise MetricsInputError(
            f"scores and labels must be 1-D of equal length, got scores {scores.shape} "
            f"and labels {labels.shape}"
        )
    if scores.size == 0:
        raise MetricsInputError("scores are empty")
    check_finite_scores(scores, "scores")
    return scores, as_bool_mask(labels, "labels")


def check_image_inputs(
    image_scores, labels, n_images: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Validate the optional explicit image scores and labels of a class of `n_images` maps.

    Args:
      image_scores: None (the maps' maxima are used) or real (N,), one score per map.
      labels: None (the masks' non-emptiness is used) or binary (N,), one label per map, e.g.
        the dataset's annotation (`Sample.label`).
      n_images: N, the number of maps.

    Returns:
      (image_scores or None, labels as bool or None).

    Raises:
      MetricsInputError (a ValueError): a shape other than (N,), NaN/inf or a non-real dtype in
        the scores, labels other than 0/1.
    """
    if image_scores is not None:
        image_scores = np.asarray(image_scores)
        if image_scores.shape != (n_images,):
            raise MetricsInputError(
                f"image_scores must be (N,) = ({n_images},), one score per map, got shape "
                f"{image_scores.shape}"
            )
        check_finite_scores(image_scores, "image_scores")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n_images,):
            raise MetricsInputError(
                f"labels must be (N,) = ({n_images},), one label per map, got shape {labels.shape}"
            )
        labels = as_bool_mask(labels, "labels")
    return image_scores, labels


def check_finite_scores(scores: np.ndarray, name: str) -> None:
    """Reject non-real dtypes, NaN and ±inf without a full-size temporary."""
    if scores.dtype.kind not in "fiu":  # float, signed or unsigned integer (not bool)
        raise MetricsInputError(f"{name} must be a real float array, got dtype {scores.dtype}")
    lo, hi = scores.min(), scores.max()
    if np.isnan(lo) or np.isnan(hi):
        raise MetricsInputError(f"{name} contain NaN; fix the model output before evaluating")
    if np.isinf(lo) or np.isinf(hi):
        raise MetricsInputError(f"{name} contain ±inf (min {lo}, max {hi})")


def as_bool_mask(mask: np.ndarray, name: str) -> np.ndarray:
    """Return `mask` as bool; a numeric mask must hold only 0 and 1 (no silent thresholding)."""
    if mask.dtype == np.bool_:
        return mask
    if mask.dtype.kind not in "fiu":
        raise MetricsInputError(f"{name} must be bool, got dtype {mask.dtype}")
    bad = (mask != 0) & (mask != 1)
    if bad.any():
        example = mask[bad].flat[0]
        raise MetricsInputError(
            f"{name} must be bool or hold only 0 and 1, found {example!r} (dtype {mask.dtype}); "
            f"binarize first, e.g. {name} > 0"
        )
    return mask.astype(bool)
