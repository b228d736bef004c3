"""The jitted image side of the CLIP stage: patch tokens of the feature layers + global embedding."""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipsam_jax.clip.loading import ClipModel


class ImageFeatures(NamedTuple):
    """`patch_tokens`: one (B, H, W, C) array per feature layer, the raw residual stream after
    that encoder layer (class token dropped, no post-layernorm, no projection; SPEC §1).
    `image_embeds`: (B, C_t) projected global image embedding (post-layernorm class token)."""

    patch_tokens: tuple[jax.Array, ...]
    image_embeds: jax.Array


def _fused_attention(next_fun, args, kwargs, context):
    """Flax method interceptor: transformers' unmasked (vision) CLIP attention computed by
    `jax.nn.dot_product_attention` (cuDNN's fused kernel on GPUs in bf16/fp16, XLA elsewhere)
    instead of materializing the (B, heads, T, T) weights. Same params, same function."""
    module = context.module
    if context.method_name != "__call__" or type(module).__name__ != "FlaxCLIPAttention":
        return next_fun(*args, **kwargs)
    hidden = args[0] if args else kwargs["hidden_states"]
    mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
    if module.causal or mask is not None or kwargs.get("output_attentions"):
        return next_fun(*args, **kwargs)  # the text tower keeps the reference path
    q, k, v = (
        module._split_heads(proj(hidden)) for proj in (module.q_proj, module.k_proj, module.v_proj)
    )
    out = jax.nn.dot_product_attention(q, k, v, scale=module.scale)  # (B, T, heads, head_dim)
    return (module.out_proj(module._merge_heads(out)),)


def use_fused_attention(fused: bool | None) -> bool:
    """None → transformers' own attention. Measured on an H200 in bf16 (ViT-L/14 at S=518,
    benchmarks/results/run_all_gpu.json) the fused path was not faster (176 vs 190 images/s at
    batch 8), so it stays an option."""
    return False if fused is None else fused


def vision_forward(
    module, pixels: jax.Array, layers: tuple[int, ...], fused_attention: bool = False
) -> ImageFeatures:
    """Run inside `module.apply`: pixels (B, S, S, 3) normalized → `ImageFeatures`."""
    if fused_attention:
        with nn.intercept_methods(_fused_attention):
            return vision_forward(module, pixels, layers)
    out = module.vision_model(pixels, deterministic=True, output_hidden_states=True)
    batch, grid = pixels.shape[0], pixels.shape[1] // module.config.vision_config.patch_size
    # hidden_states[0] is the embedding (after pre-layernorm); [k] the output of layer k.
    tokens = tuple(out.hidden_states[k][:, 1:].reshape(batch, grid, grid, -1) for k in layers)
    return ImageFeatures(tokens, module.visual_projection(out.pooler_output))


def make_image_encoder(clip: ClipModel, fused_attention: bool | None = None):
    """A jitted `fn(params, pixels (B, S, S, 3) float32) -> ImageFeatures` for this CLIP.

    fused_attention: see `use_fused_attention` (default: transformers' attention).
    """
    layers, fused = clip.feature_layers, use_fused_attention(fused_attention)

    @jax.jit
    def encode(params, pixels):
        return clip.module.apply(
            {"params": params}, pixels.astype(clip.module.dtype), layers, fused,
            method=vision_forward,
        )  # fmt: skip

    return encode


def feature_shapes(clip: ClipModel, batch: int) -> ImageFeatures:
    """Output shapes of the encoder for a batch, via `jax.eval_shape` (nothing is computed)."""
    pixels = jax.ShapeDtypeStruct((batch, clip.image_size, clip.image_size, 3), jnp.float32)
    return jax.eval_shape(make_image_encoder(clip), clip.params, pixels)
