"""CLIP's attention core softmax(q kᵀ · scale) v alone on CPU: the library's blocked form against
the same blocks with a plain softmax (its previous form) and PyTorch's fused SDPA kernel.

    python benchmarks/attention_core.py            # ViT-L/14's 16 heads of 64, S = 336 and 518
    python benchmarks/attention_core.py --quick    # small sizes: checks the script

The library's form (`clipsam_jax.clip.features._blocked_core`) scales q instead of the scores
and divides the (rows × d) output by the row sums instead of normalizing the (rows × T)
weights: two passes less over the scores. Random q, k, v (one layer, B = 1): timings and
agreement only.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import common

common.setup_path()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="336,518", help="comma list of image sizes S")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--torch-threads", type=int, default=None, help="default: torch's")
    parser.add_argument("--xla-flags", default=None, help="appended to $XLA_FLAGS")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    return parser.parse_args(argv)


def plain_softmax_blocks(q, k, v, scale: float, block: int):
    """The previous blocked form: scores scaled, normalized by `jax.nn.softmax`, then times v."""
    import jax
    import jax.numpy as jnp

    def one_head(qkv):
        q_h, k_h, v_h = qkv
        outs = []
        for start in range(0, q_h.shape[1], block):
            scores = jnp.einsum("bqd,bkd->bqk", q_h[:, start : start + block], k_h)
            outs.append(jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(scores * scale, -1), v_h))
        return jnp.concatenate(outs, axis=1)

    heads_first = [x.transpose(2, 0, 1, 3) for x in (q, k, v)]
    return jax.lax.map(one_head, tuple(heads_first)).transpose(1, 2, 0, 3)


def time_case(size: int, heads: int, depth: int, patch: int, repeats: int) -> dict:
    """One image size: the three forms on the same random q, k, v (1, T, heads, d)."""
    import jax
    import numpy as np
    import torch
    import torch.nn.functional as F

    from clipsam_jax.clip import features

    scale, tokens = depth**-0.5, (size // patch) ** 2 + 1
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, tokens, heads, depth)).astype(np.float32) for _ in range(3))
    tq, tk, tv = (torch.from_numpy(x.transpose(0, 2, 1, 3).copy()) for x in (q, k, v))
    jitted = {
        "library_blocked": jax.jit(functools.partial(features._blocked_core, scale=scale)),
        "plain_softmax_blocked": jax.jit(
            functools.partial(plain_softmax_blocks, scale=scale, block=features.ATTENTION_BLOCK)
        ),
    }
    fns = {n: (lambda f=f: jax.block_until_ready(f(q, k, v))) for n, f in jitted.items()}
    fns["torch_sdpa"] = lambda: F.scaled_dot_product_attention(tq, tk, tv)
    reference = fns["torch_sdpa"]().numpy().transpose(0, 2, 1, 3)
    agreement = {
        n: float(np.abs(np.asarray(fns[n]()) - reference).max() / np.abs(reference).max())
        for n in jitted
    }
    print(f"[S={size}] {tokens} tokens, {heads} heads of {depth}", flush=True)
    timings = common.interleaved(fns, repeats)
    return {
        "tokens": tokens,
        "ms": {n: 1e3 * timings[n]["seconds_median"] for n in fns},
        "runs": {n: timings[n] for n in fns},
        "ratio_over_torch": {n: common.pairwise_ratio(timings, n, "torch_sdpa") for n in jitted},
        "library_over_plain_softmax": common.pairwise_ratio(
            timings, "library_blocked", "plain_softmax_blocked"
        ),
        "max_rel_difference_to_torch": agreement,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    common.start_cpu_run(args.xla_flags, args.torch_threads)
    from clipsam_jax.clip import features

    heads, depth, patch = (2, 16, 14) if args.quick else (16, 64, 14)
    sizes = [56, 112] if args.quick else [int(s) for s in args.sizes.split(",")]
    cases = {f"S{size}": time_case(size, heads, depth, patch, args.repeats) for size in sizes}
    settings = {"heads": heads, "head_dim": depth, "block": features.ATTENTION_BLOCK}
    report = common.open_report(None, False, {
        "benchmark": "CLIP attention core softmax(q k^T scale) v on CPU: library blocked form vs "
        "the plain-softmax blocked form vs torch SDPA",
        "note": "random q, k, v, one layer, B = 1, float32: timings and agreement only"
        + (". QUICK RUN: small sizes, numbers mean nothing" if args.quick else ""),
        "settings": {**settings, "repeats": args.repeats},
    })  # fmt: skip
    report.update(loadavg_after=common.loadavg(), cases=cases)
    for case in cases.values():
        if max(case["max_rel_difference_to_torch"].values()) > 1e-5:
            raise SystemExit(f"outputs disagree: {case['max_rel_difference_to_torch']}")
    default = Path(tempfile.gettempdir()) if args.quick else common.RESULTS
    common.write_json(Path(args.out) if args.out else default / "attention_core_cpu.json", report)
    rows = [
        {"case": c, "variant": n, "ms": v}
        for c, case in cases.items()
        for n, v in case["ms"].items()
    ]
    common.print_table(rows, [("case", "case"), ("variant", "variant"), ("ms (median)", "ms")])


if __name__ == "__main__":
    main()
