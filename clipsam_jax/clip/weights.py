"""Hugging Face PyTorch CLIP state dict ↔ Flax CLIP params, with an explicit key map.

Numpy only: reading a `.safetensors` file needs no torch; a `pytorch_model.bin` is read with
torch, imported lazily. Every source key must be used and every target key filled with the
expected shape, else `CheckpointError` names the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from clipsam_jax.errors import CheckpointError

# Buffers some checkpoints carry that are not parameters.
_IGNORED_SOURCE_KEYS = (
    "text_model.embeddings.position_ids",
    "vision_model.embeddings.position_ids",
)


def describe_file(path: str | Path) -> str:
    """What the first bytes of `path` look like, in words, for error messages."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
    except OSError as error:
        return f"no readable file ({error.strerror})"
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (PyTorch's own format), damaged or cut short"
    if head[:1] == b"\x80":
        return "a Python pickle that is damaged or not a checkpoint"
    if head.lstrip()[:5].lower() in (b"<!doc", b"<html"):
        return "an HTML page (a failed download?)"
    if head[8:9] == b"{":
        return "a safetensors file (name it .safetensors)"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "no PyTorch checkpoint format known here"


def torch_load(path: str | Path, what: str, fix: str) -> Any:
    """`torch.load` of a tensors-only pickle (`weights_only`: no code runs), its failures in
    our words: the file, what it seems to be, and `fix` (what to pass instead)."""
    import torch  # only the pickle format needs torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        if "Unsupported global" in str(error):  # a pickle of more than tensors
            raise CheckpointError(
                f"{path}: this {what} holds Python objects besides tensors, which are not "
                "loaded because they could run code. Save the weights alone, e.g. "
                "torch.save(model.state_dict(), 'weights.pth'), and pass that file."
            ) from error
        raise CheckpointError(
            f"{path}: cannot read it as a {what}: it looks like {describe_file(path)}. {fix}"
        ) from error


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a `.safetensors` or `.bin`/`.pt` PyTorch state dict → {name: float32 array}."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
        else:
            loaded = torch_load(path, "CLIP state dict", "Give a Hugging Face CLIP directory, "
                                "or convert the checkpoint with `python -m conversion.clip`.")  # fmt: skip
            if not isinstance(loaded, Mapping):
                raise CheckpointError(
                    f"{path}: expected a state dict, found {type(loaded).__name__}"
                )
            tensors = {k: v.float().numpy() for k, v in loaded.items() if hasattr(v, "numpy")}
    except CheckpointError:
        raise
    except Exception as error:  # a damaged safetensors file
        raise CheckpointError(
            f"{path}: cannot read it as a state dict: it looks like {describe_file(path)}"
        ) from error
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
            flax_key = None
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
        if path[-1] == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        if path[-1] in ("scale", "embedding", "kernel"):
            path = (*path[:-1], "weight")
        out[".".join(path)] = np.array(value, order="C")
    return out
