"""Bad inputs through the real entry points, in process: each ends with exit status 2 and one
message that names the flag or file, before any work, with no traceback and no file changed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import eval.app
import eval.main
import eval.predict
import eval.reproduce
import train.main
from clipsam_jax import cli, launch
from conversion import clip as conversion_clip
from conversion import head as conversion_head

SIZE = "112"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip_dir, synthetic_data) -> dict[str, Path]:
    """A folder with what users already have: data, a CLIP, earlier results that a bad run must
    not touch, and a few files that are not what they claim to be."""
    root = tmp_path_factory.mktemp("world")
    (root / "results").mkdir()
    (root / "results" / "metrics.json").write_text('{"earlier": "results"}')
    (root / "runs" / "mvtec").mkdir(parents=True)
    (root / "runs" / "mvtec" / "notes.txt").write_text("a user's notes")
    (root / "a_file").write_text("not a folder")
    (root / "random.pth").write_bytes(os.urandom(4096))
    (root / "photo.png").write_text("a text file renamed .png")
    import torch

    from clipsam_jax.refine.sam_build import build_tiny_sam

    torch.save(build_tiny_sam().state_dict(), root / "tiny_sam.pth")  # a SAM (1) file
    return {"root": root, "clip": tiny_clip_dir, "data": synthetic_data}


def _train(w, *extra):
    return ["--train", "mvtec", "--data-root", str(w["data"] / "mvtec"), "--workdir",
            str(w["root"] / "runs" / "mvtec"), "--clip", str(w["clip"]), "--image-size", SIZE,
            "--dtype", "float32", "--hidden-dim", "16", "--pool-sizes", "2,4", "--batch-size",
            "4", "--no-progress", *extra]  # fmt: skip


def _eval(w, *extra):
    return ["--test", "visa", "--data-root", str(w["data"] / "visa"), "--no-umci", "--clip",
            str(w["clip"]), "--image-size", SIZE, "--output", str(w["root"] / "results"),
            "--sam", "none", "--no-progress", *extra]  # fmt: skip


def _predict(w, *extra):
    return [str(w["root"] / "photo.png"), "--output", str(w["root"] / "results"), "--no-umci",
            "--clip", str(w["clip"]), "--image-size", SIZE, "--sam", "none", "--no-progress",
            *extra]  # fmt: skip


def _reproduce(w, *extra):
    return ["--data-root", str(w["data"]), "--clip", str(w["clip"]), "--image-size", SIZE,
            "--output", str(w["root"] / "results"), "--no-progress", *extra]  # fmt: skip


TRAIN, EVAL, PREDICT = train.main.main, eval.main.main, eval.predict.main
REPRODUCE = eval.reproduce.main
APP = eval.app.main
# fmt: off
CASES = {
    # name: (entry point, argv from the world, text the message must hold)
    "clip path mistyped": (TRAIN, lambda w: _train(w, "--clip", str(w["root"] / "tiny_clipp")),
                           "tiny_clipp: no such directory"),
    "clip path mistyped, relative": (TRAIN, lambda w: _train(w, "--clip", "runs/tiny_clipp"),
                                     "runs/tiny_clipp: no such directory"),
    "epochs 0": (TRAIN, lambda w: _train(w, "--epochs", "0"), "--epochs: must be >= 1"),
    "batch size 0": (TRAIN, lambda w: _train(w, "--batch-size", "0"), "--batch-size"),
    "no --train": (TRAIN, lambda w: _train(w)[2:], "--train"),
    "unknown dataset": (TRAIN, lambda w: _train(w, "--train", "mvtecc"), "--train"),
    "pool sizes not numbers": (TRAIN, lambda w: _train(w, "--pool-sizes", "3,x"), "--pool-sizes"),
    "even strip kernel": (TRAIN, lambda w: _train(w, "--strip-kernel", "2"), "--strip-kernel"),
    "pools larger than the grid": (TRAIN, lambda w: _train(w, "--pool-sizes", "3,9"),
                                   "--pool-sizes 3,9: a pool of 9 does not fit"),
    "workdir is a file": (TRAIN, lambda w: _train(w, "--workdir", str(w["root"] / "a_file")),
                          "a_file is a file"),
    "image size off the patch grid": (TRAIN, lambda w: _train(w, "--image-size", "100"),
                                      "--image-size 100 is not a multiple"),
    "dataset missing": (TRAIN, lambda w: _train(w, "--data-root", str(w["root"] / "nodata")),
                        "nodata"),
    "threshold above 1": (EVAL, lambda w: _eval(w, "--threshold", "1.5"), "--threshold"),
    "threshold below 0": (EVAL, lambda w: _eval(w, "--threshold", "-1"), "--threshold"),
    "points negative": (EVAL, lambda w: _eval(w, "--points", "-3"), "--points: must be >= 0"),
    "no --test": (EVAL, lambda w: _eval(w)[2:], "--test"),
    "unknown class": (EVAL, lambda w: _eval(w, "--classes", "nope"), "nope"),
    # The SAM file is checked before CLIP loads: with an unreachable hub id as --clip, the
    # message is still about the SAM file.
    "SAM checkpoint missing": (EVAL, lambda w: _eval(
        w, "--sam", "vit_b", "--sam-checkpoint", str(w["root"] / "sam.pth"), "--clip",
        "no-such-org/no-such-clip"), "sam.pth"),
    "SAM checkpoint of random bytes": (EVAL, lambda w: _eval(
        w, "--sam", "vit_b", "--sam-checkpoint", str(w["root"] / "random.pth")),
        "random.pth: cannot read it as a SAM checkpoint"),
    "SAM 2.1 given a SAM 1 file": (EVAL, lambda w: _eval(
        w, "--sam", "sam2.1_hiera_t", "--sam-checkpoint", str(w["root"] / "tiny_sam.pth")),
        "tiny_sam.pth: not a sam2.1_hiera_t checkpoint (no image_encoder.trunk.patch_embed)"),
    "few-shot on a dataset without normal training images": (EVAL, lambda w: [
        *_eval(w)[:2], "--data-root", str(w["data"] / "visa"), *_eval(w)[4:], "--test", "mtd",
        "--shots", "2"], "mtd has no normal training images"),
    "more shots than normal training images": (EVAL, lambda w: _eval(w, "--shots", "50"),
                                               "--shots 50: class 'candle' has only"),
    "few-shot weight above 1": (EVAL, lambda w: _eval(w, "--few-shot-weight", "2"),
                                "--few-shot-weight"),
    "predict shots without references": (PREDICT, lambda w: _predict(w, "--shots", "3"),
                                         "--shots 3 needs --reference-dir DIR"),
    "head missing": (EVAL, lambda w: [*_eval(w)[:4], *_eval(w)[5:], "--checkpoint",
                                      str(w["root"] / "no_run")], "--train DATASET"),
    "app with a missing head": (APP, lambda w: ["--checkpoint", str(w["root"] / "no_run"),
                                                "--clip", str(w["clip"]), "--port", "0"],
                                "--train DATASET"),
    "app with a port out of range": (APP, lambda w: ["--port", "70000"], "--port"),
    "predict output is a file": (PREDICT, lambda w: [*_predict(w)[:1], *_predict(w)[3:],
                                                     "--output", str(w["root"] / "a_file")],
                                 "a_file is a file"),
    "predict input missing": (PREDICT, lambda w: [str(w["root"] / "nothing.png"),
                                                  *_predict(w)[1:]], "nothing.png"),
    "mask threshold above 1": (PREDICT, lambda w: _predict(w, "--mask-threshold", "2"),
                               "--mask-threshold"),
    "reproduce without a dataset": (REPRODUCE, lambda w: _reproduce(w, "--only", "table4"),
                                    "must hold a ksdd2/ folder for the selected cells; --only"),
    "reproduce an unknown table": (REPRODUCE, lambda w: _reproduce(w, "--only", "table5"),
                                   "--only table5: no such table or cell"),
    "reproduce with 0 epochs": (REPRODUCE, lambda w: _reproduce(w, "--epochs", "0"),
                                "--epochs: must be >= 1"),
    "reproduce without the SAM file": (REPRODUCE, lambda w: _reproduce(
        w, "--only", "table1", "--sam-checkpoint", str(w["root"] / "sam.pth")), "sam.pth"),
    "convert a missing CLIP": (conversion_clip.main, lambda w: [
        str(w["root"] / "ViT-L-14.pt"), "--out", str(w["root"] / "converted")],
        "ViT-L-14.pt: no such file or directory"),
    "convert random bytes": (conversion_clip.main, lambda w: [
        str(w["root"] / "random.pth"), "--out", str(w["root"] / "converted")],
        "random.pth: cannot read it as a CLIP checkpoint: it looks like"),
    "export a missing head": (conversion_head.main, lambda w: [
        "export", "--checkpoint", str(w["root"] / "no_run"), "--out",
        str(w["root"] / "head.pth")], "no trained head here"),
    "launch no processes": (launch.main, lambda w: ["--processes", "0", "--", "eval.main"],
                            "--processes must be >= 1"),
    "launch without a command": (launch.main, lambda w: ["--processes", "2"],
                                 "give the command after --"),
}
# fmt: on
# Words of a library's own error text that a message in our words never holds.
FOREIGN = ("Traceback", "weights_only", "Please file an issue", "Unable to initialize backend")


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}  # fmt: skip


def _exit_status(entry, argv) -> int:
    """The exit status of an entry point (the tools' `main` returns it, the commands' `main`
    raises and `cli.run` turns that into the status)."""
    try:
        if entry in (conversion_clip.main, conversion_head.main):
            return entry(argv)
        return cli.run(entry, argv, configure_logging=False)
    except SystemExit as stop:  # argparse's own refusals
        return stop.code


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_clearly_and_changes_nothing(case, world, capsys, monkeypatch):
    monkeypatch.chdir(world["root"])  # where `runs/` exists: runs/tiny_clipp is a local path
    entry, argv, message = CASES[case]
    before = _tree(world["root"])
    assert _exit_status(entry, argv(world)) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not any(word in err for word in FOREIGN), err
    assert _tree(world["root"]) == before  # nothing written, nothing lost


# Environments of a multi-process launch that a command cannot run in.
PROCESS_CASES = {
    "predict": (PREDICT, _predict, {"JAX_NUM_PROCESSES": "2"}, "eval.predict runs in one process"),
    "reproduce": (REPRODUCE, _reproduce, {"JAX_NUM_PROCESSES": "2"},
                  "eval.reproduce runs in one process"),
    "app": (APP, lambda w: [], {"JAX_NUM_PROCESSES": "4"}, "eval.app runs in one process"),
    "eval half a launch": (EVAL, _eval, {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"},
                           "JAX_NUM_PROCESSES and JAX_PROCESS_ID not: set all three"),
    "train half a launch": (TRAIN, _train, {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1",
                                            "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID not"),
    "train a launch miscounted": (TRAIN, _train, {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1",
                                                  "JAX_NUM_PROCESSES": "two",
                                                  "JAX_PROCESS_ID": "0"}, "must be integers"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(PROCESS_CASES))
def test_process_environment_is_checked_before_work(case, world, capsys, monkeypatch):
    monkeypatch.chdir(world["root"])
    entry, argv, environment, message = PROCESS_CASES[case]
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    before = _tree(world["root"])
    assert _exit_status(entry, argv(world)) == 2
    err = capsys.readouterr().err
    assert message in err and not any(word in err for word in FOREIGN), err
    assert _tree(world["root"]) == before


HOLDER = """
import sys, time
from clipsam_jax.outputs import hold
with hold(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("command", ["training", "evaluation"])
def test_a_live_run_holds_its_folder_and_a_killed_one_does_not(command, world, tmp_path, capsys):
    folder = tmp_path / "run"
    if command == "training":
        entry, argv, written = (
            TRAIN,
            _train(world, "--workdir", str(folder), "--max-steps", "1"),
            "config.json",
        )
    else:
        entry, argv, written = (
            EVAL,
            [*_eval(world, "--classes", "candle"), "--output", str(folder)],
            "metrics.json",
        )
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), str(folder), command],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _exit_status(entry, argv) == 2
        err = capsys.readouterr().err
        assert f"{folder} is in use by a running {command} (process {holder.pid})" in err
        assert not (folder / written).exists()
        os.kill(holder.pid, signal.SIGKILL)  # its lock goes with it
        holder.wait(timeout=30)
        assert _exit_status(entry, argv) == 0
        assert (folder / written).is_file()
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_a_failed_first_run_does_not_block_its_workdir(world, tmp_path):
    workdir = tmp_path / "fresh"
    bad = _train(world, "--workdir", str(workdir), "--clip", str(tmp_path / "tiny_clipp"))
    assert _exit_status(TRAIN, bad) == 2
    assert not workdir.exists()
    # A workdir with a config.json but no checkpoint (a run stopped before its first save)
    # takes the corrected config.
    workdir.mkdir()
    (workdir / "config.json").write_text('{"seed": 99}')
    good = _train(world, "--workdir", str(workdir), "--max-steps", "1")
    assert _exit_status(TRAIN, good) == 0
    assert '"seed": 0' in (workdir / "config.json").read_text()


def test_rerunning_a_finished_training_keeps_its_summary(world, tmp_path):
    workdir = tmp_path / "done"
    argv = _train(world, "--workdir", str(workdir), "--max-steps", "2")
    first = TRAIN(argv)
    summary = (workdir / "summary.json").read_text()
    again = TRAIN(argv)
    assert (workdir / "summary.json").read_text() == summary
    assert again.last_loss == first.last_loss is not None and again.step == 2


def test_info_lines_reach_the_console(world, tmp_path, capfd):
    """The feature-cache and resume lines of train.main (orbax configures logging when it is
    imported; our handler replaces its setup) without JAX's TPU probe."""
    argv = _train(world, "--workdir", str(tmp_path / "logged"), "--max-steps", "1")
    assert cli.run(TRAIN, argv) == 0
    argv[argv.index("--max-steps") + 1] = "2"
    assert cli.run(TRAIN, argv) == 0
    err = capfd.readouterr().err
    assert "feature cache" in err and "resuming" in err and "backend 'tpu'" not in err
