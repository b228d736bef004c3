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
from functools import partial

import torch

with warnings.catch_warnings():
    # Its import registers models with timm through names timm has deprecated, and overrides
    # timm's own TinyViT entries: notices about that package, nothing a user can act on.
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", UserWarning)
    from segment_anything_hq.modeling import (
        ImageEncoderViT,
        MaskDecoderHQ,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

from clipsam_jax.config import RefineConfig, RuntimeConfig
from clipsam_jax.refine.prompts import Prompts
from clipsam_jax.refine.sam import SamRefiner
from clipsam_jax.refine.sam_build import _TINY, TINY_SEED, SamVariant, build_sam

HQ_BASE_URL = "https://huggingface.co/lkeab/hq-sam/resolve/main/"  # the HQ-SAM authors' files


def build_tiny_hq_sam() -> Sam:
    """The tiny SAM of `sam_build.build_tiny_sam` with HQ-SAM's encoder and decoder, random
    weights (torch seed `TINY_SEED`, in a forked RNG)."""
    t = _TINY
    size, dim, grid = t["img_size"], t["prompt_dim"], t["img_size"] // t["patch"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=size, patch_size=t["patch"], embed_dim=t["embed_dim"], depth=t["depth"],
                num_heads=t["heads"], mlp_ratio=2.0, out_chans=dim, qkv_bias=True,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                window_size=8, global_attn_indexes=(1,),
            ),
            prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid),
                                         input_image_size=(size, size), mask_in_chans=4),
            mask_decoder=MaskDecoderHQ(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
                transformer_dim=dim, iou_head_depth=2, iou_head_hidden_dim=32,
                vit_dim=t["embed_dim"],
            ),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )  # fmt: skip
        torch.nn.init.normal_(sam.image_encoder.pos_embed, std=0.5)  # as the tiny SAM's
    return sam.eval()


def _registry_builder(name: str):
    def build() -> Sam:
        from segment_anything_hq import sam_model_registry

        return sam_model_registry[name]()

    return build


def _variant(name: str, width: int) -> SamVariant:
    return SamVariant(f"hq_{name}", _registry_builder(name), width, f"sam_hq_{name}.pth",
                      base_url=HQ_BASE_URL, hashed_name=False)  # fmt: skip


HQ_VARIANTS: dict[str, SamVariant] = {
    f"hq_{name}": _variant(name, width)
    for name, width in (("vit_h", 1280), ("vit_l", 1024), ("vit_b", 768))
}
HQ_VARIANTS["tiny-random-hq"] = SamVariant("tiny-random-hq", build_tiny_hq_sam, _TINY["embed_dim"])


class HqSamRefiner(SamRefiner):
    """`SamRefiner` with HQ-SAM's model: one mask per box (see the module docstring)."""

    @classmethod
    def from_config(cls, config: RefineConfig, runtime: RuntimeConfig | None = None,
                    **kwargs) -> HqSamRefiner:  # fmt: skip
        runtime = runtime or RuntimeConfig()
        model = build_sam(config.sam, config.sam_checkpoint, config.download_sam,
                          runtime.sam_device, kwargs.pop("cache_dir", None),
                          variants=HQ_VARIANTS)  # fmt: skip
        backend = "inductor" if runtime.sam_compile else None
        return cls(model, kwargs.pop("max_boxes_per_call", None),
                   kwargs.pop("autocast", None) or config.sam_dtype, runtime.sam_images_per_call,
                   runtime.sam_attention, backend)  # fmt: skip

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
