"""Resizing CLIP's learned position embeddings to another input size (docs/method.md §1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def resize_position_embedding(embedding: np.ndarray, new_grid: int) -> np.ndarray:
    """(1 + g*g, D) ViT position table, row 0 the class position (kept) → (1 + n*n, D) float32
    for `new_grid` n (S / patch size).

    Bicubic with half-pixel centres, as open_clip / APRIL-GAN resize them with
    `torch.nn.functional.interpolate(mode="bicubic", antialias=True, align_corners=False)`:
    with antialias that kernel is the a = -0.5 cubic that `jax.image.resize` uses, and both
    renormalize the taps that fall outside the grid. (HF's `interpolate_pos_encoding` uses the
    a = -0.75 kernel and differs by up to 0.3 on 24 → 37.)
    """
    embedding = np.asarray(embedding, np.float32)
    grid = round((embedding.shape[0] - 1) ** 0.5)
    if grid * grid != embedding.shape[0] - 1:
        raise ValueError(f"position table of {embedding.shape[0]} rows is not 1 + a square grid")
    if new_grid == grid:
        return embedding
    dim = embedding.shape[1]
    table = embedding[1:].reshape(grid, grid, dim)
    resized = jax.image.resize(jnp.asarray(table), (new_grid, new_grid, dim), method="bicubic")
    resized = np.asarray(jax.device_get(resized), np.float32).reshape(new_grid * new_grid, dim)
    return np.concatenate([embedding[:1], resized], axis=0)
