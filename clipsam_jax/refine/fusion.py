"""Fusion of SAM masks with the rough map (Sec. 3.3, Eq. 9; docs/method.md §4), and the MMR glue.

    O_final = Norm(O + Σ_i Σ_j m_ij · s_ij)

O is the rough map on the model grid (S×S); the masks m_ij come from SAM at the original image
resolution and are brought to S×S by **area averaging** (docs/method.md §4 choice): a grid cell gets the
fraction of its image area that the mask covers, so a thin defect is not lost or widened as it
would be by nearest or max pooling. When H and W are multiples of S this is an exact block
mean in numpy; otherwise OpenCV's INTER_AREA, which computes the same fractional-coverage
average (for an upscale, H < S, it falls back to OpenCV's bilinear-like behaviour).

No torch or jax here: the refiner is duck-typed (`MaskRefiner`), so this module and the oracle
refiner of the tests run without torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, Protocol

import cv2
import numpy as np

from clipsam_jax.config import RefineConfig
from clipsam_jax.refine.prompts import Prompts, extract_prompts

Norm = Literal["max", "minmax", "none"]
NORMS = ("max", "minmax", "none")
_CV_MAX_CHANNELS = 4  # cv2.resize asserts cn <= 4 (OpenCV 5), so masks go 4 at a time
# Host threads of mmr_batch's per-image work (prompts, fusion): OpenCV, SciPy and numpy's
# large-array loops release the GIL, so images proceed in parallel while SAM's GPU idles.
_MAX_HOST_THREADS = 8


def masks_to_grid(masks: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Area-average masks onto the model grid.

    Args:
      masks: bool or float (q, k, H, W), any leading shape works.
      size: S, or (Sh, Sw) for a non-square grid.

    Returns:
      float32 (q, k, Sh, Sw), each cell = covered fraction of its image area, in [0, 1].
    """
    masks = np.asarray(masks)
    sh, sw = (size, size) if np.isscalar(size) else (int(size[0]), int(size[1]))
    *lead, h, w = masks.shape
    flat = masks.reshape(-1, h, w)
    if flat.shape[0] == 0:
        return np.zeros((*lead, sh, sw), dtype=np.float32)
    if h % sh == 0 and w % sw == 0:
        out = _block_mean(flat, sh, sw)
    else:
        out = _cv2_area(flat, sh, sw)
    return out.reshape(*lead, sh, sw)


def _block_mean(flat: np.ndarray, sh: int, sw: int) -> np.ndarray:
    """Exact area average for integer factors: (n, H, W) → float32 (n, Sh, Sw)."""
    n, h, w = flat.shape
    blocks = flat.reshape(n, sh, h // sh, sw, w // sw)
    return blocks.mean(axis=(2, 4), dtype=np.float32)


def _cv2_area(flat: np.ndarray, sh: int, sw: int) -> np.ndarray:
    """INTER_AREA resize of (n, H, W) → float32 (n, Sh, Sw), channels batched for speed."""
    hwc = np.moveaxis(flat.astype(np.float32), 0, -1)  # OpenCV wants channels last
    chunks = []
    for start in range(0, hwc.shape[-1], _CV_MAX_CHANNELS):
        part = np.ascontiguousarray(hwc[..., start : start + _CV_MAX_CHANNELS])
        resized = cv2.resize(part, (sw, sh), interpolation=cv2.INTER_AREA)
        chunks.append(resized.reshape(sh, sw, part.shape[-1]))  # cv2 drops a single channel
    return np.moveaxis(np.concatenate(chunks, axis=-1), -1, 0)


def fuse(
    rough: np.ndarray, masks: np.ndarray, scores: np.ndarray, norm: Norm = "max"
) -> np.ndarray:
    """Eq. 9: rough map plus score-weighted SAM masks, normalized.

    Args:
      rough: float (S, S) rough map O of one image.
      masks: bool (q, k, H, W) SAM masks at the original image resolution.
      scores: float (q, k) SAM scores s_ij (used as given; SAM's IoU predictions can leave
        [0, 1] slightly).
      norm: "max" (default, docs/method.md §4): divide by the map's maximum only where it exceeds 1;
        "minmax": rescale to [0, 1] (a constant map becomes all zeros); "none": no scaling.

    Returns:
      float32 (S, S). With q == 0 (no component, SAM skipped) the rough map is returned
      unchanged under every norm, so an image without prompts is scored as CLIP scored it.
    """
    return fuse_scored(rough, masks, scores, norm)[0]


def fuse_scored(
    rough: np.ndarray, masks: np.ndarray, scores: np.ndarray, norm: Norm = "max"
) -> tuple[np.ndarray, float]:
    """`fuse`, and the image score of the final map (docs/method.md §5.2).

    The image score is the peak of the fused map BEFORE Norm, max(O + Σ m·s): after the
    default Norm every image whose masks push the sum above 1 peaks at exactly 1.0, which would
    tie all of them. Without prompts (q == 0) it is the rough map's maximum, the peak of the map
    `fuse` then returns. The peak is taken once, on the map that Norm divides.

    Returns:
      (final float32 (S, S) as `fuse` returns it, image score as a Python float).
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    rough = np.asarray(rough, dtype=np.float32)
    masks, scores = np.asarray(masks), np.asarray(scores, dtype=np.float32)
    if masks.ndim != 4 or scores.shape != masks.shape[:2]:
        raise ValueError(
            f"masks (q, k, H, W) and scores (q, k) expected, got {masks.shape}, {scores.shape}"
        )
    if masks.shape[0] == 0:
        return rough.copy(), float(rough.max())
    # Area averaging is linear, so the score-weighted sum of the masks is resized once instead of
    # every mask (q·k resizes of full-resolution maps dominated the MMR time otherwise). A dense
    # multiply-add, not `weighted[mask] += score`: same sums, far faster than boolean indexing.
    weighted = np.zeros(masks.shape[2:], np.float32)
    for mask, score in zip(masks.reshape(-1, *masks.shape[2:]), scores.reshape(-1)):
        weighted += mask.astype(bool, copy=False) * score
    fused = rough + masks_to_grid(weighted[None], rough.shape)[0]
    peak = fused.max()
    return normalize(fused, norm, peak=peak), float(peak)


def normalize(fused: np.ndarray, norm: Norm, *, peak: float | None = None) -> np.ndarray:
    """The Norm of Eq. 9 on one (S, S) map; see `fuse` for the modes. `peak`: the map's
    maximum when the caller already has it (not computed again)."""
    fused = np.asarray(fused, dtype=np.float32)
    if norm == "max":
        peak = fused.max() if peak is None else peak
        return fused / peak if peak > 1.0 else fused
    if norm == "minmax":
        low, high = fused.min(), (fused.max() if peak is None else peak)
        # A constant map ranks no pixel above another; zeros rather than a division by 0.
        return (fused - low) / (high - low) if high > low else np.zeros_like(fused)
    if norm == "none":
        return fused
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def fuse_batch(
    rough: np.ndarray,
    masks: Sequence[np.ndarray],
    scores: Sequence[np.ndarray],
    norm: Norm = "max",
) -> np.ndarray:
    """`fuse` over a batch: rough (N, S, S), per-image masks (q_n, k, H_n, W_n) and scores
    (q_n, k) → float32 (N, S, S). Images may differ in size and number of boxes."""
    if not len(rough) == len(masks) == len(scores):
        raise ValueError(f"batch sizes differ: {len(rough)}, {len(masks)}, {len(scores)}")
    out = [fuse(o, m, s, norm) for o, m, s in zip(rough, masks, scores, strict=True)]
    return np.stack(out) if out else np.zeros_like(np.asarray(rough, dtype=np.float32))


class MaskRefiner(Protocol):
    """Anything that turns prompts into masks; `SamRefiner` is the real one."""

    def refine(
        self, image_rgb: np.ndarray, prompts: Prompts, multimask: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """→ masks bool (q, k, H, W), scores float32 (q, k)."""
        ...


@dataclass(frozen=True)
class MMRResult:
    """One image through MMR: final map (S, S), prompts, masks (q, k, H, W), scores (q, k),
    and `image_score`, the final map's image score (docs/method.md §5.2): the peak of the fused
    map before Norm (`fuse_scored`), the rough map's maximum for an image without prompts."""

    final: np.ndarray
    prompts: Prompts
    masks: np.ndarray
    scores: np.ndarray
    image_score: float


def mmr(
    rough: np.ndarray,
    image: np.ndarray,
    refiner: MaskRefiner,
    config: RefineConfig,
    rng: np.random.Generator,
) -> MMRResult:
    """Multi-level Mask Refinement of one image: prompts → refiner → Eq. 9 fusion.

    Args:
      rough: float (S, S) rough map in [0, 1].
      image: the original image, (H, W) or (H, W, C); only its size is used here.
      refiner: e.g. `SamRefiner`; not called when the map has no component.
      config: threshold, points, sampling, connectivity, norm, multimask.
      rng: point-sampling generator.
    """
    prompts = _prompts_for(rough, image, config, rng)
    if prompts.num_boxes == 0:
        masks, scores = _no_masks(config, prompts.image_hw)
    else:
        masks, scores = refiner.refine(image, prompts, multimask=config.multimask)
    final, peak = fuse_scored(rough, masks, scores, norm=config.fusion_norm)
    return MMRResult(final=final, prompts=prompts, masks=masks, scores=scores, image_score=peak)


class BatchMaskRefiner(MaskRefiner, Protocol):
    """A refiner that also takes several images at once (`SamRefiner.refine_batch`)."""

    def refine_batch(
        self, images: Sequence[np.ndarray], prompts: Sequence[Prompts], multimask: bool = True
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """→ per image: masks bool (q_n, k, H_n, W_n), scores float32 (q_n, k)."""
        ...


def mmr_batch(
    roughs: np.ndarray | Sequence[np.ndarray],
    images: Sequence[np.ndarray],
    refiner: MaskRefiner | BatchMaskRefiner,
    config: RefineConfig,
    rngs: Sequence[np.random.Generator],
) -> list[MMRResult]:
    """`mmr` over a batch, with one refiner call for all images that have a component.

    Equal to `[mmr(o, im, refiner, config, g) for o, im, g in zip(roughs, images, rngs)]`:
    each image draws its points from its own generator, so batching changes no prompt (the
    masks are equal as far as the refiner's kernels are batch-invariant; see `SamRefiner`). A
    refiner with `refine_batch` (SamRefiner: one batched image-encoder pass) gets the images
    with boxes in one call; any other `MaskRefiner` is called image by image. The images'
    prompts and fusions run in host threads (up to `_MAX_HOST_THREADS`), the refiner on the
    calling thread.

    Args:
      roughs: float (B, S, S) rough maps in [0, 1] (or B maps of possibly different grids).
      images: B original images, (H_n, W_n) or (H_n, W_n, C); sizes may differ.
      refiner: e.g. `SamRefiner`; gets no image without a component.
      config: as in `mmr`.
      rngs: B point-sampling generators, one per image.

    Returns:
      B `MMRResult`s, in input order.
    """
    if not len(roughs) == len(images) == len(rngs):
        raise ValueError(f"batch sizes differ: {len(roughs)}, {len(images)}, {len(rngs)}")
    workers = max(1, min(len(images), os.cpu_count() or 1, _MAX_HOST_THREADS))
    with ThreadPoolExecutor(workers, thread_name_prefix="mmr") as pool:
        prompts = list(pool.map(lambda n: _prompts_for(roughs[n], images[n], config, rngs[n]),
                                range(len(images))))  # fmt: skip
        todo = [n for n, p in enumerate(prompts) if p.num_boxes > 0]
        if not todo:
            refined = []  # nothing to refine: no call at all, not even an empty batch
        elif hasattr(refiner, "refine_batch"):
            refined = refiner.refine_batch(
                [images[n] for n in todo], [prompts[n] for n in todo], multimask=config.multimask
            )
        else:
            refined = [refiner.refine(images[n], prompts[n], multimask=config.multimask)
                       for n in todo]  # fmt: skip
        by_image = dict(zip(todo, refined, strict=True))

        def result(n: int) -> MMRResult:
            p = prompts[n]
            masks, scores = by_image[n] if n in by_image else _no_masks(config, p.image_hw)
            final, peak = fuse_scored(roughs[n], masks, scores, norm=config.fusion_norm)
            return MMRResult(final=final, prompts=p, masks=masks, scores=scores, image_score=peak)

        return list(pool.map(result, range(len(prompts))))


def mmr_seeded(
    roughs: np.ndarray | Sequence[np.ndarray],
    images: Sequence[np.ndarray],
    refiner: MaskRefiner | BatchMaskRefiner | None,
    config: RefineConfig,
    seed: int,
    indices: Sequence[int],
) -> list[MMRResult | None]:
    """`mmr_batch` with image n's points drawn from `default_rng([seed, indices[n]])`: seeded by
    the image's position in its set, so its prompts do not depend on the batch it falls in (or
    on skipped files). Without a refiner, B Nones (no MMR)."""
    if refiner is None:
        return [None] * len(roughs)
    rngs = [np.random.default_rng([seed, int(index)]) for index in indices]
    return mmr_batch(roughs, images, refiner, config, rngs)


def _no_masks(config: RefineConfig, image_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """What an image without a component gets instead of SAM's output: masks bool
    (0, k, H, W) and scores float32 (0, k), k = 3 with multimask else 1."""
    k = 3 if config.multimask else 1
    return np.zeros((0, k, *image_hw), dtype=bool), np.zeros((0, k), dtype=np.float32)


def _prompts_for(
    rough: np.ndarray, image: np.ndarray, config: RefineConfig, rng: np.random.Generator
) -> Prompts:
    """`extract_prompts` with `config`'s settings, in `image`'s pixel coordinates (as `mmr`)."""
    return extract_prompts(
        rough,
        threshold=config.threshold,
        num_points=config.points,
        image_hw=tuple(np.shape(image)[:2]),
        rng=rng,
        connectivity=config.connectivity,
        per_component=config.point_sampling == "per_component",
    )
