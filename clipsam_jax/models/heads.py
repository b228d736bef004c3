"""Head registry and the rough map O shared by every head (docs/method.md §2)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipsam_jax.config import HeadConfig
from clipsam_jax.errors import ConfigError
from clipsam_jax.models.aprilgan import AprilGanHead
from clipsam_jax.models.layers import resize_bilinear
from clipsam_jax.models.umci import UMCIHead


def build_head(
    config: HeadConfig, text_dim: int, num_stages: int = 4, dtype=jnp.float32,
    conv_impl: str = "auto",
) -> nn.Module:  # fmt: skip
    """The Flax head named by `config.kind` ("umci" or "aprilgan"); `conv_impl` is the
    convolutions' formulation (`RuntimeConfig.conv_impl`: the same function each way)."""
    if config.kind == "umci":
        return UMCIHead(
            text_dim=text_dim, num_stages=num_stages, hidden_dim=config.hidden_dim,
            pool_sizes=tuple(config.pool_sizes), paths=config.paths,
            gru_reading=config.gru_reading, shared_projection=config.shared_projection,
            conv_impl=conv_impl, dtype=dtype, strip_kernel=config.strip_kernel,
            align_corners=config.align_corners,
        )  # fmt: skip
    if config.kind == "aprilgan":
        return AprilGanHead(text_dim=text_dim, num_stages=num_stages, dtype=dtype)
    raise ValueError(f"unknown head kind {config.kind!r}; choose umci or aprilgan")


def check_head_fits(config: HeadConfig, grid: int, image_size: int) -> None:
    """Raise `ConfigError` before any work when the scale path's pools exceed the token grid."""
    if config.kind == "umci" and config.paths != "strip" and max(config.pool_sizes) > grid:
        raise ConfigError(
            f"--pool-sizes {','.join(map(str, config.pool_sizes))}: a pool of "
            f"{max(config.pool_sizes)} does not fit the {grid}x{grid} token grid of "
            f"--image-size {image_size}; use smaller pools or a larger image size"
        )


def upsample_logits(logits: jax.Array, size: int, align_corners: bool = False) -> jax.Array:
    """(B, H, W, 2) → (B, size, size, 2), bilinear (half-pixel centres: docs/method.md §2 choice)."""
    return resize_bilinear(logits.astype(jnp.float32), size, size, align_corners)


def rough_map(
    stage_logits: Sequence[jax.Array], size: int, align_corners: bool = False,
    average: str = "probabilities",
) -> jax.Array:  # fmt: skip
    """O = mean_i softmax(B(O_i))[..., 1]: (B, size, size) in [0, 1].

    docs/method.md §2 choice: average the per-stage anomaly probabilities (Eq. 6 averages O_i), which
    keeps O in [0, 1] for the 0.47 threshold of MMR; average="logits" takes one softmax of the
    mean logits instead.
    """
    upsampled = [upsample_logits(o, size, align_corners) for o in stage_logits]
    if average == "logits":
        return jax.nn.softmax(jnp.mean(jnp.stack(upsampled), axis=0), axis=-1)[..., 1]
    probabilities = [jax.nn.softmax(o, axis=-1)[..., 1] for o in upsampled]
    return jnp.mean(jnp.stack(probabilities), axis=0)


def head_rough_map(config: HeadConfig | None):
    """`rough_map` with a head's resize and stage-averaging choices (defaults for None)."""
    config = config or HeadConfig()
    return lambda logits, size: rough_map(logits, size, config.align_corners, config.stage_average)
