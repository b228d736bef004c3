"""Evaluation end to end: train.main then eval.main on generated data, outputs, resume, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipsam_jax import cli, eval_lib
from clipsam_jax.checkpoint import load_head
from clipsam_jax.data import synthetic
from clipsam_jax.metrics import compute_metrics
from eval.main import main as eval_main
from train.main import main as train_main

SIZE = "112"
COMMON = ["--no-progress", "--batch-size", "4"]
PRO_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pro", "image_auroc", "image_ap",
            "image_f1_max")  # fmt: skip


@pytest.fixture(scope="module")
def trained_head(tiny_clip_dir, synthetic_data, tmp_path_factory):
    """A tiny UMCI head trained for a few steps with the real command."""
    workdir = tmp_path_factory.mktemp("eval_runs") / "mvtec"
    train_main([
        "--train", "mvtec", "--data-root", str(synthetic_data / "mvtec"), "--workdir",
        str(workdir), "--clip", str(tiny_clip_dir), "--image-size", SIZE, "--dtype", "float32",
        "--hidden-dim", "16", "--pool-sizes", "2,4", "--max-steps", "6", *COMMON,
    ])  # fmt: skip
    return workdir


def eval_args(synthetic_data, checkpoint, output, *extra) -> list[str]:
    return ["--test", "visa", "--data-root", str(synthetic_data / "visa"), "--checkpoint",
            str(checkpoint), "--output", str(output), *COMMON, *extra]  # fmt: skip


def test_train_then_eval_metrics_equal_recomputation_from_saved_maps(
    synthetic_data, trained_head, tmp_path
):
    output = tmp_path / "results"
    report = eval_main(eval_args(synthetic_data, trained_head, output, "--sam", "tiny-random",
                                 "--save-maps", "--panels", "1", "--pro", "cflow"))  # fmt: skip
    saved = json.loads((output / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["dataset"] == "visa" and saved["pro_mode"] == "cflow"
    assert saved["config"]["clip"]["image_size"] == 112  # taken from the checkpoint
    assert saved["head"]["kind"] == "umci" and saved["checkpoint_step"] == 6
    assert set(saved["rough"]["classes"]) == {"candle", "cashew", "pcb1"}
    for stage in ("rough", "final"):
        for name, values in saved[stage]["classes"].items():
            maps = np.load(output / "maps" / f"{name}.npz")
            assert maps[stage].dtype == np.float16 and maps["masks"].dtype == bool
            assert maps[stage].shape == (16, 112, 112) and len(maps["paths"]) == 16
            # The image scores and labels are saved too (docs/method.md §5.2): the rough map's
            # maximum; the fused map's peak before Norm; the dataset's annotation.
            scores, labels = maps[f"{stage}_scores"], maps["labels"]
            assert scores.shape == (16,) and labels.dtype == bool and labels.sum() == 8
            if stage == "rough":
                np.testing.assert_array_equal(scores, maps["rough"].max(axis=(1, 2)))
            else:  # Norm "max" leaves no map above 1; the peaks before it can be
                assert scores.dtype == np.float32 and maps["final"].max() <= 1.0
                assert (scores >= maps["final"].max(axis=(1, 2)).astype(np.float32) - 1e-3).all()
            recomputed = compute_metrics(maps[stage], maps["masks"], pro_mode="cflow",
                                         image_scores=scores, labels=labels)  # fmt: skip
            for key in PRO_KEYS:
                assert values[key] == pytest.approx(recomputed[key], abs=1e-12), (stage, name, key)
            assert values["n_images"] == 16 and values["n_anomalous"] == 8
        means = saved[stage]["mean"]
        expected = np.mean([v["pixel_auroc"] for v in saved[stage]["classes"].values()])
        assert means["pixel_auroc"] == pytest.approx(expected)
    table = (output / "table.md").read_text()
    assert "AUROC (rough)" in table and "PRO (final)" in table and "| mean |" in table
    csv_rows = (output / "table.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 3 + 1 and csv_rows[-1].startswith("mean,")
    assert len(list((output / "panels").rglob("*.png"))) == 3  # one per class


def test_image_labels_come_from_the_annotation_not_the_resized_mask(tiny_clip_dir, synthetic_data,
                                                                   tmp_path):  # fmt: skip
    """A defect of one pixel vanishes when its mask is resized to S×S: the image still counts
    as anomalous in the image metrics (its annotated label), while the pixel metrics use the
    resized (empty) mask; the final stage scores images by their fused maps' peaks before Norm."""
    from PIL import Image
    from sklearn.metrics import roc_auc_score

    data = tmp_path / "visa"
    shutil.copytree(synthetic_data / "visa", data)
    image_path = sorted((data / "candle" / "Data" / "Images" / "Anomaly").iterdir())[0]
    mask_path = data / "candle" / "Data" / "Masks" / "Anomaly" / f"{image_path.stem}.png"
    # The image 4× larger (640×480) and its mask a single pixel: 1/16 of an S×S cell's area.
    image = Image.open(image_path)
    image.resize((image.width * 4, image.height * 4)).save(image_path, format="JPEG")
    tiny_defect = np.zeros((image.height * 4, image.width * 4), np.uint8)
    tiny_defect[tiny_defect.shape[0] // 2, tiny_defect.shape[1] // 2] = 1
    Image.fromarray(tiny_defect).save(mask_path)
    output = tmp_path / "out"
    report = eval_main([
        "--test", "visa", "--data-root", str(data), "--no-umci", "--clip", str(tiny_clip_dir),
        "--image-size", SIZE, "--dtype", "float32", "--sam", "tiny-random", "--classes",
        "candle", "--panels", "0", "--save-maps", "--output", str(output), *COMMON,
    ])  # fmt: skip
    maps = np.load(output / "maps" / "candle.npz")
    vanished = [i for i, p in enumerate(maps["paths"]) if Path(p) == image_path]
    assert len(vanished) == 1 and not maps["masks"][vanished[0]].any()  # the defect is gone
    labels = maps["labels"]
    assert labels[vanished[0]] and labels.sum() == 8  # but the image is still anomalous
    assert maps["masks"].any(axis=(1, 2)).sum() == 7  # what the masks alone would say
    for stage in ("rough", "final"):
        values = report[stage]["classes"]["candle"]
        assert values["n_anomalous"] == 8
        scores = maps[f"{stage}_scores"]
        # Independent: sklearn's AUROC of the saved scores against the annotated labels.
        assert values["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        recomputed = compute_metrics(maps[stage], maps["masks"], image_scores=scores,
                                     labels=labels)  # fmt: skip
        for key in PRO_KEYS:
            assert values[key] == pytest.approx(recomputed[key], abs=1e-12), (stage, key)


def test_sam_none_writes_rough_only(synthetic_data, trained_head, tmp_path):
    report = eval_main(eval_args(synthetic_data, trained_head, tmp_path, "--sam", "none",
                                 "--classes", "candle", "--save-maps", "--panels", "0"))  # fmt: skip
    assert "final" not in report and list(report["rough"]["classes"]) == ["candle"]
    assert "final" not in np.load(tmp_path / "maps" / "candle.npz")
    assert "final" not in (tmp_path / "table.md").read_text()


def test_no_umci_needs_no_checkpoint_and_still_refines(tiny_clip_dir, synthetic_data, tmp_path):
    report = eval_main([
        "--test", "visa", "--data-root", str(synthetic_data / "visa"), "--no-umci", "--clip",
        str(tiny_clip_dir), "--image-size", SIZE, "--dtype", "float32", "--sam", "tiny-random",
        "--classes", "pcb1", "--panels", "0", "--output", str(tmp_path), *COMMON,
        "--clip-attention", "reference",
    ])  # fmt: skip
    assert report["head"] == "zero-shot" and report["checkpoint_step"] is None
    assert report["runtime"]["clip_attention"] == "reference"
    assert "attention" not in report["config"]["clip"]  # speed only: not in the method config
    assert "final" in report and 0.0 <= report["rough"]["mean"]["pixel_auroc"] <= 1.0


def test_streaming_metrics_approximate_exact_ones(synthetic_data, trained_head, tmp_path):
    extra = ("--sam", "tiny-random", "--classes", "cashew", "--panels", "0")
    exact = eval_main(eval_args(synthetic_data, trained_head, tmp_path / "exact", *extra))
    streaming = eval_main(eval_args(synthetic_data, trained_head, tmp_path / "stream", *extra,
                                    "--metrics", "streaming"))  # fmt: skip
    assert streaming["metrics_mode"].startswith("streaming") and exact["metrics_mode"] == "exact"
    for stage in ("rough", "final"):
        ours, reference = streaming[stage]["classes"]["cashew"], exact[stage]["classes"]["cashew"]
        assert ours["exact"] is False
        for key in PRO_KEYS:
            assert ours[key] == pytest.approx(reference[key], abs=2e-3), (stage, key)


def test_overlapped_classes_give_the_serial_results(synthetic_data, trained_head, tmp_path):
    """Scoring a class while the next one's maps are made (the accelerator default) changes
    the schedule only: the same metrics, records and saved maps as one class after another."""
    extra = ("--sam", "tiny-random", "--panels", "0", "--save-maps")
    serial = eval_main(eval_args(synthetic_data, trained_head, tmp_path / "serial", *extra,
                                 "--overlap-classes", "off"))  # fmt: skip
    overlapped = eval_main(eval_args(synthetic_data, trained_head, tmp_path / "overlap", *extra,
                                     "--overlap-classes", "on"))  # fmt: skip
    for stage in ("rough", "final"):
        assert overlapped[stage] == serial[stage]
    assert list(overlapped["rough"]["classes"]) == ["candle", "cashew", "pcb1"]
    for name in ("candle", "cashew", "pcb1"):
        ours = json.loads((tmp_path / "overlap" / "classes" / f"{name}.json").read_text())
        theirs = json.loads((tmp_path / "serial" / "classes" / f"{name}.json").read_text())
        assert ours == theirs
        a, b = np.load(tmp_path / "overlap" / "maps" / f"{name}.npz"), np.load(
            tmp_path / "serial" / "maps" / f"{name}.npz")  # fmt: skip
        np.testing.assert_array_equal(a["final"], b["final"])


def test_rerun_reuses_finished_classes(synthetic_data, trained_head, tmp_path, monkeypatch):
    args = eval_args(synthetic_data, trained_head, tmp_path, "--sam", "none", "--panels", "0",
                     "--classes", "candle,cashew")  # fmt: skip
    first = eval_main(args)

    def no_recompute(*unused, **kwargs):
        raise AssertionError("finished classes must be reused")

    monkeypatch.setattr(eval_lib, "evaluate_class", no_recompute)
    monkeypatch.setattr(eval_lib, "class_maps", no_recompute)  # the overlapped schedule's
    assert eval_main(args)["rough"] == first["rough"]
    assert eval_main([*args, "--overlap-classes", "on"])["rough"] == first["rough"]
    with pytest.raises(AssertionError):  # another setting changes the maps: recomputed
        eval_main([*args, "--threshold", "0.3"])


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_unreadable_image_names_file_and_keeps_finished_classes(
    synthetic_data, trained_head, tmp_path, capsys, overlap
):
    data = tmp_path / "visa"
    shutil.copytree(synthetic_data / "visa", data)
    broken = sorted((data / "pcb1" / "Data" / "Images" / "Anomaly").iterdir())[0]
    broken.write_bytes(b"not a jpeg")
    args = ["--test", "visa", "--data-root", str(data), "--checkpoint", str(trained_head),
            "--output", str(tmp_path / "out"), "--sam", "none", "--panels", "0", *COMMON,
            "--overlap-classes", overlap]  # fmt: skip
    assert cli.run(eval_main, args) == 2
    assert f"{broken}: cannot decode" in capsys.readouterr().err
    done = sorted(p.stem for p in (tmp_path / "out" / "classes").glob("*.json"))
    assert done == ["candle", "cashew"]  # classes evaluated before the bad file are kept


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sam", "vit_h"], r"sam_vit_h_4b8939\.pth.*--download-sam|--download-sam"),
        (["--sam", "none", "--classes", "nope"], r"no class 'nope'.*candle"),
    ],
)
def test_bad_input_is_a_clear_error(synthetic_data, trained_head, tmp_path, capsys, extra, message):
    args = eval_args(synthetic_data, trained_head, tmp_path, "--panels", "0", *extra)
    assert cli.run(eval_main, args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    import re

    assert re.search(message, err, re.S), err


def test_missing_checkpoint_suggests_training_or_no_umci(synthetic_data, tmp_path, capsys):
    args = eval_args(synthetic_data, tmp_path / "no_run", tmp_path / "out", "--sam", "none")
    assert cli.run(eval_main, args) == 2
    err = capsys.readouterr().err
    assert "no_run" in err and "train.main" in err and "--no-umci" in err


def test_missing_dataset_says_where_to_get_it(tmp_path, capsys):
    args = ["--test", "mvtec", "--data-root", str(tmp_path / "absent"), "--no-umci",
            "--sam", "none", "--output", str(tmp_path / "out")]  # fmt: skip
    assert cli.run(eval_main, args) == 2
    assert "mvtec.com" in capsys.readouterr().err


def test_demo_runs_and_labels_its_numbers(tmp_path, monkeypatch, capsys):
    """The README's first command, with fewer images and one epoch to keep the suite fast."""
    from clipsam_jax import demo

    small = demo.DemoConfig(directory=str(tmp_path / "demo"), epochs=1, images_per_class=3,
                            image_size=112, hidden_dim=16, pool_sizes=(2, 4))  # fmt: skip
    monkeypatch.setattr(demo, "DemoConfig", lambda directory: small)
    report = eval_main(["--demo", "--output", str(tmp_path / "demo"), "--no-progress"])
    out = capsys.readouterr().out
    assert "NOT ClipSAM results" in out and "| mean |" in out
    assert set(report["final"]["classes"]) == {"candle", "cashew", "pcb1"}
    # What the README's quick start says the demo writes.
    demo_dir = tmp_path / "demo"
    for folder in ("data/mvtec", "data/visa", "cache", "runs/feature_cache"):
        assert any((demo_dir / folder).iterdir()), folder
    for file in ("tiny_clip/config.json", "runs/mvtec/config.json", "runs/mvtec/summary.json",
                 "runs/mvtec/train_log.jsonl", "results/visa/metrics.json",
                 "results/visa/table.md", "results/visa/table.csv"):  # fmt: skip
        assert (demo_dir / file).is_file(), file
    assert any(p.name.isdigit() for p in (demo_dir / "runs/mvtec/checkpoints").iterdir())
    results = demo_dir / "results" / "visa"
    assert sorted(p.stem for p in (results / "classes").glob("*.json")) == [
        "candle",
        "cashew",
        "pcb1",
    ]
    assert {p.parent.name for p in (results / "panels").glob("*/*.png")} == {
        "candle",
        "cashew",
        "pcb1",
    }


def test_refine_flags_reach_the_config():
    from eval.main import config_from_args, parse

    default = config_from_args(parse(["--test", "visa"])).refine
    default_runtime = cli.runtime_from_args(parse(["--test", "visa"]))
    assert (default_runtime.sam_attention, default.sam_dtype) == ("flash", "fp32")
    assert default_runtime.sam_images_per_call == 4
    args = parse(["--test", "visa", "--sam-attention", "stock", "--sam-dtype", "bf16",
                  "--sam-images-per-call", "2", "--single-mask", "--threshold", "0.3",
                  "--sam-compile"])  # fmt: skip
    config, runtime = config_from_args(args).refine, cli.runtime_from_args(args)
    assert runtime.sam_compile and not default_runtime.sam_compile
    assert (runtime.sam_attention, config.sam_dtype, runtime.sam_images_per_call) == (
        "stock", "bf16", 2,
    )  # fmt: skip
    assert config.multimask is False and config.threshold == 0.3


@pytest.mark.parametrize(
    ("dataset", "generate", "expected"),
    [
        ("mvtec", {"classes": ["bottle", "screw"], "images_per_class": 1},
         {"bottle": 2, "screw": 2}),
        ("mtd", {"images_per_class": 1}, {"magnetic_tile": 7}),
        ("ksdd2", {"images_per_class": 3}, {"ksdd2": 6}),
    ],
)  # fmt: skip
def test_other_datasets_end_to_end(dataset, generate, expected, trained_head, tmp_path):
    """`--test mvtec|mtd|ksdd2` on their own on-disk layouts, through SAM, with panels."""
    root = synthetic.generate(dataset, tmp_path / "data", seed=3, **generate)
    output = tmp_path / "out"
    report = eval_main(["--test", dataset, "--data-root", str(root), "--checkpoint",
                        str(trained_head), "--output", str(output), "--sam", "tiny-random",
                        "--panels", "1", "--save-maps", *COMMON])  # fmt: skip
    assert report["dataset"] == dataset
    for stage in ("rough", "final"):
        classes = report[stage]["classes"]
        assert {name: values["n_images"] for name, values in classes.items()} == expected
        for name, values in classes.items():
            maps = np.load(output / "maps" / f"{name}.npz")
            assert maps[stage].shape == (expected[name], 112, 112)
            recomputed = compute_metrics(maps[stage], maps["masks"])
            assert values["pixel_auroc"] == pytest.approx(recomputed["pixel_auroc"], abs=1e-12)
    assert sorted(p.parent.name for p in (output / "panels").rglob("*.png")) == sorted(expected)


def test_aprilgan_head_trains_and_evaluates(tiny_clip_dir, synthetic_data, tmp_path):
    workdir = tmp_path / "aprilgan"
    train_main(["--train", "mvtec", "--data-root", str(synthetic_data / "mvtec"), "--workdir",
                str(workdir), "--clip", str(tiny_clip_dir), "--image-size", SIZE, "--dtype",
                "float32", "--head", "aprilgan", "--max-steps", "2", *COMMON])  # fmt: skip
    output = tmp_path / "out"
    report = eval_main(eval_args(synthetic_data, workdir, output, "--sam", "tiny-random",
                                 "--classes", "pcb1", "--panels", "0", "--save-maps"))  # fmt: skip
    assert report["head"]["kind"] == "aprilgan" and report["checkpoint_step"] == 2
    maps = np.load(output / "maps" / "pcb1.npz")
    recomputed = compute_metrics(maps["final"], maps["masks"])
    assert report["final"]["classes"]["pcb1"]["pixel_auroc"] == pytest.approx(
        recomputed["pixel_auroc"], abs=1e-12
    )


def test_clip_flags_override_the_checkpoint(synthetic_data, trained_head, tmp_path):
    """CLIP flags given to eval.main replace the trained head's settings, and only those."""
    extra = ("--sam", "none", "--classes", "candle", "--panels", "0", "--save-maps")
    plain = eval_main(eval_args(synthetic_data, trained_head, tmp_path / "plain", *extra))
    changed = eval_main(eval_args(synthetic_data, trained_head, tmp_path / "changed", *extra,
                                  "--templates", "aprilgan35", "--object-name", "spaced",
                                  "--prompt-normalization", "mean"))  # fmt: skip
    clip = changed["config"]["clip"]
    assert (clip["templates"], clip["object_name"], clip["prompt_normalization"]) == (
        "aprilgan35", "spaced", "mean",
    )  # fmt: skip
    assert plain["config"]["clip"]["templates"] == "clipsam29"
    for key in ("image_size", "model", "dtype"):  # not given: the checkpoint's
        assert clip[key] == plain["config"]["clip"][key]
    assert clip["image_size"] == 112
    ours = np.load(tmp_path / "changed" / "maps" / "candle.npz")["rough"]
    theirs = np.load(tmp_path / "plain" / "maps" / "candle.npz")["rough"]
    assert not np.array_equal(ours, theirs)  # other text features, other maps


def test_non_default_head_choices_train_and_evaluate(tiny_clip_dir, synthetic_data, tmp_path):
    """The README's head, loss and training switches together: the checkpoint records them,
    the params have the shape they imply, and eval.main runs the head they describe."""
    workdir = tmp_path / "run"
    train_main(["--train", "mvtec", "--data-root", str(synthetic_data / "mvtec"), "--workdir",
                str(workdir), "--clip", str(tiny_clip_dir), "--image-size", SIZE, "--dtype",
                "float32", "--hidden-dim", "16", "--pool-sizes", "2,4", "--max-steps", "3",
                "--separate-projections", "--gru-reading", "sequence", "--strip-kernel", "1",
                "--align-corners", "--stage-average", "logits", "--loss-resolution", "grid",
                "--weight-decay", "0.1", "--mosaic", "--no-feature-cache", "--max-to-keep",
                "1", "--checkpoint-every", "1", *COMMON])  # fmt: skip
    params, meta = load_head(workdir)
    head, loss, optim = (meta["config"][k] for k in ("head", "loss", "optim"))
    assert (head["shared_projection"], head["gru_reading"], head["strip_kernel"]) == (
        False, "sequence", 1,
    )  # fmt: skip
    assert head["align_corners"] is True and head["stage_average"] == "logits"
    assert loss["resolution"] == "grid" and optim["weight_decay"] == 0.1
    assert meta["config"]["mosaic"] is True and meta["config"]["feature_cache"] is False
    stage = params["stage_0"]
    projections = sorted(k for k in stage if "projection" in k)
    assert len(projections) > 1, projections  # one Linear per path, not one shared
    strip_kernels = [leaf.shape for path, leaf in _leaves(stage) if "strip_row" in path
                     and path.endswith("kernel") and leaf.ndim == 3]  # fmt: skip
    assert strip_kernels and all(shape[0] == 1 for shape in strip_kernels), strip_kernels
    kept = sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == ["3"]  # --max-to-keep 1
    assert not (workdir.parent / "feature_cache").exists()  # --no-feature-cache
    report = eval_main(eval_args(synthetic_data, workdir, tmp_path / "out", "--sam", "none",
                                 "--classes", "candle", "--panels", "0"))  # fmt: skip
    assert report["head"]["stage_average"] == "logits"
    assert 0.0 <= report["rough"]["classes"]["candle"]["pixel_auroc"] <= 1.0


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value
