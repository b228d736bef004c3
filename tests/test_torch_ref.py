"""Tests of the PyTorch reference head (clipsam_jax.torch_ref): shapes, hand-computed numbers,
switches, parameter names and gradient flow. Small dimensions except one full-size forward."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from clipsam_jax.torch_ref import (
    AprilGanHead,
    GRUCell,
    UMCIHead,
    UMCIStage,
    attention,
    dice_loss,
    downsample_mask,
    focal_loss,
    rough_map,
    total_loss,
)
from clipsam_jax.torch_ref.umci import avg_pool_nhwc, resize_bilinear_nhwc, strip_pool

C, CT, CH = 16, 12, 8  # small feature / text / hidden dims for the tests
LN3 = math.log(3.0)


def _inputs(batch: int, grid: int, seed: int = 0, stages: int = 4):
    gen = torch.Generator().manual_seed(seed)
    tokens = [torch.randn(batch, grid, grid, C, generator=gen) for _ in range(stages)]
    text = torch.randn(batch, 2, CT, generator=gen)
    return tokens, text


def _small_stage(**kwargs) -> UMCIStage:
    return UMCIStage(feature_dim=C, text_dim=CT, hidden_dim=CH, **kwargs)


# ---------------------------------------------------------------------------------------------
# Hand-computed building blocks
# ---------------------------------------------------------------------------------------------


def test_attention_hand_computed():
    # d = 2, so scores = q kᵀ / sqrt(2). q row 0 = sqrt(2)·ln3·e0, k = I:
    #   row 0 scores = [ln3, 0] -> softmax [3/4, 1/4]; row 1 scores = [0, 0] -> [1/2, 1/2].
    # v = diag(4, 8): row 0 = 3/4·[4, 0] + 1/4·[0, 8] = [3, 2]; row 1 = [2, 4].
    q = torch.tensor([[[math.sqrt(2.0) * LN3, 0.0], [0.0, 0.0]]])
    k = torch.eye(2)[None]
    v = torch.tensor([[[4.0, 0.0], [0.0, 8.0]]])
    out = attention(q, k, v)
    torch.testing.assert_close(out, torch.tensor([[[3.0, 2.0], [2.0, 4.0]]]))


def _set_linear(layer: torch.nn.Linear, weight: float, bias: float | None = None) -> None:
    with torch.no_grad():
        layer.weight.fill_(weight)
        if bias is not None:
            layer.bias.fill_(bias)


def test_gru_step_hand_computed():
    # c_h = 1, x = 1, h = 2.
    # r = sigmoid(1·ln3 - ln3 + 2·ln3/2) = sigmoid(ln3) = 3/4
    # z = sigmoid(1·0.5 - 0.5 + 2·(-ln3/2)) = sigmoid(-ln3) = 1/4
    # n = tanh(1·ln2 - ln2 + 3/4·(2·ln2/2 + ln2/3)) = tanh(3/4 · 4/3 · ln2) = tanh(ln2) = 3/5
    # h' = (1 - 1/4)·3/5 + 1/4·2 = 0.45 + 0.5 = 0.95
    ln2 = math.log(2.0)
    gru = GRUCell(1)
    _set_linear(gru["ir"], LN3, -LN3)
    _set_linear(gru["hr"], LN3 / 2)
    _set_linear(gru["iz"], 0.5, -0.5)
    _set_linear(gru["hz"], -LN3 / 2)
    _set_linear(gru["in"], ln2, -ln2)
    _set_linear(gru["hn"], ln2 / 2, ln2 / 3)
    out = gru(torch.tensor([[2.0]]), torch.tensor([[1.0]]))
    torch.testing.assert_close(out, torch.tensor([[0.95]]))


def test_gru_is_torch_grucell_without_hidden_rz_biases():
    # Flax convention: no bias on the hidden-side r and z terms. torch.nn.GRUCell with b_hr and
    # b_hz zeroed computes the same equations (its weights are stacked r, z, n).
    assert GRUCell(3)["hr"].bias is None and GRUCell(3)["hz"].bias is None
    torch.manual_seed(0)
    ours = GRUCell(3)
    ref = torch.nn.GRUCell(3, 3)
    with torch.no_grad():
        ref.weight_ih.copy_(torch.cat([ours[k].weight for k in ("ir", "iz", "in")]))
        ref.bias_ih.copy_(torch.cat([ours[k].bias for k in ("ir", "iz", "in")]))
        ref.weight_hh.copy_(torch.cat([ours[k].weight for k in ("hr", "hz", "hn")]))
        ref.bias_hh.copy_(torch.cat([torch.zeros(6), ours["hn"].bias]))
    h, x = torch.randn(5, 3), torch.randn(5, 3)
    torch.testing.assert_close(ours(h, x), ref(x, h))


def test_strip_pool_hand_computed():
    # [[1, 2, 3], [4, 5, 6]]: row means (over W) [2, 5]; column means (over H) [2.5, 3.5, 4.5].
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])[None, :, :, None]  # (1, 2, 3, 1)
    rows, cols = strip_pool(x)
    torch.testing.assert_close(rows[0, :, 0], torch.tensor([2.0, 5.0]))
    torch.testing.assert_close(cols[0, :, 0], torch.tensor([2.5, 3.5, 4.5]))


def test_strip_broadcast_is_bilinear_resize_of_a_one_wide_strip():
    # The strip path adds B(M_row) + B(M_col) as a broadcast; that is exactly a bilinear resize
    # (half-pixel centres) of an H×1 strip to H×W.
    strip = torch.randn(2, 5, 1, 3)
    torch.testing.assert_close(resize_bilinear_nhwc(strip, (5, 7)), strip.expand(2, 5, 7, 3))


def test_avg_pool_floor_drops_trailing_rows_and_columns():
    # 37×37 grid with x[h, w] = h for h < 36 and a huge last row and column. With s = 3 the
    # floor mode keeps 12 windows covering rows 0..35, so cell (i, j) = mean(3i, 3i+1, 3i+2)
    # = 3i + 1 and the 1e6 never leaks in. With s = 9: 4 windows, cell i = 9i + 4.
    x = torch.arange(37.0)[:, None].expand(37, 37).clone()
    x[36, :] = 1e6
    x[:, 36] = 1e6
    x = x[None, :, :, None]
    pooled3 = avg_pool_nhwc(x, 3)
    assert pooled3.shape == (1, 12, 12, 1)
    torch.testing.assert_close(
        pooled3[0, :, :, 0], (3.0 * torch.arange(12.0) + 1)[:, None].expand(12, 12)
    )
    pooled9 = avg_pool_nhwc(x, 9)
    assert pooled9.shape == (1, 4, 4, 1)
    torch.testing.assert_close(pooled9[0, :, 0, 0], 9.0 * torch.arange(4.0) + 4)
    # 24 -> 8 and 2 (336 px input): the last 6 rows are dropped with s = 9.
    assert avg_pool_nhwc(torch.zeros(1, 24, 24, 1), 3).shape[1:3] == (8, 8)
    assert avg_pool_nhwc(torch.zeros(1, 24, 24, 1), 9).shape[1:3] == (2, 2)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------

# One image, a 1×2 grid: pixel 0 logits [0, ln3] -> p(anomalous) = 3/4, mask True;
# pixel 1 logits [0, 0] -> p = 1/2, mask False.
_LOGITS_2PX = torch.tensor([[[[0.0, LN3], [0.0, 0.0]]]])  # (1, 1, 2, 2)
_MASK_2PX = torch.tensor([[[True, False]]])  # (1, 1, 2)


def test_focal_loss_hand_computed():
    # pixel 0: p_t = 3/4 -> -(1/4)^2 · ln(3/4) = 0.0179801
    # pixel 1: p_t = 1/2 -> -(1/2)^2 · ln(1/2) = 0.1732868
    # mean = 0.0956335
    expected = (-(0.25**2) * math.log(0.75) - (0.5**2) * math.log(0.5)) / 2
    assert expected == pytest.approx(0.0956335, abs=1e-7)
    got = focal_loss(_LOGITS_2PX, _MASK_2PX, gamma=2.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # γ = 0 is plain cross-entropy: (-ln(3/4) - ln(1/2)) / 2.
    ce = (-math.log(0.75) - math.log(0.5)) / 2
    assert focal_loss(_LOGITS_2PX, _MASK_2PX, gamma=0.0).item() == pytest.approx(ce, rel=1e-6)


def test_dice_loss_hand_computed():
    # p = [3/4, 1/2], y = [1, 0]: Σyp = 3/4, Σy² = 1, Σp² = 9/16 + 4/16 = 13/16
    # dice = 1 - (2·3/4 + 1) / (1 + 13/16 + 1) = 1 - 2.5 / (45/16) = 1 - 8/9 = 1/9
    got = dice_loss(_LOGITS_2PX, _MASK_2PX, smooth=1.0)
    assert got.item() == pytest.approx(1.0 / 9.0, rel=1e-6)


def test_dice_loss_is_a_per_image_batch_mean():
    # Image 0 as above (dice 1/9). Image 1: p = [1/2, 1/2], empty mask:
    #   1 - (0 + 1) / (0 + 1/2 + 1) = 1 - 2/3 = 1/3. Batch mean = (1/9 + 1/3) / 2 = 2/9.
    # (One dice over both images would be 1 - 2.5 / (1 + 13/16 + 1/2 + 1) = 0.2453.)
    logits = torch.cat([_LOGITS_2PX, torch.zeros(1, 1, 2, 2)])
    mask = torch.cat([_MASK_2PX, torch.zeros(1, 1, 2, dtype=torch.bool)])
    assert dice_loss(logits, mask).item() == pytest.approx(2.0 / 9.0, rel=1e-6)


def test_total_loss_image_resolution_hand_computed():
    # Stage logits are spatially constant on a 2×2 grid, so their bilinear upsample to the 4×4
    # mask is the same constant. Stage i has logits [0, ln3] -> p = 3/4 everywhere, and the mask
    # holds a 2×2 anomalous block (4 of 16 pixels).
    #   focal = (4 · (1/4)² · -ln(3/4) + 12 · (3/4)² · -ln(1/4)) / 16
    #   dice  = 1 - (2 · 4·3/4 + 1) / (4 + 16·9/16 + 1) = 1 - 7/14 = 1/2
    # total = Σ λ_i (focal + dice) = (0.1 + 0.1 + 0.1 + 0.7)(focal + dice) = focal + dice.
    logits = torch.tensor([0.0, LN3]).expand(1, 2, 2, 2)
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True
    focal = (4 * 0.25**2 * -math.log(0.75) + 12 * 0.75**2 * -math.log(0.25)) / 16
    total, parts = total_loss([logits] * 4, masks)
    assert sorted(parts) == sorted([f"{k}_{i}" for k in ("focal", "dice") for i in range(4)])
    assert parts["focal_3"].item() == pytest.approx(focal, rel=1e-6)
    assert parts["dice_3"].item() == pytest.approx(0.5, rel=1e-6)
    assert total.item() == pytest.approx(focal + 0.5, rel=1e-6)
    # The weights are applied per stage: only stage 3 counts with λ = (0, 0, 0, 1).
    zero = torch.zeros(1, 2, 2, 2)
    total, _ = total_loss([zero, zero, zero, logits], masks, weights=(0, 0, 0, 1))
    assert total.item() == pytest.approx(focal + 0.5, rel=1e-6)


def test_downsample_mask_hand_computed():
    # 4 -> 2 with half-pixel centres: output cell 0 is centred on input coordinate 0.5.
    # With antialias the triangle kernel is 2 wide: inputs 0, 1, 2 weigh 0.75, 0.75, 0.25
    # (input -1 is outside and the weights are renormalized, / 1.75). Cell 1 (centre 2.5):
    # inputs 1, 2, 3 weigh 0.25, 0.75, 0.75.
    # Columns [1, 0, 1, 1]: cell 0 = (0.75 + 0 + 0.25) / 1.75 = 0.571 > 0.5 -> True,
    #                       cell 1 = (0 + 0.75 + 0.75) / 1.75 = 0.857 -> True.
    # Without antialias cell 0 = mean(x0, x1) = 0.5, not > 0.5 -> False.
    mask = torch.tensor([True, False, True, True]).expand(1, 4, 4)
    assert downsample_mask(mask, (2, 2)).tolist() == [[[True, True], [True, True]]]
    plain = downsample_mask(mask, (2, 2), antialias=False)
    assert plain.tolist() == [[[False, True], [False, True]]]


def test_total_loss_grid_resolution_downsamples_the_mask():
    # A 2×2 anomalous block in the top-left of a 4×4 mask: cell (0, 0) = (1.5/1.75)² = 0.73
    # -> True; cell (0, 1) = (1.5/1.75)(0.25/1.75) = 0.12 -> False. So on the 2×2 grid the
    # mask is one anomalous pixel out of 4, and the loss equals the direct one on that grid.
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, :2, :2] = True
    grid_mask = torch.tensor([[True, False], [False, False]]).expand(2, 2, 2)
    logits = [torch.randn(2, 2, 2, 2, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    total, _ = total_loss(logits, masks, resolution="grid")
    expected = sum(
        w * (focal_loss(o, grid_mask) + dice_loss(o, grid_mask))
        for w, o in zip((0.1, 0.1, 0.1, 0.7), logits)
    )
    torch.testing.assert_close(total, expected)
    image_total, _ = total_loss(logits, masks, resolution="image")
    assert not torch.allclose(total, image_total)


def test_rough_map_averages_probabilities():
    # Stage A logits [0, ln3] -> p = 3/4; stage B [0, 0] -> p = 1/2; mean = 0.625 everywhere.
    # (Averaging the logits instead would give sigmoid(ln3 / 2) = 0.634.)
    a = torch.tensor([0.0, LN3]).expand(2, 3, 3, 2)
    b = torch.zeros(2, 3, 3, 2)
    out = rough_map([a, b], 7)
    assert out.shape == (2, 7, 7)
    torch.testing.assert_close(out, torch.full((2, 7, 7), 0.625))


# ---------------------------------------------------------------------------------------------
# Shapes, switches and names
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("image_size", "grid", "pooled"), [(336, 24, (8, 2)), (518, 37, (12, 4))])
def test_head_shapes(image_size, grid, pooled):
    torch.manual_seed(0)
    head = UMCIHead(feature_dim=C, text_dim=CT, hidden_dim=CH)
    tokens, text = _inputs(2, grid)
    with torch.no_grad():
        logits = head(tokens, text)
        stage = head.stages[0]
        p_hat = stage.projection(tokens[0])
        scale_shapes = [tuple(b(p_hat, text).shape) for b in stage.scale_branches()]
        amap = rough_map(logits, image_size)
    assert [tuple(o.shape) for o in logits] == [(2, grid, grid, 2)] * 4
    assert scale_shapes == [(2, pooled[0], pooled[0], CH), (2, pooled[1], pooled[1], CH)]
    assert amap.shape == (2, image_size, image_size)
    assert float(amap.min()) >= 0.0 and float(amap.max()) <= 1.0


def test_full_size_stage_forward():
    # One stage at the paper's sizes (C=1024, C_t=768, c_h=384), 37×37 grid, batch 1.
    torch.manual_seed(0)
    stage = UMCIStage(feature_dim=1024, text_dim=768, hidden_dim=384)
    with torch.no_grad():
        out = stage(torch.randn(1, 37, 37, 1024), torch.randn(1, 2, 768))
    assert out.shape == (1, 37, 37, 2)
    assert torch.isfinite(out).all()


@pytest.mark.slow
def test_full_size_head_forward():
    # All four stages at full size (~100 M parameters, ~5 s forward on 2 CPU cores).
    torch.manual_seed(0)
    head = UMCIHead(feature_dim=1024, text_dim=768, hidden_dim=384)
    tokens = [torch.randn(1, 37, 37, 1024) for _ in range(4)]
    with torch.no_grad():
        out = head(tokens, torch.randn(1, 2, 768))
    assert [tuple(o.shape) for o in out] == [(1, 37, 37, 2)] * 4
    assert rough_map(out, 518).shape == (1, 518, 518)


_STRIP_KEYS = [
    f"{d}.{k}"
    for d in ("strip_row", "strip_col")
    for k in (
        "conv.bias",
        "conv.weight",
        "gru.hn.bias",
        "gru.hn.weight",
        "gru.hr.weight",
        "gru.hz.weight",
        "gru.in.bias",
        "gru.in.weight",
        "gru.ir.bias",
        "gru.ir.weight",
        "gru.iz.bias",
        "gru.iz.weight",
        "text_query.bias",
        "text_query.weight",
        "text_value.bias",
        "text_value.weight",
    )
] + ["strip_fuse.bias", "strip_fuse.weight"]
_SCALE_KEYS = [
    f"scale_{g}.{k}"
    for g in (0, 1)
    for k in (
        "conv.bias",
        "conv.weight",
        "text_key.bias",
        "text_key.weight",
        "text_value.bias",
        "text_value.weight",
    )
] + ["scale_fuse.bias", "scale_fuse.weight"]
_FUSION_KEYS = [
    f"{m}.{p}"
    for m in ("conv_all", "conv_ori", "mlp_hidden", "mlp_out")
    for p in ("bias", "weight")
]
_PROJ_KEYS = ["projection.bias", "projection.weight"]


def test_state_dict_keys_exact():
    stage = _small_stage()
    assert sorted(stage.state_dict()) == sorted(
        _PROJ_KEYS + _STRIP_KEYS + _SCALE_KEYS + _FUSION_KEYS
    )
    head = UMCIHead(num_stages=2, feature_dim=C, text_dim=CT, hidden_dim=CH)
    expected = [f"stages.{i}.{k}" for i in range(2) for k in stage.state_dict()]
    assert sorted(head.state_dict()) == sorted(expected)
    april = AprilGanHead(num_stages=4, feature_dim=C, text_dim=CT)
    assert sorted(april.state_dict()) == [
        f"stages.{i}.{p}" for i in range(4) for p in ("bias", "weight")
    ]


def test_state_dict_shapes_are_torch_layouts():
    sd = _small_stage().state_dict()
    assert sd["projection.weight"].shape == (CT, C)
    assert sd["strip_row.conv.weight"].shape == (CH, CT, 3)
    assert sd["strip_row.gru.hn.weight"].shape == (CH, CH)
    assert sd["scale_1.conv.weight"].shape == (CH, CT, 3, 3)
    assert sd["conv_all.weight"].shape == (CT, 3 * CH, 3, 3)
    assert sd["mlp_out.weight"].shape == (2, CH)


@pytest.mark.parametrize(
    ("paths", "present", "absent"),
    [("strip", _STRIP_KEYS, _SCALE_KEYS), ("scale", _SCALE_KEYS, _STRIP_KEYS)],
)
def test_single_path_switches_off_the_other(paths, present, absent):
    stage = _small_stage(paths=paths)
    keys = set(stage.state_dict())
    assert keys == set(_PROJ_KEYS + present + _FUSION_KEYS)
    assert not keys & set(absent)
    assert stage.conv_all.in_channels == 2 * CH
    tokens, text = _inputs(2, 24, stages=1)
    with torch.no_grad():
        assert stage(tokens[0], text).shape == (2, 24, 24, 2)


def test_separate_projections():
    names = {"projection_strip", "projection_scale", "projection_fusion"}
    keys = set(_small_stage(shared_projection=False).state_dict())
    assert {k.rsplit(".", 1)[0] for k in keys if k.startswith("projection")} == names
    assert "projection.weight" not in keys
    strip_only = set(_small_stage(shared_projection=False, paths="strip").state_dict())
    assert "projection_scale.weight" not in strip_only
    assert {"projection_strip.weight", "projection_fusion.weight"} <= strip_only


def test_separate_projections_feed_their_paths():
    # Zeroing the strip projection changes the output; the three are independent parameters.
    torch.manual_seed(0)
    stage = _small_stage(shared_projection=False)
    tokens, text = _inputs(1, 24, stages=1)
    with torch.no_grad():
        before = stage(tokens[0], text)
        for name in ("projection_strip", "projection_scale", "projection_fusion"):
            saved = getattr(stage, name).weight.clone()
            getattr(stage, name).weight.zero_()
            assert not torch.allclose(stage(tokens[0], text), before), name
            getattr(stage, name).weight.copy_(saved)


def test_gru_sequence_reading_differs_from_carry():
    torch.manual_seed(0)
    carry = _small_stage(gru_reading="carry")
    sequence = _small_stage(gru_reading="sequence")
    sequence.load_state_dict(carry.state_dict())  # same parameters, different reading
    tokens, text = _inputs(2, 24, stages=1)
    with torch.no_grad():
        assert not torch.allclose(carry(tokens[0], text), sequence(tokens[0], text))


def test_batch_items_are_independent():
    # Each image uses its own text row pair; the batch is only a batch.
    torch.manual_seed(0)
    stage = _small_stage()
    tokens, text = _inputs(2, 24, stages=1)
    with torch.no_grad():
        both = stage(tokens[0], text)
        one = stage(tokens[0][1:], text[1:])
        swapped = stage(tokens[0][1:], text[:1])
    torch.testing.assert_close(both[1:], one, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(one, swapped)


def test_invalid_configuration_and_inputs_raise():
    with pytest.raises(ValueError, match="paths"):
        _small_stage(paths="none")
    with pytest.raises(ValueError, match="gru_reading"):
        _small_stage(gru_reading="bidirectional")
    with pytest.raises(ValueError, match="pool sizes"):
        _small_stage()(torch.zeros(1, 8, 8, C), torch.zeros(1, 2, CT))
    with pytest.raises(ValueError, match="stages"):
        UMCIHead(feature_dim=C, text_dim=CT, hidden_dim=CH)(
            _inputs(1, 24, stages=3)[0], torch.zeros(1, 2, CT)
        )
    with pytest.raises(ValueError, match="weights"):
        total_loss([torch.zeros(1, 2, 2, 2)] * 3, torch.zeros(1, 2, 2, dtype=torch.bool))


def test_aprilgan_hand_computed():
    # Identity projection: token [3, 4] -> unit [0.6, 0.8]; text rows [1, 0], [0, 2] -> unit
    # e0, e1. Logits = 100 · [0.6, 0.8] = [60, 80].
    head = AprilGanHead(num_stages=1, feature_dim=2, text_dim=2)
    with torch.no_grad():
        head.stages[0].weight.copy_(torch.eye(2))
        head.stages[0].bias.zero_()
    tokens = torch.tensor([3.0, 4.0]).expand(1, 2, 2, 2)
    text = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    (out,) = head([tokens], text)
    torch.testing.assert_close(out, torch.tensor([60.0, 80.0]).expand(1, 2, 2, 2))


# ---------------------------------------------------------------------------------------------
# Composition, restated from the paper with plain torch ops
# ---------------------------------------------------------------------------------------------


def _attn(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


@pytest.mark.parametrize("reading", ["carry", "sequence"])
def test_strip_branch_follows_eq14(reading):
    torch.manual_seed(0)
    branch = _small_stage(gru_reading=reading).strip_row
    strip, text = torch.randn(2, 7, CT), torch.randn(2, 2, CT)
    with torch.no_grad():
        got = branch(strip, text)
        v = F.conv1d(strip.transpose(1, 2), branch.conv.weight, branch.conv.bias, padding=1)
        v = v.transpose(1, 2)  # conv along the strip axis (N = 7)
        t1, t2 = branch.text_query(text), branch.text_value(text)
        a = _attn(t1, v, v)
        if reading == "carry":  # one GRU step per text token, carry t¹
            t_new = branch.gru(t1, a)
        else:  # GRU over the two attended tokens from a zero state
            h1 = branch.gru(torch.zeros(2, CH), a[:, 0])
            t_new = torch.stack([h1, branch.gru(h1, a[:, 1])], dim=1)
        m = _attn(v, t_new, t2) + v
        expected = m / m.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(got, expected)


def test_scale_branch_follows_eq15():
    torch.manual_seed(0)
    branch = _small_stage().scale_0  # s = 3
    p_hat, text = torch.randn(2, 10, 10, CT), torch.randn(2, 2, CT)
    with torch.no_grad():
        got = branch(p_hat, text)
        pooled = F.avg_pool2d(p_hat.permute(0, 3, 1, 2), 3)  # (2, CT, 3, 3)
        v = F.conv2d(pooled, branch.conv.weight, branch.conv.bias, padding=1)
        v = v.flatten(2).transpose(1, 2)  # (2, 9, CH), row-major cells
        m = _attn(v, branch.text_key(text), branch.text_value(text)) + v
        expected = (m / m.norm(dim=-1, keepdim=True)).reshape(2, 3, 3, CH)
    torch.testing.assert_close(got, expected)


def test_stage_fusion_follows_eq2_to_eq6():
    # Rebuilds the stage output from its (separately tested) branches in NCHW torch ops:
    # strips from row / column means, concat order (v_ori, M_row,col, M_g1,g2), residual P̂.
    torch.manual_seed(0)
    stage = _small_stage()
    tokens, text = _inputs(2, 24, stages=1)
    x = tokens[0]
    with torch.no_grad():
        got = stage(x, text)
        p = x @ stage.projection.weight.T + stage.projection.bias  # (2, 24, 24, CT)
        m_row = stage.strip_row(p.mean(dim=2), text)  # pooled over W: (2, 24 rows, CH)
        m_col = stage.strip_col(p.mean(dim=1), text)  # pooled over H: (2, 24 cols, CH)
        strips = m_row[:, :, None, :].expand(2, 24, 24, CH) + m_col[:, None, :, :]
        m_rc = stage.strip_fuse(strips.permute(0, 3, 1, 2))
        up = [
            F.interpolate(b(p, text).permute(0, 3, 1, 2), size=(24, 24), mode="bilinear")
            for b in (stage.scale_0, stage.scale_1)
        ]
        m_g = stage.scale_fuse(up[0] + up[1])
        p_nchw = p.permute(0, 3, 1, 2)
        v_ori = stage.conv_ori(p_nchw)
        m_all = stage.conv_all(torch.cat([v_ori, m_rc, m_g], dim=1))
        hidden = F.relu(m_all + p_nchw).permute(0, 2, 3, 1)
        expected = stage.mlp_out(F.relu(stage.mlp_hidden(hidden)))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


# Which gradients vanish by construction. attention(q, k, v) takes softmax(q·k_j / sqrt(d)) over
# the keys j; a bias b added to every key adds q·b to every score of a row, and a softmax is
# shift-invariant, so such a bias has no effect on the output and its gradient is exactly 0.
# Going through every key of the head:
#   scale path  attention(tokens, text_key(text), text_value(text)): the keys are the two text
#               rows, each text W + b, so `scale_k.text_key.bias` is such a bias -> exactly 0
#               (both GRU readings, shared or separate projections: the scale path has neither).
#   strip path  attention(t1, v, v): the conv bias of v is a common key shift too, but it is also
#               in the values, the residual v_att + v and the queries of the second attention,
#               so its gradient is not 0. attention(v, t_new, t2): the keys are the GRU outputs,
#               a nonlinear function of their row's input, so no parameter shifts both rows
#               alike; the GRU and text_query gradients are not 0, only weak: the second softmax
#               depends on t_new only through t_new_1 - t_new_0.
# Everything else reaches the loss through a projection, conv or MLP with no such cancellation.
# Float64 puts round-off near 1e-16 of the largest gradient, far from both bounds below. The
# init weights are doubled: at the default scale every attention score is ~0.01 (near-uniform
# softmaxes) and the weak strip gradients sit near 1e-9 of the largest; doubled, above 3e-6.
EXACTLY_ZERO_GRADIENT = re.compile(r"(^|\.)scale_\d+\.text_key\.bias$")
ZERO_TOL = 1e-12  # relative to the largest gradient: a few thousand float64 ulps
NONZERO_MIN = 1e-8  # relative to the largest gradient: ~1e8 float64 ulps


@pytest.mark.parametrize("shared_projection", [True, False], ids=["shared", "separate"])
@pytest.mark.parametrize("gru_reading", ["carry", "sequence"])
def test_gradients_reach_every_parameter(gru_reading, shared_projection):
    torch.manual_seed(0)
    head = UMCIHead(
        feature_dim=C, text_dim=CT, hidden_dim=CH, gru_reading=gru_reading,
        shared_projection=shared_projection,
    ).double()  # fmt: skip
    with torch.no_grad():
        for param in head.parameters():
            param.mul_(2.0)
    tokens, text = _inputs(2, 12)  # S = 168
    masks = torch.zeros(2, 168, 168, dtype=torch.bool)
    masks[0, 50:90, 20:100] = True  # some anomalous pixels; image 1 is defect-free
    total, _ = total_loss(head([t.double() for t in tokens], text.double()), masks)
    total.backward()
    grads = dict(head.named_parameters())
    for name, param in grads.items():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    size = {name: param.grad.abs().max().item() for name, param in grads.items()}
    largest = max(size.values())
    zero = {name for name in size if EXACTLY_ZERO_GRADIENT.search(name)}
    assert len(zero) == 4 * 2  # text_key.bias of 2 scales in each of 4 stages
    for name, value in size.items():
        if name in zero:
            assert value <= ZERO_TOL * largest, (name, value / largest)
        else:
            assert value >= NONZERO_MIN * largest, (name, value / largest)


def test_aprilgan_gradients():
    torch.manual_seed(0)
    head = AprilGanHead(feature_dim=C, text_dim=CT)
    tokens, text = _inputs(2, 24)
    masks = torch.zeros(2, 336, 336, dtype=torch.bool)
    masks[1, :50, :50] = True
    total, _ = total_loss(head(tokens, text), masks)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in head.parameters())


def test_losses_are_finite_for_confident_logits():
    # log-softmax keeps log p_t finite where a plain softmax would round p_t to 0.
    logits = torch.tensor([[[[60.0, -60.0], [-60.0, 60.0]]]], requires_grad=True)
    mask = torch.tensor([[[True, False]]])  # both pixels confidently wrong
    loss = focal_loss(logits, mask) + dice_loss(logits, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert focal_loss(logits, mask).item() == pytest.approx(120.0, rel=1e-5)
    assert F.softmax(logits, -1)[0, 0, 0, 1] == 0.0  # what a softmax-then-log would have hit
