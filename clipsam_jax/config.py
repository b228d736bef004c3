"""Typed configuration for ClipSAM: every option declared once, with its flag.

Each field carries its default, help, choices and valid range (`options.option`); the flags of
the commands derive from the fields. Paper values cite their section, equation or table; a
"choice" is a default the paper leaves open, explained in docs/method.md's Choices tables.
The method configs are checkpointed and compared on resume; `RuntimeConfig` (speed and
placement only) is neither. Configs are frozen: build a variant with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from clipsam_jax.options import option

DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"  # Sec. 4.1: OpenAI ViT-L/14-336
DATASETS = ("mvtec", "visa", "mtd", "ksdd2", "meta")


@dataclass(frozen=True)
class ClipConfig:
    """Frozen CLIP backbone (docs/method.md §1)."""

    model: str = option(DEFAULT_CLIP, "CLIP hub id or local directory (PyTorch or Flax)",
                        flag="--clip")  # fmt: skip
    image_size: int = option(518, "input size S, a multiple of the patch size (choice: 518 = "
                             "APRIL-GAN's protocol, grid 37; 336 native)", minimum=1)  # fmt: skip
    feature_layers: tuple[int, ...] | None = option(
        None, "encoder layers feeding the head (default: the quarter points, 6,12,18,24 for "
        "ViT-L, Sec. 4.1)", minimum=1)  # fmt: skip
    templates: Literal["clipsam29", "aprilgan35"] = option(
        "clipsam29", "prompt templates: Fig. 7c's 29 or APRIL-GAN's 35")  # fmt: skip
    object_name: Literal["as_written", "spaced", "object"] = option(
        "as_written", "object word in the prompts (Fig. 7d writes `metal_nut`)")  # fmt: skip
    prompt_normalization: Literal["sentence_and_mean", "mean"] = option(
        "sentence_and_mean", "normalize each sentence embedding, average per state and "
        "normalize (choice, as WinCLIP), or normalize the mean only")  # fmt: skip
    dtype: Literal["float32", "bfloat16", "auto"] = option(
        "auto", "CLIP compute dtype (auto: bf16 on accelerators, fp32 on CPU)"
    )
    head_dtype: Literal["float32", "clip"] = option(
        "float32", "the trained head's compute dtype at evaluation and prediction: float32, as "
        "it is trained (choice), or CLIP's dtype (bf16 on accelerators)")  # fmt: skip


@dataclass(frozen=True)
class HeadConfig:
    """Trainable head (docs/method.md §2): ClipSAM's UMCI or the APRIL-GAN baseline."""

    kind: Literal["umci", "aprilgan"] = option("umci", "head architecture", flag="--head")
    hidden_dim: int = option(384, "c_h (Table 3)", minimum=1)
    pool_sizes: tuple[int, ...] = option((3, 9), "s1,s2: scale-path pools (Table 3)", minimum=1)
    paths: Literal["both", "strip", "scale"] = option("both", "UMCI paths (Table 2 ablations)")
    gru_reading: Literal["carry", "sequence"] = option(
        "carry", "Eq. 14's GRU: carry t1, attended tokens as input (choice), or a sequence "
        "from a zero state")  # fmt: skip
    shared_projection: bool = option(
        True, "one Linear per path instead of one shared P-hat (choice: shared)",
        flag="--separate-projections", inverted=True)  # fmt: skip
    strip_kernel: int = option(
        3, "strip conv kernel along the strip axis (Eq. 1; choice: 3 mixes neighbouring "
        "strips, 1 is the literal 1x3 on a one-wide strip)", minimum=1, odd=True)  # fmt: skip
    align_corners: bool = option(
        False, "bilinear resizes with align_corners=True (APRIL-GAN's) instead of half-pixel "
        "centres (choice)")  # fmt: skip
    stage_average: Literal["probabilities", "logits"] = option(
        "probabilities", "rough map O (Eq. 6): mean of the stages' probabilities (choice: "
        "stays in [0, 1] for the threshold) or softmax of the mean logits")  # fmt: skip
    init: Literal["pytorch", "flax"] = option(
        "pytorch", "initial distribution of the head's parameters (choice: PyTorch's layer "
        "defaults, as the authors' code base would have; flax: LeCun-normal kernels, zero "
        "biases, orthogonal GRU kernels)")  # fmt: skip


@dataclass(frozen=True)
class LossConfig:
    """Objective (Sec. 3.4, docs/method.md §3)."""

    focal_gamma: float = option(2.0, "focal loss gamma (Eq. 10)", minimum=0.0)
    dice_smooth: float = option(1.0, "soft dice smoothing (Eq. 11, squared sums)", minimum=0.0)
    stage_weights: tuple[float, ...] = option(
        (0.1, 0.1, 0.1, 0.7), "loss weight of each stage, lambda_i (Eq. 12)", minimum=0
    )
    resolution: Literal["image", "grid"] = option(
        "image", "loss on the stage logits upsampled to SxS (choice) or on the token grid",
        flag="--loss-resolution")  # fmt: skip


@dataclass(frozen=True)
class OptimConfig:
    """AdamW (Sec. 4.1)."""

    learning_rate: float = option(1e-4, "AdamW learning rate (Sec. 4.1)", flag="--lr", minimum=0.0)
    b1: float = option(0.9, "AdamW beta1 (Sec. 4.1)", flag="--beta1", minimum=0.0, maximum=1.0)
    b2: float = option(0.999, "AdamW beta2 (Sec. 4.1)", flag="--beta2", minimum=0.0, maximum=1.0)
    weight_decay: float = option(
        0.01, "AdamW weight decay (choice: PyTorch's default)", minimum=0.0)  # fmt: skip
    batch_size: int = option(8, "training batch size (Sec. 4.1)", minimum=1)
    epochs: int = option(6, "training epochs (Sec. 4.1)", minimum=1)


def _refiner_names() -> tuple[str, ...]:
    from clipsam_jax.refine.registry import refiner_names  # the registry imports this module

    return refiner_names()


@dataclass(frozen=True)
class RefineConfig:
    """MMR with SAM (Sec. 3.3, docs/method.md §4)."""

    sam: str = option("vit_h", "MMR's refiner (Sec. 4.1: SAM ViT-H); none = rough maps only",
                      choices=_refiner_names)  # fmt: skip
    sam_checkpoint: str | None = option(None, "SAM weights file, e.g. sam_vit_h_4b8939.pth")
    download_sam: bool = option(False, "fetch the official SAM checkpoint (hash prefix verified)")
    threshold: float = option(0.47, "rough-map binarization (Table 3)", minimum=0.0, maximum=1.0)
    points: int = option(
        5, "m random anomalous points per image (choice; 0: boxes only)", minimum=0
    )
    point_sampling: Literal["shared", "per_component"] = option(
        "shared", "points shared by every box (choice), or drawn in each box's component"
    )
    connectivity: Literal[4, 8] = option(8, "connected components of the binarized map (choice)")
    fusion_norm: Literal["max", "minmax", "none"] = option("max", "Norm of Eq. 9 (choice)")
    multimask: bool = option(True, "one SAM mask per box instead of three (Sec. 3.3: three)",
                             flag="--single-mask", inverted=True)  # fmt: skip
    sam_dtype: Literal["fp32", "fp16", "bf16", "auto"] = option(
        "fp32", "SAM autocast on CUDA (auto: bf16 where supported; fp32 keeps results "
        "independent of the device)")  # fmt: skip


@dataclass(frozen=True)
class FewShotConfig:
    """Few-shot mode (not the paper's; docs/method.md §5.4): k normal reference images per class,
    whose CLIP patch features are a memory bank; a test patch far from all of them is
    anomalous. The nearest-neighbour map joins the rough map before MMR, as APRIL-GAN's
    few-shot mode joins its zero-shot map."""

    shots: int = option(0, "k normal reference images per class (0: zero-shot, the paper's "
                        "setting); drawn from the dataset's normal training images by --seed",
                        minimum=0)  # fmt: skip
    weight: float = option(
        0.5, "w in O = (1-w)·O_rough + w·O_few-shot (0.5: APRIL-GAN's equal sum of the two "
        "maps, halved to stay on the rough map's scale)", flag="--few-shot-weight",
        minimum=0.0, maximum=1.0)  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = option("mvtec", "dataset whose test split trains the head", flag="--train",
                          choices=DATASETS)  # fmt: skip
    data_root: str | None = option(None, "dataset folder (default data/<dataset>)")
    workdir: str | None = option(None, "run folder (default runs/<dataset>)")
    seed: int = option(0, "seed of the head's initialization and the data order")
    checkpoint_every_steps: int = option(200, "steps between checkpoints (and at epoch ends)",
                                         flag="--checkpoint-every", minimum=1)  # fmt: skip
    max_to_keep: int = option(3, "checkpoints kept", minimum=1)
    feature_cache: bool = option(True, "recompute CLIP features each epoch, not cache them in "
                                 "16-bit", flag="--no-feature-cache", inverted=True)  # fmt: skip
    feature_cache_dir: str | None = option(
        None, "feature cache (default <workdir>/../feature_cache)", flag="--feature-cache"
    )
    mosaic: bool = option(False, "APRIL-GAN mosaic augmentation (bypasses the feature cache)")
    max_steps: int | None = option(
        None, "stop after this many steps (smoke runs; 0 saves the untrained head)", minimum=0
    )
    clip: ClipConfig = field(default_factory=ClipConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass(frozen=True)
class EvalConfig:
    dataset: str = option("visa", "dataset to evaluate (its protocol split)", flag="--test",
                          choices=DATASETS)  # fmt: skip
    data_root: str | None = option(None, "dataset folder (default data/<dataset>)")
    checkpoint: str | None = option(None, "the head's training workdir (default runs/<the "
                                    "other dataset>)")  # fmt: skip
    output: str | None = option(None, "results folder (default results/<dataset>)")
    classes: tuple[str, ...] | None = option(None, "comma-separated subset of classes")
    no_umci: bool = option(False, "zero-shot map instead of a trained head (Table 2), MMR on")
    pro_mode: Literal["mvtec", "cflow"] = option(
        "mvtec", "PRO definition (cflow: APRIL-GAN/AnomalyCLIP's cal_pro_score)", flag="--pro"
    )
    metrics: Literal["exact", "streaming"] = option(
        "exact", "exact: over all pixels (memory: the largest class's maps); streaming: binned "
        "APPROXIMATE pixel metrics in constant memory")  # fmt: skip
    save_maps: bool = option(False, "write maps/<class>.npz")
    visualize_per_class: int = option(4, "panels per class", flag="--panels", minimum=0)
    batch_size: int = option(8, "images per batch", minimum=1)
    seed: int = option(0, "seed of MMR's point sampling")
    clip: ClipConfig = field(default_factory=ClipConfig)
    # The `clip` fields set explicitly (flags given): with a trained head they replace the
    # head's own CLIP settings, the others come from its checkpoint (`resolve_clip`).
    clip_given: tuple[str, ...] = ()
    refine: RefineConfig = field(default_factory=RefineConfig)
    few_shot: FewShotConfig = field(default_factory=FewShotConfig)


def resolve_clip(
    trained: ClipConfig | None, requested: ClipConfig, given: tuple[str, ...]
) -> ClipConfig:
    """The CLIP settings a run uses: a trained head's (`trained`, from its checkpoint) with the
    fields named in `given` taken from `requested`; `requested` itself without a head."""
    if trained is None:
        return requested
    return dataclasses.replace(trained, **{name: getattr(requested, name) for name in given})


@dataclass(frozen=True)
class RuntimeConfig:
    """How fast and where a run computes, never what it computes: every setting gives the same
    function (up to round-off). Never checkpointed, never compared when a run resumes, never
    part of a cached result's key; each command takes the fields that apply to it."""

    clip_attention: Literal["auto", "reference", "fused", "blocked", "cudnn"] = option(
        "auto", "CLIP vision attention, the same function each way (auto: blocked on CPU, "
        "cuDNN's fused kernel on GPUs in bf16 where it compiles, else reference)")  # fmt: skip
    # "auto": shifted matmuls to train on CPU (XLA's CPU convolution has a slow backward pass),
    # XLA's convolution elsewhere and for forward-only passes (inference.inference_conv_impl).
    conv_impl: Literal["auto", "xla", "matmul"] = option(
        "auto", "head convolution formulation (the same function)", cli=False)  # fmt: skip
    cache_dir: str | None = option(
        None, "cache of converted CLIP params and text features (default ~/.cache/clipsam_jax)"
    )
    overlap_classes: Literal["auto", "on", "off"] = option(
        "auto", "score a class while the next one's maps are made (auto: on accelerators, "
        "where the device would wait; memory: two classes' maps)")  # fmt: skip
    sam_device: str = option("auto", "torch device for SAM (auto: cuda if available)")
    sam_images_per_call: int = option(4, "images per SAM image-encoder call (memory: about "
                                      "1 GiB per ViT-H image in fp32)", minimum=1)  # fmt: skip
    sam_attention: Literal["stock", "sdpa", "flash"] = option(
        "flash", "SAM encoder attention, the same function each way: relative positions folded "
        "into query/key (flash), as SDPA's mask (sdpa), or segment_anything's (stock)")  # fmt: skip
    few_shot_chunk: int = option(4096, "memory-bank rows per step of the few-shot "
                                 "nearest-neighbour search (memory: batch x patches x rows "
                                 "similarities)", minimum=1)  # fmt: skip
    sam_compile: bool = option(False, "torch.compile SAM's image encoder: minutes of "
                               "compilation, then a faster encoder (large sets)")  # fmt: skip
    compilation_cache: str | None = option(
        None, "folder of JAX's persistent compilation cache: a program compiled once is reused "
        "by later runs and processes (default: JAX_COMPILATION_CACHE_DIR if set, else off; "
        "eval.reproduce: else OUTPUT/compilation_cache)")  # fmt: skip


DEFAULT_RUNTIME = RuntimeConfig()

# Fields that configs written before RuntimeConfig existed still carry: `from_dict` drops them.
MOVED_TO_RUNTIME = {
    "ClipConfig": ("attention", "cache_dir"),
    "HeadConfig": ("conv_impl",),
    "RefineConfig": ("device", "sam_images_per_call", "sam_attention", "sam_compile"),
    "EvalConfig": ("overlap_classes",),
}


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def identity(config: Any) -> dict[str, Any]:
    """`to_dict` of a config as it identifies a result (cached evaluations, resumed classes):
    a zero-shot `few_shot` section is left out, so results from before few-shot mode existed
    keep their identity."""
    values = to_dict(config)
    if isinstance(config, EvalConfig) and not config.few_shot.shots:
        del values["few_shot"]
    return values


def from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Inverse of `to_dict`: rebuild a nested config dataclass, tuples restored.

    Unknown keys raise `ValueError` naming them (a config from a newer or another version).
    """
    kwargs = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    moved = MOVED_TO_RUNTIME.get(cls.__name__, ())
    values = {k: v for k, v in values.items() if k not in moved}
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
