"""HQ-SAM refiner (the `[hq]` extra): its batched output equals HQ-SAM's own `SamPredictor`,
image by image, on random weights; registry, checkpoints and MMR through it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipsam_jax.config import RefineConfig, RuntimeConfig
from clipsam_jax.errors import CheckpointError
from clipsam_jax.refine.fusion import mmr_batch
from clipsam_jax.refine.hq_sam import HQ_VARIANTS, HqSamRefiner
from clipsam_jax.refine.registry import REFINERS, build_refiner
from clipsam_jax.refine.sam_build import build_sam
from tests.test_sam import assert_masks_agree

CPU = RuntimeConfig(sam_device="cpu")


def _predictor(model):
    """HQ-SAM's own predictor (imported here, after `hq_sam` has quieted the package's import)."""
    from segment_anything_hq import SamPredictor

    return SamPredictor(model)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def refiner():
    return build_refiner(RefineConfig(sam="tiny-random-hq"), CPU)


@pytest.mark.parametrize("multimask", [True, False])
def test_batched_refiner_equals_hq_sams_predictor(refiner, two_image_prompts, multimask):
    images, prompts = two_image_prompts
    results = refiner.refine_batch(images, prompts, multimask)
    predictor = _predictor(refiner.model)
    for n, (image, p) in enumerate(zip(images, prompts, strict=True)):
        masks, scores = results[n]
        assert masks.shape == (p.num_boxes, 1, *image.shape[:2]) and scores.shape == (
            p.num_boxes,
            1,
        )
        assert 0 < masks.mean() < 1  # not trivial, so the comparison means something
        predictor.set_image(image)
        for i in range(p.num_boxes):
            m, s, _ = predictor.predict(p.points[i], p.point_labels[i], p.boxes[i],
                                        multimask_output=multimask)  # fmt: skip
            assert_masks_agree(m, masks[i], f"image {n} box {i}")
            np.testing.assert_allclose(s, scores[i], atol=1e-5)


def test_hq_mask_is_not_sams_own(refiner, two_image_prompts):
    """The HQ token changes the mask: the same weights' plain-SAM decoding differs."""
    images, prompts = two_image_prompts
    hq, _ = refiner.refine(images[0], prompts[0], multimask=False)
    model = refiner.model
    predictor = _predictor(model)
    predictor.set_image(images[0])
    box = prompts[0]
    sam_only, _, _ = predictor.predict(box.points[0], box.point_labels[0], box.boxes[0],
                                       multimask_output=False, hq_token_only=True)  # fmt: skip
    assert (sam_only[0] != hq[0, 0]).any()


def test_chunked_boxes_and_fused_attention_give_the_same_masks(refiner, two_image_prompts):
    images, prompts = two_image_prompts
    want = refiner.refine_batch(images, prompts)
    chunked = HqSamRefiner(refiner.model, max_boxes_per_call=1, attention="stock")
    for (m, s), (wm, ws) in zip(chunked.refine_batch(images, prompts), want, strict=True):
        assert_masks_agree(m, wm)
        np.testing.assert_allclose(s, ws, atol=1e-5)


def test_mmr_runs_through_hq_sam(refiner, two_image_prompts):
    images, _ = two_image_prompts
    roughs = np.zeros((2, 16, 16), np.float32)
    roughs[0, 2:5, 1:4] = 0.9
    results = mmr_batch(roughs, images, refiner, RefineConfig(sam="tiny-random-hq"),
                        [np.random.default_rng(n) for n in range(2)])  # fmt: skip
    assert results[0].masks.shape[1] == 1 and results[1].masks.shape[0] == 0
    assert results[0].final.shape == (16, 16)


def test_registry_names_and_checkpoint_messages(tmp_path):
    assert {"hq_vit_h", "hq_vit_l", "hq_vit_b", "tiny-random-hq"} <= set(REFINERS)
    assert HQ_VARIANTS["hq_vit_h"].url.endswith("lkeab/hq-sam/resolve/main/sam_hq_vit_h.pth")
    assert HQ_VARIANTS["hq_vit_h"].hash_prefix is None  # no hash published
    with pytest.raises(CheckpointError, match=r"sam_hq_vit_b\.pth.*--download-sam"):
        build_sam("hq_vit_b", cache_dir=tmp_path, variants=HQ_VARIANTS)
    # Weights of another width are refused before the model is built.
    state = build_sam("tiny-random-hq", device="cpu", variants=HQ_VARIANTS).state_dict()
    torch.save(state, tmp_path / "tiny.pth")
    with pytest.raises(CheckpointError, match="variant mismatch: --sam hq_vit_b"):
        build_sam("hq_vit_b", tmp_path / "tiny.pth", variants=HQ_VARIANTS)
