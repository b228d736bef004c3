"""The pure, jitted training step of the head: `train_step(state, batch) -> (state, metrics)`."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from clipsam_jax.config import HeadConfig, LossConfig, OptimConfig
from clipsam_jax.losses import total_loss
from clipsam_jax.models.heads import build_head


class TrainState(struct.PyTreeNode):
    """Trainable head params, their AdamW state and the global step (frozen CLIP not included)."""

    step: jax.Array
    params: Any
    opt_state: Any


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    """AdamW with the paper's settings (Sec. 4.1); weight decay passed explicitly (docs/method.md §3)."""
    return optax.adamw(
        config.learning_rate, b1=config.b1, b2=config.b2, eps=1e-8,
        weight_decay=config.weight_decay,
    )  # fmt: skip


def create_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    params = jax.tree.map(jnp.asarray, params)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
    )


def make_train_step(
    head: nn.Module,
    loss_config: LossConfig,
    optimizer: optax.GradientTransformation,
    align_corners: bool = False,
):
    """A jitted `train_step(state, batch) -> (state, metrics)`.

    batch: {"tokens": tuple of (B, H, W, C) (float16 from the cache is fine), "text": (B, 2, C_t),
    "masks": bool (B, S, S), optionally "weights": float32 (B,), 0 for the rows that only pad
    the batch to the device count}. The batch may be sharded over a mesh (data parallelism):
    the loss is the mean over the whole batch, so the compiler averages the gradients across
    devices and processes. metrics: scalar "loss", "grad_norm" and per-stage focal/dice.
    The caller checks that the loss is finite (the step itself stays pure).
    """

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        def loss_fn(params):
            tokens = tuple(t.astype(jnp.float32) for t in batch["tokens"])
            logits = head.apply({"params": params}, tokens, batch["text"])
            return total_loss(logits, batch["masks"], loss_config, align_corners,
                              batch.get("weights"))  # fmt: skip

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **parts}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(train_step, donate_argnums=0)


@functools.lru_cache(maxsize=8)
def train_step_for(
    head_config: HeadConfig, text_dim: int, num_stages: int, loss_config: LossConfig,
    optim_config: OptimConfig, conv_impl: str = "auto",
):  # fmt: skip
    """(head, optimizer, jitted train step) for these configs, memoized: runs of one process
    with equal configs (tests, sweeps) reuse the traced and compiled step."""
    head = build_head(head_config, text_dim, num_stages, conv_impl=conv_impl)
    optimizer = make_optimizer(optim_config)
    return head, optimizer, make_train_step(head, loss_config, optimizer, head_config.align_corners)
