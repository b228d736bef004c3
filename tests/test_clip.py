"""CLIP stage: parity with PyTorch transformers CLIP, position resize, prompts, bad checkpoints."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipsam_jax.clip.features import feature_shapes, make_image_encoder
from clipsam_jax.clip.loading import build_clip_model, default_feature_layers, load_clip
from clipsam_jax.clip.position import resize_position_embedding
from clipsam_jax.clip.prompts import TEMPLATE_SETS, TextFeatures, build_sentences, object_name
from clipsam_jax.clip.random_init import random_params, vit_l14_336_config
from clipsam_jax.errors import CheckpointError, ConfigError


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def torch_clip(tiny_clip_dir):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(str(tiny_clip_dir)).eval()


def torch_features(model, pixels: np.ndarray, layers):
    """Reference: PyTorch CLIP hidden states → (B, H, W, C) per layer + projected embedding."""
    with torch.no_grad():
        out = model.vision_model(
            pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True
        )
        batch, grid = pixels.shape[0], pixels.shape[1] // model.config.vision_config.patch_size
        tokens = [
            out.hidden_states[k][:, 1:].reshape(batch, grid, grid, -1).numpy() for k in layers
        ]
        return tokens, model.visual_projection(out.pooler_output).numpy()


def torch_resized_model(model, image_size: int):
    """PyTorch CLIP at another input size, position grid resized by F.interpolate (docs/method.md §1)."""
    from transformers import CLIPModel

    config = model.config.__class__.from_dict(model.config.to_dict())
    config.vision_config.image_size = image_size
    state = dict(model.state_dict())
    key = "vision_model.embeddings.position_embedding.weight"
    table = state[key]
    grid, dim = int((table.shape[0] - 1) ** 0.5), table.shape[1]
    new_grid = image_size // config.vision_config.patch_size
    square = table[1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(
        square, size=(new_grid, new_grid), mode="bicubic", antialias=True, align_corners=False
    )
    state[key] = torch.cat([table[:1], resized.permute(0, 2, 3, 1).reshape(-1, dim)])
    state.pop("vision_model.embeddings.position_ids", None)
    resized_model = CLIPModel(config).eval()
    resized_model.load_state_dict(state, strict=False)
    return resized_model, state[key].numpy()


@pytest.mark.parametrize("image_size", [224, 322, 112])  # native, up- and down-sized grids
def test_patch_tokens_and_embedding_match_pytorch(tiny_clip_dir, torch_clip, image_size):
    clip = load_clip(str(tiny_clip_dir), image_size=image_size, dtype="float32")
    assert clip.feature_layers == (1, 2, 3, 4)  # quarters of the tiny 4-layer encoder
    reference = torch_clip
    if image_size != 224:
        reference, table = torch_resized_model(torch_clip, image_size)
        ours = clip.params["vision_model"]["embeddings"]["position_embedding"]["embedding"]
        assert relative_error(ours, table) < 1e-5
    pixels = np.random.default_rng(0).normal(size=(2, image_size, image_size, 3)).astype(np.float32)
    features = make_image_encoder(clip)(clip.params, pixels)
    tokens, embeds = torch_features(reference, pixels, clip.feature_layers)
    grid = image_size // 14
    for ours, theirs in zip(features.patch_tokens, tokens):
        assert ours.shape == (2, grid, grid, 48)
        assert relative_error(ours, theirs) < 1e-5
    assert relative_error(features.image_embeds, embeds) < 1e-5


def test_position_resize_matches_torch_interpolate_at_full_size():
    """24 → 37 (ViT-L/14 at 336 → 518) and 24 → 16 on a random 1024-wide table."""
    table = np.random.default_rng(1).normal(size=(1 + 24 * 24, 1024)).astype(np.float32)
    for grid in (37, 16):
        ours = resize_position_embedding(table, grid)
        square = torch.from_numpy(table[1:]).reshape(1, 24, 24, 1024).permute(0, 3, 1, 2)
        theirs = F.interpolate(square, size=(grid, grid), mode="bicubic", antialias=True,
                               align_corners=False)  # fmt: skip
        theirs = theirs.permute(0, 2, 3, 1).reshape(-1, 1024).numpy()
        np.testing.assert_array_equal(ours[0], table[0])  # class position kept
        assert ours.shape == (1 + grid * grid, 1024)
        assert relative_error(ours[1:], theirs) < 1e-5


def test_text_features_match_pytorch(tiny_clip_dir, torch_clip):
    clip = load_clip(str(tiny_clip_dir), image_size=224, dtype="float32")
    text = TextFeatures(clip, use_disk_cache=False)
    normal, anomalous = build_sentences("metal_nut")
    tokens = clip.tokenizer(normal + anomalous, padding="max_length", max_length=77,
                            truncation=True, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        reference = torch_clip.get_text_features(**tokens).numpy()
    assert relative_error(text.encode_sentences(normal + anomalous), reference) < 1e-5
    # L: normalize each sentence, mean per state group, normalize (docs/method.md §1), computed here in torch.
    unit = F.normalize(torch.from_numpy(reference), dim=-1)
    groups = [unit[: len(normal)].mean(0), unit[len(normal) :].mean(0)]
    expected = F.normalize(torch.stack(groups), dim=-1).numpy()
    features = text.features("metal_nut")
    assert features.shape == (2, 24)
    assert relative_error(features, expected) < 1e-5
    np.testing.assert_allclose(np.linalg.norm(features, axis=-1), 1.0, atol=1e-6)
    # --prompt-normalization mean: the raw embeddings averaged per group, then normalized.
    raw = torch.from_numpy(reference)
    groups = [raw[: len(normal)].mean(0), raw[len(normal) :].mean(0)]
    expected_mean = F.normalize(torch.stack(groups), dim=-1).numpy()
    mean_only = TextFeatures(clip, use_disk_cache=False, normalization="mean")
    assert relative_error(mean_only.features("metal_nut"), expected_mean) < 1e-5
    # The two modes weight sentences differently, so they must not coincide.
    assert relative_error(expected_mean, expected) > 1e-3


def test_prompt_ensemble_counts_and_object_fallback(tiny_clip_dir):
    assert len(TEMPLATE_SETS["clipsam29"]) == 29 and len(TEMPLATE_SETS["aprilgan35"]) == 35
    assert len(set(TEMPLATE_SETS["clipsam29"])) == 29
    normal, anomalous = build_sentences("bottle")
    assert (len(normal), len(anomalous)) == (7 * 29, 5 * 29)
    assert "a photo of the flawless bottle." in normal
    assert "this is one bottle with damage in the scene." in anomalous
    assert "a bad photo of a broken bottle." in anomalous
    normal35, anomalous35 = build_sentences("bottle", "aprilgan35")
    assert (len(normal35), len(anomalous35)) == (7 * 35, 5 * 35)
    assert "a close-up photo of the perfect bottle." in normal35
    assert object_name("metal_nut") == "metal_nut"
    assert object_name("metal_nut", "spaced") == "metal nut"
    assert object_name(None) == object_name("") == "object"
    clip = load_clip(str(tiny_clip_dir), image_size=224, dtype="float32")
    text = TextFeatures(clip)
    np.testing.assert_array_equal(text.features(None), text.features("object"))
    assert not np.allclose(text.features("object"), text.features("bottle"))
    assert text.batch(["bottle", None]).shape == (2, 2, 24)


def test_text_features_disk_cache_reused(tiny_clip_dir, tmp_path):
    clip = load_clip(str(tiny_clip_dir), image_size=224, dtype="float32")
    first = TextFeatures(clip, cache_dir=tmp_path).features("capsule")
    assert len(list((tmp_path / "text").rglob("*.npy"))) == 1
    again = TextFeatures(clip, cache_dir=tmp_path)
    again._encode = None  # a recomputation would fail: the value must come from disk
    np.testing.assert_array_equal(again.features("capsule"), first)


def test_converted_params_cached_and_loaded_without_torch(tiny_clip_dir, tmp_path, monkeypatch):
    load_clip(str(tiny_clip_dir), image_size=224, cache_dir=tmp_path)
    cached = list(tmp_path.rglob("flax_params.msgpack"))
    assert len(cached) == 1
    import clipsam_jax.clip.loading as loading

    def no_conversion(*args, **kwargs):
        raise AssertionError("second load must read the cache, not convert again")

    monkeypatch.setattr(loading, "torch_to_flax", no_conversion)
    clip = load_clip(str(tiny_clip_dir), image_size=224, cache_dir=tmp_path)
    assert clip.grid == 16


def test_flax_checkpoint_directory_loads(tmp_path):
    from clipsam_jax.clip.tiny import write_tiny_clip

    directory = write_tiny_clip(tmp_path / "flax", weights="flax")
    clip = load_clip(str(directory), image_size=70)
    features = make_image_encoder(clip)(clip.params, np.zeros((1, 70, 70, 3), np.float32))
    assert [t.shape for t in features.patch_tokens] == [(1, 5, 5, 48)] * 4


def test_full_size_shapes_with_eval_shape():
    """ViT-L/14-336 at S=518 and 336: four (B, H, W, 1024) maps + (B, 768), nothing computed."""
    config = vit_l14_336_config()
    from transformers.models.clip.modeling_flax_clip import FlaxCLIPModule

    from clipsam_jax.clip.loading import param_shapes

    shapes = param_shapes(FlaxCLIPModule(config=config), 336)
    table = shapes["vision_model"]["embeddings"]["position_embedding"]["embedding"]
    assert table.shape == (577, 1024)
    for size, grid in ((518, 37), (336, 24)):
        # build_clip_model resizes the (random) position table; eval_shape traces the encoder.
        params = random_params({"vision_model": {"embeddings": {"position_embedding":
                                {"embedding": table}}}})  # fmt: skip
        full = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), shapes)
        full["vision_model"]["embeddings"]["position_embedding"]["embedding"] = params[
            "vision_model"]["embeddings"]["position_embedding"]["embedding"]  # fmt: skip
        clip = build_clip_model(config, full, None, size, dtype="float32")
        out = feature_shapes(clip, batch=8)
        assert clip.feature_layers == (6, 12, 18, 24)
        assert [t.shape for t in out.patch_tokens] == [(8, grid, grid, 1024)] * 4
        assert out.image_embeds.shape == (8, 768)


def test_default_feature_layers():
    assert default_feature_layers(24) == (6, 12, 18, 24)
    assert default_feature_layers(12) == (3, 6, 9, 12)
    with pytest.raises(ConfigError):
        default_feature_layers(2)


# ---------------------------------------------------------------- bad checkpoints and sizes


def test_missing_directory_names_path(tmp_path):
    with pytest.raises(CheckpointError, match="no_such_clip"):
        load_clip(str(tmp_path / "no_such_clip"))


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no config\.json.*conversion\.clip"):
        load_clip(str(tmp_path))


def test_malformed_config(tiny_clip_dir, tmp_path):
    target = tmp_path / "broken"
    shutil.copytree(tiny_clip_dir, target)
    (target / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: malformed"):
        load_clip(str(target))


def test_corrupt_weights_file(tiny_clip_dir, tmp_path):
    target = tmp_path / "corrupt"
    shutil.copytree(tiny_clip_dir, target)
    (target / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read"):
        load_clip(str(target), cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("change", ["missing", "shape", "extra"])
def test_weights_not_matching_config_name_the_key(tiny_clip_dir, tmp_path, change):
    from safetensors.numpy import load_file, save_file

    target = tmp_path / change
    shutil.copytree(tiny_clip_dir, target)
    tensors = load_file(str(target / "model.safetensors"))
    key = "vision_model.encoder.layers.2.mlp.fc1.weight"
    if change == "missing":
        del tensors[key]
    elif change == "shape":
        tensors[key] = np.zeros((7, 48), np.float32)
    else:
        tensors["vision_model.extra_head.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, str(target / "model.safetensors"))
    expected = {"missing": "layers/2/mlp/fc1", "shape": key, "extra": "extra_head"}[change]
    with pytest.raises(CheckpointError, match=expected):
        load_clip(str(target), cache_dir=tmp_path / "cache")


def test_image_size_not_multiple_of_patch(tiny_clip_dir):
    with pytest.raises(
        ConfigError, match=r"--image-size 500 is not a multiple of .*patch size 14 \(e.g. 504\)"
    ):
        load_clip(str(tiny_clip_dir), image_size=500)


def test_config_file_model_type_checked(tiny_clip_dir, tmp_path):
    target = tmp_path / "notclip"
    shutil.copytree(tiny_clip_dir, target)
    config = json.loads((target / "config.json").read_text())
    config["model_type"] = "bert"
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type is not 'clip'"):
        load_clip(str(target))


@pytest.mark.parametrize("attention", ["fused", "blocked"])
def test_attention_implementations_match_reference(tiny_clip_dir, attention, monkeypatch):
    """jax.nn.dot_product_attention and the blocked per-head attention compute the same features
    as transformers' attention. Blocks of 16 rows: 65 tokens give 4 full blocks and a ragged one."""
    from clipsam_jax.clip import features

    monkeypatch.setattr(features, "ATTENTION_BLOCK", 16)
    calls, core = [], features._CORES[attention]
    monkeypatch.setitem(features._CORES, attention, lambda *a: calls.append(1) or core(*a))
    # The choice made at loading (ClipConfig.attention, --clip-attention) is the encoder's default.
    clip = load_clip(str(tiny_clip_dir), image_size=112, dtype="float32", attention=attention)
    assert clip.attention == attention
    pixels = np.random.default_rng(3).normal(size=(2, 112, 112, 3)).astype(np.float32)
    reference = make_image_encoder(clip, attention="reference")(clip.params, pixels)
    assert not calls
    other = make_image_encoder(clip)(clip.params, pixels)
    assert reference.patch_tokens[0].shape[1:3] == (8, 8)  # 64 patches + class token
    for a, b in zip(other.patch_tokens, reference.patch_tokens):
        assert relative_error(a, b) < 1e-5
    assert relative_error(other.image_embeds, reference.image_embeds) < 1e-5
    assert len(calls) == clip.config.vision_config.num_hidden_layers  # every layer intercepted
    # The query, key and value projections as one GEMM: the same features.
    fused_qkv = make_image_encoder(clip, fuse_qkv=True)
    jaxpr = str(jax.make_jaxpr(fused_qkv)(clip.params, pixels))
    separate = str(jax.make_jaxpr(make_image_encoder(clip))(clip.params, pixels))
    layers = clip.config.vision_config.num_hidden_layers
    assert separate.count("dot_general") - jaxpr.count("dot_general") == 2 * layers
    fused_out = fused_qkv(clip.params, pixels)
    for a, b in zip(fused_out.patch_tokens, reference.patch_tokens):
        assert relative_error(a, b) < 1e-5


def test_uint8_pixels_normalized_on_the_device(tiny_clip_dir):
    """The encoder and the rough-map model take the resized uint8 images (as evaluation sends
    them) and normalize them in the jitted function: the same features and maps as the
    host-normalized float32 input."""
    from clipsam_jax.clip.prompts import TextFeatures
    from clipsam_jax.config import HeadConfig
    from clipsam_jax.data.image_io import normalize
    from clipsam_jax.inference import RoughMapModel
    from clipsam_jax.models.heads import build_head
    from clipsam_jax.models.init import init_params

    clip = load_clip(str(tiny_clip_dir), image_size=112, dtype="float32")
    rgb = np.random.default_rng(4).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    encoder = make_image_encoder(clip)
    ours, theirs = encoder(clip.params, rgb), encoder(clip.params, normalize(rgb))
    for a, b in zip(ours.patch_tokens, theirs.patch_tokens):
        assert relative_error(a, b) < 1e-6
    head = HeadConfig(hidden_dim=16, pool_sizes=(2, 4))
    grid, dim = clip.grid, clip.feature_dim
    params = init_params(build_head(head, clip.text_dim), 0, [(1, grid, grid, dim)] * 4,
                         (1, 2, clip.text_dim), head.init)  # fmt: skip
    model = RoughMapModel(clip, TextFeatures(clip), head, params, batch_size=2)
    names = ["candle"] * 3  # 3 images, batches of 2: a padded uint8 batch too
    np.testing.assert_allclose(model(rgb, names), model(normalize(rgb), names), atol=1e-6)


def test_attention_choice():
    from clipsam_jax.clip.features import cudnn_attention_available, resolve_attention

    on_cpu = jax.default_backend() == "cpu"
    expected = "blocked" if on_cpu else "reference"
    assert resolve_attention(None) == resolve_attention("auto") == expected
    assert resolve_attention("auto", jnp.float32) == expected
    # Half precision on a GPU with cuDNN: its fused kernel (the fastest measured there).
    half = "blocked" if on_cpu else ("cudnn" if cudnn_attention_available() else "reference")
    assert resolve_attention("auto", jnp.bfloat16) == resolve_attention(None, jnp.float16) == half
    assert resolve_attention("fused") == "fused"
    with pytest.raises(ConfigError, match="blocked"):
        resolve_attention("flash")
    # cuDNN's kernel: half precision only, and a GPU with cuDNN.
    with pytest.raises(ConfigError, match="dtype='bfloat16'"):
        resolve_attention("cudnn", jnp.float32)
    if not cudnn_attention_available():
        with pytest.raises(ConfigError, match="needs cuDNN on a GPU"):
            resolve_attention("cudnn", jnp.bfloat16)


def test_attention_checked_at_loading_and_not_taken_from_checkpoints(tiny_clip_dir):
    from clipsam_jax.config import ClipConfig, to_dict
    from clipsam_jax.inference import checkpoint_clip_config

    with pytest.raises(ConfigError, match="bfloat16"):
        load_clip(str(tiny_clip_dir), image_size=112, dtype="float32", attention="cudnn")
    with pytest.raises(ConfigError, match="attention must be one of"):
        load_clip(str(tiny_clip_dir), image_size=112, attention="flash")
    # The attention is a runtime setting, not the head's: checkpoints carry none, and those
    # written when ClipConfig still held it (and the cache folder) restore without them.
    assert "attention" not in to_dict(ClipConfig())
    meta = {"config": {"clip": to_dict(ClipConfig(image_size=336))}}
    meta["config"]["clip"].update(attention="cudnn", cache_dir="/old/cache")
    assert checkpoint_clip_config(meta) == ClipConfig(image_size=336)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU with cuDNN")
def test_cudnn_attention_matches_reference(tiny_clip_dir):
    """On a GPU in bf16, cuDNN's fused attention gives transformers' attention's features to bf16
    rounding. The tiny CLIP's head dim (24) is in cuDNN's range (a multiple of 8, <= 128)."""
    from clipsam_jax.clip.features import resolve_attention

    clip = load_clip(str(tiny_clip_dir), image_size=112, dtype="bfloat16")
    assert resolve_attention("cudnn", clip.module.dtype) == "cudnn"
    pixels = np.random.default_rng(3).normal(size=(2, 112, 112, 3)).astype(np.float32)
    reference = make_image_encoder(clip, attention="reference")(clip.params, pixels)
    fused = make_image_encoder(clip, attention="cudnn")(clip.params, pixels)
    fused_qkv = make_image_encoder(clip, attention="cudnn", fuse_qkv=True)(clip.params, pixels)
    for a, b, c in zip(fused.patch_tokens, reference.patch_tokens, fused_qkv.patch_tokens):
        assert relative_error(a, b) < 2e-2 and relative_error(c, b) < 2e-2
