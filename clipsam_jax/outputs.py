"""Output folders and files: one live run per folder, files written whole or not at all.

A folder (training workdir, evaluation output) is held by one run at a time with the operating
system's lock (`flock` on `<folder>/.lock`, which records the holder's process id): it goes with
its process however that ends (kill -9 too), so a dead run's lock never blocks the next one.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from clipsam_jax.errors import ConfigError

try:
    import fcntl
except ImportError:  # not on Windows: runs there are not guarded
    fcntl = None

LOCK_NAME = ".lock"


@contextlib.contextmanager
def hold(folder: str | Path, what: str) -> Iterator[None]:
    """Hold `folder` for this process while the block runs (creating the folder); a folder held
    by another live process raises `ConfigError` naming it and that process."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(folder / LOCK_NAME, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ConfigError(
                f"{folder} is in use by a running {what} (process {holder}). Wait for it to "
                "finish, or give this run another folder."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def png_bytes(array: np.ndarray) -> bytes:
    """uint8 / uint16 (H, W) or uint8 (H, W, 3) → the bytes of a PNG file."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """`path` gets `data` under a temporary name first, then renamed: a reader (or the next run
    after a crash) never sees it half-written."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_bytes(data.encode() if isinstance(data, str) else data)
    temporary.replace(path)
