"""Small building blocks of the heads: convolutions with a selectable formulation, attention,
L2 normalization and the resizes the UMCI equations use.

Convolutions keep Flax's `nn.Conv` parameter layout (kernel (kh, kw, in, out), bias (out,)) for
every formulation, so checkpoints do not depend on the formulation chosen.
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

ConvImpl = Literal["auto", "xla", "matmul", "im2col"]


def resolve_conv_impl(impl: ConvImpl) -> str:
    """ "auto": shifted matmuls on CPU, where XLA's convolutions are slow (see
    benchmarks/train_step.py), and cuDNN convolutions through `lax.conv` elsewhere."""
    if impl == "auto":
        return "matmul" if jax.default_backend() == "cpu" else "xla"
    return impl


def _shifted_views(x: jax.Array, size: int) -> list[jax.Array]:
    """The size×size neighbourhood of every pixel of (B, H, W, C) with zero 'same' padding, as
    size² shifted views (row-major over the kernel)."""
    pad = size // 2
    height, width = x.shape[1], x.shape[2]
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return [
        padded[:, dy : dy + height, dx : dx + width] for dy in range(size) for dx in range(size)
    ]


def _shifted_matmuls_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
    size, in_features, features = kernel.shape[0], kernel.shape[2], kernel.shape[3]
    taps = kernel.reshape(size * size, in_features, features)
    return sum(view @ taps[i] for i, view in enumerate(_shifted_views(x, size)))


@jax.custom_vjp
def shifted_matmuls(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A k×k 'same' convolution as Σ_k view_k @ W_k over the k² shifted views of x.

    x (B, H, W, C_in), kernel (k, k, C_in, C_out) → (B, H, W, C_out), no bias. Its gradient
    with respect to x is the transposed convolution, computed the same way on the output
    gradient with the kernel flipped in space and transposed in channels: k² matmuls of C_out
    channels into one C_in accumulator, where differentiating the sum forms k² padded C_in-wide
    products and adds them. Skipping those wide intermediates makes the UMCI training step on
    CPU faster (benchmarks/train_step.py; benchmarks/RESULTS.md)."""
    return _shifted_matmuls_forward(x, kernel)


def _shifted_matmuls_fwd(x, kernel):
    return _shifted_matmuls_forward(x, kernel), (x, kernel)


def _shifted_matmuls_bwd(residuals, grad):
    x, kernel = residuals
    size = kernel.shape[0]
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)  # (k, k, C_out, C_in)
    grad_x = _shifted_matmuls_forward(grad, flipped)
    grad_kernel = jnp.stack(
        [jnp.einsum("bhwi,bhwo->io", view, grad) for view in _shifted_views(x, size)]
    ).reshape(kernel.shape)
    return grad_x, grad_kernel


shifted_matmuls.defvjp(_shifted_matmuls_fwd, _shifted_matmuls_bwd)


class Conv2D(nn.Module):
    """A k×k convolution, stride 1, zero 'same' padding: (B, H, W, C_in) → (B, H, W, features).

    `impl`: "xla" (`lax.conv_general_dilated`), "matmul" (k² shifted matmuls, accumulated,
    with the transposed convolution as its backward pass: `shifted_matmuls`), "im2col" (one
    matmul over the concatenated shifted views). Same function, same params.
    """

    features: int
    kernel_size: int = 3
    impl: ConvImpl = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        size, in_features = self.kernel_size, x.shape[-1]
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (size, size, in_features, self.features),
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        kernel = kernel.astype(x.dtype)
        impl = resolve_conv_impl(self.impl)
        if impl == "xla":
            y = jax.lax.conv_general_dilated(
                x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        elif impl == "matmul":
            y = shifted_matmuls(x, kernel)
        elif impl == "im2col":
            patches = jnp.concatenate(_shifted_views(x, size), axis=-1)
            y = patches @ kernel.reshape(size * size * in_features, self.features)
        else:
            raise ValueError(f"unknown conv impl {impl!r}")
        return y + bias.astype(x.dtype)


class Conv1D(nn.Module):
    """A k-tap convolution along the sequence axis with zero 'same' padding:
    (B, L, C_in) → (B, L, features). Params as `nn.Conv` with kernel_size (k,)."""

    features: int
    kernel_size: int = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        size, in_features = self.kernel_size, x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (size, in_features, self.features)
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        pad, length = size // 2, x.shape[1]
        padded = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)))
        kernel = kernel.astype(x.dtype)
        y = sum(padded[:, i : i + length] @ kernel[i] for i in range(size))
        return y + bias.astype(x.dtype)


def attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
    """Scaled dot-product attention, single head, no projections (Eq. 13).

    query (B, Nq, d), key (B, Nk, d), value (B, Nk, d_v) → (B, Nq, d_v).
    """
    scores = jnp.einsum("bqd,bkd->bqk", query, key) / jnp.sqrt(query.shape[-1]).astype(query.dtype)
    return jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(scores, axis=-1), value)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) over the last axis (PyTorch's F.normalize)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def average_pool(x: jax.Array, size: int) -> jax.Array:
    """Non-overlapping size×size mean pooling, stride = size, no padding, floor:
    (B, H, W, C) → (B, H // size, W // size, C); trailing rows/columns are dropped (37 → 12)."""
    batch, height, width, channels = x.shape
    rows, cols = height // size, width // size
    x = x[:, : rows * size, : cols * size]
    return x.reshape(batch, rows, size, cols, size, channels).mean(axis=(2, 4))


def resize_bilinear(
    x: jax.Array, height: int, width: int, align_corners: bool = False
) -> jax.Array:
    """Bilinear resize of (B, h, w, C) to (B, height, width, C).

    Half-pixel centres by default, i.e. PyTorch's `interpolate(mode="bilinear",
    align_corners=False)` when enlarging; `align_corners=True` maps the corner pixels onto each
    other as PyTorch's `align_corners=True` (APRIL-GAN's upsampling).
    """
    if x.shape[1:3] == (height, width):
        return x
    shape = (x.shape[0], height, width, x.shape[3])
    if not align_corners:
        return jax.image.resize(x, shape, method="bilinear")
    # Output index o samples input index o·(in-1)/(out-1): in scale_and_translate's half-pixel
    # convention that is scale (out-1)/(in-1) and translation (1 - scale)/2.
    scales, shifts = [], []
    for size_in, size_out in zip(x.shape[1:3], (height, width)):
        scale = (size_out - 1) / (size_in - 1) if size_in > 1 and size_out > 1 else float(size_out)
        scales.append(scale)
        shifts.append(0.5 * (1.0 - scale) if size_in > 1 and size_out > 1 else 0.0)
    return jax.image.scale_and_translate(
        x, shape, (1, 2), jnp.array(scales, x.dtype), jnp.array(shifts, x.dtype),
        method="linear", antialias=False,
    )  # fmt: skip
