"""Refiners by name: the one registry that the `--sam` choices and `build_refiner` read.

An entry names a refiner, its family and how to build it from a `RefineConfig`. Families are
imported only when one of their refiners is built, so the registry (and the CLI) load without
torch. A new refiner family is one module with its refiner (numpy in and out, see `Refiner`)
plus one `_Family(...).register` call naming its variants; `none` (rough maps only, no MMR) is an
entry too.
"""

from __future__ import annotations

import importlib
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
    # The family's refiner class, imported when called: for builds other than `build`'s
    # (random weights in benchmarks); None for families without one.
    refiner_class: Callable[[], type] | None = None


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


_RANDOM = "random weights, for tests and demos only"


@dataclass(frozen=True)
class _Family:
    """A refiner family whose refiner class (`module:cls`, with `variants` and `from_config`,
    as `SamRefiner`) is imported only when one of its refiners is built."""

    name: str
    refiner: str
    install: str  # the command that installs its package, for the missing-package error

    def refiner_class(self) -> type:
        module, cls = self.refiner.split(":")
        try:
            return getattr(importlib.import_module(module), cls)
        except ModuleNotFoundError as err:
            raise ConfigError(
                f"the {self.name} refiners need the package {err.name!r}, which is not "
                f"installed; install it with: {self.install}"
            ) from err

    def build(self, config: RefineConfig, runtime: RuntimeConfig | None) -> Refiner:
        return self.refiner_class().from_config(config, runtime)

    def register(self, weights: dict[str, str]) -> None:
        """One entry per variant; `weights`: variant name → where its weights come from."""
        for name, source in weights.items():
            register(RefinerEntry(name, self.name, self.build, source, self.refiner_class))


_RANDOM = "random weights, for tests and demos only"
_VIT_SIZES = ("vit_h", "vit_l", "vit_b")
_Family("segment-anything", "clipsam_jax.refine.sam:SamRefiner", "pip install -e .").register({
    **{name: f"sam_{name}_{file}.pth (segment-anything; --download-sam fetches it)"
       for name, file in zip(_VIT_SIZES, ("4b8939", "0b3195", "01ec64"), strict=True)},
    "tiny-random": _RANDOM,
})  # fmt: skip
_Family("segment-anything-hq", "clipsam_jax.refine.hq_sam:HqSamRefiner",
        'pip install -e ".[hq]"').register({
    **{f"hq_{name}": f"sam_hq_{name}.pth (HQ-SAM's authors, Hugging Face lkeab/hq-sam; "
       "--download-sam)" for name in _VIT_SIZES},
    "tiny-random-hq": _RANDOM,
})  # fmt: skip
# sam2 1.1.0 is a source distribution whose build imports torch: build it against the
# installed torch, and without its CUDA extension (it serves video post-processing only).
_Family("sam2", "clipsam_jax.refine.sam2:Sam2Refiner",
        'SAM2_BUILD_CUDA=0 pip install --no-build-isolation -e ".[sam2]"').register({
    **{f"sam2.1_hiera_{size}": f"sam2.1_hiera_{file}.pt (Meta's SAM 2.1 release; --download-sam)"
       for size, file in (("t", "tiny"), ("s", "small"), ("b+", "base_plus"), ("l", "large"))},
    "tiny-random-sam2": _RANDOM,
})  # fmt: skip
register(RefinerEntry("none", "none", lambda config, runtime: None, "no refiner: rough maps only"))
