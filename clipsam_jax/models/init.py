"""Head parameter initialization without tracing the forward pass.

`head.init` runs the whole forward pass, which XLA on CPU takes tens of seconds to compile for
four UMCI stages. The distributions here are Flax's defaults for the layers the heads use:
LeCun-normal (truncated) kernels, zero biases, orthogonal recurrent GRU kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

_RECURRENT = ("hr", "hz", "hn")  # GRUCell's hidden-side Dense layers (orthogonal init in Flax)
_TRUNCATED_STD = 0.87962566103423978  # std of a unit normal truncated to [-2, 2]


def _truncated_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    values = rng.standard_normal(shape)
    outside = np.abs(values) > 2
    while outside.any():
        values[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(values) > 2
    return values


def _orthogonal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    matrix = rng.standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(matrix)
    q *= np.sign(np.diag(r))
    return (q if rows >= cols else q.T).reshape(shape)


def init_params(
    head: nn.Module, seed: int, token_shapes: Sequence[tuple[int, ...]], text_shape: tuple[int, ...]
) -> dict:
    """Float32 params for `head` given its input shapes ((B, H, W, C) per stage, (B, 2, C_t))."""
    tokens = [jax.ShapeDtypeStruct(tuple(s), np.float32) for s in token_shapes]
    text = jax.ShapeDtypeStruct(tuple(text_shape), np.float32)
    shapes = jax.eval_shape(head.init, jax.random.PRNGKey(0), tokens, text)["params"]
    rng = np.random.default_rng(seed)
    params = {}
    for path, leaf in sorted(flatten_dict(shapes).items()):
        shape = tuple(leaf.shape)
        if path[-1] == "bias":
            params[path] = np.zeros(shape, np.float32)
        elif path[-1] == "kernel" and len(path) > 1 and path[-2] in _RECURRENT:
            params[path] = _orthogonal(rng, shape).astype(np.float32)
        elif path[-1] == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            std = np.sqrt(1.0 / fan_in) / _TRUNCATED_STD
            params[path] = (std * _truncated_normal(rng, shape)).astype(np.float32)
        else:
            raise ValueError(f"no initializer for head param {'/'.join(path)}")
    return unflatten_dict(params)
