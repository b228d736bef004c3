"""Head registry and the rough map O shared by every head (SPEC §2)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipsam_jax.config import HeadConfig
from clipsam_jax.models.aprilgan import AprilGanHead
from clipsam_jax.models.layers import resize_bilinear
from clipsam_jax.models.umci import UMCIHead


def build_head(
    config: HeadConfig, text_dim: int, num_stages: int = 4, dtype=jnp.float32
) -> nn.Module:
    """The Flax head named by `config.kind` ("umci" or "aprilgan")."""
    if config.kind == "umci":
        return UMCIHead(
            text_dim=text_dim,
            num_stages=num_stages,
            hidden_dim=config.hidden_dim,
            pool_sizes=tuple(config.pool_sizes),
            paths=config.paths,
            gru_reading=config.gru_reading,
            shared_projection=config.shared_projection,
            conv_impl=config.conv_impl,
            dtype=dtype,
        )
    if config.kind == "aprilgan":
        return AprilGanHead(text_dim=text_dim, num_stages=num_stages, dtype=dtype)
    raise ValueError(f"unknown head kind {config.kind!r}; choose umci or aprilgan")


def upsample_logits(logits: jax.Array, size: int) -> jax.Array:
    """(B, H, W, 2) → (B, size, size, 2), bilinear with half-pixel centres (SPEC §2 choice)."""
    return resize_bilinear(logits.astype(jnp.float32), size, size)


def rough_map(stage_logits: Sequence[jax.Array], size: int) -> jax.Array:
    """O = mean_i softmax(B(O_i))[..., 1]: (B, size, size) in [0, 1].

    SPEC §2 choice: average the per-stage anomaly probabilities (Eq. 6 averages O_i), which
    keeps O in [0, 1] for the 0.47 threshold of MMR.
    """
    probabilities = [
        jax.nn.softmax(upsample_logits(o, size), axis=-1)[..., 1] for o in stage_logits
    ]
    return jnp.mean(jnp.stack(probabilities), axis=0)
