"""Multi-process runs for real: `python -m clipsam_jax.launch` starts 2 processes × 2 virtual
CPU devices, joined over 127.0.0.1 (gloo collectives), and their results are compared with one
process's. In each, process 1 is killed mid-run (tests/helpers/crashing_process.py): the
launcher must stop process 0 rather than leave it waiting in a collective, and the rerun must
resume and finish with the one-process result.

Every launch runs in its own session with a time limit; the whole group is killed on the way
out, whatever happened.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from clipsam_jax.checkpoint import load_head
from eval.main import main as eval_main
from train.main import main as train_main

ROOT = Path(__file__).resolve().parent.parent
LIMIT_SECONDS = 300
SIZE = 112


def launch(*command: str) -> subprocess.CompletedProcess:
    """`python -m clipsam_jax.launch --processes 2 --cpu-devices 2 -- COMMAND`, bounded."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "helpers"),
                                                       str(ROOT)]))  # fmt: skip
    env.pop("JAX_NUM_PROCESSES", None)
    argv = [sys.executable, "-m", "clipsam_jax.launch", "--processes", "2", "--cpu-devices", "2",
            "--timeout", str(LIMIT_SECONDS), "--", *command]  # fmt: skip
    child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = child.communicate(timeout=LIMIT_SECONDS + 60)
    finally:  # the launcher and its processes, even when the test fails
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
    return subprocess.CompletedProcess(argv, child.returncode, out, err)


def test_evaluation_across_processes(tiny_clip_dir, synthetic_data, tmp_path):
    args = ["--test", "visa", "--data-root", str(synthetic_data / "visa"), "--no-umci",
            "--clip", str(tiny_clip_dir), "--image-size", str(SIZE), "--dtype", "float32",
            "--sam", "tiny-random", "--save-maps", "--no-progress"]  # fmt: skip
    one = eval_main([*args, "--output", str(tmp_path / "one")])
    output = tmp_path / "two"
    crashed = launch("crashing_process", "eval", "cashew", *args, "--output", str(output))
    assert crashed.returncode != 0
    assert "process 1 was killed by signal 9; stopping the other processes" in crashed.stderr
    assert not (output / "metrics.json").exists()
    recorded = sorted(p.stem for p in (output / "classes").glob("*.json"))
    assert recorded == ["candle"]  # process 0 recorded the class before the crash

    done = launch("eval.main", *args, "--output", str(output))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "candle: reusing the result" in done.stderr
    assert done.stdout.count("| mean |") == 1  # process 0 alone prints the table
    two = json.loads((output / "metrics.json").read_text())
    for stage in ("rough", "final"):
        for name, metrics in one[stage]["classes"].items():
            # Other batches, other float rounding (the maps agree to float16 precision below).
            assert two[stage]["classes"][name] == pytest.approx(metrics, abs=1e-4), name
    for name in ("candle", "cashew", "pcb1"):
        with np.load(tmp_path / "one" / "maps" / f"{name}.npz") as a, \
                np.load(output / "maps" / f"{name}.npz") as b:  # fmt: skip
            for key in ("rough", "final"):
                np.testing.assert_allclose(b[key], a[key], atol=2e-3, err_msg=f"{name} {key}")
            for key in ("masks", "labels", "paths"):
                np.testing.assert_array_equal(b[key], a[key], err_msg=f"{name} {key}")
        # Process 0 draws the panels of its share: as many as one process draws.
        assert len(list((output / "panels" / name).glob("*.png"))) == 4


def test_training_across_processes(tiny_clip_dir, synthetic_data, tmp_path):
    """Batch 6 over 4 devices: each step's batch is padded with two rows of weight 0, the last
    batch of the epoch (56 = 9·6 + 2) with six, process 1's devices taking none of it."""
    args = ["--train", "mvtec", "--data-root", str(synthetic_data / "mvtec"), "--clip",
            str(tiny_clip_dir), "--image-size", str(SIZE), "--dtype", "float32",
            "--hidden-dim", "16", "--pool-sizes", "2,4", "--batch-size", "6", "--epochs", "2",
            "--max-steps", "12", "--lr", "1e-3", "--checkpoint-every", "3",
            "--no-progress"]  # fmt: skip
    train_main([*args, "--workdir", str(tmp_path / "one" / "run")])
    workdir = tmp_path / "two" / "run"
    crashed = launch("crashing_process", "train", "7", *args, "--workdir", str(workdir))
    assert crashed.returncode != 0
    assert "process 1 was killed by signal 9; stopping the other processes" in crashed.stderr
    assert not (workdir / "summary.json").exists()
    cache = list((tmp_path / "two" / "feature_cache").rglob("*.npy"))
    assert len(cache) == 2 * 56  # features and masks, each image written by one process

    done = launch("train.main", *args, "--workdir", str(workdir))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stderr
    curves = [[json.loads(line)["loss"] for line in (tmp_path / run / "run" /
               "train_log.jsonl").read_text().splitlines()] for run in ("one", "two")]  # fmt: skip
    assert len(curves[0]) == len(curves[1]) == 12
    np.testing.assert_allclose(curves[1], curves[0], rtol=1e-5)
    one, _ = load_head(tmp_path / "one" / "run")
    two, meta = load_head(workdir)
    assert meta["step"] == 12
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
