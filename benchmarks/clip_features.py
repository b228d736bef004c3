"""Images/s of the jitted JAX CLIP feature extraction against Hugging Face PyTorch CLIP (CPU).

Full ViT-L/14-336 architecture (24 layers, width 1024, 16 heads) with random weights, float32,
at S = 336 (grid 24) and 518 (grid 37, position table resized as the library does). Both sides
get the same weights (`clipsam_jax.clip.weights.flax_to_torch`) and the same pixels; one batch
checks that their outputs agree. Output: the four feature layers' patch tokens (B, H, W, C) and
the projected image embedding, i.e. what the feature cache stores.

Variants (timed interleaved, A B C A B C ..., medians; see common.py):
  jax            the library path: `clipsam_jax.clip.features.make_image_encoder` (HF FlaxCLIP
                 vision tower with output_hidden_states=True, then the visual projection) with
                 its default attention on this backend ("blocked" on CPU).
  jax_fused_qkv  the library path with `fuse_qkv=True`: the query, key and value projections as
                 one GEMM against their concatenated kernels.
  jax_reference  the same with transformers' own attention (`attention="reference"`).
  jax_headmajor  the same function in plain JAX on the same params, with attention computed in
                 the head-major layout (B, heads, N, d) before merging heads.
  jax_chunked    jax_headmajor with the attention computed in blocks of --attn-chunk query rows
                 (same arithmetic per row; the N×N scores are never held whole).
                 Both are candidate changes to `clipsam_jax/clip/features.py`, demonstrated here,
                 not library code.
  torch          transformers `CLIPVisionModelWithProjection(output_hidden_states=True)`,
                 attention implementation --torch-attn (transformers' default: sdpa).
--parts also times one encoder layer's parts (HF Flax modules, head-major JAX, PyTorch) to show
where the time goes.

    python benchmarks/clip_features.py                          # S = 336, 518; B = 1
    python benchmarks/clip_features.py --sizes 336 --batch 8 --repeats 3 --append
    python benchmarks/clip_features.py --xla-flags=--xla_cpu_experimental_ynn_fusion_type= \
        --variants jax,torch --out /tmp/no_ynn.json
    python benchmarks/clip_features.py --quick                  # tiny model: checks the script
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import common

DEFAULT_OUT = common.RESULTS / "clip_features_cpu.json"
VARIANTS = ("jax", "jax_fused_qkv", "jax_reference", "jax_headmajor", "jax_chunked", "torch")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="336,518", help="comma list of image sizes S")
    parser.add_argument("--batch", default="1", help="comma list of batch sizes")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per case")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list")
    parser.add_argument("--attn-chunk", type=int, default=256, help="jax_chunked's query block")
    parser.add_argument("--torch-attn", default="sdpa", choices=("sdpa", "eager"))
    parser.add_argument("--no-parts", dest="parts", action="store_false",
                        help="skip the per-layer part timings")  # fmt: skip
    common.add_run_flags(parser, "tiny CLIP (script check only)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = "56" if args.sizes == "336,518" else args.sizes
        args.batch, args.repeats = "1,2" if args.batch == "1" else args.batch, min(args.repeats, 2)
        args.attn_chunk = 8 if args.attn_chunk == 256 else args.attn_chunk  # 17 tokens: chunk
    args.out = args.out or (Path("/tmp/clip_features_quick.json") if args.quick else DEFAULT_OUT)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.batch = [int(b) for b in args.batch.split(",")]
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    return args


# --------------------------------------------------------------------------- model and weights


def clip_config(quick: bool):
    """ViT-L/14-336's CLIPConfig, or a tiny one with the same structure for --quick."""
    from clipsam_jax.clip.random_init import vit_l14_336_config

    config = vit_l14_336_config()
    if quick:
        from transformers import CLIPConfig

        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, projection_dim=32, hidden_act="quick_gelu")  # fmt: skip
        vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, image_size=56, patch_size=14, projection_dim=32,
                      hidden_act="quick_gelu")  # fmt: skip
        config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    return config


def vision_params(config, seed: int) -> dict:
    """Random float32 params of the vision tower + projection at the config's native size."""
    from transformers.models.clip.modeling_flax_clip import FlaxCLIPModule

    from clipsam_jax.clip.loading import param_shapes
    from clipsam_jax.clip.random_init import random_params

    shapes = param_shapes(FlaxCLIPModule(config=config), int(config.vision_config.image_size))
    # The text tower is never called by the image encoder; logit_scale is read in setup().
    keep = ("vision_model", "visual_projection", "logit_scale")
    return random_params({k: v for k, v in shapes.items() if k in keep}, seed)


def torch_model(clip, attn: str):
    """HF PyTorch vision tower + projection holding the JAX model's weights (position table
    already resized to S)."""
    import jax
    import torch
    from transformers import CLIPVisionModelWithProjection

    from clipsam_jax.clip.weights import flax_to_torch

    model = CLIPVisionModelWithProjection._from_config(
        clip.config.vision_config, attn_implementation=attn
    )
    state = {k: torch.from_numpy(v) for k, v in flax_to_torch(jax.device_get(clip.params)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or set(unexpected) - {"logit_scale"}:
        raise RuntimeError(f"weights do not map: missing {missing}, unexpected {unexpected}")
    return model.eval()


def torch_features(model, pixels, layers: tuple[int, ...], grid: int):
    """(patch tokens (B, H, W, C) per layer, image embeds) from HF PyTorch CLIP."""
    out = model(pixel_values=pixels, output_hidden_states=True)
    batch = pixels.shape[0]
    tokens = tuple(out.hidden_states[k][:, 1:].reshape(batch, grid, grid, -1) for k in layers)
    return tokens, out.image_embeds


# --------------------------------------------------------------- head-major JAX (proposed)


def layer_norm(x, p: dict, eps: float):
    """Flax LayerNorm's arithmetic (variance as E[x²] - E[x]²)."""
    import jax
    import jax.numpy as jnp

    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(x), -1, keepdims=True) - jnp.square(mean), 0.0)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def dense(x, p: dict):
    y = x @ p["kernel"]
    return y + p["bias"] if "bias" in p else y


def attention_core(q, k, v, chunk: int = 0):
    """softmax(q kᵀ / sqrt(d)) v for q, k, v (B, heads, N, d), optionally in blocks of `chunk`
    query rows: each row's softmax is independent of the others, so the result is the same,
    while a block's scores (B, heads, chunk, N) stay far smaller than (B, heads, N, N)."""
    import jax
    import jax.numpy as jnp

    def block(q):
        scores = jnp.einsum("bhqd,bhkd->bhqk", q / jnp.sqrt(q.shape[-1]).astype(q.dtype), k)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores, axis=-1), v)

    rows = q.shape[2]
    if not chunk or chunk >= rows:
        return block(q)
    return jnp.concatenate([block(q[:, :, i : i + chunk]) for i in range(0, rows, chunk)], 2)


def plain_attention(x, p: dict, heads: int, chunk: int = 0):
    """CLIP self-attention with q, k, v as (B, heads, N, d) (head-major): both batched matmuls
    run on contiguous per-head matrices, heads merged once after A·V. HF FlaxCLIP instead keeps
    (B, N, heads, d) and contracts with einsum '...qhd,...khd->...hqk' / '...hqk,...khd->...qhd'.
    """
    batch, tokens, width = x.shape
    depth = width // heads

    def split(name):
        return dense(x, p[name]).reshape(batch, tokens, heads, depth).transpose(0, 2, 1, 3)

    out = attention_core(split("q_proj"), split("k_proj"), split("v_proj"), chunk)
    return dense(out.transpose(0, 2, 1, 3).reshape(batch, tokens, width), p["out_proj"])


def plain_mlp(x, p: dict):
    import jax

    h = dense(x, p["fc1"])
    return dense(h * jax.nn.sigmoid(1.702 * h), p["fc2"])  # quick_gelu


def plain_layer(x, p: dict, heads: int, eps: float, chunk: int = 0):
    x = x + plain_attention(layer_norm(x, p["layer_norm1"], eps), p["self_attn"], heads, chunk)
    return x + plain_mlp(layer_norm(x, p["layer_norm2"], eps), p["mlp"])


def plain_features(params: dict, pixels, vision_config, layers: tuple[int, ...], chunk: int = 0):
    """Same inputs, outputs and params as `make_image_encoder`'s function, in plain JAX."""
    import jax
    import jax.numpy as jnp

    vc, vp = vision_config, params["vision_model"]
    eps, heads, patch = vc.layer_norm_eps, vc.num_attention_heads, vc.patch_size
    batch, grid = pixels.shape[0], pixels.shape[1] // patch
    embeddings = vp["embeddings"]
    x = jax.lax.conv_general_dilated(
        pixels, embeddings["patch_embedding"]["kernel"], (patch, patch), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    ).reshape(batch, grid * grid, -1)  # fmt: skip
    cls = jnp.broadcast_to(embeddings["class_embedding"], (batch, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + embeddings["position_embedding"]["embedding"][None]
    hidden = [layer_norm(x, vp["pre_layrnorm"], eps)]
    for i in range(vc.num_hidden_layers):
        layer = vp["encoder"]["layers"][str(i)]
        hidden.append(plain_layer(hidden[-1], layer, heads, eps, chunk))
    tokens = tuple(hidden[k][:, 1:].reshape(batch, grid, grid, -1) for k in layers)
    pooled = layer_norm(hidden[-1][:, 0], vp["post_layernorm"], eps)
    return tokens, dense(pooled, params["visual_projection"])


# ------------------------------------------------------------------------------- measurements


def relative_error(ours, reference) -> float:
    """max |ours - reference| / max |reference|."""
    import numpy as np

    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def agreement(outputs: dict) -> dict:
    """Relative errors of every JAX variant against torch (and the plain ones against jax)."""
    pairs = [(v, "torch") for v in outputs if v != "torch" and "torch" in outputs]
    pairs += [(v, "jax") for v in outputs if v.startswith("jax_") and "jax" in outputs]
    out = {}
    for a, b in pairs:
        (tok_a, emb_a), (tok_b, emb_b) = outputs[a], outputs[b]
        errors = [relative_error(x, y) for x, y in zip(tok_a, tok_b)]
        out[f"{a}_vs_{b}"] = {
            "patch_tokens_max_rel": errors,
            "image_embeds_max_rel": relative_error(emb_a, emb_b),
            "within_1e-4": max([*errors, relative_error(emb_a, emb_b)]) < 1e-4,
        }
    return out


def jax_variants(clip, pixels, names, chunk: int) -> tuple[dict, dict, dict]:
    """{name: blocking callable}, {name: compile seconds}, {name: outputs} of the JAX variants."""
    import jax

    from clipsam_jax.clip.features import make_image_encoder

    vc, layers = clip.config.vision_config, clip.feature_layers
    jitted = {
        "jax": make_image_encoder(clip),
        "jax_fused_qkv": make_image_encoder(clip, fuse_qkv=True),
        "jax_reference": make_image_encoder(clip, attention="reference"),
        "jax_headmajor": jax.jit(lambda p, x: plain_features(p, x, vc, layers)),
        "jax_chunked": jax.jit(lambda p, x: plain_features(p, x, vc, layers, chunk)),
    }
    fns, compile_s, outputs = {}, {}, {}
    for name in names:
        if name not in jitted:
            continue
        wall, _, compiled = common.timed(
            lambda f=jitted[name]: f.lower(clip.params, pixels).compile()
        )
        compile_s[name] = wall
        fns[name] = lambda c=compiled: jax.block_until_ready(c(clip.params, pixels))
        result = fns[name]()
        outputs[name] = (tuple(result[0]), result[1])
        print(f"    {name}: compiled in {wall:.1f} s", flush=True)
    return fns, compile_s, outputs


def torch_variant(clip, pixels_np, attn: str):
    """(model, blocking callable, outputs as numpy) of the PyTorch variant."""
    import torch

    model = torch_model(clip, attn)
    pixels = torch.from_numpy(pixels_np).permute(0, 3, 1, 2).contiguous()

    def run():
        with torch.inference_mode():
            return torch_features(model, pixels, clip.feature_layers, clip.grid)

    tokens, embeds = run()
    return model, run, (tuple(t.numpy() for t in tokens), embeds.numpy())


def bench_case(clip, size: int, batch: int, args) -> dict:
    """Time all variants at one (S, B) and check their agreement."""
    import jax
    import numpy as np
    import torch

    print(f"[S={size} B={batch}] grid {clip.grid}, load {common.loadavg()}", flush=True)
    common.reset_peak_rss()
    rng = np.random.default_rng(args.seed + size + batch)
    pixels_np = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    pixels = jax.device_put(pixels_np)
    fns, compile_s, outputs = jax_variants(clip, pixels, args.variants, args.attn_chunk)
    model = None
    if "torch" in args.variants:
        model, fns["torch"], outputs["torch"] = torch_variant(clip, pixels_np, args.torch_attn)
    checks = agreement(outputs)
    outputs.clear()
    load_before = common.loadavg()
    timings = common.interleaved(fns, args.repeats, args.warmup)
    case = {
        "image_size": size, "batch": batch, "grid": clip.grid, "tag": args.tag,
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "torch_threads": torch.get_num_threads(),
        "cpu_affinity": common.cpu_affinity(),
        "loadavg_before": load_before, "loadavg_after": common.loadavg(),
        "compile_seconds": compile_s, "agreement": checks, "runs": {},
    }  # fmt: skip
    for name in fns:
        run = timings[name]
        run["seconds_per_image"] = run["seconds_median"] / batch
        run["images_per_second"] = batch / run["seconds_median"]
        case["runs"][name] = run
    if "torch" in fns:
        case["ratio_jax_over_torch"] = {
            name: common.pairwise_ratio(timings, name, "torch") for name in fns if name != "torch"
        }
    if args.parts and batch == min(args.batch):
        case["parts"] = bench_parts(clip, model, pixels_np, args)
    case["peak_rss_mib"] = common.peak_rss_mib()
    del model
    gc.collect()
    return case


def bench_parts(clip, model, pixels_np, args) -> dict:
    """One encoder layer's parts at this S (layer 0's weights): HF Flax modules, the plain JAX
    head-major and chunked forms, and PyTorch. Milliseconds, medians of interleaved rounds;
    ×24 layers gives the share in the full model. Parts measured alone: XLA may lay out an
    isolated part differently than inside the whole model."""
    import jax
    import numpy as np
    from transformers.models.clip import modeling_flax_clip as hf

    from clipsam_jax.clip.features import _blocked_core as blocked_core

    vc = clip.config.vision_config
    p = clip.params["vision_model"]["encoder"]["layers"]["0"]
    heads, eps, chunk = vc.num_attention_heads, vc.layer_norm_eps, args.attn_chunk
    batch, tokens = pixels_np.shape[0], clip.grid**2 + 1
    depth = vc.hidden_size // heads
    rng = np.random.default_rng(args.seed)
    x = jax.device_put(rng.standard_normal((batch, tokens, vc.hidden_size)).astype(np.float32))
    q = jax.device_put(rng.standard_normal((batch, tokens, heads, depth)).astype(np.float32))
    pixels = jax.device_put(pixels_np)
    kernel = clip.params["vision_model"]["embeddings"]["patch_embedding"]["kernel"]
    layer, attn, mlp = hf.FlaxCLIPEncoderLayer(vc), hf.FlaxCLIPAttention(vc), hf.FlaxCLIPMLP(vc)

    def hf_core(q):  # HF FlaxCLIPAttention between the projections, (B, N, heads, d) layout
        import flax.linen as nn
        import jax.numpy as jnp

        weights = nn.dot_product_attention_weights(q, q, precision=None)
        return jnp.einsum("...hqk,...khd->...qhd", weights, q)

    def plain_core(q, chunk=0):
        qh = q.transpose(0, 2, 1, 3)
        return attention_core(qh, qh, qh, chunk).transpose(0, 2, 1, 3)

    def patch_conv(pixels, kernel):
        patch, dims = vc.patch_size, ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(pixels, kernel, (patch, patch), "VALID",
                                            dimension_numbers=dims)  # fmt: skip

    parts = {
        "encoder_layer": ((x,), {
            "jax_hf": lambda x: layer.apply({"params": p}, x, None)[0],
            "jax_headmajor": lambda x: plain_layer(x, p, heads, eps),
            "jax_chunked": lambda x: plain_layer(x, p, heads, eps, chunk),
        }),
        "self_attention": ((x,), {
            "jax_hf": lambda x: attn.apply({"params": p["self_attn"]}, x)[0],
            "jax_headmajor": lambda x: plain_attention(x, p["self_attn"], heads),
            "jax_chunked": lambda x: plain_attention(x, p["self_attn"], heads, chunk),
        }),
        "attention_core": ((q,), {
            "jax_hf": hf_core, "jax_headmajor": plain_core,
            "jax_chunked": lambda q: plain_core(q, chunk),
            "jax_blocked": lambda q: blocked_core(q, q, q, depth**-0.5),
        }),
        "mlp": ((x,), {
            "jax_hf": lambda x: mlp.apply({"params": p["mlp"]}, x),
            "jax_headmajor": lambda x: plain_mlp(x, p["mlp"]),
        }),
        "patch_embedding": ((pixels, kernel), {"jax_hf": patch_conv}),
    }  # fmt: skip
    torch_parts = torch_layer_parts(model, x, q, pixels_np) if model is not None else {}
    out = {}
    for name, (inputs, variants) in parts.items():
        fns = {}
        for label, fn in variants.items():
            compiled = jax.jit(fn).lower(*inputs).compile()
            fns[label] = lambda c=compiled, i=inputs: jax.block_until_ready(c(*i))
        if name in torch_parts:
            fns["torch"] = lambda f=torch_parts[name]: _no_grad(f)
        timings = common.interleaved(fns, max(args.repeats, 5), warmup=1, log=False)
        out[name] = {label: 1e3 * timings[label]["seconds_median"] for label in fns}
        print(f"    part {name}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in out[name].items()))
    return {"unit": "ms, median, one layer", "attn_chunk": chunk, **out}


def torch_layer_parts(model, x, q, pixels_np) -> dict:
    """The same parts of HF PyTorch CLIP's first layer (attention core: torch SDPA)."""
    import numpy as np
    import torch

    layer = model.vision_model.encoder.layers[0]
    tx = torch.from_numpy(np.array(x))
    tq = torch.from_numpy(np.array(q)).transpose(1, 2).contiguous()
    pixels = torch.from_numpy(pixels_np).permute(0, 3, 1, 2).contiguous()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    conv = model.vision_model.embeddings.patch_embedding
    return {
        "encoder_layer": lambda: layer(tx, None, None)[0],
        "self_attention": lambda: layer.self_attn(tx)[0],
        "attention_core": lambda: sdpa(tq, tq, tq),
        "mlp": lambda: layer.mlp(tx),
        "patch_embedding": lambda: conv(pixels),
    }


def _no_grad(fn):
    import torch

    with torch.inference_mode():
        return fn()


# ---------------------------------------------------------------------------------- report


def table_rows(cases: dict) -> list[dict]:
    rows = []
    for case in cases.values():
        for name, run in case["runs"].items():
            ratio = case.get("ratio_jax_over_torch", {}).get(name, {})
            rows.append({
                "S": case["image_size"], "B": case["batch"], "tag": case.get("tag") or "-",
                "variant": name,
                "s_per_img": run["seconds_per_image"], "img_per_s": run["images_per_second"],
                "ratio": ratio.get("median_of_pairwise"),
                "compile_s": case["compile_seconds"].get(name),
            })  # fmt: skip
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    flags = common.start_cpu_run(args.xla_flags, args.torch_threads)
    import torch

    from clipsam_jax.clip.features import resolve_attention
    from clipsam_jax.clip.loading import build_clip_model

    config = clip_config(args.quick)
    wall, _, params = common.timed(lambda: vision_params(config, args.seed))
    print(f"random params in {wall:.1f} s; xla flags {flags!r}; torch threads "
          f"{torch.get_num_threads()}", flush=True)  # fmt: skip
    report = common.open_report(args.out, args.append, {
        "benchmark": "CLIP image features (4 patch-token layers + projected embedding): jitted "
        "JAX vs Hugging Face PyTorch, float32, CPU",
        "note": f"{common.RANDOM_WEIGHTS_NOTE}. "
        + ("TINY --quick model, not ViT-L. " if args.quick else "ViT-L/14-336 architecture. ")
        + "Wall clock, in-process, medians over interleaved rounds on a shared machine (other "
        "processes' load in loadavg_*); ratio = JAX time / PyTorch time, median of per-round "
        "ratios. jax_headmajor / jax_chunked are candidate library changes demonstrated in "
        "this script (plain-JAX vision forward on the same params).",
    })  # fmt: skip
    report["settings"] = {
        "dtype": "float32", "repeats": args.repeats, "warmup": args.warmup,
        "variants": args.variants, "torch_attn_implementation": args.torch_attn,
        "attn_chunk": args.attn_chunk,
        "torch_threads": torch.get_num_threads(), "xla_flags": flags,
        "feature_layers": "quarters of the depth (6, 12, 18, 24 for ViT-L)",
        "library_attention": resolve_attention(None),
    }  # fmt: skip
    for size in args.sizes:
        clip = build_clip_model(config, params, None, size, dtype="float32")
        for batch in args.batch:
            key = f"S{size}_B{batch}" + (f"_{args.tag}" if args.tag else "")
            report["cases"][key] = bench_case(clip, size, batch, args)
            common.write_json(args.out, report)  # partial results survive an interrupted run
        del clip
        gc.collect()
    report["process_ru_maxrss_kib"] = common.ru_maxrss_kib()
    common.write_json(args.out, report)
    print(f"\n{report['machine']['label']}; random weights; float32; "
          f"median of {args.repeats} interleaved rounds")  # fmt: skip
    columns = [("S", "S"), ("B", "B"), ("tag", "tag"), ("variant", "variant"),
               ("s/img", "s_per_img"), ("img/s", "img_per_s"), ("JAX/torch", "ratio"),
               ("compile s", "compile_s")]  # fmt: skip
    common.print_table(table_rows(report["cases"]), columns)
    for key, case in report["cases"].items():
        worst = max(
            max([*c["patch_tokens_max_rel"], c["image_embeds_max_rel"]])
            for c in case["agreement"].values()
        ) if case["agreement"] else float("nan")  # fmt: skip
        print(f"{key}: largest relative difference between variants {worst:.2e}")


if __name__ == "__main__":
    sys.exit(main())
