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


def write_random_clip(directory, seed: int = 0):
    """A full-size ViT-L/14-336 CLIP directory with random weights (Flax msgpack, 1.7 GB) and
    the tiny BPE tokenizer, for benchmarks through the real loading path. Not a usable model."""
    from pathlib import Path

    from flax import serialization
    from transformers.models.clip.modeling_flax_clip import FlaxCLIPModule

    from clipsam_jax.clip.loading import param_shapes
    from clipsam_jax.clip.tiny import write_tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer(directory)
    config = vit_l14_336_config()
    # The tiny tokenizer's ids fit the 49408-token table; its end-of-text id must be the one
    # the text tower pools at.
    config.text_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config.text_config.bos_token_id = tokenizer.convert_tokens_to_ids("<|startoftext|>")
    config.text_config.pad_token_id = config.text_config.eos_token_id
    assert len(tokenizer) <= config.text_config.vocab_size
    params = random_params(param_shapes(FlaxCLIPModule(config=config), 336), seed)
    config.save_pretrained(str(directory))
    (directory / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(params))
    return directory
