"""Errors a user can cause and fix. Each message names the file or value and the fix.

The command-line entry points print `ClipSamError` messages without a traceback and exit with
status 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ClipSamError(Exception):
    """Base class for user-facing errors (bad input, missing weights or data)."""


class ImageReadError(ClipSamError):
    """An image or mask file that cannot be read or is unusable."""


class DatasetError(ClipSamError):
    """A dataset folder that is missing or not in the expected layout."""


class CheckpointError(ClipSamError):
    """Missing, malformed or mismatched weights (CLIP, head or SAM)."""


class ConfigError(ClipSamError):
    """A flag or config value that cannot work (or clashes with an existing run)."""


class NonFiniteLossError(ClipSamError, FloatingPointError):
    """Training produced a NaN or infinite loss."""
