"""Benchmark `clipsam_jax.metrics.compute_metrics` against naive scikit-learn calls.

Synthetic data (fixed seed), one class at a time, maps at 518 × 518 (docs/method.md §1):
  visa:   200 maps, the size of a large VisA test class (~54 M pixels);
  mvtec:  115 maps, MVTec AD's average test class (1725 test images / 15 classes).
Half of the maps hold 1-3 elliptical defects (~3 % anomalous pixels over the class); maps are
Gaussian noise plus a blurred response to the defects and, in half of all maps, to a decoy
ellipse outside the ground truth (false positives, so no metric is trivially 1). Scores are
continuous float32 values (nearly all distinct: the hard case for sorting).

For each class it times `compute_metrics` in both PRO modes and the naive sklearn baseline
(`roc_auc_score`, `average_precision_score`, `precision_recall_curve` + F1 on the flattened
arrays; no PRO), and measures each one's peak traced memory (tracemalloc, a separate run), and
writes JSON to benchmarks/results/metrics_<machine>.json (or --out).

    python benchmarks/metrics.py                 # both classes, with the sklearn baseline
    python benchmarks/metrics.py --no-sklearn --classes visa
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import sys
import time
import tracemalloc
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from clipsam_jax.metrics import compute_metrics

SIZE = 518
CLASSES = {"visa": 200, "mvtec": 115}


def synthetic_class(n_maps: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """float32 maps (n, S, S) and bool masks (n, S, S); every other map is anomalous."""
    rng = np.random.default_rng(seed)
    maps = np.empty((n_maps, size, size), dtype=np.float32)
    masks = np.zeros((n_maps, size, size), dtype=bool)
    for i in range(n_maps):
        if i % 2 == 0:
            masks[i] = _defects(rng, size)
        target = masks[i].astype(np.float32)
        if rng.random() < 0.5:  # a decoy: strong response where nothing is wrong
            target = np.maximum(target, 0.8 * _defects(rng, size, max_count=1))
        response = cv2.GaussianBlur(target, (0, 0), sigmaX=6.0)
        noise = rng.normal(0.3, 0.12, (size, size)).astype(np.float32)
        maps[i] = np.clip(noise + 0.5 * response, 0.0, 1.0)
    return maps, masks


def _defects(rng: np.random.Generator, size: int, max_count: int = 3) -> np.ndarray:
    """bool (S, S) with 1-max_count filled random ellipses (semi-axes 10-90 px)."""
    canvas = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(1, max_count + 1))):
        center = tuple(int(c) for c in rng.integers(60, size - 60, 2))
        axes = tuple(int(a) for a in rng.integers(10, 91, 2))
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(canvas, center, axes, angle, 0, 360, 1, thickness=-1)
    return canvas.astype(bool)


def naive_sklearn(maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """Pixel AUROC / AP / F1-max with plain sklearn calls on the flattened arrays."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    y, s = masks.ravel(), maps.ravel()
    p, r, _ = precision_recall_curve(y, s)
    f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    return {
        "pixel_auroc": float(roc_auc_score(y, s)),
        "pixel_ap": float(average_precision_score(y, s)),
        "pixel_f1_max": float(f1.max()),
    }


def measure(fn, repeats: int, memory: bool) -> dict:
    """Best wall time over `repeats` runs, then one tracemalloc run for the peak."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    out = {"seconds": min(times), "seconds_all": times, "result": dict(result)}
    if memory:
        tracemalloc.start()
        try:
            fn()
            out["peak_traced_bytes"] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    return out


def bench_class(name: str, n_maps: int, args) -> dict:
    """All measurements for one synthetic class."""
    t0 = time.perf_counter()
    maps, masks = synthetic_class(n_maps, args.seed)
    entry = {
        "n_maps": n_maps,
        "map_size": [SIZE, SIZE],
        "n_pixels": int(maps.size),
        "anomalous_pixel_fraction": float(masks.mean()),
        "generation_seconds": time.perf_counter() - t0,
        "runs": {},
    }
    print(f"[{name}] {n_maps} maps, {maps.size / 1e6:.1f} M px, "
          f"{100 * entry['anomalous_pixel_fraction']:.2f} % anomalous", flush=True)  # fmt: skip
    runs = {
        "compute_metrics_mvtec": lambda: compute_metrics(maps, masks, pro_mode="mvtec"),
        "compute_metrics_cflow": lambda: compute_metrics(maps, masks, pro_mode="cflow"),
    }
    if args.sklearn:
        runs["sklearn_naive_pixel"] = lambda: naive_sklearn(maps, masks)
    for run_name, fn in runs.items():
        repeats = 1 if run_name.startswith("sklearn") else args.repeats
        entry["runs"][run_name] = m = measure(fn, repeats, memory=not args.no_memory)
        peak = m.get("peak_traced_bytes")
        peak_text = f", peak {peak / 2**20:.0f} MiB ({peak / maps.size:.1f} B/px)" if peak else ""
        print(f"  {run_name}: {m['seconds']:.2f} s{peak_text}", flush=True)
    if args.sklearn:
        entry["comparison"] = _compare(entry["runs"])
    return entry


def _compare(runs: dict) -> dict:
    """Speed and memory ratios (sklearn / ours) and the largest metric difference."""
    ours, ref = runs["compute_metrics_mvtec"], runs["sklearn_naive_pixel"]
    out = {
        "speedup_vs_sklearn": ref["seconds"] / ours["seconds"],
        "note": "sklearn computes 3 pixel metrics (3 sorts); ours all 7 metrics incl. PRO",
        "max_abs_diff_pixel_metrics": max(
            abs(ours["result"][k] - v) for k, v in ref["result"].items()
        ),
    }
    if "peak_traced_bytes" in ours and "peak_traced_bytes" in ref:
        out["memory_ratio_vs_sklearn"] = ref["peak_traced_bytes"] / ours["peak_traced_bytes"]
    return out


def machine_info() -> dict:
    return {
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="visa,mvtec", help="comma list of visa,mvtec")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of ours (best kept)")
    parser.add_argument("--no-sklearn", dest="sklearn", action="store_false")
    parser.add_argument("--no-memory", action="store_true", help="skip the tracemalloc runs")
    parser.add_argument("--machine", default=None, help="name in the default output file")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    info = machine_info()
    machine = args.machine or f"{info['hostname']}-{info['cpu_count']}cpu"
    out = args.out or Path(__file__).parent / "results" / f"metrics_{machine}.json"
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = {
        "benchmark": "clipsam_jax.metrics.compute_metrics vs naive sklearn, one class",
        "note": "synthetic data (fixed seed), not real model outputs; times are wall clock on "
        "a possibly shared machine, best of --repeats for ours, one run for sklearn",
        "machine": info,
        "seed": args.seed,
        "classes": {},
    }
    for name in args.classes.split(","):
        report["classes"][name] = bench_class(name, CLASSES[name], args)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report["process_ru_maxrss_kib"] = {"start": rss0, "end": rss1}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
