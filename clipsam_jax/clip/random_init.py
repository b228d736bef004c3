"""Full-size CLIP architectures with random weights, for shape checks and benchmarks.

No real weights can be downloaded in CI; these give the exact ViT-L/14-336 shapes and FLOPs.
"""

from __future__ import annotations

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict


def vit_l14_336_config():
    """`CLIPConfig` of openai/clip-vit-large-patch14-336 (numbers of its config.json)."""
    from transformers import CLIPConfig

    text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                  hidden_act="quick_gelu")  # fmt: skip
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)


def random_params(shapes: dict, seed: int = 0, std: float = 0.02) -> dict:
    """Random params shaped like `shapes` (a tree of arrays or ShapeDtypeStructs): normal(0,
    std) weights, unit layer-norm scales, zero biases. Quick (no jit init of a big model)."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in flatten_dict(dict(shapes)).items():
        shape = tuple(leaf.shape)
        if path[-1] == "scale":
            out[path] = np.ones(shape, np.float32)
        elif path[-1] == "bias":
            out[path] = np.zeros(shape, np.float32)
        elif path[-1] == "logit_scale":
            out[path] = np.full(shape, np.log(100.0), np.float32)
        else:
            out[path] = rng.normal(0.0, std, size=shape).astype(np.float32)
    return unflatten_dict(out)
