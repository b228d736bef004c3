"""Head params between Flax and PyTorch: the Flax tree ↔ the `clipsam_jax.torch_ref` state dict.

Both sides use the same module names (docs/method.md §2 contract), so the map is a rename of the stage
prefix (`stage_i` ↔ `stages.i`) and layout transposes: Dense kernel (in, out) ↔ Linear weight
(out, in); Conv kernel (k, in, out) ↔ Conv1d (out, in, k); (kh, kw, in, out) ↔ Conv2d
(out, in, kh, kw). Numpy in, numpy out; exact (no arithmetic).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from clipsam_jax.errors import CheckpointError

_STAGE = re.compile(r"^stage_(\d+)$")


def _to_torch_layout(kernel: np.ndarray) -> np.ndarray:
    if kernel.ndim == 2:
        return kernel.T
    if kernel.ndim == 3:
        return kernel.transpose(2, 1, 0)
    if kernel.ndim == 4:
        return kernel.transpose(3, 2, 0, 1)
    raise ValueError(f"unexpected kernel rank {kernel.ndim}")


def _to_flax_layout(weight: np.ndarray) -> np.ndarray:
    if weight.ndim == 2:
        return weight.T
    if weight.ndim == 3:
        return weight.transpose(2, 1, 0)
    if weight.ndim == 4:
        return weight.transpose(2, 3, 1, 0)
    raise ValueError(f"unexpected weight rank {weight.ndim}")


def flax_to_torch(params: Mapping) -> dict[str, np.ndarray]:
    """Flax head params (as `head.init(...)["params"]`) → torch state dict (numpy arrays)."""
    out = {}
    for path, value in flatten_dict(dict(params)).items():
        match = _STAGE.match(path[0])
        if match is None:
            raise CheckpointError(f"unexpected head param {'/'.join(path)} (no stage_i prefix)")
        value = np.asarray(value, np.float32)
        leaf = path[-1]
        if leaf == "kernel":
            value, leaf = _to_torch_layout(value), "weight"
        elif leaf != "bias":
            raise CheckpointError(f"unexpected head param {'/'.join(path)}")
        key = ".".join(("stages", match.group(1), *path[1:-1], leaf))
        out[key] = np.ascontiguousarray(value)
    return out


def torch_to_flax(state_dict: Mapping[str, np.ndarray], expected: Mapping | None = None) -> dict:
    """Torch head state dict → Flax params tree. With `expected` (a Flax params tree or its
    shapes), every key must be present with its shape, else `CheckpointError` names it."""
    flat = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if len(parts) < 3 or parts[0] != "stages" or not parts[1].isdigit():
            raise CheckpointError(f"unexpected key {key!r} in a head state dict (want stages.i.*)")
        value = np.asarray(value, np.float32)
        leaf = parts[-1]
        if leaf == "weight":
            value, leaf = _to_flax_layout(value), "kernel"
        elif leaf != "bias":
            raise CheckpointError(f"unexpected key {key!r} in a head state dict")
        flat[(f"stage_{parts[1]}", *parts[2:-1], leaf)] = np.ascontiguousarray(value)
    if expected is not None:
        want = {k: tuple(np.shape(v)) for k, v in flatten_dict(dict(expected)).items()}
        missing = sorted("/".join(k) for k in set(want) - set(flat))
        extra = sorted("/".join(k) for k in set(flat) - set(want))
        wrong = [
            f"{'/'.join(k)} {flat[k].shape} != {want[k]}"
            for k in sorted(set(want) & set(flat))
            if flat[k].shape != want[k]
        ]
        if missing or extra or wrong:
            raise CheckpointError(
                "head state dict does not match the head config: "
                + "; ".join(
                    [f"missing {k}" for k in missing[:5]]
                    + [f"unexpected {k}" for k in extra[:5]]
                    + [f"shape {w}" for w in wrong[:5]]
                )
            )
    return unflatten_dict(flat)
