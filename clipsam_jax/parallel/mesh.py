"""Data parallelism over every device: a 1-D `Mesh` on the batch axis.

Params are replicated, batches split along their first axis (padded to a multiple of the
device count, `pad_to`). Over several processes, `initialize_distributed` joins them first;
training's mesh then spans every process's devices (`local_rows`, `global_batch`), while the
maps of an evaluation are made on each process's own devices (`parallel.processes`).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clipsam_jax.errors import ConfigError

logger = logging.getLogger(__name__)
AXIS = "data"


def initialize_distributed() -> bool:
    """Join a multi-process run when `JAX_COORDINATOR_ADDRESS` is set, with `JAX_NUM_PROCESSES`
    and `JAX_PROCESS_ID` (set by `python -m clipsam_jax.launch`, or by a cluster job script).
    Returns whether this is a multi-process run. Must run before any other JAX call."""
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address and not jax.distributed.is_initialized():
        missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if v not in os.environ]
        if missing:
            raise ConfigError(f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} "
                              "not: set all three on every process (python -m "
                              "clipsam_jax.launch does)")  # fmt: skip
        try:
            count, index = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        except ValueError:
            raise ConfigError("JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers, got "
                              f"{os.environ['JAX_NUM_PROCESSES']!r} and "
                              f"{os.environ['JAX_PROCESS_ID']!r}") from None  # fmt: skip
        jax.distributed.initialize(address, count, index)
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
    if sharding.is_fully_addressable:  # this process's devices only (one process, or its own)
        return jax.device_put(array, sharding)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def local_rows(mesh: Mesh, global_rows: int) -> tuple[int, int]:
    """[start, stop): the rows of a (global_rows, ...) batch sharded over `mesh` that this
    process's devices hold (all of them in one process). A mesh lists each process's devices
    together (`jax.devices()` order), so the rows are one contiguous block."""
    spans = sorted(
        (index[0].start or 0, global_rows if index[0].stop is None else index[0].stop)
        for index in batch_sharding(mesh).addressable_devices_indices_map((global_rows,)).values()
    )
    if any(a[1] != b[0] for a, b in itertools.pairwise(spans)):
        raise ValueError(f"this process's rows of the mesh are not contiguous: {spans}")
    return spans[0][0], spans[-1][1]


def global_batch(local: np.ndarray, mesh: Mesh, global_rows: int) -> jax.Array:
    """A (global_rows, ...) batch sharded over `mesh` from this process's rows of it (`local`,
    the `local_rows` block): every process gives its own, none holds the whole batch."""
    shape = (global_rows, *local.shape[1:])
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local, shape)


def replicate(tree, mesh: Mesh):
    """Copy a pytree of arrays to every device of the mesh (every process passes the same)."""
    sharding = replicated(mesh)
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda _: np.asarray(x)),
        tree,
    )


def to_host(array: jax.Array) -> np.ndarray:
    """A (possibly multi-host) sharded array as one numpy array on every process. An array on
    this process's devices alone is copied without a collective (the other processes may be
    computing something else: a multi-process evaluation's shares)."""
    if array.is_fully_addressable:
        return np.asarray(array)
    if array.is_fully_replicated:  # every process has it whole (training's loss, parameters)
        return np.asarray(array.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
