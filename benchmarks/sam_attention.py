"""SAM's image encoder with segment_anything's own attention against PyTorch's fused SDPA
(`clipsam_jax.refine.sam_attention`), same weights, same inputs, interleaved.

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
from pathlib import Path

import common

common.setup_path()


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

    from clipsam_jax.refine.sam import build_tiny_sam

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


def time_attention_modes(sam, batch: int, repeats: int, autocast_dtype=None) -> dict:
    """Interleaved timing of `sam.image_encoder` on random (batch, 3, size, size) inputs with the
    stock and the SDPA attention; returns runs, the SDPA/stock ratio and the agreement. Leaves
    the model on SDPA (the library default)."""
    import torch

    from clipsam_jax.refine.sam_attention import set_sam_attention

    size = sam.image_encoder.img_size
    device = next(sam.parameters()).device
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    context = (
        (lambda: torch.autocast(device.type, dtype=autocast_dtype))
        if autocast_dtype is not None
        else contextlib.nullcontext
    )

    def run(mode: str):
        def call():
            set_sam_attention(sam, mode)
            with torch.inference_mode(), context():
                out = sam.image_encoder(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out

        return call

    variants = {"stock": run("stock"), "sdpa": run("sdpa")}
    outputs = {name: fn().float() for name, fn in variants.items()}
    scale = outputs["stock"].abs().max().item()
    timings = common.interleaved(variants, repeats)
    set_sam_attention(sam, "sdpa")
    return {
        "runs": {name: timings[name] for name in variants},
        "ratio_sdpa_over_stock": common.pairwise_ratio(timings, "sdpa", "stock"),
        "images_per_second": {n: batch / timings[n]["seconds_median"] for n in variants},
        "max_rel_difference": (outputs["sdpa"] - outputs["stock"]).abs().max().item() / scale,
    }


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
        "relative-position bias as attn_mask",
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
    if result["max_rel_difference"] > (2e-2 if on_gpu else 1e-4):
        raise SystemExit(f"outputs disagree: {result['max_rel_difference']:.2e}")
    default = Path(tempfile.gettempdir()) if args.quick else common.RESULTS
    name = f"sam_attention_{'cuda' if on_gpu else 'cpu'}.json"
    common.write_json(Path(args.out) if args.out else default / name, report)
    common.print_table(
        [{"attention": n, "s": result["runs"][n]["seconds_median"]} for n in ("stock", "sdpa")],
        [("attention", "attention"), ("seconds (median)", "s")],
    )


if __name__ == "__main__":
    main()
