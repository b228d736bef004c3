"""`python -m conversion.head`: head export to the PyTorch twin, import back, APRIL-GAN's weights.

Tiny sizes throughout: the tiny random CLIP (C = 48, C_t = 24, 4 layers, patch 14) at S = 112
(grid 8). One APRIL-GAN head is trained for 2 steps by `train_lib.train`; the UMCI workdirs are
written directly with `HeadCheckpointer` (compiling a UMCI train step on CPU takes too long).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file, save_file

from clipsam_jax import torch_ref, train_lib
from clipsam_jax.checkpoint import HeadCheckpointer, load_head
from clipsam_jax.config import (
    ClipConfig,
    HeadConfig,
    OptimConfig,
    TrainConfig,
    from_dict,
    to_dict,
)
from clipsam_jax.inference import load_rough_map_model
from clipsam_jax.models.heads import build_head
from clipsam_jax.models.init import init_params
from clipsam_jax.train_step import create_state, make_optimizer
from conversion import head as conversion

FEATURE_DIM, TEXT_DIM, STAGES, SIZE, GRID = 48, 24, 4, 112, 8  # the tiny CLIP at S = 112


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from clipsam_jax.clip.tiny import write_tiny_clip

    directory = write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), weights="flax")
    config = json.loads((directory / "config.json").read_text())
    assert config["vision_config"]["hidden_size"] == FEATURE_DIM
    assert config["projection_dim"] == TEXT_DIM
    return directory


@pytest.fixture(scope="module")
def trained_aprilgan(tmp_path_factory, clip_dir):
    """An APRIL-GAN head trained 2 steps by `train_lib.train` (the real workdir layout)."""
    from clipsam_jax.data import synthetic

    root = tmp_path_factory.mktemp("trained")
    data = synthetic.generate(
        "mvtec", root / "data", seed=0, classes=["bottle"], images_per_class=2, image_size=SIZE
    )
    config = TrainConfig(
        dataset="mvtec",
        data_root=str(data),
        workdir=str(root / "run"),
        max_steps=2,
        feature_cache_dir=str(root / "cache"),
        clip=ClipConfig(model=str(clip_dir), image_size=SIZE),
        head=HeadConfig(kind="aprilgan"),
        optim=OptimConfig(batch_size=2),
    )
    assert train_lib.train(config, progress=False).step == 2
    return root / "run"


def write_run(workdir: Path, head: HeadConfig, clip_dir: Path, seed: int) -> Path:
    """A workdir as train_lib leaves it, with random params (biases too) at step 3. Two stages
    (CLIP layers 2 and 4) keep the UMCI tracing and compilation short."""
    clip = ClipConfig(model=str(clip_dir), image_size=SIZE, feature_layers=UMCI_LAYERS)
    config = TrainConfig(dataset="mvtec", workdir=str(workdir), head=head, clip=clip)
    stages = len(UMCI_LAYERS)
    module = build_head(head, TEXT_DIM, stages)
    params = init_params(module, seed, [(1, GRID, GRID, FEATURE_DIM)] * stages, (1, 2, TEXT_DIM),
                         head.init)  # fmt: skip
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape, np.float32), params)
    meta = {
        "config": to_dict(config),
        "clip_fingerprint": "tiny-test",
        "feature_dim": FEATURE_DIM,
        "text_dim": TEXT_DIM,
        "num_stages": stages,
        "grid": GRID,
        "step": 3,
        "epoch": 0.5,
    }
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(meta["config"]))
    state = create_state(params, make_optimizer(config.optim))
    checkpointer = HeadCheckpointer(workdir)
    checkpointer.save(3, state.params, state.opt_state, meta)
    checkpointer.close()
    return workdir


UMCI_LAYERS = (2, 4)
UMCI_VARIANTS = {
    "umci_both": HeadConfig(hidden_dim=16, pool_sizes=(2, 4)),
    "umci_strip": HeadConfig(
        hidden_dim=16, pool_sizes=(2, 4), paths="strip", gru_reading="sequence"
    ),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, clip_dir, trained_aprilgan):
    """name → workdir, written on first use (the UMCI runs are shared by several tests)."""
    cache = {"aprilgan_trained": trained_aprilgan}

    def get(name: str) -> Path:
        if name not in cache:
            path = tmp_path_factory.mktemp(name) / "run"
            cache[name] = write_run(path, UMCI_VARIANTS[name], clip_dir, seed=len(name))
        return cache[name]

    return get


def cli(*args) -> int:
    """`python -m conversion.head ARGS` in-process: its exit status."""
    return conversion.main([str(a) for a in args])


def run_aprilgan(pth, workdir, clip_dir, *extra) -> int:
    return cli("aprilgan", "--pth", pth, "--workdir", workdir, "--clip", clip_dir,
               "--image-size", SIZE, *extra)  # fmt: skip


def random_inputs(seed: int, stages: int, batch: int = 2):
    rng = np.random.default_rng(seed)
    tokens = [
        rng.standard_normal((batch, GRID, GRID, FEATURE_DIM), np.float32) for _ in range(stages)
    ]
    text = rng.standard_normal((batch, 2, TEXT_DIM), np.float32)
    return tokens, text / np.linalg.norm(text, axis=-1, keepdims=True)


def flax_logits(head: HeadConfig, params, tokens, text) -> list[np.ndarray]:
    # With lax.conv: the shifted-matmul convs CPU runs default to take ~3× longer to compile;
    # both formulations compute the same function with the same params (tests/test_umci.py).
    module = build_head(head, TEXT_DIM, len(tokens), conv_impl="xla")
    return [np.asarray(o) for o in jax.jit(module.apply)({"params": params}, tokens, text)]


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))


def load_exported(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_torch

        return load_torch(str(path))
    return torch.load(path, weights_only=True)


def assert_same_tree(a, b) -> None:
    flat_a, flat_b = flatten_dict(dict(a)), flatten_dict(dict(b))
    assert set(flat_a) == set(flat_b)
    for key, value in flat_a.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_b[key]), err_msg=str(key))


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    ("variant", "suffix"),
    [("umci_both", ".pth"), ("umci_strip", ".safetensors"), ("aprilgan_trained", ".pth")],
)
def test_export_import_round_trip(variant, suffix, tmp_path, runs):
    run = runs(variant)
    params, meta = load_head(run)
    head = from_dict(HeadConfig, meta["config"]["head"])

    # Export: the JSON alone rebuilds the twin, which loads the weights strictly.
    out = tmp_path / "export" / f"head{suffix}"
    assert cli("export", "--checkpoint", run, "--step", meta["step"], "--out", out) == 0
    document = json.loads(out.with_suffix(".json").read_text())
    assert document["head"] == meta["config"]["head"]
    assert document["clip"] == meta["config"]["clip"]
    assert document["meta"]["grid"] == GRID and document["meta"]["step"] == meta["step"]
    twin_class = getattr(torch_ref, document["torch_module"].rsplit(".", 1)[1])
    assert twin_class is (torch_ref.AprilGanHead if head.kind == "aprilgan" else torch_ref.UMCIHead)
    twin = twin_class(**document["torch_kwargs"])
    twin.load_state_dict(load_exported(out), strict=True)

    # The twin computes the Flax head's logits.
    stages = meta["num_stages"]
    tokens, text = random_inputs(seed=7, stages=stages)
    ours = flax_logits(head, params, tokens, text)
    with torch.no_grad():
        theirs = twin([torch.from_numpy(t) for t in tokens], torch.from_numpy(text))
    assert len(theirs) == stages == len(meta["config"]["clip"]["feature_layers"] or range(4))
    for a, b in zip(ours, theirs):
        assert a.shape == (2, GRID, GRID, 2)
        assert relative_error(a, b.numpy()) < 1e-5

    # Import back: exact params, same metadata, fresh AdamW state, loadable for evaluation.
    imported = tmp_path / "imported"
    config = out.with_suffix(".json")
    assert cli("import", "--state-dict", out, "--config", config, "--workdir", imported) == 0
    back, back_meta = load_head(imported)
    assert_same_tree(back, params)
    for key in (
        "clip_fingerprint",
        "feature_dim",
        "text_dim",
        "num_stages",
        "grid",
        "step",
        "epoch",
    ):
        assert back_meta[key] == meta[key], key
    assert back_meta["config"]["head"] == meta["config"]["head"]
    assert back_meta["config"]["clip"] == meta["config"]["clip"]
    assert back_meta["config"]["workdir"] == str(imported)
    assert json.loads((imported / "config.json").read_text()) == back_meta["config"]
    if head.kind == "aprilgan":  # (orbax restores are slow: checked on the cheapest head)
        optimizer = make_optimizer(OptimConfig(**meta["config"]["optim"]))
        fresh = create_state(back, optimizer)
        checkpointer = HeadCheckpointer(imported)
        _, opt_state, _ = checkpointer.restore(meta["step"], fresh.params, fresh.opt_state)
        checkpointer.close()
        # The AdamW init of the params: count 0, zero moments.
        assert jax.tree.structure(opt_state) == jax.tree.structure(fresh.opt_state)
        for a, b in zip(jax.tree.leaves(opt_state), jax.tree.leaves(fresh.opt_state)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    model = load_rough_map_model(ClipConfig(), str(imported))
    assert model.head_config == head
    assert model.clip.image_size == SIZE and model.checkpoint_step == meta["step"]


# ----------------------------------------------------------------------------- APRIL-GAN


def aprilgan_state_dict(seed: int = 0, stages: int = STAGES) -> OrderedDict:
    """Keys and shapes of APRIL-GAN's `LinearLayer` (`fc` = ModuleList of Linear(C, C_t))."""
    gen = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for i in range(stages):
        state[f"fc.{i}.weight"] = torch.randn(TEXT_DIM, FEATURE_DIM, generator=gen) * 0.2
        state[f"fc.{i}.bias"] = torch.randn(TEXT_DIM, generator=gen) * 0.2
    return state


def aprilgan_reference(state, tokens_with_cls: torch.Tensor, text_features: torch.Tensor):
    """APRIL-GAN's pixel branch (their model.py LinearLayer.forward and test.py), per stage:
    drop the class token, fc[i], L2-normalize, 100 · tokens @ text_features (B, C_t, 2)."""
    maps = []
    for i in range(STAGES):
        x = tokens_with_cls[i][:, 1:, :] @ state[f"fc.{i}.weight"].T + state[f"fc.{i}.bias"]
        x = x / x.norm(dim=-1, keepdim=True)
        maps.append(100.0 * x @ text_features)  # (B, L, 2), channel 0 normal
    return maps


def test_aprilgan_pth_import_matches_their_formula(tmp_path, clip_dir):
    state = aprilgan_state_dict()
    pth = tmp_path / "visa_pretrained.pth"
    torch.save({"trainable_linearlayer": state}, pth)
    workdir = tmp_path / "april"
    assert run_aprilgan(pth, workdir, clip_dir) == 0
    params, meta = load_head(workdir)
    config = meta["config"]
    assert config["head"]["kind"] == "aprilgan" and config["dataset"] == "visa"
    assert config["clip"]["templates"] == "aprilgan35"
    assert config["clip"]["image_size"] == SIZE and config["clip"]["model"] == str(clip_dir)
    dims = (meta["feature_dim"], meta["text_dim"], meta["num_stages"], meta["grid"])
    assert dims == (FEATURE_DIM, TEXT_DIM, STAGES, GRID)

    # Their tokens carry the class token first; their text features are (B, C_t, 2) with
    # column 0 normal (torch.stack([normal, abnormal], dim=1)), each column unit norm.
    gen = torch.Generator().manual_seed(1)
    tokens = [torch.randn(2, 1 + GRID * GRID, FEATURE_DIM, generator=gen) for _ in range(STAGES)]
    text_features = torch.randn(2, TEXT_DIM, 2, generator=gen)
    text_features = text_features / text_features.norm(dim=1, keepdim=True)
    expected = aprilgan_reference(state, tokens, text_features)
    ours = flax_logits(
        HeadConfig(kind="aprilgan"),
        params,
        [t[:, 1:].reshape(2, GRID, GRID, FEATURE_DIM).numpy() for t in tokens],
        text_features.transpose(1, 2).contiguous().numpy(),  # L (B, 2, C_t), row 0 normal
    )
    for a, b in zip(ours, expected):
        assert relative_error(a.reshape(2, GRID * GRID, 2), b.numpy()) < 1e-5

    model = load_rough_map_model(ClipConfig(), str(workdir))
    assert model.text.templates == "aprilgan35" and model.clip.image_size == SIZE

    # A bare LinearLayer state dict (no wrapper), saved from DataParallel, imports the same.
    bare = tmp_path / "bare.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, bare)
    assert run_aprilgan(bare, tmp_path / "bare", clip_dir) == 0
    assert_same_tree(load_head(tmp_path / "bare")[0], params)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("fc.2.bias"), "missing key 'fc.2.bias'"),
        (lambda s: s.update({"fc.0.scale": torch.ones(3)}), "unexpected key 'fc.0.scale'"),
        (
            lambda s: s.update({"fc.1.weight": torch.zeros(TEXT_DIM, 40)}),
            "'fc.1.weight' has shape (24, 40), expected (24, 48)",
        ),
        (
            lambda s: s.update({"fc.4.weight": s["fc.0.weight"], "fc.4.bias": s["fc.0.bias"]}),
            "unexpected key 'fc.4.weight'",
        ),
    ],
)
def test_aprilgan_key_errors_name_the_key(edit, message, tmp_path, clip_dir, capsys):
    state = aprilgan_state_dict()
    edit(state)
    pth = tmp_path / "weights.pth"
    torch.save({"trainable_linearlayer": state}, pth)
    assert run_aprilgan(pth, tmp_path / "out", clip_dir) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_aprilgan_feature_layer_count_hint(tmp_path, clip_dir, capsys):
    pth = tmp_path / "three.pth"
    torch.save({"trainable_linearlayer": aprilgan_state_dict(stages=3)}, pth)
    assert run_aprilgan(pth, tmp_path / "out", clip_dir) == 2
    assert "pass --feature-layers" in capsys.readouterr().err
    assert run_aprilgan(pth, tmp_path / "out", clip_dir, "--feature-layers", "1,2,4") == 0
    params, meta = load_head(tmp_path / "out")
    assert sorted(params) == ["stage_0", "stage_1", "stage_2"]
    assert meta["config"]["clip"]["feature_layers"] == [1, 2, 4]


def test_refuses_existing_workdir_and_bad_files(tmp_path, clip_dir, capsys):
    pth = tmp_path / "mvtec_pretrained.pth"
    torch.save({"trainable_linearlayer": aprilgan_state_dict()}, pth)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    assert run_aprilgan(pth, taken, clip_dir) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00not a checkpoint" * 10)
    assert run_aprilgan(corrupt, tmp_path / "a", clip_dir) == 2
    assert f"{corrupt}: cannot read it as a state dict: it looks like" in capsys.readouterr().err
    assert run_aprilgan(tmp_path / "absent.pth", tmp_path / "b", clip_dir) == 2
    assert "absent.pth: no such file" in capsys.readouterr().err
    torch.save([1, 2, 3], tmp_path / "list.pth")
    assert run_aprilgan(tmp_path / "list.pth", tmp_path / "c", clip_dir) == 2
    assert "expected a state dict, found list" in capsys.readouterr().err
    assert run_aprilgan(pth, tmp_path / "d", clip_dir, "--trained-on", "visa") == 0
    assert load_head(tmp_path / "d")[1]["config"]["dataset"] == "visa"
    assert not any((tmp_path / name).exists() for name in "abc")

    # export: not a workdir, a missing step, an unsupported file name
    assert cli("export", "--checkpoint", tmp_path, "--out", tmp_path / "x.pth") == 2
    assert "no trained head here" in capsys.readouterr().err
    args = ("export", "--checkpoint", tmp_path / "d", "--out")
    assert cli(*args, tmp_path / "x.pth", "--step", 99) == 2
    assert "step 99" in capsys.readouterr().err
    assert cli(*args, tmp_path / "x.npz") == 2
    assert ".safetensors" in capsys.readouterr().err


def test_import_errors_name_the_key(tmp_path, runs, capsys):
    run = runs("umci_both")
    out = tmp_path / "head.safetensors"
    assert cli("export", "--checkpoint", run, "--out", out) == 0
    config = out.with_suffix(".json")
    state = load_file(str(out))

    def try_import(edit, name: str) -> str:
        edited = dict(state)
        edit(edited)
        path = tmp_path / f"{name}.safetensors"
        save_file(edited, str(path))
        workdir = tmp_path / name
        assert cli("import", "--state-dict", path, "--config", config, "--workdir", workdir) == 2
        assert not workdir.exists()
        return capsys.readouterr().err

    key = "stages.1.strip_row.gru.hn.bias"
    assert f"missing key {key!r}" in try_import(lambda s: s.pop(key), "missing")
    error = try_import(lambda s: s.update({"stages.0.extra.weight": np.ones(2, np.float32)}), "x")
    assert "unexpected key 'stages.0.extra.weight'" in error
    error = try_import(lambda s: s.update({key: np.ones(3, np.float32)}), "shape")
    assert f"{key!r} has shape (3,), expected (16,)" in error

    # A JSON whose twin arguments contradict its head settings, and a corrupt JSON.
    document = json.loads(config.read_text())
    document["torch_kwargs"]["hidden_dim"] = 8
    (tmp_path / "bad.json").write_text(json.dumps(document))
    args = ("import", "--state-dict", out, "--workdir", tmp_path / "y")
    assert cli(*args, "--config", tmp_path / "bad.json") == 2
    assert "torch_kwargs" in capsys.readouterr().err
    (tmp_path / "corrupt.json").write_text("{not json")
    assert cli(*args, "--config", tmp_path / "corrupt.json") == 2
    assert "not a JSON file" in capsys.readouterr().err
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    bad_state = ("import", "--state-dict", tmp_path / "corrupt.safetensors", "--config", config)
    assert cli(*bad_state, "--workdir", tmp_path / "z") == 2
    assert (
        "corrupt.safetensors: cannot read it as a state dict: it looks like"
        in capsys.readouterr().err
    )
    assert cli("import", "--state-dict", out, "--config", config, "--workdir", run) == 2
    assert "not empty" in capsys.readouterr().err
