"""SAM's image encoder with segment_anything's own attention against PyTorch's fused SDPA, with the
relative positions as mask ("sdpa") or folded into query and key ("flash";
`clipsam_jax.refine.sam_attention`), same weights, same inputs, interleaved.

    python benchmarks/sam_attention.py                  # ViT-B at 1024, B = 1, CPU float32
    python benchmarks/sam_attention.py --variant vit_h  # ViT-H (about a minute per image on CPU)
    python benchmarks/sam_attention.py --quick          # tiny SAM: checks the script

Random weights (relative-position tables drawn at random too, so the bias term is not zero):
timings and agreement only. On CUDA the encoder runs under bf16 autocast, as `--sam-dtype auto`.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import common

common.setup_path()

SAM_MODES = ("stock", "sdpa", "flash")  # clipsam_jax.refine.sam_attention.SAM_ATTENTIONS


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="vit_b", choices=("vit_b", "vit_l", "vit_h"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny SAM: a smoke run")
    parser.add_argument("--out", default=None, help="JSON path")
    return parser.parse_args(argv)


def build_random_sam(variant: str, device):
    """A SAM of `variant` with random weights on `device`, relative-position tables random."""
    import torch
    from segment_anything import sam_model_registry

    from clipsam_jax.refine.sam_build import build_tiny_sam

    if variant == "tiny-random":
        sam = build_tiny_sam().to(device)
    else:
        with device:  # initialize on the device: ViT-H's CPU init alone takes many seconds
            sam = sam_model_registry[variant]()
    generator = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for block in sam.image_encoder.blocks:
            for table in (block.attn.rel_pos_h, block.attn.rel_pos_w):
                table.copy_(0.02 * torch.randn(table.shape, generator=generator))
    return sam.to(device).eval()


def time_attention_modes(
    sam, batch: int, repeats: int, autocast_dtype=None, modes=SAM_MODES, bf16_weights=False
) -> dict:
    """Interleaved timing of `sam.image_encoder` on random (batch, 3, size, size) inputs with each
    attention of `modes`; returns runs, each mode's ratio to stock, the agreement and the
    fastest mode. bf16_weights: also time the fastest mode on a bfloat16 copy of the encoder
    (no autocast, layer norms in bf16 too). Leaves the model on "sdpa" (the library default)."""
    import copy

    import torch

    from clipsam_jax.refine.sam_attention import set_sam_attention

    size = sam.image_encoder.img_size
    device = next(sam.parameters()).device
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)

    def run(mode: str, encoder=sam.image_encoder, inputs=x, autocast=True):
        def call():
            set_sam_attention(encoder, mode)
            with torch.inference_mode(), _autocast(device, autocast_dtype if autocast else None):
                out = encoder(inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out

        return call

    variants = {mode: run(mode) for mode in modes}
    outputs = {name: fn().float() for name, fn in variants.items()}
    scale = outputs["stock"].abs().max().item()
    timings = common.interleaved(variants, repeats)
    fastest = min(modes, key=lambda n: timings[n]["seconds_median"])
    result = {
        "runs": {name: timings[name] for name in variants},
        "ratio_over_stock": {n: common.pairwise_ratio(timings, n, "stock") for n in modes},
        "images_per_second": {n: batch / timings[n]["seconds_median"] for n in modes},
        "max_rel_difference_to_stock": {
            n: (outputs[n] - outputs["stock"]).abs().max().item() / scale for n in modes
        },
        "fastest": fastest,
    }
    if bf16_weights:
        half = copy.deepcopy(sam.image_encoder).to(torch.bfloat16)
        call = run(fastest, half, x.to(torch.bfloat16), autocast=False)
        out = call().float()
        timing = common.interleaved({"bf16_weights": call}, repeats)["bf16_weights"]
        result["bf16_weights"] = {
            "attention": fastest,
            **timing,
            "images_per_second": batch / timing["seconds_median"],
            "max_rel_difference_to_stock": (out - outputs["stock"]).abs().max().item() / scale,
        }
        del half
    set_sam_attention(sam, "sdpa")
    return result


def _autocast(device, dtype):
    import torch

    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def profile_encoder(sam, batch: int, attention: str, autocast_dtype, top: int = 25) -> list:
    """The `top` operators and kernels of one encoder forward by self device time
    (torch.profiler), as dicts."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from clipsam_jax.refine.sam_attention import set_sam_attention

    size = sam.image_encoder.img_size
    device = next(sam.parameters()).device
    x = torch.randn(batch, 3, size, size, device=device)
    set_sam_attention(sam, attention)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode(), _autocast(device, autocast_dtype):
        sam.image_encoder(x)  # warm
        with profile(activities=activities) as prof:
            sam.image_encoder(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, "self_" + key, 0), reverse=True)
    total = sum(getattr(e, "self_" + key, 0) for e in events) or 1
    return [
        {"name": e.key[:90], "calls": e.count,
         "self_ms": getattr(e, "self_" + key, 0) / 1e3, "total_ms": getattr(e, key, 0) / 1e3,
         "self_share": getattr(e, "self_" + key, 0) / total}
        for e in events[:top]
    ]  # fmt: skip


def time_compiled(sam, batch: int, repeats: int, attention: str, autocast_dtype) -> dict:
    """`torch.compile` of the image encoder with `attention`: compile seconds and images/s."""
    import torch

    from clipsam_jax.refine.sam_attention import set_sam_attention

    size = sam.image_encoder.img_size
    device = next(sam.parameters()).device
    x = torch.randn(batch, 3, size, size, device=device)
    set_sam_attention(sam, attention)
    compiled = torch.compile(sam.image_encoder, dynamic=False)

    def call():
        with torch.inference_mode(), _autocast(device, autocast_dtype):
            out = compiled(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    began = time.perf_counter()
    call()
    compile_seconds = time.perf_counter() - began
    timing = common.interleaved({"compiled": call}, repeats)["compiled"]
    return {"attention": attention, "compile_seconds": compile_seconds, **timing,
            "images_per_second": batch / timing["seconds_median"]}  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    variant = "tiny-random" if args.quick else args.variant
    sam = build_random_sam(variant, device)
    on_gpu = device.type == "cuda"
    result = time_attention_modes(sam, args.batch, args.repeats, torch.bfloat16 if on_gpu else None)
    report = {
        "benchmark": "SAM image encoder: segment_anything attention vs fused SDPA with the "
        "relative-position bias as attn_mask (sdpa) and folded into query/key (flash)",
        "note": "random weights: timings and agreement only"
        + (". QUICK RUN: tiny SAM, numbers mean nothing" if args.quick else ""),
        "machine": common.machine_info(),
        "date": common.now(),
        "settings": {
            "variant": variant,
            "batch": args.batch,
            "repeats": args.repeats,
            "device": str(device),
            "dtype": "bf16 autocast" if on_gpu else "float32",
            "image_size": sam.image_encoder.img_size,
        },
        "loadavg_after": common.loadavg(),
        **result,
    }
    worst = max(result["max_rel_difference_to_stock"].values())
    if worst > (2e-2 if on_gpu else 1e-4):
        raise SystemExit(f"outputs disagree: {worst:.2e}")
    default = Path(tempfile.gettempdir()) if args.quick else common.RESULTS
    name = f"sam_attention_{'cuda' if on_gpu else 'cpu'}.json"
    common.write_json(Path(args.out) if args.out else default / name, report)
    common.print_table(
        [{"attention": n, "s": result["runs"][n]["seconds_median"]} for n in SAM_MODES],
        [("attention", "attention"), ("seconds (median)", "s")],
    )


if __name__ == "__main__":
    main()
