"""The CLIP stage at inference: images → rough maps O (B, S, S), one jitted function.

CLIP features stay on the device between the encoder and the head. The head is a trained one
(UMCI or APRIL-GAN, read from a training workdir) or, for Table 2's "w/o UMCI", the zero-shot
similarity map computed from CLIP's own projection.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from clipsam_jax import config as config_lib
from clipsam_jax.checkpoint import head_directory, load_head
from clipsam_jax.clip.cache import BatchEncoder
from clipsam_jax.clip.features import AttentionImpl
from clipsam_jax.clip.loading import ClipModel, load_clip, looks_local, resolve_local
from clipsam_jax.clip.prompts import TextFeatures
from clipsam_jax.config import DEFAULT_RUNTIME, ClipConfig, HeadConfig, RuntimeConfig
from clipsam_jax.errors import CheckpointError
from clipsam_jax.models.few_shot import build_bank, few_shot_map
from clipsam_jax.models.heads import build_head, check_head_fits, head_rough_map
from clipsam_jax.models.zero_shot import zero_shot_logits
from clipsam_jax.parallel.mesh import data_mesh, pad_to, replicate, shard_batch, to_host

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RoughMapModel:
    """CLIP + head (or zero-shot) → rough maps. `head_config` is None for the zero-shot map."""

    clip: ClipModel
    text: TextFeatures
    head_config: HeadConfig | None
    head_params: dict | None
    batch_size: int = 8
    clip_config: ClipConfig | None = None  # the settings `clip` was loaded with
    checkpoint_step: int | None = None
    mesh: Mesh | None = None  # data-parallel devices; default: this process's devices
    attention: AttentionImpl | None = None  # None: clip.attention (clip.features.resolve_attention)
    conv_impl: str = "auto"  # the head's convolutions (RuntimeConfig.conv_impl)
    head_dtype: str = "float32"  # ClipConfig.head_dtype: "clip" computes the head in CLIP's dtype
    bank_chunk: int = 4096  # RuntimeConfig.few_shot_chunk

    def __post_init__(self):
        # Each process computes its own images' maps (`parallel.processes`): no collective.
        self.mesh = self.mesh or data_mesh(jax.local_devices())
        # One compiled shape for every call, split evenly over the devices.
        self.batch_size = pad_to(self.batch_size, self.mesh)
        self._clip_params = replicate(self.clip.params, self.mesh)
        self._head_params = (
            None if self.head_params is None else replicate(self.head_params, self.mesh)
        )
        clip, layers = self.clip, self.clip.feature_layers
        head = None
        if self.head_config is not None:
            # float32 by default, as trained: the bf16 CLIP features are promoted at the input.
            head_dtype = clip.module.dtype if self.head_dtype == "clip" else jnp.float32
            head = build_head(
                self.head_config, clip.text_dim, len(layers), head_dtype,
                inference_conv_impl(self.conv_impl),
            )  # fmt: skip

        to_rough_map = head_rough_map(self.head_config)
        align_corners = (self.head_config or HeadConfig()).align_corners
        # The references' patch tokens (few-shot banks) and the batches' come from one encoder.
        self._encoder = BatchEncoder(clip, self.batch_size, self.mesh, params=self._clip_params,
                                     attention=self.attention)  # fmt: skip
        encode = self._encoder.encoder

        def forward(clip_params, head_params, pixels, text, references):
            tokens = encode(clip_params, pixels).patch_tokens  # uint8: normalized on the device
            if head is None:
                logits = zero_shot_logits(clip, clip_params, tokens, text)
            else:
                logits = head.apply({"params": head_params}, tokens, text)
            rough = to_rough_map(logits, clip.image_size)
            if references is None:  # zero-shot: a separate trace, as None has no leaves
                return rough
            bank, weight = references
            few_shot = few_shot_map(tokens, bank, clip.image_size, align_corners)
            return (1.0 - weight) * rough + weight * few_shot

        self._forward = jax.jit(forward)
        self._banks: dict[str | None, tuple] = {}  # class name → replicated reference bank

    def set_references(
        self, class_name: str | None, images: np.ndarray | None, weight: float = 0.5
    ) -> None:
        """Make the k uint8 (k, S, S, 3) RGB `images` the normal references of `class_name`:
        their patch features become its memory bank, and every later `submit` of that class
        returns (1 - weight)·rough + weight·few-shot map (few-shot mode). None images drop
        the class's bank."""
        if images is None:
            self._banks.pop(class_name, None)
            return
        bank = build_bank(list(self._encoder(images)), self.bank_chunk)
        dtype = self.clip.module.dtype  # bf16 on accelerators: the CLIP features' own precision
        arrays = (tuple(b.astype(dtype) for b in bank), np.float32(weight))
        self._banks[class_name] = replicate(arrays, self.mesh)

    def _bank(self, class_names: Sequence[str | None]) -> tuple | None:
        """(bank, weight) of a chunk's class (None: zero-shot); one class per chunk."""
        banks = {name for name in class_names if name in self._banks}
        if not banks:
            return None
        if len(set(class_names)) > 1:
            raise ValueError(f"a few-shot batch mixes classes {sorted(set(map(str, class_names)))}:"
                             " each class has its own reference bank")  # fmt: skip
        return self._banks[banks.pop()]

    def submit(self, images: np.ndarray, class_names: Sequence[str | None]) -> list:
        """Dispatch the rough maps of a batch without waiting for them (JAX runs them
        asynchronously, so the caller can run SAM on the previous batch meanwhile); `collect`
        returns them. images float32 (B, S, S, 3) normalized, or the resized uint8 (B, S, S, 3)
        RGB, normalized on the device (a quarter of the bytes to copy; the same arithmetic).

        Batches are padded to `batch_size` (a multiple of the device count) so every call
        reuses one compiled shape; each device computes its slice of the batch.
        """
        pending = []
        for start in range(0, images.shape[0], self.batch_size):
            chunk = images[start : start + self.batch_size]
            names = list(class_names[start : start + self.batch_size])
            valid, pad = len(chunk), self.batch_size - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
                names += [names[-1]] * pad
            out = self._forward(
                self._clip_params, self._head_params, shard_batch(chunk, self.mesh),
                shard_batch(self.text.batch(names), self.mesh), self._bank(names),
            )  # fmt: skip
            pending.append((out, valid))
        return pending

    @staticmethod
    def collect(pending: list) -> np.ndarray:
        """The rough maps of a `submit`: float32 (B, S, S) in [0, 1] (with a reference bank,
        the few-shot combination, in [0, 1 + w])."""
        return np.concatenate([to_host(out)[:valid].astype(np.float32) for out, valid in pending])

    def __call__(self, images: np.ndarray, class_names: Sequence[str | None]) -> np.ndarray:
        """images (B, S, S, 3) as `submit` takes them → rough maps float32 (B, S, S) in [0, 1]."""
        return self.collect(self.submit(images, class_names))


def rough_maps_ahead(
    batches: Iterable[dict], model: RoughMapModel
) -> Iterator[tuple[dict, np.ndarray]]:
    """(batch, rough maps float32 (B, S, S)) for each batch, with one batch in flight: the next
    batch's maps are dispatched before the current one is handed out, so CLIP + head compute
    them (asynchronously, in JAX) while the caller runs SAM on the current one (PyTorch).

    Each batch is a dict with "images" (B, S, S, 3) as `RoughMapModel.submit` takes them and
    "class_names" (B); it is handed back as it came, with its maps.
    """
    previous = None
    for batch in batches:
        pending = model.submit(batch["images"], batch["class_names"])
        if previous is not None:
            yield previous
        previous = (batch, model.collect(pending))
    if previous is not None:
        yield previous


def inference_conv_impl(conv_impl: str) -> str:
    """The head's convolution form for a forward pass: "auto" is XLA's own, the fastest forward
    on CPU too (the shifted matmuls "auto" trains with on CPU pay off in the backward pass)."""
    return "xla" if conv_impl == "auto" else conv_impl


def checkpoint_clip_config(meta: dict) -> ClipConfig:
    """The CLIP settings a head was trained with (from its checkpoint metadata)."""
    return config_lib.from_dict(ClipConfig, meta["config"]["clip"])


NO_HEAD_HINT = " Or pass --no-umci for the zero-shot map (no trained head)."


def check_inputs(clip_config: ClipConfig, checkpoint: str | None, no_umci: bool,
                 clip_given: Sequence[str], sam_checkpoint: str | None = None,
                 sam: bool = True) -> None:  # fmt: skip
    """The input paths of an evaluation or prediction, checked before anything loads: the
    head's workdir, a local CLIP directory (when it is the one used), the SAM file."""
    if not no_umci:
        if checkpoint is None:
            raise CheckpointError("no --checkpoint given" + NO_HEAD_HINT)
        head_directory(checkpoint, NO_HEAD_HINT)
    if (no_umci or "model" in clip_given) and looks_local(clip_config.model):
        resolve_local(Path(clip_config.model).expanduser())
    if sam and sam_checkpoint is not None and not Path(sam_checkpoint).expanduser().exists():
        raise CheckpointError(f"--sam-checkpoint {sam_checkpoint}: no such file")


def load_rough_map_model(
    clip_config: ClipConfig,
    checkpoint: str | None,
    no_umci: bool = False,
    batch_size: int = 8,
    clip_given: Sequence[str] = (),
    runtime: RuntimeConfig = DEFAULT_RUNTIME,
    mesh: Mesh | None = None,
) -> RoughMapModel:
    """Build the rough-map model for evaluation or prediction.

    With a checkpoint, the CLIP model, S, feature layers and prompts come from the training run
    except the fields of `clip_config` named in `clip_given` (e.g. ("image_size",)); the head
    config (strip/scale, c_h, pools) always comes from the checkpoint. With `no_umci`,
    `clip_config` is used as given. `runtime`: attention and convolution forms, cache folder,
    the few-shot search's chunk.
    """
    head_config = head_params = None
    if not no_umci:
        if checkpoint is None:
            raise CheckpointError("no --checkpoint given (or pass --no-umci for the zero-shot map)")
        head_params, meta = load_head(checkpoint, hint=NO_HEAD_HINT)
        head_config = config_lib.from_dict(HeadConfig, meta["config"]["head"])
        clip_config = config_lib.resolve_clip(
            checkpoint_clip_config(meta), clip_config, tuple(clip_given)
        )
        trained_size = meta["config"]["clip"]["image_size"]
        if clip_config.image_size != trained_size:
            logger.warning("head trained at S=%d, evaluated at S=%d", trained_size,
                           clip_config.image_size)  # fmt: skip
    clip = load_clip(clip_config.model, clip_config.image_size, clip_config.feature_layers,
                     runtime.cache_dir, clip_config.dtype, runtime.clip_attention)  # fmt: skip
    if head_params is not None:
        check_head_fits(head_config, clip.grid, clip.image_size)
        expected = meta.get("num_stages")
        if expected is not None and expected != len(clip.feature_layers):
            raise CheckpointError(
                f"{checkpoint}: head has {expected} stages but CLIP gives "
                f"{len(clip.feature_layers)} feature layers"
            )
        if meta.get("feature_dim") not in (None, clip.feature_dim):
            raise CheckpointError(
                f"{checkpoint}: head expects {meta['feature_dim']}-wide CLIP features, "
                f"{clip_config.model} has {clip.feature_dim}"
            )
        head_params = jax.tree.map(jnp.asarray, head_params)
    text = TextFeatures(clip, clip_config.templates, clip_config.object_name, runtime.cache_dir,
                        normalization=clip_config.prompt_normalization)  # fmt: skip
    step = None if no_umci else meta.get("step")
    return RoughMapModel(clip, text, head_config, head_params, batch_size, clip_config, step,
                         mesh=mesh, conv_impl=runtime.conv_impl,
                         head_dtype=clip_config.head_dtype,
                         bank_chunk=runtime.few_shot_chunk)  # fmt: skip
