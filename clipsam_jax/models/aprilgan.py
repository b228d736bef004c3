"""The APRIL-GAN linear head, the CLIP-based baseline of Table 1, trained by the same loop."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipsam_jax.models.layers import l2_normalize

LOGIT_SCALE = 100.0  # CLIP's temperature for cosine similarities


def cosine_logits(tokens: jax.Array, text: jax.Array) -> jax.Array:
    """100 · cos(token, L_k): tokens (B, H, W, C_t), text (B, 2, C_t) → (B, H, W, 2)."""
    return LOGIT_SCALE * jnp.einsum("bhwc,bkc->bhwk", l2_normalize(tokens), l2_normalize(text))


class AprilGanHead(nn.Module):
    """One Linear(C → C_t) per stage, then cosine with L × 100 (softmax applied downstream).

    patch_tokens: sequence of (B, H, W, C); text (B, 2, C_t) → list of (B, H, W, 2) logits.
    """

    text_dim: int
    num_stages: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, patch_tokens: Sequence[jax.Array], text: jax.Array) -> list[jax.Array]:
        if len(patch_tokens) != self.num_stages:
            raise ValueError(f"expected {self.num_stages} feature maps, got {len(patch_tokens)}")
        text = text.astype(self.dtype)
        outputs = []
        for i, tokens in enumerate(patch_tokens):
            projected = nn.Dense(self.text_dim, dtype=self.dtype, name=f"stage_{i}")(tokens)
            outputs.append(cosine_logits(projected, text).astype(jnp.float32))
        return outputs
