"""SAM's mask decoder on the boxes of several images in one call.

segment_anything's `MaskDecoder` takes one image embedding per call, so a batch of images costs
a call (a few hundred small kernel launches) per image. Here each box brings its own image's
embedding and the decoder's modules run once for all boxes: `MaskDecoder.forward`, image by image.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import MaskDecoder


def decode_boxes(
    decoder: MaskDecoder,
    embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    multimask: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-resolution mask logits and IoU predictions of Q prompts from several images.

    Args:
      embeddings: (Q, C, h, w) the image embedding of each prompt's image.
      image_pe: (1, C, h, w) the dense positional encoding (`PromptEncoder.get_dense_pe()`).
      sparse: (Q, T, C) sparse prompt embeddings (boxes and points; T equal for all prompts).
      dense: (Q, C, h, w) dense prompt embeddings.
      multimask: the three masks after the first (SAM's multimask output) or the first alone.

    Returns:
      masks (Q, k, 4h, 4w) logits and iou (Q, k), k = 3 with `multimask` else 1; for each
      prompt what `decoder(...)` returns for its own image.
    """
    count = sparse.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight])
    tokens = torch.cat([output_tokens.expand(count, -1, -1), sparse], dim=1)
    source = embeddings + dense
    positions = image_pe.expand(count, -1, -1, -1)
    hidden, keys = decoder.transformer(source, positions, tokens)
    channels, height, width = source.shape[1:]
    grid = decoder.output_upscaling(keys.transpose(1, 2).reshape(count, channels, height, width))
    mask_tokens = hidden[:, 1 : 1 + decoder.num_mask_tokens]
    hyper = torch.stack(
        [mlp(mask_tokens[:, i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
    )  # (Q, K, C')
    masks = (hyper @ grid.flatten(2)).reshape(count, -1, *grid.shape[2:])
    iou = decoder.iou_prediction_head(hidden[:, 0])
    chosen = slice(1, None) if multimask else slice(0, 1)
    return masks[:, chosen], iou[:, chosen]
