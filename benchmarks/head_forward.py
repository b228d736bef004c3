"""The UMCI head's forward pass alone on CPU (inference: no gradient), per convolution form,
against its PyTorch twin on the same weights.

    python benchmarks/head_forward.py                 # ViT-L/14 features at S = 518, B = 2 and 8
    python benchmarks/head_forward.py --quick         # small sizes: checks the script

`HeadConfig.conv_impl` picks how the 3×3 convolutions run: XLA's own convolution ("xla") or nine
shifted matmuls ("matmul", the CPU training default for its faster backward pass). Inference
has no backward pass, so the rough-map model takes the fastest forward form measured here.
`xla_ynn_single_dots` is "xla" compiled with XLA's CPU option
`xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT` (YNNPACK for single
dots only): a candidate, not the library's setting.
Random features and weights: timings and agreement only.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common

common.setup_path()

IMPLS = ("matmul", "xla", "im2col")
# "xla" compiled with XLA's CPU option that hands single dots (no fused groups, convolutions to
# XLA) to YNNPACK: faster for the head alone, not for CLIP + head in one jit (RESULTS.md).
YNN_SINGLE_DOTS = "xla_ynn_single_dots"
YNN_SINGLE_DOTS_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="2,8", help="comma list of batch sizes")
    parser.add_argument("--repeats", type=int, default=5)
    common.add_run_flags(parser, "small sizes: a smoke run")
    return parser.parse_args(argv)


def time_case(batch: int, grid: int, feature_dim: int, text_dim: int, hidden_dim: int,
              repeats: int, seed: int) -> dict:  # fmt: skip
    """One batch size: each conv form's jitted head forward and the torch twin's, interleaved."""
    import jax
    import numpy as np
    import torch

    from clipsam_jax import torch_ref
    from clipsam_jax.config import HeadConfig
    from clipsam_jax.models.heads import build_head
    from clipsam_jax.models.init import init_params
    from conversion.head_params import flax_to_torch

    rng = np.random.default_rng(seed)
    tokens = [rng.normal(size=(batch, grid, grid, feature_dim)).astype(np.float32)
              for _ in range(4)]  # fmt: skip
    text = rng.normal(size=(batch, 2, text_dim)).astype(np.float32)
    pools = (3, 9) if grid >= 18 else (2, 4)
    config = HeadConfig(hidden_dim=hidden_dim, pool_sizes=pools)
    heads = {impl: build_head(config, text_dim, conv_impl=impl) for impl in IMPLS}
    params = init_params(heads["xla"], seed, [t.shape for t in tokens], text.shape, config.init)
    fns, outputs = {}, {}
    forms = {**{impl: (head, None) for impl, head in heads.items()},
             YNN_SINGLE_DOTS: (heads["xla"], YNN_SINGLE_DOTS_OPTIONS)}  # fmt: skip
    for name, (head, options) in list(forms.items()):
        forward = jax.jit(lambda p, t, x, head=head: head.apply({"params": p}, t, x),
                          compiler_options=options)  # fmt: skip
        fns[name] = lambda f=forward: jax.block_until_ready(f(params, tokens, text))
        try:
            outputs[name] = fns[name]()
        except Exception as error:  # an XLA without this option: time the others
            print(f"    {name} skipped: {type(error).__name__}: {error}"[:300], flush=True)
            del fns[name], forms[name]
    twin = torch_ref.UMCIHead(4, feature_dim=feature_dim, text_dim=text_dim,
                              hidden_dim=hidden_dim, pool_sizes=pools).eval()  # fmt: skip
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in flax_to_torch(params).items()})
    torch_tokens, torch_text = [torch.from_numpy(t) for t in tokens], torch.from_numpy(text)

    def run_torch():
        with torch.inference_mode():
            return twin(torch_tokens, torch_text)

    fns["torch"] = run_torch
    reference = [np.asarray(x) for x in run_torch()]

    def difference(impl: str) -> float:
        pairs = zip(outputs[impl], reference, strict=True)
        return max(float(np.abs(np.asarray(a) - b).max() / np.abs(b).max()) for a, b in pairs)

    agreement = {name: difference(name) for name in forms}
    print(f"[B={batch}] grid {grid}, features {feature_dim}, hidden {hidden_dim}", flush=True)
    timings = common.interleaved(fns, repeats)
    return {
        "seconds": {n: timings[n]["seconds_median"] for n in fns},
        "runs": {n: timings[n] for n in fns},
        "ratio_over_torch": {n: common.pairwise_ratio(timings, n, "torch") for n in forms},
        "xla_over_matmul": common.pairwise_ratio(timings, "xla", "matmul"),
        "ynn_single_dots_options": YNN_SINGLE_DOTS_OPTIONS,
        "ynn_single_dots_over_xla": common.pairwise_ratio(timings, YNN_SINGLE_DOTS, "xla")
        if YNN_SINGLE_DOTS in fns
        else None,
        "max_rel_difference_to_torch": agreement,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    flags = common.start_cpu_run(args.xla_flags, args.torch_threads)
    # ViT-L/14 at S = 518: 37 × 37 tokens of 1024, text 768, c_h = 384 (Table 3).
    grid, feature_dim, text_dim, hidden = (8, 32, 24, 16) if args.quick else (37, 1024, 768, 384)
    batches = [2] if args.quick else [int(b) for b in args.batches.split(",")]
    default = Path(tempfile.gettempdir()) if args.quick else common.RESULTS
    out = Path(args.out) if args.out else default / "head_forward_cpu.json"
    report = common.open_report(out, args.append, {
        "benchmark": "UMCI head forward (inference) on CPU per conv form vs the PyTorch twin",
        "note": "random features and weights, float32: timings and agreement only"
        + (". QUICK RUN: small sizes, numbers mean nothing" if args.quick else ""),
    })  # fmt: skip
    for batch in batches:
        case = time_case(batch, grid, feature_dim, text_dim, hidden, args.repeats, args.seed)
        report["cases"][f"B{batch}{args.tag}"] = {**case, "xla_flags": flags}
        for impl, value in case["max_rel_difference_to_torch"].items():
            if value > 1e-4:
                raise SystemExit(f"{impl} disagrees with the torch twin: {value}")
    report["loadavg_after"] = common.loadavg()
    common.write_json(out, report)
    rows = [
        {"case": c, "variant": n, "s": v}
        for c, case in report["cases"].items()
        for n, v in case["seconds"].items()
    ]
    common.print_table(rows, [("case", "case"), ("variant", "variant"), ("s (median)", "s")])


if __name__ == "__main__":
    main()
