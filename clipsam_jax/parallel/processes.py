"""Evaluation over several processes (docs/method.md §5.5): each process takes its share of a
class's images (round robin, image i to process i mod P), makes their maps on its own devices
and SAM, and the shares are gathered, in image order, for process 0 to score and write.

One process (P = 1, the default) is the same code with a share of every image and no gather.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from clipsam_jax.errors import ConfigError


def is_primary() -> bool:
    """Whether this process writes the run's shared outputs (process 0)."""
    return jax.process_index() == 0


def process_share(count: int) -> np.ndarray:
    """int64 indices of the images (of `count`) this process handles: i with i mod P = p."""
    return np.arange(jax.process_index(), count, jax.process_count(), dtype=np.int64)


def refuse_processes(command: str) -> None:
    """Raise ConfigError, before any work, when `command` (one that runs in a single process)
    was started as one of several (`JAX_NUM_PROCESSES` > 1: the launcher, a cluster job)."""
    count = os.environ.get("JAX_NUM_PROCESSES", "1")
    if count.strip() not in ("", "0", "1"):
        raise ConfigError(f"{command} runs in one process, but JAX_NUM_PROCESSES={count}: start "
                          "it without clipsam_jax.launch (or with --processes 1); eval.main "
                          "and train.main are the commands that run across processes")  # fmt: skip


def barrier(name: str) -> None:
    """Wait until every process has reached the barrier `name` (no-op in one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def gather_rows(rows: dict[str, np.ndarray | None], count: int) -> dict[str, np.ndarray | None]:
    """Every process's `rows` (its share's, in `process_share` order, each (n_p, ...)) → the
    whole (count, ...) arrays in image order, on every process (one class's worth: the shares
    are padded to ceil(count / P) rows, not to `count`). None entries stay None."""
    processes = jax.process_count()
    if processes == 1:
        return rows
    from jax.experimental import multihost_utils

    width = -(-count // processes)
    gathered: dict[str, np.ndarray | None] = {}
    for key, local in rows.items():
        if local is None:
            gathered[key] = None
            continue
        wire = local.view(np.uint8) if local.dtype == bool else local  # no bool collectives
        padded = np.zeros((width, *local.shape[1:]), wire.dtype)
        padded[: len(local)] = wire
        every = np.asarray(multihost_utils.process_allgather(padded))  # (P, width, ...)
        full = np.empty((count, *local.shape[1:]), wire.dtype)
        for process in range(processes):
            indices = np.arange(process, count, processes)
            full[indices] = every[process, : len(indices)]
        gathered[key] = full.view(bool) if local.dtype == bool else full
    return gathered
