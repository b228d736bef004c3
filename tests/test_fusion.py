"""Eq. 9 fusion (docs/method.md §4) by hand, norm modes, and an oracle-refiner experiment."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import precision_recall_curve

from clipsam_jax.config import RefineConfig
from clipsam_jax.metrics import compute_metrics
from clipsam_jax.refine.fusion import (
    _cv2_area,
    fuse,
    fuse_batch,
    fuse_scored,
    masks_to_grid,
    mmr,
    mmr_batch,
    mmr_seeded,
    normalize,
)
from clipsam_jax.refine.prompts import Prompts

# ---------------------------------------------------------------- hand-computed fusion


def _hand_case():
    """Rough 2×2 grid, image 4×4 (2×2 pixels per cell), q = 2 boxes, k = 2 masks."""
    rough = np.array([[0.2, 0.4], [0.6, 0.0]], dtype=np.float32)
    masks = np.zeros((2, 2, 4, 4), dtype=bool)
    masks[0, 0, 0:2, 0:2] = True  # covers cell (0, 0) fully
    masks[0, 1, 0, 3] = True  # 1 of the 4 pixels of cell (0, 1)
    masks[1, 0, 3, :] = True  # bottom image row: half of cells (1, 0) and (1, 1)
    scores = np.array([[0.9, 0.8], [0.5, 0.3]], dtype=np.float32)
    # O + Σ m·s: (0,0) 0.2 + 0.9 = 1.1; (0,1) 0.4 + 0.8·0.25 = 0.6;
    #            (1,0) 0.6 + 0.5·0.5 = 0.85; (1,1) 0.0 + 0.5·0.5 = 0.25.
    summed = np.array([[1.1, 0.6], [0.85, 0.25]])
    return rough, masks, scores, summed


def test_fuse_by_hand_all_norms():
    rough, masks, scores, summed = _hand_case()
    np.testing.assert_allclose(fuse(rough, masks, scores, norm="none"), summed, atol=1e-6)
    # max = 1.1 > 1 → divide by it.
    np.testing.assert_allclose(fuse(rough, masks, scores, norm="max"), summed / 1.1, atol=1e-6)
    # minmax: (x − 0.25) / (1.1 − 0.25).
    expected = np.array([[1.0, 0.35 / 0.85], [0.6 / 0.85, 0.0]])
    np.testing.assert_allclose(fuse(rough, masks, scores, norm="minmax"), expected, atol=1e-6)
    assert fuse(rough, masks, scores).dtype == np.float32


def test_max_norm_leaves_maps_not_above_one():
    fused = np.array([[0.3, 1.0], [0.2, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(normalize(fused, "max"), fused)
    np.testing.assert_array_equal(normalize(np.full((2, 2), 0.7), "minmax"), np.zeros((2, 2)))


@pytest.mark.parametrize("norm", ["max", "minmax", "none"])
def test_no_component_keeps_rough_unchanged(norm):
    rough = np.random.default_rng(0).random((8, 8)).astype(np.float32) * 0.4
    out = fuse(rough, np.zeros((0, 3, 20, 30), bool), np.zeros((0, 3)), norm=norm)
    np.testing.assert_array_equal(out, rough)
    assert out is not rough
    # The image score of an image without prompts is its rough map's maximum.
    final, score = fuse_scored(rough, np.zeros((0, 3, 20, 30), bool), np.zeros((0, 3)), norm)
    np.testing.assert_array_equal(final, rough)
    assert score == float(rough.max()) and isinstance(score, float)


@pytest.mark.parametrize("norm", ["max", "minmax", "none"])
def test_fuse_scored_image_score_is_the_peak_before_norm(norm):
    rough, masks, scores, summed = _hand_case()
    final, score = fuse_scored(rough, masks, scores, norm)
    np.testing.assert_array_equal(final, fuse(rough, masks, scores, norm))
    assert score == pytest.approx(summed.max(), abs=1e-6)  # 1.1, whatever the Norm


def test_unknown_norm_and_bad_shapes():
    rough, masks, scores, _ = _hand_case()
    with pytest.raises(ValueError, match="norm"):
        fuse(rough, masks, scores, norm="sigmoid")
    with pytest.raises(ValueError, match="scores"):
        fuse(rough, masks, scores[:1])


def test_masks_to_grid_area_average():
    # 3×3 image onto a 2×2 grid (cv2 INTER_AREA path): each cell spans 1.5×1.5 pixels, so
    # pixel (0, 0) alone covers 1 / 2.25 of cell (0, 0) and nothing else.
    mask = np.zeros((1, 1, 3, 3), dtype=bool)
    mask[0, 0, 0, 0] = True
    grid = masks_to_grid(mask, 2)
    np.testing.assert_allclose(grid[0, 0], [[1 / 2.25, 0], [0, 0]], atol=1e-6)
    np.testing.assert_allclose(masks_to_grid(np.ones((2, 3, 7, 5), bool), 3), 1.0, atol=1e-6)
    # Integer factors: the exact block mean equals OpenCV's INTER_AREA.
    rand = np.random.default_rng(0).random((4, 3, 12, 18)) > 0.5
    block = masks_to_grid(rand, (4, 6))
    assert block.shape == (4, 3, 4, 6) and block.dtype == np.float32
    via_cv2 = _cv2_area(rand.reshape(12, 12, 18), 4, 6)
    np.testing.assert_allclose(block.reshape(12, 4, 6), via_cv2, atol=1e-6)
    assert masks_to_grid(np.zeros((0, 3, 9, 9), bool), 4).shape == (0, 3, 4, 4)


def test_fuse_batch_mixed_sizes():
    rough, masks, scores, summed = _hand_case()
    empty = (np.zeros((0, 3, 6, 9), bool), np.zeros((0, 3), np.float32))
    out = fuse_batch(np.stack([rough, rough]), [masks, empty[0]], [scores, empty[1]], "none")
    np.testing.assert_allclose(out[0], summed, atol=1e-6)
    np.testing.assert_array_equal(out[1], rough)


# ---------------------------------------------------------------- oracle refiner experiment

S = 64
IMAGE_HW = (96, 128)  # non-square, not a multiple of S: exercises the INTER_AREA path


class OracleRefiner:
    """Returns, per box, the union of the ground-truth components that touch the box."""

    def __init__(self, gt_by_image: dict[int, np.ndarray]):
        self.gt_by_image = gt_by_image  # id(image) → bool (H, W) ground truth
        self.calls = 0

    def refine(self, image, prompts: Prompts, multimask: bool = True):
        self.calls += 1
        gt = self.gt_by_image[id(image)]
        labels, _ = ndimage.label(gt, structure=np.ones((3, 3)))
        masks = np.zeros((prompts.num_boxes, 3, *gt.shape), dtype=bool)
        for i, (x0, y0, x1, y1) in enumerate(prompts.boxes):
            window = labels[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))]
            hit = np.unique(window[window > 0])
            masks[i] = np.isin(labels, hit)[None]
        scores = np.tile(np.array([0.9, 0.8, 0.7], dtype=np.float32), (prompts.num_boxes, 1))
        return masks, scores


class ExplodingRefiner:
    def refine(self, image, prompts, multimask=True):
        raise AssertionError("SAM must be skipped for an image without components")

    def refine_batch(self, images, prompts, multimask=True):
        raise AssertionError("SAM must be skipped for a batch without components")


def _ellipse(hw, centre, radii):
    yy, xx = np.mgrid[: hw[0], : hw[1]]
    return ((yy - centre[0]) / radii[0]) ** 2 + ((xx - centre[1]) / radii[1]) ** 2 <= 1.0


def _synthetic_set(rng: np.random.Generator, n_anomalous: int = 5, n_normal: int = 2):
    """Ground truths at image size and rough maps at S×S that only partly cover them."""
    gts, roughs = [], []
    for i in range(n_anomalous + n_normal):
        gt = np.zeros(IMAGE_HW, dtype=bool)
        for _ in range(rng.integers(1, 3) if i < n_anomalous else 0):
            centre = (rng.integers(20, 76), rng.integers(20, 108))
            gt |= _ellipse(IMAGE_HW, centre, rng.integers(8, 18, size=2))
        core = ndimage.binary_erosion(masks_to_grid(gt[None, None], S)[0, 0] > 0.5, iterations=2)
        rough = 0.85 * ndimage.gaussian_filter(core.astype(np.float32), 1.5)
        rough += rng.normal(0.0, 0.06, rough.shape)
        if i == n_anomalous:  # a false-positive blob on a normal image
            rough += 0.6 * _ellipse((S, S), (40, 20), (3, 4))
        gts.append(gt)
        roughs.append(np.clip(rough, 0.0, 1.0).astype(np.float32))
    return gts, np.stack(roughs)


def _f1_max(maps: np.ndarray, gts: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(gts.ravel(), maps.ravel())
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(f1.max())


def _pro(maps: np.ndarray, gts: np.ndarray, max_fpr: float = 0.3, steps: int = 300) -> float:
    """MVTec PRO: mean per-region overlap vs FPR, area up to max_fpr / max_fpr."""
    regions = []
    for n, gt in enumerate(gts):
        labels, count = ndimage.label(gt, structure=np.ones((3, 3)))
        regions += [(n, labels == k) for k in range(1, count + 1)]
    fprs, pros = [], []
    for t in np.linspace(maps.max(), maps.min(), steps):
        pred = maps > t
        fprs.append((pred & ~gts).sum() / (~gts).sum())
        pros.append(np.mean([(pred[n] & r).sum() / r.sum() for n, r in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    pro_at_max = np.interp(max_fpr, fprs, pros)
    keep = fprs <= max_fpr
    x = np.concatenate([fprs[keep], [max_fpr]])
    y = np.concatenate([pros[keep], [pro_at_max]])
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / max_fpr)


def test_oracle_refiner_improves_f1_max_and_pro():
    rng = np.random.default_rng(0)
    gts, roughs = _synthetic_set(rng)
    images = [np.zeros((*IMAGE_HW, 3), np.uint8) for _ in gts]
    refiner = OracleRefiner({id(img): gt for img, gt in zip(images, gts)})
    config = RefineConfig(sam="none")  # threshold 0.47, m = 5, 8-connectivity, norm "max"
    finals = np.stack([mmr(o, img, refiner, config, rng).final for o, img in zip(roughs, images)])
    # SAM runs only on images with a component: the anomalous ones and the false alarm.
    assert refiner.calls == int((roughs > config.threshold).any(axis=(1, 2)).sum()) == 6
    gt_grid = np.stack([masks_to_grid(g[None, None], S)[0, 0] > 0.5 for g in gts])
    f1_rough, f1_final = _f1_max(roughs, gt_grid), _f1_max(finals, gt_grid)
    pro_rough, pro_final = _pro(roughs, gt_grid), _pro(finals, gt_grid)
    summary = f"F1-max {f1_rough:.3f} → {f1_final:.3f}; PRO {pro_rough:.3f} → {pro_final:.3f}"
    print(summary, file=sys.stderr)
    assert f1_final > f1_rough + 0.05
    assert pro_final > pro_rough + 0.05
    assert finals.max() <= 1.0 + 1e-6


def test_mmr_skips_refiner_without_components():
    rough = np.full((S, S), 0.2, dtype=np.float32)
    image = np.zeros((*IMAGE_HW, 3), np.uint8)
    for norm in ("max", "minmax", "none"):
        config = dataclasses.replace(RefineConfig(), fusion_norm=norm)
        out = mmr(rough, image, ExplodingRefiner(), config, np.random.default_rng(0))
        np.testing.assert_array_equal(out.final, rough)
        assert out.masks.shape == (0, 3, *IMAGE_HW) and out.scores.shape == (0, 3)
        assert out.prompts.num_boxes == 0
        assert out.image_score == np.float32(0.2)  # no prompt: the rough map's maximum


# ---------------------------------------------------------------- mmr_batch


class BatchOracle(OracleRefiner):
    """The oracle with a `refine_batch`, recording which images each batched call got."""

    def __init__(self, gt_by_image):
        super().__init__(gt_by_image)
        self.batches = []

    def refine_batch(self, images, prompts, multimask=True):
        self.batches.append([id(image) for image in images])
        return [self.refine(image, p, multimask) for image, p in zip(images, prompts)]


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("sampling", ["shared", "per_component"])
def test_mmr_batch_equals_mmr(batched, sampling):
    gts, roughs = _synthetic_set(np.random.default_rng(0))
    images = [np.zeros((*IMAGE_HW, 3), np.uint8) for _ in gts]
    gt_by_image = {id(img): gt for img, gt in zip(images, gts)}
    config = dataclasses.replace(RefineConfig(sam="none"), point_sampling=sampling)
    refiner = BatchOracle(gt_by_image) if batched else OracleRefiner(gt_by_image)
    rngs = [np.random.default_rng([7, n]) for n in range(len(images))]
    got = mmr_batch(roughs, images, refiner, config, rngs)
    with_boxes = [n for n, o in enumerate(roughs) if (o > config.threshold).any()]
    assert refiner.calls == len(with_boxes) == 6
    if batched:  # one call, only the images with a component, in order
        assert refiner.batches == [[id(images[n]) for n in with_boxes]]
    for n, (rough, image) in enumerate(zip(roughs, images)):
        want = mmr(rough, image, OracleRefiner(gt_by_image), config, np.random.default_rng([7, n]))
        np.testing.assert_array_equal(got[n].prompts.points, want.prompts.points)
        np.testing.assert_array_equal(got[n].masks, want.masks)
        np.testing.assert_array_equal(got[n].scores, want.scores)
        np.testing.assert_array_equal(got[n].final, want.final)
        assert got[n].image_score == want.image_score


def test_mmr_seeded_draws_each_image_from_its_position():
    """Evaluation's and prediction's MMR: image n's points from default_rng([seed, index_n]),
    whatever batch it is in; no refiner, no MMR."""
    gts, roughs = _synthetic_set(np.random.default_rng(0))
    images = [np.zeros((*IMAGE_HW, 3), np.uint8) for _ in gts]
    refiner = OracleRefiner({id(img): gt for img, gt in zip(images, gts)})
    config = RefineConfig(sam="none")
    indices = np.arange(10, 10 + len(images), dtype=np.int64)
    got = mmr_seeded(roughs, images, refiner, config, 7, indices)
    want = mmr_batch(roughs, images, refiner, config,
                     [np.random.default_rng([7, int(i)]) for i in indices])  # fmt: skip
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a.prompts.points, b.prompts.points)
        np.testing.assert_array_equal(a.final, b.final)
    tail = mmr_seeded(roughs[3:], images[3:], refiner, config, 7, indices[3:])  # another batch
    np.testing.assert_array_equal(tail[0].prompts.points, got[3].prompts.points)
    assert mmr_seeded(roughs, images, None, config, 7, indices) == [None] * len(images)


def test_mmr_batch_no_components_and_sizes():
    roughs = np.full((3, S, S), 0.2, dtype=np.float32)
    roughs[1, 10:20, 10:20] = 0.9
    sizes = [(40, 60), (96, 128), (70, 50)]
    images = [np.zeros((*hw, 3), np.uint8) for hw in sizes]
    refiner = BatchOracle({id(images[1]): np.ones(sizes[1], bool)})
    config = dataclasses.replace(RefineConfig(sam="none"), multimask=False)
    rngs = [np.random.default_rng(n) for n in range(3)]
    got = mmr_batch(roughs, images, refiner, config, rngs)
    assert refiner.batches == [[id(images[1])]]
    for n in (0, 2):
        np.testing.assert_array_equal(got[n].final, roughs[n])
        assert got[n].masks.shape == (0, 1, *sizes[n]) and got[n].scores.shape == (0, 1)
        assert got[n].image_score == np.float32(0.2)  # no prompt: the rough map's maximum
    # One box; the oracle's three masks cover the whole image with scores 0.9, 0.8, 0.7: the
    # fused map is O + 2.4, its peak before Norm 0.9 + 2.4.
    assert got[1].image_score == pytest.approx(3.3, abs=1e-5)
    assert got[1].masks.shape[0] == 1 and not np.array_equal(got[1].final, roughs[1])
    # Nothing anywhere: the refiner is never called, not even with an empty batch.
    flat = np.full((2, S, S), 0.2, np.float32)
    out = mmr_batch(flat, images[:2], ExplodingRefiner(), config, rngs[:2])
    assert [o.prompts.num_boxes for o in out] == [0, 0]
    assert mmr_batch(flat[:0], [], ExplodingRefiner(), config, []) == []
    with pytest.raises(ValueError, match="batch sizes"):
        mmr_batch(roughs, images[:2], refiner, config, rngs)


# ---------------------------------------------------------------- MMR options by hand
# Grid 8×8 onto an image H = 16, W = 24: a cell is 2 pixels high and 3 wide (sy = 2, sx = 3),
# so masks go to the grid by the exact block mean (6 pixels per cell). A component spanning
# rows r0..r1 and columns c0..c1 has the box [3·c0, 2·r0, 3·(c1 + 1), 2·(r1 + 1)], and cell
# (r, c) has its centre at x = 3·(c + 0.5), y = 2·(r + 0.5).
HAND_HW = (16, 24)


class ScriptedRefiner:
    """Returns the same fixed masks and scores for every call and records the prompts."""

    def __init__(self, masks: np.ndarray, scores: np.ndarray):
        self.masks, self.scores = masks, scores
        self.seen: list[tuple[Prompts, bool]] = []

    def refine(self, image, prompts: Prompts, multimask: bool = True):
        self.seen.append((prompts, multimask))
        return self.masks[: prompts.num_boxes], self.scores[: prompts.num_boxes]


class BoxFillRefiner:
    """One mask per box: the box's own pixel rectangle, score 0.5 (boxes are whole pixels)."""

    def __init__(self):
        self.seen: list[tuple[Prompts, bool]] = []

    def refine(self, image, prompts: Prompts, multimask: bool = True):
        self.seen.append((prompts, multimask))
        masks = np.zeros((prompts.num_boxes, 1, *image.shape[:2]), dtype=bool)
        for i, (x0, y0, x1, y1) in enumerate(prompts.boxes.astype(int)):
            masks[i, 0, y0:y1, x0:x1] = True
        return masks, np.full((prompts.num_boxes, 1), 0.5, np.float32)


def _norm_case():
    """One 2×2 component at 0.8 (rows 2..3, cols 2..3) on a 0.1 background, three masks."""
    rough = np.full((8, 8), 0.1, dtype=np.float32)
    rough[2:4, 2:4] = 0.8
    masks = np.zeros((1, 3, *HAND_HW), dtype=bool)
    masks[0, 0, 4:8, 6:12] = True  # exactly the component's 4 cells (coverage 1)
    masks[0, 1, 4:6, 6:9] = True  # exactly cell (2, 2)
    masks[0, 2, 8, 12] = True  # 1 pixel of the 6 of cell (4, 4)
    scores = np.array([[0.5, 0.25, 0.6]], dtype=np.float32)
    # O + Σ m·s: (2, 2) 0.8 + 0.5 + 0.25 = 1.55; (2, 3), (3, 2), (3, 3) 0.8 + 0.5 = 1.3;
    # (4, 4) 0.1 + 0.6 / 6 = 0.2; every other cell 0.1.
    summed = np.full((8, 8), 0.1)
    summed[2:4, 2:4] = 1.3
    summed[2, 2] = 1.55
    summed[4, 4] = 0.2
    return rough, masks, scores, summed


@pytest.mark.parametrize("norm", ["max", "minmax", "none"])
def test_mmr_fusion_norms_by_hand(norm):
    rough, masks, scores, summed = _norm_case()
    refiner = ScriptedRefiner(masks, scores)
    config = dataclasses.replace(RefineConfig(sam="none"), fusion_norm=norm)
    out = mmr(rough, np.zeros((*HAND_HW, 3), np.uint8), refiner, config, np.random.default_rng(0))
    # Rows 2..3 and columns 2..3: x 3·2 = 6 to 3·4 = 12, y 2·2 = 4 to 2·4 = 8.
    assert len(refiner.seen) == 1 and refiner.seen[0][1] is True  # multimask by default
    np.testing.assert_array_equal(out.prompts.boxes, [[6, 4, 12, 8]])
    if norm == "none":
        expected = summed
    elif norm == "max":  # peak 1.55 > 1: divided by it
        expected = summed / 1.55
    else:  # minmax: (x − 0.1) / (1.55 − 0.1); the background goes to 0, (2, 2) to 1
        expected = np.zeros((8, 8))
        expected[2:4, 2:4] = 1.2 / 1.45
        expected[2, 2] = 1.0
        expected[4, 4] = 0.1 / 1.45
    np.testing.assert_allclose(out.final, expected, atol=1e-6)
    assert out.final.dtype == np.float32
    np.testing.assert_array_equal(out.masks, masks)
    np.testing.assert_array_equal(out.scores, scores)


def test_image_score_breaks_the_ties_of_max_norm_and_gives_sklearns_auroc():
    """Under Norm "max" every refined map peaks at exactly 1.0, so each map's max ties them all;
    the image score is the peak BEFORE Norm, which tells them apart (docs/method.md §5.2)."""
    from sklearn.metrics import roc_auc_score

    rough, masks, _, _ = _norm_case()
    config = RefineConfig(sam="none")  # fusion_norm "max" by default
    assert config.fusion_norm == "max"
    image = np.zeros((*HAND_HW, 3), np.uint8)
    # Cell (2, 2) = 0.8 + s_0 + s_1 is the peak (the other component cells 0.8 + s_0 = 1.3):
    # 0.8 + 0.5 + 0.25 = 1.55, 0.8 + 0.5 + 0.05 = 1.35, 0.8 + 0.5 + 0.15 = 1.45.
    second = [0.25, 0.05, 0.15]
    peaks = [1.55, 1.35, 1.45]
    results = []
    for s1 in second:
        scores = np.array([[0.5, s1, 0.6]], np.float32)
        results.append(mmr(rough, image, ScriptedRefiner(masks, scores), config,
                           np.random.default_rng(0)))  # fmt: skip
    normal = np.full((8, 8), 0.3, np.float32)  # no component above 0.47: no prompt
    results.append(mmr(normal, image, ExplodingRefiner(), config, np.random.default_rng(0)))
    for r, peak in zip(results, peaks):
        assert r.final.max() == pytest.approx(1.0, abs=1e-6)  # the tie after Norm
        assert r.image_score == pytest.approx(peak, abs=1e-6)
    assert results[3].image_score == np.float32(0.3) and results[3].final.max() == np.float32(0.3)
    image_scores = np.array([r.image_score for r in results], np.float32)
    assert len(set(image_scores.tolist())) == 4
    labels = np.array([1, 0, 1, 0])
    finals = np.stack([r.final for r in results])
    gts = np.zeros(finals.shape, bool)
    gts[0, 2:4, 2:4] = gts[2, 2:4, 2:4] = True
    # Independent computation: 1.55 and 1.45 (anomalous) above 1.35 and 0.3 (normal) → 1.0.
    expected = roc_auc_score(labels, image_scores)
    assert expected == 1.0
    got = compute_metrics(finals, gts, image_scores=image_scores, labels=labels)
    assert got["image_auroc"] == expected
    # The final maps' maxima tie the three refined images: 1 vs 1 counts ½ → 0.75.
    assert compute_metrics(finals, gts)["image_auroc"] == roc_auc_score(labels, finals.max((1, 2)))
    assert compute_metrics(finals, gts)["image_auroc"] == 0.75
    # mmr_batch gives the same scores.
    batch = mmr_batch(
        [rough] * 3, [image] * 3,
        _PerCallRefiner(masks, [np.array([[0.5, s1, 0.6]], np.float32) for s1 in second]),
        config, [np.random.default_rng(n) for n in range(3)],
    )  # fmt: skip
    assert [b.image_score for b in batch] == image_scores[:3].tolist()


class _PerCallRefiner:
    """The same masks each call, the scores of call n from `scores[n]` (called in order)."""

    def __init__(self, masks: np.ndarray, scores: list[np.ndarray]):
        self.masks, self.scores, self.calls = masks, scores, 0

    def refine(self, image, prompts: Prompts, multimask: bool = True):
        scores = self.scores[self.calls]
        self.calls += 1
        return self.masks[: prompts.num_boxes], scores[: prompts.num_boxes]


def test_mmr_max_norm_keeps_a_map_whose_peak_is_not_above_one():
    # Scores scaled so that the peak is 0.8 + 0.1 + 0.05 = 0.95 ≤ 1: "max" leaves it as is,
    # "minmax" still stretches it: (x − 0.1) / (0.95 − 0.1).
    rough, masks, _, _ = _norm_case()
    scores = np.array([[0.1, 0.05, 0.6]], dtype=np.float32)
    summed = np.full((8, 8), 0.1)
    summed[2:4, 2:4] = 0.9
    summed[2, 2] = 0.95
    summed[4, 4] = 0.2
    image = np.zeros((*HAND_HW, 3), np.uint8)
    finals = {}
    for norm in ("max", "minmax", "none"):
        config = dataclasses.replace(RefineConfig(sam="none"), fusion_norm=norm)
        refiner = ScriptedRefiner(masks, scores)
        finals[norm] = mmr(rough, image, refiner, config, np.random.default_rng(0)).final
    np.testing.assert_allclose(finals["max"], summed, atol=1e-6)
    np.testing.assert_allclose(finals["none"], summed, atol=1e-6)
    np.testing.assert_allclose(finals["minmax"], (summed - 0.1) / 0.85, atol=1e-6)


def _diagonal_pair():
    """Blob A: rows 1..2, cols 1..2 at 0.9; blob B: rows 3..4, cols 3..5 at 0.7. They touch
    only at the corner of cells (2, 2) and (3, 3)."""
    rough = np.zeros((8, 8), dtype=np.float32)
    rough[1:3, 1:3] = 0.9
    rough[3:5, 3:6] = 0.7
    return rough


@pytest.mark.parametrize("connectivity", [4, 8])
def test_mmr_connectivity_boxes_and_fusion_by_hand(connectivity):
    rough = _diagonal_pair()
    refiner = BoxFillRefiner()
    config = dataclasses.replace(
        RefineConfig(sam="none"), connectivity=connectivity, fusion_norm="none", multimask=False
    )
    image = np.zeros((*HAND_HW, 3), np.uint8)
    out = mmr(rough, image, refiner, config, np.random.default_rng(0))
    assert len(refiner.seen) == 1 and refiner.seen[0][1] is False
    components = np.zeros((8, 8), dtype=np.int32)
    # Every mask is its box's cell rectangle, so fusion adds 0.5 to each cell of each box.
    expected = rough.astype(np.float64)
    if connectivity == 8:
        # One component: rows 1..4, cols 1..5 → x 3 to 18, y 2 to 10.
        np.testing.assert_array_equal(out.prompts.boxes, [[3, 2, 18, 10]])
        components[1:3, 1:3] = components[3:5, 3:6] = 1
        expected[1:5, 1:6] += 0.5  # cells between the blobs, e.g. (1, 4), (4, 1), get it too
    else:
        # Two components in raster order: A (rows 1..2, cols 1..2) → [3, 2, 9, 6];
        # B (rows 3..4, cols 3..5) → [9, 6, 18, 10].
        np.testing.assert_array_equal(out.prompts.boxes, [[3, 2, 9, 6], [9, 6, 18, 10]])
        components[1:3, 1:3] = 1
        components[3:5, 3:6] = 2
        expected[1:3, 1:3] += 0.5
        expected[3:5, 3:6] += 0.5
    np.testing.assert_array_equal(out.prompts.components, components)
    assert out.masks.shape == (out.prompts.num_boxes, 1, *HAND_HW)
    np.testing.assert_allclose(out.final, expected, atol=1e-6)


def _two_components():
    """Component 1: rows 1..2, cols 1..3 (6 cells); component 2: row 5, cols 5..6 (2 cells)."""
    rough = np.zeros((8, 8), dtype=np.float32)
    rough[1:3, 1:4] = 0.9
    rough[5, 5:7] = 0.8
    return rough


def _centre(row: int, col: int) -> tuple[float, float]:
    return (3 * (col + 0.5), 2 * (row + 0.5))


# Hand-computed cell centres (x, y) of each component.
_COMPONENT_CENTRES = [
    {_centre(r, c) for r in (1, 2) for c in (1, 2, 3)},  # x 4.5, 7.5, 10.5; y 3, 5
    {_centre(5, 5), _centre(5, 6)},  # (16.5, 11), (19.5, 11)
]


def _run_sampling(sampling: str, points: int, seed: int) -> Prompts:
    refiner = BoxFillRefiner()
    config = dataclasses.replace(
        RefineConfig(sam="none"), point_sampling=sampling, points=points, multimask=False
    )
    image = np.zeros((*HAND_HW, 3), np.uint8)
    mmr(_two_components(), image, refiner, config, np.random.default_rng(seed))
    ((prompts, _),) = refiner.seen
    np.testing.assert_array_equal(prompts.boxes, [[3, 2, 12, 6], [15, 10, 21, 12]])
    return prompts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mmr_per_component_points_by_hand(seed):
    # m = 4: component 1 (6 cells) gets 4 distinct points among its own centres; component 2
    # (2 cells) gets both its centres, then 2 padding points: label −1, coordinates (0, 0).
    p = _run_sampling("per_component", 4, seed)
    assert p.points.shape == (2, 4, 2) and p.point_labels.shape == (2, 4)
    np.testing.assert_array_equal(p.point_labels, [[1, 1, 1, 1], [1, 1, -1, -1]])
    first = [tuple(map(float, xy)) for xy in p.points[0]]
    assert len(set(first)) == 4 and set(first) <= _COMPONENT_CENTRES[0]
    assert {tuple(map(float, xy)) for xy in p.points[1, :2]} == _COMPONENT_CENTRES[1]
    np.testing.assert_array_equal(p.points[1, 2:], np.zeros((2, 2)))
    # m above every component's size: width 6 = the largest component; all centres taken.
    p = _run_sampling("per_component", 10, seed)
    assert p.points.shape == (2, 6, 2)
    np.testing.assert_array_equal(p.point_labels, [[1] * 6, [1, 1, -1, -1, -1, -1]])
    assert {tuple(map(float, xy)) for xy in p.points[0]} == _COMPONENT_CENTRES[0]
    assert {tuple(map(float, xy)) for xy in p.points[1, :2]} == _COMPONENT_CENTRES[1]
    np.testing.assert_array_equal(p.points[1, 2:], np.zeros((4, 2)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mmr_shared_points_by_hand(seed):
    # m = 4 among all 8 anomalous cells, the same 4 for both boxes, all labelled 1 (no padding).
    union = _COMPONENT_CENTRES[0] | _COMPONENT_CENTRES[1]
    p = _run_sampling("shared", 4, seed)
    assert p.points.shape == (2, 4, 2)
    np.testing.assert_array_equal(p.point_labels, np.ones((2, 4)))
    np.testing.assert_array_equal(p.points[0], p.points[1])
    shared = [tuple(map(float, xy)) for xy in p.points[0]]
    assert len(set(shared)) == 4 and set(shared) <= union
    # m = 10 > 8 anomalous cells: all 8 centres, for both boxes; no padding.
    p = _run_sampling("shared", 10, seed)
    assert p.points.shape == (2, 8, 2)
    np.testing.assert_array_equal(p.point_labels, np.ones((2, 8)))
    np.testing.assert_array_equal(p.points[0], p.points[1])
    assert {tuple(map(float, xy)) for xy in p.points[0]} == union
