"""The effect of the head's compute dtype at evaluation (ClipConfig.head_dtype) on maps and metrics.

CLIP runs in bfloat16 (as on accelerators) in both runs; the trained head runs in float32 (the
default, as it was trained) or in CLIP's bfloat16 (`--head-dtype clip`). The head is the demo's
(tiny random CLIP, trained on generated MVTec-layout data) and the test set the demo's generated
VisA-layout set, rough maps only (no SAM: the head's dtype only reaches the rough map). The
figures show how far bf16 moves maps and metrics of THESE tiny models; they are not ClipSAM
results.

    python benchmarks/head_precision.py [--workdir /tmp/head_precision] [--out results/...json]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
from common import RESULTS, machine_info, now, setup_path, write_json

setup_path()

from clipsam_jax.config import ClipConfig, EvalConfig, RefineConfig, RuntimeConfig  # noqa: E402
from clipsam_jax.demo import DemoConfig, run_demo  # noqa: E402
from clipsam_jax.eval_lib import evaluate  # noqa: E402

COLUMNS = ("pixel_auroc", "pixel_f1_max", "pixel_ap", "pro", "image_auroc")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/head_precision")
    parser.add_argument("--out", default=str(RESULTS / "head_precision_cpu.json"))
    args = parser.parse_args()
    root = Path(args.workdir)
    run_demo(DemoConfig(directory=str(root)), progress=False)  # trains the demo's head
    runtime = RuntimeConfig(cache_dir=str(root / "cache"))
    base = EvalConfig(
        dataset="visa", data_root=str(root / "data" / "visa"),
        checkpoint=str(root / "runs" / "mvtec"), save_maps=True, visualize_per_class=0,
        refine=RefineConfig(sam="none"),
    )  # fmt: skip
    reports, maps = {}, {}
    for head_dtype in ("float32", "clip"):
        clip = dataclasses.replace(ClipConfig(), dtype="bfloat16", head_dtype=head_dtype)
        output = root / f"eval_head_{head_dtype}"
        config = dataclasses.replace(base, clip=clip, output=str(output),
                                     clip_given=("dtype", "head_dtype"))  # fmt: skip
        reports[head_dtype] = evaluate(config, runtime=runtime, progress=False)
        maps[head_dtype] = {p.stem: np.load(p)["rough"].astype(np.float64)
                            for p in sorted((output / "maps").glob("*.npz"))}  # fmt: skip
    diffs = np.concatenate(
        [np.abs(maps["clip"][c] - maps["float32"][c]).ravel() for c in maps["float32"]]
    )
    means = {d: reports[d]["rough"]["mean"] for d in reports}
    report = {
        "benchmark": "head_precision",
        "date": now(),
        "note": "tiny random CLIP (the demo's), head trained on generated data, CPU; CLIP in "
        "bfloat16 in both runs; rough maps only. NOT ClipSAM results.",
        "machine": machine_info(),
        "map_abs_difference": {"max": float(diffs.max()), "mean": float(diffs.mean())},
        "mean_metrics": {d: {k: means[d][k] for k in COLUMNS} for d in means},
        "bf16_head_minus_fp32_head_points": {
            k: 100 * (means["clip"][k] - means["float32"][k]) for k in COLUMNS
        },
    }
    write_json(Path(args.out), report)
    print(report["map_abs_difference"], report["bf16_head_minus_fp32_head_points"])


if __name__ == "__main__":
    main()
