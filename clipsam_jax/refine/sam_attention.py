"""SAM's image-encoder attention through `torch.nn.functional.scaled_dot_product_attention`.

segment_anything's `Attention.forward` builds the attention matrix explicitly: q·kᵀ, plus the
decomposed relative-position terms, softmax, times v. The same function can run through PyTorch's
fused attention, with the relative-position terms passed as an additive `attn_mask`: the softmax
and the product with v are then one kernel instead of three passes over the (heads, N, N)
matrix, which in ViT-H's four global-attention blocks is 16 × 4096 × 4096 per image.

"flash" goes one step further: the relative-position terms are dot products too (the query's
height term against a one-hot of the key's row, its width term against a one-hot of the key's
column), so they are appended to the query and key vectors and no mask is needed at all. The
(heads, N, N) bias is then never written, and PyTorch may pick its flash kernel, which takes no
mask. The price: the query-key product runs over d + H + W channels instead of d (80 + 64 + 64
in ViT-H's global blocks, 80 + 14 + 14 in the windowed ones), and the values are zero-padded to
that width for the kernel.

`set_sam_attention(model, "sdpa")` rebinds `forward` on the model's own `Attention` instances (no copy of
segment_anything's code, no change to its classes); the weights are untouched, so a checkpoint
loads the same either way and `set_sam_attention(model, "stock")` undoes it.
"""

from __future__ import annotations

import types
from typing import Literal

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos

from clipsam_jax.errors import ConfigError

SamAttention = Literal["stock", "sdpa", "flash"]
SAM_ATTENTIONS = ("stock", "sdpa", "flash")


def _sdpa_forward(self: Attention, x: torch.Tensor) -> torch.Tensor:
    """Attention.forward of segment_anything, x (B, H, W, C) → (B, H, W, C), with the softmax
    and value product in `scaled_dot_product_attention`."""
    batch, height, width, _ = x.shape
    qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, heads, H·W, d)
    bias = None
    if self.use_rel_pos:
        # As add_decomposed_rel_pos: the unscaled query against the height and width tables.
        rel_h_table = get_rel_pos(height, height, self.rel_pos_h)  # (H, H, d)
        rel_w_table = get_rel_pos(width, width, self.rel_pos_w)  # (W, W, d)
        q_grid = q.reshape(batch, self.num_heads, height, width, -1)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", q_grid, rel_h_table)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", q_grid, rel_w_table)
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(
            batch, self.num_heads, height * width, height * width
        )
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
    out = out.view(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4)
    return self.proj(out.reshape(batch, height, width, -1))


def _flash_forward(self: Attention, x: torch.Tensor) -> torch.Tensor:
    """Attention.forward of segment_anything, x (B, H, W, C) → (B, H, W, C), with the
    relative-position terms folded into the query and key vectors (module docstring)."""
    batch, height, width, _ = x.shape
    qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, heads, N, d)
    if not self.use_rel_pos:
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
    else:
        head_dim = q.shape[-1]
        q_grid = q.reshape(batch, self.num_heads, height, width, head_dim)
        rel_h = torch.einsum(
            "bnhwc,hkc->bnhwk", q_grid, get_rel_pos(height, height, self.rel_pos_h)
        )
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", q_grid, get_rel_pos(width, width, self.rel_pos_w))
        # Key n = (row, col) gets one-hots of its row and column: q'·k' = scale·q·k + the
        # query's height term at that row + its width term at that column.
        rows = torch.arange(height, device=x.device).repeat_interleave(width)
        cols = torch.arange(width, device=x.device).repeat(height)
        key_terms = torch.cat([F.one_hot(rows, height), F.one_hot(cols, width)], -1).to(k.dtype)
        width_used = head_dim + height + width
        pad = -width_used % 8  # fused kernels want the head dim a multiple of 8
        query = torch.cat([q * self.scale, rel_h.flatten(2, 3), rel_w.flatten(2, 3)], -1)
        key = torch.cat([k, key_terms.expand(batch, self.num_heads, -1, -1)], -1)
        query, key = F.pad(query, (0, pad)), F.pad(key, (0, pad))
        value = F.pad(v, (0, width_used + pad - head_dim))
        out = F.scaled_dot_product_attention(query, key.to(query.dtype), value, scale=1.0)
        out = out[..., :head_dim]
    out = out.reshape(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4)
    return self.proj(out.reshape(batch, height, width, -1))


_FORWARDS = {"sdpa": _sdpa_forward, "flash": _flash_forward}


def check_sam_attention(attention: str) -> SamAttention:
    """`attention` if it names an implementation, else a ConfigError listing them."""
    if attention not in SAM_ATTENTIONS:
        raise ConfigError(f"SAM attention must be one of {SAM_ATTENTIONS}, got {attention!r}")
    return attention


def set_sam_attention(model: torch.nn.Module, attention: SamAttention) -> int:
    """Switch every segment_anything `Attention` in `model` to `attention`; returns how many.

    "stock": segment_anything's own forward; "sdpa": `_sdpa_forward`; "flash":
    `_flash_forward`. Only the image encoder has such modules (the mask decoder's attention is
    another class and stays as it is).
    """
    check_sam_attention(attention)
    count = 0
    for module in model.modules():
        if isinstance(module, Attention):
            if attention in _FORWARDS:
                module.forward = types.MethodType(_FORWARDS[attention], module)
            else:
                module.__dict__.pop("forward", None)  # back to the class's own method
            count += 1
    return count
