"""The zero-shot similarity map of Table 2's "w/o UMCI" row (docs/method.md §2).

Per feature layer: patch tokens → CLIP's post-layernorm → visual projection → L2-normalize →
cosine with L × 100; the rough map then averages the softmax anomaly channel over layers,
like every head's (`clipsam_jax.models.heads.rough_map`). Uses the frozen CLIP params only.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from clipsam_jax.clip.loading import ClipModel
from clipsam_jax.models.aprilgan import cosine_logits


def _project(module, tokens):
    return module.visual_projection(module.vision_model.post_layernorm(tokens))


def zero_shot_logits(
    clip: ClipModel, params: dict, patch_tokens: Sequence[jax.Array], text: jax.Array
) -> list[jax.Array]:
    """patch tokens: sequence of (B, H, W, C); text (B, 2, C_t) → list of (B, H, W, 2) logits."""
    outputs = []
    for tokens in patch_tokens:
        projected = clip.module.apply({"params": params}, tokens, method=_project)
        outputs.append(cosine_logits(projected.astype("float32"), text.astype("float32")))
    return outputs
