"""Shared fixtures: a tiny random CLIP written to disk once per session, an isolated cache."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest

# Tests must not write into the user's cache, and JAX must not grab all accelerator memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# Many tests compile the same small programs (train steps, encoders): a persistent compilation
# cache turns the repeats into lookups.
jax.config.update(
    "jax_compilation_cache_dir", str(Path(__file__).parent.parent / ".pytest_cache" / "jax")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Point the converted-params / text-feature cache at a per-session temp dir."""
    path = tmp_path_factory.mktemp("clipsam_cache")
    previous = os.environ.get("CLIPSAM_CACHE")
    os.environ["CLIPSAM_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("CLIPSAM_CACHE", None)
    else:
        os.environ["CLIPSAM_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIP in Hugging Face PyTorch layout (model.safetensors + tokenizer)."""
    from clipsam_jax.clip.tiny import write_tiny_clip

    return write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0, weights="pytorch")


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """Generated MVTec-AD and VisA layouts (`root/mvtec`, `root/visa`), 8 images per class."""
    from clipsam_jax.data import synthetic

    root = tmp_path_factory.mktemp("synthetic")
    synthetic.generate("mvtec", root / "mvtec", seed=0, images_per_class=8)
    synthetic.generate("visa", root / "visa", seed=1, images_per_class=8)
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch limited to one thread for a module (SAM's tests: `pytest.mark.usefixtures`): on two
    shared cores its intra-op threads spin against the other test processes (50× slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def two_image_prompts():
    """Two random images of different non-square shapes with 3 and 2 boxes, 4 points per box:
    the refiner families' parity tests."""
    import numpy as np

    from clipsam_jax.refine.prompts import extract_prompts

    sizes = ((90, 140), (120, 80))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for hw in sizes]
    prompts = []
    for hw, spots in zip(sizes, ([(2, 1), (9, 10), (12, 2)], [(3, 3), (10, 9)]), strict=True):
        rough = np.zeros((16, 16), np.float32)
        for y, x in spots:
            rough[y : y + 3, x : x + 3] = 0.9
        prompts.append(extract_prompts(rough, 0.47, 4, hw, np.random.default_rng(1)))
    assert [p.num_boxes for p in prompts] == [3, 2]
    return images, prompts


@pytest.fixture(autouse=True)
def _restore_logging():
    """`cli.run` sets up console logging (replacing the root logger's handlers); undo it after
    each test so that no handler outlives the test whose output it was bound to."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
