"""SAM refiner with the tiny random model, and checkpoint handling of `build_sam`."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("segment_anything")

from clipsam_jax.config import RefineConfig, RuntimeConfig  # noqa: E402
from clipsam_jax.errors import CheckpointError, ConfigError  # noqa: E402
from clipsam_jax.refine import sam_build  # noqa: E402
from clipsam_jax.refine.fusion import mmr, mmr_batch  # noqa: E402
from clipsam_jax.refine.prompts import extract_prompts  # noqa: E402
from clipsam_jax.refine.sam import SamRefiner  # noqa: E402
from clipsam_jax.refine.sam_build import (  # noqa: E402
    SAM_VARIANTS,
    SamVariant,
    build_sam,
    download_checkpoint,
    resolve_device,
    verify_hash_prefix,
)

IMAGE_HW = (90, 140)  # non-square
CPU = RuntimeConfig(sam_device="cpu")
# SAM's masks are logits > 0. The same function computed with another batch size, chunking or
# attention kernel rounds differently, so a pixel whose logit is within round-off of 0 may flip
# (even segment_anything's own attention: CPU matmul kernels block by batch size). A real bug
# moves whole regions; a few pixels in ten thousand is round-off.
MAX_FLIPPED_FRACTION = 1e-4


def assert_masks_agree(got: np.ndarray, want: np.ndarray, context: str = "") -> int:
    """Same shape, and at most MAX_FLIPPED_FRACTION of the pixels differ; returns how many."""
    assert got.shape == want.shape, context
    flipped = int(np.count_nonzero(got != want))
    assert flipped <= MAX_FLIPPED_FRACTION * want.size, f"{context}: {flipped} of {want.size}"
    return flipped


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    return build_sam("tiny-random", device="cpu")


@pytest.fixture(scope="module")
def refiner(tiny):
    return SamRefiner(tiny)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (*IMAGE_HW, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def prompts():
    rough = np.zeros((16, 16), dtype=np.float32)
    rough[2:5, 1:6] = 0.9
    rough[9:14, 10:13] = 0.8
    rough[12, 2] = 0.6
    p = extract_prompts(rough, 0.47, 4, IMAGE_HW, np.random.default_rng(0))
    assert p.num_boxes == 3
    return p


# ---------------------------------------------------------------- refiner


def test_shapes_non_square(refiner, image, prompts):
    masks, scores = refiner.refine(image, prompts)
    assert masks.shape == (3, 3, *IMAGE_HW) and masks.dtype == bool
    assert scores.shape == (3, 3) and scores.dtype == np.float32
    assert np.isfinite(scores).all()
    masks1, scores1 = refiner.refine(image, prompts, multimask=False)
    assert masks1.shape == (3, 1, *IMAGE_HW) and scores1.shape == (3, 1)


def test_batched_equals_one_by_one(refiner, image, prompts):
    masks, scores = refiner.refine(image, prompts)
    # The tiny model's masks are not trivial, so the comparison means something.
    assert 0 < masks.mean() < 1
    singles = [refiner.refine(image, prompts.select(slice(i, i + 1))) for i in range(3)]
    assert_masks_agree(np.concatenate([m for m, _ in singles]), masks)
    np.testing.assert_allclose(np.concatenate([s for _, s in singles]), scores, atol=1e-5)
    chunked_masks, chunked_scores = SamRefiner(refiner.model, 2).refine(image, prompts)
    assert_masks_agree(chunked_masks, masks)
    np.testing.assert_allclose(chunked_scores, scores, atol=1e-5)


def test_matches_segment_anything_numpy_predict(tiny, image, prompts):
    # SamPredictor.predict maps original-image prompts itself: the batched torch path must
    # agree with it box by box (catches a missing or doubled coordinate transform).
    masks, scores = SamRefiner(tiny).refine(image, prompts)
    from segment_anything import SamPredictor

    predictor = SamPredictor(tiny)
    predictor.set_image(image)
    for i in range(prompts.num_boxes):
        m, s, _ = predictor.predict(
            prompts.points[i], prompts.point_labels[i], prompts.boxes[i], multimask_output=True
        )
        assert_masks_agree(m, masks[i], f"box {i}")
        np.testing.assert_allclose(s, scores[i], atol=1e-5)


@pytest.mark.parametrize("fused", ["sdpa", "flash"])
def test_fused_attention_equals_stock(image, prompts, fused):
    # Both attentions on the same weights: the encoder's features agree to fp32 rounding, and so
    # do masks and scores. The tiny SAM has one global and one windowed (padded) block, both
    # with relative positions, made non-zero here so that the bias term is exercised ("flash"
    # folds it into 32 + 16 + 16 and 32 + 8 + 8 query/key channels).
    from segment_anything.modeling.image_encoder import Attention

    from clipsam_jax.refine.sam_attention import set_sam_attention

    model = build_sam("tiny-random", device="cpu")
    with torch.no_grad():
        for block in model.image_encoder.blocks:
            block.attn.rel_pos_h.normal_(std=0.5)
            block.attn.rel_pos_w.normal_(std=0.5)
    x = torch.randn(2, 3, model.image_encoder.img_size, model.image_encoder.img_size)
    with torch.inference_mode():
        assert set_sam_attention(model, "stock") == len(model.image_encoder.blocks)
        stock = model.image_encoder(x)
        set_sam_attention(model, fused)
        sdpa = model.image_encoder(x)
    assert not any("forward" in m.__dict__ for m in model.modules() if not isinstance(m, Attention))
    assert (sdpa - stock).abs().max() <= 1e-5 * stock.abs().max()
    masks, scores = SamRefiner(model, attention=fused).refine(image, prompts)
    assert all("forward" in m.__dict__ for m in model.modules() if isinstance(m, Attention))
    stock_masks, stock_scores = SamRefiner(model, attention="stock").refine(image, prompts)
    assert not any("forward" in m.__dict__ for m in model.modules() if isinstance(m, Attention))
    assert 0 < masks.mean() < 1
    assert (masks != stock_masks).mean() < 1e-4
    np.testing.assert_allclose(scores, stock_scores, atol=1e-5)
    with pytest.raises(ConfigError, match="stock"):
        SamRefiner(model, attention="xformers")


def test_zero_boxes_skip_sam(tiny, image):
    refiner = SamRefiner(tiny)

    def boom(*args, **kwargs):
        raise AssertionError("SAM must not run without boxes")

    refiner._encode = boom
    empty = extract_prompts(np.zeros((8, 8)), 0.47, 5, IMAGE_HW, np.random.default_rng(0))
    masks, scores = refiner.refine(image, empty)
    assert masks.shape == (0, 3, *IMAGE_HW) and masks.dtype == bool
    assert scores.shape == (0, 3) and scores.dtype == np.float32
    out = refiner.refine_batch([image, image[:40]], [empty, _empty_prompts((40, 140))], False)
    assert [m.shape for m, _ in out] == [(0, 1, *IMAGE_HW), (0, 1, 40, 140)]
    assert refiner.refine_batch([], []) == []


# Different sizes and aspect ratios (wide, tall, square, odd): different resized input sizes
# and paddings inside one encoder batch. Images 1 and 3 have no box.
BATCH_HW = [(90, 140), (64, 64), (150, 70), (33, 201), (120, 120)]


def _empty_prompts(hw):
    return extract_prompts(np.zeros((8, 8)), 0.47, 5, hw, np.random.default_rng(0))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(1)
    images, prompts = [], []
    for n, hw in enumerate(BATCH_HW):
        images.append(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
        rough = np.zeros((16, 16), dtype=np.float32)
        if n not in (1, 3):
            rough[1 + n : 5 + n, 2:7] = 0.9
            rough[10:13, 9 + n : 12 + n] = 0.8
        prompts.append(extract_prompts(rough, 0.47, 3, hw, rng))
    assert [p.num_boxes for p in prompts] == [2, 0, 2, 0, 2]
    return images, prompts


def test_refine_batch_equals_refine(tiny, batch):
    images, prompts = batch
    single = SamRefiner(tiny)
    expected = [single.refine(im, p) for im, p in zip(images, prompts)]
    refiner = SamRefiner(tiny, max_images_per_call=2)
    chunks = []
    encode = refiner._encode
    refiner._encode = lambda ims: chunks.append([im.shape[:2] for im in ims]) or encode(ims)
    got = refiner.refine_batch(images, prompts)
    # Only the 3 images with boxes reach the encoder, at most 2 per call.
    assert chunks == [[BATCH_HW[0], BATCH_HW[2]], [BATCH_HW[4]]]
    assert refiner.images_encoded == 3 and refiner.boxes_decoded == 6
    for n, ((m, s), (em, es)) in enumerate(zip(got, expected)):
        assert m.shape == em.shape == (prompts[n].num_boxes, 3, *BATCH_HW[n]), n
        assert m.dtype == bool and s.dtype == np.float32
        assert_masks_agree(m, em, f"image {n}")
        np.testing.assert_allclose(s, es, atol=1e-5, err_msg=f"image {n}")
    assert 0 < np.concatenate([m.ravel() for m, _ in got]).mean() < 1  # masks not trivial
    # One encoder call for all, and boxes chunked too: same result.
    wide = SamRefiner(tiny, max_boxes_per_call=1, max_images_per_call=8).refine_batch(
        images, prompts
    )
    for (m, s), (em, es) in zip(wide, expected):
        assert_masks_agree(m, em)
        np.testing.assert_allclose(s, es, atol=1e-5)


@pytest.mark.parametrize("multimask", [True, False])
def test_decode_boxes_equals_the_decoder_image_by_image(tiny, multimask):
    # Boxes of three images (out of order, one image without any) in one call against SAM's
    # own decoder called per image with that image's embedding.
    from clipsam_jax.refine.sam_decoder import decode_boxes

    gen = torch.Generator().manual_seed(0)
    size = tiny.image_encoder.img_size
    embeddings = torch.randn(4, 32, size // 16, size // 16, generator=gen)
    owner = torch.tensor([2, 0, 2, 1, 0])
    corners = torch.rand(5, 2, generator=gen) * size / 2
    boxes = torch.cat([corners, corners + size / 3], dim=1)
    coords = torch.rand(5, 3, 2, generator=gen) * size
    labels = torch.tensor([[1, 1, -1]] * 5, dtype=torch.int32)
    with torch.inference_mode():
        sparse, dense = tiny.prompt_encoder(points=(coords, labels), boxes=boxes, masks=None)
        pe = tiny.prompt_encoder.get_dense_pe()
        masks, iou = decode_boxes(tiny.mask_decoder, embeddings[owner], pe, sparse, dense,
                                  multimask)  # fmt: skip
        assert masks.shape == (5, 3 if multimask else 1, size // 4, size // 4)
        for image in range(3):
            rows = (owner == image).nonzero().flatten()
            want_masks, want_iou = tiny.mask_decoder(
                image_embeddings=embeddings[image : image + 1], image_pe=pe,
                sparse_prompt_embeddings=sparse[rows], dense_prompt_embeddings=dense[rows],
                multimask_output=multimask,
            )  # fmt: skip
            torch.testing.assert_close(masks[rows], want_masks, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(iou[rows], want_iou, atol=1e-5, rtol=1e-5)


def test_images_with_different_point_counts_decode_apart(tiny, batch):
    # Box-only prompts (m = 0) beside 3-point prompts in one encoder batch: separate decoder
    # calls (the token counts differ), the same masks as image by image.
    images, prompts = batch
    no_points = dataclasses.replace(prompts[2], points=np.zeros((2, 0, 2), np.float32),
                                    point_labels=np.zeros((2, 0), np.int32))  # fmt: skip
    mixed = [prompts[0], no_points, prompts[4]]
    chosen = [images[0], images[2], images[4]]
    expected = [SamRefiner(tiny).refine(im, p) for im, p in zip(chosen, mixed)]
    refiner = SamRefiner(tiny, max_images_per_call=3)
    got = refiner.refine_batch(chosen, mixed)
    assert refiner.images_encoded == 3 and refiner.boxes_decoded == 6
    for (m, s), (em, es) in zip(got, expected, strict=True):
        assert_masks_agree(m, em)
        np.testing.assert_allclose(s, es, atol=1e-5)
    assert not np.array_equal(got[1][0], SamRefiner(tiny).refine(images[2], prompts[2])[0])


def test_refine_batch_single_mask_and_errors(refiner, batch):
    images, prompts = batch
    got = refiner.refine_batch(images[:3], prompts[:3], multimask=False)
    assert [m.shape for m, _ in got] == [(2, 1, 90, 140), (0, 1, 64, 64), (2, 1, 150, 70)]
    assert [s.shape for _, s in got] == [(2, 1), (0, 1), (2, 1)]
    with pytest.raises(ValueError, match="prompt sets"):
        refiner.refine_batch(images, prompts[:2])
    with pytest.raises(ValueError, match="image 1"):
        refiner.refine_batch(images[:2], [prompts[0], prompts[0]])


def test_timers(tiny, batch):
    images, prompts = batch
    refiner = SamRefiner(tiny)
    assert refiner.encoder_seconds == refiner.decoder_seconds == 0.0
    refiner.refine_batch(images, prompts)
    first = (refiner.preprocess_seconds, refiner.encoder_seconds, refiner.decoder_seconds)
    assert all(t > 0 for t in first)
    refiner.refine(images[0], prompts[0])
    assert refiner.encoder_seconds > first[1] and refiner.decoder_seconds > first[2]
    assert (refiner.images_encoded, refiner.boxes_decoded) == (4, 8)
    refiner.reset_timers()
    assert refiner.encoder_seconds == refiner.decoder_seconds == refiner.preprocess_seconds == 0
    assert refiner.images_encoded == refiner.boxes_decoded == 0


def test_mmr_batch_equals_mmr_tiny_sam(tiny, batch):
    images, _ = batch
    config = RefineConfig(sam="tiny-random", points=3)
    roughs = np.random.default_rng(2).random((len(images), 16, 16)).astype(np.float32) * 0.6
    roughs[1] *= 0.5  # below threshold: no component
    for attention in ("stock", "sdpa", "flash"):
        refiner = SamRefiner(tiny, max_images_per_call=2, attention=attention)
        rngs = [np.random.default_rng(n) for n in range(5)]
        got = mmr_batch(roughs, images, refiner, config, rngs)
        assert refiner.images_encoded == 4
        for n, (rough, image) in enumerate(zip(roughs, images)):
            want = mmr(rough, image, refiner, config, np.random.default_rng(n))
            np.testing.assert_array_equal(got[n].prompts.boxes, want.prompts.boxes)
            np.testing.assert_array_equal(got[n].prompts.points, want.prompts.points)
            flips = assert_masks_agree(got[n].masks, want.masks, f"{attention}, image {n}")
            np.testing.assert_allclose(got[n].scores, want.scores, atol=1e-5)
            np.testing.assert_allclose(got[n].final, want.final, atol=1e-5 if not flips else 0.1)
        assert got[1].prompts.num_boxes == 0 and got[0].prompts.num_boxes > 0


def test_compiled_encoder_gives_the_eager_masks(tiny, batch):
    # torch.compile's graph capture of the image encoder (flash attention) with the "eager"
    # backend (no code generation: seconds, not minutes on CPU); then a second batch size, a
    # one-image batch, and the attention set again without invalidating the compiled graph.
    from segment_anything.modeling.image_encoder import Attention

    images, prompts = batch
    reference = SamRefiner(tiny, max_images_per_call=4).refine_batch(images, prompts)
    compiled = SamRefiner(tiny, max_images_per_call=4, compile_backend="eager")
    assert compiled._encoder is not tiny.image_encoder
    bound = [m.__dict__.get("forward") for m in tiny.modules() if isinstance(m, Attention)]
    runs = [(images, prompts), (images[:3], prompts[:3]), (images[:1], prompts[:1])]
    for some_images, some_prompts in runs:
        got = compiled.refine_batch(some_images, some_prompts)
        for (m, s), (em, es) in zip(got, reference):
            assert_masks_agree(m, em)
            np.testing.assert_allclose(s, es, atol=1e-6)
    # set_sam_attention at each call kept the very same bound methods (compile guards hold).
    assert [m.__dict__.get("forward") for m in tiny.modules() if isinstance(m, Attention)] == bound
    config, runtime = (
        RefineConfig(sam="tiny-random"),
        RuntimeConfig(sam_device="cpu", sam_compile=True),
    )
    assert SamRefiner.from_config(config, runtime).compile_backend == "inductor"  # at first use


@pytest.mark.slow  # inductor's code generation: about 50 s on one CPU core
@pytest.mark.gpu  # benchmarks/gpu_run.sh runs it on CUDA, the device --sam-compile is for
def test_sam_compile_gives_the_eager_masks(batch):
    # --sam-compile as the CLI builds it (RefineConfig.sam_compile → torch.compile(inductor) of
    # the image encoder, flash attention), against the eager encoder on the same weights: the
    # generated kernels compute the same function, rounded otherwise.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    images, prompts = batch
    runtime = RuntimeConfig(sam_device=device, sam_compile=True, sam_images_per_call=4)
    compiled = SamRefiner.from_config(RefineConfig(sam="tiny-random"), runtime)
    assert compiled.compile_backend == "inductor" and compiled.attention == "flash"
    assert compiled._encoder is not compiled.model.image_encoder
    eager = SamRefiner(build_sam("tiny-random", device=device), max_images_per_call=4)
    # 3 images with boxes, then 2 (the batch dimension is dynamic: no second compilation).
    for some_images, some_prompts in [(images, prompts), (images[:3], prompts[:3])]:
        got = compiled.refine_batch(some_images, some_prompts)
        want = eager.refine_batch(some_images, some_prompts)
        for (m, s), (em, es) in zip(got, want, strict=True):
            assert m.shape == em.shape and m.dtype == bool
            np.testing.assert_allclose(s, es, atol=1e-4)
        agree = np.concatenate([(m == em).ravel() for (m, _), (em, _) in zip(got, want)])
        assert agree.size > 0 and agree.mean() > 0.999
        assert 0 < np.concatenate([m.ravel() for m, _ in want]).mean() < 1  # not trivial
    assert compiled.images_encoded == eager.images_encoded == 5


def test_resizes_in_threads_equal_one_by_one(tiny, batch):
    images, _ = batch
    refiner = SamRefiner(tiny, max_images_per_call=4)
    together = refiner._resize(images)
    assert refiner._resize_pool is not None
    for image, resized in zip(images, together, strict=True):
        np.testing.assert_array_equal(resized, refiner.transform.apply_image(image))


def test_grayscale_and_rgba_accepted(refiner, image, prompts):
    gray = image[..., 0]
    expected = refiner.refine(np.repeat(gray[..., None], 3, axis=-1), prompts)
    got = refiner.refine(gray, prompts)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_allclose(got[1], expected[1], atol=1e-6)
    rgba = np.concatenate([image, np.full((*IMAGE_HW, 1), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(
        refiner.refine(rgba, prompts)[0], refiner.refine(image, prompts)[0]
    )


def test_per_component_padded_points_run(refiner, image):
    rough = np.zeros((16, 16), dtype=np.float32)
    rough[2:6, 2:6] = 0.9
    rough[10, 10] = 0.9  # one cell: padded with label -1
    p = extract_prompts(rough, 0.5, 3, IMAGE_HW, np.random.default_rng(0), per_component=True)
    masks, scores = refiner.refine(image, p)
    assert masks.shape == (2, 3, *IMAGE_HW) and np.isfinite(scores).all()


@pytest.mark.parametrize("attention", ["stock", "flash"])
def test_per_component_padded_points_match_sam_predictor(tiny, batch, attention):
    # Per-component points, padded with label -1 where a component has fewer than m = 3 cells,
    # for three images of different sizes in one batched call, against segment_anything's own
    # SamPredictor image by image and box by box. The padding goes to SamPredictor as it is:
    # SAM's prompt encoder embeds a label -1 point as its "not a point" token, and that token
    # still takes part in the decoder's attention, so dropping the padding points is another
    # prompt with other masks; label -1 is the meaning the refiner must reproduce.
    from segment_anything import SamPredictor

    from clipsam_jax.refine.sam_attention import set_sam_attention

    images = [batch[0][n] for n in (0, 2, 4)]
    prompts = []
    for n, im in enumerate(images):
        rough = np.zeros((16, 16), dtype=np.float32)
        rough[2 + n : 6 + n, 2:6] = 0.9  # 16 cells: 3 points
        rough[10, 10 + n] = 0.8  # 1 cell: 1 point + 2 padding
        rough[13, 2 + n : 4 + n] = 0.7  # 2 cells: 2 points + 1 padding
        rng = np.random.default_rng(n)
        p = extract_prompts(rough, 0.5, 3, im.shape[:2], rng, per_component=True)
        np.testing.assert_array_equal(p.point_labels, [[1, 1, 1], [1, -1, -1], [1, 1, -1]])
        prompts.append(p)
    got = SamRefiner(tiny, max_images_per_call=3, attention=attention).refine_batch(images, prompts)
    predictor = SamPredictor(tiny)
    set_sam_attention(tiny, "stock")  # segment_anything's own attention for the reference
    for n, (im, p) in enumerate(zip(images, prompts, strict=True)):
        predictor.set_image(im)
        masks, scores = got[n]
        for i in range(p.num_boxes):
            want, want_scores, _ = predictor.predict(
                point_coords=p.points[i],
                point_labels=p.point_labels[i],
                box=p.boxes[i],
                multimask_output=True,
            )
            assert 0 < want.mean() < 1, (n, i)  # not trivial
            assert_masks_agree(masks[i], want, f"{attention}, image {n}, box {i}")
            np.testing.assert_allclose(scores[i], want_scores, atol=1e-5, err_msg=f"{n}, {i}")


def test_prompts_for_another_size_rejected(refiner, image, prompts):
    with pytest.raises(ValueError, match="size"):
        refiner.refine(image[:50], prompts)


def test_autocast_needs_cuda(tiny):
    for name in ("bf16", "fp16", "bfloat16", "float16"):
        with pytest.raises(ConfigError, match="CUDA"):
            SamRefiner(tiny, autocast=name)
    with pytest.raises(ConfigError, match="autocast must be"):
        SamRefiner(tiny, autocast="int8")
    for name in (None, "fp32", "float32", "auto"):  # "auto" is fp32 off CUDA
        assert SamRefiner(tiny, autocast=name).autocast is None
    with pytest.raises(ConfigError, match="CUDA"):
        SamRefiner.from_config(RefineConfig(sam="tiny-random"), CPU, autocast="fp16")
    with pytest.raises(ConfigError, match="max_images_per_call"):
        SamRefiner(tiny, max_images_per_call=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("autocast", [None, "bf16", "fp16"])
@pytest.mark.parametrize("attention", ["stock", "sdpa", "flash"])
def test_cuda_batch_and_autocast(tiny, batch, autocast, attention):
    images, prompts = batch
    reference = SamRefiner(tiny).refine_batch(images, prompts)  # fp32 on CPU
    cuda_sam = build_sam("tiny-random", device="cuda")
    cuda = SamRefiner(cuda_sam, autocast=autocast, attention=attention)
    got = cuda.refine_batch(images, prompts)
    assert cuda.encoder_seconds > 0 and cuda.decoder_seconds > 0
    for (m, s), (em, es) in zip(got, reference):
        assert m.dtype == bool and s.dtype == np.float32 and m.shape == em.shape
        np.testing.assert_allclose(s, es, atol=1e-4 if autocast is None else 5e-2)
    # GPU kernels (and half precision) move logits near the threshold: nearly all pixels agree.
    # Pooled over the batch: images without boxes have empty masks (a mean over none is NaN).
    agree = np.concatenate([(m == em).ravel() for (m, _), (em, _) in zip(got, reference)])
    assert agree.size > 0 and agree.mean() > (0.999 if autocast is None else 0.98)


def test_from_config_and_warning(caplog):
    with caplog.at_level(logging.WARNING):
        refiner = SamRefiner.from_config(RefineConfig(sam="tiny-random"), CPU)
    assert "RANDOM weights" in caplog.text and "meaningless" in caplog.text
    assert refiner.device.type == "cpu" and refiner.attention == "flash"
    stock = RuntimeConfig(sam_device="cpu", sam_attention="stock")
    assert SamRefiner.from_config(RefineConfig(sam="tiny-random"), stock).attention == "stock"
    with pytest.raises(ConfigError):
        SamRefiner.from_config(RefineConfig(sam="none"))


def test_device_auto():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"


def test_library_imports_without_torch():
    # MMR's numpy parts, the refiner registry and the commands' flags load without torch: it
    # is imported only when a SAM refiner is built.
    code = (
        "import sys, clipsam_jax.refine.prompts, clipsam_jax.refine.fusion, eval.main; "
        "from clipsam_jax.refine.registry import refiner_names; assert 'vit_h' in refiner_names(); "
        "eval.main.parse(['--test', 'visa']); "
        "assert 'torch' not in sys.modules and 'segment_anything' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- build_sam errors


def test_registry():
    assert set(SAM_VARIANTS) == {"vit_h", "vit_l", "vit_b", "tiny-random"}
    assert SAM_VARIANTS["vit_h"].url == (
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"
    )
    assert SAM_VARIANTS["vit_b"].hash_prefix == "01ec64"


def test_unknown_variant_lists_valid_names():
    with pytest.raises(CheckpointError, match=r"vit_h, vit_l, vit_b, tiny-random"):
        build_sam("vit_x")


def test_missing_checkpoint_file(tmp_path):
    missing = tmp_path / "sam_vit_h_4b8939.pth"
    with pytest.raises(CheckpointError) as err:
        build_sam("vit_h", checkpoint=missing)
    assert str(missing) in str(err.value) and "--download-sam" in str(err.value)
    assert "--sam-checkpoint" in str(err.value)


def test_no_checkpoint_no_download(tmp_path):
    with pytest.raises(CheckpointError) as err:
        build_sam("vit_l", cache_dir=tmp_path)
    text = str(err.value)
    assert "sam_vit_l_0b3195.pth" in text and "--download-sam" in text
    assert "--sam-checkpoint PATH" in text


def test_wrong_variant_tiny_weights_as_vit_b(tmp_path, tiny):
    path = tmp_path / "tiny.pth"
    torch.save(tiny.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"mismatch.*vit_b.*looks like tiny-random"):
        build_sam("vit_b", checkpoint=path)


def test_wrong_variant_vit_h_shaped_tensors(tmp_path):
    # Only the distinguishing tensors: vit_h's patch embedding (1280 channels) and 32 blocks.
    path = tmp_path / "fake_vit_h.pth"
    fake = {"image_encoder.patch_embed.proj.weight": torch.zeros(1280, 3, 16, 16)}
    fake |= {f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(32)}
    torch.save(fake, path)
    with pytest.raises(CheckpointError, match=r"--sam vit_b.*looks like vit_h"):
        build_sam("vit_b", checkpoint=path)
    with pytest.raises(CheckpointError, match="looks like vit_h"):
        build_sam("tiny-random", checkpoint=path)


def test_corrupt_and_foreign_files(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x02 this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        build_sam("vit_b", checkpoint=corrupt)
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(CheckpointError, match="state dict"):
        build_sam("vit_b", checkpoint=tensor)
    other = tmp_path / "other.pth"
    torch.save({"backbone.weight": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match=r"not a vit_b checkpoint \(no image_encoder\."):
        build_sam("vit_b", checkpoint=other)


def test_tiny_checkpoint_round_trip_and_incomplete(tmp_path, tiny, image, prompts):
    state = tiny.state_dict()
    path = tmp_path / "tiny.pth"
    torch.save(state, path)
    loaded = build_sam("tiny-random", checkpoint=path, device="cpu")
    a, b = SamRefiner(tiny).refine(image, prompts), SamRefiner(loaded).refine(image, prompts)
    np.testing.assert_array_equal(a[0], b[0])
    state.pop("mask_decoder.iou_token.weight")
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="not a complete tiny-random"):
        build_sam("tiny-random", checkpoint=path)


def test_tiny_build_is_deterministic_and_keeps_global_rng(tiny):
    before = torch.random.get_rng_state()
    again = build_sam("tiny-random", device="cpu")
    assert torch.equal(torch.random.get_rng_state(), before)
    for (name, x), (_, y) in zip(tiny.state_dict().items(), again.state_dict().items()):
        assert torch.equal(x, y), name


# ---------------------------------------------------------------- download and hash check


def test_verify_hash_prefix(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"segment anything" * 1000)
    data = path.read_bytes()
    verify_hash_prefix(path, hashlib.md5(data).hexdigest()[:6])
    verify_hash_prefix(path, hashlib.sha256(data).hexdigest()[:6])
    with pytest.raises(CheckpointError, match="hash check failed"):
        verify_hash_prefix(path, "zzzzzz")  # not hex: matches no digest


def _fake_downloader(payload: bytes, calls: list):
    def download(url, dst, hash_prefix=None, progress=True):
        calls.append(url)
        Path(dst).write_bytes(payload)

    return download


def test_download_verifies_then_moves(tmp_path, monkeypatch):
    payload = b"pretend checkpoint"
    prefix = hashlib.md5(payload).hexdigest()[:6]
    spec = SamVariant(
        "vit_test", SAM_VARIANTS["vit_b"].builder, 768, 12, f"sam_vit_test_{prefix}.pth"
    )
    calls: list = []
    monkeypatch.setattr(
        sam_build.torch.hub, "download_url_to_file", _fake_downloader(payload, calls)
    )
    dst = tmp_path / spec.filename
    assert download_checkpoint(spec, dst) == dst
    assert dst.read_bytes() == payload
    assert calls == [f"https://dl.fbaipublicfiles.com/segment_anything/{spec.filename}"]
    assert [p.name for p in tmp_path.iterdir()] == [spec.filename]  # no temp file left


def test_download_bad_hash_leaves_nothing(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(sam_build.torch.hub, "download_url_to_file", _fake_downloader(b"x", calls))
    with pytest.raises(CheckpointError, match="hash check failed"):
        build_sam("vit_b", download=True, cache_dir=tmp_path)
    assert calls == [SAM_VARIANTS["vit_b"].url]
    assert list(tmp_path.iterdir()) == []


def test_download_network_error(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(sam_build.torch.hub, "download_url_to_file", fail)
    with pytest.raises(CheckpointError, match=r"could not download.*--sam-checkpoint"):
        build_sam("vit_h", download=True, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- full size


def test_vit_b_random_weights_and_mismatch(tmp_path):
    # A full-size checkpoint file (random ViT-B, 375 MB): 5 to 20 s, 2 GB of memory at peak.
    vit_b = SAM_VARIANTS["vit_b"].builder()
    path = tmp_path / "vit_b.pth"
    torch.save(vit_b.state_dict(), path)
    assert sam_build.identify_variant(vit_b.state_dict()) == "vit_b"
    with pytest.raises(CheckpointError, match="looks like vit_b"):
        build_sam("vit_h", checkpoint=path)
    build_sam("vit_b", checkpoint=path, device="cpu")
