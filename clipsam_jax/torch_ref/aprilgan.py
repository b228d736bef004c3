"""PyTorch reference of the APRIL-GAN baseline head (docs/method.md §2, last item).

Per stage: a Linear C -> C_t on the patch tokens, L2-normalized, cosine with the L2-normalized
text rows, scaled by 100. Channels-last like the UMCI head; state_dict keys `stages.i.weight`,
`stages.i.bias`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from clipsam_jax.torch_ref.umci import l2_normalize

LOGIT_SCALE = 100.0  # CLIP's temperature as APRIL-GAN uses it


class AprilGanHead(nn.Module):
    """forward(patch_tokens: list of (B, H, W, C), text (B, 2, C_t)) -> list of (B, H, W, 2)."""

    def __init__(self, num_stages: int = 4, feature_dim: int = 1024, text_dim: int = 768):
        super().__init__()
        self.stages = nn.ModuleList(nn.Linear(feature_dim, text_dim) for _ in range(num_stages))

    def forward(
        self, patch_tokens: Sequence[torch.Tensor], text: torch.Tensor
    ) -> list[torch.Tensor]:
        if len(patch_tokens) != len(self.stages):
            raise ValueError(
                f"expected {len(self.stages)} stages of tokens, got {len(patch_tokens)}"
            )
        text = l2_normalize(text)  # (B, 2, C_t)
        out = []
        for linear, tokens in zip(self.stages, patch_tokens):
            feats = l2_normalize(linear(tokens))  # (B, H, W, C_t)
            out.append(LOGIT_SCALE * torch.einsum("bhwc,bkc->bhwk", feats, text))
        return out
