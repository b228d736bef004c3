"""OpenAI / open_clip CLIP checkpoints: architecture, expected key shapes, and the explicit key
map to Hugging Face PyTorch CLIP names.

The OpenAI layout (`clip/model.py`, also open_clip's `CLIP` with the default text tower) holds
one fused `attn.in_proj_weight` per block ((3W, W), rows q, k, v) and the two projections as
matrices used as `x @ proj` ((width, embed)). Hugging Face keeps q, k, v apart and stores the
projections as `nn.Linear` weights ((embed, width)), hence the split and the transposes here.
After this map, `clipsam_jax.clip.weights.torch_to_flax` does the HF → Flax step.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import numpy as np

from clipsam_jax.errors import CheckpointError

# Keys some checkpoints carry that are not weights. Each is dropped, for the reason given.
IGNORED_KEYS = {
    # OpenAI's TorchScript archives store these model attributes as tensors; OpenAI's own
    # `build_model` deletes them before `load_state_dict`. The architecture is inferred from
    # the weight shapes instead (context length: `positional_embedding`; vocabulary:
    # `token_embedding.weight`; resolution: `visual.positional_embedding` × patch size).
    "input_resolution": "OpenAI TorchScript attribute (inferred from weight shapes instead)",
    "context_length": "OpenAI TorchScript attribute (inferred from positional_embedding)",
    "vocab_size": "OpenAI TorchScript attribute (inferred from token_embedding.weight)",
    # open_clip's causal text mask: a non-persistent buffer that TorchScript archives (and some
    # old open_clip checkpoints) still carry. HF CLIP builds the same mask itself; its value is
    # checked by `check_attn_mask`.
    "attn_mask": "causal text-attention mask buffer (HF CLIP builds the same mask)",
}

# Keys that identify a ModifiedResNet visual tower (RN50, RN101, RN50x4, ...).
_RESNET_MARKERS = ("visual.layer1.", "visual.attnpool.", "visual.conv2.", "visual.bn1.")


@dataclasses.dataclass(frozen=True)
class ClipArch:
    """A ViT CLIP architecture: everything the config needs; shapes follow from it."""

    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int  # hidden width of the vision MLP (c_fc rows)
    text_width: int
    text_layers: int
    text_heads: int
    text_mlp: int
    context_length: int
    vocab_size: int
    embed_dim: int  # joint embedding width (projection_dim)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def describe(self) -> str:
        return (
            f"ViT {self.vision_layers}×{self.vision_width} (heads {self.vision_heads}, "
            f"patch {self.patch_size}, image {self.image_size}), text {self.text_layers}×"
            f"{self.text_width} (heads {self.text_heads}), embed {self.embed_dim}"
        )


def _arch(image, patch, vw, vl, vh, tw, tl, th, embed, vmlp=None) -> ClipArch:
    return ClipArch(image, patch, vw, vl, vh, vmlp or 4 * vw, tw, tl, th, 4 * tw, 77, 49408, embed)


# Released architectures (OpenAI's, and open_clip's larger ones: their head widths are not 64,
# so head counts cannot come from OpenAI's `width // 64` rule). Numbers from open_clip's model
# configs; names as OpenAI writes them, with "-" accepted for "/".
KNOWN_ARCHS = {
    "ViT-B/32": _arch(224, 32, 768, 12, 12, 512, 12, 8, 512),
    "ViT-B/16": _arch(224, 16, 768, 12, 12, 512, 12, 8, 512),
    "ViT-L/14": _arch(224, 14, 1024, 24, 16, 768, 12, 12, 768),
    "ViT-L/14-336": _arch(336, 14, 1024, 24, 16, 768, 12, 12, 768),
    "ViT-H/14": _arch(224, 14, 1280, 32, 16, 1024, 24, 16, 1024),
    "ViT-g/14": _arch(224, 14, 1408, 40, 16, 1024, 24, 16, 1024, vmlp=6144),
    "ViT-bigG/14": _arch(224, 14, 1664, 48, 16, 1280, 32, 20, 1280, vmlp=8192),
}


def known_arch(name: str) -> ClipArch:
    """`KNOWN_ARCHS` entry for a name such as "ViT-L/14-336" or open_clip's "ViT-L-14-336"."""
    wanted = name.replace("/", "-").lower()
    for key, arch in KNOWN_ARCHS.items():
        if key.replace("/", "-").lower() == wanted:
            return arch
    raise CheckpointError(f"unknown architecture {name!r}; known: {', '.join(KNOWN_ARCHS)}")


def reject_unsupported(state_dict: Mapping[str, np.ndarray]) -> None:
    """Raise for towers this converter does not map (named by one of their keys)."""
    for key in state_dict:
        if key.startswith(_RESNET_MARKERS):
            raise CheckpointError(
                f"{key!r}: this is a ModifiedResNet visual tower (RN50/RN101/RN50x*); only ViT "
                "CLIP checkpoints can be converted"
            )
        if key.startswith("text."):
            raise CheckpointError(
                f"{key!r}: an open_clip CustomTextCLIP (separate `text.` tower, e.g. an HF or "
                "SigLIP text encoder); only the default OpenAI-style text tower is supported"
            )


def _need(state_dict: Mapping[str, np.ndarray], key: str, ndim: int) -> tuple[int, ...]:
    if key not in state_dict:
        raise CheckpointError(f"missing key {key!r}: not a ViT CLIP checkpoint in OpenAI layout")
    shape = tuple(np.shape(state_dict[key]))
    if len(shape) != ndim:
        raise CheckpointError(f"{key!r} has shape {shape}, expected {ndim} dimensions")
    return shape


def _count_blocks(state_dict: Mapping[str, np.ndarray], prefix: str) -> int:
    """Number of residual blocks = 1 + the largest index under `prefix` (a gap shows up later
    as missing keys)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = [int(m.group(1)) for k in state_dict if (m := pattern.match(k))]
    return max(indices) + 1 if indices else 0


def _heads(width: int, given: int | None, tower: str) -> int:
    if given is not None:
        heads = given
    elif width % 64 == 0:
        heads = width // 64  # OpenAI's rule: 64-wide heads
    else:
        raise CheckpointError(
            f"{tower} width {width} is not a multiple of 64, so the head count cannot be "
            f"inferred; pass --{tower}-heads N"
        )
    if width % heads:
        raise CheckpointError(f"{tower} width {width} is not divisible by {heads} heads")
    return heads


def infer_arch(
    state_dict: Mapping[str, np.ndarray],
    vision_heads: int | None = None,
    text_heads: int | None = None,
) -> ClipArch:
    """The architecture from tensor shapes, as OpenAI's `build_model` infers it.

    Head counts do not show in shapes: given ones win, else a matching `KNOWN_ARCHS` entry's,
    else width // 64 (OpenAI's rule).
    """
    width, _, patch, _ = _need(state_dict, "visual.conv1.weight", 4)
    positions = _need(state_dict, "visual.positional_embedding", 2)[0]
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions:
        raise CheckpointError(
            f"'visual.positional_embedding' has {positions} rows, not 1 + a square grid"
        )
    text_width = _need(state_dict, "ln_final.weight", 1)[0]
    arch = ClipArch(
        image_size=grid * patch,
        patch_size=patch,
        vision_width=width,
        vision_layers=_count_blocks(state_dict, "visual.transformer.resblocks."),
        vision_heads=0,
        vision_mlp=_need(state_dict, "visual.transformer.resblocks.0.mlp.c_fc.weight", 2)[0],
        text_width=text_width,
        text_layers=_count_blocks(state_dict, "transformer.resblocks."),
        text_heads=0,
        text_mlp=_need(state_dict, "transformer.resblocks.0.mlp.c_fc.weight", 2)[0],
        context_length=_need(state_dict, "positional_embedding", 2)[0],
        vocab_size=_need(state_dict, "token_embedding.weight", 2)[0],
        embed_dim=_need(state_dict, "text_projection", 2)[1],
    )
    for known in KNOWN_ARCHS.values():
        if dataclasses.replace(known, vision_heads=0, text_heads=0) == arch:
            vision_heads = vision_heads or known.vision_heads
            text_heads = text_heads or known.text_heads
            break
    return dataclasses.replace(
        arch,
        vision_heads=_heads(width, vision_heads, "vision"),
        text_heads=_heads(text_width, text_heads, "text"),
    )


def _block_shapes(prefix: str, width: int, mlp: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}ln_1.weight": (width,),
        f"{prefix}ln_1.bias": (width,),
        f"{prefix}attn.in_proj_weight": (3 * width, width),
        f"{prefix}attn.in_proj_bias": (3 * width,),
        f"{prefix}attn.out_proj.weight": (width, width),
        f"{prefix}attn.out_proj.bias": (width,),
        f"{prefix}ln_2.weight": (width,),
        f"{prefix}ln_2.bias": (width,),
        f"{prefix}mlp.c_fc.weight": (mlp, width),
        f"{prefix}mlp.c_fc.bias": (mlp,),
        f"{prefix}mlp.c_proj.weight": (width, mlp),
        f"{prefix}mlp.c_proj.bias": (width,),
    }


def expected_shapes(arch: ClipArch) -> dict[str, tuple[int, ...]]:
    """{OpenAI key: shape} of a ViT CLIP of this architecture (visual keys first)."""
    vw, tw = arch.vision_width, arch.text_width
    shapes = {
        "visual.conv1.weight": (vw, 3, arch.patch_size, arch.patch_size),
        "visual.class_embedding": (vw,),
        "visual.positional_embedding": (arch.grid**2 + 1, vw),
        "visual.ln_pre.weight": (vw,),
        "visual.ln_pre.bias": (vw,),
    }
    for i in range(arch.vision_layers):
        shapes |= _block_shapes(f"visual.transformer.resblocks.{i}.", vw, arch.vision_mlp)
    shapes |= {
        "visual.ln_post.weight": (vw,),
        "visual.ln_post.bias": (vw,),
        "visual.proj": (vw, arch.embed_dim),
        "token_embedding.weight": (arch.vocab_size, tw),
        "positional_embedding": (arch.context_length, tw),
    }
    for i in range(arch.text_layers):
        shapes |= _block_shapes(f"transformer.resblocks.{i}.", tw, arch.text_mlp)
    shapes |= {
        "ln_final.weight": (tw,),
        "ln_final.bias": (tw,),
        "text_projection": (tw, arch.embed_dim),
        "logit_scale": (),
    }
    return shapes


def check_keys(
    state_dict: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], what: str
) -> None:
    """Raise naming the keys that are missing, unexpected or of the wrong shape for `what`."""
    problems = [
        f"{key!r} has shape {tuple(np.shape(state_dict[key]))}, {what} expects {shape}"
        for key, shape in expected.items()
        if key in state_dict and tuple(np.shape(state_dict[key])) != shape
    ]
    problems += [
        f"missing key {k!r} {shape}" for k, shape in expected.items() if k not in state_dict
    ]
    problems += [
        f"unexpected key {k!r} {tuple(np.shape(v))}"
        for k, v in state_dict.items()
        if k not in expected
    ]
    if problems:
        more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
        raise CheckpointError(
            f"checkpoint does not match {what}: " + "; ".join(problems[:6]) + more
        )


def check_attn_mask(mask: np.ndarray, context_length: int) -> None:
    """The ignored `attn_mask` must be the causal mask HF CLIP uses (-inf above the diagonal)."""
    mask = np.asarray(mask)
    causal = np.triu(np.full((context_length, context_length), -np.inf, np.float32), 1)
    if mask.shape != causal.shape or not np.array_equal(mask, causal):
        raise CheckpointError(
            f"'attn_mask' of shape {mask.shape} is not the causal {causal.shape} text mask; "
            "a text tower with another mask is not supported"
        )


# OpenAI block key suffix → HF `encoder.layers.{i}.` suffix (fused qkv handled apart).
_BLOCK_MAP = {
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}

# Non-block OpenAI keys → HF keys; the projections are transposed (see module docstring).
_PLAIN_MAP = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: HF's spelling
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED_MAP = {
    "visual.proj": "visual_projection.weight",
    "text_projection": "text_projection.weight",
}
_BLOCK_KEY = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)")


def _map_block_key(key: str, array: np.ndarray) -> dict[str, np.ndarray]:
    """One OpenAI residual-block key → its HF key(s); the fused qkv gives three."""
    match = _BLOCK_KEY.fullmatch(key.replace(".in_proj_", ".in_proj."))
    if match is None:
        raise CheckpointError(f"no Hugging Face name for key {key!r}")
    visual, index, name, leaf = match.groups()
    base = f"{'vision_model' if visual else 'text_model'}.encoder.layers.{index}."
    if name == "attn.in_proj":
        q, k, v = np.split(array, 3, axis=0)  # rows are [q; k; v]
        return {f"{base}self_attn.{p}_proj.{leaf}": x for p, x in zip("qkv", (q, k, v))}
    if name not in _BLOCK_MAP:
        raise CheckpointError(f"no Hugging Face name for key {key!r}")
    return {f"{base}{_BLOCK_MAP[name]}.{leaf}": array}


def openai_to_hf(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """OpenAI-layout CLIP weights (ignored keys removed) → HF PyTorch CLIP names and layouts.

    Every key must map; an unknown one raises `CheckpointError` naming it.
    """
    out: dict[str, np.ndarray] = {}
    for key, array in state_dict.items():
        array = np.asarray(array, np.float32)
        if key in _PLAIN_MAP:
            out[_PLAIN_MAP[key]] = array
        elif key in _TRANSPOSED_MAP:
            out[_TRANSPOSED_MAP[key]] = np.ascontiguousarray(array.T)  # x @ P == Linear(P.T)
        else:
            out.update(_map_block_key(key, array))
    return out
