"""Train steps/s of the jitted UMCI training step (JAX) against its PyTorch twin (CPU).

Full size by default: C = 1024, C_t = 768, c_h = 384, S = 518 (grid 37), batch 8, 4 stages,
the default HeadConfig and LossConfig (focal + dice on the S×S mask: every stage's logits are
upsampled to S×S), AdamW(lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0.01). Cached
features are random float16 arrays in memory (as the feature cache stores them), text features
random unit rows, masks half defect-free, half with a random rectangle. Random weights: JAX head
params from `clipsam_jax.models.init.init_params`, copied into the PyTorch twin
(`conversion.head_params.flax_to_torch`), so both start from the same weights; the first step's
losses are compared.

Variants (timed interleaved, A B C D A B C D ..., medians; see common.py):
  jax_xla, jax_matmul, jax_im2col   `make_train_step` with build_head(conv_impl=...): the three
                                    convolution formulations of clipsam_jax.models.layers.Conv2D
  torch                             clipsam_jax.torch_ref.UMCIHead + torch_ref.total_loss,
                                    backward, torch.optim.AdamW (same hyper-parameters)
--profile splits one JAX step (conv formulation --profile-impl): forward, forward + loss,
value_and_grad, the optax update, the loss alone (S×S upsampling + focal + dice, and its
gradient), the same loss at grid resolution, and the convolutions of one stage.

    python benchmarks/train_step.py                       # full size, 3 JAX variants + torch
    python benchmarks/train_step.py --impls matmul --no-torch --profile --repeats 3 --append
    python benchmarks/train_step.py --quick               # tiny sizes: checks the script
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import common

DEFAULT_OUT = common.RESULTS / "train_step_cpu.json"
IMPLS = ("xla", "matmul", "im2col")
FULL = dict(feature_dim=1024, text_dim=768, hidden_dim=384, image_size=518, batch=8, stages=4)
# --quick: one stage and one conv formulation, so that compiling stays short (XLA:CPU compiles a
# 4-stage step for tens of seconds whatever the sizes).
QUICK = dict(feature_dim=64, text_dim=48, hidden_dim=32, image_size=126, batch=2, stages=1)
PATCH = 14


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=None, help="comma list of image sizes S (def. 518)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    parser.add_argument("--impls", default=",".join(IMPLS), help="JAX conv formulations")
    parser.add_argument("--no-torch", dest="torch", action="store_false")
    parser.add_argument("--no-steps", dest="steps", action="store_false",
                        help="skip the step comparison (with --profile: profile only)")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="split one JAX step (+ --convs)")
    parser.add_argument("--convs", action="store_true", help="time one stage's convs alone")
    parser.add_argument("--profile-impl", default="matmul", choices=IMPLS)
    common.add_run_flags(parser, "tiny sizes (script check only)")
    args = parser.parse_args(argv)
    dims = dict(QUICK if args.quick else FULL)
    if args.batch:
        dims["batch"] = args.batch
    args.dims = dims
    args.sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [dims["image_size"]]
    args.impls = [i for i in args.impls.split(",") if i]
    if set(args.impls) - set(IMPLS):
        parser.error(f"unknown conv impls {args.impls}; choose from {IMPLS}")
    if args.quick:
        args.repeats = min(args.repeats, 2)
        args.impls = args.impls if "--impls" in " ".join(argv or sys.argv) else ["matmul"]
    args.out = args.out or (Path("/tmp/train_step_quick.json") if args.quick else DEFAULT_OUT)
    return args


# ------------------------------------------------------------------------------- inputs


def make_batch(dims: dict, size: int, seed: int) -> dict:
    """numpy batch: float16 tokens per stage, unit text rows, bool masks (half defect-free)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    batch, grid = dims["batch"], size // PATCH
    tokens = tuple(
        rng.standard_normal((batch, grid, grid, dims["feature_dim"]), np.float32).astype(np.float16)
        for _ in range(dims["stages"])
    )
    text = rng.standard_normal((batch, 2, dims["text_dim"]), np.float32)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    masks = np.zeros((batch, size, size), bool)
    for i in range(0, batch, 2):
        y, x = rng.integers(0, size // 2, 2)
        h, w = rng.integers(size // 16, size // 3, 2)
        masks[i, y : y + h, x : x + w] = True
    return {"tokens": tokens, "text": text, "masks": masks}


def loss_config(dims: dict, resolution: str = "image"):
    """The default LossConfig (S×S loss, weights .1 .1 .1 .7); equal weights if not 4 stages."""
    from clipsam_jax.config import LossConfig

    stages = dims["stages"]
    weights = LossConfig().stage_weights if stages == 4 else (1.0 / stages,) * stages
    return LossConfig(stage_weights=weights, resolution=resolution)


def head_config(dims: dict):
    from clipsam_jax.config import HeadConfig

    return HeadConfig(hidden_dim=dims["hidden_dim"])


def initial_params(dims: dict, batch: dict, seed: int) -> dict:
    """Float32 numpy head params (every conv formulation has the same tree)."""
    from clipsam_jax.models.heads import build_head
    from clipsam_jax.models.init import init_params

    config = head_config(dims)
    head = build_head(config, dims["text_dim"], dims["stages"], conv_impl="xla")
    return init_params(head, seed, [t.shape for t in batch["tokens"]], batch["text"].shape,
                       config.init)  # fmt: skip


# ------------------------------------------------------------------------------ JAX step


def jax_step(dims: dict, impl: str, params: dict, batch_jax: dict) -> tuple:
    """(blocking callable doing one step, compile seconds, first-step loss) for one conv impl."""
    import jax

    from clipsam_jax.config import OptimConfig
    from clipsam_jax.models.heads import build_head
    from clipsam_jax.train_step import create_state, make_optimizer, make_train_step

    head = build_head(head_config(dims), dims["text_dim"], dims["stages"], conv_impl=impl)
    optimizer = make_optimizer(OptimConfig())
    state = {"state": create_state(params, optimizer)}  # create_state copies (jnp.asarray)
    step = make_train_step(head, loss_config(dims), optimizer)
    wall, _, compiled = common.timed(lambda: step.lower(state["state"], batch_jax).compile())

    def run():
        state["state"], metrics = compiled(state["state"], batch_jax)  # state is donated
        return jax.block_until_ready(metrics)["loss"]

    first_loss = float(run())
    return run, wall, first_loss


# ---------------------------------------------------------------------------- torch step


def torch_step(dims: dict, params: dict, batch: dict) -> tuple:
    """(blocking callable doing one step, first-step loss) of the PyTorch twin."""
    import torch

    from clipsam_jax import torch_ref
    from clipsam_jax.config import HeadConfig, OptimConfig
    from conversion.head_params import flax_to_torch

    head, objective, optim = HeadConfig(), loss_config(dims), OptimConfig()
    twin = torch_ref.UMCIHead(
        dims["stages"], feature_dim=dims["feature_dim"], text_dim=dims["text_dim"],
        hidden_dim=dims["hidden_dim"], pool_sizes=head.pool_sizes, paths=head.paths,
        gru_reading=head.gru_reading, shared_projection=head.shared_projection,
    )  # fmt: skip
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in flax_to_torch(params).items()})
    optimizer = torch.optim.AdamW(
        twin.parameters(), lr=optim.learning_rate, betas=(optim.b1, optim.b2), eps=1e-8,
        weight_decay=optim.weight_decay,
    )  # fmt: skip
    tokens = [torch.from_numpy(t) for t in batch["tokens"]]
    text, masks = torch.from_numpy(batch["text"]), torch.from_numpy(batch["masks"])

    def run():
        optimizer.zero_grad(set_to_none=True)
        logits = twin([t.float() for t in tokens], text)  # float16 cache -> float32, as JAX
        loss, _ = torch_ref.total_loss(
            logits, masks, weights=objective.stage_weights, gamma=objective.focal_gamma,
            smooth=objective.dice_smooth, resolution=objective.resolution,
        )  # fmt: skip
        loss.backward()
        grads = [p.grad for p in twin.parameters() if p.grad is not None]
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        optimizer.step()  # the JAX step also reports the global gradient norm (above)
        return loss.item()

    first_loss = run()
    return run, first_loss


# ------------------------------------------------------------------------------ comparison


def bench_steps(dims: dict, size: int, params: dict, batch: dict, args) -> dict:
    import jax
    import numpy as np

    batch_jax = jax.device_put(batch)
    fns, compile_s, first_loss, memory = {}, {}, {}, {}
    for impl in args.impls:
        name = f"jax_{impl}"
        rss0 = common.peak_rss_mib() if common.reset_peak_rss() else None
        fns[name], compile_s[name], first_loss[name] = jax_step(dims, impl, params, batch_jax)
        memory[name] = _memory(rss0)
        print(f"    {name}: compiled in {compile_s[name]:.1f} s, first step loss "
              f"{first_loss[name]:.6f}", flush=True)  # fmt: skip
    if args.torch:
        rss0 = common.peak_rss_mib() if common.reset_peak_rss() else None
        fns["torch"], first_loss["torch"] = torch_step(dims, params, batch)
        memory["torch"] = _memory(rss0)
        print(f"    torch: first step loss {first_loss['torch']:.6f}", flush=True)
    load_before = common.loadavg()
    timings = common.interleaved(fns, args.repeats, warmup=max(args.warmup - 1, 0))
    result = {
        "loadavg_before": load_before, "loadavg_after": common.loadavg(),
        "compile_seconds": compile_s, "first_step_loss": first_loss,
        "memory_first_step_mib": memory, "runs": {},
    }  # fmt: skip
    reference = first_loss.get("torch")
    if reference is not None:
        result["first_step_loss_rel_diff_vs_torch"] = {
            k: abs(v - reference) / abs(reference) for k, v in first_loss.items() if k != "torch"
        }
    for name in fns:
        run = timings[name]
        run["steps_per_second"] = 1.0 / run["seconds_median"]
        result["runs"][name] = run
    if args.torch:
        result["ratio_jax_over_torch"] = {
            n: common.pairwise_ratio(timings, n, "torch") for n in fns if n != "torch"
        }
    jax_names = [n for n in fns if n.startswith("jax_")]
    if jax_names:
        fastest = min(jax_names, key=lambda n: timings[n]["seconds_median"])
        result["fastest_jax"] = fastest
        result["ratio_vs_fastest_jax"] = {
            n: float(np.median([r[n] / r[fastest] for r in timings["rounds"]])) for n in jax_names
        }
    return result


def _memory(rss_before: float | None) -> dict:
    """Peak RSS during setup + compile + first step, and its rise over the RSS before."""
    peak = common.peak_rss_mib()
    out = {"peak_rss_mib": peak}
    if rss_before is not None:
        out["rise_over_start_mib"] = peak - rss_before
    return out


# ------------------------------------------------------------------------------- profile


def bench_profile(dims: dict, params: dict, batch: dict, args) -> dict:
    """Where one JAX step's time goes (conv formulation args.profile_impl)."""
    import jax
    import jax.numpy as jnp

    from clipsam_jax.config import OptimConfig
    from clipsam_jax.losses import total_loss
    from clipsam_jax.models.heads import build_head
    from clipsam_jax.train_step import make_optimizer

    head = build_head(head_config(dims), dims["text_dim"], dims["stages"],
                      conv_impl=args.profile_impl)  # fmt: skip
    image_loss, grid_loss = loss_config(dims), loss_config(dims, "grid")
    optimizer = make_optimizer(OptimConfig())
    data = jax.device_put(batch)
    params = jax.device_put(params)
    opt_state = optimizer.init(params)

    def forward(p, data):
        tokens = tuple(t.astype(jnp.float32) for t in data["tokens"])
        return head.apply({"params": p}, tokens, data["text"])

    def loss_fn(p, data, config=image_loss):
        return total_loss(forward(p, data), data["masks"], config)[0]

    def update(grads, opt_state, p):
        import optax

        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    logits = jax.jit(forward)(params, data)
    grads = jax.tree.map(jnp.ones_like, params)  # AdamW's cost does not depend on the values
    masks = data["masks"]
    parts = {
        "forward": (forward, (params, data)),
        "forward_loss": (loss_fn, (params, data)),
        "value_and_grad": (jax.value_and_grad(loss_fn), (params, data)),
        "value_and_grad_grid_loss": (
            jax.value_and_grad(lambda p, d: loss_fn(p, d, grid_loss)),
            (params, data),
        ),
        "optax_update": (update, (grads, opt_state, params)),
        "loss_image_SxS": (lambda lg, m: total_loss(lg, m, image_loss)[0], (logits, masks)),
        "loss_image_SxS_value_and_grad": (
            jax.value_and_grad(lambda lg, m: total_loss(lg, m, image_loss)[0]),
            (logits, masks),
        ),
        "loss_grid_value_and_grad": (
            jax.value_and_grad(lambda lg, m: total_loss(lg, m, grid_loss)[0]),
            (logits, masks),
        ),
    }
    fns, compile_s = {}, {}
    for name, (fn, inputs) in parts.items():
        wall, _, compiled = common.timed(lambda f=fn, i=inputs: jax.jit(f).lower(*i).compile())
        compile_s[name] = wall
        fns[name] = lambda c=compiled, i=inputs: jax.block_until_ready(c(*i))
        print(f"    profile {name}: compiled in {wall:.1f} s", flush=True)
    timings = common.interleaved(fns, args.repeats, warmup=1)
    timings.pop("rounds")
    return {"conv_impl": args.profile_impl, "compile_seconds": compile_s, "seconds": timings}


def conv_shapes(dims: dict, grid: int) -> dict:
    """(input shape, output features) of every 3×3 conv in one UMCI stage (default config)."""
    batch, c_t, c_h = dims["batch"], dims["text_dim"], dims["hidden_dim"]
    return {
        "conv_ori": ((batch, grid, grid, c_t), c_h),
        "strip_fuse": ((batch, grid, grid, c_h), c_h),
        "scale_0_conv (pooled /3)": ((batch, grid // 3, grid // 3, c_t), c_h),
        "scale_1_conv (pooled /9)": ((batch, grid // 9, grid // 9, c_t), c_h),
        "scale_fuse": ((batch, grid, grid, c_h), c_h),
        "conv_all": ((batch, grid, grid, 3 * c_h), c_t),
    }


def bench_convs(dims: dict, impls: list[str], batch: dict, args) -> dict:
    """Forward, and forward + backward (gradients of input and params), of each 3×3 conv of
    one stage, every formulation interleaved (and PyTorch's conv2d as the twin calls it, unless
    --no-torch): {conv: {impl: {"forward": s, "forward_backward": s}}}."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from clipsam_jax.models.layers import Conv2D

    grid = batch["tokens"][0].shape[1]
    rng = np.random.default_rng(args.seed)
    out = {}
    for name, (shape, features) in conv_shapes(dims, grid).items():
        x = jnp.asarray(rng.standard_normal(shape, np.float32))
        params = Conv2D(features, 3, "xla").init(jax.random.PRNGKey(0), x)  # same for all
        fns = {}
        for impl in impls:
            conv = Conv2D(features, 3, impl)

            def fwd(p, x, conv=conv):
                return conv.apply(p, x)

            def fwd_bwd(p, x, conv=conv):
                loss = lambda p, x: jnp.sum(conv.apply(p, x) ** 2)  # noqa: E731
                return jax.grad(loss, argnums=(0, 1))(p, x)

            for label, fn in (("forward", fwd), ("forward_backward", fwd_bwd)):
                compiled = jax.jit(fn).lower(params, x).compile()
                fns[impl, label] = lambda c=compiled, p=params, x=x: jax.block_until_ready(c(p, x))
        if args.torch:
            fns.update(torch_conv_fns(params, x))
        named = {f"{impl}/{label}": fn for (impl, label), fn in fns.items()}
        timings = common.interleaved(named, args.repeats, warmup=1, log=False)
        out[name] = {
            impl: {lb: timings[f"{impl}/{lb}"]["seconds_median"] for i, lb in fns if i == impl}
            for impl in dict.fromkeys(i for i, _ in fns)
        }
        print(f"    conv {name}: " + "; ".join(
            f"{impl} fwd {v['forward']:.3f} s, fwd+bwd {v['forward_backward']:.3f} s"
            for impl, v in out[name].items()
        ))  # fmt: skip
    totals = {
        impl: {
            label: dims["stages"] * sum(conv[impl][label] for conv in out.values())
            for label in ("forward", "forward_backward")
        }
        for impl in dict.fromkeys(i for i, _ in fns)
    }
    return {"per_conv_seconds": out, "all_stages_seconds": totals}


def torch_conv_fns(params: dict, x) -> dict:
    """PyTorch's Conv2d on the same weights and input, through `conv2d_nhwc` as the twin does."""
    import numpy as np
    import torch

    from clipsam_jax.torch_ref.umci import conv2d_nhwc

    kernel = np.asarray(params["params"]["kernel"])  # (3, 3, in, out)
    conv = torch.nn.Conv2d(kernel.shape[2], kernel.shape[3], 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
        conv.bias.zero_()
    inputs = torch.from_numpy(np.array(x))

    def forward():
        with torch.no_grad():
            return conv2d_nhwc(conv, inputs)

    def forward_backward():
        conv.zero_grad(set_to_none=True)
        leaf = inputs.detach().requires_grad_()
        (conv2d_nhwc(conv, leaf) ** 2).sum().backward()
        return leaf.grad

    return {("torch", "forward"): forward, ("torch", "forward_backward"): forward_backward}


def profile_summary(seconds: dict, convs: dict) -> dict:
    """Shares of the step: derived numbers (differences of medians, so only roughly additive)."""
    med = {k: v["seconds_median"] for k, v in seconds.items()}
    convs_fwd, convs_fwd_bwd = convs["forward"], convs["forward_backward"]
    step = med["value_and_grad"] + med["optax_update"]
    return {
        "step_estimate_s (value_and_grad + optax_update)": step,
        "forward_s": med["forward"],
        "loss_share_of_forward_loss (forward_loss - forward)": med["forward_loss"] - med["forward"],
        "loss_SxS_value_and_grad_s (all stages, on given logits)": med[
            "loss_image_SxS_value_and_grad"
        ],
        "loss_SxS_fraction_of_step": med["loss_image_SxS_value_and_grad"] / step,
        "grid_loss_saving_s (value_and_grad: image - grid)": med["value_and_grad"]
        - med["value_and_grad_grid_loss"],
        "optax_update_fraction_of_step": med["optax_update"] / step,
        "convs_forward_s (all stages, measured alone)": convs_fwd,
        "convs_forward_backward_s (all stages, measured alone)": convs_fwd_bwd,
        "convs_fraction_of_step": convs_fwd_bwd / step,
    }


# -------------------------------------------------------------------------------- report


def table_rows(cases: dict) -> list[dict]:
    rows = []
    for key, case in cases.items():
        steps = case.get("steps")
        if not steps:
            continue
        for name, run in steps["runs"].items():
            ratio = steps.get("ratio_jax_over_torch", {}).get(name, {})
            rows.append({
                "case": key, "variant": name, "s/step": run["seconds_median"],
                "steps/s": run["steps_per_second"], "ratio": ratio.get("median_of_pairwise"),
                "compile": steps["compile_seconds"].get(name),
                "mem": steps["memory_first_step_mib"][name].get("rise_over_start_mib"),
            })  # fmt: skip
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    flags = common.start_cpu_run(args.xla_flags, args.torch_threads)
    import torch

    report = common.open_report(args.out, args.append, {
        "benchmark": "UMCI training step (forward, focal + dice at S×S, backward, AdamW): "
        "jitted JAX (3 conv formulations) vs the PyTorch twin, float32, CPU",
        "note": f"{common.RANDOM_WEIGHTS_NOTE}; random float16 features, random masks. "
        + ("TINY --quick sizes. " if args.quick else "Full size. ")
        + "Wall clock, in-process, medians over interleaved rounds (few: full-size steps take "
        "seconds) on a shared machine (other processes' load in loadavg_*); ratio = JAX time / "
        "PyTorch time, median of per-round ratios. memory_first_step_mib: peak RSS (VmHWM, "
        "reset before each variant) during its setup, compile and first step.",
    })  # fmt: skip
    report["settings"] = {
        **args.dims, "repeats": args.repeats, "warmup": args.warmup,
        "impls": args.impls, "torch_threads": torch.get_num_threads(), "xla_flags": flags,
        "loss": f"{loss_config(args.dims)} (4 stages: the default LossConfig)",
        "optimizer": "AdamW lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0.01",
        "library_auto_conv_impl_on_cpu": _auto_impl(),
    }  # fmt: skip
    print(f"xla flags {flags!r}; torch threads {torch.get_num_threads()}; dims {args.dims}")
    for size in args.sizes:
        key = f"S{size}_B{args.dims['batch']}" + (f"_{args.tag}" if args.tag else "")
        case = report["cases"].setdefault(key, {})
        case.update(image_size=size, grid=size // PATCH, batch=args.dims["batch"], tag=args.tag)
        case.update(xla_flags=flags, torch_threads=torch.get_num_threads(), date=common.now())
        batch = make_batch(args.dims, size, args.seed)
        params = initial_params(args.dims, batch, args.seed)
        print(f"[{key}] grid {size // PATCH}, load {common.loadavg()}", flush=True)
        if args.steps:
            case["steps"] = bench_steps(args.dims, size, params, batch, args)
            common.write_json(args.out, report)
        if args.profile:
            case["profile"] = bench_profile(args.dims, params, batch, args)
        if args.profile or args.convs:
            impls = list(dict.fromkeys([args.profile_impl, *args.impls]))
            case["convs"] = bench_convs(args.dims, impls, batch, args)
            case.get("profile", {}).pop("convs", None)  # older layout kept them there
        if "profile" in case and "convs" in case:
            convs = case["convs"]["all_stages_seconds"][case["profile"]["conv_impl"]]
            case["profile"]["summary"] = profile_summary(case["profile"]["seconds"], convs)
        del batch, params
        gc.collect()
    report["process_ru_maxrss_kib"] = common.ru_maxrss_kib()
    common.write_json(args.out, report)
    print(f"\n{report['machine']['label']}; random weights; float32; median of "
          f"{args.repeats} interleaved steps after {args.warmup} warm-up")  # fmt: skip
    columns = [("case", "case"), ("variant", "variant"), ("s/step", "s/step"),
               ("steps/s", "steps/s"), ("JAX/torch", "ratio"), ("compile s", "compile"),
               ("MiB 1st step", "mem")]  # fmt: skip
    common.print_table(table_rows(report["cases"]), columns)
    for key, case in report["cases"].items():
        if "profile" in case:
            print(f"{key} profile ({case['profile']['conv_impl']}):")
            for name, value in case["profile"]["summary"].items():
                print(f"  {name}: {value:.3g}")


def _auto_impl() -> str:
    from clipsam_jax.models.layers import resolve_conv_impl

    return resolve_conv_impl("auto")


if __name__ == "__main__":
    sys.exit(main())
