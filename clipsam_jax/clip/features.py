"""The jitted image side of the CLIP stage: patch tokens of the feature layers + global embedding."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from clipsam_jax.clip.loading import ClipModel


class ImageFeatures(NamedTuple):
    """`patch_tokens`: one (B, H, W, C) array per feature layer, the raw residual stream after
    that encoder layer (class token dropped, no post-layernorm, no projection; SPEC §1).
    `image_embeds`: (B, C_t) projected global image embedding (post-layernorm class token)."""

    patch_tokens: tuple[jax.Array, ...]
    image_embeds: jax.Array


def vision_forward(module, pixels: jax.Array, layers: tuple[int, ...]) -> ImageFeatures:
    """Run inside `module.apply`: pixels (B, S, S, 3) normalized → `ImageFeatures`."""
    out = module.vision_model(pixels, deterministic=True, output_hidden_states=True)
    batch, grid = pixels.shape[0], pixels.shape[1] // module.config.vision_config.patch_size
    # hidden_states[0] is the embedding (after pre-layernorm); [k] the output of layer k.
    tokens = tuple(out.hidden_states[k][:, 1:].reshape(batch, grid, grid, -1) for k in layers)
    return ImageFeatures(tokens, module.visual_projection(out.pooler_output))


def make_image_encoder(clip: ClipModel):
    """A jitted `fn(params, pixels (B, S, S, 3) float32) -> ImageFeatures` for this CLIP."""
    layers = clip.feature_layers

    @jax.jit
    def encode(params, pixels):
        return clip.module.apply(
            {"params": params}, pixels.astype(clip.module.dtype), layers, method=vision_forward
        )

    return encode


def feature_shapes(clip: ClipModel, batch: int) -> ImageFeatures:
    """Output shapes of the encoder for a batch, via `jax.eval_shape` (nothing is computed)."""
    pixels = jax.ShapeDtypeStruct((batch, clip.image_size, clip.image_size, 3), jnp.float32)
    return jax.eval_shape(make_image_encoder(clip), clip.params, pixels)
