"""Minor page faults per call of a jitted function with a large temporary buffer, on CPU.

    python benchmarks/xla_page_faults.py           # temporaries of 0.5, 1 and 2 GiB
    python benchmarks/xla_page_faults.py --quick   # small sizes: checks the script

XLA's CPU runtime maps each execution's temporary buffer afresh, so every call touches (and the
kernel zeroes) all of its pages again: faults per call ≈ temporary bytes / 4 KiB. PyTorch's
large allocations (glibc malloc, mmap above its threshold) fault the same way; what differs in
the training step is how much memory is live. This is why a smaller live set speeds up the
training step on CPU (benchmarks/RESULTS.md, "The training step on CPU").
"""

from __future__ import annotations

import argparse
import resource
import tempfile
from pathlib import Path

import common

common.setup_path()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", default="512,1024,2048", help="temporary sizes (MiB)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    return parser.parse_args(argv)


def faults_per_call(fn, repeats: int) -> float:
    fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / repeats


def main(argv=None) -> None:
    args = parse_args(argv)
    common.start_cpu_run(None, None)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    side = 512 if args.quick else 4096  # x is side × side float32
    sizes = [4, 8] if args.quick else [int(s) for s in args.sizes_mib.split(",")]
    x_np = np.ones((side, side), np.float32)
    x, x_torch = jnp.asarray(x_np), torch.from_numpy(x_np)
    cases = {}
    for mib in sizes:
        copies = max(1, mib * 2**20 // x_np.nbytes)  # the temporary: `copies` scaled copies of x

        @jax.jit
        def jax_fn(x, copies=copies):
            stacked = jnp.concatenate([x * (i + 1) for i in range(copies)], axis=0)
            return (stacked @ x[:, :8]).sum()

        def torch_fn(copies=copies):
            stacked = torch.cat([x_torch * (i + 1) for i in range(copies)], dim=0)
            return (stacked @ x_torch[:, :8]).sum()

        temp = jax_fn.lower(x).compile().memory_analysis().temp_size_in_bytes
        cases[f"{mib}MiB"] = {
            "xla_temp_bytes": temp,
            "jax_faults_per_call": faults_per_call(
                lambda f=jax_fn: f(x).block_until_ready(), args.repeats
            ),
            "torch_faults_per_call": faults_per_call(torch_fn, args.repeats),
            "pages_in_xla_temp": temp / 4096,
        }
        print(f"[{mib} MiB] {cases[f'{mib}MiB']}", flush=True)
    report = common.open_report(None, False, {
        "benchmark": "minor page faults per call: XLA CPU temporary buffer vs PyTorch",
        "note": "ones((side, side)) stacked copies; faults counted by getrusage(ru_minflt)"
        + (". QUICK RUN: small sizes" if args.quick else ""),
        "settings": {"side": side, "repeats": args.repeats},
    })  # fmt: skip
    report["cases"] = cases
    default = Path(tempfile.gettempdir()) if args.quick else common.RESULTS
    common.write_json(args.out or default / "xla_page_faults_cpu.json", report)


if __name__ == "__main__":
    main()
