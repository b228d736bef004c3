"""The jitted image side of the CLIP stage: patch tokens of the feature layers + global embedding."""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipsam_jax.clip.loading import ClipModel
from clipsam_jax.data.image_io import CLIP_MEAN, CLIP_STD
from clipsam_jax.errors import ConfigError


class ImageFeatures(NamedTuple):
    """`patch_tokens`: one (B, H, W, C) array per feature layer, the raw residual stream after
    that encoder layer (class token dropped, no post-layernorm, no projection; docs/method.md §1).
    `image_embeds`: (B, C_t) projected global image embedding (post-layernorm class token)."""

    patch_tokens: tuple[jax.Array, ...]
    image_embeds: jax.Array


AttentionImpl = Literal["auto", "reference", "fused", "blocked", "cudnn"]
ATTENTION_IMPLS = ("auto", "reference", "fused", "blocked", "cudnn")
ATTENTION_BLOCK = 512  # query rows per block of the "blocked" attention
_HALF_DTYPES = (jnp.bfloat16, jnp.float16)


def resolve_attention(attention: str | None, dtype=None) -> str:
    """The vision tower's attention implementation; None and "auto" pick per backend.

    - "auto": "blocked" on CPU; on GPUs "cudnn" for bf16/fp16 compute where it compiles, else
      "reference". `dtype` (the encoder's compute dtype) None counts as fp32 here.
    - "reference": transformers' FlaxCLIPAttention (materializes the (B, heads, T, T) weights).
    - "fused": `jax.nn.dot_product_attention` (XLA); on GPUs in bf16 no faster than
      "reference" (benchmarks/RESULTS.md), so never picked automatically.
    - "cudnn": the same with cuDNN's flash-attention kernel; GPUs only, bf16/fp16 compute, where
      it compiles. The GPU default: markedly faster in bf16 (benchmarks/RESULTS.md).
    - "blocked": one head and `ATTENTION_BLOCK` query rows at a time, so the scores stay in
      cache. The CPU default: much faster than "reference" (benchmarks/clip_features.py).
    Same params and the same function for all (rounding apart).
    """
    attention = "auto" if attention is None else attention
    if attention not in ATTENTION_IMPLS:
        raise ConfigError(f"attention must be one of {ATTENTION_IMPLS}, got {attention!r}")
    if attention == "auto":
        if jax.default_backend() == "cpu":
            return "blocked"
        half = dtype is not None and jnp.dtype(dtype) in _HALF_DTYPES
        return "cudnn" if half and cudnn_attention_available() else "reference"
    if attention == "cudnn" and dtype is not None and jnp.dtype(dtype) not in _HALF_DTYPES:
        raise ConfigError(
            f"attention='cudnn' needs bf16 or fp16 compute, the encoder computes in "
            f"{jnp.dtype(dtype).name}: load CLIP with dtype='bfloat16' or pick 'reference'"
        )
    if attention == "cudnn" and not cudnn_attention_available():
        raise ConfigError(
            f"attention='cudnn' needs cuDNN on a GPU ({jax.default_backend()} backend here, "
            "or cuDNN's fused attention did not compile): pick 'auto'"
        )
    return attention


@functools.cache
def cudnn_attention_available() -> bool:
    """Whether cuDNN's fused attention compiles here (a GPU whose cuDNN has it): a bf16 probe of
    an odd token count, as CLIP's (patches + class token)."""
    if jax.default_backend() != "gpu":
        return False
    probe = jax.ShapeDtypeStruct((1, 257, 2, 64), jnp.bfloat16)
    try:
        jax.jit(functools.partial(_cudnn_core, scale=0.125)).lower(probe, probe, probe).compile()
    except Exception:  # any failure means: use the reference attention
        return False
    return True


def _blocked_core(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """softmax(q kᵀ · scale) v, (B, T, heads, d) each → (B, T, heads, d), one head at a time
    (`lax.map`) and `ATTENTION_BLOCK` query rows at a time: a block's scores (B, rows, T) fit in
    cache, where the whole (B, heads, T, T) tensor would stream through memory.

    As flash attention does, the scale goes on q (T × d values, not T × T) and the softmax's
    division on the output (rows × d); somewhat faster on CPU (benchmarks/attention_core.py)."""
    length = q.shape[1]

    def one_head(qkv):
        q_h, k_h, v_h = qkv  # (B, T, d)
        q_h = q_h * scale
        blocks = []
        for start in range(0, length, ATTENTION_BLOCK):
            scores = jnp.einsum("bqd,bkd->bqk", q_h[:, start : start + ATTENTION_BLOCK], k_h)
            peak = jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True))
            weights = jnp.exp(scores - peak)  # unnormalized softmax
            out = jnp.einsum("bqk,bkd->bqd", weights, v_h)
            blocks.append(out / weights.sum(axis=-1, keepdims=True))
        return jnp.concatenate(blocks, axis=1)

    heads_first = [x.transpose(2, 0, 1, 3) for x in (q, k, v)]  # (heads, B, T, d)
    return jax.lax.map(one_head, tuple(heads_first)).transpose(1, 2, 0, 3)


def _fused_core(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, scale=scale)


def _cudnn_core(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")


def _attention_interceptor(core, fuse_qkv: bool = False):
    """A Flax method interceptor computing transformers' unmasked (vision) CLIP attention with
    `core(q, k, v, scale)` on (B, T, heads, head_dim) arrays; same projections, same params.
    fuse_qkv: the three projections as one GEMM (`_fused_projection`)."""

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or type(module).__name__ != "FlaxCLIPAttention":
            return next_fun(*args, **kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        if module.causal or mask is not None or kwargs.get("output_attentions"):
            return next_fun(*args, **kwargs)  # the text tower keeps the reference path
        projections = (module.q_proj, module.k_proj, module.v_proj)
        if fuse_qkv:
            q, k, v = map(module._split_heads, _fused_projection(projections, hidden))
        else:
            q, k, v = (module._split_heads(proj(hidden)) for proj in projections)
        out = core(q, k, v, module.scale)
        return (module.out_proj(module._merge_heads(out)),)

    return intercept


def _fused_projection(projections, hidden: jax.Array) -> list[jax.Array]:
    """`[proj(hidden) for proj in projections]` of bound `nn.Dense` modules as one GEMM, cast
    as `nn.Dense` casts (inputs, kernel and bias to the module's dtype): (B, T, C) → 3 (B, T, C)."""
    dtype = projections[0].dtype
    weights = [proj.variables["params"] for proj in projections]
    kernel = jnp.concatenate([w["kernel"] for w in weights], axis=1).astype(dtype)
    bias = jnp.concatenate([w["bias"] for w in weights]).astype(dtype)
    out = jnp.dot(hidden.astype(dtype), kernel) + bias
    return jnp.split(out, len(projections), axis=-1)


_CORES = {"fused": _fused_core, "blocked": _blocked_core, "cudnn": _cudnn_core}


def attention_core(attention: str):
    """`core(q, k, v, scale)` of a resolved attention name, on (B, T, heads, head_dim) arrays
    (softmax(q kᵀ · scale) v); "reference" materializes the (B, heads, T, T) scores."""
    return _reference_core if attention == "reference" else _CORES[attention]


def _reference_core(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def vision_forward(
    module, pixels: jax.Array, layers: tuple[int, ...], attention: str = "reference",
    fuse_qkv: bool = False,
) -> ImageFeatures:  # fmt: skip
    """Run inside `module.apply`: pixels (B, S, S, 3) normalized → `ImageFeatures`.
    `attention`: a resolved name (not "auto"; see `resolve_attention`). `fuse_qkv`: the query,
    key and value projections as one GEMM (with the attentions other than "reference")."""
    if attention in _CORES:
        interceptor = _attention_interceptor(_CORES[attention], fuse_qkv)
        with nn.intercept_methods(interceptor):
            return vision_forward(module, pixels, layers)
    out = module.vision_model(pixels, deterministic=True, output_hidden_states=True)
    batch, grid = pixels.shape[0], pixels.shape[1] // module.config.vision_config.patch_size
    # hidden_states[0] is the embedding (after pre-layernorm); [k] the output of layer k.
    tokens = tuple(out.hidden_states[k][:, 1:].reshape(batch, grid, grid, -1) for k in layers)
    return ImageFeatures(tokens, module.visual_projection(out.pooler_output))


def device_pixels(pixels: jax.Array) -> jax.Array:
    """Inside a jitted function: uint8 (..., 3) resized RGB → float32 CLIP-normalized as
    `data.image_io.normalize` (uint8 is a quarter of float32's bytes to send to the device);
    float input is returned as it is (already normalized)."""
    if pixels.dtype != jnp.uint8:
        return pixels
    return (pixels.astype(jnp.float32) / 255.0 - CLIP_MEAN) / CLIP_STD


def resolve_fuse_qkv(fuse_qkv: bool | None, attention: str) -> bool:
    """Whether the encoder computes q, k, v as one GEMM (`vision_forward`); None = with cuDNN's
    attention: slightly faster on GPUs in bf16, not on CPU (benchmarks/RESULTS.md)."""
    if fuse_qkv is None:
        return attention == "cudnn"
    return bool(fuse_qkv) and attention != "reference"


def make_image_encoder(
    clip: ClipModel, attention: AttentionImpl | None = None, fuse_qkv: bool | None = None
):
    """A jitted `fn(params, pixels (B, S, S, 3)) -> ImageFeatures` for this CLIP; pixels float32
    normalized, or uint8 resized RGB (normalized on the device, `device_pixels`).

    attention: see `resolve_attention`; None = the one `clip` was loaded with (default "auto":
    "blocked" on CPU, cuDNN's fused kernel on GPUs in bf16/fp16 where it compiles).
    fuse_qkv: see `vision_forward`; None = `resolve_fuse_qkv`'s choice.
    """
    layers = clip.feature_layers
    attention = resolve_attention(attention or clip.attention, clip.module.dtype)
    fuse_qkv = resolve_fuse_qkv(fuse_qkv, attention)

    @jax.jit
    def encode(params, pixels):
        return clip.module.apply(
            {"params": params}, device_pixels(pixels).astype(clip.module.dtype), layers,
            attention, fuse_qkv,
            method=vision_forward,
        )  # fmt: skip

    return encode


def feature_shapes(clip: ClipModel, batch: int) -> ImageFeatures:
    """Output shapes of the encoder for a batch, via `jax.eval_shape` (nothing is computed)."""
    pixels = jax.ShapeDtypeStruct((batch, clip.image_size, clip.image_size, 3), jnp.float32)
    return jax.eval_shape(make_image_encoder(clip), clip.params, pixels)
