"""SAM's image-encoder attention through `torch.nn.functional.scaled_dot_product_attention`.

segment_anything's `Attention.forward` builds the (heads, N, N) attention matrix explicitly
(16 × 4096 × 4096 per image in ViT-H's global blocks). "sdpa" passes the decomposed
relative-position terms to PyTorch's fused attention as an additive `attn_mask`. "flash" folds
them into the query and key vectors (the query's height / width terms against one-hots of the
key's row / column), so no mask is written and PyTorch may pick its flash kernel; the price is
a query-key product over d + H + W channels (80 + 64 + 64 in ViT-H's global blocks), with the
values zero-padded to that width.

`set_sam_attention` rebinds `forward` on the model's own `Attention` instances; the weights are
untouched, and "stock" undoes it.
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


def _rel_terms(self: Attention, q: torch.Tensor, height: int, width: int):
    """As add_decomposed_rel_pos: the unscaled query (B, heads, H·W, d) against the height and
    width tables → rel_h (B, heads, H, W, H) and rel_w (B, heads, H, W, W)."""
    q_grid = q.reshape(*q.shape[:2], height, width, -1)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", q_grid, get_rel_pos(height, height, self.rel_pos_h))
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", q_grid, get_rel_pos(width, width, self.rel_pos_w))
    return rel_h, rel_w


def _attend_with_mask(self: Attention, q, k, v, height: int, width: int) -> torch.Tensor:
    """ "sdpa": the relative-position terms as SDPA's additive mask. (B, heads, N, d) each."""
    bias = None
    if self.use_rel_pos:
        rel_h, rel_w = _rel_terms(self, q, height, width)
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(*q.shape[:2], *[q.shape[2]] * 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)


def _attend_folded(self: Attention, q, k, v, height: int, width: int) -> torch.Tensor:
    """ "flash": the relative-position terms folded into the query and key vectors (module
    docstring), no mask. (B, heads, N, d) each."""
    if not self.use_rel_pos:
        return F.scaled_dot_product_attention(q, k, v, scale=self.scale)
    head_dim = q.shape[-1]
    rel_h, rel_w = _rel_terms(self, q, height, width)
    # Key n = (row, col) gets one-hots of its row and column: q'·k' = scale·q·k + the query's
    # height term at that row + its width term at that column.
    rows = torch.arange(height, device=q.device).repeat_interleave(width)
    cols = torch.arange(width, device=q.device).repeat(height)
    key_terms = torch.cat([F.one_hot(rows, height), F.one_hot(cols, width)], -1).to(k.dtype)
    width_used = head_dim + height + width
    pad = -width_used % 8  # fused kernels want the head dim a multiple of 8
    query = torch.cat([q * self.scale, rel_h.flatten(2, 3), rel_w.flatten(2, 3)], -1)
    key = torch.cat([k, key_terms.expand(*k.shape[:2], -1, -1)], -1)
    query, key = F.pad(query, (0, pad)), F.pad(key, (0, pad))
    value = F.pad(v, (0, width_used + pad - head_dim))
    out = F.scaled_dot_product_attention(query, key.to(query.dtype), value, scale=1.0)
    return out[..., :head_dim]


def _forward_with(attend):
    """Attention.forward of segment_anything, x (B, H, W, C) → (B, H, W, C), with its
    softmax(q kᵀ·scale + rel. positions) v computed by `attend`: same projections, same params."""

    def forward(self: Attention, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, H·W, d)
        out = attend(self, q, k, v, height, width)
        out = out.reshape(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4)
        return self.proj(out.reshape(batch, height, width, -1))

    return forward


_FORWARDS = {"sdpa": _forward_with(_attend_with_mask), "flash": _forward_with(_attend_folded)}


def check_sam_attention(attention: str) -> SamAttention:
    """`attention` if it names an implementation, else a ConfigError listing them."""
    if attention not in SAM_ATTENTIONS:
        raise ConfigError(f"SAM attention must be one of {SAM_ATTENTIONS}, got {attention!r}")
    return attention


# HQ-SAM's image encoder is segment_anything's, copied into its own package: its `Attention`
# is the same code under another class, so the same forwards apply.
_ENCODER_MODULES = ("segment_anything.modeling.image_encoder",
                    "segment_anything_hq.modeling.image_encoder")  # fmt: skip


def _is_encoder_attention(module: torch.nn.Module) -> bool:
    kind = type(module)
    return isinstance(module, Attention) or (
        kind.__name__ == "Attention" and kind.__module__ in _ENCODER_MODULES
    )


def set_sam_attention(model: torch.nn.Module, attention: SamAttention) -> int:
    """Switch every segment_anything `Attention` in `model` (the image encoder's only) to
    `attention`; returns how many."""
    check_sam_attention(attention)
    count = 0
    for module in model.modules():
        if _is_encoder_attention(module):
            if attention in _FORWARDS:
                bound = module.__dict__.get("forward")
                # Rebinding an equal method would still invalidate torch.compile's guards.
                if getattr(bound, "__func__", None) is not _FORWARDS[attention]:
                    module.forward = types.MethodType(_FORWARDS[attention], module)
            else:
                module.__dict__.pop("forward", None)  # back to the class's own method
            count += 1
    return count
