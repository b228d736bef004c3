"""Building SAM models: the variants, their checkpoints (download, hash check, variant check)
and the tiny random SAM for tests (docs/method.md §4). `refine.sam` refines with them.

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
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import segment_anything.modeling as _SEGMENT_ANYTHING_MODULES
import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import Sam

from clipsam_jax.clip.weights import torch_load
from clipsam_jax.errors import CheckpointError

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
    """A SAM-family model: how to build it, its checkpoint, and the encoder shape (patch
    embedding width and block count) that tells its weights from another variant's."""

    name: str
    builder: Callable[[], torch.nn.Module]
    embed_dim: int  # the encoder's patch-embedding width
    blocks: int  # the encoder's transformer blocks (SAM 2.1's t and s share a width)
    filename: str | None = None  # official checkpoint; None = random weights (tiny)
    base_url: str = OFFICIAL_BASE_URL  # where the publisher serves `filename`
    hashed_name: bool = True  # the file name ends in a hash prefix the publisher gives
    encoder_prefix: str = "image_encoder."  # the state-dict prefix of patch_embed and blocks

    @property
    def url(self) -> str | None:
        return self.base_url + self.filename if self.filename else None

    @property
    def hash_prefix(self) -> str | None:
        """The hash prefix the publisher put in the file name (`sam_vit_h_4b8939.pth`)."""
        if not (self.filename and self.hashed_name):
            return None
        return Path(self.filename).stem.rsplit("_", 1)[-1]


# Tiny SAM: 256-pixel input, 16×16 token grid, 2 blocks of width 64, prompt/decoder width 32.
_TINY = {"img_size": 256, "patch": 16, "embed_dim": 64, "depth": 2, "heads": 2, "prompt_dim": 32}


def build_tiny_sam(modules: object | None = None, decoder: type | None = None,
                   **decoder_options) -> Sam:  # fmt: skip
    """A small SAM, random weights (torch seed `TINY_SEED`, in a forked RNG: the global one is
    left untouched). `modules`: the package whose `Sam`, `ImageEncoderViT`, `PromptEncoder`,
    `MaskDecoder` and `TwoWayTransformer` build it, default segment_anything's; a family with
    SAM's layout passes its own, and its `decoder` class with `decoder_options`."""
    t = _TINY
    size, dim, grid = t["img_size"], t["prompt_dim"], t["img_size"] // t["patch"]
    m = modules or _SEGMENT_ANYTHING_MODULES
    decoder = decoder or m.MaskDecoder
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        sam = m.Sam(
            image_encoder=m.ImageEncoderViT(
                img_size=size, patch_size=t["patch"], embed_dim=t["embed_dim"], depth=t["depth"],
                num_heads=t["heads"], mlp_ratio=2.0, out_chans=dim, qkv_bias=True,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                window_size=8, global_attn_indexes=(1,),
            ),
            prompt_encoder=m.PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid),
                                           input_image_size=(size, size), mask_in_chans=4),
            mask_decoder=decoder(
                num_multimask_outputs=3,
                transformer=m.TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64,
                                                num_heads=2),
                transformer_dim=dim, iou_head_depth=2, iou_head_hidden_dim=32, **decoder_options,
            ),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )  # fmt: skip
        # SAM zero-initializes the position embedding; a random one gives position-dependent
        # (still meaningless) masks, which makes the tiny model a better test double.
        torch.nn.init.normal_(sam.image_encoder.pos_embed, std=0.5)
    return sam.eval()


SAM_VARIANTS: dict[str, SamVariant] = {
    "vit_h": SamVariant("vit_h", sam_model_registry["vit_h"], 1280, 32, "sam_vit_h_4b8939.pth"),
    "vit_l": SamVariant("vit_l", sam_model_registry["vit_l"], 1024, 24, "sam_vit_l_0b3195.pth"),
    "vit_b": SamVariant("vit_b", sam_model_registry["vit_b"], 768, 12, "sam_vit_b_01ec64.pth"),
    "tiny-random": SamVariant("tiny-random", build_tiny_sam, _TINY["embed_dim"], _TINY["depth"]),
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
    variants: dict[str, SamVariant] | None = None,
) -> Sam:
    """Build a SAM model in eval mode on `device` ("auto": cuda if available, else cpu).

    `variant`: a name in `variants` (default `SAM_VARIANTS`; a family with SAM's layout, such
    as HQ-SAM, passes its own). `checkpoint`: a state-dict file, or a folder holding the
    official file name; real variants need one unless `download` (into `cache_dir`, default
    `~/.cache/clipsam_jax/sam`) or the file is already there; tiny-random is random without.
    CheckpointError: unknown variant, missing/corrupt file, weights of another variant, failed
    download or hash check.
    """
    variants = SAM_VARIANTS if variants is None else variants
    if variant not in variants:
        raise CheckpointError(f"unknown SAM variant {variant!r}; valid: {', '.join(variants)}")
    spec = variants[variant]
    path = _resolve_checkpoint(spec, checkpoint, download, cache_dir)
    state = None if path is None else _load_state_dict(path, spec)
    if state is not None:
        _check_variant(state, spec, path, variants)
    if spec.filename is None:
        log.warning(TINY_WARNING.replace("'tiny-random'", repr(spec.name)))
    sam = spec.builder()
    if state is not None:
        try:
            sam.load_state_dict(state)
        except RuntimeError as err:
            raise CheckpointError(
                f"{path}: not a complete {spec.name} SAM state dict: {_summary(err)}"
            ) from err
    return sam.to(resolve_device(device)).eval()


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
    """Fetch the official file to `dst`, renamed there once its name's hash prefix is verified."""
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
        if spec.hash_prefix:
            verify_hash_prefix(Path(tmp), spec.hash_prefix)
        else:
            log.warning("%s: its publisher gives no hash, so the download is not verified",
                        spec.url)  # fmt: skip
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


def _load_state_dict(path: Path, spec: SamVariant) -> dict[str, torch.Tensor]:
    """Tensors only (weights_only): a SAM checkpoint is a state dict."""
    official = f" ({spec.filename})" if spec.filename else ""
    state = torch_load(path, "SAM checkpoint", f"Pass the {spec.name} checkpoint file{official} "
                       "with --sam-checkpoint, or use --download-sam.")  # fmt: skip
    # SAM's and HQ-SAM's files are the bare state dict, SAM 2's wrap it under "model".
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a SAM state dict (a dict of tensors expected)")
    return state


def encoder_shape(state: dict[str, torch.Tensor], prefix: str) -> tuple[int, int] | None:
    """(patch-embedding width, block count) of the encoder whose keys start with `prefix`,
    None when the state dict has no such encoder."""
    weight = state.get(f"{prefix}patch_embed.proj.weight")
    if weight is None or weight.ndim != 4:
        return None
    blocks = {key[len(prefix) + 7 :].split(".", 1)[0]
              for key in state if key.startswith(f"{prefix}blocks.")}  # fmt: skip
    return weight.shape[0], len(blocks)


def identify_variant(
    state: dict[str, torch.Tensor], variants: dict[str, SamVariant] | None = None
) -> str | None:
    """The variant (of `variants`, default `SAM_VARIANTS`) whose encoder width and block count
    match the state dict, None if none does."""
    for spec in (SAM_VARIANTS if variants is None else variants).values():
        if encoder_shape(state, spec.encoder_prefix) == (spec.embed_dim, spec.blocks):
            return spec.name
    return None


def _check_variant(state: dict[str, torch.Tensor], spec: SamVariant, path: Path,
                   variants: dict[str, SamVariant]) -> None:  # fmt: skip
    """Fail early and clearly on weights of another variant (before building the model)."""
    shape = encoder_shape(state, spec.encoder_prefix)
    if shape is None:
        raise CheckpointError(
            f"{path}: not a {spec.name} checkpoint (no {spec.encoder_prefix}patch_embed)"
        )
    found = identify_variant(state, variants)
    if found != spec.name:
        looks = f"looks like {found}" if found else "matches no known variant"
        raise CheckpointError(
            f"{path}: SAM variant mismatch: --sam {spec.name} expects an encoder of width "
            f"{spec.embed_dim} with {spec.blocks} blocks, but this checkpoint's has width "
            f"{shape[0]} with {shape[1]} blocks and {looks}. Pass the matching --sam or file."
        )


def _summary(err: BaseException, limit: int = 300) -> str:
    """A one-line, bounded summary of an exception (torch's load errors span many lines)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit] + " ..."
