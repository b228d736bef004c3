"""MMR refinement (Sec. 3.3, SPEC §4): prompts from the rough map, SAM masks, Eq. 9 fusion.

`prompts` and `fusion` are numpy-only. The SAM names (`SamRefiner`, `build_sam`,
`SAM_VARIANTS`, ...) are imported lazily from `refine.sam`, so importing this package does not
import torch or segment_anything.
"""

from __future__ import annotations

import importlib
from typing import Any

from clipsam_jax.refine.fusion import (
    NORMS,
    BatchMaskRefiner,
    MaskRefiner,
    MMRResult,
    fuse,
    fuse_batch,
    masks_to_grid,
    mmr,
    mmr_batch,
    mmr_seeded,
    normalize,
)
from clipsam_jax.refine.prompts import PAD_LABEL, Prompts, extract_prompts

_LAZY_SAM = (
    "AUTOCAST_CHOICES",
    "SAM_VARIANTS",
    "SamRefiner",
    "SamVariant",
    "build_sam",
    "build_tiny_sam",
    "identify_variant",
    "resolve_autocast",
    "resolve_device",
    "to_rgb_uint8",
)

__all__ = [
    "NORMS",
    "BatchMaskRefiner",
    "PAD_LABEL",
    "MMRResult",
    "MaskRefiner",
    "Prompts",
    "extract_prompts",
    "fuse",
    "fuse_batch",
    "masks_to_grid",
    "mmr",
    "mmr_batch",
    "mmr_seeded",
    "normalize",
    *_LAZY_SAM,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY_SAM:
        return getattr(importlib.import_module("clipsam_jax.refine.sam"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
