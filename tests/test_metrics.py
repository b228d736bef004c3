"""Tests of clipsam_jax.metrics: sklearn parity, closed-form PRO, references, edge cases."""

from __future__ import annotations

import json
import math
import tracemalloc

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import (
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
)

from clipsam_jax.metrics import (
    METRIC_KEYS,
    Metrics,
    MetricsInputError,
    StreamingPixelMetrics,
    binary_metrics,
    compute_metrics,
    format_table,
    mean_over_classes,
)

# ---------------------------------------------------------------- references and fixtures


def sklearn_f1_max(labels, scores) -> float:
    """Max F1 = 2PR/(P+R) over sklearn's precision_recall_curve, 0 where P+R = 0."""
    p, r, _ = precision_recall_curve(labels, scores)
    denom = p + r
    f1 = np.divide(2 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def sklearn_triple(labels, scores) -> tuple[float, float, float]:
    return (
        roc_auc_score(labels, scores),
        average_precision_score(labels, scores),
        sklearn_f1_max(labels, scores),
    )


def regions_of(masks):
    """[(image index, bool region mask (H, W))] with 8-connectivity, labelled once."""
    out = []
    for i, mask in enumerate(masks):
        labels, k = ndimage.label(mask, structure=np.ones((3, 3)))
        out += [(i, labels == r) for r in range(1, k + 1)]
    return out


def reference_cal_pro_score(maps, masks, max_step=200, expect_fpr=0.3):
    """Straightforward loop re-implementation of APRIL-GAN/AnomalyCLIP `cal_pro_score`."""
    regions = regions_of(masks)
    normal = ~masks
    min_th, max_th = maps.min(), maps.max()
    delta = (max_th - min_th) / max_step
    pros, fprs = [], []
    for th in np.arange(min_th, max_th, delta):
        binary = maps > th
        pros.append(np.mean([binary[i][r].sum() / r.sum() for i, r in regions]))
        fprs.append(np.logical_and(normal, binary).sum() / normal.sum())
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < expect_fpr
    fprs = fprs[keep]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return auc(fprs, pros[keep])


def reference_mvtec_pro(maps, masks, max_fpr=0.3):
    """MVTec AD PRO the long way: argsort, per-pixel region weights, keep the last of ties."""
    weights = np.zeros(masks.shape)
    regions = regions_of(masks)
    for i, r in regions:
        weights[i][r] = 1.0 / (r.sum() * len(regions))
    order = np.argsort(-maps.ravel().astype(np.float64), kind="stable")
    s = maps.ravel()[order]
    fpr = np.cumsum(~masks.ravel()[order]) / (~masks).sum()
    pro = np.cumsum(weights.ravel()[order])
    last = np.append(np.diff(s) != 0, True)
    x = np.concatenate(([0.0], fpr[last], [1.0]))
    y = np.concatenate(([0.0], pro[last], [1.0]))
    area = 0.0
    for j in range(1, x.size):
        if x[j] > max_fpr:
            y_cut = y[j - 1] + (y[j] - y[j - 1]) * (max_fpr - x[j - 1]) / (x[j] - x[j - 1])
            area += 0.5 * (y[j - 1] + y_cut) * (max_fpr - x[j - 1])
            break
        area += 0.5 * (y[j] + y[j - 1]) * (x[j] - x[j - 1])
    return area / max_fpr


def blob_masks(rng, n, h, w, anomalous_every=2, max_radius=5):
    """bool (n, h, w): discs in every `anomalous_every`-th image, 1-3 per image."""
    yy, xx = np.mgrid[:h, :h] if h == w else np.mgrid[:h, :w]
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(0, n, anomalous_every):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(0, h), rng.integers(0, w)
            r = rng.integers(1, max_radius + 1)
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return masks


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ---------------------------------------------------------------- sklearn parity


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [3, 9, 1000])
def test_binary_metrics_match_sklearn_with_ties(seed, levels):
    rng = np.random.default_rng(seed)
    n = 400
    # quantized scores (many ties), negative values and both signed zeros included
    scores = (rng.integers(-levels, levels + 1, n) / levels).astype(np.float32)
    scores[rng.random(n) < 0.1] = -0.0
    labels = rng.random(n) < (0.05 + 0.4 * rng.random())
    labels[0], labels[1] = True, False  # both classes present
    ours = binary_metrics(scores, labels)
    np.testing.assert_allclose(ours, sklearn_triple(labels, scores), rtol=0, atol=1e-6)


def test_binary_metrics_all_positive_and_all_negative():
    scores = np.array([0.1, 0.5, 0.5, 0.9], dtype=np.float32)
    auroc, ap, f1 = binary_metrics(scores, np.ones(4, dtype=bool))
    assert math.isnan(auroc) and ap == pytest.approx(1.0) and f1 == pytest.approx(1.0)
    assert all(math.isnan(v) for v in binary_metrics(scores, np.zeros(4, dtype=bool)))


@pytest.mark.parametrize("pro_mode", ["mvtec", "cflow"])
def test_pixel_and_image_metrics_match_sklearn(rng, pro_mode):
    masks = blob_masks(rng, 12, 24, 20, anomalous_every=2)
    maps = np.round(rng.random(masks.shape) * 12 + 5 * masks * rng.random(masks.shape)) / 4
    maps = maps.astype(np.float32)  # quantized: ties within and across images
    m = compute_metrics(maps, masks, pro_mode=pro_mode)
    pix = sklearn_triple(masks.ravel(), maps.ravel())
    np.testing.assert_allclose(
        [m["pixel_auroc"], m["pixel_ap"], m["pixel_f1_max"]], pix, rtol=0, atol=1e-6
    )
    img = sklearn_triple(masks.any(axis=(1, 2)), maps.max(axis=(1, 2)))
    np.testing.assert_allclose(
        [m["image_auroc"], m["image_ap"], m["image_f1_max"]], img, rtol=0, atol=1e-6
    )


def test_float16_maps_give_the_float32_result(rng):
    masks = blob_masks(rng, 6, 16, 16)
    maps16 = rng.random(masks.shape).astype(np.float16)
    a = compute_metrics(maps16, masks)
    b = compute_metrics(maps16.astype(np.float32), masks)
    assert a == b
    assert a["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps16.ravel()))


# ---------------------------------------------------------------- PRO


def hand_built_pro_case():
    """Two images (2 × 4 px) with regions A (2 px) and B (4 px, a diagonal zigzag) and 10
    normal pixels, scores chosen so the MVTec PRO curve is known in closed form."""
    masks = np.zeros((2, 2, 4), dtype=bool)
    maps = np.zeros((2, 2, 4), dtype=np.float32)
    # image 0: A = (0,0),(0,1) at 0.95; six normal pixels
    masks[0, 0, :2] = True
    maps[0, 0, :2] = 0.95
    maps[0, 0, 2:] = [0.9, 0.8]
    maps[0, 1, :] = [0.7, 0.7, 0.5, 0.4]
    # image 1: B = (0,0),(1,1),(0,2),(1,3): only diagonally connected (one 8-connected region,
    # four 4-connected ones); two pixels at 0.7 (tied with two normals), two at 0.05
    b = [(0, 0), (1, 1), (0, 2), (1, 3)]
    for (r, c), s in zip(b, [0.7, 0.7, 0.05, 0.05]):
        masks[1, r, c] = True
        maps[1, r, c] = s
    for (r, c), s in zip([(1, 0), (0, 1), (1, 2), (0, 3)], [0.3, 0.2, 0.1, 0.0]):
        maps[1, r, c] = s
    return maps, masks


def test_mvtec_pro_closed_form():
    maps, masks = hand_built_pro_case()
    # N = 10 normal pixels, so each normal pixel adds 0.1 to the FPR. Regions A, B (R = 2).
    # Curve, thresholds descending:
    #   t = 0.95: A fully in               → (FPR, PRO) = (0.0, (1 + 0)/2   = 0.5)
    #   t = 0.9, 0.8: one normal each      → (0.1, 0.5), (0.2, 0.5)
    #   t = 0.7: two normals and half of B → (0.4, (1 + 2/4)/2 = 0.75)  (a diagonal segment)
    # Interpolation at FPR 0.3 on (0.2, 0.5)–(0.4, 0.75): 0.5 + 0.25 · (0.1 / 0.2) = 0.625.
    # Area over [0, 0.3]: 0.2 · 0.5 + 0.1 · (0.5 + 0.625) / 2 = 0.1 + 0.05625 = 0.15625.
    expected = 0.15625 / 0.3  # = 0.5208333…
    m = compute_metrics(maps, masks, pro_mode="mvtec")
    assert m["pro"] == pytest.approx(expected, abs=1e-12)
    assert m.pro_mode == "mvtec"
    # with 4-connectivity B would be four 1-px regions: PRO(0.7) = (1 + 1 + 1)/5 = 0.6 ≠ 0.75
    assert expected == pytest.approx(reference_mvtec_pro(maps, masks), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_mvtec_pro_matches_reference_with_ties(seed):
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng, 8, 20, 20, anomalous_every=2)
    maps = (np.round(rng.random(masks.shape) * 20 + 8 * masks) / 16).astype(np.float32)
    ours = compute_metrics(maps, masks, pro_mode="mvtec")["pro"]
    assert ours == pytest.approx(reference_mvtec_pro(maps, masks), abs=1e-9)


@pytest.mark.parametrize("kind", ["continuous", "integer", "float16"])
def test_cflow_pro_matches_reference_loop(rng, kind):
    masks = blob_masks(rng, 8, 24, 24, anomalous_every=2)
    raw = rng.random(masks.shape) + 0.6 * masks
    if kind == "integer":
        # scores 0..200 with min 0 and max 200: step 1, thresholds hit the scores exactly,
        # so strict `>` against `≥` changes the counts
        maps = np.round(raw / raw.max() * 200).astype(np.float32)
        maps[0, 0, 0] = 0.0
    elif kind == "float16":
        maps = raw.astype(np.float16)
    else:
        maps = raw.astype(np.float32)
    ours = compute_metrics(maps, masks, pro_mode="cflow")
    assert ours.pro_mode == "cflow"
    assert ours["pro"] == pytest.approx(reference_cal_pro_score(maps, masks), abs=1e-6)


def test_pro_modes_differ_where_fpr_is_rescaled(rng):
    # 90 % of normal pixels score exactly 0, so every cflow threshold has FPR ≤ 0.1: cflow
    # stretches FPR ∈ [0, 0.1] to [0, 1] and, with PRO ≈ 1 - th ≈ FPR/0.1, gets ≈ 0.5.
    # MVTec: PRO = FPR/0.1 up to FPR 0.1, then 1 (the tie at 0 holds normals only):
    # (0.1 · 0.5 + 0.2 · 1) / 0.3 = 0.25 / 0.3 ≈ 0.8333.
    masks = blob_masks(rng, 20, 32, 32, anomalous_every=1, max_radius=6)
    maps = rng.random(masks.shape).astype(np.float32)
    zero = ~masks & (rng.random(masks.shape) < 0.9)
    maps[zero] = 0.0
    mv = compute_metrics(maps, masks, pro_mode="mvtec")["pro"]
    cf = compute_metrics(maps, masks, pro_mode="cflow")["pro"]
    assert mv == pytest.approx(0.25 / 0.3, abs=0.02)
    assert cf == pytest.approx(0.5, abs=0.02)
    assert cf == pytest.approx(reference_cal_pro_score(maps, masks), abs=1e-6)


def test_cflow_nan_when_kept_fprs_collapse():
    # 3 normal pixels at 0, 0.1, 0.2 and one anomaly at 1: FPR is 2/3, 1/3 (both ≥ 0.3,
    # dropped) or 0; the kept FPRs are all 0 and the reference's rescaling divides 0 by 0
    masks = np.zeros((1, 1, 4), dtype=bool)
    masks[0, 0, 3] = True
    maps = np.array([[[0.0, 0.1, 0.2, 1.0]]], dtype=np.float32)
    assert math.isnan(compute_metrics(maps, masks, pro_mode="cflow")["pro"])
    assert compute_metrics(maps, masks, pro_mode="mvtec")["pro"] == pytest.approx(1.0)


# ---------------------------------------------------------------- sanity on synthetic maps


def test_perfect_and_inverted_maps(rng):
    masks = blob_masks(rng, 10, 32, 32, anomalous_every=2)
    # normals spread over [0, 0.5), anomalies all at the max: perfect for every metric,
    # including cflow (PRO = 1 at all 200 thresholds)
    maps = np.where(masks, 1.0, 0.5 * rng.random(masks.shape)).astype(np.float32)
    for mode in ("mvtec", "cflow"):
        m = compute_metrics(maps, masks, pro_mode=mode)
        assert all(m[k] == pytest.approx(1.0, abs=1e-12) for k in METRIC_KEYS), (mode, m)
    # inverted: anomalies at 0, the rest of anomalous images in [0.3, 0.5), normal images in
    # [0.6, 1): every anomalous pixel and image ranks below every normal one
    anomalous_image = masks.any(axis=(1, 2), keepdims=True)
    rest = np.where(anomalous_image, 0.3, 0.6) + 0.2 * rng.random(masks.shape)
    inv = compute_metrics(np.where(masks, 0.0, rest).astype(np.float32), masks)
    assert inv["pixel_auroc"] == pytest.approx(0.0, abs=1e-12)
    assert inv["image_auroc"] == pytest.approx(0.0, abs=1e-12)
    assert inv["pro"] == pytest.approx(0.0, abs=1e-12)


def test_uniform_noise(rng):
    masks = blob_masks(rng, 20, 64, 64, anomalous_every=1, max_radius=8)
    maps = rng.random(masks.shape).astype(np.float32)
    m = compute_metrics(maps, masks)
    assert m["pixel_auroc"] == pytest.approx(0.5, abs=0.01)
    # PRO(t) ≈ FPR(t) on noise, so ∫_0^0.3 x dx / 0.3 = 0.045 / 0.3 = 0.15
    assert m["pro"] == pytest.approx(0.15, abs=0.01)


# ---------------------------------------------------------------- inputs and degenerate classes


def test_result_type():
    maps, masks = hand_built_pro_case()
    m = compute_metrics(maps, masks, pro_mode="cflow")
    assert isinstance(m, Metrics) and isinstance(m, dict)
    assert list(m) == list(METRIC_KEYS)
    assert all(type(v) is float for v in m.values())
    assert m.pro_mode == "cflow" and m.exact
    assert json.dumps(m) == json.dumps(dict(m))  # serializes like a plain dict


def test_validation_errors():
    maps = np.zeros((2, 4, 4), dtype=np.float32)
    masks = np.zeros((2, 4, 4), dtype=bool)
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*\(2, 4, 5\)"):
        compute_metrics(maps, np.zeros((2, 4, 5), dtype=bool))
    with pytest.raises(ValueError, match="N, H, W"):
        compute_metrics(maps[0], masks[0])
    bad = maps.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        compute_metrics(bad, masks)
    bad[1, 2, 3] = np.inf
    with pytest.raises(ValueError, match="inf"):
        compute_metrics(bad, masks)
    with pytest.raises(ValueError, match=r"only 0 and 1.*255"):
        compute_metrics(maps, np.full((2, 4, 4), 255, dtype=np.uint8))
    with pytest.raises(ValueError, match="pro_mode"):
        compute_metrics(maps, masks, pro_mode="auc")
    with pytest.raises(MetricsInputError):  # also a ClipSamError for the CLI
        compute_metrics(maps.astype(bool), masks)


def test_zero_one_integer_masks_are_accepted(rng):
    masks = blob_masks(rng, 4, 16, 16)
    maps = rng.random(masks.shape).astype(np.float32)
    assert compute_metrics(maps, masks.astype(np.uint8)) == compute_metrics(maps, masks)


def test_class_without_anomalies_gives_nan(rng):
    maps = rng.random((3, 8, 8)).astype(np.float32)
    m = compute_metrics(maps, np.zeros(maps.shape, dtype=bool), pro_mode="cflow")
    assert all(math.isnan(v) for v in m.values())


def test_class_without_normal_pixels(rng):
    maps = rng.random((3, 8, 8)).astype(np.float32)
    m = compute_metrics(maps, np.ones(maps.shape, dtype=bool))
    assert math.isnan(m["pixel_auroc"]) and math.isnan(m["pro"]) and math.isnan(m["image_auroc"])
    assert m["pixel_ap"] == pytest.approx(1.0) and m["pixel_f1_max"] == pytest.approx(1.0)


# ---------------------------------------------------------------- memory


def test_peak_memory_per_pixel(rng):
    n, h = 40, 518  # a fifth of a VisA class
    masks = blob_masks(rng, n, h, h, anomalous_every=2, max_radius=40)
    maps = rng.random(masks.shape, dtype=np.float32)
    maps += 0.5 * masks
    tracemalloc.start()
    try:
        compute_metrics(maps, masks)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per_pixel = peak / maps.size
    # 4 B/px for the sorted normal codes + a little per anomalous pixel; a float64 copy of
    # the maps (8 B/px) or an argsort permutation (8 B/px) on top would break this bound
    assert per_pixel < 10, f"peak {peak / 2**20:.0f} MiB = {per_pixel:.1f} B/px"


# ---------------------------------------------------------------- streaming approximation


def test_streaming_close_to_exact(rng):
    masks = blob_masks(rng, 16, 48, 48, anomalous_every=2, max_radius=7)
    maps = np.clip(rng.normal(0.35, 0.15, masks.shape) + 0.25 * masks, 0, 1)
    maps = maps.astype(np.float32)
    exact = compute_metrics(maps, masks)
    acc = StreamingPixelMetrics(num_bins=4096)
    for lo in range(0, 16, 5):  # uneven batches
        acc.update(maps[lo : lo + 5], masks[lo : lo + 5])
    approx = acc.compute()
    assert not approx.exact and approx.pro_mode == "mvtec"
    for key in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pro"):
        assert approx[key] == pytest.approx(exact[key], abs=1e-3), key
    for key in ("image_auroc", "image_ap", "image_f1_max"):
        assert approx[key] == exact[key], key


def test_streaming_exact_on_bin_grid(rng):
    masks = blob_masks(rng, 6, 20, 20)
    maps = (rng.integers(0, 64, masks.shape) / 64).astype(np.float32)  # bin lower edges
    acc = StreamingPixelMetrics(num_bins=64)
    acc.update(maps, masks)
    approx, exact = acc.compute(), compute_metrics(maps, masks)
    for key in METRIC_KEYS:
        assert approx[key] == pytest.approx(exact[key], abs=1e-12), key


# ---------------------------------------------------------------- report


def test_mean_over_classes_skips_nan():
    per_class = {
        "a": {"pixel_auroc": 0.9, "pro": float("nan"), "n_images": 10},
        "b": {"pixel_auroc": 0.7, "pro": 0.6, "n_images": 20},
        "c": {"pixel_auroc": float("nan"), "pro": float("nan")},
    }
    means = mean_over_classes(per_class)
    assert means == {"pixel_auroc": pytest.approx(0.8), "pro": pytest.approx(0.6)}
    assert math.isnan(mean_over_classes({"a": {"pro": float("nan")}})["pro"])


def test_format_table():
    rough = {"bottle": {"pixel_auroc": 0.9123, "pixel_f1_max": 0.5, "pixel_ap": 0.4, "pro": 0.8},
             "cable": {"pixel_auroc": 0.8, "pixel_f1_max": 0.3, "pixel_ap": 0.2,
                       "pro": float("nan")}}  # fmt: skip
    final = {k: {m: v / 2 for m, v in d.items()} for k, d in rough.items()}
    md, csv = format_table(rough, None)
    assert (
        md.splitlines()[0]
        == "| class | AUROC (rough) | F1-max (rough) | AP (rough) | PRO (rough) |"
    )
    assert "| bottle | 91.2 | 50.0 | 40.0 | 80.0 |" in md
    assert "| cable | 80.0 | 30.0 | 20.0 | nan |" in md
    assert "| mean | 85.6 | 40.0 | 30.0 | 80.0 |" in md
    md, csv = format_table(rough, final)
    lines = csv.splitlines()
    assert lines[0].split(",")[:2] == ["class", "pixel_auroc_rough"]
    assert lines[0].split(",")[5] == "pixel_auroc_final"
    assert lines[1] == "bottle,91.2,50.0,40.0,80.0,45.6,25.0,20.0,40.0"
    assert lines[-1].startswith("mean,85.6,") and len(lines) == 4
    assert "AUROC (final)" in md.splitlines()[0]


# ---------------------------------------------------------------- mutation-testing additions
# (benchmarks/mutation/README.md: each test kills mutants that survived the first run)


def _message(call, *args, **kwargs) -> str:
    with pytest.raises(MetricsInputError) as info:
        call(*args, **kwargs)
    return str(info.value)


def test_validation_messages_exact():
    maps = np.zeros((2, 4, 4), dtype=np.float32)
    masks = np.zeros((2, 4, 4), dtype=bool)
    assert _message(compute_metrics, maps, masks, pro_mode="auc") == (
        "pro_mode must be one of ('mvtec', 'cflow'), got 'auc'"
    )
    assert _message(compute_metrics, maps[0], masks[0]) == (
        "maps must be (N, H, W), got shape (4, 4)"
    )
    assert _message(compute_metrics, maps, masks[:1]) == (
        "maps and masks must have the same shape, got maps (2, 4, 4) and masks (1, 4, 4)"
    )
    empty = np.zeros((0, 4, 4), np.float32)
    assert _message(compute_metrics, empty, empty.astype(bool)) == (
        "maps are empty (shape (0, 4, 4))"
    )
    assert _message(compute_metrics, maps.astype(np.complex64), masks) == (
        "maps must be a real float array, got dtype complex64"
    )
    assert _message(compute_metrics, maps.astype(bool), masks) == (
        "maps must be a real float array, got dtype bool"
    )
    bad = maps.copy()
    bad[1, 2, 3] = np.nan
    assert _message(compute_metrics, bad, masks) == (
        "maps contain NaN; fix the model output before evaluating"
    )
    bad[1, 2, 3] = -np.inf
    assert _message(compute_metrics, bad, masks) == "maps contain ±inf (min -inf, max 0.0)"
    one_bad = np.zeros((2, 4, 4), np.uint8)
    one_bad[1, 3, 3] = 7  # a single offending value: it is the example shown
    assert _message(compute_metrics, maps, one_bad) == (
        f"masks must be bool or hold only 0 and 1, found {np.uint8(7)!r} (dtype uint8); "
        "binarize first, e.g. masks > 0"
    )
    assert _message(compute_metrics, maps, masks.astype(str)) == (
        "masks must be bool, got dtype <U5"
    )


def test_binary_metrics_validation_messages_exact():
    assert _message(binary_metrics, np.zeros((2, 2), np.float32), np.zeros((2, 2), bool)) == (
        "scores and labels must be 1-D of equal length, got scores (2, 2) and labels (2, 2)"
    )
    assert _message(binary_metrics, np.zeros(3, np.float32), np.zeros(2, bool)) == (
        "scores and labels must be 1-D of equal length, got scores (3,) and labels (2,)"
    )
    assert _message(binary_metrics, np.zeros(0, np.float32), np.zeros(0, bool)) == (
        "scores are empty"
    )
    assert _message(binary_metrics, np.array([0.1, np.nan]), np.array([0, 1])) == (
        "scores contain NaN; fix the model output before evaluating"
    )
    assert _message(binary_metrics, np.array([0.1, 0.2]), np.array([0, 2])) == (
        f"labels must be bool or hold only 0 and 1, found {np.int64(2)!r} (dtype int64); "
        "binarize first, e.g. labels > 0"
    )


def test_single_pixel_and_single_score_are_evaluated():
    # one anomalous pixel alone: AP = F1 = 1, AUROC and PRO undefined (no normal pixel)
    m = compute_metrics(np.full((1, 1, 1), 0.3, np.float32), np.ones((1, 1, 1), bool))
    assert m["pixel_ap"] == 1.0 and m["pixel_f1_max"] == 1.0 and m["image_ap"] == 1.0
    assert math.isnan(m["pixel_auroc"]) and math.isnan(m["pro"])
    auroc, ap, f1 = binary_metrics(np.array([0.5], np.float32), np.array([True]))
    assert math.isnan(auroc) and ap == 1.0 and f1 == 1.0


def test_metrics_repr():
    exact = Metrics({"pro": 0.5}, pro_mode="mvtec")
    assert repr(exact) == "Metrics({'pro': 0.5}, pro_mode='mvtec', exact)"
    approx = Metrics({"pro": 0.25}, pro_mode=None, exact=False)
    assert repr(approx) == "Metrics({'pro': 0.25}, pro_mode=None, approximate)"


def test_threshold_codes_select_exactly_the_scores_above_a_float64_threshold():
    from clipsam_jax.metrics.curves import float32_order_key, threshold_codes_above

    # float64 thresholds that float32 rounds up (0.1, 1/3), down (0.7, -0.1) or keeps (0.5,
    # -2.0); for each, float32 scores just below, at and just above its float32 rounding.
    # Oracle: numpy's own comparison float32 score > float64 threshold.
    thresholds = np.array([0.1, 1 / 3, 0.7, -0.1, 0.5, -2.0])
    codes = threshold_codes_above(thresholds)
    for th, code in zip(thresholds, codes):
        t32 = np.float32(th)
        scores = np.array(
            [np.nextafter(t32, np.float32(-np.inf)), t32, np.nextafter(t32, np.float32(np.inf))],
            np.float32,
        )
        selected = float32_order_key(scores) >= code
        np.testing.assert_array_equal(selected, scores.astype(np.float64) > th, err_msg=str(th))
    # 0.1 rounds up: its float32 is above 0.1 and must count; 0.5 is exact: 0.5 must not
    assert float32_order_key(np.array([np.float32(0.1)]))[0] >= codes[0]
    assert float32_order_key(np.array([np.float32(0.5)]))[0] < codes[4]


def test_curve_types_are_frozen():
    import dataclasses

    from clipsam_jax.metrics.curves import positive_curve, sort_scores

    scores = sort_scores(np.array([0.1, 0.9], np.float32), np.array([False, True]))
    curve = positive_curve(scores)
    with pytest.raises(dataclasses.FrozenInstanceError):
        scores.neg = np.zeros(0, np.uint32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        curve.tp = np.zeros(0, np.int64)


def test_image_and_pixel_metrics_entry_points_match_sklearn(rng):
    from clipsam_jax.metrics import image_metrics, pixel_metrics

    masks = blob_masks(rng, 8, 12, 12, anomalous_every=2)
    maps = (rng.random(masks.shape) + 0.5 * masks).astype(np.float32)
    img = image_metrics(maps, masks.astype(np.uint8))  # 0/1 integer masks are converted
    expected = sklearn_triple(masks.any(axis=(1, 2)), maps.max(axis=(1, 2)))
    np.testing.assert_allclose(
        [img["image_auroc"], img["image_ap"], img["image_f1_max"]], expected, atol=1e-6
    )
    pix = pixel_metrics(maps, masks.astype(np.uint8), pro_mode="mvtec")
    np.testing.assert_allclose(
        [pix["pixel_auroc"], pix["pixel_ap"], pix["pixel_f1_max"]],
        sklearn_triple(masks.ravel(), maps.ravel()),
        atol=1e-6,
    )
    assert pix["pro"] == pytest.approx(reference_mvtec_pro(maps, masks), abs=1e-9)
    assert pixel_metrics(maps, masks) == pix  # the default PRO is MVTec's
    cflow = pixel_metrics(maps, masks, pro_mode="cflow")["pro"]
    assert cflow == pytest.approx(reference_cal_pro_score(maps, masks), abs=1e-6)
    with pytest.raises(MetricsInputError, match="pro_mode"):
        pixel_metrics(maps, masks, pro_mode="auc")


def test_mvtec_pro_curve_starts_at_the_origin_whatever_the_memory_held():
    from clipsam_jax.metrics.curves import PositiveCurve
    from clipsam_jax.metrics.pro import mvtec_pro

    # Two distinct anomalous scores, N = 10: polyline (0, 0), (0, 0), (0, 0.5), (0, 0.5),
    # (0.1, 1), (1, 1). Area over [0, 0.3]: 0.1 · (0.5 + 1) / 2 + 0.2 · 1 = 0.275.
    curve = PositiveCurve(
        tp=np.array([1, 2]), fp=np.array([0, 1]), fp_above=np.array([0, 0]),
        weight=np.array([0.5, 1.0]), n_pos=2, n_neg=10,
    )  # fmt: skip
    for fill in (5.0, -3.0, np.nan):
        # freed blocks of the curve arrays' size: a fresh np.empty may get them back
        junk = [np.full(6, fill) for _ in range(4)]
        del junk
        assert mvtec_pro(curve) == pytest.approx(0.275 / 0.3, abs=1e-12)


def test_trapezoid_up_to_by_hand():
    from clipsam_jax.metrics.pro import trapezoid_up_to

    x, y = np.array([0.0, 1.0, 2.0]), np.array([0.0, 1.0, 1.0])
    assert trapezoid_up_to(x, y, 5.0) == pytest.approx(0.5 + 1.0)  # beyond the end: all of it
    assert trapezoid_up_to(x, y, 2.0) == pytest.approx(1.5)
    assert trapezoid_up_to(x, y, 0.5) == pytest.approx(0.5 * 0.5 * 0.5)  # y(0.5) = 0.5
    assert trapezoid_up_to(x, y, 1.5) == pytest.approx(0.5 + 0.5)


def test_pro_with_a_single_normal_pixel_by_hand():
    # one row [A, A, N]: region {A, A} (R = 1) above the only normal pixel. MVTec: PRO = 1 from
    # FPR 0 on → area 0.3 / 0.3 = 1. cflow: FPR is 0 or 1, the kept FPRs never spread: nan.
    maps = np.array([[[0.9, 0.8, 0.1]]], np.float32)
    masks = np.array([[[True, True, False]]])
    assert compute_metrics(maps, masks, pro_mode="mvtec")["pro"] == pytest.approx(1.0)
    assert math.isnan(compute_metrics(maps, masks, pro_mode="cflow")["pro"])


def test_mvtec_class_without_anomalies_gives_nan(rng):
    maps = rng.random((3, 8, 8)).astype(np.float32)
    m = compute_metrics(maps, np.zeros(maps.shape, dtype=bool), pro_mode="mvtec")
    assert all(math.isnan(v) for v in m.values())


def test_cflow_constant_maps_give_nan():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 1:3, 1:3] = True
    m = compute_metrics(np.full((2, 4, 4), 0.5, np.float32), masks, pro_mode="cflow")
    assert math.isnan(m["pro"]) and m["pixel_auroc"] == 0.5


def _integer_case(normals: list[float], anomalies: list[float]):
    """One image row: the given normal and anomalous scores (anomalies adjacent: one region)."""
    maps = np.array([[normals + anomalies]], np.float32)
    masks = np.array([[[False] * len(normals) + [True] * len(anomalies)]])
    return maps, masks


def test_cflow_fpr_exactly_0_3_is_dropped():
    # Scores 0..200, thresholds 0, 1, …, 199. Three of ten normals (150, 170, 190) are above
    # every threshold in [120, 149]: FPR = 3/10 = 0.3 exactly there, which `< 0.3` drops.
    normals = [0.0, 20.0, 40.0, 60.0, 80.0, 100.0, 120.0, 150.0, 170.0, 190.0]
    maps, masks = _integer_case(normals, [110.0, 130.0, 160.0, 200.0])
    ours = compute_metrics(maps, masks, pro_mode="cflow")["pro"]
    assert ours == pytest.approx(reference_cal_pro_score(maps, masks), abs=1e-9)


def test_cflow_exactly_two_kept_thresholds():
    # Normals at 200, 199, 198 (and lower): FPR(199) = 0.1, FPR(198) = 0.2, FPR(197) = 0.3, so
    # exactly the two top thresholds are kept; their FPRs differ, so the area is defined.
    normals = [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 198.0, 199.0, 200.0]
    maps, masks = _integer_case(normals, [5.0, 198.5, 199.5])
    ours = compute_metrics(maps, masks, pro_mode="cflow")["pro"]
    reference = reference_cal_pro_score(maps, masks)
    assert not math.isnan(reference)
    assert ours == pytest.approx(reference, abs=1e-9)


def test_cflow_fewer_than_two_kept_thresholds_is_nan():
    # nine of ten normals at the maximum: every threshold has FPR ≥ 0.9, nothing is kept
    maps, masks = _integer_case([0.0] + [200.0] * 9, [100.0, 150.0])
    assert math.isnan(compute_metrics(maps, masks, pro_mode="cflow")["pro"])


def test_cflow_thresholds_above_every_anomaly_count_zero_overlap(rng):
    # the highest scores are normal pixels: the top thresholds have no anomalous pixel above
    # them (PRO 0 there) while their FPR is still below 0.3
    masks = blob_masks(rng, 8, 24, 24, anomalous_every=2)
    maps = (rng.random(masks.shape) * 0.8 + 0.2 * masks).astype(np.float32)
    maps[1, :3, :] = 1.0 + rng.random((3, 24))  # 72 normal pixels above every anomaly
    assert not masks[1].any()
    ours = compute_metrics(maps, masks, pro_mode="cflow")["pro"]
    assert ours == pytest.approx(reference_cal_pro_score(maps, masks), abs=1e-6)


def test_format_table_image_columns_missing_values_and_csv_quoting():
    rough = {
        'cap, "new"': {"image_auroc": 0.5, "image_f1_max": 0.25, "image_ap": 1.0},
        "screw": {"image_auroc": 0.75},  # no F1-max / AP for this class: "nan"
    }
    final = {"zipper": {"image_auroc": 0.125, "image_f1_max": 0.5, "image_ap": float("nan")}}
    columns = ("image_auroc", "image_f1_max", "image_ap")
    md, csv = format_table(rough, final, columns)
    assert md == (
        "| class | I-AUROC (rough) | I-F1-max (rough) | I-AP (rough) | I-AUROC (final) "
        "| I-F1-max (final) | I-AP (final) |\n"
        "|:--|--:|--:|--:|--:|--:|--:|\n"
        '| cap, "new" | 50.0 | 25.0 | 100.0 | nan | nan | nan |\n'
        "| screw | 75.0 | nan | nan | nan | nan | nan |\n"
        "| zipper | nan | nan | nan | 12.5 | 50.0 | nan |\n"
        "| mean | 62.5 | 25.0 | 100.0 | 12.5 | 50.0 | nan |\n"
    )
    assert csv.splitlines()[1] == '"cap, ""new""",50.0,25.0,100.0,nan,nan,nan'
    assert csv.splitlines()[2].startswith("screw,75.0,nan,") and csv.endswith("nan\n")
    md1, _ = format_table({"a": {"pro": 0.5}}, columns=("pro",))
    assert md1 == "| class | PRO (rough) |\n|:--|--:|\n| a | 50.0 |\n| mean | 50.0 |\n"


def test_mean_over_classes_rejects_non_numbers():
    with pytest.raises(ValueError):
        mean_over_classes({"a": {"pro": "high"}})


def test_streaming_default_4096_bins_tie_scores_within_a_bin():
    # 0.5 and 0.5 + 0.9/4096 fall in the same 1/4096 bin (2048): an anomaly at 0.5 below a
    # normal pixel at 0.5 + 0.9/4096 is a tie for the binned AUROC (0.5), not a miss (0).
    maps = np.array([[[0.5, 0.5 + 0.9 / 4096, 0.1, 0.9]]], np.float32)
    masks = np.array([[[True, False, False, False]]])
    acc = StreamingPixelMetrics()
    acc.update(maps, masks)
    # negatives: 0.5+, 0.1, 0.9 → the anomaly beats 0.1, ties with 0.5+, loses to 0.9
    assert acc.compute()["pixel_auroc"] == pytest.approx((1 + 0.5) / 3)
    assert compute_metrics(maps, masks)["pixel_auroc"] == pytest.approx(1 / 3)  # exact


def test_streaming_arguments_checked():
    message = "need num_bins ≥ 2 and score_range low < high, got {}, {}"
    with pytest.raises(MetricsInputError) as info:
        StreamingPixelMetrics(num_bins=1)
    assert str(info.value) == message.format(1, (0.0, 1.0))
    with pytest.raises(MetricsInputError) as info:
        StreamingPixelMetrics(num_bins=8, score_range=(0.5, 0.5))
    assert str(info.value) == message.format(8, (0.5, 0.5))
    two = StreamingPixelMetrics(num_bins=2)  # the smallest allowed: [0, 0.5) and [0.5, 1]
    two.update(np.array([[[0.2, 0.7, 0.6]]], np.float32), np.array([[[False, True, False]]]))
    assert two.compute()["pixel_auroc"] == pytest.approx(0.75)  # beats 0.2, ties with 0.6


def test_streaming_exact_on_a_shifted_bin_grid(rng):
    # score_range (2, 6) with 4 bins: bins [2, 3), [3, 4), [4, 5), [5, 6]; scores on the lower
    # edges keep their order, so the binned metrics are the exact ones
    masks = blob_masks(rng, 6, 16, 16, anomalous_every=2)
    maps = 2.0 + rng.integers(0, 4, masks.shape) + masks * rng.integers(0, 2, masks.shape)
    maps = np.minimum(maps, 5.0).astype(np.float32)
    acc = StreamingPixelMetrics(num_bins=4, score_range=(2.0, 6.0))
    acc.update(maps, masks)
    approx, exact = acc.compute(), compute_metrics(maps, masks)
    for key in METRIC_KEYS:
        assert approx[key] == pytest.approx(exact[key], abs=1e-12), key


def test_streaming_single_region_pro():
    # one 2×2 region at 0.75, normals at 0.25 and 0.5 (bin lower edges of 4 bins): the binned
    # PRO is the exact one, PRO = 1 from FPR 0 on
    maps = np.full((1, 4, 4), 0.25, np.float32)
    maps[0, 0, :] = 0.5
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 2:, 2:] = True
    maps[masks] = 0.75
    acc = StreamingPixelMetrics(num_bins=4)
    acc.update(maps, masks)
    assert acc.compute()["pro"] == pytest.approx(1.0)
    assert compute_metrics(maps, masks)["pro"] == pytest.approx(1.0)


def test_streaming_compute_before_any_update_is_all_nan():
    m = StreamingPixelMetrics().compute()
    assert list(m) == [
        "pixel_auroc", "pixel_ap", "pixel_f1_max", "pro", "image_auroc", "image_ap", "image_f1_max"
    ]  # fmt: skip
    assert all(math.isnan(v) for v in m.values()) and not m.exact


# ---------------------------------------------------------------- explicit image scores and labels
# Evaluation scores images by the final map's pre-Norm peak and labels them by the dataset's
# annotation (docs/method.md §5.2); pixel metrics keep using the masks.


def _vanished_defect_case():
    """Three 4×4 images: 0 normal (max 0.2); 1 anomalous with a mask (max 0.9); 2 annotated
    anomalous whose mask vanished when resized (empty mask, max 0.1)."""
    maps = np.zeros((3, 4, 4), np.float32)
    maps[0, 1, 1], maps[1, 2, 2], maps[2, 0, 3] = 0.2, 0.9, 0.1
    masks = np.zeros((3, 4, 4), bool)
    masks[1, 2, 2:4] = True
    return maps, masks, np.array([0, 1, 1])


def test_annotated_label_counts_an_image_whose_mask_vanished():
    maps, masks, labels = _vanished_defect_case()
    got = compute_metrics(maps, masks, labels=labels)
    # By hand: anomalous {0.9, 0.1}, normal {0.2}. AUROC: 0.9 > 0.2, 0.1 < 0.2 → 1/2.
    # AP: 0.9 (precision 1, recall ½), then 0.1 (precision 2/3, recall 1) → ½ + ½·⅔ = 5/6.
    # F1-max: max(2·1·½/1.5, 2·⅔·1/(5/3)) = max(⅔, 0.8) = 0.8.
    assert got["image_auroc"] == pytest.approx(0.5, abs=1e-12)
    assert got["image_ap"] == pytest.approx(5 / 6, abs=1e-12)
    assert got["image_f1_max"] == pytest.approx(0.8, abs=1e-12)
    np.testing.assert_allclose(
        [got["image_auroc"], got["image_ap"], got["image_f1_max"]],
        sklearn_triple(labels, maps.max(axis=(1, 2))),
        atol=1e-12,
    )
    default = compute_metrics(maps, masks)  # labels from the masks: image 2 counted normal
    assert default["image_auroc"] == 1.0
    for key in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pro"):
        assert got[key] == default[key], key  # pixel metrics use the masks only
    from clipsam_jax.metrics import image_metrics

    assert image_metrics(maps, masks, labels=labels) == {
        k: got[k] for k in ("image_auroc", "image_ap", "image_f1_max")
    }


def test_annotated_anomalies_without_any_mask_pixel_do_not_crash():
    # Every anomalous image's mask vanished: no anomalous pixel, so the pixel metrics and PRO
    # are NaN, while the image metrics are defined by the labels.
    maps, masks, labels = _vanished_defect_case()
    masks[:] = False
    for mode in ("mvtec", "cflow"):
        got = compute_metrics(maps, masks, pro_mode=mode, labels=labels)
        assert all(math.isnan(got[k]) for k in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pro"))
        assert got["image_auroc"] == 0.5
    acc = StreamingPixelMetrics(num_bins=16)
    acc.update(maps, masks, labels=labels)
    assert acc.compute()["image_auroc"] == 0.5


def test_explicit_image_scores_replace_the_maps_maxima(rng):
    masks = blob_masks(rng, 10, 12, 12, anomalous_every=2)
    maps = (rng.random(masks.shape) + 0.5 * masks).astype(np.float32)
    labels = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 1])  # not the masks' non-emptiness
    scores = (rng.random(10) * 2).astype(np.float32)  # e.g. peaks before Norm, above 1
    got = compute_metrics(maps, masks, image_scores=scores, labels=labels)
    np.testing.assert_allclose(
        [got["image_auroc"], got["image_ap"], got["image_f1_max"]],
        sklearn_triple(labels, scores),
        atol=1e-12,
    )
    pixel = compute_metrics(maps, masks)
    assert all(got[k] == pixel[k] for k in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pro"))
    # Only the scores given: labels from the masks; float16 scores are exact in float32.
    half = compute_metrics(maps, masks, image_scores=scores.astype(np.float16))
    np.testing.assert_allclose(
        half["image_auroc"],
        roc_auc_score(masks.any(axis=(1, 2)), scores.astype(np.float16).astype(np.float32)),
        atol=1e-12,
    )
    # The streaming path keeps the same scores and labels, batch by batch: exact image metrics.
    acc = StreamingPixelMetrics()
    for lo, hi in ((0, 4), (4, 7), (7, 10)):
        acc.update(maps[lo:hi], masks[lo:hi], image_scores=scores[lo:hi], labels=labels[lo:hi])
    streamed = acc.compute()
    for key in ("image_auroc", "image_ap", "image_f1_max"):
        assert streamed[key] == got[key], key


def test_image_scores_and_labels_validation_messages_exact():
    from clipsam_jax.metrics import image_metrics

    maps = np.zeros((2, 4, 4), dtype=np.float32)
    masks = np.zeros((2, 4, 4), dtype=bool)
    assert _message(compute_metrics, maps, masks, image_scores=np.zeros(3, np.float32)) == (
        "image_scores must be (N,) = (2,), one score per map, got shape (3,)"
    )
    assert _message(image_metrics, maps, masks, image_scores=np.zeros((2, 1))) == (
        "image_scores must be (N,) = (2,), one score per map, got shape (2, 1)"
    )
    assert _message(compute_metrics, maps, masks, labels=[1]) == (
        "labels must be (N,) = (2,), one label per map, got shape (1,)"
    )
    assert _message(compute_metrics, maps, masks, image_scores=np.array([0.5, np.nan])) == (
        "image_scores contain NaN; fix the model output before evaluating"
    )
    assert _message(compute_metrics, maps, masks, labels=np.array([0, 2])) == (
        f"labels must be bool or hold only 0 and 1, found {np.int64(2)!r} (dtype int64); "
        "binarize first, e.g. labels > 0"
    )
    with pytest.raises(MetricsInputError, match=r"image_scores must be \(N,\) = \(3,\)"):
        StreamingPixelMetrics().update(np.zeros((3, 4, 4)), np.zeros((3, 4, 4), bool),
                                       image_scores=np.zeros(2))  # fmt: skip
