"""PyTorch twin of the ClipSAM heads and losses: the numerics reference for the Flax code.

Same channels-last interface and parameter names as the Flax heads, so a checkpoint converts
by transposes only (Linear weight (out, in) <-> Dense kernel (in, out); Conv weight
(out, in, k...) <-> Conv kernel (k..., in, out)).
"""

from clipsam_jax.torch_ref.aprilgan import AprilGanHead
from clipsam_jax.torch_ref.losses import (
    STAGE_WEIGHTS,
    dice_loss,
    downsample_mask,
    focal_loss,
    total_loss,
)
from clipsam_jax.torch_ref.umci import (
    GRUCell,
    ScaleBranch,
    StripBranch,
    UMCIHead,
    UMCIStage,
    attention,
    rough_map,
)

__all__ = [
    "STAGE_WEIGHTS",
    "AprilGanHead",
    "GRUCell",
    "ScaleBranch",
    "StripBranch",
    "UMCIHead",
    "UMCIStage",
    "attention",
    "dice_loss",
    "downsample_mask",
    "focal_loss",
    "rough_map",
    "total_loss",
]
