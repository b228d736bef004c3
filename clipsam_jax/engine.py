"""The one loop that produces maps: batches of images → rough maps (CLIP + head) → MMR (SAM).

Evaluation (exact and streaming metrics, panels, saved maps), prediction (files per image) and
the benchmarks' timers all consume `refined_batches`; none has a loop of its own. Loading,
JAX and SAM overlap here: the loader reads the next batch in threads, `rough_maps_ahead` keeps
one batch of rough maps in flight on the device while SAM refines the current one.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np

from clipsam_jax.config import RefineConfig
from clipsam_jax.inference import RoughMapModel, rough_maps_ahead
from clipsam_jax.refine.fusion import MMRResult, mmr_seeded


class RefinedBatch(NamedTuple):
    """One batch through the pipeline: the loader's `batch` dict as it came; `rough` float32
    (B, S, S) in [0, 1]; B `results` (None each without a refiner); `wait_s`, seconds waited for
    the rough maps (loading + CLIP + head not hidden behind SAM); `mmr_s`, seconds of MMR."""

    batch: dict
    rough: np.ndarray
    results: list[MMRResult | None]
    wait_s: float
    mmr_s: float

    def finals(self) -> np.ndarray | None:
        """float32 (B, S, S) final maps, or None without a refiner."""
        if not self.results or self.results[0] is None:
            return None
        return np.stack([r.final for r in self.results])

    # The image scores of docs/method.md §5.2, the one definition eval and predict both use.
    def rough_scores(self) -> np.ndarray:
        """float32 (B,) image scores of the rough maps: each map's maximum."""
        return self.rough.max(axis=(1, 2))

    def final_scores(self) -> np.ndarray | None:
        """float32 (B,) image scores of the final maps, or None without a refiner: each fused
        map's peak BEFORE Norm (`MMRResult.image_score`; the rough map's maximum for an image
        without prompts). After the default Norm every refined map peaks at 1.0, so the final
        map's own maximum would tie those images."""
        if not self.results or self.results[0] is None:
            return None
        return np.array([r.image_score for r in self.results], np.float32)


def refined_batches(
    batches: Iterable[dict],
    model: RoughMapModel,
    refiner,
    refine: RefineConfig,
    seed: int,
) -> Iterator[RefinedBatch]:
    """Each batch with its rough maps and MMR results. Image n's MMR points are seeded by
    (`seed`, its index in the set), so results do not depend on the batching."""
    ahead = rough_maps_ahead(batches, model)
    while True:
        began = time.perf_counter()
        item = next(ahead, None)
        if item is None:
            return
        batch, rough = item
        ready = time.perf_counter()
        results = mmr_seeded(rough, batch["rgb"], refiner, refine, seed, batch["indices"])
        yield RefinedBatch(batch, rough, results, ready - began, time.perf_counter() - ready)


# An evaluation's observer (timer, memory probe): any object with some of the methods
# on_class_start(name, samples), on_batch(name, RefinedBatch), on_class_end(name, result).
Callback = object


def notify(callbacks: Iterable[Callback], event: str, *args) -> None:
    """Call `event` (e.g. "on_batch") on each callback that has it."""
    for callback in callbacks:
        method = getattr(callback, event, None)
        if method is not None:
            method(*args)
