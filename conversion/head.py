"""Trained heads between this project and PyTorch, and APRIL-GAN's released weights.

    python -m conversion.head export --checkpoint RUN_DIR [--step N] --out FILE.{pth,safetensors}
    python -m conversion.head import --state-dict FILE.{pth,safetensors} --config FILE.json
        --workdir OUT
    python -m conversion.head aprilgan --pth FILE --workdir OUT [--clip NAME_OR_DIR]
        [--image-size 518] [--feature-layers 6,12,18,24] [--trained-on mvtec|visa]

`export` writes the head of a training workdir as a state dict of its PyTorch twin
(`clipsam_jax.torch_ref.UMCIHead` or `AprilGanHead`) plus `FILE.json`: the head and CLIP
settings and the twin's constructor arguments, so that

    twin_class = getattr(clipsam_jax.torch_ref, doc["torch_module"].rsplit(".", 1)[1])
    twin = twin_class(**doc["torch_kwargs"])
    twin.load_state_dict(torch.load("FILE.pth"), strict=True)

rebuilds it. `import` is the inverse: a twin state dict and its JSON become a workdir that
`python -m eval.main --checkpoint OUT` evaluates (config.json and one orbax checkpoint with the
params, a freshly initialized AdamW state and the metadata `train.main` writes).

`aprilgan` reads APRIL-GAN's checkpoint (`{'trainable_linearlayer': LinearLayer state dict}`,
keys `fc.{i}.weight` (C_t, C) and `fc.{i}.bias` (C_t,)) into our APRIL-GAN head, with the CLIP
settings their released weights were trained with: ViT-L/14-336 at S=518, layers 6/12/18/24,
their 35 prompt templates. Their linear layers read the raw residual stream after those blocks,
class token dropped, with no `ln_post` (their `open_clip/transformer.py` and `model.py`), which
is exactly what our head is fed, so no extra normalization is needed.

Every user error (missing or malformed file, missing / unexpected / mis-shaped key, non-empty
output workdir) prints one message naming the file or key on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipsam_jax import cli, options
from clipsam_jax import config as config_lib
from clipsam_jax.clip.weights import describe_file, torch_load
from clipsam_jax.config import DEFAULT_CLIP, ClipConfig, HeadConfig, TrainConfig
from clipsam_jax.errors import CheckpointError, ConfigError
from conversion.head_params import flax_to_torch, torch_to_flax

FORMAT = "clipsam-jax-head"
FORMAT_VERSION = 1
STATE_DICT_SUFFIXES = (".pth", ".pt", ".safetensors")
TORCH_MODULES = {"umci": "UMCIHead", "aprilgan": "AprilGanHead"}
_TORCH_PREFIX = "clipsam_jax.torch_ref."
# APRIL-GAN's train.py saves {'trainable_linearlayer': LinearLayer.state_dict()}.
APRILGAN_WRAPPER = "trainable_linearlayer"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / torch.compile key prefixes
_MAX_LISTED = 8  # problems named per kind in one error message
_META_KEYS = ("clip_fingerprint", "feature_dim", "text_dim", "num_stages", "grid", "step", "epoch")


@dataclasses.dataclass(frozen=True)
class ClipDims:
    """What a head needs to know of its CLIP: C, C_t, the patch size and the encoder depth (and
    its MLP activation, for a note on APRIL-GAN's features)."""

    feature_dim: int
    text_dim: int
    patch_size: int
    num_layers: int
    hidden_act: str = "quick_gelu"


# The default CLIP's dimensions, so that importing APRIL-GAN's weights for it needs no network.
_KNOWN_CLIPS = {
    DEFAULT_CLIP: ClipDims(feature_dim=1024, text_dim=768, patch_size=14, num_layers=24)
}


# ----------------------------------------------------------------------------- state dicts


def read_state_dict(path: str | Path, wrapper: str | None = None) -> dict[str, np.ndarray]:
    """A `.pth`/`.pt` (torch pickle, read with `weights_only=True`) or `.safetensors` state dict
    → {key: float32 array}. With `wrapper`, a top-level {wrapper: state dict} is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file

            loaded: Any = load_file(str(path))
        except Exception as error:  # a damaged file
            raise CheckpointError(
                f"{path}: cannot read it as a state dict: it looks like {describe_file(path)}"
            ) from error
    else:
        loaded = torch_load(path, "state dict", "Pass the .pth or .safetensors file that "
                            "`conversion.head export` wrote, or APRIL-GAN's released .pth.")  # fmt: skip
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(loaded).__name__}")
    if wrapper is not None and wrapper in loaded:
        loaded = loaded[wrapper]
        if not isinstance(loaded, Mapping):
            raise CheckpointError(f"{path}: {wrapper!r} holds a {type(loaded).__name__}")
    out = {}
    for key, value in loaded.items():
        if hasattr(value, "detach"):  # a torch tensor; .float() also widens fp16 / bf16
            value = value.detach().cpu().float().numpy()
        elif not isinstance(value, np.ndarray):
            raise CheckpointError(f"{path}: {key!r} is a {type(value).__name__}, not a tensor")
        out[str(key)] = np.asarray(value, np.float32)
    for prefix in _WRAPPER_PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def write_state_dict(state_dict: Mapping[str, np.ndarray], path: Path) -> None:
    """Write a state dict as `.safetensors` or a torch pickle (by suffix), atomically."""
    partial = path.with_name(path.name + ".partial")
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file(dict(state_dict), str(partial), metadata={"format": "pt"})
    else:
        import torch

        torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, partial)
    partial.replace(path)  # a crash never leaves a truncated weights file under the real name


def check_state_dict(
    state_dict: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], source: str
) -> None:
    """`CheckpointError` naming every missing, unexpected or mis-shaped key (up to a few)."""
    missing = [k for k in expected if k not in state_dict]
    extra = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k!r} has shape {tuple(np.shape(state_dict[k]))}, expected {tuple(expected[k])}"
        for k in expected
        if k in state_dict and tuple(np.shape(state_dict[k])) != tuple(expected[k])
    ]
    problems = []
    for label, items in (("missing key", missing), ("unexpected key", extra), ("", wrong)):
        shown = [f"{label} {k!r}" if label else k for k in items[:_MAX_LISTED]]
        if len(items) > _MAX_LISTED:
            shown.append(f"... {len(items) - _MAX_LISTED} more")
        problems += shown
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


# ----------------------------------------------------------------------------- the torch twin


def torch_twin_spec(
    head: HeadConfig, num_stages: int, feature_dim: int, text_dim: int
) -> tuple[str, dict]:
    """(import path of the PyTorch twin class, its constructor kwargs) for a head config."""
    if head.kind == "umci":
        kwargs = dict(
            num_stages=num_stages, feature_dim=feature_dim, text_dim=text_dim,
            hidden_dim=head.hidden_dim, pool_sizes=[int(s) for s in head.pool_sizes],
            paths=head.paths, gru_reading=head.gru_reading,
            shared_projection=head.shared_projection, strip_kernel=head.strip_kernel,
            align_corners=head.align_corners,
        )  # fmt: skip
    elif head.kind == "aprilgan":
        kwargs = dict(num_stages=num_stages, feature_dim=feature_dim, text_dim=text_dim)
    else:
        raise ConfigError(f"unknown head kind {head.kind!r}; choose umci or aprilgan")
    return _TORCH_PREFIX + TORCH_MODULES[head.kind], kwargs


def build_torch_twin(module: str, kwargs: Mapping[str, Any], device: str = "cpu") -> Any:
    """Instantiate a twin named by `torch_twin_spec` (only the classes of `clipsam_jax.torch_ref`
    are accepted: a JSON file never names arbitrary code to import). device="meta" allocates
    nothing, for checking keys and shapes."""
    import torch

    from clipsam_jax import torch_ref

    name = module[len(_TORCH_PREFIX) :] if module.startswith(_TORCH_PREFIX) else None
    if name not in TORCH_MODULES.values():
        raise CheckpointError(
            f"torch_module {module!r} is not one of "
            + ", ".join(_TORCH_PREFIX + n for n in TORCH_MODULES.values())
        )
    kwargs = dict(kwargs)
    if "pool_sizes" in kwargs:
        kwargs["pool_sizes"] = tuple(kwargs["pool_sizes"])
    with torch.device(device):
        return getattr(torch_ref, name)(**kwargs)


def twin_shapes(module: str, kwargs: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """{state-dict key: shape} of the twin, in its state_dict order (built on the meta device)."""
    twin = build_torch_twin(module, kwargs, device="meta")
    return {k: tuple(v.shape) for k, v in twin.state_dict().items()}


def flax_param_shapes(
    head: HeadConfig, num_stages: int, feature_dim: int, text_dim: int, grid: int
) -> dict:
    """The Flax head's param tree as shapes (nothing is computed)."""
    import jax
    import jax.numpy as jnp

    from clipsam_jax.models.heads import build_head

    module = build_head(head, text_dim, num_stages)
    tokens = [jax.ShapeDtypeStruct((1, grid, grid, feature_dim), jnp.float32)] * num_stages
    text = jax.ShapeDtypeStruct((1, 2, text_dim), jnp.float32)
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), tokens, text)["params"]


# ----------------------------------------------------------------------------- workdirs


def _check_new_workdir(workdir: Path) -> None:
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise CheckpointError(
            f"{workdir} already exists and is not empty; imports write a new workdir only "
            "(choose another --workdir)"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_workdir(workdir: Path, train_config: TrainConfig, params: dict, meta: dict) -> Path:
    """A workdir as `train.main` leaves it: config.json and one orbax checkpoint at
    `meta["step"]` holding the params, a fresh AdamW state (`optax.adamw(...).init`) and meta."""
    from clipsam_jax.checkpoint import HeadCheckpointer
    from clipsam_jax.train_step import create_state, make_optimizer

    state = create_state(params, make_optimizer(train_config.optim))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config_lib.to_dict(train_config), indent=2))
    checkpointer = HeadCheckpointer(workdir, train_config.max_to_keep)
    try:
        checkpointer.save(int(meta["step"]), state.params, state.opt_state, meta)
    finally:
        checkpointer.close()
    return workdir


def _workdir_meta(
    train_config: TrainConfig, dims: Mapping[str, Any], provenance: dict
) -> dict[str, Any]:
    """The checkpoint metadata `train_lib.train` writes, plus where the weights came from."""
    return {
        "config": config_lib.to_dict(train_config),
        "clip_fingerprint": dims.get("clip_fingerprint"),
        "feature_dim": int(dims["feature_dim"]),
        "text_dim": int(dims["text_dim"]),
        "num_stages": int(dims["num_stages"]),
        "grid": int(dims["grid"]),
        "step": int(dims.get("step") or 0),
        "epoch": float(dims.get("epoch") or 0.0),
        "imported_from": provenance,
    }


def _configs_from(values: Mapping[str, Any], source: str) -> tuple[HeadConfig, ClipConfig]:
    try:
        head = config_lib.from_dict(HeadConfig, dict(values["head"]))
        clip = config_lib.from_dict(ClipConfig, dict(values["clip"]))
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: no valid head / clip settings ({error!r})") from error
    return head, clip


def _dims_from(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    try:
        dims = {k: values.get(k) for k in _META_KEYS}
        for key in ("feature_dim", "text_dim", "num_stages", "grid"):
            dims[key] = int(values[key])
            if dims[key] < 1:
                raise ValueError(f"{key} = {dims[key]}")
        dims["step"] = int(dims["step"] or 0)  # absent: an import starts a run at step 0
        dims["epoch"] = float(dims["epoch"] or 0.0)
        if dims["step"] < 0:
            raise ValueError(f"step = {dims['step']}")
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: missing or invalid {error!s}") from error
    return dims


# ----------------------------------------------------------------------------- export / import


def export_head(
    checkpoint: str | Path, out: str | Path, step: int | None = None
) -> tuple[Path, Path]:
    """Our orbax head (a training workdir) → twin state dict `out` and `out` with `.json`.

    Returns (state dict path, JSON path).
    """
    from clipsam_jax.checkpoint import load_head

    out = Path(out)
    if out.suffix not in STATE_DICT_SUFFIXES:
        raise ConfigError(f"--out {out}: name it with one of {', '.join(STATE_DICT_SUFFIXES)}")
    params, meta = load_head(checkpoint, step)
    source = f"{checkpoint} (checkpoint metadata)"
    head, clip = _configs_from(meta.get("config") or {}, source)
    dims = _dims_from(meta, source)
    module, kwargs = torch_twin_spec(
        head, dims["num_stages"], dims["feature_dim"], dims["text_dim"]
    )
    state_dict = flax_to_torch(params)
    expected = twin_shapes(module, kwargs)
    check_state_dict(state_dict, expected, f"{checkpoint}: params vs {module}")
    state_dict = {k: state_dict[k] for k in expected}  # the twin's own key order
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "torch_module": module,
        "torch_kwargs": kwargs,
        "head": config_lib.to_dict(head),
        "clip": config_lib.to_dict(clip),
        "meta": dims,
        "train_config": meta["config"],
        "interface": {
            "forward": "twin(patch_tokens, text) -> list of num_stages logits (B, H, W, 2), "
            "channel 0 normal, 1 anomalous",
            "patch_tokens": "list of num_stages float32 (B, H, W, feature_dim), H = W = grid: "
            "the CLIP vision residual stream after the encoder layers clip.feature_layers "
            "(Hugging Face hidden_states[k]; null = the quarter points of the depth, 6/12/18/24 "
            "for ViT-L/14), class token dropped, no post-layernorm, no projection",
            "text": "(B, 2, text_dim): row 0 normal, row 1 anomalous; per state the mean of "
            "the L2-normalized projected sentence embeddings (clip.templates), normalized again",
            "rough_map": f"clipsam_jax.torch_ref.rough_map(logits, S, "
            f"align_corners={head.align_corners}, average={head.stage_average!r})"
            + (
                ": mean over stages of softmax(bilinear resize to S x S)[..., 1]"
                if head.stage_average == "probabilities"
                else ": softmax(mean over stages of bilinear resize to S x S)[..., 1]"
            ),
        },
        "source": {"checkpoint": str(checkpoint), "step": meta.get("step")},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_state_dict(state_dict, out)
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(document, indent=2))
    return out, json_path


def _read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a JSON file ({error})") from error
    if not isinstance(document, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return document


def import_head(state_dict_path: str | Path, config_path: str | Path, workdir: str | Path) -> Path:
    """A twin state dict + the JSON `export` writes → a new workdir `eval.main` loads.

    The JSON needs "head", "clip" and "meta" (feature_dim, text_dim, num_stages, grid; step,
    epoch and clip_fingerprint are carried over when present); "torch_kwargs" and
    "torch_module", when present, must agree with them; "train_config" fills the rest of the
    run's config.json (its workdir, head and clip are replaced).
    """
    state_dict_path, workdir = Path(state_dict_path), Path(workdir)
    _check_new_workdir(workdir)
    document = _read_json(config_path)
    if document.get("format", FORMAT) != FORMAT:
        raise CheckpointError(f"{config_path}: format {document['format']!r} is not {FORMAT!r}")
    head, clip = _configs_from(document, str(config_path))
    dims = _dims_from(document.get("meta") or {}, f"{config_path} meta")
    module, kwargs = torch_twin_spec(
        head, dims["num_stages"], dims["feature_dim"], dims["text_dim"]
    )
    for key, want in (("torch_module", module), ("torch_kwargs", kwargs)):
        if key in document and document[key] != json.loads(json.dumps(want)):
            raise CheckpointError(
                f"{config_path}: {key} {document[key]!r} does not match head/meta ({want!r})"
            )
    state_dict = read_state_dict(state_dict_path)
    check_state_dict(state_dict, twin_shapes(module, kwargs), f"{state_dict_path} vs {module}")
    shapes = flax_param_shapes(head, dims["num_stages"], dims["feature_dim"], dims["text_dim"],
                               dims["grid"])  # fmt: skip
    params = torch_to_flax(state_dict, expected=shapes)
    try:
        base = config_lib.from_dict(TrainConfig, dict(document.get("train_config") or {}))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{config_path}: invalid train_config ({error})") from error
    train_config = dataclasses.replace(base, workdir=str(workdir), head=head, clip=clip)
    provenance = {"format": f"{module} state dict", "file": str(state_dict_path.resolve()),
                  "sha256": _sha256(state_dict_path)}  # fmt: skip
    meta = _workdir_meta(train_config, dims, provenance)
    return write_workdir(workdir, train_config, params, meta)


# ----------------------------------------------------------------------------- APRIL-GAN


def clip_dims(model: str) -> ClipDims:
    """C, C_t, patch size and depth of a CLIP (local directory or hub id), from its config.json
    only: the weights are not read. The default CLIP's are known without network."""
    local = Path(model).expanduser()
    if local.is_dir():
        directory = local
    elif model in _KNOWN_CLIPS:
        return _KNOWN_CLIPS[model]
    elif local.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise CheckpointError(f"--clip {model}: not a CLIP directory or a hub id")
    else:
        try:
            from huggingface_hub import hf_hub_download

            directory = Path(hf_hub_download(model, "config.json")).parent
        except Exception as error:
            raise CheckpointError(
                f"--clip {model}: cannot fetch its config.json from the Hugging Face hub "
                f"({error}); pass a local CLIP directory instead"
            ) from error
    try:
        from transformers import CLIPConfig

        if json.loads((directory / "config.json").read_text()).get("model_type") != "clip":
            raise ValueError("model_type is not 'clip'")
        config = CLIPConfig.from_pretrained(str(directory))
    except Exception as error:
        raise CheckpointError(f"--clip {model}: no valid CLIP config.json ({error})") from error
    vision = config.vision_config
    return ClipDims(
        feature_dim=int(vision.hidden_size), text_dim=int(config.projection_dim),
        patch_size=int(vision.patch_size), num_layers=int(vision.num_hidden_layers),
        hidden_act=str(vision.hidden_act),
    )  # fmt: skip


def _guess_dataset(path: Path) -> str:
    """APRIL-GAN names its weights `mvtec_pretrained.pth` / `visa_pretrained.pth`."""
    name = path.name.lower()
    return "visa" if "visa" in name and "mvtec" not in name else "mvtec"


def import_aprilgan(
    pth: str | Path,
    workdir: str | Path,
    clip: str = ClipConfig.model,
    image_size: int = ClipConfig.image_size,
    feature_layers: Sequence[int] | None = None,
    trained_on: str | None = None,
) -> Path:
    """APRIL-GAN's `LinearLayer` checkpoint → a new workdir with our APRIL-GAN head.

    Stage i of our head is their `fc[i]`: our Dense kernel (C, C_t) is their Linear weight
    (C_t, C) transposed, the bias as is. The run's config records the CLIP settings their
    weights expect: `clip` at S = `image_size`, `feature_layers` (None = the quarter points of
    the depth: their `--features_list 6 12 18 24` for ViT-L/14) and their 35 prompt templates
    (`templates="aprilgan35"`, normal state first as in their prompt ensemble).
    `trained_on` (default: guessed from the file name, else mvtec) is recorded as the run's
    dataset; it is informative only.
    """
    from clipsam_jax.clip.loading import default_feature_layers

    pth, workdir = Path(pth), Path(workdir)
    _check_new_workdir(workdir)
    dims = clip_dims(clip)
    if image_size < 1 or image_size % dims.patch_size:
        raise ConfigError(
            f"--image-size {image_size} is not a positive multiple of the patch size "
            f"{dims.patch_size} of {clip}"
        )
    layers = tuple(feature_layers) if feature_layers else default_feature_layers(dims.num_layers)
    if not all(1 <= k <= dims.num_layers for k in layers):
        raise ConfigError(f"--feature-layers {layers} outside 1..{dims.num_layers} of {clip}")
    raw = read_state_dict(pth, wrapper=APRILGAN_WRAPPER)
    stages = len(layers)
    expected = {}
    for i in range(stages):
        expected[f"fc.{i}.weight"] = (dims.text_dim, dims.feature_dim)
        expected[f"fc.{i}.bias"] = (dims.text_dim,)
    in_file = {int(m.group(1)) for m in map(re.compile(r"^fc\.(\d+)\.").match, raw) if m}
    hint = ""
    if in_file and len(in_file) != stages:
        hint = (f" (the file holds {len(in_file)} linear layers, the CLIP settings give "
                f"{stages} feature layers {layers}: pass --feature-layers)")  # fmt: skip
    try:
        check_state_dict(raw, expected, f"{pth} vs APRIL-GAN LinearLayer for {clip}")
    except CheckpointError as error:
        raise CheckpointError(f"{error}{hint}") from None
    state_dict = {f"stages.{i}.{leaf}": raw[f"fc.{i}.{leaf}"]
                  for i in range(stages) for leaf in ("weight", "bias")}  # fmt: skip
    head = HeadConfig(kind="aprilgan")
    grid = image_size // dims.patch_size
    shapes = flax_param_shapes(head, stages, dims.feature_dim, dims.text_dim, grid)
    params = torch_to_flax(state_dict, expected=shapes)
    clip_config = ClipConfig(
        model=clip, image_size=image_size, templates="aprilgan35",
        feature_layers=tuple(feature_layers) if feature_layers else None,
    )  # fmt: skip
    train_config = TrainConfig(
        dataset=trained_on or _guess_dataset(pth), workdir=str(workdir), clip=clip_config,
        head=head,
    )  # fmt: skip
    provenance = {"format": f"APRIL-GAN {{'{APRILGAN_WRAPPER}': LinearLayer}}",
                  "file": str(pth.resolve()), "sha256": _sha256(pth)}  # fmt: skip
    meta_dims = {"feature_dim": dims.feature_dim, "text_dim": dims.text_dim,
                 "num_stages": stages, "grid": grid}  # fmt: skip
    meta = _workdir_meta(train_config, meta_dims, provenance)
    return write_workdir(workdir, train_config, params, meta)


# ----------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m conversion.head",
        description="Move trained heads between this project and PyTorch, and import "
        "APRIL-GAN's released linear layers.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser(
        "export", help="training workdir → PyTorch state dict of the torch_ref twin + JSON"
    )
    export.add_argument("--checkpoint", required=True, help="training workdir (RUN_DIR)")
    export.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    export.add_argument(
        "--out", required=True, help="FILE.pth or FILE.safetensors; FILE.json is written beside"
    )
    back = commands.add_parser("import", help="state dict + JSON from export → new workdir")
    back.add_argument("--state-dict", required=True, help="FILE.pth or FILE.safetensors")
    back.add_argument("--config", required=True, help="the JSON written by export")
    back.add_argument("--workdir", required=True, help="new (or empty) output workdir")
    april = commands.add_parser("aprilgan", help="APRIL-GAN's .pth → new workdir (aprilgan head)")
    april.add_argument("--pth", required=True, help="e.g. exps/pretrained/mvtec_pretrained.pth")
    april.add_argument("--workdir", required=True, help="new (or empty) output workdir")
    # The CLIP settings their weights need: the same flags, defaults and checks as train.main's.
    options.add_options(april, ClipConfig, only=("model", "image_size", "feature_layers"))
    april.add_argument(
        "--trained-on", choices=("mvtec", "visa"),
        help="dataset the weights were trained on (default: from the file name, else mvtec)",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for user errors)."""
    return cli.run(_main, argv)


def _main(argv: Sequence[str] | None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "export":
        state_path, json_path = export_head(args.checkpoint, args.out, args.step)
        print(f"wrote {state_path} and {json_path}")
    elif args.command == "import":
        workdir = import_head(args.state_dict, args.config, args.workdir)
        print(f"wrote {workdir}; evaluate with `python -m eval.main --checkpoint {workdir}`")
    else:
        workdir = import_aprilgan(
            args.pth, args.workdir, args.model, args.image_size, args.feature_layers,
            args.trained_on,
        )  # fmt: skip
        trained_on = args.trained_on or _guess_dataset(Path(args.pth))
        other = "mvtec" if trained_on == "visa" else "visa"  # the cross-dataset protocol
        print(
            f"wrote {workdir}: APRIL-GAN head (trained on {trained_on}) for {args.model} at "
            f"S={args.image_size}, templates aprilgan35; evaluate with "
            f"`python -m eval.main --test {other} --checkpoint {workdir}`"
        )
        vit_l14 = dataclasses.replace(_KNOWN_CLIPS[DEFAULT_CLIP], hidden_act="quick_gelu")
        if args.image_size != 336 and clip_dims(args.model) == vit_l14:
            print(
                "note: at S != 336 APRIL-GAN's open_clip builds ViT-L-14-336 with nn.GELU "
                "where the OpenAI weights use QuickGELU (docs/weights.md); to reproduce "
                "their features exactly, convert CLIP with `python -m conversion.clip SRC "
                "--out DIR --hidden-act gelu` and import with --clip DIR"
            )


if __name__ == "__main__":
    sys.exit(main())
