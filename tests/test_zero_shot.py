"""The zero-shot rough map of `--no-umci` (Table 2 "w/o UMCI") against an independent PyTorch
computation with transformers' `CLIPModel` on the same checkpoint.

Reference, per feature layer k (the output of encoder layer k, i.e. `hidden_states[k]`): patch
tokens → post-layernorm → visual projection → L2-normalize → 100 · cos with the text features L
→ bilinear upsampling of the two logits to S×S (half-pixel centres) → softmax over (normal,
anomalous); the anomaly channel is averaged over the layers. L follows the prompt ensemble:
every sentence embedded, L2-normalized, averaged per state, the mean normalized again.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from clipsam_jax.clip.prompts import build_sentences  # noqa: E402
from clipsam_jax.config import ClipConfig, RuntimeConfig  # noqa: E402
from clipsam_jax.inference import load_rough_map_model  # noqa: E402

SIZE = 224  # the tiny CLIP's native size: no position-embedding resize on either side
CLASSES = ["bottle", "metal_nut", None]  # None: the unknown-class placeholder "object"


@pytest.fixture(scope="module")
def perturbed_clip_dir(tiny_clip_dir, tmp_path_factory):
    """The tiny CLIP with random biases and layer-norm parameters (the tiny init leaves them
    at 0 and 1), so that a skipped or swapped layer norm or bias shows in the maps."""
    from transformers import CLIPModel

    out = tmp_path_factory.mktemp("zero_shot_clip")
    for path in tiny_clip_dir.iterdir():
        if path.is_file() and path.name != "model.safetensors":
            shutil.copy(path, out / path.name)
    model = CLIPModel.from_pretrained(str(tiny_clip_dir)).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # layer_norm*, *layernorm, pre_layrnorm
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def torch_text_features(model, tokenizer, class_name: str | None) -> np.ndarray:
    """(2, C_t): rows normal, anomalous; the sentences of the prompt ensemble."""
    normal, anomalous = build_sentences(class_name or "object")
    tokens = tokenizer(normal + anomalous, padding=True, return_tensors="pt")
    with torch.no_grad():
        embeddings = model.get_text_features(**tokens)
    embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
    groups = embeddings[: len(normal)].mean(0), embeddings[len(normal) :].mean(0)
    return torch.nn.functional.normalize(torch.stack(groups), dim=-1).numpy()


def torch_layer_outputs(model, pixels: np.ndarray, layers) -> tuple[list, tuple]:
    """The residual stream after each given (1-based) encoder layer, captured with forward
    hooks, (B, 1 + g*g, C) each, and the model's own `hidden_states`."""
    captured = {}

    def hook(k):
        def capture(_module, _inputs, output):
            captured[k] = output[0] if isinstance(output, tuple) else output

        return capture

    layer_modules = model.vision_model.encoder.layers
    handles = [layer_modules[k - 1].register_forward_hook(hook(k)) for k in layers]
    try:
        with torch.no_grad():
            out = model.vision_model(
                torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True
            )
    finally:
        for handle in handles:
            handle.remove()
    return [captured[k] for k in layers], out.hidden_states


def torch_zero_shot_map(model, layer_tokens, text: np.ndarray, size: int) -> np.ndarray:
    """layer_tokens: per layer (B, 1 + g*g, C); text (B, 2, C_t) → (B, S, S) anomaly map."""
    text = torch.nn.functional.normalize(torch.from_numpy(text), dim=-1)
    probabilities = []
    with torch.no_grad():
        for tokens in layer_tokens:
            batch, grid = tokens.shape[0], round((tokens.shape[1] - 1) ** 0.5)
            tokens = tokens[:, 1:]  # class token dropped
            projected = model.visual_projection(model.vision_model.post_layernorm(tokens))
            projected = torch.nn.functional.normalize(projected, dim=-1)
            logits = 100.0 * torch.einsum("bnc,bkc->bnk", projected, text)
            logits = logits.reshape(batch, grid, grid, 2).permute(0, 3, 1, 2)
            logits = torch.nn.functional.interpolate(
                logits, size=(size, size), mode="bilinear", align_corners=False
            )
            probabilities.append(torch.softmax(logits, dim=1)[:, 1])
    return torch.stack(probabilities).mean(0).numpy()


class FixedText:
    """Stands in for `TextFeatures`: the given L (2, C_t) of each class name."""

    def __init__(self, features: dict):
        self.features = features

    def batch(self, class_names):
        return np.stack([self.features[name] for name in class_names])


def test_zero_shot_map_matches_pytorch_clip(perturbed_clip_dir, tmp_path):
    from transformers import AutoTokenizer, CLIPModel

    config = ClipConfig(model=str(perturbed_clip_dir), image_size=SIZE, dtype="float32")
    runtime = RuntimeConfig(cache_dir=str(tmp_path / "cache"))
    model = load_rough_map_model(config, None, no_umci=True, batch_size=4, runtime=runtime)
    assert model.head_config is None
    layers = model.clip.feature_layers
    assert layers == (1, 2, 3, 4)  # the quarter points of the tiny CLIP's 4 layers

    reference = CLIPModel.from_pretrained(str(perturbed_clip_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(perturbed_clip_dir))
    text = np.stack([torch_text_features(reference, tokenizer, name) for name in CLASSES])
    np.testing.assert_allclose(model.text.batch(CLASSES), text, rtol=0, atol=1e-5)

    pixels = np.random.default_rng(0).normal(size=(len(CLASSES), SIZE, SIZE, 3))
    pixels = pixels.astype(np.float32)
    layer_tokens, hidden_states = torch_layer_outputs(reference, pixels, layers)
    for k, tokens in zip(layers, layer_tokens):  # hidden_states[k]: the output of layer k
        torch.testing.assert_close(hidden_states[k], tokens, rtol=0, atol=0)
    expected = torch_zero_shot_map(reference, layer_tokens, text, SIZE)
    np.testing.assert_allclose(model(pixels, CLASSES), expected, rtol=0, atol=1e-4)

    # The random tiny CLIP's normal and anomalous L are nearly parallel (maps ~0.5 everywhere),
    # so the visual side is checked again with an L whose rows differ more (maps spread).
    rng = np.random.default_rng(1)
    base = rng.normal(size=(len(CLASSES), 1, text.shape[-1]))
    spread = base / np.linalg.norm(base, axis=-1, keepdims=True) + 0.15 * rng.normal(
        size=text.shape
    )
    spread = (spread / np.linalg.norm(spread, axis=-1, keepdims=True)).astype(np.float32)
    model.text = FixedText(dict(zip(CLASSES, spread)))
    ours = model(pixels, CLASSES)
    expected = torch_zero_shot_map(reference, layer_tokens, spread, SIZE)
    assert ours.shape == expected.shape == (len(CLASSES), SIZE, SIZE)
    assert expected.std() > 0.05, "a near-constant reference would make the check vacuous"
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)
    # The map of the layers one earlier (hidden_states[k - 1]) is another map.
    shifted = torch_zero_shot_map(reference, [hidden_states[k - 1] for k in layers], spread, SIZE)
    assert np.abs(ours - shifted).max() > 1e-2
