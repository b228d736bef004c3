"""Few-shot nearest-neighbour map (docs/method.md §5.4): a memory bank of the normal reference
images' CLIP patch features, per layer; a test patch's anomaly is 1 − its largest cosine
similarity to the bank, averaged over the layers.

The search is chunked matmuls in a `lax.scan` over the bank's rows, so memory is batch ×
patches × `chunk` similarities whatever the bank's size; the test batch keeps its sharding
over the devices and the bank is replicated, like the rest of the model's parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clipsam_jax.models.layers import l2_normalize, resize_bilinear


def build_bank(patch_tokens: Sequence[np.ndarray], chunk: int) -> tuple[np.ndarray, ...]:
    """The memory bank of k reference images, one array per layer.

    Args:
      patch_tokens: per layer, (k, h, w, C) patch features (CLIP's residual stream, as the
        head receives them).
      chunk: the most rows the search takes per step. The rows are split into
        ceil(n / chunk) equal steps, padded (by fewer rows than steps) with copies of the first
        row, which leave every maximum unchanged.

    Returns:
      per layer, float32 (steps, rows per step, C) unit vectors.
    """
    bank = []
    for tokens in patch_tokens:
        rows = np.asarray(tokens, np.float32).reshape(-1, tokens.shape[-1])
        rows /= np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
        steps = -(-len(rows) // chunk)
        per_step = -(-len(rows) // steps)
        rows = np.concatenate([rows, np.repeat(rows[:1], steps * per_step - len(rows), axis=0)])
        bank.append(rows.reshape(steps, per_step, rows.shape[-1]))
    return tuple(bank)


def nearest_normal_distance(tokens: jax.Array, bank: jax.Array) -> jax.Array:
    """1 − max cosine similarity of each test patch to the bank's rows.

    Args:
      tokens: (B, h, w, C) test patch features.
      bank: (steps, rows per step, C) unit vectors (`build_bank`).

    Returns:
      float32 (B, h, w) in [0, 2].
    """
    batch, height, width, channels = tokens.shape
    query = l2_normalize(tokens.astype(jnp.float32)).reshape(batch, height * width, channels)
    query = query.astype(bank.dtype)

    def step(best, rows):
        similarity = jnp.einsum("bpc,nc->bpn", query, rows, preferred_element_type=jnp.float32)
        return jnp.maximum(best, similarity.max(axis=-1)), None

    start = jnp.full((batch, height * width), -jnp.inf, jnp.float32)
    best, _ = jax.lax.scan(step, start, bank)
    return (1.0 - best).reshape(batch, height, width)


def few_shot_map(
    patch_tokens: Sequence[jax.Array], bank: Sequence[jax.Array], size: int, align_corners: bool
) -> jax.Array:
    """The few-shot anomaly map: `nearest_normal_distance` per layer, averaged over the
    layers, resized to (size, size) bilinearly as the rough map's logits are.

    Args:
      patch_tokens: per layer, (B, h, w, C) test features.
      bank: per layer, the reference bank (`build_bank`), same layer order.

    Returns:
      float32 (B, size, size).
    """
    distances = [nearest_normal_distance(t, b) for t, b in zip(patch_tokens, bank, strict=True)]
    mean = jnp.mean(jnp.stack(distances), axis=0)
    return resize_bilinear(mean[..., None], size, size, align_corners)[..., 0]
