"""Batches of preprocessed images and masks for training and evaluation.

Decoding runs in a thread pool (PIL releases the GIL while decoding and resizing) with a
bounded number of batches in flight, so the next batches decode while the model works on the
current one. The order is a pure function of (seed, epoch): with shuffle the permutation comes
from `np.random.default_rng([seed, epoch])`, and each position's mosaic draw from its own
generator keyed by (seed, epoch, position), so `skip_batches=k` (resume) yields exactly the
batches after the first k. A decoding error in a worker is raised to the consumer, naming the
file (`ImageReadError`), or, with `on_error`, reported there and the image left out.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from itertools import islice
from typing import Any

import numpy as np

from clipsam_jax.data.image_io import (
    normalize,
    preprocess,
    read_image_oriented,
    read_mask,
    resize_mask,
    resize_rgb,
)
from clipsam_jax.data.types import Sample
from clipsam_jax.errors import ImageReadError

_MOSAIC_STREAM = 1  # distinguishes the per-position mosaic generators from the epoch one


def decode_sample(sample: Sample) -> tuple[np.ndarray, np.ndarray | None]:
    """Image as uint8 RGB (H, W, 3) and its mask as bool (H, W) of the same size (else
    `ImageReadError`), None for a normal image."""
    rgb, orientation = read_image_oriented(sample.image_path)
    if sample.mask_path is None:
        return rgb, None
    return rgb, read_mask(sample.mask_path, rgb.shape[:2], orientation)


def load_sample(
    sample: Sample, image_size: int, keep_rgb: bool = False, normalized: bool = True
) -> dict[str, Any]:
    """One sample → {"image": float32 (S, S, 3) normalized, "mask": bool (S, S),
    "original_size": (H, W)} plus "rgb": uint8 (H, W, 3) with `keep_rgb`. With `normalized`
    False "image" is the resized uint8 (S, S, 3) that `normalize` would turn into the former."""
    rgb, mask = decode_sample(sample)
    image = preprocess(rgb, image_size) if normalized else resize_rgb(rgb, image_size)
    out = {"image": image, "mask": _resized_mask(mask, image_size), "original_size": rgb.shape[:2]}
    return {**out, "rgb": rgb} if keep_rgb else out


def _resized_mask(mask: np.ndarray | None, size: int) -> np.ndarray:
    return np.zeros((size, size), bool) if mask is None else resize_mask(mask, size)


def load_mosaic(
    samples: Sequence[Sample], image_size: int, keep_rgb: bool = False, normalized: bool = True
) -> dict:
    """Four samples → one 2×2 mosaic (APRIL-GAN's augmentation), same keys as `load_sample`.

    Tiles are squashed to ceil(S/2) and the canvas cropped to S×S, so odd sizes work too;
    "original_size" is the first sample's.
    """
    tile = (image_size + 1) // 2
    canvas = np.zeros((2 * tile, 2 * tile, 3), np.uint8)
    mask_canvas = np.zeros((2 * tile, 2 * tile), bool)
    first_size = None
    for k, sample in enumerate(samples[:4]):
        rgb, mask = decode_sample(sample)
        first_size = first_size or rgb.shape[:2]
        rows = slice(k // 2 * tile, (k // 2 + 1) * tile)
        cols = slice(k % 2 * tile, (k % 2 + 1) * tile)
        canvas[rows, cols] = resize_rgb(rgb, tile)
        mask_canvas[rows, cols] = _resized_mask(mask, tile)
    canvas = canvas[:image_size, :image_size]
    out = {"image": normalize(canvas) if normalized else canvas.copy(),
           "mask": mask_canvas[:image_size, :image_size], "original_size": first_size}  # fmt: skip
    return {**out, "rgb": canvas} if keep_rgb else out


class BatchLoader:
    """Iterable over the batches of one epoch.

    Each batch is a dict:
      images          float32 (B, S, S, 3), CLIP-normalized; with normalized=False the
                      resized uint8 (B, S, S, 3) (normalized on the device by the model)
      masks           bool (B, S, S); all False for normal images
      indices         int64 (B,) into `samples`
      labels          int64 (B,) 1 anomalous, 0 normal (1 for a mosaic holding a defect)
      original_sizes  int64 (B, 2) (H, W) of each image before resizing
      class_names     list[str]; paths list[str]
      mosaic          bool (B,) which items are mosaics
      rgb             list of uint8 (H, W, 3) original images (only with keep_rgb=True)
    B is `batch_size` except for a ragged last batch (dropped with `drop_last`).

    num_workers: decoding threads (0: decode in the consumer's thread). prefetch: batches in
    flight ahead of the consumer. skip_batches: batches of the epoch not produced (resume).
    mosaic_prob: probability that an item becomes a 2×2 mosaic of its image and three random
    images of the same class (training only; off by default). seed, epoch: non-negative ints.
    normalized: False hands out uint8 images for models that normalize them on the device
    (`RoughMapModel`, `make_image_encoder` take both). on_error(index, ImageReadError): called
    for an unreadable sample, which is left out of its batch (a batch left empty is not
    yielded); None raises the error instead. rows (start, stop): only those rows of each batch,
    a process's share of a global batch (train_lib); a batch whose share is empty is not yielded.
    """

    def __init__(
        self, samples: Sequence[Sample], image_size: int, batch_size: int, *,
        shuffle: bool = False, seed: int = 0, epoch: int = 0, drop_last: bool = False,
        num_workers: int = 4, prefetch: int = 2, skip_batches: int = 0, keep_rgb: bool = False,
        mosaic_prob: float = 0.0, normalized: bool = True,
        on_error: Callable[[int, ImageReadError], None] | None = None,
        rows: tuple[int, int] | None = None,
    ) -> None:  # fmt: skip
        if image_size < 1 or batch_size < 1 or prefetch < 1:
            raise ValueError("image_size, batch_size and prefetch must be positive")
        if num_workers < 0 or skip_batches < 0 or not 0.0 <= mosaic_prob <= 1.0:
            raise ValueError("num_workers, skip_batches must be >= 0 and mosaic_prob in [0, 1]")
        self.samples = list(samples)
        self.image_size, self.batch_size, self.on_error = image_size, batch_size, on_error
        self.shuffle, self.seed, self.epoch, self.drop_last = shuffle, seed, epoch, drop_last
        self.num_workers, self.prefetch, self.skip_batches = num_workers, prefetch, skip_batches
        self.keep_rgb, self.mosaic_prob, self.normalized = keep_rgb, mosaic_prob, normalized
        self._by_class = _indices_by_class(self.samples)
        self.rows = rows

    @property
    def num_batches(self) -> int:
        """Batches in the whole epoch, skipped ones included."""
        n, b = len(self.samples), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __len__(self) -> int:
        """Batches this iterator yields (the epoch's, less `skip_batches`)."""
        return max(self.num_batches - self.skip_batches, 0)

    def order(self) -> np.ndarray:
        """int64 (N,): the sample index at each position of the epoch."""
        n = len(self.samples)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n).astype(np.int64)

    def batch_positions(self) -> list[np.ndarray]:
        """Positions in the epoch order of each batch, skipped batches included."""
        n, b = len(self.samples), self.batch_size
        return [np.arange(i * b, min((i + 1) * b, n)) for i in range(self.num_batches)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        order = self.order()
        positions = self.batch_positions()[self.skip_batches :]
        if self.rows is not None:
            positions = [pos[slice(*self.rows)] for pos in positions]
        jobs = [(pos, order[pos]) for pos in positions if len(pos)]
        if self.num_workers > 0:
            yield from self._threaded(jobs)
            return
        for pos, idx in jobs:
            loads = [partial(self._load_item, p, i) for p, i in zip(pos, idx)]
            yield from self._assemble(idx, loads)

    def _threaded(self, jobs: list[tuple[np.ndarray, np.ndarray]]) -> Iterator[dict[str, Any]]:
        pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="clipsam-data")
        pending: deque[tuple[np.ndarray, list[Future]]] = deque()
        remaining = iter(jobs)

        def submit(job: tuple[np.ndarray, np.ndarray]) -> None:
            pos, idx = job
            pending.append((idx, [pool.submit(self._load_item, p, i) for p, i in zip(pos, idx)]))

        try:
            for job in islice(remaining, self.prefetch):
                submit(job)
            while pending:
                idx, futures = pending.popleft()
                job = next(remaining, None)
                if job is not None:
                    submit(job)  # before yielding: keeps `prefetch` batches decoding meanwhile
                yield from self._assemble(idx, [f.result for f in futures])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _load_item(self, position: int, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        if self.mosaic_prob > 0.0:
            rng = np.random.default_rng([self.seed, self.epoch, int(position), _MOSAIC_STREAM])
            if rng.random() < self.mosaic_prob:
                partners = _partners(rng, self._by_class[sample.class_name], index)
                item = load_mosaic([sample] + [self.samples[j] for j in partners],
                                   self.image_size, self.keep_rgb, self.normalized)  # fmt: skip
                return {**item, "mosaic": True}
        item = load_sample(sample, self.image_size, self.keep_rgb, self.normalized)
        return {**item, "mosaic": False}

    def _assemble(self, indices: np.ndarray, loads: list[Callable[[], dict]]) -> Iterator[dict]:
        """The batch of the items `loads` return (a worker's error re-raised here, or passed to
        `on_error`); nothing when none is left."""
        kept, items = [], []
        for index, load in zip(indices, loads):
            try:
                items.append(load())
                kept.append(index)
            except ImageReadError as error:
                if self.on_error is None:
                    raise
                self.on_error(int(index), error)
        if items:
            yield self._batch(np.asarray(kept, np.int64), items)

    def _batch(self, indices: np.ndarray, items: list[dict[str, Any]]) -> dict[str, Any]:
        samples = [self.samples[i] for i in indices]
        masks = np.stack([item["mask"] for item in items])
        mosaic = np.array([item["mosaic"] for item in items], bool)
        labels = np.array([s.label for s in samples], np.int64)
        labels[mosaic] = masks[mosaic].any(axis=(1, 2))
        batch = {
            "images": np.stack([item["image"] for item in items]), "masks": masks,
            "indices": np.asarray(indices, np.int64), "labels": labels,
            "original_sizes": np.array([item["original_size"] for item in items], np.int64),
            "class_names": [s.class_name for s in samples],
            "paths": [str(s.image_path) for s in samples], "mosaic": mosaic,
        }  # fmt: skip
        if self.keep_rgb:
            batch["rgb"] = [item["rgb"] for item in items]
        return batch


def _indices_by_class(samples: Sequence[Sample]) -> dict[str, np.ndarray]:
    by_class: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        by_class.setdefault(sample.class_name, []).append(i)
    return {name: np.array(indices, np.int64) for name, indices in by_class.items()}


def _partners(rng: np.random.Generator, same_class: np.ndarray, index: int) -> list[int]:
    """Three other images of the class (repeats only when the class has fewer than four)."""
    others = same_class[same_class != index]
    if len(others) == 0:
        return [index] * 3
    return [int(j) for j in rng.choice(others, size=3, replace=len(others) < 3)]
