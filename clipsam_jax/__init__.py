"""ClipSAM in JAX: CLIP + SAM collaboration for zero-shot anomaly segmentation."""

__version__ = "0.1.0"
