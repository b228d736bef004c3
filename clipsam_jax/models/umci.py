"""The Unified Multi-scale Cross-modal Interaction head (Sec. 3.2, Appendix B, docs/method.md §2).

One `UMCIStage` per CLIP feature layer (independent weights). Shapes: patch tokens P (B, H, W, C),
text features L (B, 2, C_t) with row 0 normal and row 1 anomalous, stage logits O_i (B, H, W, 2).
Intermediates (v_row, M_row, M_row_col, M_g, M_all ...) are sown into the "intermediates"
collection: `apply(..., mutable="intermediates")` returns them for inspection.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipsam_jax.models.layers import (
    Conv1D,
    Conv2D,
    ConvImpl,
    attention,
    average_pool,
    l2_normalize,
    resize_bilinear,
)


class StripBranch(nn.Module):
    """One direction of the strip path (Eq. 1 and 14, Algorithm 1 lines 2-4).

    strips (B, N, C_t) (P̂ averaged over the other axis), text (B, 2, C_t) → M (B, N, c_h).
    """

    hidden_dim: int
    gru_reading: Literal["carry", "sequence"] = "carry"
    dtype: jnp.dtype = jnp.float32
    kernel_size: int = 3

    @nn.compact
    def __call__(self, strips: jax.Array, text: jax.Array) -> jax.Array:
        # docs/method.md §2 choice: a kernel-3 conv along the strip axis, mixing neighbouring strips.
        v = Conv1D(self.hidden_dim, self.kernel_size, name="conv")(strips)
        t1 = nn.Dense(self.hidden_dim, dtype=self.dtype, name="text_query")(text)  # (B, 2, c_h)
        t2 = nn.Dense(self.hidden_dim, dtype=self.dtype, name="text_value")(text)
        attended = attention(t1, v, v)  # text tokens gather the visual strips they match
        gru = nn.GRUCell(self.hidden_dim, dtype=self.dtype, name="gru")
        if self.gru_reading == "carry":
            # t_new = GRU(carry t1, input Attn(t1, v, v)) per text token (docs/method.md §2 choice).
            t_new, _ = gru(t1, attended)
        else:
            # The other reading: a GRU over the two attended tokens from a zero state.
            hidden = jnp.zeros_like(attended[:, 0])
            states = []
            for token in range(attended.shape[1]):
                hidden, _ = gru(hidden, attended[:, token])
                states.append(hidden)
            t_new = jnp.stack(states, axis=1)
        v_att = attention(v, t_new, t2)
        self.sow("intermediates", "v", v)
        return l2_normalize(v_att + v)


class ScaleBranch(nn.Module):
    """One scale of the scale path (Eq. 3 and 15, Algorithm 2 lines 2-4).

    p_hat (B, H, W, C_t), text (B, 2, C_t) → M_g (B, H // s, W // s, c_h).
    """

    hidden_dim: int
    pool_size: int
    conv_impl: ConvImpl = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, p_hat: jax.Array, text: jax.Array) -> jax.Array:
        if min(p_hat.shape[1:3]) < self.pool_size:
            raise ValueError(
                f"a {p_hat.shape[1]}x{p_hat.shape[2]} token grid is smaller than the pool size "
                f"{self.pool_size}: use a larger image size or smaller --pool-sizes"
            )
        pooled = average_pool(
            p_hat, self.pool_size
        )  # docs/method.md §2: stride s, no padding, floor
        v = Conv2D(self.hidden_dim, 3, self.conv_impl, name="conv")(pooled)
        batch, rows, cols, channels = v.shape
        tokens = v.reshape(batch, rows * cols, channels)
        t_key = nn.Dense(self.hidden_dim, dtype=self.dtype, name="text_key")(text)
        t_value = nn.Dense(self.hidden_dim, dtype=self.dtype, name="text_value")(text)
        v_att = attention(tokens, t_key, t_value)
        m_g = l2_normalize(v_att + tokens).reshape(batch, rows, cols, channels)
        self.sow("intermediates", "M_g", m_g)
        return m_g


class UMCIStage(nn.Module):
    """UMCI for one encoder stage: P (B, H, W, C), L (B, 2, C_t) → logits O_i (B, H, W, 2).

    `paths` switches the strip or scale path off (Table 2); with one path off, the fusion conv
    sees the two present branches (2·c_h input channels).
    """

    text_dim: int
    hidden_dim: int = 384
    pool_sizes: Sequence[int] = (3, 9)
    paths: Literal["both", "strip", "scale"] = "both"
    gru_reading: Literal["carry", "sequence"] = "carry"
    shared_projection: bool = True
    conv_impl: ConvImpl = "auto"
    dtype: jnp.dtype = jnp.float32  # compute dtype (params stay float32)
    strip_kernel: int = 3
    align_corners: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array, text: jax.Array) -> jax.Array:
        height, width = tokens.shape[1:3]
        tokens, text = tokens.astype(self.dtype), text.astype(self.dtype)
        dense = functools.partial(nn.Dense, dtype=self.dtype)
        strip_on, scale_on = self.paths in ("both", "strip"), self.paths in ("both", "scale")
        if self.shared_projection:
            p_hat = dense(self.text_dim, name="projection")(tokens)
            p_strip = p_scale = p_fusion = p_hat
        else:  # Algorithms 1 and 2 each write their own Linear (docs/method.md §2 option)
            p_fusion = dense(self.text_dim, name="projection_fusion")(tokens)
            p_strip = dense(self.text_dim, name="projection_strip")(tokens) if strip_on else None
            p_scale = dense(self.text_dim, name="projection_scale")(tokens) if scale_on else None

        branches = [Conv2D(self.hidden_dim, 3, self.conv_impl, name="conv_ori")(p_fusion)]
        if strip_on:
            m_row = StripBranch(
                self.hidden_dim, self.gru_reading, self.dtype, self.strip_kernel, name="strip_row"
            )(p_strip.mean(axis=2), text)  # rows: pooled over the width (1×W kernel)
            m_col = StripBranch(
                self.hidden_dim, self.gru_reading, self.dtype, self.strip_kernel, name="strip_col"
            )(p_strip.mean(axis=1), text)  # columns: pooled over the height (H×1 kernel)
            # B(.) of a strip is a broadcast along the pooled axis (Eq. 2).
            strips = m_row[:, :, None, :] + m_col[:, None, :, :]
            m_row_col = Conv2D(self.hidden_dim, 3, self.conv_impl, name="strip_fuse")(strips)
            self.sow("intermediates", "M_row_col", m_row_col)
            branches.append(m_row_col)
        if scale_on:
            scales = [
                ScaleBranch(self.hidden_dim, size, self.conv_impl, self.dtype, name=f"scale_{i}")(
                    p_scale, text
                )
                for i, size in enumerate(self.pool_sizes)
            ]
            summed = sum(resize_bilinear(m, height, width, self.align_corners) for m in scales)
            m_g = Conv2D(self.hidden_dim, 3, self.conv_impl, name="scale_fuse")(summed)
            self.sow("intermediates", "M_g1_g2", m_g)
            branches.append(m_g)

        # Eq. 5: concat(v_ori, M_row,col, M_g1,g2) in that order.
        m_all = Conv2D(self.text_dim, 3, self.conv_impl, name="conv_all")(
            jnp.concatenate(branches, axis=-1)
        )
        self.sow("intermediates", "M_all", m_all)
        hidden = nn.relu(m_all + p_fusion)  # Eq. 6 residual from P̂
        hidden = nn.relu(dense(self.hidden_dim, name="mlp_hidden")(hidden))
        return dense(2, name="mlp_out")(hidden)


class UMCIHead(nn.Module):
    """Independent UMCI stages, one per feature layer (Sec. 3.2: O_i per stage i).

    patch_tokens: sequence of (B, H, W, C); text (B, 2, C_t) → list of (B, H, W, 2) logits.
    """

    text_dim: int
    num_stages: int = 4
    hidden_dim: int = 384
    pool_sizes: Sequence[int] = (3, 9)
    paths: Literal["both", "strip", "scale"] = "both"
    gru_reading: Literal["carry", "sequence"] = "carry"
    shared_projection: bool = True
    conv_impl: ConvImpl = "auto"
    dtype: jnp.dtype = jnp.float32
    strip_kernel: int = 3
    align_corners: bool = False

    @nn.compact
    def __call__(self, patch_tokens: Sequence[jax.Array], text: jax.Array) -> list[jax.Array]:
        if len(patch_tokens) != self.num_stages:
            raise ValueError(f"expected {self.num_stages} feature maps, got {len(patch_tokens)}")
        outputs = []
        for i, tokens in enumerate(patch_tokens):
            stage = UMCIStage(
                self.text_dim, self.hidden_dim, tuple(self.pool_sizes), self.paths,
                self.gru_reading, self.shared_projection, self.conv_impl, self.dtype,
                self.strip_kernel, self.align_corners, name=f"stage_{i}",
            )  # fmt: skip
            outputs.append(stage(tokens, text).astype(jnp.float32))
        return outputs
