"""Hugging Face PyTorch CLIP state dict ↔ Flax CLIP params, with an explicit key map.

Numpy only: reading a `.safetensors` file needs no torch; a `pytorch_model.bin` is read with
torch, imported lazily. Every source key must be used and every target key filled with the
expected shape, else `CheckpointError` names the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from clipsam_jax.errors import CheckpointError

# Buffers some checkpoints carry that are not parameters.
_IGNORED_SOURCE_KEYS = (
    "text_model.embeddings.position_ids",
    "vision_model.embeddings.position_ids",
)


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a `.safetensors` or `.bin`/`.pt` PyTorch state dict → {name: float32 array}."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
        else:
            import torch  # only the pickle format needs torch

            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
            if not isinstance(loaded, Mapping):
                raise CheckpointError(
                    f"{path}: expected a state dict, found {type(loaded).__name__}"
                )
            tensors = {k: v.float().numpy() for k, v in loaded.items() if hasattr(v, "numpy")}
    except CheckpointError:
        raise
    except Exception as error:  # corrupt archive, truncated file, wrong format
        raise CheckpointError(f"{path}: cannot read this checkpoint ({error})") from error
    return {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}


def _flax_key(torch_key: str, array: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """Map one HF PyTorch key to its Flax path and layout."""
    parts = tuple(torch_key.split("."))
    leaf = parts[-1]
    if leaf in ("class_embedding", "logit_scale"):
        return parts, array
    if leaf == "weight":
        name = parts[-2]
        if name.startswith(("layer_norm", "pre_layrnorm", "post_layernorm", "final_layer_norm")):
            return (*parts[:-1], "scale"), array
        if name in ("token_embedding", "position_embedding"):
            return (*parts[:-1], "embedding"), array
        if array.ndim == 4:  # patch-embedding conv: (out, in, kh, kw) → (kh, kw, in, out)
            return (*parts[:-1], "kernel"), array.transpose(2, 3, 1, 0)
        if array.ndim == 2:  # linear: (out, in) → (in, out)
            return (*parts[:-1], "kernel"), array.T
    if leaf == "bias":
        return parts, array
    raise CheckpointError(
        f"unexpected key in CLIP checkpoint: {torch_key!r} with shape {array.shape}"
    )


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray], target_shapes: Mapping[str, object], source: str
) -> dict:
    """Convert a HF PyTorch CLIP state dict to a nested Flax params dict.

    `target_shapes` is the Flax param tree (arrays or `jax.ShapeDtypeStruct`s, e.g. from
    `jax.eval_shape`). Raises `CheckpointError` naming any unused source key, missing target key
    or shape mismatch (e.g. a ViT-B checkpoint given for a ViT-L config).
    """
    expected = {k: tuple(v.shape) for k, v in flatten_dict(dict(target_shapes)).items()}
    converted: dict[tuple[str, ...], np.ndarray] = {}
    unused = []
    for key, array in state_dict.items():
        if key in _IGNORED_SOURCE_KEYS:
            continue
        try:
            flax_key, value = _flax_key(key, array)
        except CheckpointError:
            unused.append(key)
            continue
        if flax_key not in expected:
            unused.append(key)
            continue
        if tuple(value.shape) != expected[flax_key]:
            raise CheckpointError(
                f"{source}: {key!r} has shape {tuple(array.shape)}, the config expects "
                f"{expected[flax_key]} (as {'/'.join(flax_key)}). Is the checkpoint of another "
                "architecture than its config.json says?"
            )
        converted[flax_key] = np.array(value, dtype=np.float32, order="C")  # keeps 0-d shapes
    missing = sorted("/".join(k) for k in set(expected) - set(converted))
    if unused or missing:
        lines = [f"{source}: checkpoint does not match the CLIP architecture of its config."]
        if missing:
            lines.append(f"missing keys ({len(missing)}): {', '.join(missing[:8])}")
        if unused:
            lines.append(f"unexpected keys ({len(unused)}): {', '.join(sorted(unused)[:8])}")
        raise CheckpointError("\n".join(lines))
    return unflatten_dict(converted)


def flax_to_torch(params: Mapping) -> dict[str, np.ndarray]:
    """Inverse of `torch_to_flax`: Flax CLIP params → HF PyTorch key names and layouts (numpy)."""
    out = {}
    for path, value in flatten_dict(dict(params)).items():
        value = np.asarray(value)
        leaf = path[-1]
        if leaf in ("scale", "embedding"):
            path, value = (*path[:-1], "weight"), value
        elif leaf == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
            path = (*path[:-1], "weight")
        out[".".join(path)] = np.array(value, order="C")
    return out
