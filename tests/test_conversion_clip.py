"""`python -m conversion.clip`: OpenAI / open_clip / HF CLIP checkpoints → Flax CLIP directory.

The references are tiny random open_clip models (open_clip's `CLIP` state dict is the OpenAI
layout: fused `in_proj_weight`, `x @ proj` projections), run in PyTorch next to our Flax model.
"""

from __future__ import annotations

import copy
import filecmp
import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from flax import serialization  # noqa: E402
from flax.traverse_util import flatten_dict  # noqa: E402

from clipsam_jax.clip.features import make_image_encoder  # noqa: E402
from clipsam_jax.clip.loading import load_clip  # noqa: E402
from clipsam_jax.clip.position import resize_position_embedding  # noqa: E402
from clipsam_jax.clip.prompts import TextFeatures  # noqa: E402
from clipsam_jax.errors import CheckpointError  # noqa: E402
from conversion import clip as conversion  # noqa: E402

SENTENCES = (
    "a photo of a metal_nut.",
    "a jpeg corrupted photo of the flawless bottle without defect.",
    "This is one DAMAGED capsule in the scene!",
)


def tiny_open_clip(seed, width, head_width, text_heads, quick_gelu, image_size=48, patch=8):
    """A random open_clip ViT CLIP: 4 vision layers, 2 text layers of width 64, real vocab."""
    torch.manual_seed(seed)
    vision = dict(
        layers=4, width=width, head_width=head_width, patch_size=patch, image_size=image_size
    )
    text = dict(context_length=77, vocab_size=49408, width=64, heads=text_heads, layers=2)
    model = open_clip.model.CLIP(32, vision, text, quick_gelu=quick_gelu).eval()
    with torch.no_grad():  # a non-trivial logit scale / biases, so mapping slips show
        for name, param in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def numpy_state_dict(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def save_torchscript(model, path):
    """An OpenAI-style TorchScript archive, including the scalar attributes OpenAI's carry."""
    model = copy.deepcopy(model)
    for name, value in (("input_resolution", 48), ("context_length", 77), ("vocab_size", 49408)):
        model.__dict__.pop(name, None)  # open_clip keeps two of them as plain ints
        model.register_buffer(name, torch.tensor(value))
    with warnings.catch_warnings():  # TorchScript is deprecated; OpenAI's files use it
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(model).save(str(path))


def assert_close(ours, reference, what):
    """Max abs difference within 1e-5 of the reference's scale."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, (what, ours.shape, reference.shape)
    error = np.abs(ours - reference).max() / np.abs(reference).max()
    assert error < 1e-5, f"{what}: relative error {error:.2e}"


def open_clip_block_outputs(model, pixels, layers):
    """Residual stream after the given 1-based vision blocks, (B, 1 + g*g, C), + image embeds."""
    captured = {}
    transformer = model.visual.transformer
    batch_first = getattr(transformer, "batch_first", False)  # older open_clip: LND layout

    def hook(index):
        def capture(_module, _inputs, output):
            captured[index] = output if batch_first else output.permute(1, 0, 2)

        return capture

    handles = [transformer.resblocks[k - 1].register_forward_hook(hook(k)) for k in layers]
    with torch.no_grad():
        embeds = model.encode_image(torch.from_numpy(pixels).permute(0, 3, 1, 2))
    for handle in handles:
        handle.remove()
    return [captured[k].numpy() for k in layers], embeds.numpy()


def compare_with_open_clip(model, out, native, cache_dir):
    """Load the converted dir and check patch tokens, image and text features, token ids."""
    clip = load_clip(str(out), image_size=native, cache_dir=cache_dir, dtype="float32")
    pixels = np.random.default_rng(0).normal(size=(2, native, native, 3)).astype(np.float32)
    ours = make_image_encoder(clip)(clip.params, pixels)
    blocks, embeds = open_clip_block_outputs(model, pixels, clip.feature_layers)
    grid = clip.grid
    for layer, block, tokens in zip(clip.feature_layers, blocks, ours.patch_tokens):
        reference = block[:, 1:].reshape(len(pixels), grid, grid, -1)  # class token dropped
        assert_close(tokens, reference, f"patch tokens after block {layer}")
    assert_close(ours.image_embeds, embeds, "projected image embedding")

    reference_ids = open_clip.tokenize(list(SENTENCES)).numpy()
    for sentence, ids, reference in zip(
        SENTENCES, clip.tokenizer(list(SENTENCES))["input_ids"], reference_ids
    ):
        assert list(reference[: len(ids)]) == ids, sentence
        assert not reference[len(ids) :].any(), sentence  # only open_clip's 0-padding after
    with torch.no_grad():
        text_reference = model.encode_text(torch.from_numpy(reference_ids)).numpy()
    text = TextFeatures(clip, use_disk_cache=False).encode_sentences(SENTENCES)
    assert_close(text, text_reference, "text features")


@pytest.fixture(scope="module")
def openai_model():
    """OpenAI-format reference: quick_gelu, 64-wide heads (head counts inferred)."""
    return tiny_open_clip(seed=0, width=128, head_width=64, text_heads=1, quick_gelu=True)


@pytest.fixture(scope="module")
def plain_checkpoint(openai_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("openai") / "tiny_plain.pt"
    torch.save(openai_model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def converted_jit(openai_model, tmp_path_factory):
    """The TorchScript archive converted with `main`, as an output directory."""
    root = tmp_path_factory.mktemp("openai_jit")
    save_torchscript(openai_model, root / "tiny.pt")
    assert conversion.main([str(root / "tiny.pt"), "--out", str(root / "out")]) == 0
    return root / "out"


def read_params(directory):
    return flatten_dict(
        serialization.msgpack_restore((directory / "flax_model.msgpack").read_bytes())
    )


def test_openai_torchscript_round_trip(openai_model, converted_jit, tmp_path):
    config = json.loads((converted_jit / "config.json").read_text())
    assert config["vision_config"]["hidden_act"] == "quick_gelu"
    assert config["vision_config"]["num_attention_heads"] == 2  # 128 // 64
    tokenizer = json.loads((converted_jit / "vocab.json").read_text())
    assert len(tokenizer) == 49408 and tokenizer["<|endoftext|>"] == 49407
    compare_with_open_clip(openai_model, converted_jit, 48, tmp_path)


def test_plain_state_dict_matches_torchscript(plain_checkpoint, converted_jit, tmp_path, capsys):
    assert conversion.main([str(plain_checkpoint), "--out", str(tmp_path / "out")]) == 0
    ours, reference = read_params(tmp_path / "out"), read_params(converted_jit)
    assert ours.keys() == reference.keys()
    for key in reference:
        np.testing.assert_array_equal(ours[key], reference[key], err_msg="/".join(key))
    assert "ignored" not in capsys.readouterr().out  # a plain state dict has no extra scalars


def test_open_clip_wrapped_prefixed_gelu(tmp_path):
    """open_clip training checkpoint: {"state_dict": {"module." + key: ...}}, plain GELU,
    heads that are not 64 wide (given on the command line)."""
    model = tiny_open_clip(
        seed=1, width=96, head_width=32, text_heads=2, quick_gelu=False, image_size=40
    )
    wrapped = {
        "epoch": 3,
        "name": "tiny",
        "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
    }
    torch.save(wrapped, tmp_path / "epoch_3.pt")
    argv = [str(tmp_path / "epoch_3.pt"), "--out", str(tmp_path / "out"), "--hidden-act", "gelu"]
    assert conversion.main([*argv, "--vision-heads", "3", "--text-heads", "2"]) == 0
    compare_with_open_clip(model, tmp_path / "out", 40, tmp_path)
    # Without the head counts, 96 is not a multiple of OpenAI's 64-wide heads: a clear error.
    with pytest.raises(CheckpointError, match="--vision-heads"):
        conversion.convert_openai_state_dict(wrapped)


def test_safetensors_source_reads_like_state_dict(openai_model, tmp_path):
    from safetensors.torch import save_file

    save_file(openai_model.state_dict(), str(tmp_path / "open_clip_model.safetensors"))
    state_dict, _ = conversion.read_checkpoint(tmp_path / "open_clip_model.safetensors")
    reference = numpy_state_dict(openai_model)
    assert state_dict.keys() == reference.keys()
    np.testing.assert_array_equal(state_dict["visual.proj"], reference["visual.proj"])


def _missing(sd):
    del sd["visual.ln_post.bias"]


def _extra(sd):
    sd["visual.head.weight"] = np.zeros((3, 3), np.float32)


def _shape(sd):
    sd["ln_final.bias"] = np.zeros(65, np.float32)


def _resnet(sd):
    sd["visual.layer1.0.conv1.weight"] = np.zeros((64, 64, 1, 1), np.float32)


def _custom_text(sd):
    sd["text.transformer.resblocks.0.ln_1.weight"] = np.zeros(64, np.float32)


@pytest.mark.parametrize(
    ("edit", "expect", "message"),
    [
        (_missing, None, r"missing key 'visual\.ln_post\.bias'"),
        (_extra, None, r"unexpected key 'visual\.head\.weight'"),
        (_shape, None, r"'ln_final\.bias' has shape \(65,\).*expects \(64,\)"),
        (
            None,
            "ViT-L/14-336",
            r"'visual\.conv1\.weight' has shape \(128, 3, 8, 8\), "
            r"ViT-L/14-336 expects \(1024, 3, 14, 14\)",
        ),
        (_resnet, None, r"'visual\.layer1\.0\.conv1\.weight'.*ModifiedResNet"),
        (_custom_text, None, r"'text\.transformer.*CustomTextCLIP"),
    ],
)
def test_mismatched_checkpoint_names_the_key(openai_model, edit, expect, message):
    state_dict = numpy_state_dict(openai_model)
    if edit is not None:
        edit(state_dict)
    with pytest.raises(CheckpointError, match=message):
        conversion.convert_openai_state_dict(state_dict, expect=expect)


def test_matching_expect_passes_and_cli_error_exits_2(openai_model, tmp_path, capsys):
    sd = {f"module.{k}": v for k, v in openai_model.state_dict().items()}
    assert conversion.convert_openai_state_dict(numpy_state_dict(openai_model))[0] is not None
    torch.save(sd, tmp_path / "tiny.pt")
    argv = [str(tmp_path / "tiny.pt"), "--out", str(tmp_path / "out"), "--expect", "ViT-B-16"]
    assert conversion.main(argv) == 2
    err = capsys.readouterr().err
    assert (
        "'visual.conv1.weight' has shape (128, 3, 8, 8), ViT-B-16 expects (768, 3, 16, 16)" in err
    )
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "flax_model.msgpack").exists()


def test_image_size_resizes_positions_pytorch_format_and_tokenizer_copy(
    openai_model, plain_checkpoint, converted_jit, tmp_path
):
    from safetensors.numpy import load_file

    out = tmp_path / "out"
    argv = [str(plain_checkpoint), "--out", str(out), "--image-size", "64", "--format", "pytorch"]
    assert conversion.main([*argv, "--tokenizer", str(converted_jit)]) == 0
    weights = load_file(str(out / "model.safetensors"))
    original = openai_model.visual.positional_embedding.detach().numpy()  # (1 + 6*6, 128)
    table = weights["vision_model.embeddings.position_embedding.weight"]
    assert table.shape == (1 + 8 * 8, 128)
    np.testing.assert_array_equal(table, resize_position_embedding(original, 8))
    np.testing.assert_array_equal(table[0], original[0])  # class position kept
    assert json.loads((out / "config.json").read_text())["vision_config"]["image_size"] == 64
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        assert filecmp.cmp(out / name, converted_jit / name, shallow=False), name
    clip = load_clip(str(out), image_size=64, cache_dir=tmp_path / "cache", dtype="float32")
    np.testing.assert_array_equal(
        clip.params["vision_model"]["embeddings"]["position_embedding"]["embedding"], table
    )


def test_missing_tokenizer_source_is_a_clear_error(plain_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(conversion, "open_clip_bpe_path", lambda: None)
    assert conversion.main([str(plain_checkpoint), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "open_clip_torch" in err and "--tokenizer" in err
    assert not (tmp_path / "out").exists()
    assert (
        conversion.main(
            [str(plain_checkpoint), "--out", str(tmp_path / "out"), "--tokenizer", str(tmp_path)]
        )
        == 2
    )
    assert "no tokenizer files" in capsys.readouterr().err


def test_hf_directory_source(tiny_clip_dir, tmp_path):
    """A HF PyTorch directory converts to msgpack with the same params; the tokenizer comes
    along; another architecture than --expect is refused naming the key."""
    from transformers import CLIPConfig

    from clipsam_jax.clip.loading import param_shapes
    from clipsam_jax.clip.weights import read_state_dict, torch_to_flax

    out = tmp_path / "out"
    assert conversion.main([str(tiny_clip_dir), "--out", str(out)]) == 0
    config = CLIPConfig.from_pretrained(str(tiny_clip_dir))
    from transformers.models.clip.modeling_flax_clip import FlaxCLIPModule

    shapes = param_shapes(FlaxCLIPModule(config=config), config.vision_config.image_size)
    reference = flatten_dict(
        torch_to_flax(read_state_dict(tiny_clip_dir / "model.safetensors"), shapes, "ref")
    )
    ours = read_params(out)
    assert ours.keys() == reference.keys()
    for key in reference:
        np.testing.assert_array_equal(ours[key], reference[key])
    assert filecmp.cmp(out / "vocab.json", tiny_clip_dir / "vocab.json", shallow=False)
    with pytest.raises(
        CheckpointError,
        match=r"not ViT-B/32: .*'text_model\.\S+' has shape \(77, 32\).*\(77, 512\)",
    ):
        conversion.convert_hf_dir(tiny_clip_dir, expect="ViT-B/32")


@pytest.mark.parametrize("output_format", ["flax", "pytorch"])
def test_converted_hf_directory_loads_and_runs_like_the_source(
    tiny_clip_dir, tmp_path, output_format
):
    """The converted folder, loaded the way `--clip DIR` loads it, gives the patch tokens, image
    and text features of the source run in transformers' PyTorch `CLIPModel`."""
    import shutil

    from transformers import AutoTokenizer, CLIPModel

    source = tmp_path / "source"  # the tiny CLIP with random biases and layer norms
    shutil.copytree(tiny_clip_dir, source)
    model = CLIPModel.from_pretrained(str(tiny_clip_dir)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # layer_norm*, *layernorm, pre_layrnorm
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(str(source), safe_serialization=True)

    out = tmp_path / "out"
    assert conversion.main([str(source), "--out", str(out), "--format", output_format]) == 0
    weights = "flax_model.msgpack" if output_format == "flax" else "model.safetensors"
    assert (out / weights).is_file() and (out / "config.json").is_file()
    size = model.config.vision_config.image_size
    clip = load_clip(str(out), image_size=size, cache_dir=tmp_path / "cache", dtype="float32")

    pixels = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
    ours = make_image_encoder(clip)(clip.params, pixels)
    with torch.no_grad():
        vision = model.vision_model(
            torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True
        )
        image_embeds = model.visual_projection(vision.pooler_output).numpy()
    assert len(ours.patch_tokens) == len(clip.feature_layers) == 4
    for layer, tokens in zip(clip.feature_layers, ours.patch_tokens):
        reference = vision.hidden_states[layer][:, 1:].numpy()
        assert_close(tokens, reference.reshape(tokens.shape), f"patch tokens of layer {layer}")
    assert_close(ours.image_embeds, image_embeds, "projected image embedding")

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    tokens = tokenizer(list(SENTENCES), padding=True, return_tensors="pt")
    with torch.no_grad():
        text_reference = model.get_text_features(**tokens).numpy()
    text = TextFeatures(clip, use_disk_cache=False).encode_sentences(SENTENCES)
    assert_close(text, text_reference, "text features")
