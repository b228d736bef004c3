"""Text features of one class's prompt ensemble: sentences padded to the longest one (the
library, `TextFeatures.encode_sentences`) against padding to CLIP's full context of 77 tokens,
and against transformers' PyTorch `CLIPModel.get_text_features` at 77 (the usual call).

The text tower is causal and pools at the end-of-text token, so the shorter padding must give the
same embeddings; `agreement` checks that on the same random weights.

    python benchmarks/text_features.py            # ViT-L/14-336 text tower, random weights
    python benchmarks/text_features.py --quick    # tiny CLIP: checks the script, numbers mean nothing
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common

common.setup_path()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny CLIP: a smoke run")
    parser.add_argument("--class-name", default="macaroni1", help="class whose prompts are encoded")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "clipsam_text"))
    parser.add_argument("--out", default=None, help="JSON path")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import numpy as np
    import torch
    from transformers import CLIPModel

    from clipsam_jax.clip.loading import load_clip
    from clipsam_jax.clip.prompts import TextFeatures, build_sentences, make_text_encoder
    from clipsam_jax.clip.weights import flax_to_torch

    work = Path(args.workdir)
    clip_dir = work / ("tiny_clip" if args.quick else "random_vit_l14_336")
    if not (clip_dir / "config.json").is_file():
        if args.quick:
            from clipsam_jax.clip.tiny import write_tiny_clip

            write_tiny_clip(clip_dir)
        else:
            from clipsam_jax.clip.random_init import write_random_clip

            write_random_clip(clip_dir)
    clip = load_clip(str(clip_dir), 224 if args.quick else 336, dtype="float32",
                     cache_dir=str(work / "cache"))  # fmt: skip
    text = TextFeatures(clip, use_disk_cache=False)
    normal, anomalous = build_sentences(args.class_name)
    sentences = normal + anomalous
    context = int(clip.config.text_config.max_position_embeddings)
    full = clip.tokenizer(sentences, padding="max_length", max_length=context, truncation=True,
                          return_tensors="np")  # fmt: skip
    encode = make_text_encoder(clip)

    model = CLIPModel(clip.config)
    weights = flax_to_torch(clip.params)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()},
                          strict=False)  # fmt: skip
    model = model.eval()
    torch_tokens = {k: torch.from_numpy(v) for k, v in full.items()}

    def torch_77():
        with torch.inference_mode():
            return model.get_text_features(**torch_tokens).numpy()

    variants = {
        "jax_longest": lambda: text.encode_sentences(sentences),
        "jax_77": lambda: np.asarray(
            encode(clip.params, full["input_ids"], full["attention_mask"])
        ),
        "torch_77": torch_77,
    }
    outputs = {name: fn() for name, fn in variants.items()}  # also compiles the JAX variants
    scale = np.abs(outputs["torch_77"]).max()
    agreement = {
        f"{name}_vs_torch_77_max_rel": float(np.abs(out - outputs["torch_77"]).max() / scale)
        for name, out in outputs.items()
        if name != "torch_77"
    }
    timings = common.interleaved(variants, args.repeats)
    longest = max(len(ids) for ids in clip.tokenizer(sentences)["input_ids"])
    report = {
        "benchmark": "text features of one class's prompt ensemble: JAX padded to the longest "
        "sentence, JAX padded to 77, PyTorch transformers padded to 77; float32, CPU"
        if not args.quick
        else "text features (quick: tiny CLIP)",
        "note": common.RANDOM_WEIGHTS_NOTE
        + (". QUICK RUN: tiny model, numbers mean nothing" if args.quick else ""),
        "machine": common.machine_info(),
        "date": common.now(),
        "settings": {
            "class_name": args.class_name,
            "sentences": len(sentences),
            "longest_sentence_tokens": longest,
            "context": context,
            "model": clip.source,
            "repeats": args.repeats,
        },
        "loadavg_after": common.loadavg(),
        "agreement": agreement,
        "runs": {name: timings[name] for name in variants},
        "ratio_jax_longest_over_torch_77": common.pairwise_ratio(
            timings, "jax_longest", "torch_77"
        ),
        "ratio_jax_77_over_torch_77": common.pairwise_ratio(timings, "jax_77", "torch_77"),
    }
    worst = max(agreement.values())
    if worst > 1e-4:
        raise SystemExit(f"embeddings disagree: max relative difference {worst:.2e}")
    default = Path(tempfile.gettempdir()) if args.quick else common.RESULTS
    out = Path(args.out) if args.out else default / "text_features_cpu.json"
    common.write_json(out, report)
    common.print_table(
        [{"variant": n, "seconds": timings[n]["seconds_median"]} for n in variants],
        [("variant", "variant"), ("seconds (median)", "seconds")],
    )


if __name__ == "__main__":
    main()
