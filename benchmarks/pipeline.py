"""Seconds per image of each ClipSAM stage and end to end (where the time goes).

    python benchmarks/pipeline.py            # full size, random weights (a GPU run belongs here)
    python benchmarks/pipeline.py --quick    # tiny models

Runs `run_all.py`'s stage sections (not the PyTorch reference, bf16 comparison or training) and
adds a per-stage table in seconds per image: CLIP features, UMCI head, prompts, SAM encoder, SAM
decoder, fusion, metrics, end to end. Random weights and generated images: timings only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import run_all


def per_image(sections: dict) -> dict:
    """Seconds per image of each stage from run_all's sections (None where not measured)."""
    get = lambda name, key: sections.get(name, {}).get(key)  # noqa: E731
    clip_rate, rough_rate = get("clip_encoder", "images_per_second"), get("rough_model",
                                                                         "images_per_second")  # fmt: skip
    e2e = sections.get("end_to_end", {})
    encoded, boxes = e2e.get("sam_images_encoded") or 0, e2e.get("sam_boxes_decoded") or 0
    images = e2e.get("images") or 1
    return {
        "clip_features": 1 / clip_rate if clip_rate else None,
        "umci_head": get("rough_model", "head_seconds_per_image_estimate"),
        "prompts": get("stage_costs", "prompts_seconds_per_image"),
        "sam_encoder_per_encoded_image": e2e.get("sam_encoder_seconds", 0) / encoded
        if encoded
        else None,
        "sam_decoder_per_image": e2e.get("sam_decoder_seconds", 0) / images if boxes else None,
        "fusion_4_boxes": get("stage_costs", "fusion_seconds_per_image_4_boxes"),
        "metrics_per_image_of_200_image_class": (
            get("stage_costs", "metrics_seconds_per_200_image_class") or 0
        )
        / 200
        or None,
        "clip_and_head_together": 1 / rough_rate if rough_rate else None,
        "end_to_end": 1 / e2e["images_per_second"] if e2e.get("images_per_second") else None,
    }


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--skip" not in argv:
        argv += ["--skip", "torch_reference,bf16_effect,sam_compile,train_epoch"]
    args = run_all.parse_args(argv)
    name = "quick" if args.quick else "full"
    out = Path(args.out) if args.out else common.RESULTS / f"pipeline_{name}.json"
    run_all.main([*argv, "--out", str(out)])
    report = json.loads(out.read_text())
    report["seconds_per_image"] = per_image(report["sections"])
    common.write_json(out, report)
    common.print_table([{"stage": k, "seconds": v} for k, v in report["seconds_per_image"].items()],
                       [("stage", "stage"), ("s/image", "seconds")])  # fmt: skip


if __name__ == "__main__":
    main()
