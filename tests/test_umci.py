"""UMCI head: hand-computed pieces, conv formulations, shapes, and parity with the PyTorch twin."""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from clipsam_jax import torch_ref
from clipsam_jax.config import HeadConfig, LossConfig
from clipsam_jax.losses import dice_loss, focal_loss, total_loss
from clipsam_jax.models.heads import build_head, rough_map
from clipsam_jax.models.init import init_params
from clipsam_jax.models.layers import Conv2D, attention, average_pool
from clipsam_jax.models.umci import UMCIHead, UMCIStage
from conversion.head_params import flax_to_torch, torch_to_flax

# ----------------------------------------------------------------------- hand-computed pieces


def test_attention_hand_computed():
    # Q = K = I (d = 2), V = [[1, 2], [3, 4]]: scores = I / sqrt(2); row 0 softmax is
    # [e^a, 1] / (e^a + 1) with a = 1/sqrt(2), so out_0 = w*[1, 2] + (1-w)*[3, 4].
    q = k = jnp.eye(2)[None]
    v = jnp.array([[[1.0, 2.0], [3.0, 4.0]]])
    w = math.exp(1 / math.sqrt(2)) / (math.exp(1 / math.sqrt(2)) + 1)  # 0.66976
    expected = [
        [w * 1 + (1 - w) * 3, w * 2 + (1 - w) * 4],
        [(1 - w) * 1 + w * 3, (1 - w) * 2 + w * 4],
    ]
    np.testing.assert_allclose(attention(q, k, v)[0], expected, rtol=1e-6)


def test_gru_step_hand_computed():
    """One Flax GRUCell step with c_h = 1 and weights set by hand (the equations of docs/method.md §2)."""
    import flax.linen as nn

    cell = nn.GRUCell(1)
    k, b = lambda v: jnp.array([[v]]), lambda v: jnp.array([v])  # (in, out) kernels, (out,) bias
    params = {
        "ir": {"kernel": k(1.0), "bias": b(0.0)}, "hr": {"kernel": k(1.0)},
        "iz": {"kernel": k(0.5), "bias": b(0.0)}, "hz": {"kernel": k(0.0)},
        "in": {"kernel": k(2.0), "bias": b(0.0)}, "hn": {"kernel": k(1.0), "bias": b(0.0)},
    }  # fmt: skip
    x, h = 1.0, 0.5
    sigmoid = lambda a: 1 / (1 + math.exp(-a))  # noqa: E731
    r = sigmoid(1.0 * x + 1.0 * h)  # 0.8176
    z = sigmoid(0.5 * x)  # 0.6225 (no hidden-side term: W_hz = 0, and no hidden bias)
    n = math.tanh(2.0 * x + r * (1.0 * h))  # 0.9840
    expected = (1 - z) * n + z * h  # 0.6827
    new_h, _ = cell.apply({"params": params}, jnp.array([[h]]), jnp.array([[x]]))
    np.testing.assert_allclose(new_h[0, 0], expected, rtol=1e-6)


def test_strip_pooling_in_the_stage_hand_computed():
    """The strip path's Avg_Pool_{1xW} and Avg_Pool_{Hx1} (Eq. 1) as UMCIStage computes them.

    The projection and both strip convs are set to the identity (the conv's centre tap; kernel
    3, zero padding), so the `v` each StripBranch sows is the pooled strip it was given.
    """
    # A 2x3 grid (H = 2 rows, W = 3 columns), two channels:
    #   channel 0  [[0, 1, 2],      channel 1  [[6, 0, 0],
    #               [3, 4, 5]]                  [0, 0, 0]]
    tokens = jnp.array([[[[0.0, 6.0], [1.0, 0.0], [2.0, 0.0]],
                         [[3.0, 0.0], [4.0, 0.0], [5.0, 0.0]]]])  # (1, 2, 3, 2)  # fmt: skip
    # Row strips, mean over W of each row: channel 0 (0+1+2)/3 = 1, (3+4+5)/3 = 4;
    #   channel 1 (6+0+0)/3 = 2, 0  ->  [[1, 2], [4, 0]]  (H = 2 strips).
    rows = [[1.0, 2.0], [4.0, 0.0]]
    # Column strips, mean over H of each column: channel 0 (0+3)/2 = 1.5, (1+4)/2 = 2.5,
    #   (2+5)/2 = 3.5; channel 1 (6+0)/2 = 3, 0, 0  ->  [[1.5, 3], [2.5, 0], [3.5, 0]] (W = 3).
    cols = [[1.5, 3.0], [2.5, 0.0], [3.5, 0.0]]
    text = jnp.ones((1, 2, 2))
    stage = UMCIStage(text_dim=2, hidden_dim=2, paths="strip")
    params = stage.init(jax.random.PRNGKey(0), tokens, text)["params"]
    identity = jnp.eye(2)
    params["projection"] = {"kernel": identity, "bias": jnp.zeros(2)}
    for branch in ("strip_row", "strip_col"):
        kernel = jnp.zeros((3, 2, 2)).at[1].set(identity)  # (taps, in, out): centre tap = I
        params[branch]["conv"] = {"kernel": kernel, "bias": jnp.zeros(2)}
    _, state = stage.apply({"params": params}, tokens, text, mutable="intermediates")
    got = state["intermediates"]
    np.testing.assert_allclose(got["strip_row"]["v"][0][0], rows, rtol=1e-6)
    np.testing.assert_allclose(got["strip_col"]["v"][0][0], cols, rtol=1e-6)


def test_scale_pooling_hand_computed():
    grid = jnp.arange(37.0 * 37.0).reshape(1, 37, 37, 1)
    pooled = average_pool(grid, 3)
    assert pooled.shape == (1, 12, 12, 1)  # floor: row/col 36 dropped
    # cell (0, 0) averages rows 0-2, cols 0-2: values 0,1,2,37,38,39,74,75,76 → mean 38.
    assert float(pooled[0, 0, 0, 0]) == pytest.approx(38.0)
    # last cell: rows 33-35, cols 33-35, centre value 34*37 + 34 = 1292.
    assert float(pooled[0, 11, 11, 0]) == pytest.approx(34 * 37 + 34)
    assert average_pool(grid, 9).shape == (1, 4, 4, 1)
    assert average_pool(jnp.zeros((1, 24, 24, 1)), 9).shape == (1, 2, 2, 1)


def test_focal_and_dice_hand_computed():
    # pixel A: logits [0, ln 3] → p1 = 3/4, anomalous → p_t = 0.75; pixel B: [0, 0], normal → 0.5.
    logits = jnp.array([[[[0.0, math.log(3.0)], [0.0, 0.0]]]])  # (1, 1, 2, 2)
    masks = jnp.array([[[True, False]]])
    focal_a = -(0.25**2) * math.log(0.75)  # 0.017980
    focal_b = -(0.5**2) * math.log(0.5)  # 0.173287
    assert float(focal_loss(logits, masks)) == pytest.approx((focal_a + focal_b) / 2, rel=1e-6)
    # dice: p = [0.75, 0.5], y = [1, 0]: 1 - (2*0.75 + 1) / (1 + 0.5625 + 0.25 + 1) = 1/9.
    assert float(dice_loss(logits, masks)) == pytest.approx(1 / 9, rel=1e-6)
    # a defect-free image predicted perfectly normal gives dice 1 - 1/1 = 0 thanks to smoothing.
    assert float(dice_loss(jnp.array([[[[30.0, -30.0]]]]), jnp.array([[[False]]]))) < 1e-6


def test_zero_weight_rows_do_not_count():
    """A batch padded for the devices (docs/method.md §5.5): rows of weight 0 leave the loss and
    its gradient those of the real rows alone, whatever the padding holds."""
    real = jax.random.normal(jax.random.PRNGKey(0), (3, 6, 6, 2))
    masks = jax.random.bernoulli(jax.random.PRNGKey(1), 0.3, (3, 6, 6))
    padded = jnp.concatenate([real, jnp.full((2, 6, 6, 2), 7.0)])
    padded_masks = jnp.concatenate([masks, jnp.ones((2, 6, 6), bool)])
    weights = jnp.array([1.0, 1.0, 1.0, 0.0, 0.0])
    config = LossConfig(stage_weights=(1.0,), resolution="grid")

    def loss(logits, masks, weights=None):
        return total_loss([logits], masks, config, weights=weights)[0]

    assert float(loss(padded, padded_masks, weights)) == pytest.approx(float(loss(real, masks)),
                                                                       rel=1e-6)  # fmt: skip
    grad = jax.grad(loss)(padded, padded_masks, weights)
    np.testing.assert_allclose(grad[:3], jax.grad(loss)(real, masks), rtol=1e-5, atol=1e-9)
    assert not np.any(grad[3:])
    # Hand-computed: the dice of image 0 alone when it is the only row of weight 1.
    one = jnp.array([1.0, 0.0, 0.0])
    assert float(dice_loss(real, masks, weights=one)) == pytest.approx(
        float(dice_loss(real[:1], masks[:1])), rel=1e-6
    )


def test_conv_formulations_agree():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 5, 6))
    params = Conv2D(4, impl="xla").init(jax.random.PRNGKey(1), x)
    outputs = [Conv2D(4, impl=impl).apply(params, x) for impl in ("xla", "matmul", "im2col")]
    for out in outputs[1:]:
        np.testing.assert_allclose(out, outputs[0], atol=1e-5)
    # Gradients too: "matmul" has its own backward pass (the transposed convolution), checked
    # against XLA's convolution on a non-square grid, with a loss that weighs every output.
    weights = jax.random.normal(jax.random.PRNGKey(2), (2, 7, 5, 4))

    def loss(params, x, impl):
        return jnp.sum(Conv2D(4, impl=impl).apply(params, x) * weights)

    reference = jax.grad(loss, argnums=(0, 1))(params, x, "xla")
    for impl in ("matmul", "im2col"):
        got = jax.grad(loss, argnums=(0, 1))(params, x, impl)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(reference), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


def test_inference_takes_the_forward_conv_and_same_maps():
    # "auto" runs shifted matmuls for CPU training (their backward), XLA's convolution for
    # inference; an explicit choice is kept. The head's output does not depend on it.
    from clipsam_jax.inference import inference_conv_impl

    config = HeadConfig(hidden_dim=8, pool_sizes=(2, 4))
    assert inference_conv_impl("auto") == "xla"
    for impl in ("xla", "matmul", "im2col"):
        assert inference_conv_impl(impl) == impl
    tokens = [np.random.default_rng(i).normal(size=(2, 9, 9, 12)).astype(np.float32)
              for i in range(4)]  # fmt: skip
    text = np.random.default_rng(9).normal(size=(2, 2, 10)).astype(np.float32)
    training = build_head(config, 10, conv_impl="matmul")
    params = init_params(training, 0, [t.shape for t in tokens], text.shape, config.init)
    inference = build_head(config, 10, conv_impl=inference_conv_impl("auto"))
    for a, b in zip(inference.apply({"params": params}, tokens, text),
                    training.apply({"params": params}, tokens, text), strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------------------ shapes


SMALL = dict(feature_dim=16, text_dim=12, hidden_dim=8)


def small_inputs(grid: int, batch: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = [rng.normal(size=(batch, grid, grid, SMALL["feature_dim"])).astype(np.float32)
              for _ in range(4)]  # fmt: skip
    text = rng.normal(size=(batch, 2, SMALL["text_dim"])).astype(np.float32)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    return tokens, text


@pytest.mark.parametrize(("size", "grid", "pooled"), [(336, 24, (8, 2)), (518, 37, (12, 4))])
def test_stage_and_scale_shapes(size, grid, pooled):
    head = UMCIHead(text_dim=12, hidden_dim=8)
    tokens, text = small_inputs(grid, batch=1)
    params = {"params": init_params(head, 0, [t.shape for t in tokens], text.shape)}
    apply = jax.jit(lambda p, t, x: head.apply(p, t, x, mutable="intermediates"))
    logits, state = apply(params, tokens, text)
    assert [o.shape for o in logits] == [(1, grid, grid, 2)] * 4
    stage = state["intermediates"]["stage_0"]
    assert stage["M_all"][0].shape == (1, grid, grid, 12)
    assert stage["strip_row"]["v"][0].shape == (1, grid, 8)
    assert rough_map(logits, size).shape == (1, size, size)
    assert stage["M_g1_g2"][0].shape == (1, grid, grid, 8)
    for i, side in enumerate(pooled):
        assert stage[f"scale_{i}"]["M_g"][0].shape == (1, side, side, 8)


def test_full_size_shapes_with_eval_shape():
    """C = 1024, C_t = 768, c_h = 384, S = 518 (grid 37), batch 8: nothing is computed."""
    head = build_head(HeadConfig(), text_dim=768)
    tokens = [jax.ShapeDtypeStruct((8, 37, 37, 1024), jnp.float32)] * 4
    text = jax.ShapeDtypeStruct((8, 2, 768), jnp.float32)
    params = jax.eval_shape(head.init, jax.random.PRNGKey(0), tokens, text)
    logits = jax.eval_shape(head.apply, params, tokens, text)
    assert [o.shape for o in logits] == [(8, 37, 37, 2)] * 4
    count = sum(np.prod(p.shape) for p in jax.tree.leaves(params))
    assert 100e6 < count < 105e6  # ~25.5 M per stage at full size
    out = jax.eval_shape(lambda p, t, x: rough_map(head.apply(p, t, x), 518), params, tokens, text)
    assert out.shape == (8, 518, 518)


# ------------------------------------------------------------------ parity with PyTorch


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))


def torch_twin(config: HeadConfig):
    if config.kind == "aprilgan":
        return torch_ref.AprilGanHead(4, SMALL["feature_dim"], SMALL["text_dim"])
    return torch_ref.UMCIHead(
        4, feature_dim=SMALL["feature_dim"], text_dim=SMALL["text_dim"],
        hidden_dim=SMALL["hidden_dim"], pool_sizes=config.pool_sizes, paths=config.paths,
        gru_reading=config.gru_reading, shared_projection=config.shared_projection,
        strip_kernel=config.strip_kernel, align_corners=config.align_corners,
    )  # fmt: skip


def parity_case(config: HeadConfig, size: int, loss_config: LossConfig | None = None):
    loss_config = loss_config or LossConfig()
    grid = size // 14
    tokens, text = small_inputs(grid, seed=size)
    masks = np.zeros((2, size, size), bool)
    masks[0, size // 4 : size // 2, size // 3 : size // 2 + 5] = True  # image 1 defect-free
    head = build_head(dataclasses.replace(config, hidden_dim=SMALL["hidden_dim"]), 12)
    params = init_params(head, 3, [t.shape for t in tokens], text.shape, config.init)
    # Random offsets on every param (biases too: --init flax zeroes them) so every term of the
    # equations is exercised whatever the init.
    rng = np.random.default_rng(4)
    params = jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape, np.float32), params)

    def loss_fn(p):
        logits = head.apply({"params": p}, tokens, text)
        return total_loss(logits, masks, loss_config, config.align_corners)[0], logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    twin = torch_twin(config)
    twin.load_state_dict({k: torch.tensor(v) for k, v in flax_to_torch(params).items()})
    t_tokens = [torch.from_numpy(t) for t in tokens]
    t_logits = twin(t_tokens, torch.from_numpy(text))
    t_loss, _ = torch_ref.total_loss(
        t_logits, torch.from_numpy(masks), weights=loss_config.stage_weights,
        resolution=loss_config.resolution, align_corners=config.align_corners,
    )  # fmt: skip
    t_loss.backward()
    for ours, theirs in zip(logits, t_logits):
        assert relative_error(ours, theirs.detach().numpy()) < 1e-5
    np.testing.assert_allclose(
        rough_map(logits, size, config.align_corners),
        torch_ref.rough_map(t_logits, size, config.align_corners).detach().numpy(),
        atol=1e-5,
    )
    assert float(loss) == pytest.approx(t_loss.item(), rel=1e-5)
    torch_grads = {k: p.grad.numpy() for k, p in twin.named_parameters()}
    ours_as_torch = flax_to_torch(grads)
    assert set(ours_as_torch) == set(torch_grads)
    # Relative to each tensor's scale, floored at 1e-3 of the largest gradient: some gradients
    # are exactly zero in theory (a bias on attention keys shifts every score alike).
    floor = 1e-3 * max(np.abs(g).max() for g in torch_grads.values())
    for key, value in ours_as_torch.items():
        scale = max(np.abs(torch_grads[key]).max(), floor)
        assert np.abs(value - torch_grads[key]).max() / scale < 1e-4, key


# Flax twin of tests/test_torch_ref.py::test_gradients_reach_every_parameter, with the same
# mathematics: `scale_k/text_key/bias` shifts every key of a softmax over the two text keys by
# the same amount, so its gradient is exactly 0; every other parameter reaches the loss (the
# strip GRU and text_query only weakly: the second strip attention sees t_new only through
# t_new_1 - t_new_0). The parity tests above floor their tolerance at 1e-3 of the largest
# gradient, so a strip GRU cut off on the Flax side alone would slip through them; this test
# would not. The head computes in float64 (x64; it hands float32 logits to the float32 loss,
# which only rounds the cotangent coming back), so the zero gradients come out near 1e-18 of the
# largest, far below 1e-12; random biases (--init flax zeroes them) and doubled weights keep the
# attention away from uniform, which lifts the weak gradients above ~1e-5 of the largest, far
# above 1e-8.
FLAX_EXACTLY_ZERO_GRADIENT = re.compile(r"scale_\d+/text_key/bias$")


@pytest.mark.parametrize(
    ("gru_reading", "shared_projection"), [("carry", True), ("sequence", False)],
    ids=["carry-shared", "sequence-separate"],
)  # fmt: skip
def test_gradients_reach_every_parameter(gru_reading, shared_projection):
    with jax.enable_x64(True):
        tokens, text = small_inputs(12)  # S = 168; one stage keeps the compile short
        tokens, text = [jnp.asarray(tokens[0], jnp.float64)], jnp.asarray(text, jnp.float64)
        config = HeadConfig(hidden_dim=SMALL["hidden_dim"], gru_reading=gru_reading,
                            shared_projection=shared_projection)  # fmt: skip
        head = build_head(config, SMALL["text_dim"], num_stages=1, dtype=jnp.float64)
        params = init_params(head, 3, [t.shape for t in tokens], text.shape, config.init)
        rng = np.random.default_rng(4)
        params = jax.tree.map(
            lambda p: 2.0 * (p.astype(np.float64) + 0.1 * rng.standard_normal(p.shape)), params
        )
        masks = np.zeros((2, 168, 168), bool)
        masks[0, 42:84, 56:90] = True  # image 1 defect-free

        def loss_fn(p):
            logits = head.apply({"params": p}, tokens, text)
            return total_loss(logits, masks, LossConfig(stage_weights=(1.0,)))[0]

        grads = traverse_util.flatten_dict(jax.jit(jax.grad(loss_fn))(params), sep="/")
        size = {name: float(jnp.abs(g).max()) for name, g in grads.items()}
        assert {g.dtype for g in grads.values()} == {jnp.dtype(jnp.float64)}
    assert all(math.isfinite(v) for v in size.values())
    largest = max(size.values())
    zero = {name for name in size if FLAX_EXACTLY_ZERO_GRADIENT.search(name)}
    assert len(zero) == 2  # one per scale
    for name, value in size.items():
        if name in zero:
            assert value <= 1e-12 * largest, (name, value / largest)
        else:
            assert value >= 1e-8 * largest, (name, value / largest)


def test_parity_with_pytorch_default_336():
    parity_case(HeadConfig(), 336)


def test_parity_with_pytorch_default_518_grid_loss():
    parity_case(HeadConfig(), 518, LossConfig(resolution="grid"))


@pytest.mark.parametrize(
    "change",
    [dict(paths="strip", gru_reading="sequence"), dict(paths="scale", shared_projection=False),
     dict(shared_projection=False), dict(kind="aprilgan"),
     dict(strip_kernel=1, align_corners=True)],
)  # fmt: skip
def test_parity_with_pytorch_variants(change):
    parity_case(dataclasses.replace(HeadConfig(), **change), 336)


def test_head_params_round_trip_exact():
    tokens, text = small_inputs(24)
    head = build_head(HeadConfig(hidden_dim=8), 12)
    params = init_params(head, 0, [t.shape for t in tokens], text.shape)
    back = torch_to_flax(flax_to_torch(params), expected=params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, b)


def test_init_params_match_flax_init_tree_and_scale():
    tokens, text = small_inputs(24)
    head = build_head(HeadConfig(hidden_dim=8), 12)
    ours = init_params(head, 0, [t.shape for t in tokens], text.shape, "flax")
    flax_shapes = jax.eval_shape(head.init, jax.random.PRNGKey(0), tokens, text)["params"]
    assert jax.tree.structure(ours) == jax.tree.structure(flax_shapes)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(flax_shapes)):
        assert a.shape == b.shape and a.dtype == np.float32
    recurrent = ours["stage_0"]["strip_row"]["gru"]["hr"]["kernel"]
    np.testing.assert_allclose(recurrent.T @ recurrent, np.eye(8), atol=1e-5)  # orthogonal
    big = init_params(build_head(HeadConfig(hidden_dim=8), 768), 1, [(1, 9, 9, 1024)] * 4,
                      (1, 2, 768), "flax")  # fmt: skip
    kernel = big["stage_0"]["projection"]["kernel"]
    assert abs(kernel.std() - np.sqrt(1 / 1024)) < 0.05 * np.sqrt(1 / 1024)  # LeCun normal
    assert not np.array_equal(kernel, init_params(build_head(HeadConfig(hidden_dim=8), 768), 2,
                              [(1, 9, 9, 1024)] * 4, (1, 2, 768), "flax")["stage_0"]["projection"]["kernel"])  # fmt: skip


def test_align_corners_resize_matches_torch():
    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    from clipsam_jax.models.layers import resize_bilinear

    for corners in (False, True):
        ours = resize_bilinear(jnp.asarray(x), 23, 11, align_corners=corners)
        theirs = torch.nn.functional.interpolate(
            torch.from_numpy(x).permute(0, 3, 1, 2), size=(23, 11), mode="bilinear",
            align_corners=corners,
        ).permute(0, 2, 3, 1)  # fmt: skip
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5)


def test_stage_average_logits_differs_from_probabilities():
    logits = [jnp.array([[[[0.0, 4.0]]]]), jnp.array([[[[0.0, -2.0]]]])]
    # probabilities: (sigmoid(4) + sigmoid(-2)) / 2; logits: sigmoid((4 - 2) / 2)
    probs = float(rough_map(logits, 1)[0, 0, 0])
    assert probs == pytest.approx((1 / (1 + math.exp(-4)) + 1 / (1 + math.exp(2))) / 2, rel=1e-6)
    mean_logit = float(rough_map(logits, 1, average="logits")[0, 0, 0])
    assert mean_logit == pytest.approx(1 / (1 + math.exp(-1.0)), rel=1e-6)
