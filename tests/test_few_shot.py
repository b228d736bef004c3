"""Few-shot mode: the nearest-neighbour map against numpy, the reference choice, the reference
splits of each layout, and the commands end to end on generated data with the tiny CLIP."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import eval.main
import eval.predict
from clipsam_jax import cli
from clipsam_jax.data.meta import write_meta_for_layout
from clipsam_jax.data.registry import load_dataset, reference_candidates
from clipsam_jax.data.types import Sample
from clipsam_jax.errors import DatasetError
from clipsam_jax.few_shot import choose_references
from clipsam_jax.metrics import compute_metrics
from clipsam_jax.models.few_shot import build_bank, few_shot_map, nearest_normal_distance

SIZE = "112"


def _numpy_distance(tokens: np.ndarray, references: np.ndarray) -> np.ndarray:
    """1 - max cosine similarity, directly: (B, h, w, C) against (k, h, w, C)."""
    q = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1]).astype(np.float64)
    r = references.reshape(-1, references.shape[-1]).astype(np.float64)
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    r /= np.linalg.norm(r, axis=-1, keepdims=True)
    return (1 - (q @ r.T).max(-1)).reshape(tokens.shape[:3])


@pytest.mark.parametrize("chunk", [7, 64, 1000])  # not a divisor, a divisor, one padded chunk
def test_nearest_normal_distance_equals_numpy(chunk):
    rng = np.random.default_rng(0)
    references = rng.normal(size=(3, 4, 4, 16)).astype(np.float32)
    tokens = rng.normal(size=(2, 4, 4, 16)).astype(np.float32)
    (bank,) = build_bank([references], chunk)
    steps = -(-48 // chunk)  # the fewest steps of at most `chunk` rows, padded by < steps rows
    assert (
        bank.shape[0] == steps and bank.shape[1] <= chunk and 48 <= bank[:, :, 0].size < 48 + steps
    )
    got = np.asarray(nearest_normal_distance(jnp.asarray(tokens), jnp.asarray(bank)))
    np.testing.assert_allclose(got, _numpy_distance(tokens, references), atol=1e-5)


def test_hand_computed_distances_and_the_layer_mean():
    """A patch equal to a reference is at 0, an orthogonal one at 1, an opposite one at 2; the
    map averages the layers and resizes like the rough map (constant maps stay constant)."""
    reference = np.zeros((1, 1, 1, 4), np.float32)
    reference[..., 0] = 3.0  # the length does not matter, only the direction
    tokens = np.zeros((3, 1, 1, 4), np.float32)
    tokens[0, ..., 0], tokens[1, ..., 1], tokens[2, ..., 0] = 1.0, 2.0, -5.0
    (bank,) = build_bank([reference], chunk=2)
    got = np.asarray(nearest_normal_distance(jnp.asarray(tokens), jnp.asarray(bank)))
    np.testing.assert_allclose(got.ravel(), [0.0, 1.0, 2.0], atol=1e-6)
    banks = build_bank([reference, reference], chunk=2)
    layers = [jnp.asarray(tokens), jnp.asarray(tokens[::-1])]
    mean = np.asarray(few_shot_map(layers, [jnp.asarray(b) for b in banks], 5, False))
    assert mean.shape == (3, 5, 5)
    np.testing.assert_allclose(mean[:, 2, 2], [1.0, 1.0, 1.0], atol=1e-6)  # (0+2)/2, (1+1)/2


def _samples(count: int, folder: str = "train/good") -> list[Sample]:
    return [Sample(Path(f"/data/part/{folder}/{i:03d}.png"), None, "part", "good", 0)
            for i in range(count)]  # fmt: skip


def test_choice_is_seeded_nested_and_never_a_tested_image():
    candidates = _samples(10)
    one, two, four = (choose_references(candidates, k, 3, "part") for k in (1, 2, 4))
    assert four[:2] == two and two[:1] == one  # a larger k only adds references
    assert choose_references(candidates, 4, 3, "part") == four  # reproducible from the seed
    assert choose_references(candidates, 4, 4, "part") != four
    assert choose_references(list(reversed(candidates)), 4, 3, "part") == four  # order-free
    tested = [s.image_path for s in four]
    others = choose_references(candidates, 6, 3, "part", exclude=tested)
    assert not {s.image_path for s in others} & set(tested)
    with pytest.raises(DatasetError, match=r"--shots 7: class 'part' has only 6"):
        choose_references(candidates, 7, 3, "part", exclude=tested)


def test_reference_splits_of_each_layout(synthetic_data, tmp_path):
    mvtec = reference_candidates("mvtec", synthetic_data / "mvtec")
    for samples in mvtec.values():
        assert samples and all("/train/good/" in s.image_path.as_posix() for s in samples)
    tested = {s.image_path for v in load_dataset("visa", synthetic_data / "visa").values()
              for s in v}  # fmt: skip
    visa = reference_candidates("visa", synthetic_data / "visa")
    assert all(s.label == 0 and s.image_path not in tested for v in visa.values() for s in v)
    # meta.json's train entries: the same images as the layout's own train split.
    root = tmp_path / "visa"
    shutil.copytree(synthetic_data / "visa", root)
    write_meta_for_layout("visa", root)
    assert reference_candidates("meta", root) == reference_candidates("visa", root)
    with pytest.raises(DatasetError, match="mtd has no normal training images"):
        reference_candidates("mtd", tmp_path)


@pytest.fixture(scope="module")
def few_shot_runs(synthetic_data, tiny_clip_dir, tmp_path_factory):
    """eval.main on the generated VisA layout at k = 0, 1, 2, 4 with the few-shot map alone
    (weight 1) and at k = 2 with the default weight: {label: (metrics.json, maps per class)}."""
    root = tmp_path_factory.mktemp("few_shot")
    world = synthetic_data
    runs = {}
    for label, extra in {"k0": ["--shots", "0"], "k1": ["--shots", "1"], "k2": ["--shots", "2"],
                         "k4": ["--shots", "4"], "k2_default": ["--shots", "2"]}.items():  # fmt: skip
        weight = [] if label.endswith("default") or label == "k0" else ["--few-shot-weight", "1"]
        argv = ["--test", "visa", "--data-root", str(world / "visa"), "--no-umci", "--clip",
                str(tiny_clip_dir), "--image-size", SIZE, "--output", str(root / label),
                "--sam", "none", "--no-progress", "--panels", "0", "--save-maps", *extra,
                *weight]  # fmt: skip
        report = eval.main.main(argv)
        maps = {p.stem: np.load(p) for p in sorted((root / label / "maps").glob("*.npz"))}
        runs[label] = (report, maps)
    return runs


def test_eval_lists_its_references_which_are_never_tested(few_shot_runs, synthetic_data):
    report, _ = few_shot_runs["k2"]
    chosen = report["few_shot"]["references"]
    assert report["few_shot"]["shots"] == 2 and report["few_shot"]["weight"] == 1.0
    tested = {s.image_path.relative_to(synthetic_data / "visa").as_posix()
              for v in load_dataset("visa", synthetic_data / "visa").values() for s in v}  # fmt: skip
    assert set(chosen) == set(report["rough"]["classes"])
    for name, files in chosen.items():
        assert len(files) == 2 and not set(files) & tested, name
        assert files[:1] == few_shot_runs["k1"][0]["few_shot"]["references"][name]
    assert "few_shot" not in few_shot_runs["k0"][0]  # zero-shot: nothing listed
    assert few_shot_runs["k2_default"][0]["few_shot"]["references"] == chosen  # same seed


def test_more_references_never_raise_the_map(few_shot_runs):
    """The banks are nested (k = 1 ⊂ 2 ⊂ 4), so the distance to the nearest normal patch can
    only fall as k grows; the maps are compared where they are pure few-shot maps (weight 1)."""
    for smaller, larger in (("k1", "k2"), ("k2", "k4")):
        for name, maps in few_shot_runs[larger][1].items():
            before = few_shot_runs[smaller][1][name]["rough"].astype(np.float32)
            after = maps["rough"].astype(np.float32)
            assert (after <= before + 2e-3).all(), (name, smaller, larger)  # float16 maps
            assert after.mean() < before.mean(), (name, smaller, larger)


def test_pixel_auroc_at_k_0_1_2_4_is_reported(few_shot_runs, capsys):
    """The pixel AUROC of the map at each k, on generated data with the tiny random CLIP (NOT
    ClipSAM results): printed, and recomputed from the saved maps by an independent path."""
    table = {}
    for label in ("k0", "k1", "k2", "k4"):
        report, maps = few_shot_runs[label]
        table[label] = report["rough"]["mean"]["pixel_auroc"]
        name = sorted(maps)[0]
        again = compute_metrics(maps[name]["rough"].astype(np.float32), maps[name]["masks"])
        assert again["pixel_auroc"] == pytest.approx(
            report["rough"]["classes"][name]["pixel_auroc"], abs=1e-6
        )
    with capsys.disabled():
        print("\nfew-shot pixel AUROC, generated VisA layout, tiny random CLIP:", table)
    assert all(0.0 <= v <= 1.0 for v in table.values())


def test_predict_with_a_reference_folder(synthetic_data, tiny_clip_dir, tmp_path, capsys):
    normal = synthetic_data / "visa" / "candle" / "Data" / "Images" / "Normal"
    references = tmp_path / "good"
    references.mkdir()
    for path in sorted(normal.iterdir())[:3]:
        Image.open(path).save(references / f"{path.stem}.png")
    common = ["--no-umci", "--clip", str(tiny_clip_dir), "--image-size", SIZE, "--sam", "none",
              "--no-progress", "--class-name", "candle", "--reference-dir", str(references)]  # fmt: skip
    inputs = synthetic_data / "visa" / "candle" / "Data" / "Images" / "Anomaly"
    report = eval.predict.main([str(inputs), "--output", str(tmp_path / "all"), *common])
    assert len(report["model"]["few_shot"]["references"]) == 3  # the whole folder
    two = eval.predict.main([str(inputs), "--output", str(tmp_path / "two"), *common,
                             "--shots", "2"])  # fmt: skip
    assert len(two["model"]["few_shot"]["references"]) == 2
    first = json.loads((tmp_path / "two" / "predictions.json").read_text())
    assert first["model"]["few_shot"] == two["model"]["few_shot"]
    # Without the folder, --shots is refused before any work, naming the missing flag.
    status = cli.run(eval.predict.main, [str(inputs), "--output", str(tmp_path / "none"),
                                         *common[:-2], "--shots", "2"], configure_logging=False)  # fmt: skip
    assert status == 2 and not (tmp_path / "none").exists()
    assert "--shots 2 needs --reference-dir DIR" in capsys.readouterr().err
