"""Exact ROC / PR curves from one sort, in bounded memory.

Scores become uint32 *order codes* (same order as the float32 scores, -0.0 tied with +0.0).
A class is held as `SortedScores`: the codes of its negatives (normal items) sorted ascending,
4 bytes per item and sorted in place (numpy's SIMD sort, no argsort permutation, no float64
copy), and the far fewer positives as sorted uint64 keys `code << 32 | group`, where the group
is a region id for PRO (0 when unused).

Every curve we need changes slope only at the distinct scores of the positives: between two of
them only negatives enter, so TPR / precision-recall / PRO stay flat. The exact curves are
therefore fully described, at each distinct positive score s_j (descending), by

    tp_j       = #positives with score ≥ s_j       (direct from the sorted positives)
    fp_j       = #negatives with score ≥ s_j       (binary search in the sorted negatives)
    fp_above_j = #negatives with score > s_j       (differs from fp_j only by ties with s_j)

and from these, with P positives and N negatives (Δtp_j = tp_j − tp_{j−1}):

    AUROC  = Σ Δtp_j · (2·(N − fp_j) + (fp_j − fp_above_j)) / (2·P·N)
             (Mann–Whitney: beaten negatives count 1, tied ones ½; summed exactly in int64)
    AP     = Σ Δtp_j / P · tp_j / (tp_j + fp_j)       (sklearn's step-wise Σ (R_j − R_{j−1}) P_j)
    F1-max = max 2·tp_j / (tp_j + fp_j + P)          (= 2PR/(P+R); a point between two positive
             scores has the same tp and more fp, so the maximum is always at some s_j)

These equal scikit-learn's `roc_auc_score`, `average_precision_score` and the max F1 over
`precision_recall_curve`, ties included (same thresholds: every distinct score).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clipsam_jax.metrics.common import check_scores_labels

_SIGN32 = np.uint32(0x80000000)
_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)


def float32_order_key(scores: np.ndarray) -> np.ndarray:
    """Order-preserving uint32 code of scores rounded to float32 (same shape; no NaN allowed).

    Negative floats are bit-inverted, the others get their sign bit set, so unsigned integer
    order equals float order. -0.0 is first turned into +0.0 so both zeros tie.
    """
    x = np.add(scores, np.float32(0.0), dtype=np.float32)  # a fresh copy; -0.0 + 0.0 = +0.0
    bits = x.view(np.uint32)
    flip = (x.view(np.int32) >> 31).view(np.uint32)  # all ones for negatives, else 0
    flip |= _SIGN32
    bits ^= flip
    return bits


def threshold_codes_above(thresholds: np.ndarray) -> np.ndarray:
    """Order code of the smallest float32 strictly greater than each threshold.

    Args:
      thresholds: float64 (K,) real values below the float32 maximum.

    Returns:
      uint32 (K,): `code >= result` selects exactly the scores with score > threshold, the
      exact comparison numpy makes for `float32_scores > float64_threshold`.
    """
    th = np.asarray(thresholds, dtype=np.float64)
    t32 = th.astype(np.float32)
    low = t32.astype(np.float64) <= th  # rounded down or equal: step to the next float32
    t32[low] = np.nextafter(t32[low], np.float32(np.inf))
    return float32_order_key(t32)


def pack_positive_keys(codes: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """uint64 (P,) keys `code << 32 | group` from uint32 codes (P,) and groups (P,) < 2**32."""
    keys = codes.astype(np.uint64) << _SHIFT
    if groups is not None:
        keys |= np.asarray(groups).astype(np.uint64)
    return keys


@dataclass(frozen=True)
class SortedScores:
    """One class's scores after the sort.

    Attributes:
      neg: uint32 (N,) order codes of the negatives, ascending.
      pos: uint64 (P,) keys `code << 32 | group` of the positives, ascending.
    """

    neg: np.ndarray
    pos: np.ndarray

    @property
    def n_neg(self) -> int:
        return int(self.neg.size)

    @property
    def n_pos(self) -> int:
        return int(self.pos.size)

    def neg_at_or_above(self, codes: np.ndarray) -> np.ndarray:
        """int64 (K,) negatives with code ≥ each of `codes` (uint32 (K,), ascending is fastest)."""
        return self.n_neg - np.searchsorted(self.neg, codes, side="left")

    def pos_weight_desc(self, group_weights: np.ndarray | None) -> np.ndarray:
        """float64 (P,) cumulative group weight of the positives from the highest score down."""
        if group_weights is None:
            return np.zeros(self.n_pos)
        return np.cumsum(group_weights[(self.pos & _LOW32)[::-1]])


def sort_scores(scores: np.ndarray, labels: np.ndarray) -> SortedScores:
    """SortedScores of 1-D scores (n,) with bool labels (n,) (True = positive, group 0)."""
    codes = float32_order_key(scores)
    neg = codes[~labels]
    neg.sort()
    pos = pack_positive_keys(codes[labels])
    pos.sort()
    return SortedScores(neg, pos)


@dataclass(frozen=True)
class PositiveCurve:
    """Exact ROC / PR / PRO curves at the K distinct positive scores s_j, descending.

    Attributes:
      tp: int64 (K,) positives with score ≥ s_j (strictly increasing, ends at n_pos).
      fp: int64 (K,) negatives with score ≥ s_j.
      fp_above: int64 (K,) negatives with score > s_j.
      weight: float64 (K,) cumulative group weight of the positives with score ≥ s_j.
      n_pos, n_neg: P and N.
    """

    tp: np.ndarray
    fp: np.ndarray
    fp_above: np.ndarray
    weight: np.ndarray
    n_pos: int
    n_neg: int


def positive_curve(scores: SortedScores, group_weights: np.ndarray | None = None) -> PositiveCurve:
    """The `PositiveCurve` of sorted scores; `group_weights` float64 (G,) indexed by group id."""
    codes_desc = (scores.pos >> _SHIFT).astype(np.uint32)[::-1]
    is_end = np.ones(codes_desc.size, dtype=bool)  # last item of each run of equal scores
    np.not_equal(codes_desc[1:], codes_desc[:-1], out=is_end[:-1])
    ends = np.flatnonzero(is_end)
    distinct_asc = codes_desc[ends][::-1]  # ascending queries keep the binary search local
    fp_asc = scores.neg_at_or_above(distinct_asc)
    fp_above_asc = _neg_above(scores.neg, distinct_asc, fp_asc)
    return PositiveCurve(tp=ends + 1, fp=fp_asc[::-1], fp_above=fp_above_asc[::-1],
                         weight=scores.pos_weight_desc(group_weights)[ends],
                         n_pos=scores.n_pos, n_neg=scores.n_neg)  # fmt: skip


def _neg_above(neg: np.ndarray, codes: np.ndarray, at_or_above: np.ndarray) -> np.ndarray:
    """int64 (K,) negatives with code > each code, given the counts with code ≥ it.

    Only codes that some negative equals need a second search; with continuous scores
    those are rare, which halves the binary-search work.
    """
    first = neg.size - at_or_above  # index of the first negative ≥ code
    tied = first < neg.size
    tied[tied] = neg[first[tied]] == codes[tied]
    above = at_or_above.copy()
    above[tied] = neg.size - np.searchsorted(neg, codes[tied], side="right")
    return above


def roc_pr_metrics(curve: PositiveCurve) -> tuple[float, float, float]:
    """(AUROC, AP, F1-max) of a curve; AUROC nan without positives or negatives, AP and F1-max
    nan without positives."""
    nan = float("nan")
    p, n = curve.n_pos, curve.n_neg
    if p == 0:
        return nan, nan, nan
    tp, fp = curve.tp, curve.fp
    d_tp = np.diff(tp, prepend=0)
    # int64 is exact here: the sum is at most 2·P·N (< 1e16 even for 100 M pixels)
    area2 = int(np.dot(d_tp, 2 * (n - fp) + (fp - curve.fp_above)))
    auroc = area2 / (2 * p * n) if n else nan
    ap = float(np.dot(d_tp, tp / (tp + fp))) / p
    f1 = float((2.0 * tp / (tp + fp + p)).max())
    return auroc, ap, f1


def binary_metrics(scores, labels) -> tuple[float, float, float]:
    """Exact (AUROC, AP, F1-max) of 1-D scores, equal to scikit-learn's values.

    Args:
      scores: real (n,), evaluated as float32 (float64 inputs are rounded; ties after rounding
        count as ties).
      labels: bool or 0/1 (n,), True = anomalous (positive).

    Returns:
      (roc_auc_score, average_precision_score, max F1 over precision_recall_curve). AUROC is
      nan when a class is missing; AP and F1-max are nan without positives.
    """
    scores, labels = check_scores_labels(scores, labels)
    return roc_pr_metrics(positive_curve(sort_scores(scores, labels)))
