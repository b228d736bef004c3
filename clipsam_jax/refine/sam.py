"""SAM refiner (Sec. 3.3, Eq. 8; docs/method.md §4): the masks of many images' boxes, batched.

With `sam_build` and `sam_attention`, the only library modules that import `segment_anything`
(and torch) at import time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from clipsam_jax.config import RefineConfig, RuntimeConfig
from clipsam_jax.errors import ConfigError
from clipsam_jax.refine.prompts import Prompts
from clipsam_jax.refine.sam_attention import (
    SamAttention,
    check_sam_attention,
    set_sam_attention,
)
from clipsam_jax.refine.sam_build import SAM_VARIANTS, SamVariant, build_sam
from clipsam_jax.refine.sam_decoder import decode_boxes

log = logging.getLogger(__name__)


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W) gray, (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA → uint8 (H, W, 3) RGB.

    uint8 passes through; floats are taken as [0, 1] and scaled. Alpha is dropped.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image must be (H, W), (H, W, 1|3|4), got shape {image.shape}")
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.floating):
            raise ValueError(f"image must be uint8 or float in [0, 1], got {image.dtype}")
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


# Accepted `autocast` names → torch dtype; None = full fp32 (no autocast).
_AUTOCAST: dict[str | None, torch.dtype | None] = {
    None: None, "fp32": None, "float32": None, "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}  # fmt: skip
AUTOCAST_CHOICES = ("auto", "fp32", "fp16", "bf16")


def resolve_autocast(autocast: str | None, device: torch.device) -> str | None:
    """Canonical autocast name for SAM on `device`: None (fp32), "fp16" or "bf16".

    "auto" is bf16 on a CUDA device that supports it and fp32 elsewhere. Mixed precision is
    CUDA only (on CPU it would be slower, and the reference results are fp32). ConfigError for
    an unknown name, fp16/bf16 off CUDA, bf16 on a GPU without it.
    """
    if autocast == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16" if cuda_bf16 else None
    if autocast not in _AUTOCAST:
        names = sorted(k for k in _AUTOCAST if k is not None)
        raise ConfigError(f"autocast must be None, 'auto' or one of {names}, got {autocast!r}")
    dtype = _AUTOCAST[autocast]
    if dtype is None:
        return None
    if device.type != "cuda":
        raise ConfigError(f"autocast={autocast!r} needs SAM on CUDA, it is on {device}")
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"autocast={autocast!r}: this GPU does not support bfloat16")
    return "bf16" if dtype == torch.bfloat16 else "fp16"


class SamRefiner:
    """SAM masks for the boxes of many images: image encoder and mask decoder batched.

    The image encoder (nearly all of SAM's cost) runs on up to `max_images_per_call` images
    at once; the mask decoder then takes all their boxes in one call (`decode_boxes`). Images
    without boxes cost nothing. Pre- and postprocessing are segment_anything's own, so results
    equal `SamPredictor`'s.

    Args:
      model: a SAM model (see `build_sam`); its device is used.
      max_boxes_per_call: a memory bound on boxes per decoder call; None = no bound.
      autocast: None / "fp32" (default), "fp16", "bf16" (CUDA only), or "auto" (bf16 on CUDA,
        fp32 on CPU). Masks and scores come back as bool / float32.
      max_images_per_call: images per encoder call, a memory bound: ViT-H's global-attention
        blocks hold a 16×4096×4096 attention matrix, about 1 GiB per image in fp32.
      attention: "flash" (default), "sdpa" or "stock" (see `sam_attention`), set on `model`
        before each encoder call. Kernels round differently for different batch sizes, so
        batched and one-by-one masks can differ in a rare pixel whose logit is at 0.
      compile_backend: None (eager) or a `torch.compile` backend ("inductor"); compiling takes
        one to three minutes, worth it only on large sets (benchmarks/RESULTS.md). The batch
        dimension is symbolic; a one-image batch compiles once more (torch specializes size 1).

    Attributes:
      preprocess_seconds, encoder_seconds, decoder_seconds: accumulated wall time of each
        stage (SAM's CUDA stream waited for, not JAX's work on the same GPU).
      images_encoded, boxes_decoded: counts. `reset_timers()` zeroes all five.
    """

    # The model variants `from_config` builds from; a family subclasses with its own table.
    variants: dict[str, SamVariant] = SAM_VARIANTS

    def __init__(
        self,
        model: Sam,
        max_boxes_per_call: int | None = None,
        autocast: str | None = None,
        max_images_per_call: int = 4,
        attention: SamAttention = "flash",
        compile_backend: str | None = None,
    ) -> None:
        if max_boxes_per_call is not None and max_boxes_per_call < 1:
            raise ConfigError(f"max_boxes_per_call must be >= 1, got {max_boxes_per_call}")
        if max_images_per_call < 1:
            raise ConfigError(f"max_images_per_call must be >= 1, got {max_images_per_call}")
        self.model = model
        self.transform = self._input_transform(model)
        self.max_boxes_per_call = max_boxes_per_call
        self.max_images_per_call = max_images_per_call
        self.autocast = resolve_autocast(autocast, model.device)
        self.attention = check_sam_attention(attention)  # set on the model at each encoder call
        self.compile_backend = compile_backend
        self._encoder = self._image_encoder(model)
        if compile_backend is not None:
            self._encoder = torch.compile(self._encoder, backend=compile_backend)
        self._resize_pool: ThreadPoolExecutor | None = None  # made at the first batch
        self.reset_timers()

    @classmethod
    def from_config(
        cls,
        config: RefineConfig,
        runtime: RuntimeConfig | None = None,
        *,
        autocast: str | None = None,
        max_boxes_per_call: int | None = None,
        cache_dir: str | None = None,
    ) -> SamRefiner:
        """Build SAM from `RefineConfig` (its sam_dtype unless `autocast` is given) and
        `RuntimeConfig` (defaults when None); `cache_dir`: where --download-sam puts the file."""
        if config.sam == "none":
            raise ConfigError("RefineConfig.sam is 'none': there is no SAM to build")
        runtime = runtime or RuntimeConfig()
        model = build_sam(config.sam, config.sam_checkpoint, config.download_sam,
                          runtime.sam_device, cache_dir, variants=cls.variants)  # fmt: skip
        backend = "inductor" if runtime.sam_compile else None
        return cls(model, max_boxes_per_call, autocast or config.sam_dtype,
                   runtime.sam_images_per_call, runtime.sam_attention, backend)  # fmt: skip

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_timers(self) -> None:
        self.preprocess_seconds = 0.0
        self.encoder_seconds = 0.0
        self.decoder_seconds = 0.0
        self.images_encoded = 0
        self.boxes_decoded = 0

    def refine(
        self, image_rgb: np.ndarray, prompts: Prompts, multimask: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """SAM masks for every box of one image (Eq. 8): `refine_batch` of one image, masks
        bool (q, k, H, W) and scores float32 (q, k)."""
        return self.refine_batch([image_rgb], [prompts], multimask)[0]

    def refine_batch(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[Prompts],
        multimask: bool = True,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """SAM masks for the boxes of several images, the encoder batched across images.

        Args:
          images: N original images, (H_n, W_n) gray, (H_n, W_n, 3) RGB or RGBA.
          prompts: N `Prompts`, each in its image's pixel coordinates (q_n may be 0).
          multimask: k = 3 masks per box (paper) or k = 1.

        Returns:
          N pairs (masks bool (q_n, k, H_n, W_n), scores float32 (q_n, k)); q_n = 0 gets empty
          arrays and no encoder work.
        """
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompt sets")
        rgb = [to_rgb_uint8(image) for image in images]
        for n, (image, p) in enumerate(zip(rgb, prompts, strict=True)):
            if tuple(p.image_hw) != image.shape[:2]:
                raise ValueError(
                    f"image {n}: prompts are for an image of size {p.image_hw}, "
                    f"got {image.shape[:2]}"
                )
        k = self.masks_per_box(multimask)
        results = [
            (np.zeros((0, k, *image.shape[:2]), bool), np.zeros((0, k), np.float32))
            for image in rgb
        ]
        todo = [n for n, p in enumerate(prompts) if p.num_boxes > 0]
        step = self.max_images_per_call
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(todo), step):
                chunk = todo[start : start + step]
                features, input_sizes = self._encode([rgb[n] for n in chunk])
                decoded = self._decode(features, [prompts[n] for n in chunk], input_sizes,
                                       [rgb[n].shape[:2] for n in chunk], multimask)  # fmt: skip
                for n, result in zip(chunk, decoded, strict=True):
                    results[n] = result
                del features  # free the chunk's embeddings before the next encoder call
        return results

    def masks_per_box(self, multimask: bool) -> int:
        """k, the masks the decoder gives each box: SAM's three (multimask) or one."""
        return 3 if multimask else 1

    # The family hooks: a family whose model differs from SAM's in preprocessing, encoder
    # output, prompt frame, decoder or upscaling overrides these (`refine.sam2`), and
    # inherits the batching, timers, autocast and compilation.

    @staticmethod
    def _input_transform(model: torch.nn.Module) -> ResizeLongestSide:
        """What maps images and prompts into the encoder's input frame (`self.transform`)."""
        return ResizeLongestSide(model.image_encoder.img_size)

    @staticmethod
    def _image_encoder(model: torch.nn.Module) -> torch.nn.Module:
        """The module `_encode` runs on a preprocessed batch (compiled when asked)."""
        return model.image_encoder

    def _preprocess(self, images: list[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """n uint8 RGB images → the encoder's input (n, 3, S, S) and their resized (H', W').

        `SamPredictor.set_image`'s steps: channel order, `ResizeLongestSide`, `Sam.preprocess`.
        """
        if self.model.image_format == "BGR":
            images = [image[..., ::-1] for image in images]
        inputs, input_sizes = [], []
        for resized in self._resize(images):
            input_sizes.append(tuple(resized.shape[:2]))
            x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()
            inputs.append(self.model.preprocess(x[None]))
        return torch.cat(inputs), input_sizes

    def _input_coords(self, xy: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """Pixel coordinates (..., 2) of an image of `original_size` → the encoder's frame."""
        return self.transform.apply_coords_torch(xy, original_size)

    def _upscale(
        self, low_res: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> torch.Tensor:
        """Low-resolution logits (q, k, h, w) → bool masks (q, k, H, W), as
        `SamPredictor.predict_torch`: unpadded, resized, thresholded."""
        logits = self.model.postprocess_masks(low_res, input_size, original_size)
        return logits > self.model.mask_threshold

    def _encode(self, images: list[np.ndarray]) -> tuple[object, list[tuple[int, int]]]:
        """The encoder's output for n uint8 RGB images (SAM: embeddings (n, C, h, w)), and
        their resized (H', W')."""
        with self._timed("preprocess_seconds"):
            batch, input_sizes = self._preprocess(images)
        with self._timed("encoder_seconds"):
            # Set per call: other refiners may share this model with another attention.
            set_sam_attention(self.model, self.attention)
            if self.compile_backend is not None:
                torch._dynamo.maybe_mark_dynamic(batch, 0)  # no recompilation per batch size
            features = self._encoder(batch)
        self.images_encoded += len(images)
        return features, input_sizes

    def _resize(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """`ResizeLongestSide.apply_image` of each image, in threads when there are several (PIL
        releases the GIL; on a GPU the resize is a sizeable fraction of the encoder's time)."""
        if len(images) == 1:
            return [self.transform.apply_image(images[0])]
        if self._resize_pool is None:
            workers = min(self.max_images_per_call, os.cpu_count() or 1, 8)
            self._resize_pool = ThreadPoolExecutor(workers, thread_name_prefix="sam-resize")
        return list(self._resize_pool.map(self.transform.apply_image, images))

    def _decode(
        self,
        features: object,
        prompts: list[Prompts],
        input_sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
        multimask: bool,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Masks bool (q_i, k, H_i, W_i) and scores float32 (q_i, k) of the boxes of n images:
        `_decode_low_res`, then the masks upscaled as in `SamPredictor.predict_torch`."""
        with self._timed("decoder_seconds"):
            low_res, scores = self._decode_low_res(features, prompts, original_sizes, multimask)
            results = []
            for i in range(len(prompts)):
                # Upscale in fp32 even under autocast: the threshold at the mask boundary is
                # where half precision would flip pixels. A no-op for fp32.
                masks = self._upscale(low_res[i].float(), input_sizes[i], original_sizes[i])
                results.append((masks.cpu().numpy(), scores[i].float().cpu().numpy()))
        self.boxes_decoded += sum(p.num_boxes for p in prompts)
        return results

    def _decode_low_res(
        self,
        features: torch.Tensor,
        prompts: list[Prompts],
        original_sizes: list[tuple[int, int]],
        multimask: bool,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Low-resolution mask logits (q_i, k, 4h, 4w) and scores (q_i, k) of n images' boxes.

        `features`: the n images' encoder output. All boxes go through the decoder together
        (`_decode_rows`), in calls of at most `max_boxes_per_call` boxes and one group per
        point count.
        """
        low_res: list[torch.Tensor | None] = [None] * len(prompts)
        scores: list[torch.Tensor | None] = [None] * len(prompts)
        by_point_count: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_point_count.setdefault(p.points.shape[1], []).append(i)
        for images in by_point_count.values():
            counts = [prompts[i].num_boxes for i in images]
            boxes, coords, labels = self._prompt_tensors(
                [prompts[i] for i in images], [original_sizes[i] for i in images]
            )
            # The feature row (image) of each box; boxes are in image order.
            owner = torch.as_tensor(
                [i for i, q in zip(images, counts) for _ in range(q)], device=self.device
            )
            step = self.max_boxes_per_call or len(owner)
            masks_parts, iou_parts = [], []
            for start in range(0, len(owner), step):
                rows = slice(start, start + step)
                points = None if coords is None else (coords[rows], labels[rows])
                m, s = self._decode_rows(features, owner[rows], boxes[rows], points, multimask)
                masks_parts.append(m)
                iou_parts.append(s)
            for i, m, s in zip(images, torch.cat(masks_parts).split(counts),
                               torch.cat(iou_parts).split(counts), strict=True):  # fmt: skip
                low_res[i], scores[i] = m, s
        return low_res, scores

    def _decode_rows(
        self,
        features: torch.Tensor,
        owner: torch.Tensor,
        boxes: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution logits (Q, k, 4h, 4w) and scores (Q, k) of Q prompts in one decoder
        call: boxes (Q, 4) and points ((Q, m, 2), (Q, m)) in the input frame, prompt j on the
        image `owner[j]` of `features` (n, C, h, w)."""
        model = self.model
        sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=None)
        dense_pe = model.prompt_encoder.get_dense_pe()
        return decode_boxes(model.mask_decoder, features[owner], dense_pe, sparse, dense,
                            multimask)  # fmt: skip

    def _prompt_tensors(
        self, prompts: list[Prompts], original_sizes: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Boxes (Q, 4), point coordinates (Q, m, 2) and labels (Q, m) in the encoder's input
        frame, stacked in image order; points None when m = 0."""
        device = self.device
        boxes, coords, labels = [], [], []
        for p, size in zip(prompts, original_sizes, strict=True):
            box = torch.as_tensor(p.boxes, dtype=torch.float32, device=device)
            boxes.append(self._input_coords(box.reshape(-1, 2, 2), size).reshape(-1, 4))
            point = torch.as_tensor(p.points, dtype=torch.float32, device=device)
            coords.append(self._input_coords(point, size))
            labels.append(torch.as_tensor(p.point_labels, dtype=torch.int32, device=device))
        if prompts[0].points.shape[1] == 0:
            return torch.cat(boxes), None, None
        return torch.cat(boxes), torch.cat(coords), torch.cat(labels)

    @contextlib.contextmanager
    def _timed(self, counter: str) -> Iterator[None]:
        """Add the block's wall time to `self.<counter>`, SAM's CUDA stream waited for."""
        self._synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            setattr(self, counter, getattr(self, counter) + time.perf_counter() - start)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            # SAM's stream only: torch.cuda.synchronize waits for the whole device, JAX's
            # kernels too (the next batch's rough maps), which are meant to overlap with SAM.
            torch.cuda.current_stream(self.device).synchronize()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=_AUTOCAST[self.autocast])
