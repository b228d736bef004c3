"""Shared fixtures: a tiny random CLIP written to disk once per session, an isolated cache."""

from __future__ import annotations

import os

import pytest

# Tests must not write into the user's cache, and JAX must not grab all accelerator memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


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
