"""Few-shot mode: the nearest-neighbour search's cost beside CLIP's, against its PyTorch twin,
and the map's pixel AUROC at k = 0, 1, 2, 4 on generated data.

    python benchmarks/few_shot.py            # ViT-L/14-336 shapes at S = 518, k = 4
    python benchmarks/few_shot.py --quick    # tiny shapes: checks the script

Speed: random CLIP weights and features of ViT-L/14-336's shape (4 layers, 37×37 patches of
width 1024), a bank of k reference images per layer. Times the jitted CLIP encoder (the four
layers' features, as the rough-map model computes them), the jitted `few_shot_map` (chunked
search + layer mean + resize), and the PyTorch twin of the search (one matmul per layer, max,
interpolate), interleaved; reports the search as a fraction of CLIP's time and as a ratio to
PyTorch. On a GPU both run in the model's bf16 with the bank in bf16.
Quality: `eval.main --no-umci --shots k --few-shot-weight 1` on the generated VisA layout with
the tiny random CLIP: the few-shot map alone, NOT ClipSAM or APRIL-GAN results.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common

common.setup_path()

from clip_features import clip_config, vision_params  # noqa: E402 (a sibling script, on the path now)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on GPU, 1 on CPU")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
    parser.add_argument("--out", default=None, help="JSON path")
    return parser.parse_args(argv)


def speed(args, on_gpu: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from clipsam_jax.clip.features import make_image_encoder
    from clipsam_jax.clip.loading import build_clip_model
    from clipsam_jax.config import RuntimeConfig
    from clipsam_jax.models.few_shot import build_bank, few_shot_map

    size = 56 if args.quick else 518
    batch = args.batch or (8 if on_gpu else 1)
    dtype = "bfloat16" if on_gpu else "float32"
    config = clip_config(args.quick)
    clip = build_clip_model(config, vision_params(config, 0), None, size, dtype=dtype)
    rng = np.random.default_rng(0)
    pixels = jnp.asarray(rng.normal(size=(batch, size, size, 3)), clip.module.dtype)
    encoder = jax.jit(make_image_encoder(clip))
    tokens = jax.block_until_ready(encoder(clip.params, pixels).patch_tokens)
    grid, width = tokens[0].shape[1], tokens[0].shape[-1]
    references = [rng.normal(size=(args.shots, grid, grid, width)).astype(np.float32)
                  for _ in tokens]  # fmt: skip
    chunk = RuntimeConfig().few_shot_chunk
    bank = [jnp.asarray(b, clip.module.dtype) for b in build_bank(references, chunk)]
    search = jax.jit(lambda t, b: few_shot_map(t, b, size, False))

    device = torch.device("cuda" if on_gpu else "cpu")
    torch_dtype = torch.bfloat16 if on_gpu else torch.float32
    torch_tokens = [torch.from_numpy(np.asarray(t, np.float32)).to(device, torch_dtype)
                    for t in tokens]  # fmt: skip
    torch_bank = [torch.nn.functional.normalize(torch.from_numpy(r.reshape(-1, width)), dim=-1)
                  .to(device, torch_dtype) for r in references]  # fmt: skip

    def torch_search():
        with torch.inference_mode():
            maps = []
            for t, b in zip(torch_tokens, torch_bank, strict=True):
                q = torch.nn.functional.normalize(t.flatten(1, 2).float(), dim=-1).to(b.dtype)
                best = (q @ b.T).float().amax(-1)
                maps.append((1 - best).reshape(-1, 1, grid, grid))
            mean = torch.stack(maps).mean(0)
            out = torch.nn.functional.interpolate(mean, size=(size, size), mode="bilinear")
            if on_gpu:
                torch.cuda.synchronize()
            return out

    ours = np.asarray(search(tokens, bank))
    twin = torch_search()[:, 0].cpu().numpy()
    fns = {"clip_encoder": lambda: jax.block_until_ready(encoder(clip.params, pixels)),
           "few_shot_map": lambda: jax.block_until_ready(search(tokens, bank)),
           "torch_search": torch_search}  # fmt: skip
    timings = common.interleaved(fns, args.repeats, warmup=1)
    seconds = {name: timings[name]["seconds_median"] for name in fns}
    return {
        "image_size": size, "batch": batch, "shots": args.shots, "bank_rows_per_layer":
        args.shots * grid * grid, "feature_width": width, "chunk": chunk, "dtype": dtype,
        "runs": timings, "seconds_median": seconds,
        "few_shot_fraction_of_clip": seconds["few_shot_map"] / seconds["clip_encoder"],
        "ratio_jax_over_torch": common.pairwise_ratio(timings, "few_shot_map", "torch_search"),
        "max_abs_difference_to_torch": float(np.abs(ours - twin).max()),
    }  # fmt: skip


def quality(workdir: Path) -> dict:
    """Pixel AUROC of the few-shot map alone at k = 0 (the zero-shot map), 1, 2, 4."""
    import eval.main
    from clipsam_jax.clip.tiny import write_tiny_clip
    from clipsam_jax.data import synthetic

    data, clip = workdir / "visa", workdir / "tiny_clip"
    if not data.is_dir():
        synthetic.generate("visa", data, seed=1, images_per_class=8)
    if not clip.is_dir():
        write_tiny_clip(clip, seed=0, weights="pytorch")
    table = {}
    for shots in (0, 1, 2, 4):
        weight = ["--few-shot-weight", "1"] if shots else []
        report = eval.main.main([
            "--test", "visa", "--data-root", str(data), "--no-umci", "--clip", str(clip),
            "--image-size", "112", "--output", str(workdir / f"k{shots}"), "--sam", "none",
            "--panels", "0", "--no-progress", "--shots", str(shots), *weight,
        ])  # fmt: skip
        table[f"k{shots}"] = report["rough"]["mean"]["pixel_auroc"]
    return {"pixel_auroc": table, "data": "generated VisA layout, 8 images per class and "
            "split", "model": "tiny random CLIP, no head (--no-umci), S = 112"}  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    import jax

    on_gpu = jax.default_backend() == "gpu"
    with tempfile.TemporaryDirectory() as work:
        report = {
            "benchmark": "few-shot nearest-neighbour map: its cost beside CLIP's and against "
            "PyTorch, and its pixel AUROC at k = 0, 1, 2, 4",
            "note": "random weights and features for the speed; generated data and a tiny "
            "random CLIP for the AUROC: NOT ClipSAM results"
            + (". QUICK RUN: tiny shapes" if args.quick else ""),
            "machine": common.machine_info(),
            "date": common.now(),
            "speed": speed(args, on_gpu),
            "quality": quality(Path(work)),
            "loadavg_after": common.loadavg(),
        }
    default = Path(tempfile.gettempdir()) if args.quick else common.RESULTS
    name = f"few_shot_{'cuda' if on_gpu else 'cpu'}.json"
    common.write_json(Path(args.out) if args.out else default / name, report)
    s = report["speed"]
    print(
        f"CLIP {s['seconds_median']['clip_encoder']:.3f} s, few-shot map "
        f"{s['seconds_median']['few_shot_map']:.3f} s "
        f"({100 * s['few_shot_fraction_of_clip']:.1f} % of CLIP), PyTorch search "
        f"{s['seconds_median']['torch_search']:.3f} s; AUROC {report['quality']['pixel_auroc']}"
    )


if __name__ == "__main__":
    main()
