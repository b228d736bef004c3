"""Peak host memory of `evaluate` against dataset size: bounded by the largest class.

    python benchmarks/memory_scale.py            # 10,000 generated images: ~8 min on 2 CPUs
    python benchmarks/memory_scale.py --quick    # 300 images: checks the script in about 1 min

Data: a generated MVTec-AD-layout set whose TEST split (what the evaluation reads) holds
`--images` images in `--classes` classes. The generator has four MVTec class specs, so the set is
assembled from several `synthetic.generate` calls, one per class, each with its own seed, its
class folder renamed (e.g. `grid_s07`) and its `train/` folder dropped (evaluation never reads
it). Class sizes are uneven on purpose: one class of `--largest` images (`bottle_large`), the
others spread linearly around the remaining mean (about 100..500 images at the defaults), half
`test/good`, half defective with masks. `--image-size` is the generated side (the loader resizes
to the CLIP size S anyway). The set is reused when `--workdir` already holds it.

Model: the tiny random CLIP of `clipsam_jax.clip.tiny` at S = 112 (grid 8) with a randomly
initialized UMCI head (`models.init.init_params`, as run_all.py --quick), or `--head zero-shot`;
no SAM (`--sam none`: rough maps only; SAM would dominate the time and its per-batch memory does
not depend on the dataset size either). Metrics: exact, then `metrics="streaming"` (binned,
APPROXIMATE). Timings and memory only: tiny random models on synthetic data, no accuracy.

Each run is a fresh subprocess (memory freed by one run and kept by the allocator, or JAX's
compilation, must not hide another's peak). A worker warms up (`evaluate_class` on two batches of
the first class: compilation, lazy imports), reads its resident memory (the baseline), resets the kernel's peak mark (VmHWM) and runs `evaluate`. It
also observes the evaluation (a callback) to reset the mark at each class start and read it at the end,
which gives the peak of every class alone; the run's peak is the max over these segments.

Runs (`--runs`, each a fresh process): small / medium / largest = one class of the smallest,
the second largest and the largest size (peak growth against class size, fitted linearly);
all = every class; *_streaming with `metrics="streaming"`; *_arena2 with MALLOC_ARENA_MAX=2
(resident memory creeps up over the first classes of a run, then levels off, by an amount that
varies from run to run; we attribute it to glibc keeping freed memory in per-thread arenas, the
loader decoding in a new thread pool per class, since two arenas shrink it). `--runs all#2 --append` repeats a run into the existing JSON.

Classes run one after another (`RuntimeConfig.overlap_classes="off"`, the CPU default): on accelerators the
default scores a class while the next one's maps are made, holding two classes' maps at once.

Expected: exact mode holds one class at a time (float16 rough maps + bool masks, N × S × S × 3
bytes, plus the metric computation's temporaries), so the 10,000-image peak is about the
largest class's, not 10,000 / largest times it; streaming keeps no maps (constant memory).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

common.setup_path()

DEFAULT_OUT = common.RESULTS / "memory_scale_cpu.json"
SPECS = ("bottle", "grid", "screw")  # MVTec specs with a test/good folder (carpet has none)
LARGEST_NAME = "bottle_large"
FULL_RUNS = "small,medium,largest,all,largest_streaming,all_streaming,largest_arena2,all_arena2"
QUICK_RUNS = "largest,all,all_streaming"
NOTE = (
    "tiny random models (tiny CLIP S=112 grid 8, random-init UMCI head or zero-shot), synthetic "
    "data, CPU (shared 2-core machine), no SAM: memory and timings only, metric values mean "
    "nothing"
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000, help="test images in all")
    parser.add_argument("--classes", type=int, default=31, help="classes, the largest included")
    parser.add_argument("--largest", type=int, default=1000, help="images of the largest class")
    parser.add_argument("--image-size", type=int, default=64, help="generated image side")
    parser.add_argument("--clip-size", type=int, default=112, help="CLIP input size S")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--head", choices=("umci", "zero-shot"), default="umci")
    parser.add_argument("--runs", default=None, help=f"comma list of runs (default {FULL_RUNS}; "
                        f"--quick: {QUICK_RUNS})")  # fmt: skip
    parser.add_argument("--workdir", default="/tmp/clipsam_memory_scale")
    parser.add_argument("--out", default=None, help=f"JSON path (default {DEFAULT_OUT})")
    parser.add_argument("--append", action="store_true",
                        help="add the runs to those already in --out (e.g. --runs all#2)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="300 images, 5 classes: a smoke run")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal
    args = parser.parse_args(argv)
    args.runs = args.runs or (None if args.quick else FULL_RUNS)
    if args.quick:
        args.images, args.classes, args.largest, args.batch = 300, 5, 100, 16
        args.runs = args.runs or QUICK_RUNS
        args.workdir = str(Path(args.workdir).with_name(Path(args.workdir).name + "_quick"))
        if args.out is None:
            args.out = str(Path(tempfile.gettempdir()) / "memory_scale_quick.json")
    return args


# ------------------------------------------------------------------------------------ dataset


def class_sizes(images: int, classes: int, largest: int) -> dict[str, int]:
    """{class folder: test images}: one class of `largest`, the rest spread linearly over
    [mean/3, 5·mean/3] around their mean, every size even (half good, half defective)."""
    if classes < 2 or largest >= images or largest % 2:
        raise ValueError("need classes >= 2, an even --largest and --largest < --images")
    others = classes - 1
    mean_half = (images - largest) / others / 2
    lo, hi = mean_half / 3, 5 * mean_half / 3
    halves = [max(1, round(lo + (hi - lo) * i / max(others - 1, 1))) for i in range(others)]
    halves[-1] += (images - largest) // 2 - sum(halves)  # exact total (even part)
    if max(halves) * 2 >= largest or min(halves) < 1:
        raise ValueError("the largest class must be bigger than every other class")
    sizes = {f"{SPECS[i % len(SPECS)]}_s{i:02d}": 2 * h for i, h in enumerate(halves)}
    sizes[LARGEST_NAME] = largest
    return sizes


def build_dataset(root: Path, sizes: dict[str, int], image_size: int) -> dict:
    """Generate (or reuse) the MVTec-layout set of `sizes`; returns its description."""
    from clipsam_jax.data import synthetic

    wanted = {"sizes": sizes, "image_size": image_size, "layout": "mvtec"}
    marker = root / "memory_scale.json"
    if marker.is_file() and json.loads(marker.read_text()).get("wanted") == wanted:
        description = json.loads(marker.read_text())
        description["reused"] = True
        return description
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    began = time.perf_counter()
    parts = root.parent / (root.name + "_parts")
    for seed, (name, count) in enumerate(sorted(sizes.items())):
        spec = name.split("_")[0]
        part = synthetic.generate("mvtec", parts / name, seed=seed, classes=[spec],
                                  images_per_class=count // 2, image_size=image_size,
                                  write_meta_json=False)  # fmt: skip
        shutil.rmtree(part / spec / "train")  # evaluation reads the test split only
        (part / spec).rename(root / name)
        print(f"  generated {name}: {count} test images", flush=True)
    shutil.rmtree(parts)
    description = {
        "wanted": wanted,
        "root": str(root),
        "layout": "mvtec (test split: test/good + test/<defect> with ground_truth masks)",
        "test_images": sum(sizes.values()),
        "classes": len(sizes),
        "largest_class": max(sizes, key=sizes.get),
        "largest_class_images": max(sizes.values()),
        "smallest_class_images": min(sizes.values()),
        "generation_seconds": round(time.perf_counter() - began, 1),
        "how": "one clipsam_jax.data.synthetic.generate('mvtec', classes=[spec], "
        "images_per_class=n/2, seed=i) call per class (specs bottle/grid/screw, seed = class "
        "index), class folder renamed, train/ removed",
    }
    marker.write_text(json.dumps(description, indent=2))
    description["reused"] = False
    return description


# ------------------------------------------------------------------------------------ runs

ARENA2 = {"MALLOC_ARENA_MAX": "2"}  # glibc: at most 2 malloc arenas (default 8 per core)
RUNS = {  # name → (classes: small | medium | largest | all, metrics mode, extra environment)
    "small": ("small", "exact", {}),
    "medium": ("medium", "exact", {}),
    "largest": ("largest", "exact", {}),
    "all": ("all", "exact", {}),
    "largest_streaming": ("largest", "streaming", {}),
    "all_streaming": ("all", "streaming", {}),
    "largest_arena2": ("largest", "exact", ARENA2),
    "all_arena2": ("all", "exact", ARENA2),
}


def run_worker(spec: dict, env: dict) -> dict:
    """Run one evaluation in a fresh interpreter (this script with --worker, `env` added to the
    environment); its result."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.json"
        path.write_text(json.dumps(spec))
        began = time.perf_counter()
        command = [sys.executable, __file__, "--worker", str(path)]
        done = subprocess.run(command, env={**os.environ, **env}, check=False)
        result_path = Path(tmp) / "result.json"
        if done.returncode or not result_path.is_file():
            return {"error": f"worker exited with {done.returncode}"}
        result = json.loads(result_path.read_text())
    result["process_seconds"] = round(time.perf_counter() - began, 1)
    return result


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_model(spec: dict):
    """Tiny CLIP (+ random UMCI head) as a RoughMapModel, and the ClipConfig it ran with."""
    from clipsam_jax.clip.loading import load_clip
    from clipsam_jax.clip.prompts import TextFeatures
    from clipsam_jax.clip.tiny import write_tiny_clip
    from clipsam_jax.config import ClipConfig, HeadConfig
    from clipsam_jax.inference import RoughMapModel
    from clipsam_jax.models.heads import build_head
    from clipsam_jax.models.init import init_params

    work = Path(spec["workdir"])
    clip_dir = work / "tiny_clip"
    if not (clip_dir / "config.json").is_file():
        write_tiny_clip(clip_dir)
    clip_config = ClipConfig(model=str(clip_dir), image_size=spec["clip_size"], dtype="float32")
    cache_dir = str(work / "cache")
    clip = load_clip(clip_config.model, clip_config.image_size, dtype="float32",
                     cache_dir=cache_dir)  # fmt: skip
    text = TextFeatures(clip, cache_dir=cache_dir)
    head_config = head_params = None
    if spec["head"] == "umci":
        head_config = HeadConfig(hidden_dim=16, pool_sizes=(2, 4))
        grid, stages = clip.grid, len(clip.feature_layers)
        head_params = init_params(build_head(head_config, clip.text_dim, stages), 0,
                                  [(1, grid, grid, clip.feature_dim)] * stages,
                                  (1, 2, clip.text_dim), head_config.init)  # fmt: skip
    model = RoughMapModel(clip, text, head_config, head_params, spec["batch"], clip_config)
    return model, clip_config


def warm_up(config, model) -> None:
    """`evaluate_class` on 2 batches of the first class (normal and anomalous) into a scratch
    folder: compiles the model and makes lazy imports and first-call allocations (loader threads,
    metric code) before the baseline is read, so that they are not counted as class memory."""
    from clipsam_jax import eval_lib
    from clipsam_jax.data.registry import load_dataset

    samples = load_dataset("mvtec", config.data_root, classes=config.classes[:1])
    samples = sorted(next(iter(samples.values())), key=lambda s: s.label)
    with tempfile.TemporaryDirectory() as scratch:
        half = min(config.batch_size, len(samples) // 2)
        run = eval_lib.ClassRun(model, None, config, Path(scratch), progress=False)
        eval_lib.evaluate_class("warm_up", samples[:half] + samples[-half:], run)


def worker(spec_path: Path) -> None:
    """Inside the subprocess: build, warm up, reset the peak mark, evaluate, write the result."""
    from clipsam_jax import eval_lib
    from clipsam_jax.config import EvalConfig, RefineConfig, RuntimeConfig

    spec = json.loads(spec_path.read_text())
    import jax

    jax.config.update("jax_compilation_cache_dir", str(Path(spec["workdir"]) / "jax_cache"))
    model, clip_config = build_model(spec)
    config = EvalConfig(dataset="mvtec", data_root=spec["data_root"], output=spec["output"],
                        classes=tuple(spec["classes"]), no_umci=spec["head"] == "zero-shot",
                        metrics=spec["metrics"], visualize_per_class=0, batch_size=spec["batch"],
                        clip=clip_config, refine=RefineConfig(sam="none"))  # fmt: skip
    warm_up(config, model)
    segments, per_class = [], []

    class ClassMemory:
        """Per-class peak RSS: the mark is reset at each class start and read at its end."""

        def on_class_start(self, name, samples):
            segments.append(common.peak_rss_mib())  # peak since the previous reset
            self.name, self.images, self.start = name, len(samples), _rss_mib()
            common.reset_peak_rss()
            self.began = time.perf_counter()

        def on_class_end(self, name, result):
            peak = common.peak_rss_mib()
            per_class.append({"class": name, "images": self.images, "rss_start_mib": self.start,
                              "peak_rss_mib": peak, "growth_mib": peak - self.start,
                              "seconds": time.perf_counter() - self.began})  # fmt: skip
            segments.append(peak)
            common.reset_peak_rss()

    baseline = _rss_mib()
    common.reset_peak_rss()
    began = time.perf_counter()
    report = eval_lib.evaluate(config, runtime=RuntimeConfig(overlap_classes="off"),
                               progress=False, model=model, refiner=None,
                               callbacks=[ClassMemory()])  # fmt: skip
    seconds = time.perf_counter() - began
    segments.append(common.peak_rss_mib())
    images = sum(c["images"] for c in per_class)
    result = {
        "metrics_mode": report["metrics_mode"],
        "classes": len(per_class),
        "images": images,
        "largest_class_images": max(c["images"] for c in per_class),
        "baseline_rss_mib": baseline,
        "peak_rss_mib": max(segments),
        "peak_growth_mib": max(segments) - baseline,
        "seconds": seconds,
        "images_per_second": images / seconds,
        "per_class": per_class,
        "rough_mean": report["rough"]["mean"],
    }
    (spec_path.parent / "result.json").write_text(json.dumps(result))


def theory_mib(images: int, size: int) -> float:
    """Maps exact mode holds for `images` images: float16 rough maps + bool masks (no SAM)."""
    return images * size * size * (2 + 1) / 2**20


def slope_fit(runs: dict) -> dict:
    """Least squares of peak growth (MiB) against class size over the one-class exact runs
    (each a fresh process: small, medium, largest)."""
    import numpy as np

    points = [(r["images"], r["peak_growth_mib"]) for name, r in runs.items()
              if name in ("small", "medium", "largest") and "images" in r]  # fmt: skip
    if len({n for n, _ in points}) < 2:
        return {}
    slope, intercept = (float(x) for x in np.polyfit(*np.array(points, float).T, 1))
    return {"growth_kib_per_image": slope * 1024, "growth_intercept_mib": intercept,
            "points": points}  # fmt: skip


def class_start_rss(result: dict) -> dict:
    """Resident memory at each class start of a many-class run: it creeps, then levels off."""
    starts = [c["rss_start_mib"] for c in result.get("per_class", [])]
    if len(starts) < 4:
        return {}
    quarter = len(starts) // 4
    return {"first": starts[0], "max": max(starts), "last": starts[-1],
            "max_first_quarter": max(starts[:quarter]),
            "max_last_quarter": max(starts[-quarter:])}  # fmt: skip


def model_description(args) -> dict:
    head = "random-init UMCI (hidden 16, pools 2,4)" if args.head == "umci" else "zero-shot"
    return {"clip": "clipsam_jax.clip.tiny.write_tiny_clip (random weights)",
            "clip_size": args.clip_size, "grid": args.clip_size // 14, "head": head,
            "sam": "none (rough maps only)", "batch_size": args.batch, "visualize_per_class": 0,
            "dtype": "float32"}  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(Path(args.worker))
        return
    work = Path(args.workdir)
    out = Path(args.out) if args.out else DEFAULT_OUT
    sizes = class_sizes(args.images, args.classes, args.largest)
    print(f"== dataset: {sum(sizes.values())} test images, {len(sizes)} classes, "
          f"largest {max(sizes.values())}, smallest {min(sizes.values())}", flush=True)  # fmt: skip
    data_root = work / f"mvtec_{args.images}_{args.classes}_{args.largest}_{args.image_size}"
    dataset = build_dataset(data_root, sizes, args.image_size)
    dataset["class_sizes"] = sizes
    smallest = min(sizes, key=sizes.get)
    medium = max((n for n in sizes if n != LARGEST_NAME), key=sizes.get)  # the second largest
    subsets = {"small": [smallest], "medium": [medium], "largest": [LARGEST_NAME],
               "all": sorted(sizes)}  # fmt: skip
    report = {
        "benchmark": "memory_scale",
        "date": common.now(),
        "note": NOTE,
        "machine": common.machine_info(),
        "args": {k: v for k, v in vars(args).items() if k != "worker"},
        "dataset": dataset,
        "model": model_description(args),
        "theory": {
            "per_image_map_bytes": args.clip_size**2 * 3,
            "largest_class_maps_mib": theory_mib(max(sizes.values()), args.clip_size),
            "whole_set_maps_mib_if_held": theory_mib(sum(sizes.values()), args.clip_size),
            "what": "exact mode: float16 rough map + bool mask per image at S x S, one class "
            "at a time; compute_metrics adds temporaries proportional to the class's pixels",
        },
        "runs": {},
    }
    previous = common.read_json(out) if args.append else None
    if previous:
        report["runs"] = previous.get("runs", {})
        added = {"date": report["date"], "runs": args.runs}
        report["appended"] = [*previous.get("appended", []), added]
        report["date"] = previous.get("date", report["date"])
    for name in args.runs.split(","):
        scope, metrics, env = RUNS[name.split("#")[0]]  # all#2: a repeat of "all"
        print(f"== run {name}: {scope} classes, metrics {metrics} {env or ''}", flush=True)
        output = work / "results" / name
        shutil.rmtree(output, ignore_errors=True)  # no reuse of per-class records
        spec = {"workdir": str(work), "data_root": str(data_root), "output": str(output),
                "classes": subsets[scope], "metrics": metrics, "head": args.head,
                "batch": args.batch, "clip_size": args.clip_size}  # fmt: skip
        result = {"environment": env, **run_worker(spec, env)}
        if "images" in result:
            result["theory_maps_mib"] = theory_mib(result["largest_class_images"], args.clip_size)
            result["class_start_rss_mib"] = class_start_rss(result)
        report["runs"][name] = result
        common.write_json(out, report)
    summarize(report)
    common.write_json(out, report)


def summarize(report: dict) -> None:
    """Ratios that state the bound, and the printed table."""
    runs = report["runs"]
    fit = slope_fit(runs)
    derived = {"one_class_growth_fit": fit}
    if fit:  # what holding every image's maps at once would add (the bound it avoids)
        images = report["dataset"]["test_images"]
        derived["dataset_bound_growth_estimate_mib"] = (
            fit["growth_kib_per_image"] * images / 1024 + fit["growth_intercept_mib"]
        )
    pairs = {"all": "largest", "all_streaming": "largest_streaming", "all_arena2": "largest_arena2"}
    for all_run in runs:
        one_run = pairs.get(all_run.split("#")[0])
        if "peak_growth_mib" in runs[all_run] and "images" in runs.get(one_run, {}):
            derived[f"{all_run}_over_{one_run}"] = {
                "peak_growth_ratio": runs[all_run]["peak_growth_mib"]
                / runs[one_run]["peak_growth_mib"],
                "peak_rss_ratio": runs[all_run]["peak_rss_mib"] / runs[one_run]["peak_rss_mib"],
                "images_ratio": runs[all_run]["images"] / runs[one_run]["images"],
            }
    if "rough_mean" in runs.get("all", {}) and "rough_mean" in runs.get("all_streaming", {}):
        exact, approx = runs["all"]["rough_mean"], runs["all_streaming"]["rough_mean"]
        derived["streaming_minus_exact_mean_metrics"] = {
            k: approx[k] - exact[k] for k in exact
            if isinstance(exact.get(k), float) and isinstance(approx.get(k), float)
        }  # fmt: skip
    report["derived"] = derived
    rows = [{"run": name, **{k: r.get(k) for k in ("metrics_mode", "classes", "images",
             "largest_class_images", "baseline_rss_mib", "peak_rss_mib", "peak_growth_mib",
             "theory_maps_mib", "seconds", "images_per_second")}}
            for name, r in runs.items()]  # fmt: skip
    for row in rows:
        row["metrics_mode"] = (row["metrics_mode"] or "-").split(" ")[0]
    common.print_table(rows, [("run", "run"), ("metrics", "metrics_mode"), ("classes", "classes"),
                              ("images", "images"), ("largest", "largest_class_images"),
                              ("base MiB", "baseline_rss_mib"), ("peak MiB", "peak_rss_mib"),
                              ("growth MiB", "peak_growth_mib"),
                              ("maps MiB", "theory_maps_mib"), ("s", "seconds"),
                              ("img/s", "images_per_second")])  # fmt: skip
    for key, value in derived.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
