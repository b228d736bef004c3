"""Eq. 9 fusion (SPEC §4) by hand, norm modes, and an oracle-refiner experiment."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import precision_recall_curve

from clipsam_jax.config import RefineConfig
from clipsam_jax.refine.fusion import (
    _cv2_area,
    fuse,
    fuse_batch,
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
    assert got[1].masks.shape[0] == 1 and not np.array_equal(got[1].final, roughs[1])
    # Nothing anywhere: the refiner is never called, not even with an empty batch.
    flat = np.full((2, S, S), 0.2, np.float32)
    out = mmr_batch(flat, images[:2], ExplodingRefiner(), config, rngs[:2])
    assert [o.prompts.num_boxes for o in out] == [0, 0]
    assert mmr_batch(flat[:0], [], ExplodingRefiner(), config, []) == []
    with pytest.raises(ValueError, match="batch sizes"):
        mmr_batch(roughs, images[:2], refiner, config, rngs)
