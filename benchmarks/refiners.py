"""The MMR refiners against SAM ViT-H, same images and prompts, interleaved: each variant's
image encoder (seconds per image) and its whole refinement (encoder + prompts + decoder +
upscaling, `refine_batch`), and the ratio to ViT-H in the same round.

    python benchmarks/refiners.py                                  # every real variant
    python benchmarks/refiners.py --variants vit_h,hq_vit_h --repeats 3
    python benchmarks/refiners.py --quick                          # tiny models: checks the script

Random weights (speed does not depend on their values): timings only. The first variant is the
reference of the ratios. On CUDA the refiners run under bf16 autocast, as `--sam-dtype auto`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common

common.setup_path()

# Every real variant, the reference first; ViT-L and HQ ViT-L sit between ViT-H and ViT-B.
DEFAULT_VARIANTS = ("vit_h", "hq_vit_h", "sam2.1_hiera_l", "sam2.1_hiera_b+", "sam2.1_hiera_s",
                    "sam2.1_hiera_t", "vit_b", "hq_vit_b")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="comma-separated refiner names; the first is the reference")  # fmt: skip
    parser.add_argument("--images", type=int, default=1, help="images per refine_batch call")
    parser.add_argument("--boxes", type=int, default=3, help="boxes per image")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=0, help="untimed rounds first")
    parser.add_argument("--quick", action="store_true", help="tiny models: a smoke run")
    parser.add_argument("--out", default=None, help="JSON path")
    return parser.parse_args(argv)


def build_random_refiner(name: str, device, autocast: str | None):
    """A refiner of registry variant `name` with random weights (no checkpoint needed)."""
    from clipsam_jax.refine.registry import REFINERS

    refiner_class = REFINERS[name].refiner_class()
    model = refiner_class.variants[name].builder().to(device).eval()
    return refiner_class(model, autocast=autocast)


def inputs(count: int, boxes: int, seed: int = 0):
    """`count` random 768×768 images and prompts of `boxes` boxes with 5 points each."""
    import numpy as np

    from clipsam_jax.refine.prompts import extract_prompts

    rng = np.random.default_rng(seed)
    images, prompts = [], []
    for _ in range(count):
        images.append(rng.integers(0, 256, (768, 768, 3), dtype=np.uint8))
        rough = np.zeros((37, 37), np.float32)
        for b in range(boxes):
            rough[2 + 11 * b : 6 + 11 * b, 3 + 9 * b : 9 + 9 * b] = 0.9
        prompts.append(extract_prompts(rough, 0.47, 5, (768, 768), rng))
    return images, prompts


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = "bf16" if device.type == "cuda" else None
    names = (
        ["tiny-random", "tiny-random-hq", "tiny-random-sam2"]
        if args.quick
        else args.variants.split(",")
    )
    images, prompts = inputs(args.images, args.boxes)
    refiners = {name: build_random_refiner(name, device, autocast) for name in names}

    def run(refiner):
        def call():
            refiner.refine_batch(images, prompts)

        return call

    for refiner in refiners.values():
        refiner.reset_timers()
    timings = common.interleaved({n: run(r) for n, r in refiners.items()}, args.repeats,
                                 warmup=args.warmup)  # fmt: skip
    reference = names[0]
    results = {}
    for name, refiner in refiners.items():
        calls = args.repeats + args.warmup
        results[name] = {
            "refine_seconds_median": timings[name]["seconds_median"],
            "images_per_second": args.images / timings[name]["seconds_median"],
            "encoder_seconds_per_image": refiner.encoder_seconds / refiner.images_encoded,
            "decoder_seconds_per_call": refiner.decoder_seconds / calls,
            "ratio_to_" + reference: common.pairwise_ratio(timings, name, reference),
            "parameters_millions": sum(p.numel() for p in refiner.model.parameters()) / 1e6,
        }
    settings = {"variants": names, "images": args.images, "boxes_per_image": args.boxes,
                "points_per_box": 5, "image_size": 768, "repeats": args.repeats,
                "warmup": args.warmup, "device": str(device),
                "dtype": "bf16 autocast" if autocast else "float32"}  # fmt: skip
    report = {
        "benchmark": "MMR refiners: image encoder and refine_batch per variant, interleaved, "
        f"against {reference}",
        "note": "random weights: timings only"
        + (". QUICK RUN: tiny models, numbers mean nothing" if args.quick else ""),
        "machine": common.machine_info(),
        "date": common.now(),
        "settings": settings,
        "loadavg_after": common.loadavg(),
        "runs": {n: timings[n] for n in names},
        "refiners": results,
    }
    default = Path(tempfile.gettempdir()) if args.quick else common.RESULTS
    name = f"refiners_{'cuda' if device.type == 'cuda' else 'cpu'}.json"
    common.write_json(Path(args.out) if args.out else default / name, report)
    common.print_table(
        [{"refiner": n, "s": r["refine_seconds_median"], "enc": r["encoder_seconds_per_image"],
          "ratio": r["ratio_to_" + reference]["median_of_pairwise"]}
         for n, r in results.items()],
        [("refiner", "refiner"), ("refine s (median)", "s"), ("encoder s/image", "enc"),
         (f"/ {reference}", "ratio")],
    )  # fmt: skip


if __name__ == "__main__":
    main()
