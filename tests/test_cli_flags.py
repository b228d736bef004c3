"""Every flag the README names parses with its command and sets the config field it claims.

The table below says, per flag, which command takes it, the value to give and where it lands
(a config field for the three main commands, the parsed namespace for the tools). A flag added
to the README without a row, or a row whose flag stops reaching its field, fails here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

import eval.app
import eval.main
import eval.predict
import eval.reproduce
import train.main
from clipsam_jax import cli, launch, options
from clipsam_jax.config import (
    ClipConfig,
    EvalConfig,
    HeadConfig,
    OptimConfig,
    RefineConfig,
    RuntimeConfig,
    TrainConfig,
    resolve_clip,
)
from clipsam_jax.data import download, meta
from clipsam_jax.errors import ConfigError
from clipsam_jax.reproduce.plan import ReproduceConfig
from conversion import clip as conversion_clip
from conversion import head as conversion_head

ROOT = Path(__file__).resolve().parent.parent


def _run_all_parser(argv):
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args(argv)


# command → (required arguments, argv → the object whose fields the flags set)
COMMANDS = {
    "train": (["--train", "mvtec"], lambda a: train.main.config_from_args(train.main.parse(a))),
    "eval": (["--test", "visa"], lambda a: eval.main.config_from_args(eval.main.parse(a))),
    "eval-args": (["--test", "visa"], eval.main.parse),
    "train-runtime": (["--train", "mvtec"], lambda a: cli.runtime_from_args(train.main.parse(a))),
    "eval-runtime": (["--test", "visa"], lambda a: cli.runtime_from_args(eval.main.parse(a))),
    "predict-runtime": (
        ["photos", "--output", "out"],
        lambda a: cli.runtime_from_args(eval.predict.parse(a)),
    ),
    "predict": (
        ["photos", "--output", "out"],
        lambda a: eval.predict.config_from_args(eval.predict.parse(a)),
    ),
    "app": ([], lambda a: eval.app.config_from_args(eval.app.parse(a))),
    "app-args": ([], eval.app.parse),
    "app-runtime": ([], lambda a: cli.runtime_from_args(eval.app.parse(a))),
    "conversion.clip": (["model.pt", "--out", "o"], conversion_clip._parser().parse_args),
    "conversion.head export": (
        ["export", "--checkpoint", "runs/a", "--out", "h.pth"],
        conversion_head._parser().parse_args,
    ),
    "conversion.head import": (
        ["import", "--state-dict", "h.pth", "--config", "h.json", "--workdir", "w"],
        conversion_head._parser().parse_args,
    ),
    "conversion.head aprilgan": (
        ["aprilgan", "--pth", "a.pth", "--workdir", "w"],
        conversion_head._parser().parse_args,
    ),
    "reproduce": ([], lambda a: options.from_args(ReproduceConfig, eval.reproduce.parse(a))),
    "reproduce-args": ([], eval.reproduce.parse),
    "reproduce-runtime": ([], lambda a: cli.runtime_from_args(eval.reproduce.parse(a))),
    "data.download": (["mvtec"], download._parser().parse_args),
    "data.meta": (["--layout", "mvtec", "--root", "r"], meta._parser().parse_args),
    "benchmarks/run_all.py": ([], _run_all_parser),
    "launch": (["--processes", "1"], lambda a: launch.parse([*a, "--", "eval.main"])[0]),
}

# (command, flag and its value, dotted field, expected value)
ROWS = [
    ("train", ["--train", "visa"], "dataset", "visa"),
    ("train", ["--workdir", "runs/x"], "workdir", "runs/x"),
    ("train", ["--clip", "weights/clip"], "clip.model", "weights/clip"),
    ("train", ["--image-size", "336"], "clip.image_size", 336),
    ("train", ["--templates", "aprilgan35"], "clip.templates", "aprilgan35"),
    ("train", ["--object-name", "spaced"], "clip.object_name", "spaced"),
    ("train", ["--prompt-normalization", "mean"], "clip.prompt_normalization", "mean"),
    ("train", ["--dtype", "bfloat16"], "clip.dtype", "bfloat16"),
    ("train-runtime", ["--clip-attention", "reference"], "clip_attention", "reference"),
    ("train", ["--separate-projections"], "head.shared_projection", False),
    ("train", ["--strip-kernel", "1"], "head.strip_kernel", 1),
    ("train", ["--gru-reading", "sequence"], "head.gru_reading", "sequence"),
    ("train", ["--pool-sizes", "2,4"], "head.pool_sizes", (2, 4)),
    ("train", ["--align-corners"], "head.align_corners", True),
    ("train", ["--stage-average", "logits"], "head.stage_average", "logits"),
    ("train", ["--init", "flax"], "head.init", "flax"),
    ("train", ["--loss-resolution", "grid"], "loss.resolution", "grid"),
    ("train", ["--dice-smooth", "0.5"], "loss.dice_smooth", 0.5),
    ("train", ["--weight-decay", "0.05"], "optim.weight_decay", 0.05),
    ("train", ["--batch-size", "2"], "optim.batch_size", 2),
    ("train", ["--seed", "7"], "seed", 7),
    ("train", ["--checkpoint-every", "9"], "checkpoint_every_steps", 9),
    ("train", ["--max-to-keep", "1"], "max_to_keep", 1),
    ("train", ["--no-feature-cache"], "feature_cache", False),
    ("eval", ["--test", "mtd"], "dataset", "mtd"),
    ("eval", ["--checkpoint", "runs/mvtec"], "checkpoint", "runs/mvtec"),
    ("eval", ["--output", "res"], "output", "res"),
    ("eval", ["--classes", "a,b"], "classes", ("a", "b")),
    ("eval", ["--image-size", "336"], "clip.image_size", 336),
    ("eval-runtime", ["--clip-attention", "fused"], "clip_attention", "fused"),
    ("eval", ["--dtype", "float32"], "clip.dtype", "float32"),
    ("eval", ["--head-dtype", "clip"], "clip.head_dtype", "clip"),
    ("eval", ["--batch-size", "3"], "batch_size", 3),
    ("eval", ["--no-umci"], "no_umci", True),
    ("eval", ["--pro", "cflow"], "pro_mode", "cflow"),
    ("eval", ["--save-maps"], "save_maps", True),
    ("eval-runtime", ["--overlap-classes", "on"], "overlap_classes", "on"),
    ("eval", ["--sam", "none"], "refine.sam", "none"),
    ("eval", ["--sam-checkpoint", "w/sam.pth"], "refine.sam_checkpoint", "w/sam.pth"),
    ("eval", ["--download-sam"], "refine.download_sam", True),
    ("eval", ["--sam-dtype", "auto"], "refine.sam_dtype", "auto"),
    ("eval-runtime", ["--sam-attention", "sdpa"], "sam_attention", "sdpa"),
    ("eval-runtime", ["--sam-compile"], "sam_compile", True),
    ("eval-runtime", ["--sam-images-per-call", "2"], "sam_images_per_call", 2),
    ("predict-runtime", ["--sam-attention", "stock"], "sam_attention", "stock"),
    ("eval", ["--threshold", "0.3"], "refine.threshold", 0.3),
    ("eval", ["--connectivity", "4"], "refine.connectivity", 4),
    ("eval", ["--points", "3"], "refine.points", 3),
    ("eval", ["--points", "0"], "refine.points", 0),  # boxes only
    ("eval", ["--point-sampling", "per_component"], "refine.point_sampling", "per_component"),
    ("eval", ["--fusion-norm", "minmax"], "refine.fusion_norm", "minmax"),
    ("eval", ["--shots", "4"], "few_shot.shots", 4),
    ("eval", ["--few-shot-weight", "0.8"], "few_shot.weight", 0.8),
    ("eval-runtime", ["--few-shot-chunk", "512"], "few_shot_chunk", 512),
    ("predict", ["--reference-dir", "good"], "reference_dir", "good"),
    ("predict", ["--shots", "2"], "few_shot.shots", 2),
    ("eval-args", ["--demo"], "demo", True),
    ("predict", ["--class-name", "screw"], "class_name", "screw"),
    ("predict", ["--checkpoint", "runs/mvtec"], "checkpoint", "runs/mvtec"),
    ("predict", ["--output", "elsewhere"], "output", "elsewhere"),
    ("predict", ["--map-format", "npy"], "map_format", "npy"),
    ("app", ["--host", "0.0.0.0"], "host", "0.0.0.0"),
    ("app", ["--port", "8000"], "port", 8000),
    ("app", ["--max-upload-mb", "5"], "max_upload_mb", 5),
    ("app", ["--max-image-pixels", "1000"], "max_image_pixels", 1000),
    ("app", ["--checkpoint", "runs/mvtec"], "checkpoint", "runs/mvtec"),
    ("app", ["--sam", "vit_b"], "refine.sam", "vit_b"),
    ("app", ["--clip", "weights/clip"], "clip.model", "weights/clip"),
    ("app-args", ["--demo"], "demo", True),
    ("app-runtime", ["--cache-dir", "weights/cache"], "cache_dir", "weights/cache"),
    ("conversion.clip", ["--out", "weights/c"], "out", "weights/c"),
    ("conversion.clip", ["--expect", "ViT-L/14-336"], "expect", "ViT-L/14-336"),
    ("conversion.clip", ["--hidden-act", "gelu"], "hidden_act", "gelu"),
    ("conversion.clip", ["--image-size", "518"], "image_size", 518),
    ("conversion.head export", ["--checkpoint", "runs/b"], "checkpoint", "runs/b"),
    ("conversion.head import", ["--state-dict", "x.pth"], "state_dict", "x.pth"),
    ("conversion.head import", ["--config", "x.json"], "config", "x.json"),
    ("conversion.head aprilgan", ["--pth", "v.pth"], "pth", "v.pth"),
    ("conversion.head aprilgan", ["--workdir", "runs/v"], "workdir", "runs/v"),
    ("data.download", ["--out", "data/m"], "out", "data/m"),
    ("data.meta", ["--layout", "visa"], "layout", "visa"),
    ("data.meta", ["--root", "data/v"], "root", "data/v"),
    ("benchmarks/run_all.py", ["--all-clip-variants"], "all_clip_variants", True),
    ("reproduce", ["--data-root", "datasets"], "data_root", "datasets"),
    ("reproduce", ["--only", "table1,table3/threshold"], "only", ("table1", "table3/threshold")),
    ("reproduce", ["--epochs", "1"], "epochs", 1),
    ("reproduce", ["--clip", "weights/clip"], "clip", "weights/clip"),
    ("reproduce", ["--image-size", "336"], "image_size", 336),
    ("reproduce", ["--sam", "vit_b"], "sam", "vit_b"),
    ("reproduce", ["--sam-checkpoint", "w/sam.pth"], "sam_checkpoint", "w/sam.pth"),
    ("reproduce", ["--seed", "2"], "seed", 2),
    ("reproduce", ["--refiners", "hq_vit_h=w/hq.pth"], "refiners", ("hq_vit_h=w/hq.pth",)),
    ("reproduce", ["--output", "repro"], "output", "repro"),
    ("reproduce", ["--shots", "1,8"], "shots", (1, 8)),
    ("reproduce-args", ["--plan"], "plan", True),
    ("launch", ["--processes", "4"], "processes", 4),
    ("launch", ["--cpu-devices", "2"], "cpu_devices", 2),
    ("launch", ["--gpus-per-process", "1"], "gpus_per_process", 1),
    ("launch", ["--port", "5000"], "port", 5000),
    ("launch", ["--timeout", "60"], "timeout", 60.0),
    ("reproduce-args", ["--demo"], "demo", True),
    ("reproduce-runtime", ["--compilation-cache", "xla"], "compilation_cache", "xla"),
]
# Flags of other programs that the README shows (`ruff format --check`, pytest-xdist's, pip's).
FOREIGN = {"--check", "--maxprocesses", "--dist", "--no-build-isolation"}


def _field(obj, dotted: str):
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def readme_flags() -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", (ROOT / "README.md").read_text()))


def test_every_readme_flag_has_a_row():
    covered = {argv[0] for _, argv, _, _ in ROWS} | FOREIGN
    missing = sorted(readme_flags() - covered)
    assert not missing, f"README flags without a row in this table: {missing}"


@pytest.mark.parametrize(("command", "argv", "field", "expected"), ROWS,
                         ids=[f"{c}:{a[0]}" for c, a, _, _ in ROWS])  # fmt: skip
def test_flag_sets_its_field(command, argv, field, expected):
    base, build = COMMANDS[command]
    default, given = _field(build(base), field), _field(build([*base, *argv]), field)
    assert given == expected
    assert default != expected, f"{argv} does not change {field} from its default"


def test_eval_clip_flags_override_only_what_is_given():
    """On eval and predict the CLIP flags replace a checkpoint's settings: the ones given are
    named in `clip_given`, so the checkpoint's values apply to the others."""
    trained = ClipConfig(model="weights/trained", image_size=112, templates="aprilgan35")
    for module, base in ((eval.main, ["--test", "visa"]), (eval.predict, ["i", "--output", "o"])):
        plain = module.config_from_args(module.parse(base))
        assert plain.clip_given == ()
        assert resolve_clip(trained, plain.clip, plain.clip_given) == trained
        config = module.config_from_args(module.parse([*base, "--image-size", "518"]))
        assert config.clip_given == ("image_size",)
        merged = resolve_clip(trained, config.clip, config.clip_given)
        assert merged == dataclasses.replace(trained, image_size=518)  # given = the default
        assert resolve_clip(None, config.clip, config.clip_given) == config.clip  # no head


@pytest.mark.parametrize("value", ["0", "2", "-1", "x"])
def test_strip_kernel_must_be_odd_and_positive(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main.parse(["--train", "mvtec", "--strip-kernel", value])
    assert exit_info.value.code == 2
    assert "--strip-kernel" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "argv", "flag", "message"),
    [
        ("train", ["--train", "mvtec", "--epochs", "0"], "--epochs", "must be >= 1"),
        ("train", ["--train", "mvtec", "--batch-size", "0"], "--batch-size", "must be >= 1"),
        ("train", ["--train", "mvtec", "--image-size", "0"], "--image-size", "must be >= 1"),
        ("train", ["--train", "mvtec", "--pool-sizes", "3,x"], "--pool-sizes", "integers"),
        ("train", [], "--train", "required"),
        ("eval", ["--test", "visa", "--threshold", "1.5"], "--threshold", "must be <= 1"),
        ("eval", ["--test", "visa", "--threshold", "-1"], "--threshold", "must be >= 0"),
        ("eval", ["--test", "visa", "--points", "-3"], "--points", "must be >= 0"),
        ("eval", ["--test", "visa", "--connectivity", "6"], "--connectivity", "must be one of 4, 8"),
        ("eval", [], "--test", "required"),
        ("predict", ["i", "--output", "o", "--mask-threshold", "2"], "--mask-threshold", "<= 1"),
    ],
)  # fmt: skip
def test_out_of_range_flags_are_refused_naming_the_flag(command, argv, flag, message, capsys):
    parse = {"train": train.main.parse, "eval": eval.main.parse, "predict": eval.predict.parse}
    with pytest.raises(SystemExit) as exit_info:
        parse[command](argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and message in err, err


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (TrainConfig(optim=OptimConfig(epochs=0)), "--epochs: must be >= 1"),
        (TrainConfig(dataset="nope"), "--train: must be one of"),
        (EvalConfig(refine=RefineConfig(threshold=1.5)), "--threshold: must be <= 1"),
        (TrainConfig(head=HeadConfig(strip_kernel=2)), "--strip-kernel: must be odd"),
        (RuntimeConfig(conv_impl="fast"), "conv_impl: must be one of"),
    ],
)
def test_configs_built_in_code_are_checked_like_flags(config, message):
    with pytest.raises(ConfigError, match=message):
        options.check(config)
    options.check(type(config)())  # the defaults are valid


def test_config_argv_rebuilds_a_config():
    """`cli.config_argv` writes the flags `config_from_args` reads back: inverted and plain
    bools, tuples, nested fields, and only the given CLIP fields of an evaluation."""
    config = TrainConfig(
        dataset="visa", workdir="runs/x", feature_cache=False, max_steps=0,
        clip=ClipConfig(model="weights/clip", image_size=336),
        head=HeadConfig(pool_sizes=(2, 4), shared_projection=False, align_corners=True),
        optim=OptimConfig(learning_rate=5e-4),
    )  # fmt: skip
    argv = cli.config_argv(config, always=("dataset",))
    assert "--no-feature-cache" in argv and "--separate-projections" in argv
    assert train.main.config_from_args(train.main.parse(argv)) == config
    evaluation = EvalConfig(dataset="mtd", clip=ClipConfig(image_size=336),
                            clip_given=("image_size",), refine=RefineConfig(multimask=False))  # fmt: skip
    argv = cli.config_argv(evaluation, always=("dataset",))
    assert argv == ["--test", "mtd", "--image-size", "336", "--single-mask"]
    assert eval.main.config_from_args(eval.main.parse(argv)) == evaluation
