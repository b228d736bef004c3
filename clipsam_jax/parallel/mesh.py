"""Data parallelism over every device: a 1-D `Mesh` on the batch axis.

Params are replicated, batches split along their first axis (padded to a multiple of the
device count, `pad_to`). On several hosts, `initialize_distributed` joins the processes first
and the mesh spans all hosts' devices.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)
AXIS = "data"


def initialize_distributed() -> bool:
    """Join a multi-host run when the launcher set `JAX_COORDINATOR_ADDRESS` (with
    `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`) or a cluster JAX detects (SLURM, TPU pods).
    Returns whether this is a multi-process run. Must run before any other JAX call."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
    return jax.process_count() > 1


def data_mesh(devices: Sequence[jax.Device] | int | None = None) -> Mesh:
    """A mesh with one axis, "data", over `devices` (default: all devices of all hosts; an int
    takes the first n local devices)."""
    if devices is None:
        devices = jax.devices()
    elif isinstance(devices, int):
        available = jax.local_devices()
        if not 1 <= devices <= len(available):
            raise ValueError(f"asked for {devices} devices, {len(available)} are available")
        devices = available[:devices]
    return Mesh(np.asarray(devices), (AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def pad_to(batch_size: int, mesh: Mesh) -> int:
    """The smallest multiple of the mesh size that holds `batch_size` rows."""
    count = mesh.devices.size
    return -(-batch_size // count) * count


def shard_batch(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """Place a host batch (B, ...) split over the mesh (B must divide evenly; see `pad_to`); on
    several hosts every process holds the same global batch and gives its devices' rows."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(array, sharding)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def replicate(tree, mesh: Mesh):
    """Copy a pytree of arrays to every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def to_host(array: jax.Array) -> np.ndarray:
    """A (possibly multi-host) sharded array as one numpy array on every process."""
    if jax.process_count() == 1:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
