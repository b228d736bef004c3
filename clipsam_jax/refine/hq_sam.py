"""HQ-SAM refiner (`segment-anything-hq`, the `[hq]` extra): SAM's ViT encoder and prompt
encoder, and a mask decoder with one more output token, the high-quality one, fed by an early
encoder layer as well as the final embedding (docs/method.md §4.2).

Its decoder gives one mask per box, as HQ-SAM's own predictor does by default
(`hq_token_only=False`): the HQ mask's logits added to SAM's, the best of SAM's three by
predicted IoU with multimask output, SAM's first without; the score is that SAM mask's. The
encoder, preprocessing, prompts and upscaling are `SamRefiner`'s, so the batching, attention
forms and autocast are the same; the decoder runs image by image (each needs its own early
features).
"""

from __future__ import annotations

import warnings

import torch

with warnings.catch_warnings():
    # Its import registers models with timm through names timm has deprecated, and overrides
    # timm's own TinyViT entries: notices about that package, nothing a user can act on.
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", UserWarning)
    import segment_anything_hq.modeling as hq_modules
    from segment_anything_hq.modeling import Sam

from clipsam_jax.refine.prompts import Prompts
from clipsam_jax.refine.sam import SamRefiner
from clipsam_jax.refine.sam_build import _TINY, SamVariant, build_tiny_sam

HQ_BASE_URL = "https://huggingface.co/lkeab/hq-sam/resolve/main/"  # the HQ-SAM authors' files


def build_tiny_hq_sam() -> Sam:
    """`sam_build.build_tiny_sam` from HQ-SAM's modules: the same tiny SAM with HQ-SAM's
    decoder, random weights."""
    return build_tiny_sam(hq_modules, hq_modules.MaskDecoderHQ, vit_dim=_TINY["embed_dim"])


def _registry_builder(name: str):
    def build() -> Sam:
        from segment_anything_hq import sam_model_registry

        return sam_model_registry[name]()

    return build


def _variant(name: str, width: int, blocks: int) -> SamVariant:
    return SamVariant(f"hq_{name}", _registry_builder(name), width, blocks,
                      f"sam_hq_{name}.pth", base_url=HQ_BASE_URL, hashed_name=False)  # fmt: skip


HQ_VARIANTS: dict[str, SamVariant] = {
    f"hq_{name}": _variant(name, width, blocks)
    for name, width, blocks in (("vit_h", 1280, 32), ("vit_l", 1024, 24), ("vit_b", 768, 12))
}
HQ_VARIANTS["tiny-random-hq"] = SamVariant("tiny-random-hq", build_tiny_hq_sam,
                                           _TINY["embed_dim"], _TINY["depth"])  # fmt: skip


class HqSamRefiner(SamRefiner):
    """`SamRefiner` with HQ-SAM's model: one mask per box (see the module docstring)."""

    variants = HQ_VARIANTS

    def masks_per_box(self, multimask: bool) -> int:
        return 1

    def _decode_low_res(
        self,
        features: tuple[torch.Tensor, list[torch.Tensor]],
        prompts: list[Prompts],
        original_sizes: list[tuple[int, int]],
        multimask: bool,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """`features`: HQ-SAM's encoder output, the embeddings (n, C, h, w) and the outputs
        of its global-attention blocks (each (n, h, w, C_vit)); per image, its boxes in calls
        of at most `max_boxes_per_call`."""
        embeddings, early = features
        model = self.model
        dense_pe = model.prompt_encoder.get_dense_pe()
        low_res, scores = [], []
        for i, (p, size) in enumerate(zip(prompts, original_sizes, strict=True)):
            boxes, coords, labels = self._prompt_tensors([p], [size])
            step = self.max_boxes_per_call or p.num_boxes
            parts = []
            for start in range(0, p.num_boxes, step):
                rows = slice(start, start + step)
                points = None if coords is None else (coords[rows], labels[rows])
                sparse, dense = model.prompt_encoder(points=points, boxes=boxes[rows], masks=None)
                parts.append(model.mask_decoder(
                    image_embeddings=embeddings[i : i + 1], image_pe=dense_pe,
                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                    multimask_output=multimask, hq_token_only=False,
                    interm_embeddings=[e[i : i + 1] for e in early],
                ))  # fmt: skip
            low_res.append(torch.cat([m for m, _ in parts]))
            scores.append(torch.cat([s for _, s in parts]))
        return low_res, scores
