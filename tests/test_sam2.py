"""SAM 2.1 refiner (the `[sam2]` extra): its batched output equals SAM 2's own
`SAM2ImagePredictor`, image by image, on random weights; registry, checkpoints and MMR
through it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from clipsam_jax.config import RefineConfig, RuntimeConfig
from clipsam_jax.errors import CheckpointError
from clipsam_jax.refine.fusion import mmr_batch
from clipsam_jax.refine.registry import REFINERS, build_refiner
from clipsam_jax.refine.sam2 import SAM2_VARIANTS, Sam2Refiner
from clipsam_jax.refine.sam_build import build_sam, identify_variant
from tests.test_sam import assert_masks_agree

CPU = RuntimeConfig(sam_device="cpu")
# SAM 2's predictor scripts its transforms with torch.jit, which torch deprecates.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]


@pytest.fixture(scope="module")
def refiner():
    return build_refiner(RefineConfig(sam="tiny-random-sam2"), CPU)


def _stock(model, images, prompts, multimask, with_points=True):
    """SAM 2's own batched predictor on the same prompts: masks and scores per image."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(model)
    predictor.set_image_batch(list(images))
    points = [p.points for p in prompts] if with_points else None
    labels = [p.point_labels for p in prompts] if with_points else None
    masks, scores, _ = predictor.predict_batch(points, labels, [p.boxes for p in prompts],
                                               multimask_output=multimask)  # fmt: skip
    return masks, scores


@pytest.mark.parametrize("multimask", [True, False])
def test_batched_refiner_equals_sam2s_predictor(refiner, two_image_prompts, multimask):
    images, prompts = two_image_prompts
    results = refiner.refine_batch(images, prompts, multimask)
    want_masks, want_scores = _stock(refiner.model, images, prompts, multimask)
    k = 3 if multimask else 1
    for n, (image, p) in enumerate(zip(images, prompts, strict=True)):
        masks, scores = results[n]
        assert masks.shape == (p.num_boxes, k, *image.shape[:2]) and scores.shape == (
            p.num_boxes,
            k,
        )
        assert 0 < masks.mean() < 1  # not trivial, so the comparison means something
        # Its predictor squeezes the box axis away when an image has one box.
        assert_masks_agree(masks, want_masks[n].reshape(masks.shape), f"image {n}")
        np.testing.assert_allclose(scores, want_scores[n].reshape(scores.shape), atol=1e-5)


def test_boxes_alone_and_the_prompts_matter(refiner, two_image_prompts):
    """Boxes without points match the stock predictor too; and the points change the masks,
    so they do reach the decoder."""
    images, prompts = two_image_prompts
    boxes_only = [dataclasses.replace(p, points=p.points[:, :0], point_labels=p.point_labels[:, :0])
                  for p in prompts]  # fmt: skip
    results = refiner.refine_batch(images, boxes_only)
    want_masks, want_scores = _stock(refiner.model, images, prompts, True, with_points=False)
    for n, (masks, scores) in enumerate(results):
        assert_masks_agree(masks, want_masks[n].reshape(masks.shape), f"image {n}")
        np.testing.assert_allclose(scores, want_scores[n].reshape(scores.shape), atol=1e-5)
    with_points = refiner.refine_batch(images, prompts)
    assert (with_points[0][0] != results[0][0]).any()


def test_chunked_boxes_and_one_image_per_call_give_the_same_masks(refiner, two_image_prompts):
    images, prompts = two_image_prompts
    want = refiner.refine_batch(images, prompts)
    chunked = Sam2Refiner(refiner.model, max_boxes_per_call=1, max_images_per_call=1)
    for (m, s), (wm, ws) in zip(chunked.refine_batch(images, prompts), want, strict=True):
        assert_masks_agree(m, wm)
        np.testing.assert_allclose(s, ws, atol=1e-5)
    assert chunked.images_encoded == 2 and chunked.boxes_decoded == 5


def test_mmr_runs_through_sam2(refiner, two_image_prompts):
    images, _ = two_image_prompts
    roughs = np.zeros((2, 16, 16), np.float32)
    roughs[0, 2:5, 1:4] = 0.9
    results = mmr_batch(roughs, images, refiner, RefineConfig(sam="tiny-random-sam2"),
                        [np.random.default_rng(n) for n in range(2)])  # fmt: skip
    assert results[0].masks.shape[1] == 3 and results[1].masks.shape[0] == 0
    assert results[0].final.shape == (16, 16)


def test_registry_names_and_checkpoints(tmp_path):
    names = {"sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l"}
    assert names | {"tiny-random-sam2"} <= set(REFINERS)
    assert {REFINERS[n].family for n in names} == {"sam2"}
    large = SAM2_VARIANTS["sam2.1_hiera_l"]
    assert (
        large.url
        == "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_large.pt"
    )
    assert large.hash_prefix is None  # no hash published
    with pytest.raises(CheckpointError, match=r"sam2\.1_hiera_small\.pt.*--download-sam"):
        build_sam("sam2.1_hiera_s", cache_dir=tmp_path, variants=SAM2_VARIANTS)
    # SAM 2's file layout (the state dict under "model") loads; weights of another size are
    # refused before the model is built, naming both shapes.
    model = build_sam("tiny-random-sam2", device="cpu", variants=SAM2_VARIANTS)
    torch.save({"model": model.state_dict()}, tmp_path / "tiny.pt")
    loaded = build_sam("tiny-random-sam2", tmp_path / "tiny.pt", device="cpu",
                       variants=SAM2_VARIANTS)  # fmt: skip
    for (key, want), got in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(want, got), key
    with pytest.raises(CheckpointError, match=r"--sam sam2\.1_hiera_t expects an encoder of "
                       r"width 96 with 12 blocks.*width 8 with 5 blocks"):  # fmt: skip
        build_sam("sam2.1_hiera_t", tmp_path / "tiny.pt", variants=SAM2_VARIANTS)


def test_tiny_and_small_are_told_apart_by_their_blocks():
    """Hiera-T and Hiera-S share the patch width (96): the block count names the file."""

    def state(blocks: int) -> dict[str, torch.Tensor]:
        weights = {"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(96, 3, 7, 7)}
        weights |= {f"image_encoder.trunk.blocks.{i}.norm1.weight": torch.zeros(1)
                    for i in range(blocks)}  # fmt: skip
        return weights

    assert identify_variant(state(12), SAM2_VARIANTS) == "sam2.1_hiera_t"
    assert identify_variant(state(16), SAM2_VARIANTS) == "sam2.1_hiera_s"
    assert identify_variant(state(13), SAM2_VARIANTS) is None
