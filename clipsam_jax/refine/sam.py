"""SAM refiner (Sec. 3.3, Eq. 8; SPEC §4): registry, checkpoints, batched images and prompts.

With `sam_attention`, the only modules of the library that import `segment_anything` at import
time; the rest imports without torch (which only checkpoint conversion and `torch_ref` use).

Checkpoint verification: the official file names carry a hash prefix (`sam_vit_h_4b8939.pth`),
the publisher's only statement about the file's content. torch.hub's convention is to check
that prefix against the file's SHA256; for the SAM files, downstream projects consistently
document it as the prefix of the file's **MD5** (e.g. vit_h md5 4b8939a88964…). A downloaded
file is accepted when the prefix matches either digest; no full checksum is invented here.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.utils.transforms import ResizeLongestSide

from clipsam_jax.config import RefineConfig
from clipsam_jax.errors import CheckpointError, ConfigError
from clipsam_jax.refine.prompts import Prompts
from clipsam_jax.refine.sam_attention import (
    SamAttention,
    check_sam_attention,
    set_sam_attention,
)
from clipsam_jax.refine.sam_decoder import decode_boxes

log = logging.getLogger(__name__)

OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
DEFAULT_CACHE_DIR = Path("~/.cache/clipsam_jax/sam")

TINY_SEED = 0
TINY_WARNING = (
    "SAM 'tiny-random': a small SAM with RANDOM weights, for tests and demos only; "
    "its masks and scores are meaningless."
)


@dataclass(frozen=True)
class SamVariant:
    """A SAM architecture: builder, encoder width (to recognize checkpoints), official file."""

    name: str
    builder: Callable[[], Sam]
    embed_dim: int  # image_encoder.patch_embed width, distinguishes the variants
    filename: str | None = None  # official checkpoint; None = random weights (tiny)

    @property
    def url(self) -> str | None:
        return OFFICIAL_BASE_URL + self.filename if self.filename else None

    @property
    def hash_prefix(self) -> str | None:
        """The hash prefix the publisher put in the file name (`sam_vit_h_4b8939.pth`)."""
        return Path(self.filename).stem.rsplit("_", 1)[-1] if self.filename else None


# Tiny SAM: 256-pixel input, 16×16 token grid, 2 blocks of width 64, prompt/decoder width 32.
_TINY = {"img_size": 256, "patch": 16, "embed_dim": 64, "depth": 2, "heads": 2, "prompt_dim": 32}


def build_tiny_sam() -> Sam:
    """A small SAM from segment_anything's modules, random weights (torch seed `TINY_SEED`).

    The global torch RNG is left untouched (forked), so building it changes no other result.
    """
    t = _TINY
    grid = t["img_size"] // t["patch"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=t["img_size"],
                patch_size=t["patch"],
                embed_dim=t["embed_dim"],
                depth=t["depth"],
                num_heads=t["heads"],
                mlp_ratio=2.0,
                out_chans=t["prompt_dim"],
                qkv_bias=True,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                use_rel_pos=True,
                window_size=8,
                global_attn_indexes=(1,),
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=t["prompt_dim"],
                image_embedding_size=(grid, grid),
                input_image_size=(t["img_size"], t["img_size"]),
                mask_in_chans=4,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(
                    depth=2, embedding_dim=t["prompt_dim"], mlp_dim=64, num_heads=2
                ),
                transformer_dim=t["prompt_dim"],
                iou_head_depth=2,
                iou_head_hidden_dim=32,
            ),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )
        # SAM zero-initializes the position embedding; a random one gives position-dependent
        # (still meaningless) masks, which makes the tiny model a better test double.
        torch.nn.init.normal_(sam.image_encoder.pos_embed, std=0.5)
    return sam.eval()


SAM_VARIANTS: dict[str, SamVariant] = {
    "vit_h": SamVariant("vit_h", sam_model_registry["vit_h"], 1280, "sam_vit_h_4b8939.pth"),
    "vit_l": SamVariant("vit_l", sam_model_registry["vit_l"], 1024, "sam_vit_l_0b3195.pth"),
    "vit_b": SamVariant("vit_b", sam_model_registry["vit_b"], 768, "sam_vit_b_01ec64.pth"),
    "tiny-random": SamVariant("tiny-random", build_tiny_sam, _TINY["embed_dim"]),
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto" → cuda if available else cpu; anything else is passed to torch.device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_sam(
    variant: str,
    checkpoint: str | os.PathLike | None = None,
    download: bool = False,
    device: str | torch.device = "auto",
    cache_dir: str | os.PathLike | None = None,
) -> Sam:
    """Build a SAM model in eval mode on `device`.

    Args:
      variant: "vit_h", "vit_l", "vit_b" or "tiny-random".
      checkpoint: a state-dict file (or a folder holding the official file name). Real
        variants need one, unless `download` or the official file is already in `cache_dir`.
        Optional for tiny-random (random weights otherwise).
      download: fetch the official checkpoint into `cache_dir` when no checkpoint is given.
      device: "auto" (cuda if available, else cpu), "cpu", "cuda:1", ...
      cache_dir: download folder, default `~/.cache/clipsam_jax/sam`.

    Raises:
      CheckpointError: unknown variant, missing/corrupt file, weights of another variant,
        failed download or hash check.
    """
    spec = _variant(variant)
    path = _resolve_checkpoint(spec, checkpoint, download, cache_dir)
    if path is None:
        log.warning(TINY_WARNING)
        sam = spec.builder()
    else:
        state = _load_state_dict(path)
        _check_variant(state, spec, path)
        if spec.name == "tiny-random":
            log.warning(TINY_WARNING)
        sam = spec.builder()
        try:
            sam.load_state_dict(state)
        except RuntimeError as err:
            raise CheckpointError(
                f"{path}: not a complete {spec.name} SAM state dict: {_summary(err)}"
            ) from err
    return sam.to(resolve_device(device)).eval()


def _variant(name: str) -> SamVariant:
    if name not in SAM_VARIANTS:
        raise CheckpointError(f"unknown SAM variant {name!r}; valid: {', '.join(SAM_VARIANTS)}")
    return SAM_VARIANTS[name]


def _resolve_checkpoint(
    spec: SamVariant,
    checkpoint: str | os.PathLike | None,
    download: bool,
    cache_dir: str | os.PathLike | None,
) -> Path | None:
    """The checkpoint file to load, downloading it if asked; None = random tiny weights."""
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if path.is_dir() and spec.filename:
            path = path / spec.filename
        if not path.is_file():
            raise CheckpointError(
                f"SAM checkpoint file not found: {path}. Give the {spec.name} weights "
                f"({spec.filename or 'a tiny-random state dict'}) with --sam-checkpoint PATH"
                + (" or fetch them with --download-sam." if spec.filename else ".")
            )
        return path
    if spec.filename is None:
        return None
    cached = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / spec.filename
    if cached.is_file():
        log.info("using SAM %s checkpoint %s", spec.name, cached)
        return cached
    if download:
        return download_checkpoint(spec, cached)
    raise CheckpointError(
        f"SAM {spec.name} needs its checkpoint file {spec.filename} (not found in {cached.parent}). "
        f"Pass --sam-checkpoint PATH, or --download-sam to fetch it from {spec.url}."
    )


def download_checkpoint(spec: SamVariant, dst: Path) -> Path:
    """Fetch the official file to `dst` (tqdm progress bar), verify the name's hash prefix.

    The file lands under a temporary name and is only renamed to `dst` once verified.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dst.name + ".", suffix=".part", dir=dst.parent)
    os.close(fd)
    try:
        log.info("downloading SAM %s from %s to %s", spec.name, spec.url, dst)
        try:
            # hash_prefix=None: torch.hub would check SHA256, SAM names carry the MD5 prefix.
            torch.hub.download_url_to_file(spec.url, tmp, hash_prefix=None, progress=True)
        except Exception as err:
            raise CheckpointError(
                f"could not download SAM {spec.name} from {spec.url}: {err}. Download it by "
                f"hand and pass --sam-checkpoint PATH."
            ) from err
        verify_hash_prefix(Path(tmp), spec.hash_prefix)
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return dst


def verify_hash_prefix(path: Path, prefix: str) -> None:
    """Raise CheckpointError unless the MD5 or SHA256 hex digest of `path` starts with
    `prefix` (see the module docstring for why both)."""
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            md5.update(block)
            sha256.update(block)
    digests = {"md5": md5.hexdigest(), "sha256": sha256.hexdigest()}
    if not any(d.startswith(prefix.lower()) for d in digests.values()):
        raise CheckpointError(
            f"{path}: hash check failed, expected a digest starting with {prefix!r} (from the "
            f"official file name), got md5 {digests['md5']}, sha256 {digests['sha256']}. "
            "The download is incomplete or altered and was discarded; retry, or fetch the "
            "file by hand and pass --sam-checkpoint PATH."
        )


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors only (weights_only): a SAM checkpoint is a plain state dict."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{path}: cannot read SAM checkpoint (corrupt or not a PyTorch file): {_summary(err)}"
        ) from err
    # Some re-exports wrap the weights; the official files are the bare state dict.
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a SAM state dict (a dict of tensors expected)")
    return state


def identify_variant(state: dict[str, torch.Tensor]) -> str | None:
    """The registry variant whose encoder width matches the state dict, None if none does."""
    weight = state.get("image_encoder.patch_embed.proj.weight")
    if weight is None or weight.ndim != 4:
        return None
    for spec in SAM_VARIANTS.values():
        if weight.shape[0] == spec.embed_dim:
            return spec.name
    return None


def _check_variant(state: dict[str, torch.Tensor], spec: SamVariant, path: Path) -> None:
    """Fail early and clearly on weights of another SAM size (before building the model)."""
    if "image_encoder.patch_embed.proj.weight" not in state:
        raise CheckpointError(f"{path}: not a SAM checkpoint (no image_encoder.patch_embed)")
    found = identify_variant(state)
    if found != spec.name:
        width = state["image_encoder.patch_embed.proj.weight"].shape[0]
        looks = f"looks like {found}" if found else f"has an unknown encoder width {width}"
        raise CheckpointError(
            f"{path}: SAM variant mismatch: --sam {spec.name} expects encoder width "
            f"{spec.embed_dim}, but this checkpoint {looks}. Pass the matching --sam or file."
        )


def _summary(err: BaseException, limit: int = 300) -> str:
    """A one-line, bounded summary of an exception (torch's load errors span many lines)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


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
    None: None,
    "fp32": None,
    "float32": None,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
AUTOCAST_CHOICES = ("auto", "fp32", "fp16", "bf16")


def resolve_autocast(autocast: str | None, device: torch.device) -> str | None:
    """Canonical autocast name for SAM on `device`: None (fp32), "fp16" or "bf16".

    "auto" is bf16 on a CUDA device that supports it and fp32 elsewhere; "fp32" and None
    both mean no autocast. Mixed precision is CUDA only (on CPU it would be slower, and the
    reference results are fp32).

    Raises:
      ConfigError: unknown name, fp16/bf16 on a non-CUDA device, bf16 on a GPU without it.
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
    at once; the mask decoder then takes the boxes of all those images in one call
    (`sam_decoder.decode_boxes`: each box with its own image's embedding, where SAM's decoder
    takes one image per call). Images without boxes cost nothing.
    Preprocessing and postprocessing are segment_anything's own (`ResizeLongestSide`,
    `Sam.preprocess`, `Sam.postprocess_masks`), so results equal `SamPredictor`'s.

    Args:
      model: a SAM model (see `build_sam`); its device is used.
      max_boxes_per_call: at most this many boxes per decoder call (a memory bound for images
        with very many components); None = the boxes of an encoder batch in one call.
      autocast: None / "fp32" (default), "fp16", "bf16" mixed precision (CUDA only), or
        "auto" (bf16 on CUDA, fp32 on CPU). Masks and scores come back as bool / float32.
      max_images_per_call: images per encoder call, a memory bound: ViT-H's global-attention
        blocks hold a 16×4096×4096 attention matrix, about 1 GiB per image in fp32.
      attention: the image encoder's attention, "flash" (default: relative positions folded
        into query/key, PyTorch's fused attention without a mask), "sdpa" (the same kernel
        family with the relative positions as its mask; see `sam_attention`) or "stock"
        (segment_anything's); set on `model` before each encoder call. Fused kernels may round
        differently for different batch sizes, so batched and one-by-one masks can differ in a
        rare pixel at the threshold; "stock" gives identical ones.
      compile_backend: None (default) runs the image encoder eagerly; a `torch.compile`
        backend ("inductor") compiles it on its first call. On an H200 in bf16 the compiled
        ViT-H encoder ran 1.79x faster after a 63 s compilation (batch 8, flash attention;
        benchmarks/results/run_all_h200_run4.json): worth it from several thousand images on.
        The batch dimension is symbolic: one compilation serves every batch of two or more
        images; a one-image batch compiles once more (torch specializes size 1).

    Attributes:
      preprocess_seconds, encoder_seconds, decoder_seconds: accumulated wall time of the
        resize/normalize/pad, the image encoder, and prompt encoding + mask decoding +
        upscaling + copy to host; SAM's CUDA stream is waited for before each clock read (only
        SAM's: JAX's work on the same GPU keeps running).
      images_encoded, boxes_decoded: how many images went through the encoder, how many
        boxes through the decoder. `reset_timers()` zeroes all five.
    """

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
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        self.max_boxes_per_call = max_boxes_per_call
        self.max_images_per_call = max_images_per_call
        self.autocast = resolve_autocast(autocast, model.device)
        self.attention = check_sam_attention(attention)  # set on the model at each encoder call
        self.compile_backend = compile_backend
        self._encoder = model.image_encoder
        if compile_backend is not None:
            self._encoder = torch.compile(model.image_encoder, backend=compile_backend)
        self._resize_pool: ThreadPoolExecutor | None = None  # made at the first batch
        self.reset_timers()

    @classmethod
    def from_config(
        cls,
        config: RefineConfig,
        cache_dir: str | None = None,
        *,
        autocast: str | None = None,
        max_boxes_per_call: int | None = None,
        max_images_per_call: int = 4,
        attention: SamAttention | None = None,
    ) -> SamRefiner:
        """Build SAM from `RefineConfig` (sam, sam_checkpoint, download_sam, device,
        sam_attention unless `attention` is given, sam_compile: inductor)."""
        if config.sam == "none":
            raise ConfigError("RefineConfig.sam is 'none': there is no SAM to build")
        model = build_sam(
            config.sam, config.sam_checkpoint, config.download_sam, config.device, cache_dir
        )
        attention = attention or config.sam_attention
        backend = "inductor" if config.sam_compile else None
        return cls(model, max_boxes_per_call, autocast, max_images_per_call, attention, backend)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_timers(self) -> None:
        """Zero the stage timers and counters."""
        self.preprocess_seconds = 0.0
        self.encoder_seconds = 0.0
        self.decoder_seconds = 0.0
        self.images_encoded = 0
        self.boxes_decoded = 0

    def refine(
        self, image_rgb: np.ndarray, prompts: Prompts, multimask: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """SAM masks for every box of one image (Eq. 8); `refine_batch` of one image.

        Args:
          image_rgb: the original image, (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA.
          prompts: boxes and points in this image's pixel coordinates.
          multimask: k = 3 masks per box (paper) or k = 1.

        Returns:
          masks bool (q, k, H, W) at the original resolution, scores float32 (q, k).
          q = 0 returns empty arrays without running SAM.
        """
        return self.refine_batch([image_rgb], [prompts], multimask)[0]

    def refine_batch(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[Prompts],
        multimask: bool = True,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """SAM masks for the boxes of several images, the encoder batched across images.

        Args:
          images: N original images, each (H_n, W_n) gray, (H_n, W_n, 3) RGB or RGBA; sizes
            may differ.
          prompts: N `Prompts`, each in its image's pixel coordinates (q_n may be 0).
          multimask: k = 3 masks per box (paper) or k = 1.

        Returns:
          N pairs (masks bool (q_n, k, H_n, W_n), scores float32 (q_n, k)), equal to `refine`
          image by image. Images with q_n = 0 get empty arrays and no encoder work.
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
        k = 3 if multimask else 1
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

    def _encode(self, images: list[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Image embeddings (n, C, h, w) of n uint8 RGB images, and their resized (H', W').

        Each image goes through `SamPredictor.set_image`'s steps: channel order, resize of the
        long side to the encoder size (uint8, `ResizeLongestSide`), then `Sam.preprocess`
        (normalize, pad bottom/right to a square), so all stack into (n, 3, 1024, 1024).
        """
        with self._timed("preprocess_seconds"):
            if self.model.image_format == "BGR":
                images = [image[..., ::-1] for image in images]
            inputs, input_sizes = [], []
            for resized in self._resize(images):
                input_sizes.append(tuple(resized.shape[:2]))
                x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()
                inputs.append(self.model.preprocess(x[None]))
            batch = torch.cat(inputs)
        with self._timed("encoder_seconds"):
            # Set per call: other refiners may share this model with another attention.
            set_sam_attention(self.model, self.attention)
            if self.compile_backend is not None:
                torch._dynamo.maybe_mark_dynamic(batch, 0)  # no recompilation per batch size
            features = self._encoder(batch)
        self.images_encoded += len(images)
        return features, input_sizes

    def _resize(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """`ResizeLongestSide.apply_image` of each uint8 (H, W, 3) image, in threads when there
        are several: PIL's resize releases the GIL, and on one GPU it was 13 ms of host time per
        ViT-H image, about half the encoder's time per image (run_all_h200_run4.json)."""
        if len(images) == 1:
            return [self.transform.apply_image(images[0])]
        if self._resize_pool is None:
            workers = min(self.max_images_per_call, os.cpu_count() or 1, 8)
            self._resize_pool = ThreadPoolExecutor(workers, thread_name_prefix="sam-resize")
        return list(self._resize_pool.map(self.transform.apply_image, images))

    def _decode(
        self,
        features: torch.Tensor,
        prompts: list[Prompts],
        input_sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
        multimask: bool,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Masks bool (q_i, k, H_i, W_i) and scores float32 (q_i, k) of the boxes of n images.

        `features` (n, C, h, w) holds the n images' embeddings. The boxes of all n images go
        through the prompt encoder and the mask decoder together (`decode_boxes`: one call for
        all, not one per image), in calls of at most `max_boxes_per_call` boxes; images whose
        prompts have different point counts go in separate calls. Each image's low-resolution
        masks are then upscaled to its size as in `SamPredictor.predict_torch`.
        """
        model = self.model
        low_res: list[torch.Tensor | None] = [None] * len(prompts)
        scores: list[torch.Tensor | None] = [None] * len(prompts)
        with self._timed("decoder_seconds"):
            dense_pe = model.prompt_encoder.get_dense_pe()
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
                    sparse, dense = model.prompt_encoder(points=points, boxes=boxes[rows],
                                                         masks=None)  # fmt: skip
                    m, s = decode_boxes(model.mask_decoder, features[owner[rows]], dense_pe,
                                        sparse, dense, multimask)  # fmt: skip
                    masks_parts.append(m)
                    iou_parts.append(s)
                per_image = zip(images, torch.cat(masks_parts).split(counts),
                                torch.cat(iou_parts).split(counts), strict=True)  # fmt: skip
                for i, image_masks, image_scores in per_image:
                    low_res[i], scores[i] = image_masks, image_scores
            results = []
            for i in range(len(prompts)):
                # Upscale in fp32 even under autocast: the threshold at the mask boundary is
                # where half precision would flip pixels. A no-op for fp32.
                logits = model.postprocess_masks(
                    low_res[i].float(), input_sizes[i], original_sizes[i]
                )
                masks = logits > model.mask_threshold
                results.append((masks.cpu().numpy(), scores[i].float().cpu().numpy()))
        self.boxes_decoded += sum(p.num_boxes for p in prompts)
        return results

    def _prompt_tensors(
        self, prompts: list[Prompts], original_sizes: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The boxes (Q, 4), point coordinates (Q, m, 2) and labels (Q, m) of several images'
        prompts in the encoder's input frame (`ResizeLongestSide`, per image), stacked in
        image order. Points are None when m = 0."""
        device, transform = self.device, self.transform
        boxes, coords, labels = [], [], []
        for p, size in zip(prompts, original_sizes, strict=True):
            box = torch.as_tensor(p.boxes, dtype=torch.float32, device=device)
            boxes.append(transform.apply_boxes_torch(box, size))
            point = torch.as_tensor(p.points, dtype=torch.float32, device=device)
            coords.append(transform.apply_coords_torch(point, size))
            labels.append(torch.as_tensor(p.point_labels, dtype=torch.int32, device=device))
        if prompts[0].points.shape[1] == 0:
            return torch.cat(boxes), None, None
        return torch.cat(boxes), torch.cat(coords), torch.cat(labels)

    @contextlib.contextmanager
    def _timed(self, counter: str) -> Iterator[None]:
        """Add the block's wall time to `self.<counter>`; SAM's CUDA stream is waited for first,
        so asynchronous kernels are charged to the stage that launched them."""
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
