"""The bfloat16 path (ClipConfig.dtype="auto" on every accelerator) against float32, on CPU.

One rough-map model (tiny random CLIP + a random UMCI head) run end to end in both dtypes on the
same images, text and head params.
"""

from __future__ import annotations

from collections import Counter

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clipsam_jax.clip.loading import load_clip
from clipsam_jax.clip.prompts import TextFeatures
from clipsam_jax.config import HeadConfig
from clipsam_jax.inference import RoughMapModel
from clipsam_jax.models.heads import build_head
from clipsam_jax.models.init import init_params

S = 112  # 8x8 token grid of the tiny CLIP
HEAD = HeadConfig(hidden_dim=32, pool_sizes=(2, 4))
BF16_U = 2.0**-8  # bfloat16 unit roundoff: 8 significant bits, round to nearest
# Modules whose output dtype is the compute dtype: CLIP's layers and the head's.
COMPUTE = ("Dense", "Conv", "Conv1D", "Conv2D", "LayerNorm", "FlaxCLIPMLP", "UMCIStage")


def rough_maps(
    clip_dir, dtype: str, images: np.ndarray, head_dtype: str = "clip"
) -> tuple[np.ndarray, Counter]:
    """The maps of `images` and a count of (module kind, output dtype) over the traced call."""
    clip = load_clip(str(clip_dir), S, dtype=dtype)
    head = build_head(HEAD, clip.text_dim, len(clip.feature_layers))
    shapes = [(1, clip.grid, clip.grid, clip.feature_dim)] * len(clip.feature_layers)
    params = init_params(head, 0, shapes, (1, 2, clip.text_dim), HEAD.init)
    # Random offsets on every param (biases too: --init flax zeroes them); the same float32
    # params for both dtypes.
    rng = np.random.default_rng(1)
    params = jax.tree.map(
        lambda p: p + 0.1 * rng.standard_normal(p.shape).astype(np.float32), params
    )
    model = RoughMapModel(clip, TextFeatures(clip), HEAD, params, batch_size=len(images),
                          head_dtype=head_dtype)  # fmt: skip
    seen: Counter = Counter()

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(out, jax.Array):
            seen[type(context.module).__name__, jnp.dtype(out.dtype).name] += 1
        return out

    with nn.intercept_methods(record):  # the first call traces: text tower, CLIP and head
        maps = model(images, ["bottle"] * len(images))
    return maps, seen


def test_bfloat16_rough_maps_match_float32(tiny_clip_dir):
    images = np.random.default_rng(0).integers(0, 256, (2, S, S, 3), dtype=np.uint8)
    full, full_dtypes = rough_maps(tiny_clip_dir, "float32", images)
    half, half_dtypes = rough_maps(tiny_clip_dir, "bfloat16", images)

    # The bf16 run really computed in bf16 (CLIP and head alike), the fp32 run in fp32.
    for seen, name in ((full_dtypes, "float32"), (half_dtypes, "bfloat16")):
        computed = {(kind, dtype) for kind, dtype in seen if kind in COMPUTE}
        assert {"Dense", "Conv2D", "UMCIStage", "FlaxCLIPMLP"} <= {kind for kind, _ in computed}
        assert computed == {(kind, name) for kind, _ in computed}

    for maps in (full, half):
        assert maps.shape == (2, S, S) and maps.dtype == np.float32
        assert np.isfinite(maps).all()
        assert maps.min() >= 0.0 and maps.max() <= 1.0

    # How far bf16 may move a map. One bf16 rounding moves a value by at most u = 2^-8
    # relatively. Between the pixels and the stage logits lie ~30 sequential roundings
    # (4 encoder layers of ~5 ops, ~10 head ops); errors that add up like a random walk move a
    # logit margin m = l_1 - l_0 by ~sqrt(30) u |m| ~ 5.5 u |m|, and a softmax probability
    # moves by at most 1/4 of its margin's change. Here |m| <~ 5 (maps up to ~0.993) and ~1 on
    # a typical pixel (mean map ~0.72), so a pixel moves by <~ 7 u and the mean pixel by
    # ~1.4 u. Bounds: 8 u on the largest difference, 2 u on the mean. (Measured: ~1.7 u and
    # ~0.26 u.) A bf16 bug (an overflow, a softmax or norm losing its precision, a cast in the
    # wrong place) moves maps by far more.
    diff = np.abs(half.astype(np.float64) - full.astype(np.float64))
    assert diff.max() <= 8 * BF16_U
    assert diff.mean() <= 2 * BF16_U
    # ... and the comparison is not vacuous: with the dtype flag ignored both runs would be
    # float32 and differ by float32 round-off (~2^-24), not by a sizeable part of a bf16
    # rounding as here.
    assert diff.max() > BF16_U / 16


def test_head_computes_in_float32_by_default_under_bfloat16_clip(tiny_clip_dir):
    """ClipConfig.head_dtype's default: CLIP in bf16, the head in float32 as it was trained."""
    from clipsam_jax.config import ClipConfig

    assert ClipConfig().head_dtype == "float32"
    images = np.random.default_rng(0).integers(0, 256, (2, S, S, 3), dtype=np.uint8)
    mixed, seen = rough_maps(tiny_clip_dir, "bfloat16", images, head_dtype="float32")
    kinds = {kind: {d for k, d in seen if k == kind} for kind, _ in seen}
    assert kinds["FlaxCLIPMLP"] == {"bfloat16"}
    assert kinds["UMCIStage"] == {"float32"} and kinds["Conv2D"] == {"float32"}
    # The same bf16 CLIP features through a float32 head differ from the all-bf16 run only by
    # the head's own roundings: both stay within the bf16 bounds of the float32 run.
    full, _ = rough_maps(tiny_clip_dir, "float32", images)
    assert np.abs(mixed.astype(np.float64) - full).max() <= 8 * BF16_U
