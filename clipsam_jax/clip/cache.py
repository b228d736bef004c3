"""On-disk cache of CLIP patch tokens (16-bit) and S×S masks, one file pair per image (docs/method.md §3).

Keyed by the CLIP fingerprint (weights, image size S, feature layers, compute dtype) and by
each image file (resolved path, size, modification time), so a changed file or model never
reads stale features. At S=518 one image's four ViT-L layers take 11 MB in float16.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from clipsam_jax.clip.features import AttentionImpl, make_image_encoder
from clipsam_jax.clip.loading import ClipModel, file_identity
from clipsam_jax.data.pipeline import BatchLoader
from clipsam_jax.data.types import Sample
from clipsam_jax.parallel.mesh import data_mesh, pad_to, replicate, shard_batch, to_host
from clipsam_jax.parallel.processes import barrier, process_share


def _atomic_save(path: Path, array: np.ndarray) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        np.save(handle, array)
    partial.replace(path)  # a killed run never leaves a truncated cache entry


class BatchEncoder:
    """CLIP patch tokens of host batches, data-parallel over a mesh (default: this process's
    devices; in a multi-process run each process encodes its own images).

    Batches are padded to `batch_size` rounded up to a multiple of the device count, so one
    compiled shape serves every call.
    """

    def __init__(self, clip: ClipModel, batch_size: int, mesh: Mesh | None = None, *,
                 params=None, attention: AttentionImpl | None = None):  # fmt: skip
        self.mesh = mesh or data_mesh(jax.local_devices())
        self.batch_size = pad_to(batch_size, self.mesh)
        # `params`: CLIP's params already replicated on `mesh` by their holder (not copied again).
        self.params = replicate(clip.params, self.mesh) if params is None else params
        self.encoder = make_image_encoder(clip, attention)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        """images (N, S, S, 3) → one (N, H, W, C) array per feature layer (encoder dtype)."""
        outputs = []
        for start in range(0, images.shape[0], self.batch_size):
            chunk = images[start : start + self.batch_size]
            padded = np.zeros((self.batch_size, *images.shape[1:]), images.dtype)
            padded[: len(chunk)] = chunk
            tokens = self.encoder(self.params, shard_batch(padded, self.mesh)).patch_tokens
            outputs.append([to_host(t)[: len(chunk)] for t in tokens])
        return tuple(np.concatenate([o[k] for o in outputs]) for k in range(len(outputs[0])))


class FeatureCache:
    """`root/<fingerprint>/<key>.npy` (float16 (L, H, W, C)) and `<key>.mask.npy` (packed bits)."""

    def __init__(self, root: str | Path, clip: ClipModel, mesh: Mesh | None = None):
        self.clip = clip
        self.mesh = mesh
        self.directory = Path(root) / clip.fingerprint

    def key(self, sample: Sample) -> str:
        mask = "" if sample.mask_path is None else file_identity(sample.mask_path)
        identity = f"{file_identity(sample.image_path)}|{mask}"
        return hashlib.sha1(identity.encode()).hexdigest()[:24]

    def _paths(self, sample: Sample) -> tuple[Path, Path]:
        key = self.key(sample)
        return self.directory / f"{key}.npy", self.directory / f"{key}.mask.npy"

    def missing(self, samples: Sequence[Sample]) -> list[Sample]:
        return [s for s in samples if not all(p.is_file() for p in self._paths(s))]

    def build(
        self, samples: Sequence[Sample], batch_size: int = 8, num_workers: int = 4,
        progress: bool = True,
    ) -> int:  # fmt: skip
        """Compute and store the features of every sample not cached yet; returns how many.

        In a multi-process run every process calls this: each computes and writes its share of
        the missing entries (no file is written by two processes), then all wait for all."""
        barrier("feature cache: listed")  # every process lists the same missing entries
        todo = self.missing(samples)
        mine = [todo[i] for i in process_share(len(todo))]
        if mine:
            self._write(mine, batch_size, num_workers, progress)
        barrier("feature cache: written")  # every entry is on disk before anyone reads it
        return len(todo)

    def _write(self, todo: list[Sample], batch_size: int, num_workers: int, progress: bool) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        loader = BatchLoader(todo, self.clip.image_size, batch_size, num_workers=num_workers)
        encode = BatchEncoder(self.clip, batch_size, self.mesh)
        bar = tqdm(total=len(todo), desc="CLIP features", unit="img", disable=not progress)
        with ThreadPoolExecutor(2, thread_name_prefix="clipsam-cache") as writer:
            for batch in loader:
                tokens = encode(batch["images"])
                stacked = np.stack(tokens, axis=1).astype(np.float16)  # (B, L, H, W, C)
                for i, index in enumerate(batch["indices"]):
                    feature_path, mask_path = self._paths(todo[index])
                    writer.submit(_atomic_save, feature_path, stacked[i])
                    writer.submit(_atomic_save, mask_path, np.packbits(batch["masks"][i]))
                bar.update(len(batch["indices"]))
        bar.close()

    def load(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """(float16 (L, H, W, C) tokens, bool (S, S) mask) of one cached sample."""
        feature_path, mask_path = self._paths(sample)
        size = self.clip.image_size
        mask = np.unpackbits(np.load(mask_path))[: size * size].reshape(size, size)
        return np.load(feature_path), mask.astype(bool)

    def batches(
        self, samples: Sequence[Sample], batch_indices: Sequence[np.ndarray], num_workers: int = 4,
        prefetch: int = 2,
    ) -> Iterator[dict]:  # fmt: skip
        """Batches of cached features in the given order (lists of sample indices), read ahead
        in a thread pool: {"tokens": tuple of (B, H, W, C) float16, "masks", "indices",
        "class_names"}."""

        def read(indices: np.ndarray) -> dict:
            loaded = [self.load(samples[i]) for i in indices]
            stacked = np.stack([tokens for tokens, _ in loaded])  # (B, L, H, W, C)
            return {
                "tokens": tuple(stacked[:, k] for k in range(stacked.shape[1])),
                "masks": np.stack([mask for _, mask in loaded]),
                "indices": np.asarray(indices),
                "class_names": [samples[i].class_name for i in indices],
            }

        with ThreadPoolExecutor(max(num_workers, 1), thread_name_prefix="clipsam-read") as pool:
            pending = [pool.submit(read, idx) for idx in batch_indices[:prefetch]]
            for position in range(len(batch_indices)):
                batch = pending[position].result()
                if position + prefetch < len(batch_indices):
                    pending.append(pool.submit(read, batch_indices[position + prefetch]))
                pending[position] = None  # release the yielded batch's memory
                yield batch
