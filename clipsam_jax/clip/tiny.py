"""A tiny CLIP with random weights and its own BPE tokenizer, for tests and the offline demo.

It is written to a directory in Hugging Face layout, so it loads through the same path as a real
checkpoint (`load_clip(directory)`). Its features are random projections of the pixels: fine for
exercising the pipeline, meaningless as CLIP features. Numbers from it are never paper numbers.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Literal

from clipsam_jax.clip.prompts import ANOMALOUS_STATES, NORMAL_STATES, TEMPLATE_SETS

TINY_NATIVE_SIZE = 224  # 16×16 grid with patch 14


# A small init keeps each layer's update small beside the residual stream, so the tokens stay
# close to their (random) patch embedding: local, like an early layer of a trained ViT. With
# the default init, four random layers scramble the patches and a head trained on the tokens
# of one synthetic layout barely transfers to another (tests/test_train.py).
TINY_INIT_FACTOR = 0.2


def tiny_clip_config(seed_vocab_size: int):
    """A `CLIPConfig` of a few layers and small width, quick_gelu like OpenAI's CLIP."""
    from transformers import CLIPConfig

    common = dict(hidden_act="quick_gelu", initializer_factor=TINY_INIT_FACTOR)
    text = dict(vocab_size=seed_vocab_size, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                bos_token_id=seed_vocab_size - 2, eos_token_id=seed_vocab_size - 1,
                pad_token_id=seed_vocab_size - 1, **common)  # fmt: skip
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
                  image_size=TINY_NATIVE_SIZE, patch_size=14, **common)  # fmt: skip
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=24,
                      initializer_factor=TINY_INIT_FACTOR)  # fmt: skip


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte → printable-character table: printable bytes map to themselves, the
    others to code points from 256 upward (so every byte has a visible symbol)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    extra = iter(range(256, 512))
    return {byte: chr(byte if byte in keep else next(extra)) for byte in range(256)}


def _learn_merges(words: Counter, count: int) -> list[tuple[str, str]]:
    """A small BPE: repeatedly merge the most frequent adjacent pair (ties: lexicographic)."""
    symbols = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges = []
    for _ in range(count):
        pairs: Counter = Counter()
        for word, freq in words.items():
            for pair in itertools.pairwise(symbols[word]):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for word in words:
            parts, merged, i = symbols[word], [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            symbols[word] = merged
    return merges


def write_tokenizer(directory: Path, merges_count: int = 300):
    """Write a CLIP BPE tokenizer learned on the prompt vocabulary (vocab.json, merges.txt and
    the Hugging Face tokenizer files) and return it; `<|endoftext|>` has the largest id, as in
    OpenAI's CLIP."""
    from transformers import CLIPTokenizerFast

    states = NORMAL_STATES + ANOMALOUS_STATES
    prompts = [t.format(s.format("object")) for t in TEMPLATE_SETS["aprilgan35"] for s in states]
    words = Counter(w.lower() for p in prompts for w in p.replace(".", " .").split())
    byte_chars = list(_bytes_to_unicode().values())
    merges = _learn_merges(words, merges_count)
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizerFast(
        vocab_file=str(directory / "vocab.json"), merges_file=str(directory / "merges.txt")
    )
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def write_tiny_clip(
    directory: str | Path, seed: int = 0, weights: Literal["pytorch", "flax"] = "pytorch"
) -> Path:
    """Write a tiny random CLIP (config, tokenizer, weights) to `directory` and return it.

    `weights="pytorch"` writes `model.safetensors` from transformers' PyTorch `CLIPModel` (the
    load path then converts and caches Flax params); `"flax"` writes `flax_model.msgpack`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_clip_config(len(write_tokenizer(directory)))
    if weights == "pytorch":
        import torch
        from transformers import CLIPModel

        torch.manual_seed(seed)
        CLIPModel(config).save_pretrained(str(directory), safe_serialization=True)
    else:
        import jax
        from flax import serialization
        from transformers.models.clip.modeling_flax_clip import FlaxCLIPModule

        module = FlaxCLIPModule(config=config)

        @jax.jit
        def init(key):
            ids = jax.numpy.zeros((1, 1), "int32")
            pixels = jax.numpy.zeros((1, TINY_NATIVE_SIZE, TINY_NATIVE_SIZE, 3))
            return module.init(key, ids, pixels, ids + 1, ids)["params"]

        params = jax.device_get(init(jax.random.PRNGKey(seed)))
        config.save_pretrained(str(directory))
        (directory / "flax_model.msgpack").write_bytes(serialization.to_bytes(params))
    return directory
