"""Head parameter initialization without tracing the forward pass.

`head.init` runs the whole forward pass, which XLA on CPU takes tens of seconds to compile for
four UMCI stages, so the params are drawn here in numpy from the param shapes alone
(`HeadConfig.init`, `--init`):

- "pytorch" (default): PyTorch's layer defaults, as the authors' code base would have.
  Dense / Conv kernels and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in =
  prod(kernel.shape[:-1]) (in_features x kernel area: nn.Linear, nn.Conv1d, nn.Conv2d, whose
  kaiming_uniform(a=sqrt(5)) has that bound). GRU cells as nn.GRU / nn.GRUCell: every weight and
  bias ~ U(-1/sqrt(hidden), 1/sqrt(hidden)). Flax's GRUCell holds the biases of
  torch's equations as follows: `ir/bias` = b_ir + b_hr and `iz/bias` = b_iz + b_hz (inside
  sigmoid(x W_i + h W_h + b) the two biases only appear as their sum, so each is drawn as the sum
  of two independent uniforms, a triangular distribution on ±2/sqrt(hidden)); `in/bias` = b_in
  and `hn/bias` = b_hn (b_hn sits inside r * (h W_hn + b_hn), so it stays separate); `hr`, `hz`
  have no bias.
- "flax": Flax's defaults for the layers the heads use: LeCun-normal (truncated) kernels, zero
  biases, orthogonal recurrent GRU kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import flax.linen as nn
import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

InitKind = Literal["pytorch", "flax"]
INIT_KINDS = ("pytorch", "flax")
_GRU_GATES = frozenset(("ir", "iz", "in", "hr", "hz", "hn"))  # Flax GRUCell's Dense layers
_RECURRENT = ("hr", "hz", "hn")  # GRUCell's hidden-side Dense layers (orthogonal init in Flax)
_FOLDED = ("ir", "iz")  # their bias is b_i* + b_h* of torch's GRU (no hr / hz bias in Flax)
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


def _gru_cells(paths) -> set[tuple[str, ...]]:
    """Paths of the GRU cells: modules whose children are exactly Flax GRUCell's six Dense."""
    children: dict[tuple[str, ...], set[str]] = {}
    for path in paths:
        if len(path) >= 3:
            children.setdefault(path[:-2], set()).add(path[-2])
    return {parent for parent, names in children.items() if names == _GRU_GATES}


def _flax_param(rng: np.random.Generator, path: tuple[str, ...], shape: tuple[int, ...]):
    if path[-1] == "bias":
        return np.zeros(shape, np.float32)
    if path[-1] == "kernel" and len(path) > 1 and path[-2] in _RECURRENT:
        return _orthogonal(rng, shape)
    if path[-1] == "kernel":
        fan_in = int(np.prod(shape[:-1]))
        std = np.sqrt(1.0 / fan_in) / _TRUNCATED_STD
        return std * _truncated_normal(rng, shape)
    raise ValueError(f"no initializer for head param {'/'.join(path)}")


def _pytorch_param(
    rng: np.random.Generator, path: tuple[str, ...], shape: tuple[int, ...], in_gru: bool,
    kernel_shape: tuple[int, ...],
) -> np.ndarray:  # fmt: skip
    if path[-1] not in ("kernel", "bias"):
        raise ValueError(f"no initializer for head param {'/'.join(path)}")
    if in_gru:  # nn.GRU: U(±1/sqrt(hidden)) for every weight and bias
        bound = 1.0 / np.sqrt(kernel_shape[-1])
        if path[-1] == "bias" and path[-2] in _FOLDED:
            return rng.uniform(-bound, bound, shape) + rng.uniform(-bound, bound, shape)
        return rng.uniform(-bound, bound, shape)
    bound = 1.0 / np.sqrt(int(np.prod(kernel_shape[:-1])))  # nn.Linear / nn.Conv*: 1/sqrt(fan_in)
    return rng.uniform(-bound, bound, shape)


def init_params(
    head: nn.Module, seed: int, token_shapes: Sequence[tuple[int, ...]],
    text_shape: tuple[int, ...], init: InitKind = "pytorch",
) -> dict:  # fmt: skip
    """Float32 params for `head` given its input shapes ((B, H, W, C) per stage, (B, 2, C_t)),
    drawn from `init`'s distributions (module docstring; `HeadConfig.init`)."""
    if init not in INIT_KINDS:
        raise ValueError(f"unknown head init {init!r}; choose one of {', '.join(INIT_KINDS)}")
    tokens = [jax.ShapeDtypeStruct(tuple(s), np.float32) for s in token_shapes]
    text = jax.ShapeDtypeStruct(tuple(text_shape), np.float32)
    shapes = flatten_dict(jax.eval_shape(head.init, jax.random.PRNGKey(0), tokens, text)["params"])
    gru_cells = _gru_cells(shapes)
    rng = np.random.default_rng(seed)
    params = {}
    for path, leaf in sorted(shapes.items()):
        shape = tuple(leaf.shape)
        if init == "flax":
            value = _flax_param(rng, path, shape)
        else:
            kernel = shapes.get((*path[:-1], "kernel"))
            if kernel is None:
                raise ValueError(f"no kernel next to head param {'/'.join(path)} for its fan-in")
            in_gru = len(path) >= 3 and path[:-2] in gru_cells
            value = _pytorch_param(rng, path, shape, in_gru, tuple(kernel.shape))
        params[path] = np.asarray(value, np.float32)
    return unflatten_dict(params)
