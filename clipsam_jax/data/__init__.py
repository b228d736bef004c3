"""Datasets (MVTec-AD, VisA, MTD, KSDD2, meta.json), the batch pipeline and synthetic data.

    from clipsam_jax.data import load_dataset, BatchLoader
    test = load_dataset("visa", "data/visa")             # {class: [Sample, ...]}, test split
    for batch in BatchLoader(test["candle"], image_size=518, batch_size=8):
        batch["images"], batch["masks"]                  # (B, S, S, 3) float32, (B, S, S) bool

Names are imported on first use, so that `python -m clipsam_jax.data.<module>` does not load
its own module twice and importing the package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Sample": "types",
    "Dataset": "types",
    "GOOD": "types",
    "summarize": "types",
    "load_mvtec": "mvtec",
    "load_visa": "visa",
    "load_mtd": "mtd",
    "load_ksdd2": "ksdd2",
    "read_meta": "meta",
    "write_meta": "meta",
    "write_meta_for_layout": "meta",
    "load_dataset": "registry",
    "LOADERS": "registry",
    "DEFAULT_SPLITS": "registry",
    "BatchLoader": "pipeline",
    "decode_sample": "pipeline",
    "load_sample": "pipeline",
    "load_mosaic": "pipeline",
    "generate_synthetic": "synthetic",
    "render": "synthetic",
    "download_mvtec": "download",
    "download_visa": "download",
}
_RENAMED = {"generate_synthetic": "generate"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, _RENAMED.get(name, name))


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
