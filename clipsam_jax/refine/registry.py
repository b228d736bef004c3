"""Refiners by name: the one registry that the `--sam` choices and `build_refiner` read.

An entry names a refiner, its family and how to build it from a `RefineConfig`. Families are
imported only when one of their refiners is built, so the registry (and the CLI) load without
torch. A new refiner family is one module with its refiner (numpy in and out, see `Refiner`)
plus one `register` call per variant; `none` (rough maps only, no MMR) is an entry too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from clipsam_jax.errors import ConfigError
from clipsam_jax.refine.fusion import BatchMaskRefiner

if TYPE_CHECKING:
    from clipsam_jax.config import RefineConfig, RuntimeConfig

# What MMR needs of a refiner: masks and scores for the boxes (and points) of many images,
# numpy in and out (`refine_batch`; `refine` for one image).
Refiner = BatchMaskRefiner


@dataclass(frozen=True)
class RefinerEntry:
    """A registered refiner: `build(config, runtime)` returns it (None: no MMR)."""

    name: str
    family: str
    build: Callable[[RefineConfig, RuntimeConfig | None], Refiner | None]
    weights: str  # where its weights come from, for messages and docs


REFINERS: dict[str, RefinerEntry] = {}


def register(entry: RefinerEntry) -> RefinerEntry:
    if entry.name in REFINERS:
        raise ValueError(f"refiner {entry.name!r} is already registered")
    REFINERS[entry.name] = entry
    return entry


def refiner_names() -> tuple[str, ...]:
    """The `--sam` choices."""
    return tuple(REFINERS)


def build_refiner(config: RefineConfig, runtime: RuntimeConfig | None = None) -> Refiner | None:
    """The refiner named by `config.sam` (device, batching and kernels from `runtime`), or
    None for `none` (rough maps only)."""
    if config.sam not in REFINERS:
        raise ConfigError(f"--sam {config.sam!r}: unknown refiner; known: {', '.join(REFINERS)}")
    return REFINERS[config.sam].build(config, runtime)


def _segment_anything(config: RefineConfig, runtime: RuntimeConfig | None) -> Refiner:
    from clipsam_jax.refine.sam import SamRefiner  # torch and segment_anything, only now

    return SamRefiner.from_config(config, runtime)


for _name, _file in (("vit_h", "4b8939"), ("vit_l", "0b3195"), ("vit_b", "01ec64")):
    _weights = f"sam_{_name}_{_file}.pth (segment-anything; --download-sam fetches it)"
    register(RefinerEntry(_name, "segment-anything", _segment_anything, _weights))
register(RefinerEntry("tiny-random", "segment-anything", _segment_anything,
                      "random weights, for tests and demos only"))  # fmt: skip


def _hq_sam(config: RefineConfig, runtime: RuntimeConfig | None) -> Refiner:
    from clipsam_jax.refine.hq_sam import HqSamRefiner  # needs the [hq] extra

    return HqSamRefiner.from_config(config, runtime)


for _name in ("vit_h", "vit_l", "vit_b"):
    _weights = f"sam_hq_{_name}.pth (HQ-SAM's authors, Hugging Face lkeab/hq-sam; --download-sam)"
    register(RefinerEntry(f"hq_{_name}", "segment-anything-hq", _hq_sam, _weights))
register(RefinerEntry("tiny-random-hq", "segment-anything-hq", _hq_sam,
                      "random weights, for tests and demos only"))  # fmt: skip
register(RefinerEntry("none", "none", lambda config, runtime: None, "no refiner: rough maps only"))
