"""SAM 2.1 refiner (`sam2`, the `[sam2]` extra): a Hiera image encoder with a feature pyramid,
SAM's prompt encoder, and a mask decoder that also reads the pyramid's two finer levels
(docs/method.md §4.2).

Batched as `SamRefiner` is (the encoder across images, the decoder across all their boxes),
with `SAM2ImagePredictor`'s steps: the image resized to a square (its aspect ratio is not
kept) and ImageNet-normalised; `forward_image` plus the no-memory embedding (an image is a
video's first frame); the box's corners as two points labelled 2 and 3 ahead of its points;
the logits resized straight to the image. Scores are the decoder's IoU predictions. With one
mask per box SAM 2 picks it by stability when the first is unstable, as its predictor does.
"""

from __future__ import annotations

import warnings
from functools import partial

import numpy as np
import torch
from sam2.build_sam import build_sam2
from sam2.modeling.sam2_base import SAM2Base
from sam2.utils.transforms import SAM2Transforms

from clipsam_jax.refine.sam import SamRefiner
from clipsam_jax.refine.sam_build import TINY_SEED, SamVariant

SAM2_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"  # Meta's files
CONFIG = "configs/sam2.1/sam2.1_hiera_{}.yaml"  # inside the sam2 package
ENCODER_PREFIX = "image_encoder.trunk."

# Tiny SAM 2: Hiera-T's layout shrunk (width 8, 5 blocks, one global) with a 32-wide neck and
# heads; the 1024-pixel input is kept, which SAM2ImagePredictor assumes.
_TINY_OVERRIDES = (
    "++model.image_encoder.trunk.embed_dim=8",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.trunk.window_spec=[8,4,4,2]",
    "++model.image_encoder.neck.d_model=32",
    "++model.image_encoder.neck.backbone_channel_list=[64,32,16,8]",
    "++model.image_encoder.neck.position_encoding.num_pos_feats=32",
)
_TINY_SHAPE = (8, 5)  # (patch-embedding width, blocks), from the overrides above


def build_tiny_sam2() -> SAM2Base:
    """Hiera-T's SAM 2.1 shrunk (see `_TINY_OVERRIDES`), random weights (torch seed
    `TINY_SEED`, in a forked RNG), built by `sam2.build_sam.build_sam2` as the real ones are."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return build_sam2(CONFIG.format("t"), None, device="cpu",
                          hydra_overrides_extra=list(_TINY_OVERRIDES))  # fmt: skip


def _variant(name: str, size: str, file_size: str, width: int, blocks: int) -> SamVariant:
    build = partial(build_sam2, CONFIG.format(size), None, device="cpu")
    return SamVariant(name, build, width, blocks, f"sam2.1_hiera_{file_size}.pt",
                      base_url=SAM2_BASE_URL, hashed_name=False,
                      encoder_prefix=ENCODER_PREFIX)  # fmt: skip


# (size in the config name, size in the file name, patch-embedding width, blocks)
_SIZES = (("t", "tiny", 96, 12), ("s", "small", 96, 16), ("b+", "base_plus", 112, 24),
          ("l", "large", 144, 48))  # fmt: skip
SAM2_VARIANTS: dict[str, SamVariant] = {
    f"sam2.1_hiera_{size}": _variant(f"sam2.1_hiera_{size}", size, file_size, width, blocks)
    for size, file_size, width, blocks in _SIZES
}
SAM2_VARIANTS["tiny-random-sam2"] = SamVariant(
    "tiny-random-sam2", build_tiny_sam2, *_TINY_SHAPE, encoder_prefix=ENCODER_PREFIX
)


class ImageFeatures(torch.nn.Module):
    """`SAM2ImagePredictor.set_image_batch`'s encoder steps as one module, so that it compiles
    whole: (n, 3, S, S) → the image embedding (n, C, h, w) with the no-memory embedding added,
    and the two finer pyramid levels [(n, C0, 4h, 4w), (n, C1, 2h, 2w)], projected for the
    decoder."""

    def __init__(self, model: SAM2Base) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model = self.model
        _, levels, _, sizes = model._prepare_backbone_features(model.forward_image(batch))
        if model.directly_add_no_mem_embed:
            levels[-1] = levels[-1] + model.no_mem_embed
        n = batch.shape[0]
        # Each level is (h·w, n, C), flattened by `_prepare_backbone_features`.
        maps = [x.permute(1, 2, 0).reshape(n, -1, *hw) for x, hw in zip(levels, sizes)]
        return maps[-1], maps[:-1]


class Sam2Refiner(SamRefiner):
    """`SamRefiner` with a SAM 2.1 model (see the module docstring). `attention` does not
    apply: Hiera's attention is already torch's fused kernel."""

    variants = SAM2_VARIANTS

    @staticmethod
    def _input_transform(model: SAM2Base) -> SAM2Transforms:
        with warnings.catch_warnings():
            # It scripts its resize with torch.jit, which torch has deprecated: a notice about
            # that package, nothing a user can act on.
            warnings.simplefilter("ignore", FutureWarning)
            return SAM2Transforms(resolution=model.image_size, mask_threshold=0.0)

    @staticmethod
    def _image_encoder(model: SAM2Base) -> torch.nn.Module:
        return ImageFeatures(model).eval()

    def _preprocess(self, images: list[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """n uint8 RGB images → (n, 3, S, S) as `SAM2Transforms` makes them (to [0, 1],
        resized to the square, normalised), on the model's device; and their own (H, W), as
        SAM 2 does not pad."""
        inputs = []
        for image in images:
            # A copy (torch.tensor): the loader's arrays may be read-only.
            x = torch.tensor(image, device=self.device).permute(2, 0, 1).float().div(255)
            inputs.append(self.transform.transforms(x))
        return torch.stack(inputs), [tuple(image.shape[:2]) for image in images]

    def _input_coords(self, xy: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        return self.transform.transform_coords(xy, normalize=True, orig_hw=original_size)

    def _upscale(
        self, low_res: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> torch.Tensor:
        logits = self.transform.postprocess_masks(low_res, original_size)
        return logits > self.transform.mask_threshold

    def _decode_rows(
        self,
        features: tuple[torch.Tensor, list[torch.Tensor]],
        owner: torch.Tensor,
        boxes: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `SamRefiner._decode_rows`; `features` is `ImageFeatures`' output."""
        embeddings, finer = features
        model = self.model
        corners = boxes.reshape(-1, 2, 2)
        corner_labels = torch.tensor([[2, 3]], dtype=torch.int32, device=boxes.device)
        coords, labels = corners, corner_labels.expand(len(boxes), 2)
        if points is not None:
            coords, labels = torch.cat([coords, points[0]], 1), torch.cat([labels, points[1]], 1)
        sparse, dense = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        masks, scores, _, _ = model.sam_mask_decoder(
            image_embeddings=embeddings[owner], image_pe=model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            multimask_output=multimask, repeat_image=False,
            high_res_features=[level[owner] for level in finer],
        )  # fmt: skip
        return masks, scores
