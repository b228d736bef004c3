"""Loading the frozen CLIP backbone as a Flax module plus a params tree (docs/method.md §1).

Sources: a Hugging Face hub id, or a local directory in Hugging Face layout (`config.json`,
tokenizer files, and `flax_model.msgpack`, `model.safetensors` or `pytorch_model.bin`). PyTorch
weights are converted once; the Flax params are cached under the user cache dir keyed by the
source file, so the next load reads one msgpack file and needs no torch. Other formats (OpenAI
`.pt`, open_clip) go through `python -m conversion.clip` first.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from flax.traverse_util import flatten_dict

from clipsam_jax.clip.position import resize_position_embedding
from clipsam_jax.clip.weights import read_state_dict, torch_to_flax
from clipsam_jax.config import ClipConfig
from clipsam_jax.errors import CheckpointError, ConfigError

WEIGHT_FILES = ("flax_model.msgpack", "model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json")  # fmt: skip
_CACHE_FORMAT = 1  # bump when the cached params layout changes


def default_cache_dir() -> Path:
    """`$CLIPSAM_CACHE` or `$XDG_CACHE_HOME/clipsam_jax` or `~/.cache/clipsam_jax`."""
    if os.environ.get("CLIPSAM_CACHE"):
        return Path(os.environ["CLIPSAM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "clipsam_jax"


@dataclasses.dataclass(frozen=True, eq=False)
class ClipModel:
    """A loaded CLIP: Flax module, frozen params and tokenizer, at input size S.

    `params` holds the position embeddings already resized to S. `fingerprint` identifies the
    weights, S and the feature layers (feature-cache keys use it).
    """

    config: Any  # transformers.CLIPConfig with vision_config.image_size == image_size
    module: Any  # transformers FlaxCLIPModule
    params: dict
    tokenizer: Any
    image_size: int
    feature_layers: tuple[int, ...]
    fingerprint: str
    source: str
    attention: str = "auto"  # the vision tower's attention (clip.features.resolve_attention)

    @property
    def patch_size(self) -> int:
        return int(self.config.vision_config.patch_size)

    @property
    def grid(self) -> int:
        """H = W of the patch-token grid (S / patch size)."""
        return self.image_size // self.patch_size

    @property
    def feature_dim(self) -> int:
        """C, the width of the vision residual stream (1024 for ViT-L)."""
        return int(self.config.vision_config.hidden_size)

    @property
    def text_dim(self) -> int:
        """C_t, the joint embedding width (768 for ViT-L/14)."""
        return int(self.config.projection_dim)


def default_feature_layers(num_layers: int) -> tuple[int, ...]:
    """The four quarter points of the encoder depth: (6, 12, 18, 24) for ViT-L (Sec. 4.1)."""
    if num_layers < 4:
        raise ConfigError(f"CLIP has {num_layers} vision layers; ClipSAM needs at least 4")
    return tuple(round(num_layers * k / 4) for k in (1, 2, 3, 4))


def looks_local(model: str) -> bool:
    """Whether `--clip MODEL` names a local directory rather than a hub id ("org/name"): it
    exists, starts like a path, has other than one "/", or its first part is a local folder
    (`demo/tiny_clipp` next to `demo/`: a mistyped path, not a hub id to try for minutes)."""
    if Path(model).expanduser().exists() or model.startswith((".", "/", "~")):
        return True
    return model.count("/") != 1 or Path(model.split("/")[0]).is_dir()


def resolve_local(directory: Path) -> tuple[Path, Path]:
    """(config.json, weights file) of a local HF CLIP directory, or a `CheckpointError`."""
    if not directory.is_dir():
        raise CheckpointError(
            f"--clip {directory}: no such directory. Give a local CLIP directory (Hugging Face "
            "layout) or a hub id such as openai/clip-vit-large-patch14-336."
        )
    config = directory / "config.json"
    if not config.is_file():
        raise CheckpointError(
            f"{directory}: no config.json. Expected a Hugging Face CLIP directory (config.json, "
            f"tokenizer files and one of {', '.join(WEIGHT_FILES)}); convert OpenAI or open_clip "
            "checkpoints with `python -m conversion.clip SRC --out DIR`."
        )
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return config, directory / name
    raise CheckpointError(f"{directory}: no weights file (looked for {', '.join(WEIGHT_FILES)})")


def _download(repo_id: str) -> Path:
    """Fetch config, tokenizer and the first available weights format from the hub."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    def fetch(name: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, name))
        except EntryNotFoundError:
            return None
        except Exception as error:
            raise CheckpointError(
                f"{repo_id!r} is not a local directory, and fetching {name} of it from the "
                f"Hugging Face hub failed ({error}). Without network, download it elsewhere (`huggingface-cli download {repo_id}`) and pass "
                "the directory with --clip DIR."
            ) from error

    config = fetch("config.json")
    if config is None:
        raise CheckpointError(f"{repo_id!r} on the hub has no config.json: not a CLIP model")
    for name in TOKENIZER_FILES:
        fetch(name)
    if any(fetch(name) is not None for name in WEIGHT_FILES):
        return config.parent
    raise CheckpointError(f"{repo_id!r} on the hub has none of {', '.join(WEIGHT_FILES)}")


def _load_config(path: Path) -> Any:
    from transformers import CLIPConfig

    try:
        if json.loads(path.read_text()).get("model_type") != "clip":
            raise CheckpointError(f"{path}: model_type is not 'clip'")
        return CLIPConfig.from_pretrained(str(path.parent))
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(f"{path}: malformed CLIP config ({error})") from error


def file_identity(path: str | Path) -> str:
    """`resolved path|size|mtime` of a file, so that a changed file gets new cache keys."""
    stat = Path(path).stat()
    return f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _file_key(path: Path) -> str:
    return hashlib.sha256(f"{file_identity(path)}|{_CACHE_FORMAT}".encode()).hexdigest()[:16]


def param_shapes(module: Any, image_size: int) -> dict:
    """The Flax CLIP param tree as `ShapeDtypeStruct`s, without running an init."""
    ids = jnp.zeros((1, 1), jnp.int32)
    pixels = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    # FlaxCLIPModule(input_ids, pixel_values, attention_mask, position_ids)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, pixels, ids + 1, ids))
    return shapes["params"]


def _check_tree(params: dict, expected: dict, source: str) -> None:
    got = {k: tuple(np.shape(v)) for k, v in flatten_dict(params).items()}
    want = {k: tuple(v.shape) for k, v in flatten_dict(expected).items()}
    problems = [f"missing {'/'.join(k)}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected {'/'.join(k)}" for k in sorted(set(got) - set(want))]
    problems += [
        f"{'/'.join(k)} has shape {got[k]}, expected {want[k]}"
        for k in sorted(set(got) & set(want))
        if got[k] != want[k]
    ]
    if problems:
        raise CheckpointError(
            f"{source}: params do not match the config: " + "; ".join(problems[:8])
        )


def _load_params(weights: Path, shapes: dict, cache_dir: Path) -> dict:
    """Flax params from a Flax msgpack, or converted (and cached) from PyTorch weights."""
    flax = weights.name == "flax_model.msgpack"
    cached = weights if flax else cache_dir / "clip" / _file_key(weights) / "flax_params.msgpack"
    if cached.is_file():
        try:
            params = serialization.msgpack_restore(cached.read_bytes())
        except Exception as error:
            raise CheckpointError(f"{cached}: cannot read Flax params ({error})") from error
        _check_tree(params, shapes, str(cached))
        return params
    params = torch_to_flax(read_state_dict(weights), shapes, str(weights))
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(".partial")
    partial.write_bytes(serialization.msgpack_serialize(params))
    partial.replace(cached)  # atomic: an interrupted conversion leaves no broken cache
    return params


def resolve_dtype(dtype: str) -> jnp.dtype:
    """ "auto" = bfloat16 on accelerators, float32 on CPU (docs/method.md §1)."""
    if dtype == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]


def load_clip(
    model: str, image_size: int = ClipConfig.image_size,
    feature_layers: tuple[int, ...] | None = None, cache_dir: str | Path | None = None,
    dtype: str = "auto", attention: str = "auto",
) -> ClipModel:  # fmt: skip
    """Load a CLIP checkpoint as a `ClipModel` at input size `image_size`.

    Args:
      model: hub id (e.g. "openai/clip-vit-large-patch14-336") or a local directory.
      image_size: S, any multiple of the patch size; the position grid is resized if S differs
        from the checkpoint's native size.
      feature_layers: encoder layers whose outputs are returned (default: quarters of depth).
      cache_dir: where converted params are cached (default `default_cache_dir()`).
      dtype: compute dtype of the encoder ("float32", "bfloat16" or "auto").
      attention: the vision tower's attention implementation ("auto", "reference", "fused",
        "blocked", "cudnn"; see `clip.features.resolve_attention`), checked here.
    """
    from transformers import AutoTokenizer
    from transformers.models.clip.modeling_flax_clip import FlaxCLIPModule

    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    directory = Path(model).expanduser() if looks_local(model) else _download(model)
    config_path, weights = resolve_local(directory)
    config = _load_config(config_path)
    patch = int(config.vision_config.patch_size)
    if image_size % patch:  # before the weights load: a bad size fails at once
        raise ConfigError(f"--image-size {image_size} is not a multiple of {directory}'s patch "
                          f"size {patch} (e.g. {round(image_size / patch) * patch or patch})")  # fmt: skip
    native = int(config.vision_config.image_size)
    shapes = param_shapes(FlaxCLIPModule(config=config), native)
    params = _load_params(weights, shapes, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except Exception as error:
        raise CheckpointError(
            f"{directory}: cannot load the CLIP tokenizer ({error}); the directory needs "
            "tokenizer.json or vocab.json + merges.txt"
        ) from error
    return build_clip_model(
        config, params, tokenizer, image_size, feature_layers, dtype,
        identity=f"{directory.name}-{_file_key(weights)}", source=str(directory),
        attention=attention,
    )  # fmt: skip


def build_clip_model(
    config: Any, params: dict, tokenizer: Any, image_size: int,
    feature_layers: tuple[int, ...] | None = None, dtype: str = "auto", identity: str = "random",
    source: str = "<in memory>", attention: str = "auto",
) -> ClipModel:  # fmt: skip
    """A `ClipModel` from a config and params at the config's native size (loaded, converted or
    random): resizes the position grid to `image_size` and fixes the feature layers."""
    from transformers.models.clip.modeling_flax_clip import FlaxCLIPModule

    config = copy.deepcopy(config)
    vision = config.vision_config
    patch = int(vision.patch_size)
    if image_size % patch:
        raise ConfigError(f"image size {image_size} is not a multiple of the patch size {patch}")
    if image_size != int(vision.image_size):
        position = params["vision_model"]["embeddings"]["position_embedding"]["embedding"]
        resized = resize_position_embedding(position, image_size // patch)
        path = ("vision_model", "embeddings", "position_embedding", "embedding")
        params = _replace_path(params, path, resized)
        vision.image_size = image_size
    layers = tuple(feature_layers or default_feature_layers(vision.num_hidden_layers))
    if not all(1 <= k <= vision.num_hidden_layers for k in layers):
        raise ConfigError(f"feature layers {layers} outside 1..{vision.num_hidden_layers}")
    compute_dtype = resolve_dtype(dtype)
    from clipsam_jax.clip.features import resolve_attention  # features imports this module

    resolve_attention(attention, compute_dtype)  # a bad choice fails here, before any work
    key = f"{identity}|{image_size}|{layers}|{jnp.dtype(compute_dtype).name}"
    fingerprint = f"{identity.split('-')[0]}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    return ClipModel(config=config, module=FlaxCLIPModule(config=config, dtype=compute_dtype),
                     params=jax.tree.map(_to_device, params), tokenizer=tokenizer,
                     image_size=image_size, feature_layers=layers, fingerprint=fingerprint,
                     source=source, attention=attention)  # fmt: skip


def _to_device(leaf: Any) -> Any:
    # Abstract leaves (jax.eval_shape of a full-size model without weights) stay abstract.
    return leaf if isinstance(leaf, jax.ShapeDtypeStruct) else jax.device_put(leaf)


def _replace_path(tree: dict, path: tuple[str, ...], value: Any) -> dict:
    """A copy of a nested dict with one leaf replaced (the input is left untouched)."""
    if not path:
        return value
    return {**tree, path[0]: _replace_path(tree[path[0]], path[1:], value)}
