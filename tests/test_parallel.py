"""Data parallelism: 8 (virtual CPU) devices give the same maps (zero- and few-shot) and
metrics as one device.

The device count of a JAX process is fixed when JAX starts, so this test runs its check in one
child interpreter with `--xla_force_host_platform_device_count=8`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from clipsam_jax.parallel.mesh import data_mesh, global_batch, local_rows, pad_to
from clipsam_jax.parallel.processes import gather_rows, process_share

CHILD = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from clipsam_jax.clip.cache import BatchEncoder
    from clipsam_jax.clip.loading import load_clip
    from clipsam_jax.clip.prompts import TextFeatures
    from clipsam_jax.config import EvalConfig, HeadConfig, RefineConfig
    from clipsam_jax.eval_lib import evaluate
    from clipsam_jax.inference import RoughMapModel
    from clipsam_jax.models.heads import build_head
    from clipsam_jax.models.init import init_params
    from clipsam_jax.parallel.mesh import data_mesh

    clip_dir, data_root, out = sys.argv[1:4]
    assert jax.device_count() == 8
    clip = load_clip(clip_dir, 112, dtype="float32")
    text = TextFeatures(clip)
    head = HeadConfig(hidden_dim=16, pool_sizes=(2, 4))
    params = init_params(build_head(head, clip.text_dim), 0, [(1, 8, 8, 48)] * 4, (1, 2, 24),
                         head.init)  # fmt: skip
    results = {}
    for devices in (1, 8):
        mesh = data_mesh(devices)
        model = RoughMapModel(clip, text, head, params, batch_size=3, mesh=mesh)
        assert model.batch_size == (3 if devices == 1 else 8)
        images = np.random.default_rng(0).normal(size=(11, 112, 112, 3)).astype(np.float32)
        maps = model(images, ["candle"] * 11)  # 11 images: ragged batches on both meshes
        # Few-shot: the bank replicated, the batch sharded; a small chunk gives several steps.
        references = np.random.default_rng(1).integers(0, 256, (3, 112, 112, 3), np.uint8)
        model.bank_chunk = 50
        model.set_references("candle", references, 0.5)
        np.save(f"{out}/few_shot_{devices}.npy", model(images, ["candle"] * 11))
        model.set_references("candle", None)
        tokens = BatchEncoder(clip, 3, mesh)(images)
        config = EvalConfig(dataset="visa", data_root=data_root, output=f"{out}/{devices}",
                            refine=RefineConfig(sam="none"), visualize_per_class=0)
        report = evaluate(config, progress=False, model=model)
        np.save(f"{out}/maps_{devices}.npy", maps)
        np.save(f"{out}/tokens_{devices}.npy", tokens[-1])
        results[devices] = report["rough"]
    json.dump(results, open(f"{out}/results.json", "w"))
    """
)


def test_eight_devices_match_one(tiny_clip_dir, synthetic_data, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")  # fmt: skip
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tiny_clip_dir), str(synthetic_data / "visa"),
         str(tmp_path)],
        env=env, cwd=root, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "maps_8.npy"), np.load(tmp_path / "maps_1.npy"),
                               atol=1e-6)  # fmt: skip
    few_shot = np.load(tmp_path / "few_shot_1.npy")
    np.testing.assert_allclose(np.load(tmp_path / "few_shot_8.npy"), few_shot, atol=1e-5)
    assert np.abs(few_shot - np.load(tmp_path / "maps_1.npy")).max() > 1e-3  # the bank acted
    np.testing.assert_allclose(np.load(tmp_path / "tokens_8.npy"),
                               np.load(tmp_path / "tokens_1.npy"), rtol=1e-5, atol=1e-5)  # fmt: skip
    results = json.loads((tmp_path / "results.json").read_text())
    one, eight = results["1"], results["8"]
    assert set(one["classes"]) == {"candle", "cashew", "pcb1"}
    for name, metrics in one["classes"].items():
        for key, value in metrics.items():
            # Batch composition changes the float rounding (maps agree to 1e-6 above).
            assert eight["classes"][name][key] == pytest.approx(value, abs=1e-5), (name, key)


def test_pad_to_and_mesh_on_one_device():
    mesh = data_mesh()
    assert mesh.axis_names == ("data",)
    count = mesh.devices.size
    assert pad_to(1, mesh) == count and pad_to(count + 1, mesh) == 2 * count


def test_one_process_holds_every_row_and_image():
    """The multi-process helpers reduce to the plain case in one process (their multi-process
    behaviour: tests/test_multiprocess.py)."""
    mesh = data_mesh()
    rows = pad_to(5, mesh)
    assert local_rows(mesh, rows) == (0, rows)
    batch = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
    np.testing.assert_array_equal(np.asarray(global_batch(batch, mesh, rows)), batch)
    np.testing.assert_array_equal(process_share(5), np.arange(5))
    maps = {"rough": np.ones((5, 2)), "final": None}
    assert gather_rows(maps, 5) is maps
