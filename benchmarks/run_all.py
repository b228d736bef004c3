"""All stages of ClipSAM, timed in one run, against the PyTorch reference path.

    python benchmarks/run_all.py            # full size: ViT-L/14-336 at S=518, SAM ViT-H
    python benchmarks/run_all.py --quick    # tiny models, checks the script in a minute

Full size uses RANDOM weights (a ViT-L/14-336 CLIP directory written by
`clipsam_jax.clip.random_init.write_random_clip`, a random UMCI head, a randomly initialized SAM
ViT-H) on generated VisA-layout images: timings, memory and MFU only, no accuracy. Sections run in
order of importance, each guarded (an error is recorded and the run goes on) and the JSON is
rewritten after each, so a run stopped by a time limit keeps what it measured. `--budget` skips
the sections that would start after that many seconds.

Reported: images/s of each stage and end to end, the JAX path against transformers' PyTorch CLIP +
the PyTorch UMCI twin + stock `SamPredictor` use (one box at a time), the MFU of both encoders
against the datasheet bf16 dense peak and a measured matmul peak, the CLIP encoder's kernel
profile (time by kind: GEMMs, fused attention, XLA's other fusions), peak host and device memory,
the bf16-vs-fp32 change of the rough map, and one epoch of `train.main` at full size. XLA's cost
analysis, recorded beside the analytic FLOPs, leaves out cuBLAS and cuDNN calls on GPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

common.setup_path()

DATASHEET_BF16_PEAK = {"H100": 989e12, "H200": 989e12}  # dense bf16, NVIDIA datasheets (SXM)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models: a smoke run")
    parser.add_argument("--images", type=int, default=64, help="evaluation images")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--train-images-per-class", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=330.0, help="seconds; later sections skip")
    parser.add_argument("--workdir", default="/tmp/clipsam_bench")
    parser.add_argument(
        "--out", default=None, help="JSON path (default results/run_all_<device>.json)"
    )
    parser.add_argument("--skip", default="", help="comma-separated sections to skip")
    parser.add_argument(
        "--box-quantile",
        type=float,
        default=0.995,
        help="MMR threshold = this quantile of the random head's rough maps, "
        "so SAM gets a realistic few boxes per image",
    )
    parser.add_argument(
        "--attention",
        default=None,
        help="encoder attention implementations to time (clip.features.resolve_attention); "
        "default: reference,cudnn on GPUs, reference,blocked on CPUs",
    )
    parser.add_argument(
        "--all-clip-variants",
        action="store_true",
        help="clip_variants also times CLIP_VARIANTS_MORE (no change in earlier runs)",
    )
    parser.add_argument("--sam-batch", type=int, default=8, help="SAM encoder images per call")
    return parser.parse_args(argv)


class Run:
    """Collects results section by section and rewrites the JSON after each."""

    def __init__(self, args, out: Path):
        self.args, self.out, self.start = args, out, time.perf_counter()
        self.report = {"benchmark": "run_all", "date": common.now(), "sections": {},
                       "errors": {}, "skipped": []}  # fmt: skip

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @contextlib.contextmanager
    def section(self, name: str, always: bool = False):
        """`always`: run even past the time budget (cheap sections)."""
        over_budget = self.elapsed() > self.args.budget and not always
        if name in self.args.skip.split(",") or over_budget:
            self.report["skipped"].append(name)
            print(f"== {name}: skipped", flush=True)
            yield None
            return
        print(f"== {name} (t={self.elapsed():.0f}s)", flush=True)
        values: dict = {}
        began = time.perf_counter()
        try:
            yield values
        except Exception as error:  # record and go on: one broken section must not cost the rest
            self.report["errors"][name] = "".join(traceback.format_exception(error))[-4000:]
            print(f"!! {name} failed: {error!r}", flush=True)
        values["section_seconds"] = round(time.perf_counter() - began, 2)
        self.report["sections"][name] = values
        self.report["elapsed_seconds"] = round(self.elapsed(), 1)
        common.write_json(self.out, self.report)


# ------------------------------------------------------------------------------- helpers


def sync_torch():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_of(fn, repeats: int, warmup: int = 1) -> dict:
    """Median and min wall seconds of a blocking callable (after `warmup` untimed calls)."""
    for _ in range(warmup):
        fn()
    walls = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - began)
    return {"seconds_median": statistics.median(walls), "seconds_min": min(walls)}


def jax_matmul_peak(on_gpu: bool) -> float:
    import jax
    import jax.numpy as jnp

    n = 8192 if on_gpu else 1024
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    mm = jax.jit(lambda x, y: x @ y)
    timing = best_of(lambda: mm(a, b).block_until_ready(), 10, warmup=2)
    return 2 * n**3 / timing["seconds_min"]


def torch_matmul_peak(device) -> float:
    import torch

    on_gpu = device.type == "cuda"
    n = 8192 if on_gpu else 1024
    dtype = torch.bfloat16 if on_gpu else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))

    def run():
        a @ b
        sync_torch()

    return 2 * n**3 / best_of(run, 10, warmup=2)["seconds_min"]


def device_peak_bytes() -> dict:
    import jax

    out = {}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["jax_peak_gib"] = stats["peak_bytes_in_use"] / 2**30
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            out["torch_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


# ------------------------------------------------------------------------------- sections


def setup(run: Run, values: dict, state: dict) -> None:
    """Random full-size CLIP dir (or the tiny one), generated images, models."""
    import jax
    import numpy as np

    from clipsam_jax.clip.loading import load_clip
    from clipsam_jax.clip.prompts import TextFeatures
    from clipsam_jax.config import HeadConfig
    from clipsam_jax.data import synthetic
    from clipsam_jax.data.registry import load_dataset
    from clipsam_jax.models.heads import build_head
    from clipsam_jax.models.init import init_params

    args, work = run.args, Path(run.args.workdir)
    clip_dir = work / ("tiny_clip" if args.quick else "random_vit_l14_336")
    began = time.perf_counter()
    if not (clip_dir / "config.json").is_file():
        if args.quick:
            from clipsam_jax.clip.tiny import write_tiny_clip

            write_tiny_clip(clip_dir)
        else:
            from clipsam_jax.clip.random_init import write_random_clip

            write_random_clip(clip_dir)
    values["write_clip_seconds"] = time.perf_counter() - began
    per_class = max(1, args.images // 6)  # 3 classes × (normal + anomalous)
    size = 128 if args.quick else 768
    data = work / "visa"
    if not data.is_dir():
        synthetic.generate("visa", data, seed=0, images_per_class=per_class, image_size=size)
    samples = [s for items in load_dataset("visa", data).values() for s in items]
    values.update(images=len(samples), generated_image_size=size, clip_dir=str(clip_dir))
    dtype = "bfloat16" if state["on_gpu"] else "float32"
    began = time.perf_counter()
    clip = load_clip(str(clip_dir), args.image_size, dtype=dtype, cache_dir=str(work / "cache"))
    values["load_clip_seconds"] = time.perf_counter() - began
    head_config = HeadConfig(hidden_dim=16, pool_sizes=(2, 4)) if args.quick else HeadConfig()
    grid = clip.grid
    head_params = init_params(build_head(head_config, clip.text_dim), 0,
                              [(1, grid, grid, clip.feature_dim)] * 4, (1, 2, clip.text_dim),
                              head_config.init)  # fmt: skip
    began = time.perf_counter()
    text = TextFeatures(clip, cache_dir=str(work / "cache"))
    text.batch(sorted({s.class_name for s in samples}))
    values["text_features_seconds"] = time.perf_counter() - began
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(args.batch, args.image_size, args.image_size, 3)).astype(np.float32)
    state.update(clip=clip, text=text, head_config=head_config, head_params=head_params,
                 samples=samples, data=data, pixels=pixels, clip_dir=clip_dir)  # fmt: skip
    values["clip_dtype"] = dtype
    values["backend"] = jax.default_backend()


def vit_flops_per_image(config, image_size: int) -> float:
    """Multiply-add FLOPs (×2) of one CLIP vision forward: patch embedding, per layer the four
    attention projections, QKᵀ and AV, and the MLP (layer norms and softmax left out)."""
    vision = config.vision_config
    d, inner, patch = vision.hidden_size, vision.intermediate_size, vision.patch_size
    tokens = (image_size // patch) ** 2 + 1
    per_layer = 2 * tokens * (4 * d * d + 2 * d * inner) + 2 * 2 * tokens * tokens * d
    return 2 * (tokens - 1) * 3 * patch * patch * d + vision.num_hidden_layers * per_layer


def clip_stage(run: Run, values: dict, state: dict) -> None:
    """The jitted JAX encoder alone, per batch size and attention implementation: images/s,
    FLOPs per image (analytic; XLA's cost analysis alongside), MFU. The fastest attention at
    `--batch` is the one rough_model and end_to_end use (`fastest_attention`)."""
    import jax
    import numpy as np

    from clipsam_jax.clip.features import make_image_encoder, resolve_attention, resolve_fuse_qkv

    clip = state["clip"]
    flops = vit_flops_per_image(clip.config, clip.image_size)
    values.update(flops_per_image=flops, dtype=jax.numpy.dtype(clip.module.dtype).name)
    # A second, larger batch shows how far batching lifts the GPU; on CPU it only costs minutes.
    larger = state["on_gpu"] and not run.args.quick
    batches = (run.args.batch, 4 * run.args.batch) if larger else (run.args.batch,)
    names = run.args.attention or ("reference,cudnn" if state["on_gpu"] else "reference,blocked")
    values["library_default_attention"] = resolve_attention(None, clip.module.dtype)
    best, fastest = 0.0, {}
    for batch in batches:
        pixels = np.random.default_rng(1).normal(
            size=(batch, clip.image_size, clip.image_size, 3)).astype(np.float32)  # fmt: skip
        for name in names.split(","):
            began = time.perf_counter()
            try:
                encoder = make_image_encoder(clip, attention=name)
                compiled = encoder.lower(clip.params, pixels).compile()
            except Exception as error:  # e.g. no cuDNN attention here: time the others
                values[f"{name}_attention_unavailable"] = f"{type(error).__name__}: {error}"[:500]
                continue
            compile_seconds = time.perf_counter() - began
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            timing = best_of(lambda e=encoder, p=pixels: jax.block_until_ready(e(clip.params, p)),
                             run.args.repeats)  # fmt: skip
            rate = batch / timing["seconds_median"]
            entry = {**timing, "images_per_second": rate, "compile_seconds": compile_seconds,
                     "xla_cost_analysis_flops_per_image": float(cost.get("flops", 0.0)) / batch,
                     "achieved_tflops": flops * rate / 1e12, **_mfu(flops * rate, state),
                     "fuse_qkv": resolve_fuse_qkv(None, name)}  # fmt: skip
            values[f"batch{batch}_{name}_attention"] = entry
            if batch == run.args.batch:
                fastest[name] = rate
            best = max(best, rate)
    values["images_per_second"] = best
    values["fastest_attention"] = state["clip_attention"] = max(fastest, key=fastest.get)
    state["clip_images_per_second"] = fastest[state["clip_attention"]]


def _large_batch_case(run: Run, values: dict, state: dict) -> tuple[int | None, str | None]:
    """(batch, attention) of the encoder sections at clip_encoder's larger batch with its fastest
    attention; batch None (recorded as skipped) on CPU outside --quick."""
    if not state["on_gpu"] and not run.args.quick:
        values["skipped"] = "GPU only (a full-size batch takes minutes on CPU)"
        return None, None
    batch = 4 * run.args.batch if state["on_gpu"] else run.args.batch
    return batch, state.get("clip_attention")


# Kernel kinds of a device trace, by name: cuBLAS/cuBLASLt/CUTLASS/Triton GEMMs, fused attention.
KERNEL_KINDS = (("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "dot")),
                ("attention", ("cudnn", "fmha", "flash", "sdpa", "attention")))  # fmt: skip


def clip_profile(run: Run, values: dict, state: dict) -> None:
    """The CLIP encoder's device kernels (jax.profiler trace, Perfetto JSON) at the larger batch
    of clip_encoder with its fastest attention: time per kernel name and per kind (matmul,
    attention, other: XLA's fusions and copies), the device's busy share of the wall time, and
    the rate of the GEMMs alone, to say what holds the encoder's MFU down. GPU only (on CPU the
    quick run checks the section on XLA's CPU ops)."""
    import jax
    import numpy as np

    from clipsam_jax.clip.features import make_image_encoder, resolve_fuse_qkv

    on_gpu, clip = state["on_gpu"], state["clip"]
    batch, attention = _large_batch_case(run, values, state)
    if batch is None:
        return
    encoder = make_image_encoder(clip, attention=attention)
    pixels = np.random.default_rng(2).normal(
        size=(batch, clip.image_size, clip.image_size, 3)).astype(np.float32)  # fmt: skip
    # Compiled once, outside the trace; its optimized HLO beside the JSON maps the trace's
    # fusion names to the model's ops (the same executable is the one traced).
    compiled = encoder.lower(clip.params, pixels).compile()
    hlo = run.out.with_name(f"{run.out.stem}_clip_encoder_b{batch}_hlo.txt.gz")
    with gzip.open(hlo, "wt") as f:
        f.write(compiled.as_text())
    values["optimized_hlo"] = hlo.name
    jax.block_until_ready(compiled(clip.params, pixels))  # warm-up outside the trace
    calls = 3
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder, create_perfetto_trace=True)
        began = time.perf_counter()
        for _ in range(calls):
            jax.block_until_ready(compiled(clip.params, pixels))
        wall = (time.perf_counter() - began) / calls
        jax.profiler.stop_trace()
        trace = next(Path(folder).rglob("perfetto_trace.json.gz"))
        with gzip.open(trace) as f:
            events = json.load(f)
    # The same calls with the pixels already on the device: the wall time left is dispatch.
    resident = jax.device_put(pixels)
    timing = best_of(lambda: jax.block_until_ready(compiled(clip.params, resident)), calls)
    events = events["traceEvents"] if isinstance(events, dict) else events
    kernels = _device_kernels(events, "/device:GPU" if on_gpu else "/host:CPU")
    if not kernels:  # e.g. CUPTI held by torch.profiler, which ran earlier in this process
        raise RuntimeError("the trace holds no device kernels (see the log for CUPTI errors)")
    busy = sum(kernels.values()) / calls
    copies = sum(v for k, v in kernels.items() if k.startswith("Memcpy")) / calls
    kernels_busy = busy - copies  # what the device-resident calls run
    kinds = dict.fromkeys([k for k, _ in KERNEL_KINDS] + ["other"], 0.0)
    for name, seconds in kernels.items():
        kind = next((k for k, keys in KERNEL_KINDS if any(p in name.lower() for p in keys)),
                    "other")  # fmt: skip
        kinds[kind] += seconds / calls
    vision = clip.config.vision_config
    tokens = (clip.image_size // vision.patch_size) ** 2 + 1
    attention_flops = vision.num_hidden_layers * 4 * tokens * tokens * vision.hidden_size
    gemm_flops = (vit_flops_per_image(clip.config, clip.image_size) - attention_flops) * batch
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
    values.update(
        batch=batch, attention=attention, wall_seconds_per_call=wall,
        fuse_qkv=resolve_fuse_qkv(None, attention),
        device_busy_seconds_per_call=busy, device_busy_share=busy / wall,
        wall_seconds_per_call_device_pixels=timing["seconds_median"],
        device_busy_share_device_pixels=min(kernels_busy / timing["seconds_median"], 1.0),
        seconds_per_call_by_kind=kinds,
        share_by_kind={k: v / busy for k, v in kinds.items()} if busy else {},
        gemm_tflops_while_running=gemm_flops / kinds["matmul"] / 1e12 if kinds["matmul"] else None,
        top_kernels=[{"name": n[:120], "seconds_per_call": s / calls, "share": s / calls / busy}
                     for n, s in top],
    )  # fmt: skip


# Candidate changes to the encoder timed by clip_variants: make_image_encoder keywords, a batch
# factor, the feed ("pixels"), the parameters' dtype ("params": cast once, before the calls), XLA
# compile options (DebugOptions fields, per compilation). Timed before and left out since (no
# change, H200 runs 5 and 6): batch x2 / x4 without fused q/k/v, cuBLASLt GEMMs (1.00-1.02x),
# no CUDA command buffers (0.97-1.01x); CLIP_VARIANTS_MORE holds them (`--all-clip-variants`).
CLIP_VARIANTS = {
    "baseline": {},
    "fused_qkv": {"fuse_qkv": True},
    "fused_qkv_batch_x2": {"fuse_qkv": True, "batch_factor": 2},
    "fused_qkv_batch_x4": {"fuse_qkv": True, "batch_factor": 4},
    # The feed: uint8 pixels normalized on the device (evaluation's input), or float32 pixels
    # already on the device (the encoder alone, no host-to-device copy in the timed call).
    "fused_qkv_uint8_pixels": {"fuse_qkv": True, "pixels": "uint8"},
    "fused_qkv_device_pixels": {"fuse_qkv": True, "pixels": "device"},
    "fused_qkv_device_pixels_batch_x2": {"fuse_qkv": True, "pixels": "device", "batch_factor": 2},
    # Frozen CLIP weights held in the compute dtype: no per-call casts, half the weight reads.
    "fused_qkv_bf16_params": {"fuse_qkv": True, "params": "compute"},
    "fused_qkv_device_pixels_bf16_params": {
        "fuse_qkv": True,
        "pixels": "device",
        "params": "compute",
    },
    "baseline_again": {},  # drift check: the first entry timed again last
}
CLIP_VARIANTS_MORE = {
    "batch_x2": {"batch_factor": 2},
    "batch_x4": {"batch_factor": 4},
    "cublaslt": {"options": {"xla_gpu_enable_cublaslt": True}},
    "fused_qkv_cublaslt": {"fuse_qkv": True, "options": {"xla_gpu_enable_cublaslt": True}},
    "no_command_buffer": {"options": {"xla_gpu_enable_command_buffer": ""}},
}


def clip_variants(run: Run, values: dict, state: dict) -> None:
    """Candidate changes to the CLIP encoder at the larger batch of clip_encoder with its fastest
    attention, each compiled and timed in this process: the query/key/value projections as one
    GEMM, larger batches, cuBLASLt GEMMs, no CUDA command buffers, uint8 or device-resident
    pixels (`CLIP_VARIANTS`); and the
    encoder's GEMM shapes and attention core alone, their rates being the ceiling of its MFU.
    Nothing here changes a library default; a commit citing these figures does."""
    import jax
    import numpy as np

    from clipsam_jax.clip.features import attention_core, make_image_encoder

    clip = state["clip"]
    batch, attention = _large_batch_case(run, values, state)
    if batch is None:
        return
    flops = vit_flops_per_image(clip.config, clip.image_size)
    values.update(batch=batch, attention=attention)
    base = None
    compute_params = None
    variants = dict(CLIP_VARIANTS)
    if run.args.all_clip_variants:  # before the drift check, which stays last
        last = variants.popitem()
        variants = {**variants, **CLIP_VARIANTS_MORE, last[0]: last[1]}
    for name, variant in variants.items():
        size = batch * variant.get("batch_factor", 1)
        shape = (size, clip.image_size, clip.image_size, 3)
        if variant.get("pixels") == "uint8":
            pixels = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
        else:
            pixels = np.random.default_rng(3).normal(size=shape).astype(np.float32)
        if variant.get("pixels") == "device":
            pixels = jax.device_put(pixels)
        params = clip.params
        if variant.get("params") == "compute":
            compute_params = compute_params or cast_floating(clip.params, clip.module.dtype)
            params = compute_params
        try:
            encoder = make_image_encoder(clip, attention, fuse_qkv=variant.get("fuse_qkv", False))
            compiled = encoder.lower(params, pixels).compile(variant.get("options"))
        except Exception as error:  # e.g. an option this XLA lacks: time the others
            values[name] = {"error": f"{type(error).__name__}: {error}"[:400]}
            continue
        timing = best_of(lambda c=compiled, w=params, p=pixels: jax.block_until_ready(c(w, p)),
                         run.args.repeats)  # fmt: skip
        rate = size / timing["seconds_median"]
        base = base or rate
        values[name] = {**variant, "batch": size, **timing, "images_per_second": rate,
                        "ratio_to_baseline": rate / base, **_mfu(flops * rate, state)}  # fmt: skip
    # The encoder's GEMMs (tokens × d @ d × n) and its attention core alone, bf16 on GPUs.
    vision = clip.config.vision_config
    d, inner, heads = vision.hidden_size, vision.intermediate_size, vision.num_attention_heads
    tokens = (clip.image_size // vision.patch_size) ** 2 + 1
    dtype = clip.module.dtype
    key = jax.random.PRNGKey(0)
    shapes = {"q_k_or_v": (d, d), "qkv_fused": (d, 3 * d), "out_proj": (d, d),
              "mlp_up": (d, inner), "mlp_down": (inner, d)}  # fmt: skip
    rows = batch * tokens
    gemms = {}
    matmul = jax.jit(lambda x, y: x @ y)
    for name, (k, n) in shapes.items():
        a = jax.random.normal(key, (rows, k), dtype)
        b = jax.random.normal(key, (k, n), dtype)
        seconds = best_of(lambda a=a, b=b: matmul(a, b).block_until_ready(),
                          run.args.repeats)["seconds_min"]  # fmt: skip
        gemms[name] = {"m_k_n": [rows, k, n], "tflops": 2 * rows * k * n / seconds / 1e12}
    values["gemm_alone"] = gemms
    q = jax.random.normal(key, (batch, tokens, heads, d // heads), dtype)
    core = jax.jit(lambda x: attention_core(attention)(x, x, x, (d // heads) ** -0.5))
    seconds = best_of(lambda: core(q).block_until_ready(), run.args.repeats)["seconds_min"]
    values["attention_core_alone"] = {
        "name": attention, "seconds": seconds,
        "tflops": 4 * batch * tokens * tokens * d / seconds / 1e12,
    }  # fmt: skip


def _device_kernels(events: list, process_prefix: str) -> dict[str, float]:
    """Seconds per event name of the complete ("X") events on the processes whose name starts
    with `process_prefix`: on a GPU its "Stream" lines (the kernels; its "XLA Ops" and "XLA
    Modules" lines span the same time again), elsewhere every line but Python's own."""
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}  # fmt: skip
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}  # fmt: skip
    chosen = {key for key, name in threads.items()
              if processes.get(key[0], "").startswith(process_prefix)}  # fmt: skip
    streams = {key for key in chosen if threads[key].startswith("Stream")}
    summaries = ("python", "XLA Ops", "XLA Modules", "Steps", "TensorFlow Ops")
    chosen = streams or {key for key in chosen if not threads[key].startswith(summaries)}
    totals: dict[str, float] = {}
    for e in events:
        if e.get("ph") != "X" or (e["pid"], e.get("tid")) not in chosen:
            continue
        if "Execute" in e["name"]:
            continue  # host-side dispatch and waits, not kernels
        totals[e["name"]] = totals.get(e["name"], 0.0) + e.get("dur", 0.0) / 1e6
    return totals


def cast_floating(params, dtype):
    """The floating leaves of a parameter tree cast to `dtype`, on the device (once)."""
    import jax
    import jax.numpy as jnp

    def cast(leaf):
        leaf = jnp.asarray(leaf)
        return leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

    return jax.tree.map(cast, params)


def _mfu(achieved: float, state: dict) -> dict:
    out = {}
    if state.get("datasheet_peak"):
        out["mfu_vs_datasheet"] = achieved / state["datasheet_peak"]
    if state.get("measured_peak"):
        out["mfu_vs_measured_matmul"] = achieved / state["measured_peak"]
    return out


def rough_model(run: Run, values: dict, state: dict) -> None:
    """CLIP + head → rough maps, one jitted function (the evaluation path): images/s, with the
    fastest encoder attention of clip_encoder (and transformers' attention alongside)."""
    import numpy as np

    from clipsam_jax.clip.features import resolve_attention
    from clipsam_jax.inference import RoughMapModel

    attention = state.get("clip_attention")  # None: the library default
    model = RoughMapModel(state["clip"], state["text"], state["head_config"],
                          state["head_params"], batch_size=run.args.batch,
                          attention=attention)  # fmt: skip
    pixels = state["pixels"]
    names = ["candle"] * len(pixels)
    began = time.perf_counter()
    maps = model(pixels, names)
    values["compile_seconds"] = time.perf_counter() - began
    timing = best_of(lambda: model(pixels, names), run.args.repeats)
    values.update(timing, images_per_second=len(pixels) / timing["seconds_median"])
    # Evaluation sends the resized uint8 images, normalized on the device (a quarter the bytes).
    rgb = np.random.default_rng(1).integers(0, 256, pixels.shape, dtype=np.uint8)
    model(rgb, names)
    timed = best_of(lambda: model(rgb, names), run.args.repeats)
    values["uint8_input_images_per_second"] = len(rgb) / timed["seconds_median"]
    clip = state["clip"]
    if np.dtype(clip.module.dtype) != np.float32:  # frozen CLIP weights held in the compute dtype
        held = dataclasses.replace(clip, params=cast_floating(clip.params, clip.module.dtype))
        cast = RoughMapModel(held, state["text"], state["head_config"], state["head_params"],
                             batch_size=run.args.batch, attention=attention)  # fmt: skip
        cast_maps = cast(rgb, names)
        timed = best_of(lambda: cast(rgb, names), run.args.repeats)
        values["uint8_input_compute_dtype_clip_params"] = {
            "images_per_second": len(rgb) / timed["seconds_median"],
            "max_abs_diff_to_float32_params": float(np.abs(cast_maps - model(rgb, names)).max()),
        }  # fmt: skip
        del cast, held
    values["attention"] = resolve_attention(attention, state["clip"].module.dtype)
    values["library_default_attention"] = resolve_attention(None, state["clip"].module.dtype)
    if values["attention"] != "reference":  # the same model with transformers' attention
        reference = RoughMapModel(state["clip"], state["text"], state["head_config"],
                                  state["head_params"], batch_size=run.args.batch,
                                  attention="reference")  # fmt: skip
        reference(pixels, names)
        timed = best_of(lambda: reference(pixels, names), run.args.repeats)
        values["reference_attention_images_per_second"] = len(pixels) / timed["seconds_median"]
    values["head_seconds_per_image_estimate"] = max(
        timing["seconds_median"] / len(pixels) - 1 / state.get("clip_images_per_second", np.inf), 0
    )
    state.update(model=model, rough_maps=maps)


def end_to_end(run: Run, values: dict, state: dict) -> None:
    """`evaluate` on the generated set: data → CLIP+UMCI → MMR with SAM → metrics."""
    _time_evaluate(run, values, state, *_sam_refiner(run, state, compile_backend=None))
    state["end_to_end_images_per_second"] = values["images_per_second"]
    state["end_to_end_counts"] = (values["images"], values["sam_images_encoded"])


def end_to_end_compiled(run: Run, values: dict, state: dict) -> None:
    """`end_to_end` with SAM's image encoder under torch.compile (`--sam-compile`); the first
    pass, timed as `warm_seconds`, includes the compilations."""
    if not state["on_gpu"]:
        values["skipped"] = "GPU only (inductor's CPU build alone takes a minute for the tiny SAM)"
        return
    _time_evaluate(run, values, state, *_sam_refiner(run, state, compile_backend="inductor"))
    if "end_to_end_images_per_second" in state:
        values["speedup_over_eager"] = (
            values["images_per_second"] / state["end_to_end_images_per_second"]
        )


def _sam_refiner(run: Run, state: dict, compile_backend: str | None):
    """(SamRefiner, variant) of this run's SAM with the fastest attention measured
    (sam_encoder section)."""
    from clipsam_jax.refine.sam import SamRefiner

    sam, variant = _sam(run, state)
    attention = state.get("sam_attention", "flash")
    refiner = SamRefiner(sam, autocast="bf16" if state["on_gpu"] else None,
                         max_images_per_call=run.args.sam_batch, attention=attention,
                         compile_backend=compile_backend)  # fmt: skip
    return refiner, variant


def _time_evaluate(run: Run, values: dict, state: dict, refiner, variant: str) -> None:
    """Two `evaluate` passes on the generated set (the first compiles), the second timed, with
    `refiner` (of registry name `variant`) for MMR; its encoder's FLOPs and MFU."""
    import numpy as np
    import torch

    from clipsam_jax.config import EvalConfig, RefineConfig
    from clipsam_jax.eval_lib import evaluate

    args, on_gpu = run.args, state["on_gpu"]
    sam_dtype = refiner.autocast
    # A random head's rough maps carry no defects: the threshold is set at a high quantile so
    # SAM gets a few boxes per image, as a trained head's maps give (no trained head here).
    threshold = float(np.quantile(state["rough_maps"], args.box_quantile))
    values["threshold_used"] = threshold
    refine = RefineConfig(sam=variant, sam_dtype=sam_dtype or "fp32", threshold=threshold)
    for attempt in ("warm", "timed"):  # the first pass compiles; the second is measured
        refiner.reset_timers()
        waits = _MainThreadWaits()
        output = Path(args.workdir) / f"results_{attempt}"
        shutil.rmtree(output, ignore_errors=True)  # no class results reused from earlier runs
        config = EvalConfig(dataset="visa", data_root=str(state["data"]), output=str(output),
                            batch_size=args.batch, visualize_per_class=0, refine=refine)  # fmt: skip
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        evaluate(config, progress=False, model=state["model"], refiner=refiner, callbacks=[waits])
        seconds = time.perf_counter() - began
        values[f"{attempt}_seconds"] = seconds
    count = len(state["samples"])
    # Where the main thread's wall time went: MMR (prompts, SAM, fusion), waiting for the next
    # batch's rough maps (loading + CLIP + head), the rest (the last class's metrics, records).
    values["main_thread_seconds"] = {
        "mmr_including_sam": waits.mmr, "waiting_for_rough_maps": waits.rough_maps,
        "other": seconds - waits.mmr - waits.rough_maps,
    }  # fmt: skip
    values.update(seconds=seconds, images=count, images_per_second=count / seconds,
                  sam_variant=variant, sam_dtype=sam_dtype or "fp32", sam_attention=refiner.attention,
                  sam_preprocess_seconds=refiner.preprocess_seconds,
                  sam_encoder_seconds=refiner.encoder_seconds,
                  sam_decoder_seconds=refiner.decoder_seconds,
                  sam_images_encoded=refiner.images_encoded,
                  sam_boxes_decoded=refiner.boxes_decoded)  # fmt: skip
    if refiner.images_encoded:
        sam_rate = refiner.images_encoded / max(refiner.encoder_seconds, 1e-9)
        values["sam_encoder_images_per_second"] = sam_rate
        flops = _encoder_flops(refiner)
        values["sam_encoder_flops_per_image"] = flops
        values.update({f"sam_{k}": v for k, v in _mfu(flops * sam_rate, state).items()})


class _MainThreadWaits:
    """An evaluation callback adding up, over the batches, the main thread's seconds spent in
    MMR and waiting for the next rough maps (engine.RefinedBatch timings)."""

    def __init__(self):
        self.mmr = self.rough_maps = 0.0

    def on_batch(self, name: str, step) -> None:
        self.mmr += step.mmr_s
        self.rough_maps += step.wait_s


def _sam(run: Run, state: dict):
    """The SAM of this run (built once): random ViT-H on the device, or the tiny one."""
    import torch

    from clipsam_jax.refine.sam_build import build_sam

    if "sam" not in state:
        if run.args.quick:
            state["sam"], state["sam_variant"] = build_sam("tiny-random"), "tiny-random"
        else:
            from segment_anything import sam_model_registry

            device = torch.device("cuda" if state["on_gpu"] else "cpu")
            with device:  # random init on the device (timings only); buffers moved after
                state["sam"] = sam_model_registry["vit_h"]().to(device).eval()
            state["sam_variant"] = "vit_h"
    return state["sam"], state["sam_variant"]


def sam_encoder(run: Run, values: dict, state: dict) -> None:
    """SAM's image encoder alone on a batch: each attention (segment_anything's, SDPA with the
    relative positions as mask, folded into query/key), bf16 autocast on GPU, a bf16-weights
    copy, and a profile of the fastest. end_to_end then uses the fastest attention. Skipped
    on CPU outside --quick (ViT-H takes about a minute per image there:
    benchmarks/sam_attention.py measures ViT-B)."""
    import torch
    from sam_attention import profile_encoder, time_attention_modes

    from clipsam_jax.refine.sam import SamRefiner

    if not (state["on_gpu"] or run.args.quick):
        values["skipped"] = "ViT-H on CPU: see benchmarks/sam_attention.py"
        return
    sam, variant = _sam(run, state)
    dtype = torch.bfloat16 if state["on_gpu"] else None
    batch = run.args.sam_batch
    result = time_attention_modes(sam, batch, run.args.repeats, dtype, bf16_weights=True)
    values.update(variant=variant, batch=batch, dtype="bf16 autocast" if dtype else "float32",
                  **result)  # fmt: skip
    state["sam_attention"] = result["fastest"]
    rate = state["sam_eager_images_per_second"] = result["images_per_second"][result["fastest"]]
    flops = _encoder_flops(SamRefiner(sam))
    values["flops_per_image"] = flops
    values.update({f"fastest_{k}": v for k, v in _mfu(flops * rate, state).items()})
    values["profile_of_fastest"] = profile_encoder(sam, min(batch, 4), result["fastest"], dtype)


def sam_compile(run: Run, values: dict, state: dict) -> None:
    """torch.compile of SAM's image encoder with the fastest attention: compile time, images/s."""
    import torch
    from sam_attention import time_compiled

    if "sam_attention" not in state or not state["on_gpu"]:
        values["skipped"] = "GPU only (inductor's CPU build alone takes a minute for the tiny SAM)"
        return
    result = time_compiled(state["sam"], run.args.sam_batch, run.args.repeats,
                           state["sam_attention"], torch.bfloat16)  # fmt: skip
    values.update(result)
    values["speedup_over_eager"] = (
        result["images_per_second"] / state["sam_eager_images_per_second"]
    )


def _encoder_flops(refiner) -> float:
    """FLOPs of one image-encoder forward of a refiner of the SamRefiner family (torch's FLOP
    counter on a 1-image batch, the uncompiled module)."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    batch, _ = refiner._preprocess([np.zeros((64, 64, 3), np.uint8)])  # the input size
    encoder = refiner._image_encoder(refiner.model)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        encoder(torch.zeros_like(batch))
    return float(counter.get_total_flops())


def refiners(run: Run, values: dict, state: dict) -> None:
    """end_to_end with the other refiner families' largest variants (random weights, bf16 on
    GPU, the same images, threshold and batching): HQ-SAM ViT-H and SAM 2.1 Hiera-L, each
    with its encoder's images/s, FLOPs and MFU; the tiny ones with --quick."""
    from refiners import build_random_refiner

    names = (
        ("tiny-random-hq", "tiny-random-sam2") if run.args.quick else ("hq_vit_h", "sam2.1_hiera_l")
    )
    device = "cuda" if state["on_gpu"] else "cpu"
    for name in names:
        refiner = build_random_refiner(name, device, "bf16" if state["on_gpu"] else None)
        refiner.max_images_per_call = run.args.sam_batch
        values[name] = {}
        _time_evaluate(run, values[name], state, refiner, name)
        if "end_to_end_images_per_second" in state:
            values[name]["ratio_to_end_to_end"] = (
                values[name]["images_per_second"] / state["end_to_end_images_per_second"]
            )
        del refiner


def stage_costs(run: Run, values: dict, state: dict) -> None:
    """Prompts, fusion (numpy) and metrics per image/class on the rough maps just computed."""
    import numpy as np

    from clipsam_jax.config import RefineConfig
    from clipsam_jax.metrics import compute_metrics
    from clipsam_jax.refine.fusion import fuse
    from clipsam_jax.refine.prompts import extract_prompts

    maps = state["rough_maps"]
    config = RefineConfig(threshold=float(np.median(maps)))
    rng = np.random.default_rng(0)
    began = time.perf_counter()
    prompts = [extract_prompts(m, config.threshold, 5, (1000, 1500), rng) for m in maps]
    values["prompts_seconds_per_image"] = (time.perf_counter() - began) / len(maps)
    size = maps.shape[-1]
    masks = np.zeros((4, 3, 1000, 1500), bool)
    masks[:, :, 200:400, 300:700] = True
    began = time.perf_counter()
    for m in maps:
        fuse(m, masks, np.full((4, 3), 0.9, np.float32))
    values["fusion_seconds_per_image_4_boxes"] = (time.perf_counter() - began) / len(maps)
    values["boxes_per_image"] = float(np.mean([p.num_boxes for p in prompts]))
    # Metrics of a VisA-sized class (200 maps at S×S).
    rep = np.concatenate([maps] * (200 // len(maps) + 1))[:200].astype(np.float16)
    gt = np.zeros(rep.shape, bool)
    gt[:100, size // 3 : size // 2, size // 3 : size // 2] = True
    began = time.perf_counter()
    compute_metrics(rep, gt)
    values["metrics_seconds_per_200_image_class"] = time.perf_counter() - began


def torch_reference(run: Run, values: dict, state: dict) -> None:
    """transformers' PyTorch CLIP + the PyTorch UMCI twin + stock SamPredictor use."""
    import jax
    import numpy as np
    import torch
    from PIL import Image
    from transformers import CLIPModel

    from clipsam_jax import torch_ref
    from clipsam_jax.clip.weights import flax_to_torch
    from conversion.head_params import flax_to_torch as head_to_torch

    clip, on_gpu = state["clip"], state["on_gpu"]
    device = torch.device("cuda" if on_gpu else "cpu")
    with device:  # build on the device: a CPU init of ViT-L's weights alone takes many seconds
        model = CLIPModel(clip.config)
        hc = state["head_config"]
        twin = torch_ref.UMCIHead(4, feature_dim=clip.feature_dim, text_dim=clip.text_dim,
                                  hidden_dim=hc.hidden_dim, pool_sizes=hc.pool_sizes)  # fmt: skip
    host_params = jax.device_get(clip.params)
    weights = {k: torch.from_numpy(np.array(v)) for k, v in flax_to_torch(host_params).items()}
    model.load_state_dict(weights, strict=False)
    model = model.eval()
    twin.load_state_dict(
        {k: torch.from_numpy(v) for k, v in head_to_torch(state["head_params"]).items()}
    )
    twin = twin.eval()
    pixels = torch.from_numpy(state["pixels"].transpose(0, 3, 1, 2).copy()).to(device)
    text = torch.from_numpy(state["text"].batch(["candle"] * len(pixels))).to(device)
    grid, layers = clip.grid, clip.feature_layers

    def forward():
        with torch.inference_mode():
            out = model.vision_model(pixel_values=pixels, output_hidden_states=True)
            tokens = [
                out.hidden_states[k][:, 1:].reshape(len(pixels), grid, grid, -1) for k in layers
            ]
            maps = torch_ref.rough_map(twin(tokens, text), clip.image_size)
            sync_torch()
            return maps

    for precision in ("fp32", "bf16_autocast") if on_gpu else ("fp32",):
        context = (torch.autocast("cuda", torch.bfloat16) if precision != "fp32"
                   else contextlib.nullcontext())  # fmt: skip
        with context:
            timing = best_of(forward, run.args.repeats)
        values[f"clip_head_{precision}"] = {**timing, "images_per_second":
                                            len(pixels) / timing["seconds_median"]}  # fmt: skip
    # Stock SamPredictor use: one image at a time, one box per call.
    if "sam" in state:
        from segment_anything import SamPredictor

        from clipsam_jax.refine.sam_attention import set_sam_attention

        set_sam_attention(state["sam"], "stock")  # segment_anything as shipped
        predictor = SamPredictor(state["sam"])
        images = [np.asarray(Image.open(s.image_path).convert("RGB")) for s in state["samples"][:8]]
        boxes = np.array([[100, 100, 300, 260], [400, 200, 600, 500], [50, 400, 250, 600]], float)
        began = time.perf_counter()
        with torch.inference_mode():
            for image in images:
                predictor.set_image(image)
                for box in boxes:
                    predictor.predict(box=box, multimask_output=True)
        sync_torch()
        seconds = (time.perf_counter() - began) / len(images)
        values["sam_stock_seconds_per_image_3_boxes_fp32"] = seconds
    jax_rate = state.get("rough_images_per_second")
    if jax_rate:
        values["jax_over_torch_fp32_clip_head_speedup"] = (
            jax_rate / values["clip_head_fp32"]["images_per_second"]
        )
    counts = state.get("end_to_end_counts")  # (images, images through SAM) of end_to_end
    if counts and "sam_stock_seconds_per_image_3_boxes_fp32" in values:
        # The PyTorch path on end_to_end's set, ESTIMATED as its stages' sum (no overlap, no
        # loading or metrics): CLIP + head in fp32, stock SAM per image with 3 boxes in fp32.
        images, through_sam = counts
        seconds = (images / values["clip_head_fp32"]["images_per_second"]
                   + through_sam * values["sam_stock_seconds_per_image_3_boxes_fp32"])  # fmt: skip
        values["end_to_end_estimate"] = {
            "images": images, "images_through_sam": through_sam, "seconds": seconds,
            "images_per_second": images / seconds,
            "jax_path_speedup": state["end_to_end_images_per_second"] * seconds / images,
        }  # fmt: skip


def bf16_effect(run: Run, values: dict, state: dict) -> None:
    """max |O_bf16 - O_fp32| of the rough maps of one batch (same params; fp32 with the default
    attention, bf16 with rough_model's, as `attentions` records)."""
    import numpy as np

    from clipsam_jax.clip.features import resolve_attention
    from clipsam_jax.clip.loading import load_clip
    from clipsam_jax.inference import RoughMapModel

    clip32 = load_clip(str(state["clip_dir"]), run.args.image_size, dtype="float32",
                       cache_dir=str(Path(run.args.workdir) / "cache"))  # fmt: skip
    model = RoughMapModel(clip32, state["text"], state["head_config"], state["head_params"],
                          batch_size=run.args.batch)  # fmt: skip
    maps32 = model(state["pixels"], ["candle"] * len(state["pixels"]))
    diff = np.abs(maps32 - state["rough_maps"])
    values.update(max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
                  dtypes=["float32", str(np.dtype(state["clip"].module.dtype))],
                  attentions=[resolve_attention(None, clip32.module.dtype),
                              state.get("clip_attention")])  # fmt: skip


def train_epoch(run: Run, values: dict, state: dict) -> None:
    """One epoch of `python -m train.main` at full size on generated MVTec-layout data."""
    import json

    from clipsam_jax.data import synthetic
    from train.main import main as train_main

    work = Path(run.args.workdir)
    data = work / "mvtec"
    if not data.is_dir():
        synthetic.generate("mvtec", data, seed=0,
                           images_per_class=run.args.train_images_per_class, image_size=512)  # fmt: skip
    workdir = work / "run_mvtec"
    extra = ["--hidden-dim", "16", "--pool-sizes", "2,4"] if run.args.quick else []
    began = time.perf_counter()
    summary = train_main([
        "--train", "mvtec", "--data-root", str(data), "--workdir", str(workdir), "--clip",
        str(state["clip_dir"]), "--image-size", str(run.args.image_size), "--epochs", "1",
        "--batch-size", str(run.args.batch), "--cache-dir", str(work / "cache"),
        "--no-progress", *extra,
    ])  # fmt: skip
    values["seconds"] = time.perf_counter() - began
    log = [json.loads(line) for line in (workdir / "train_log.jsonl").read_text().splitlines()]
    rates = [e["images_per_second"] for e in log[1:]]
    values.update(steps=summary.step, train_images_per_second_median=statistics.median(rates)
                  if rates else None, last_loss=summary.last_loss)  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX and torch share the GPU
    import jax

    jax.config.update("jax_compilation_cache_dir", str(Path(args.workdir) / "jax_cache"))
    on_gpu = jax.default_backend() == "gpu"
    device = jax.devices()[0]
    name = "gpu" if on_gpu else "cpu"
    out = (
        Path(args.out)
        if args.out
        else common.RESULTS / f"run_all_{name}{'_quick' if args.quick else ''}.json"
    )
    run = Run(args, out)
    state = {"on_gpu": on_gpu}
    if args.quick:
        args.image_size, args.images, args.repeats = 112, 12, 2
    with run.section("environment") as values:
        if values is not None:
            values.update(common.machine_info(), device=str(device),
                          device_kind=getattr(device, "device_kind", "cpu"), args=vars(args),
                          note="random weights and generated images: timings only")  # fmt: skip
            kind = values["device_kind"]
            state["datasheet_peak"] = next(
                (v for k, v in DATASHEET_BF16_PEAK.items() if k in kind), None
            )
            values["datasheet_bf16_peak_tflops"] = (state["datasheet_peak"] or 0) / 1e12 or None
    with run.section("matmul_peak") as values:
        if values is not None:
            values["jax_tflops"] = jax_matmul_peak(on_gpu) / 1e12
            import torch

            values["torch_tflops"] = (
                torch_matmul_peak(torch.device("cuda" if on_gpu else "cpu")) / 1e12
            )
            state["measured_peak"] = max(values["jax_tflops"], values["torch_tflops"]) * 1e12
            values["dtype"] = "bfloat16" if on_gpu else "float32"
    # clip_profile before sam_encoder: torch.profiler there keeps CUPTI, which jax.profiler needs.
    sections = [("setup", setup), ("clip_encoder", clip_stage), ("clip_profile", clip_profile),
                ("rough_model", rough_model),
                ("sam_encoder", sam_encoder), ("end_to_end", end_to_end),
                ("clip_variants", clip_variants),
                ("end_to_end_compiled", end_to_end_compiled), ("stage_costs", stage_costs),
                ("torch_reference", torch_reference), ("bf16_effect", bf16_effect),
                ("sam_compile", sam_compile), ("refiners", refiners),
                ("train_epoch", train_epoch)]  # fmt: skip
    for name, fn in sections:
        if name != "setup" and "clip" not in state:
            run.report["skipped"].append(name)
            continue
        with run.section(name) as values:
            if values is not None:
                fn(run, values, state)
                if name == "rough_model":
                    state["rough_images_per_second"] = values["images_per_second"]
    with run.section("memory", always=True) as values:
        if values is not None:
            values.update(host_peak_rss_gib=common.ru_maxrss_kib() / 2**20, **device_peak_bytes())
    summary = {k: run.report["sections"].get(k, {}).get("images_per_second")
               for k in ("clip_encoder", "rough_model", "end_to_end", "end_to_end_compiled")}  # fmt: skip
    print("summary images/s:", summary, "errors:", list(run.report["errors"]))


if __name__ == "__main__":
    main()
