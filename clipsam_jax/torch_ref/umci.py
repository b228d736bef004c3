"""PyTorch reference of ClipSAM's UMCI head (paper Sec. 3.2 and Appendix B; docs/method.md §2).

Every tensor at a module boundary is channels-last, as on the Flax side: patch tokens
(B, H, W, C), text features L (B, 2, C_t) with row 0 normal and row 1 anomalous, stage logits
(B, H, W, 2). Torch convolutions and pooling are channels-first, so the helpers below permute in
and out. Attribute names follow the interface contract shared with the Flax head, so a converted
checkpoint differs from this state_dict only by transposes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

PATHS = ("both", "strip", "scale")
GRU_READINGS = ("carry", "sequence")
NORM_EPS = 1e-12  # F.normalize's default: x / max(||x||, eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) v (Eq. 13), one head: q (B, Nq, d), k (B, Nk, d), v (B, Nk, d_v)
    -> (B, Nq, d_v). Written out (not F.scaled_dot_product_attention) in the Flax side's order."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalize over the last (channel) axis; the paper's Norm in Eq. 14 and 15."""
    return F.normalize(x, p=2.0, dim=-1, eps=NORM_EPS)


def conv2d_nhwc(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Apply a Conv2d to (B, H, W, C_in) -> (B, H', W', C_out)."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def conv1d_nlc(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """Apply a Conv1d along the sequence axis of (B, N, C_in) -> (B, N, C_out)."""
    return conv(x.transpose(1, 2)).transpose(1, 2)


def avg_pool_nhwc(x: torch.Tensor, size: int) -> torch.Tensor:
    """Average pooling, kernel = stride = size, floor: (B, H, W, C) -> (B, H//s, W//s, C)."""
    pooled = F.avg_pool2d(x.permute(0, 3, 1, 2), kernel_size=size, stride=size, ceil_mode=False)
    return pooled.permute(0, 2, 3, 1)


def resize_bilinear_nhwc(
    x: torch.Tensor, size: Sequence[int], align_corners: bool = False
) -> torch.Tensor:
    """Bilinear resize (B, H, W, C) -> (B, size[0], size[1], C), half-pixel centres as
    jax.image.resize (upsampling only: no antialiasing); align_corners=True is APRIL-GAN's."""
    out = F.interpolate(x.permute(0, 3, 1, 2), size=tuple(size), mode="bilinear",
                        align_corners=align_corners)  # fmt: skip
    return out.permute(0, 2, 3, 1)


def strip_pool(p_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Avg_Pool_{1×W} and Avg_Pool_{H×1} (Eq. 1) of (B, H, W, C): (B, H, C) and (B, W, C)."""
    return p_hat.mean(dim=2), p_hat.mean(dim=1)


def rough_map(
    stage_logits: Sequence[torch.Tensor],
    image_size: int | Sequence[int],
    align_corners: bool = False,
    average: str = "probabilities",
) -> torch.Tensor:
    """Rough anomaly map: mean over stages of softmax(bilinear(O_i to S×S))[..., 1].

    stage_logits: list of (B, H, W, 2); image_size: S or (S_h, S_w). Returns (B, S, S) in
    [0, 1]. Averaging probabilities rather than logits keeps the map a probability (docs/method.md §2);
    average="logits" takes one softmax of the mean upsampled logits instead.
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    upsampled = [resize_bilinear_nhwc(o, size, align_corners) for o in stage_logits]
    if average == "logits":
        return torch.softmax(torch.stack(upsampled, dim=0).mean(dim=0), dim=-1)[..., 1]
    if average != "probabilities":
        raise ValueError(f"average must be 'probabilities' or 'logits', got {average!r}")
    probs = [torch.softmax(o, dim=-1)[..., 1] for o in upsampled]
    return torch.stack(probs, dim=0).mean(dim=0)


class GRUCell(nn.ModuleDict):
    """GRU cell with Flax's `GRUCell` equations (no hidden-side bias on the r and z gates).

        r  = sigmoid(x W_ir + b_ir + h W_hr)
        z  = sigmoid(x W_iz + b_iz + h W_hz)
        n  = tanh(x W_in + b_in + r * (h W_hn + b_hn))
        h' = (1 - z) * n + z * h

    torch.nn.GRUCell also has b_hr and b_hz; leaving them out keeps one set of equations on both
    sides of the parity tests. It is a ModuleDict so the state_dict keys are `ir.weight`, ....
    h, x: (..., c_h) -> h' (..., c_h); leading axes are batch axes.
    """

    def __init__(self, features: int):
        names = ("ir", "iz", "in", "hr", "hz", "hn")
        super().__init__(
            {n: nn.Linear(features, features, bias=n not in ("hr", "hz")) for n in names}
        )

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        r = torch.sigmoid(self["ir"](x) + self["hr"](h))
        z = torch.sigmoid(self["iz"](x) + self["hz"](h))
        n = torch.tanh(self["in"](x) + r * self["hn"](h))
        return (1.0 - z) * n + z * h


class StripBranch(nn.Module):
    """One direction of the strip path (Eq. 1 and 14, Algorithm 1 lines 2-4).

    forward(strip (B, N, C_t), text (B, 2, C_t)) -> M (B, N, c_h), unit norm over channels,
    with N = H for the row strip and N = W for the column strip.
    """

    def __init__(
        self, text_dim: int, hidden_dim: int, gru_reading: str = "carry", kernel_size: int = 3
    ):
        super().__init__()
        if gru_reading not in GRU_READINGS:
            raise ValueError(f"gru_reading must be one of {GRU_READINGS}, got {gru_reading!r}")
        self.gru_reading = gru_reading
        # Kernel 3 along the strip axis: mixes neighbouring rows (columns); docs/method.md §2 choice.
        self.conv = nn.Conv1d(text_dim, hidden_dim, kernel_size, padding=kernel_size // 2)
        self.text_query = nn.Linear(text_dim, hidden_dim)  # t¹: query of the first attention
        self.text_value = nn.Linear(text_dim, hidden_dim)  # t²: value of the second attention
        self.gru = GRUCell(hidden_dim)

    def update_text(self, t1: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """t_new = GRU(attended): (B, 2, c_h) x2 -> (B, 2, c_h).

        "carry": one step per text token, carry t¹ and input the attention output, so the text
        features are "enriched with visual information" (App. B). "sequence": a GRU run over
        the two attended tokens from a zero state; t_new holds the two hidden states.
        """
        if self.gru_reading == "carry":
            return self.gru(t1, attended)
        h = torch.zeros_like(attended[:, 0])
        states = []
        for i in range(attended.shape[1]):
            h = self.gru(h, attended[:, i])
            states.append(h)
        return torch.stack(states, dim=1)

    def forward(self, strip: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        v = conv1d_nlc(self.conv, strip)  # (B, N, c_h)
        t1 = self.text_query(text)  # (B, 2, c_h)
        t2 = self.text_value(text)  # (B, 2, c_h)
        attended = attention(t1, v, v)  # (B, 2, c_h): what each text token sees in the strip
        t_new = self.update_text(t1, attended)  # (B, 2, c_h)
        v_att = attention(v, t_new, t2)  # (B, N, c_h): each position reads the text
        return l2_normalize(v_att + v)


class ScaleBranch(nn.Module):
    """One scale of the scale path (Eq. 3 and 15, Algorithm 2 lines 2-4).

    forward(p_hat (B, H, W, C_t), text (B, 2, C_t)) -> M_g (B, H//s, W//s, c_h), unit norm over
    channels.
    """

    def __init__(self, text_dim: int, hidden_dim: int, pool_size: int):
        super().__init__()
        self.pool_size = int(pool_size)
        self.conv = nn.Conv2d(text_dim, hidden_dim, kernel_size=3, padding=1)
        self.text_key = nn.Linear(text_dim, hidden_dim)
        self.text_value = nn.Linear(text_dim, hidden_dim)

    def forward(self, p_hat: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        v = conv2d_nhwc(self.conv, avg_pool_nhwc(p_hat, self.pool_size))  # (B, hg, wg, c_h)
        b, hg, wg, ch = v.shape
        tokens = v.reshape(b, hg * wg, ch)  # one query per pooled cell
        v_att = attention(tokens, self.text_key(text), self.text_value(text))
        return l2_normalize(v_att + tokens).reshape(b, hg, wg, ch)


class UMCIStage(nn.Module):
    """One UMCI module (Sec. 3.2, Eq. 1-6); the head holds one per encoder stage.

    forward(tokens (B, H, W, C), text (B, 2, C_t)) -> logits O (B, H, W, 2) (channel 1 =
    anomalous). paths switches a path off entirely (its parameters are not created and conv_all
    takes 2·c_h channels). shared_projection=False gives Algorithms 1 and 2 their own P̂
    (`projection_strip`, `projection_scale`) and a third (`projection_fusion`) for v_ori and
    the residual of Eq. 6.
    """

    def __init__(
        self, feature_dim: int = 1024, text_dim: int = 768, hidden_dim: int = 384,
        pool_sizes: Sequence[int] = (3, 9), paths: str = "both", gru_reading: str = "carry",
        shared_projection: bool = True, strip_kernel: int = 3, align_corners: bool = False,
    ):  # fmt: skip
        super().__init__()
        self.align_corners = align_corners
        if paths not in PATHS:
            raise ValueError(f"paths must be one of {PATHS}, got {paths!r}")
        if gru_reading not in GRU_READINGS:
            raise ValueError(f"gru_reading must be one of {GRU_READINGS}, got {gru_reading!r}")
        pool_sizes = tuple(int(s) for s in pool_sizes)
        if not pool_sizes or min(pool_sizes) < 1:
            raise ValueError(f"pool_sizes must be positive integers, got {pool_sizes}")
        self.paths = paths
        self.pool_sizes = pool_sizes
        self.shared_projection = shared_projection
        self.use_strip = paths in ("both", "strip")
        self.use_scale = paths in ("both", "scale")

        if shared_projection:
            self.projection = nn.Linear(feature_dim, text_dim)
        else:
            if self.use_strip:
                self.projection_strip = nn.Linear(feature_dim, text_dim)
            if self.use_scale:
                self.projection_scale = nn.Linear(feature_dim, text_dim)
            self.projection_fusion = nn.Linear(feature_dim, text_dim)

        if self.use_strip:
            self.strip_row = StripBranch(text_dim, hidden_dim, gru_reading, strip_kernel)
            self.strip_col = StripBranch(text_dim, hidden_dim, gru_reading, strip_kernel)
            self.strip_fuse = nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, padding=1)
        if self.use_scale:
            for k, s in enumerate(pool_sizes):
                self.add_module(f"scale_{k}", ScaleBranch(text_dim, hidden_dim, s))
            self.scale_fuse = nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, padding=1)

        n_branches = 1 + int(self.use_strip) + int(self.use_scale)
        self.conv_ori = nn.Conv2d(text_dim, hidden_dim, kernel_size=3, padding=1)
        self.conv_all = nn.Conv2d(n_branches * hidden_dim, text_dim, kernel_size=3, padding=1)
        self.mlp_hidden = nn.Linear(text_dim, hidden_dim)
        self.mlp_out = nn.Linear(hidden_dim, 2)

    def scale_branches(self) -> list[ScaleBranch]:
        """The scale branches in pool_sizes order (empty with the scale path off)."""
        if not self.use_scale:
            return []
        return [getattr(self, f"scale_{k}") for k in range(len(self.pool_sizes))]

    def project(
        self, tokens: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """P̂ for (strip path, scale path, fusion); None for a path that is off."""
        if self.shared_projection:
            p_hat = self.projection(tokens)
            return p_hat if self.use_strip else None, p_hat if self.use_scale else None, p_hat
        return (
            self.projection_strip(tokens) if self.use_strip else None,
            self.projection_scale(tokens) if self.use_scale else None,
            self.projection_fusion(tokens),
        )

    def strip_path(self, p_hat: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """M_row,col (Eq. 2): (B, H, W, C_t), (B, 2, C_t) -> (B, H, W, c_h)."""
        rows, cols = strip_pool(p_hat)  # (B, H, C_t), (B, W, C_t)
        m_row = self.strip_row(rows, text)  # (B, H, c_h)
        m_col = self.strip_col(cols, text)  # (B, W, c_h)
        # Bilinear resize (half-pixel centres) of a strip one cell wide is a broadcast along the
        # pooled axis, so B(M_row) + B(M_col) is a broadcast sum.
        fused = m_row[:, :, None, :] + m_col[:, None, :, :]  # (B, H, W, c_h)
        return conv2d_nhwc(self.strip_fuse, fused)

    def scale_path(self, p_hat: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """M_g1,g2 (Eq. 4): (B, H, W, C_t), (B, 2, C_t) -> (B, H, W, c_h)."""
        size = p_hat.shape[1:3]
        fused = None
        for branch in self.scale_branches():
            m_g = resize_bilinear_nhwc(branch(p_hat, text), size, self.align_corners)
            fused = m_g if fused is None else fused + m_g
        return conv2d_nhwc(self.scale_fuse, fused)

    def forward(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 4 or text.ndim != 3 or text.shape[1] != 2:
            raise ValueError(
                f"expected tokens (B, H, W, C) and text (B, 2, C_t), got {tuple(tokens.shape)} "
                f"and {tuple(text.shape)}"
            )
        h, w = tokens.shape[1:3]
        if self.use_scale and min(h, w) < max(self.pool_sizes):
            raise ValueError(f"grid {h}x{w} is smaller than the pool sizes {self.pool_sizes}")
        p_strip, p_scale, p_fuse = self.project(tokens)  # (B, H, W, C_t) each

        branches = [conv2d_nhwc(self.conv_ori, p_fuse)]  # v_ori (Eq. 5)
        if self.use_strip:
            branches.append(self.strip_path(p_strip, text))
        if self.use_scale:
            branches.append(self.scale_path(p_scale, text))
        m_all = conv2d_nhwc(self.conv_all, torch.cat(branches, dim=-1))  # (B, H, W, C_t)
        hidden = F.relu(self.mlp_hidden(F.relu(m_all + p_fuse)))  # Eq. 6, residual from P̂
        return self.mlp_out(hidden)  # (B, H, W, 2)


class UMCIHead(nn.Module):
    """ClipSAM's trainable head: one independent UMCIStage per encoder stage.

    forward(patch_tokens: list of num_stages (B, H, W, C), text (B, 2, C_t)) -> list of
    num_stages logits (B, H, W, 2). Keyword arguments go to every UMCIStage.
    """

    def __init__(self, num_stages: int = 4, **stage_kwargs):
        super().__init__()
        self.stages = nn.ModuleList(UMCIStage(**stage_kwargs) for _ in range(num_stages))

    def forward(
        self, patch_tokens: Sequence[torch.Tensor], text: torch.Tensor
    ) -> list[torch.Tensor]:
        if len(patch_tokens) != len(self.stages):
            raise ValueError(
                f"expected {len(self.stages)} stages of tokens, got {len(patch_tokens)}"
            )
        return [stage(tokens, text) for stage, tokens in zip(self.stages, patch_tokens)]
