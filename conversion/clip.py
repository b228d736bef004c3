"""Convert a CLIP checkpoint into a Flax CLIP directory in Hugging Face layout.

    python -m conversion.clip SRC --out DIR [--tokenizer DIR] [--image-size S]
        [--format flax|pytorch] [--expect ViT-L/14-336] [--vision-heads N] [--text-heads N]
        [--hidden-act quick_gelu|gelu]

SRC is one of
  - OpenAI's original `.pt` (a TorchScript archive) or a plain OpenAI-format state dict;
  - an open_clip ViT checkpoint with the default text tower (`.pt`/`.bin`/`.safetensors`,
    possibly wrapped as {"state_dict": ...} and with `module.` / `_orig_mod.` prefixes);
  - a Hugging Face CLIP directory (config.json + weights + tokenizer files).
DIR receives `config.json` (a transformers `CLIPConfig`), `flax_model.msgpack` (or
`model.safetensors` with `--format pytorch`) and tokenizer files, so that
`clipsam_jax.clip.loading.load_clip(DIR)` loads it without torch.

OpenAI and open_clip checkpoints carry no tokenizer: the CLIP BPE files are built from the
vocabulary open_clip ships (`pip install open_clip_torch`), or copied from `--tokenizer DIR`.
User errors print one message on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gzip
import importlib.util
import json
import shutil
import sys
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipsam_jax import cli, options
from clipsam_jax.clip.loading import TOKENIZER_FILES, WEIGHT_FILES, param_shapes
from clipsam_jax.clip.position import resize_position_embedding
from clipsam_jax.clip.weights import (
    describe_file,
    flax_to_torch,
    read_state_dict,
    torch_load,
    torch_to_flax,
)
from clipsam_jax.config import ClipConfig
from clipsam_jax.errors import CheckpointError, ConfigError
from conversion.openai_keys import (
    IGNORED_KEYS,
    ClipArch,
    check_attn_mask,
    check_keys,
    expected_shapes,
    infer_arch,
    known_arch,
    openai_to_hf,
    reject_unsupported,
)

# Prefixes training wrappers add to every key: DistributedDataParallel, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# CLIP's BPE: 49152 entries minus 256 bytes and the 2 special tokens are merges (OpenAI's
# SimpleTokenizer reads exactly these lines of the vocabulary file, after its header line).
_BPE_MERGES = 49152 - 256 - 2
_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


# ----------------------------------------------------------------------------- reading sources


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a `constants.pkl` (plain torch.save zips have
    none)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def _to_numpy(state_dict: Mapping[str, Any], source: str) -> dict[str, np.ndarray]:
    out = {}
    for key, value in state_dict.items():
        if not hasattr(value, "detach"):
            raise CheckpointError(f"{source}: {key!r} is a {type(value).__name__}, not a tensor")
        out[key] = value.detach().float().cpu().numpy()
    return out


_FORMATS = ("Pass OpenAI's .pt, an open_clip .pt/.bin/.safetensors checkpoint or a Hugging Face "
            "CLIP directory.")  # fmt: skip


def read_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], str]:
    """Read an OpenAI/open_clip checkpoint file → (raw state dict as float32 numpy, format).

    TorchScript archives go through `torch.jit.load`; pickles through `torch.load` with
    `weights_only=True` (no arbitrary code runs); `.safetensors` through safetensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    if path.suffix == ".safetensors":
        return read_state_dict(path), "safetensors state dict"
    import torch

    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but OpenAI ships it
            warnings.simplefilter("ignore", FutureWarning)
            if _is_torchscript(path):
                loaded = torch.jit.load(str(path), map_location="cpu").state_dict()
                kind = "TorchScript archive (OpenAI)"
            else:
                loaded = torch_load(path, "CLIP checkpoint", _FORMATS)
                kind = "pickled state dict"
    except CheckpointError:
        raise
    except Exception as error:  # a damaged TorchScript archive
        raise CheckpointError(
            f"{path}: cannot read it as a CLIP checkpoint: it looks like {describe_file(path)}. "
            + _FORMATS
        ) from error
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(loaded).__name__}")
    if isinstance(loaded.get("state_dict"), Mapping):  # open_clip training checkpoint
        loaded, kind = loaded["state_dict"], kind + " in a 'state_dict' wrapper"
    return _to_numpy(loaded, str(path)), kind


def normalize_state_dict(
    state_dict: Mapping[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Strip wrapper prefixes and drop the documented non-weight keys (`IGNORED_KEYS`).

    Returns (OpenAI-layout state dict, names of the dropped keys).
    """
    state_dict = dict(state_dict)
    if isinstance(state_dict.get("state_dict"), Mapping):  # wrapper passed in directly
        state_dict = dict(state_dict["state_dict"])
    for prefix in _WRAPPER_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    dropped = sorted(k for k in state_dict if k in IGNORED_KEYS)
    if "attn_mask" in state_dict and "positional_embedding" in state_dict:
        check_attn_mask(state_dict["attn_mask"], np.shape(state_dict["positional_embedding"])[0])
    return {k: v for k, v in state_dict.items() if k not in IGNORED_KEYS}, dropped


# ----------------------------------------------------------------------------- conversion


def clip_config(arch: ClipArch, hidden_act: str = "quick_gelu") -> Any:
    """A transformers `CLIPConfig` for `arch`.

    Token ids follow OpenAI's vocabulary (`<|startoftext|>` = vocab - 2, `<|endoftext|>` =
    vocab - 1, padding with `<|endoftext|>` as CLIPTokenizer does): FlaxCLIP pools the text at
    the first `input_ids == eos_token_id`, which is the sentence's end token even when padding
    repeats it. `write_flax_clip_dir` re-reads them from the written tokenizer.
    """
    from transformers import CLIPConfig

    text = dict(
        vocab_size=arch.vocab_size,
        hidden_size=arch.text_width,
        intermediate_size=arch.text_mlp,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        max_position_embeddings=arch.context_length,
        projection_dim=arch.embed_dim,
        hidden_act=hidden_act,
        bos_token_id=arch.vocab_size - 2,
        eos_token_id=arch.vocab_size - 1,
        pad_token_id=arch.vocab_size - 1,
    )
    vision = dict(
        hidden_size=arch.vision_width,
        intermediate_size=arch.vision_mlp,
        num_hidden_layers=arch.vision_layers,
        num_attention_heads=arch.vision_heads,
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        projection_dim=arch.embed_dim,
        hidden_act=hidden_act,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=arch.embed_dim)


def _target_shapes(config: Any) -> dict:
    from transformers.models.clip.modeling_flax_clip import FlaxCLIPModule

    return param_shapes(FlaxCLIPModule(config=config), int(config.vision_config.image_size))


def resize_vision_positions(config: Any, params: dict, image_size: int) -> tuple[Any, dict]:
    """Resize the vision position table for input size S (class position kept) and set the
    config's image size to S. Returns new (config, params); the inputs are left untouched."""
    patch = int(config.vision_config.patch_size)
    if image_size <= 0 or image_size % patch:
        raise ConfigError(f"--image-size {image_size} is not a positive multiple of patch {patch}")
    config = copy.deepcopy(config)
    embeddings = dict(params["vision_model"]["embeddings"])
    table = embeddings["position_embedding"]["embedding"]  # (1 + g*g, width)
    embeddings["position_embedding"] = {
        "embedding": resize_position_embedding(table, image_size // patch)
    }
    vision = {**params["vision_model"], "embeddings": embeddings}
    config.vision_config.image_size = image_size
    return config, {**params, "vision_model": vision}


def convert_openai_state_dict(
    state_dict: Mapping[str, np.ndarray],
    *,
    expect: str | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    hidden_act: str = "quick_gelu",
    image_size: int | None = None,
    source: str = "checkpoint",
) -> tuple[Any, dict]:
    """OpenAI / open_clip ViT CLIP weights → (transformers `CLIPConfig`, Flax params).

    Args:
      state_dict: {OpenAI key: array}, possibly with a `state_dict` wrapper or prefixes.
      expect: an architecture name ("ViT-L/14-336", ...): the weights must have its shapes.
      vision_heads, text_heads: head counts (not visible in shapes; see `infer_arch`).
      hidden_act: "quick_gelu" (OpenAI's, open_clip `-quickgelu`) or "gelu".
      image_size: S, to resize the vision position grid (default: the native size).
    Raises `CheckpointError` naming any missing, unexpected or mis-shaped key.
    """
    state_dict, _ = normalize_state_dict(state_dict)
    reject_unsupported(state_dict)
    if expect is not None:
        arch = known_arch(expect)
        arch = dataclasses.replace(
            arch,
            vision_heads=vision_heads or arch.vision_heads,
            text_heads=text_heads or arch.text_heads,
        )
        check_keys(state_dict, expected_shapes(arch), f"{expect}")
    else:
        arch = infer_arch(state_dict, vision_heads, text_heads)
        check_keys(state_dict, expected_shapes(arch), f"the inferred {arch.describe()}")
    config = clip_config(arch, hidden_act)
    params = torch_to_flax(openai_to_hf(state_dict), _target_shapes(config), source)
    if image_size is not None and image_size != arch.image_size:
        config, params = resize_vision_positions(config, params, image_size)
    return config, params


def _config_like(config: Any, arch: ClipArch) -> Any:
    """`config` with the architecture fields of `arch` (token ids, activation etc. kept)."""
    expected = clip_config(arch, config.text_config.hidden_act)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(expected.text_config, name, getattr(config.text_config, name))
    expected.vision_config.hidden_act = config.vision_config.hidden_act
    return expected


def convert_hf_dir(
    directory: str | Path,
    *,
    expect: str | None = None,
    hidden_act: str | None = None,
    image_size: int | None = None,
) -> tuple[Any, dict]:
    """A Hugging Face CLIP directory (PyTorch or Flax weights) → (`CLIPConfig`, Flax params)."""
    from flax import serialization
    from transformers import CLIPConfig

    directory = Path(directory)
    try:
        config = CLIPConfig.from_pretrained(str(directory))
    except Exception as error:
        raise CheckpointError(f"{directory}: cannot read config.json ({error})") from error
    if hidden_act is not None:
        config.text_config.hidden_act = config.vision_config.hidden_act = hidden_act
    weights = next((directory / n for n in WEIGHT_FILES if (directory / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{directory}: no weights file ({', '.join(WEIGHT_FILES)})")
    if weights.name == "flax_model.msgpack":
        try:
            flax_params = serialization.msgpack_restore(weights.read_bytes())
        except Exception as error:
            raise CheckpointError(f"{weights}: cannot read Flax params ({error})") from error
        state_dict = flax_to_torch(flax_params)  # so torch_to_flax checks every key and shape
    else:
        state_dict = read_state_dict(weights)
    if expect is not None:
        config = _config_like(config, known_arch(expect))
    try:
        params = torch_to_flax(state_dict, _target_shapes(config), str(weights))
    except CheckpointError as error:
        if expect is None:
            raise
        raise CheckpointError(f"checkpoint is not {expect}: {error}") from error
    if image_size is not None and image_size != int(config.vision_config.image_size):
        config, params = resize_vision_positions(config, params, image_size)
    return config, params


# ----------------------------------------------------------------------------- tokenizer


def open_clip_bpe_path() -> Path | None:
    """open_clip's `bpe_simple_vocab_16e6.txt.gz`, found without importing open_clip (slow)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    return path if path.is_file() else None


def resolve_tokenizer_source(tokenizer: str | Path | None, fallback: Path | None = None) -> Path:
    """The tokenizer to write: a directory of HF tokenizer files (copied) or open_clip's BPE
    vocabulary file (built). Checked before any conversion work, so a missing one fails fast."""
    if tokenizer is not None:
        directory = Path(tokenizer)
        if not any((directory / name).is_file() for name in TOKENIZER_FILES):
            raise CheckpointError(
                f"--tokenizer {directory}: no tokenizer files there (looked for "
                f"{', '.join(TOKENIZER_FILES)})"
            )
        return directory
    if fallback is not None:
        return fallback
    bpe = open_clip_bpe_path()
    if bpe is None:
        raise CheckpointError(
            "OpenAI and open_clip checkpoints carry no tokenizer. Install open_clip_torch "
            "(`pip install open_clip_torch`; its CLIP BPE vocabulary is used) or pass "
            "--tokenizer DIR with the Hugging Face tokenizer files (vocab.json + merges.txt or "
            "tokenizer.json) of a CLIP model."
        )
    return bpe


def byte_symbols() -> list[str]:
    """The 256 byte symbols of CLIP/GPT-2 BPE in vocabulary order: printable bytes
    ('!'..'~', '¡'..'¬', '®'..'ÿ') as themselves, then the other bytes, in byte order, as
    chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), 256)
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def write_bpe_tokenizer(bpe_file: Path, out: Path, context_length: int) -> None:
    """Write CLIP's tokenizer (vocab.json, merges.txt, then HF fast-tokenizer files) from
    OpenAI's BPE vocabulary file (a header line, then merges "a b").

    Vocabulary (49408 ids): the 256 byte symbols, the same with `</w>`, each merge result in
    merge order, `<|startoftext|>` (49406), `<|endoftext|>` (49407).
    """
    from transformers import CLIPTokenizerFast

    with gzip.open(bpe_file, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")[1 : 1 + _BPE_MERGES]
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != _BPE_MERGES or any(len(m) != 2 for m in merges):
        raise CheckpointError(f"{bpe_file}: not CLIP's BPE vocabulary ({len(merges)} merges)")
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab = {token: i for i, token in enumerate([*tokens, *_SPECIAL_TOKENS])}
    if len(vocab) != len(tokens) + len(_SPECIAL_TOKENS):  # a repeated token would shift ids
        raise CheckpointError(f"{bpe_file}: repeated tokens in the BPE vocabulary")
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "\n".join(["#version: 0.2", *(" ".join(m) for m in merges)]) + "\n"
    (out / "merges.txt").write_text(merges_text, encoding="utf-8")
    tokenizer = CLIPTokenizerFast(
        vocab_file=str(out / "vocab.json"),
        merges_file=str(out / "merges.txt"),
        model_max_length=context_length,
    )
    tokenizer.save_pretrained(str(out))


def copy_tokenizer(directory: Path, out: Path) -> list[str]:
    """Copy the HF tokenizer files present in `directory` to `out`; returns their names."""
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (directory / name).is_file():
            if (directory / name).resolve() != (out / name).resolve():
                shutil.copyfile(directory / name, out / name)
            copied.append(name)
    return copied


def _check_tokenizer(out: Path, config: Any) -> None:
    """Load the written tokenizer; set the config's token ids from it; check its ids fit."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(out))
    except Exception as error:
        raise CheckpointError(f"{out}: the tokenizer files do not load ({error})") from error
    text = config.text_config
    if len(tokenizer) > text.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {len(tokenizer)} tokens but 'token_embedding.weight' has only "
            f"{text.vocab_size} rows: it is not this model's tokenizer"
        )
    if tokenizer.eos_token_id is None:
        raise CheckpointError(f"{out}: the tokenizer has no end-of-text token")
    text.bos_token_id = tokenizer.bos_token_id
    text.eos_token_id = tokenizer.eos_token_id  # FlaxCLIP pools the text at this token
    text.pad_token_id = tokenizer.pad_token_id
    if text.eos_token_id == 2 and len(tokenizer) - 1 != 2:
        # FlaxCLIP treats eos id 2 as a legacy config and pools at the largest id instead.
        raise CheckpointError(f"{out}: an end-of-text id of 2 makes FlaxCLIP pool wrongly")


# ----------------------------------------------------------------------------- writing


def _check_out_dir(out: Path, weights_name: str) -> None:
    """Refuse an output directory holding another weights file: `load_clip` would pick it."""
    for name in WEIGHT_FILES:
        if name != weights_name and (out / name).exists():
            raise CheckpointError(
                f"{out} already holds {name}, which load_clip would read instead of the "
                f"converted {weights_name}; choose an empty --out directory"
            )


def write_flax_clip_dir(
    config: Any, params: dict, tokenizer_source: Path, out: str | Path, weights_format: str = "flax"
) -> Path:
    """Write a HF-layout CLIP directory: tokenizer files, `config.json`, and the weights.

    Args:
      config: transformers `CLIPConfig` (its token ids are set from the written tokenizer).
      params: Flax CLIP params at the config's vision image size.
      tokenizer_source: a directory of HF tokenizer files (copied) or open_clip's
        `bpe_simple_vocab_16e6.txt.gz` (built), as `resolve_tokenizer_source` returns.
      out: the output directory (created).
      weights_format: "flax" → `flax_model.msgpack`; "pytorch" → `model.safetensors` in HF
        PyTorch naming.
    """
    from flax import serialization

    out = Path(out)
    weights_name = {"flax": "flax_model.msgpack", "pytorch": "model.safetensors"}[weights_format]
    _check_out_dir(out, weights_name)
    config = copy.deepcopy(config)
    if tokenizer_source.is_dir():
        copy_tokenizer(tokenizer_source, out)
    else:
        write_bpe_tokenizer(tokenizer_source, out, config.text_config.max_position_embeddings)
    _check_tokenizer(out, config)
    config.save_pretrained(str(out))
    partial = out / (weights_name + ".partial")
    if weights_format == "flax":
        partial.write_bytes(serialization.to_bytes(params))
    else:
        from safetensors.numpy import save_file

        save_file(flax_to_torch(params), str(partial), metadata={"format": "pt"})
    partial.replace(out / weights_name)  # a crash never leaves a truncated weights file
    return out


# ----------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m conversion.clip",
        description="Convert an OpenAI / open_clip / Hugging Face CLIP checkpoint into a Flax "
        "CLIP directory in Hugging Face layout (config.json, weights, tokenizer).",
    )
    parser.add_argument("src", help="OpenAI .pt, open_clip .pt/.bin/.safetensors, or HF dir")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--tokenizer",
        help="directory with HF tokenizer files to copy (default: the HF source's own, else "
        "CLIP's BPE vocabulary from open_clip_torch)",
    )
    # The checks of ClipConfig.image_size (a multiple of 14); absent keeps the source's grid.
    options.add_options(parser, ClipConfig, only=("image_size",), unset=("image_size",))
    parser.add_argument("--format", choices=("flax", "pytorch"), default="flax")
    parser.add_argument("--expect", help="required architecture, e.g. ViT-L/14-336")
    parser.add_argument("--vision-heads", type=int, help="default: known model, else width/64")
    parser.add_argument("--text-heads", type=int, help="default: known model, else width/64")
    parser.add_argument(
        "--hidden-act",
        choices=("quick_gelu", "gelu"),
        help="MLP activation; default quick_gelu (OpenAI's) for OpenAI/open_clip sources, the "
        "config's for HF ones. open_clip models trained without -quickgelu need gelu.",
    )
    return parser


def _convert_file(args: argparse.Namespace) -> tuple[Any, dict, Path]:
    src = Path(args.src)
    tokenizer = resolve_tokenizer_source(args.tokenizer)  # fail fast, before reading weights
    raw, kind = read_checkpoint(src)
    state_dict, dropped = normalize_state_dict(raw)
    print(f"{src}: {kind}, {len(state_dict)} tensors")
    for key in dropped:
        print(f"  ignored {key!r}: {IGNORED_KEYS[key]}")
    if args.hidden_act is None:
        note = "pass --hidden-act gelu for open_clip models trained with plain GELU"
        print(f"  activation quick_gelu (OpenAI's); {note}")
    config, params = convert_openai_state_dict(
        state_dict,
        expect=args.expect,
        vision_heads=args.vision_heads,
        text_heads=args.text_heads,
        hidden_act=args.hidden_act or "quick_gelu",
        image_size=args.image_size,
        source=str(src),
    )
    return config, params, tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for user errors)."""
    return cli.run(_main, argv)


def _main(argv: Sequence[str] | None) -> None:
    args = _parser().parse_args(argv)
    src = Path(args.src)
    if not src.exists():  # before anything else (the tokenizer, the weights) is looked at
        raise CheckpointError(f"{src}: no such file or directory. {_FORMATS}")
    if src.is_dir():
        fallback = src if any((src / n).is_file() for n in TOKENIZER_FILES) else None
        tokenizer = resolve_tokenizer_source(args.tokenizer, fallback)
        if args.vision_heads or args.text_heads:
            raise ConfigError("--vision-heads/--text-heads: a HF config.json sets them")
        config, params = convert_hf_dir(
            src, expect=args.expect, hidden_act=args.hidden_act, image_size=args.image_size
        )
    else:
        config, params, tokenizer = _convert_file(args)
    out = write_flax_clip_dir(config, params, tokenizer, args.out, args.format)
    vision = config.vision_config
    print(
        f"wrote {out}: vision {vision.num_hidden_layers}×{vision.hidden_size} patch "
        f"{vision.patch_size} at {vision.image_size}px, text "
        f"{config.text_config.num_hidden_layers}×{config.text_config.hidden_size}, "
        f"projection {config.projection_dim}, {args.format} weights"
    )


if __name__ == "__main__":
    sys.exit(main())
