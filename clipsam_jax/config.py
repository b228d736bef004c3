"""Typed configuration for ClipSAM.

Every default that comes from the paper cites where it comes from (paper section, equation or
table, or `SPEC §n` for a choice the paper leaves open; see `../shared/SPEC.md` and the README's
"Choices" table). Configs are frozen dataclasses: build a variant with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"  # Sec. 4.1: OpenAI ViT-L/14-336
DATASETS = ("mvtec", "visa", "mtd", "ksdd2", "meta")


@dataclass(frozen=True)
class ClipConfig:
    """Frozen CLIP backbone (SPEC §1)."""

    model: str = DEFAULT_CLIP  # hub id or local directory (PyTorch or Flax checkpoint)
    image_size: int = 518  # SPEC §1 choice: APRIL-GAN/AnomalyCLIP protocol (grid 37); 336 native
    # Encoder layers whose residual stream feeds the head. None = the four quarter points of the
    # encoder depth, i.e. layers 6, 12, 18, 24 of ViT-L (Sec. 4.1).
    feature_layers: tuple[int, ...] | None = None
    templates: Literal["clipsam29", "aprilgan35"] = "clipsam29"  # Appendix A, Figure 7c
    object_name: Literal["as_written", "spaced", "object"] = "as_written"  # Figure 7d: `metal_nut`
    # SPEC §1 choice: L2-normalize each sentence embedding, average per state, normalize the
    # mean (WinCLIP / APRIL-GAN); "mean" averages the raw embeddings, then normalizes.
    prompt_normalization: Literal["sentence_and_mean", "mean"] = "sentence_and_mean"
    dtype: Literal["float32", "bfloat16", "auto"] = (
        "auto"  # auto: bf16 on accelerators, fp32 on CPU
    )
    cache_dir: str | None = None  # converted-params cache; None = ~/.cache/clipsam_jax
    # Vision-tower attention, the same function in every form (clip.features.resolve_attention):
    # auto = blocked per-head on CPU; on GPUs "cudnn" (cuDNN's fused kernel) in bf16/fp16 where
    # it compiles, else transformers' own ("reference").
    attention: Literal["auto", "reference", "fused", "blocked", "cudnn"] = "auto"


@dataclass(frozen=True)
class HeadConfig:
    """Trainable head (SPEC §2). `kind="umci"` is ClipSAM; `aprilgan` is the linear baseline."""

    kind: Literal["umci", "aprilgan"] = "umci"
    hidden_dim: int = 384  # c_h, Table 3
    pool_sizes: tuple[int, int] = (3, 9)  # s1, s2, Table 3
    paths: Literal["both", "strip", "scale"] = "both"  # Table 2 ablation switches
    # SPEC §2 choice: GRU with carry t1 and the attention output as input; "sequence" runs a GRU
    # over the two attended tokens from a zero state.
    gru_reading: Literal["carry", "sequence"] = "carry"
    shared_projection: bool = True  # SPEC §2 choice: one Linear(C->C_t) for both paths and fusion
    # SPEC §2 choice: Eq. 1's conv along the strip axis with kernel 3 (mixes neighbouring
    # strips); 1 is the literal reading of a 1×3 kernel on a one-wide strip.
    strip_kernel: int = 3
    # SPEC §2 choice: bilinear resizes with half-pixel centres; True = APRIL-GAN's
    # align_corners=True (scale-path B, and the upsampling of stage logits to S×S).
    align_corners: bool = False
    # SPEC §2 choice: O = mean of the stages' anomaly probabilities (Eq. 6 averages O_i);
    # "logits" averages the logits and takes one softmax.
    stage_average: Literal["probabilities", "logits"] = "probabilities"
    # Conv formulation: "auto" picks shifted matmuls for training on CPU (XLA's CPU convolution
    # has a slow backward pass) and lax.conv elsewhere and for inference (its forward is the
    # fastest; inference.inference_head_config); the same function with the same params.
    conv_impl: Literal["auto", "xla", "matmul"] = "auto"


@dataclass(frozen=True)
class LossConfig:
    """Objective (Sec. 3.4, SPEC §3)."""

    focal_gamma: float = 2.0  # Eq. 10
    dice_smooth: float = 1.0  # SPEC §3: smoothed soft dice (Eq. 11 with squared sums)
    stage_weights: tuple[float, ...] = (0.1, 0.1, 0.1, 0.7)  # Eq. 12, lambda_i
    resolution: Literal["image", "grid"] = "image"  # SPEC §3 choice: loss on the S×S mask


@dataclass(frozen=True)
class OptimConfig:
    """AdamW (Sec. 4.1)."""

    learning_rate: float = 1e-4  # Sec. 4.1
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 0.01  # SPEC §3 choice: PyTorch's AdamW default (optax's is 1e-4)
    batch_size: int = 8  # Sec. 4.1
    epochs: int = 6  # Sec. 4.1


@dataclass(frozen=True)
class RefineConfig:
    """MMR with SAM (Sec. 3.3, SPEC §4)."""

    sam: Literal["vit_h", "vit_l", "vit_b", "tiny-random", "none"] = "vit_h"  # Sec. 4.1
    sam_checkpoint: str | None = None
    download_sam: bool = False
    threshold: float = 0.47  # Table 3
    points: int = 5  # SPEC §4 choice for m
    point_sampling: Literal["shared", "per_component"] = "shared"  # SPEC §4 choice
    connectivity: Literal[4, 8] = 8  # SPEC §4 choice
    fusion_norm: Literal["max", "minmax", "none"] = "max"  # SPEC §4 choice
    multimask: bool = True  # Sec. 3.3: three masks per box
    device: str = "auto"  # torch device for SAM: auto = cuda if available else cpu
    # SAM compute dtype: fp32 keeps reference results device-independent; bf16/fp16 autocast
    # on CUDA (auto = bf16 where supported) is the fast path.
    sam_dtype: Literal["fp32", "fp16", "bf16", "auto"] = "fp32"
    sam_images_per_call: int = 4  # images per batched SAM image-encoder call
    # SAM encoder attention, the same function in each form: "flash" = the relative-position
    # terms folded into wider query/key vectors, no mask (refine/sam_attention.py; ViT-H's
    # encoder at 0.64 of the stock time on an H200 in bf16, ViT-B's at 0.62 on CPU);
    # "sdpa" = PyTorch's fused attention with the terms as its additive mask (0.71, 0.68);
    # "stock" = segment_anything's explicit attention matrix (benchmarks/sam_attention.py).
    sam_attention: Literal["stock", "sdpa", "flash"] = "flash"
    # torch.compile of SAM's image encoder (inductor): 1.79x the eager ViT-H encoder on an H200
    # in bf16, after a compilation of about a minute (benchmarks/results/run_all_h200_run4.json).
    sam_compile: bool = False


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "mvtec"
    data_root: str | None = None  # None = data/<dataset>
    workdir: str | None = None  # None = runs/<dataset>
    seed: int = 0
    checkpoint_every_steps: int = 200
    max_to_keep: int = 3
    feature_cache: bool = True  # SPEC §3: CLIP features cached on disk in 16-bit
    feature_cache_dir: str | None = None  # None = <workdir>/../feature_cache (shared by runs)
    mosaic: bool = False  # APRIL-GAN mosaic augmentation (bypasses the cache)
    max_steps: int | None = None  # stop early (tests, smoke runs)
    clip: ClipConfig = field(default_factory=ClipConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass(frozen=True)
class EvalConfig:
    dataset: str = "visa"
    data_root: str | None = None  # None = data/<dataset>
    checkpoint: str | None = None  # None = runs/<the other dataset>
    output: str | None = None  # None = results/<dataset>
    classes: tuple[str, ...] | None = None
    no_umci: bool = False  # Table 2 "w/o UMCI": zero-shot similarity map, MMR still on
    pro_mode: Literal["mvtec", "cflow"] = "mvtec"  # SPEC §5
    # "exact": per-class metrics over all pixels (memory: the largest class's maps);
    # "streaming": binned, APPROXIMATE pixel metrics in constant memory (huge classes).
    metrics: Literal["exact", "streaming"] = "exact"
    # Exact metrics of a class (host threads) while the next class's maps are computed, so the
    # accelerator does not wait for them; memory: two classes' maps at once. auto = on when JAX
    # runs on an accelerator (on CPU both compete for the same cores).
    overlap_classes: Literal["auto", "on", "off"] = "auto"
    save_maps: bool = False
    visualize_per_class: int = 4
    batch_size: int = 8
    seed: int = 0
    clip: ClipConfig = field(default_factory=ClipConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Inverse of `to_dict`: rebuild a nested config dataclass, tuples restored.

    Unknown keys raise `ValueError` naming them (a config from a newer or another version).
    """
    kwargs = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
    for name, value in values.items():
        default = getattr(cls(), name) if _has_default(fields[name]) else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = from_dict(type(default), value)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys (dotted) whose values differ between two `to_dict` results, as readable lines."""
    lines = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            lines += diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            lines.append(f"{prefix}{key}: {va!r} != {vb!r}")
    return lines
