"""The loss equations (Eq. 10-12, docs/method.md §3) and the layer helpers of the UMCI head, against
values computed by hand or with plain numpy: tests added for the mutation score
(benchmarks/mutation/README.md), each one kills mutants that survived the existing tests."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from clipsam_jax.config import LossConfig
from clipsam_jax.losses import dice_loss, downsample_masks, focal_loss, total_loss

# ----------------------------------------------------------------------------- losses


def _p_anomalous(logits: np.ndarray) -> np.ndarray:
    """Two-class softmax probability of class 1, written out: 1 / (1 + e^(l0 - l1))."""
    logits = np.asarray(logits, np.float64)
    return 1.0 / (1.0 + np.exp(logits[..., 0] - logits[..., 1]))


def _focal_np(logits, masks, gamma):
    p1 = _p_anomalous(logits)
    p_true = np.where(masks, p1, 1.0 - p1)
    return float(np.mean(-((1.0 - p_true) ** gamma) * np.log(p_true)))


def _dice_np(logits, masks, smooth):
    p = _p_anomalous(logits)
    y = np.asarray(masks, np.float64)
    per_image = [
        1.0
        - (2.0 * (y[i] * p[i]).sum() + smooth) / ((y[i] ** 2).sum() + (p[i] ** 2).sum() + smooth)
        for i in range(p.shape[0])
    ]
    return float(np.mean(per_image))


# Two images of 2×2 pixels with varied logits and masks (both classes in the batch).
_LOGITS = np.array(
    [[[[0.0, math.log(3.0)], [0.0, 0.0]], [[1.0, -1.0], [2.0, 0.5]]],
     [[[-0.5, 0.5], [0.3, 0.3]], [[0.0, 2.0], [1.5, -0.5]]]],
    np.float32,
)  # fmt: skip
_MASKS = np.array([[[True, False], [False, True]], [[False, False], [True, True]]])


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 3.5])
def test_focal_loss_against_numpy(gamma):
    got = float(focal_loss(jnp.asarray(_LOGITS), jnp.asarray(_MASKS), gamma))
    assert got == pytest.approx(_focal_np(_LOGITS, _MASKS, gamma), rel=1e-5)


def test_focal_loss_gamma_zero_is_cross_entropy_by_hand():
    # pixel A: p1 = 3/4, anomalous → −ln 0.75; pixel B: p1 = 1/2, normal → −ln 0.5.
    logits = jnp.array([[[[0.0, math.log(3.0)], [0.0, 0.0]]]])
    masks = jnp.array([[[True, False]]])
    expected = -(math.log(0.75) + math.log(0.5)) / 2
    assert float(focal_loss(logits, masks, 0.0)) == pytest.approx(expected, rel=1e-6)
    # default γ = 2 (Eq. 10): (1/4)² and (1/2)² weights
    expected2 = -(0.25**2 * math.log(0.75) + 0.5**2 * math.log(0.5)) / 2
    assert float(focal_loss(logits, masks)) == pytest.approx(expected2, rel=1e-6)


@pytest.mark.parametrize("smooth", [0.0, 0.5, 1.0, 2.0])
def test_dice_loss_per_image_then_mean_against_numpy(smooth):
    got = float(dice_loss(jnp.asarray(_LOGITS), jnp.asarray(_MASKS), smooth))
    assert got == pytest.approx(_dice_np(_LOGITS, _MASKS, smooth), rel=1e-5)


def test_dice_loss_default_smooth_one_by_hand():
    # p = [3/4, 1/2], y = [1, 0]: 1 − (2·3/4 + 1) / (1 + 9/16 + 1/4 + 1) = 1 − 2.5/2.8125 = 1/9
    logits = jnp.array([[[[0.0, math.log(3.0)], [0.0, 0.0]]]])
    masks = jnp.array([[[True, False]]])
    assert float(dice_loss(logits, masks)) == pytest.approx(1 / 9, rel=1e-6)
    # per image, not pooled over the batch: a second, perfectly predicted empty image has dice 0
    both = jnp.concatenate([logits, jnp.array([[[[30.0, -30.0], [30.0, -30.0]]]])])
    both_masks = jnp.concatenate([masks, jnp.array([[[False, False]]])])
    assert float(dice_loss(both, both_masks)) == pytest.approx(1 / 18, rel=1e-5)


def test_downsample_masks_antialiased_linear_then_half_by_hand():
    # 4 → 2 with jax's antialiased triangle: output 0 = (3·x0 + 3·x1 + x2) / 7 and output 1 =
    # (x1 + 3·x2 + 3·x3) / 7 along each axis (weights renormalized at the border).
    corner = np.zeros((1, 4, 4), bool)
    corner[0, :2, :2] = True  # cell (0, 0): (6/7)² = 0.73 → True; (0, 1): 6/49 → False
    np.testing.assert_array_equal(
        downsample_masks(jnp.asarray(corner), 2, 2), [[[True, False], [False, False]]]
    )
    wide = np.zeros((1, 4, 4), bool)
    wide[0, :, :3] = True  # column 1: (1 + 3) / 7 = 0.571 > 0.5 → True
    out = downsample_masks(jnp.asarray(wide), 2, 2)
    assert out.dtype == jnp.bool_
    np.testing.assert_array_equal(out, [[[True, True], [True, True]]])


def test_downsample_masks_exactly_half_is_not_anomalous():
    # 2 → 1 along each axis: the output is the plain mean of the 2×2 pixels (weights 1/4)
    two = jnp.array([[[True, True], [False, False]]])  # mean 0.5: not > 0.5
    three = jnp.array([[[True, True], [True, False]]])  # mean 0.75
    assert not bool(downsample_masks(two, 1, 1)[0, 0, 0])
    assert bool(downsample_masks(three, 1, 1)[0, 0, 0])


def test_total_loss_image_resolution_half_pixel_upsampling_by_default():
    # 2 → 4 bilinear with half-pixel centres: output rows/columns sample the input at
    # −0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1), i.e. the matrix A below; the
    # upsampled logits of each class are A · L · Aᵀ. (align_corners=True would sample at
    # 0, 1/3, 2/3, 1.)
    a = np.array([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    logits = np.array([[[[0.0, 2.0], [1.0, -1.0]], [[-2.0, 0.5], [0.3, 0.0]]]], np.float32)
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 1:3, 0:2] = True
    up = np.stack([a @ logits[0, ..., c] @ a.T for c in range(2)], axis=-1)[None]
    expected = _focal_np(up, masks, 2.0) + _dice_np(up, masks, 1.0)
    config = LossConfig(stage_weights=(1.0,), resolution="image")
    total, _ = total_loss([jnp.asarray(logits)], jnp.asarray(masks), config)
    assert float(total) == pytest.approx(expected, rel=1e-5)


def _constant_stage(values) -> np.ndarray:
    """(B, 2, 2, 2) stage logits that are constant over space (bilinear upsampling keeps them)."""
    values = np.asarray(values, np.float32)  # (B, 2)
    return np.broadcast_to(values[:, None, None, :], (values.shape[0], 2, 2, 2)).copy()


@pytest.mark.parametrize("resolution", ["image", "grid"])
def test_total_loss_weighted_sum_of_stage_parts(resolution):
    masks = np.zeros((2, 4, 4), bool)
    masks[0, :2, :2] = True  # grid (2×2): [[T, F], [F, F]] (see the test above)
    masks[1, :, :3] = True  # grid: all True
    stages = [_constant_stage([[0.0, 1.0], [0.5, -0.5]]), _constant_stage([[2.0, 0.0], [0.0, 0.3]])]
    config = LossConfig(focal_gamma=1.5, dice_smooth=0.5, stage_weights=(0.25, 0.75),
                        resolution=resolution)  # fmt: skip
    total, parts = total_loss([jnp.asarray(s) for s in stages], jnp.asarray(masks), config)
    if resolution == "image":  # constant logits upsampled to 4×4, the masks as given
        targets = [np.broadcast_to(s[:, :1, :1], (2, 4, 4, 2)) for s in stages]
        target_masks = masks
    else:  # logits on the 2×2 grid, masks brought down by hand
        targets = stages
        target_masks = np.array([[[True, False], [False, False]], [[True, True], [True, True]]])
    assert sorted(parts) == ["dice_0", "dice_1", "focal_0", "focal_1"]
    expected_total = 0.0
    for i, (weight, target) in enumerate(zip((0.25, 0.75), targets)):
        focal = _focal_np(target, target_masks, 1.5)
        dice = _dice_np(target, target_masks, 0.5)
        assert float(parts[f"focal_{i}"]) == pytest.approx(focal, rel=1e-5)
        assert float(parts[f"dice_{i}"]) == pytest.approx(dice, rel=1e-5)
        expected_total += weight * (focal + dice)
    assert float(total) == pytest.approx(expected_total, rel=1e-5)


def test_total_loss_stage_count_checked():
    config = LossConfig(stage_weights=(0.1, 0.2, 0.7))
    logits = [jnp.zeros((1, 2, 2, 2))] * 2
    with pytest.raises(ValueError) as info:
        total_loss(logits, jnp.zeros((1, 4, 4), bool), config)
    assert str(info.value) == "3 stage weights for 2 stages"


# ----------------------------------------------------------------------------- fusion (Eq. 9)


def _exact_area_average(mask: np.ndarray, sh: int, sw: int) -> np.ndarray:
    """Independent exact area average of (H, W) onto (sh, sw): repeat every pixel sh×sw times
    (an (H·sh, W·sw) image with the same coverage), then take the mean of H×W blocks."""
    h, w = mask.shape
    fine = np.kron(mask.astype(np.float64), np.ones((sh, sw)))
    return fine.reshape(sh, h, sw, w).mean(axis=(1, 3))


@pytest.mark.parametrize("hw", [(9, 8), (8, 9), (9, 9), (13, 8)])
def test_masks_to_grid_non_multiple_sides_against_exact_area_average(hw):
    from clipsam_jax.refine.fusion import masks_to_grid

    rng = np.random.default_rng(sum(hw))
    masks = rng.random((2, 1, *hw)) > 0.6
    grid = masks_to_grid(masks, 4)
    assert grid.shape == (2, 1, 4, 4) and grid.dtype == np.float32
    for i in range(2):
        np.testing.assert_allclose(grid[i, 0], _exact_area_average(masks[i, 0], 4, 4), atol=1e-6)


def test_fuse_error_messages_exact():
    from clipsam_jax.refine.fusion import fuse, fuse_batch, normalize

    rough = np.zeros((2, 2), np.float32)
    masks, scores = np.zeros((1, 3, 4, 4), bool), np.zeros((1, 3), np.float32)
    with pytest.raises(ValueError) as info:
        fuse(rough, masks, scores, norm="sigmoid")
    assert str(info.value) == "norm must be one of ('max', 'minmax', 'none'), got 'sigmoid'"
    with pytest.raises(ValueError) as info:
        normalize(rough, "sigmoid")
    assert str(info.value) == "norm must be one of ('max', 'minmax', 'none'), got 'sigmoid'"
    with pytest.raises(ValueError) as info:
        fuse(rough, masks, scores[:, :2])
    assert str(info.value) == (
        "masks (q, k, H, W) and scores (q, k) expected, got (1, 3, 4, 4), (1, 2)"
    )
    with pytest.raises(ValueError) as info:
        fuse_batch(np.zeros((2, 2, 2)), [masks], [scores, scores])
    assert str(info.value) == "batch sizes differ: 2, 1, 2"


def test_fuse_batch_default_norm_is_max():
    from clipsam_jax.refine.fusion import fuse_batch

    rough = np.array([[[0.5, 0.2], [0.1, 0.0]]], np.float32)
    masks = np.zeros((1, 1, 2, 2), bool)
    masks[0, 0, 0, 0] = True  # cell (0, 0) += 1.5 → 2.0, the peak: divided by 2
    scores = np.array([[1.5]], np.float32)
    out = fuse_batch(rough, [masks], [scores])
    np.testing.assert_allclose(out[0], [[1.0, 0.1], [0.05, 0.0]], atol=1e-7)


def _mmr_inputs():
    from clipsam_jax.config import RefineConfig

    roughs = np.zeros((2, 4, 4), np.float32)
    roughs[:, 1, 1] = 0.9
    images = [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)]
    return roughs, images, RefineConfig(sam="none")


def test_mmr_result_is_frozen_and_batch_refiner_must_answer_every_image():
    import dataclasses

    from clipsam_jax.refine.fusion import mmr_batch

    roughs, images, config = _mmr_inputs()

    class OneMaskPerBox:
        def refine(self, image, prompts, multimask=True):
            masks = np.zeros((prompts.num_boxes, 3, *image.shape[:2]), bool)
            return masks, np.zeros((prompts.num_boxes, 3), np.float32)

    rngs = [np.random.default_rng(n) for n in range(2)]
    out = mmr_batch(roughs, images, OneMaskPerBox(), config, rngs)
    with pytest.raises(dataclasses.FrozenInstanceError):
        out[0].final = None

    class ShortBatch(OneMaskPerBox):
        def refine_batch(self, images, prompts, multimask=True):
            return [self.refine(images[0], prompts[0])]  # one answer for two images

    with pytest.raises(ValueError):
        mmr_batch(roughs, images, ShortBatch(), config, rngs)
    with pytest.raises(ValueError) as info:
        mmr_batch(roughs, images[:1], OneMaskPerBox(), config, rngs)
    assert str(info.value) == "batch sizes differ: 2, 1, 2"


# ----------------------------------------------------------------------------- UMCI module defaults
# build_head passes every field, but UMCIHead / UMCIStage are public Flax modules: built directly
# they must default to the paper's settings (Sec. 4.1, Table 3), which are also HeadConfig's.


def test_umci_module_defaults_are_the_papers_settings():
    import dataclasses

    from clipsam_jax.config import HeadConfig
    from clipsam_jax.models.umci import UMCIHead, UMCIStage

    papers = dict(hidden_dim=384, pool_sizes=(3, 9), paths="both", gru_reading="carry",
                  shared_projection=True, conv_impl="auto", strip_kernel=3,
                  align_corners=False)  # fmt: skip
    config = HeadConfig()
    for module in (UMCIHead, UMCIStage):
        defaults = {f.name: f.default for f in dataclasses.fields(module)}
        for name, value in papers.items():
            assert defaults[name] == value and type(defaults[name]) is type(value), (module, name)
            if name != "conv_impl":
                got = getattr(config, name)
                assert (tuple(got) if name == "pool_sizes" else got) == value, name
        assert defaults["dtype"] is jnp.float32
    assert {f.name: f.default for f in dataclasses.fields(UMCIHead)}["num_stages"] == 4
    # the building blocks, also always given every field by UMCIStage
    from clipsam_jax.models.layers import Conv1D, Conv2D
    from clipsam_jax.models.umci import ScaleBranch, StripBranch

    for module, expected in ((StripBranch, dict(gru_reading="carry", kernel_size=3)),
                             (ScaleBranch, dict(conv_impl="auto")),
                             (Conv2D, dict(kernel_size=3, impl="auto")),
                             (Conv1D, dict(kernel_size=3))):  # fmt: skip
        defaults = {f.name: f.default for f in dataclasses.fields(module)}
        assert {name: defaults[name] for name in expected} == expected, module


def test_umci_head_stage_count_message_exact():
    import jax

    from clipsam_jax.models.umci import UMCIHead

    tokens, text = jnp.zeros((1, 3, 3, 4)), jnp.zeros((1, 2, 4))
    with pytest.raises(ValueError) as error:
        UMCIHead(text_dim=4, num_stages=2, hidden_dim=2).init(jax.random.PRNGKey(0), [tokens], text)
    assert error.value.args[0] == "expected 2 feature maps, got 1"  # JAX appends a note to str()


def test_conv1d_kernel_5_against_a_numpy_loop():
    """--strip-kernel 5: zero 'same' padding of k // 2 = 2 on each side (a loop over taps)."""
    import jax

    from clipsam_jax.models.layers import Conv1D

    x = np.random.default_rng(0).normal(size=(2, 7, 3)).astype(np.float32)
    conv = Conv1D(features=4, kernel_size=5)
    params = conv.init(jax.random.PRNGKey(0), jnp.asarray(x))
    kernel = np.asarray(params["params"]["kernel"], np.float64)  # (5, 3, 4)
    bias = np.random.default_rng(1).normal(size=4)
    params = {
        "params": {"kernel": params["params"]["kernel"], "bias": jnp.asarray(bias, jnp.float32)}
    }
    expected = np.empty((2, 7, 4))
    for b in range(2):
        for pos in range(7):
            acc = bias.copy()
            for tap in range(5):
                src = pos + tap - 2
                if 0 <= src < 7:
                    acc += x[b, src].astype(np.float64) @ kernel[tap]
            expected[b, pos] = acc
    np.testing.assert_allclose(conv.apply(params, jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape_in, size_out", [((2, 1, 4, 3), (6, 4)), ((2, 3, 1, 2), (3, 7))])
def test_resize_align_corners_from_one_pixel_copies_it(shape_in, size_out):
    """align_corners=True samples input index o·(in-1)/(out-1) = 0 when in = 1 (PyTorch's rule):
    the single row / column is copied to every output row / column."""
    from clipsam_jax.models.layers import resize_bilinear

    x = np.random.default_rng(0).normal(size=shape_in).astype(np.float32)
    out = np.asarray(resize_bilinear(jnp.asarray(x), *size_out, align_corners=True))
    expected = np.broadcast_to(x, (shape_in[0], *size_out, shape_in[3]))
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def test_umci_stage_sows_the_documented_intermediates():
    """models/umci.py's docstring: v_row, M_row_col, M_g, M_g1_g2, M_all are returned by
    apply(..., mutable="intermediates"), with the shapes of Eq. 1-5."""
    import jax

    from clipsam_jax.models.umci import UMCIStage

    tokens, text = jnp.ones((1, 9, 9, 5)), jnp.ones((1, 2, 4))
    stage = UMCIStage(text_dim=4, hidden_dim=2, pool_sizes=(3, 9))
    params = stage.init(jax.random.PRNGKey(0), tokens, text)
    _, state = stage.apply(params, tokens, text, mutable="intermediates")
    shapes = jax.tree.map(lambda x: x.shape, state["intermediates"])
    assert shapes == {
        "strip_row": {"v": ((1, 9, 2),)}, "strip_col": {"v": ((1, 9, 2),)},
        "M_row_col": ((1, 9, 9, 2),),
        "scale_0": {"M_g": ((1, 3, 3, 2),)}, "scale_1": {"M_g": ((1, 1, 1, 2),)},
        "M_g1_g2": ((1, 9, 9, 2),), "M_all": ((1, 9, 9, 4),),
    }  # fmt: skip


def test_resize_bilinear_default_is_half_pixel():
    """[0, 1] enlarged to 4 with half-pixel centres: output o samples (o + 0.5)/2 - 0.5, i.e.
    -0.25, 0.25, 0.75, 1.25, clamped at the edges → 0, 0.25, 0.75, 1 (align_corners would give
    0, 1/3, 2/3, 1)."""
    from clipsam_jax.models.layers import resize_bilinear

    x = jnp.asarray([0.0, 1.0]).reshape(1, 1, 2, 1)
    out = np.asarray(resize_bilinear(x, 1, 4)).ravel()
    np.testing.assert_allclose(out, [0.0, 0.25, 0.75, 1.0], atol=1e-6)


def test_scale_branch_rejects_a_grid_shorter_than_the_pool():
    """The check covers both sides of the token grid: 2 rows < pool 3 even with 9 columns."""
    import jax

    from clipsam_jax.models.umci import ScaleBranch

    with pytest.raises(ValueError) as error:
        ScaleBranch(hidden_dim=2, pool_size=3).init(
            jax.random.PRNGKey(0), jnp.ones((1, 2, 9, 4)), jnp.ones((1, 2, 4))
        )
    assert error.value.args[0].startswith("a 2x9 token grid is smaller than the pool size 3")


def test_conv2d_unknown_impl_message_exact():
    import jax

    from clipsam_jax.models.layers import Conv2D

    with pytest.raises(ValueError) as error:
        Conv2D(2, 3, "bogus").init(jax.random.PRNGKey(0), jnp.ones((1, 3, 3, 1)))
    assert error.value.args[0] == "unknown conv impl 'bogus'"
