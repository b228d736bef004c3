"""Few-shot references (docs/method.md §5.4): which k normal images of a class serve as its memory
bank, and loading them for `RoughMapModel.set_references`.

The choice is reproducible from the seed and nested: the k references are the first k of one
seeded permutation of the class's candidates, so a larger k only adds images and the
nearest-neighbour distance can only fall. Images the evaluation also tests are never chosen.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np

from clipsam_jax.data.pipeline import load_sample
from clipsam_jax.data.types import Sample
from clipsam_jax.errors import DatasetError


def choose_references(
    candidates: Sequence[Sample],
    shots: int,
    seed: int,
    class_name: str,
    exclude: Collection[Path] = (),
) -> list[Sample]:
    """k = `shots` of `candidates` (normal images of `class_name`), drawn by `seed`; those
    whose path is in `exclude` (the tested images) are never drawn.

    DatasetError when fewer than k candidates remain.
    """
    excluded = {Path(p).resolve() for p in exclude}
    pool = sorted((s for s in candidates if Path(s.image_path).resolve() not in excluded),
                  key=lambda s: str(s.image_path))  # fmt: skip
    if len(pool) < shots:
        raise DatasetError(
            f"--shots {shots}: class {class_name!r} has only {len(pool)} normal reference "
            f"image(s) outside the tested ones; lower --shots or add reference images"
        )
    # The class name in the seed: each class draws independently of the others and of the order.
    rng = np.random.default_rng([seed, zlib.crc32(class_name.encode())])
    return [pool[i] for i in rng.permutation(len(pool))[:shots]]


def reference_images(samples: Sequence[Sample], image_size: int) -> np.ndarray:
    """uint8 (k, S, S, 3) RGB images of the references, resized as the tested images are."""
    return np.stack([load_sample(s, image_size, normalized=False)["image"] for s in samples])
