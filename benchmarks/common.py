"""Shared helpers of the benchmarks: XLA flags, machine info, an interleaved timing loop, peak
memory, tables and JSON files.

Timing is in-process: each variant is a zero-argument callable that blocks until its result is
ready (`jax.block_until_ready` for JAX). Variants run interleaved, A B C A B C ..., with the order
rotated each round, so a machine that speeds up or slows down affects every variant alike; the
summary keeps the median, and ratios are taken pair by pair (same round) before the median.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
RANDOM_WEIGHTS_NOTE = (
    "random weights (normal(0, 0.02) kernels, unit layer-norm scales, zero biases): timings "
    "only; the agreement check compares two implementations on the same random weights"
)


def setup_path() -> None:
    """Make the repository importable when a script runs as `python benchmarks/<name>.py`."""
    for path in (str(REPO), str(Path(__file__).resolve().parent)):
        if path not in sys.path:
            sys.path.insert(0, path)


def add_xla_flags(flags: str | None) -> str:
    """Append `flags` to $XLA_FLAGS; call before JAX creates its CPU backend. Returns the flags
    in effect. XLA parses them once per process, so variants needing other flags need another
    process (e.g. a second run of the script with --xla-flags)."""
    if flags:
        if "jax" in sys.modules:
            import jax._src.xla_bridge as bridge

            if bridge.backends_are_initialized():
                raise RuntimeError("XLA flags must be set before JAX initializes its backend")
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
    return os.environ.get("XLA_FLAGS", "")


def add_run_flags(parser, quick_help: str) -> None:
    """The flags every CPU comparison script shares: threads, XLA flags, appending tagged cases
    to an existing report, seed, the quick smoke mode and the output path."""
    parser.add_argument("--torch-threads", type=int, default=None, help="default: torch's")
    parser.add_argument("--xla-flags", default=None, help="appended to $XLA_FLAGS")
    parser.add_argument("--append", action="store_true", help="merge cases into --out")
    parser.add_argument("--tag", default="", help="suffix of the case keys (e.g. a flag run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=None)


def start_cpu_run(xla_flags: str | None, torch_threads: int | None) -> str:
    """Common start of the CPU benchmarks: XLA flags (before JAX starts), the repository on the
    path, PyTorch's thread count, JAX on the CPU. Returns the XLA flags in effect."""
    flags = add_xla_flags(xla_flags)
    setup_path()
    import jax
    import torch

    if torch_threads:
        torch.set_num_threads(torch_threads)
    jax.config.update("jax_platforms", "cpu")
    return flags


def open_report(path: Path | None, append: bool, header: dict) -> dict:
    """The report to fill: the one at `path` when appending (new cases join its own), else a
    fresh one from `header` (benchmark, note); machine and date are set to this run's."""
    report = (read_json(path) if append and path else None) or {**header, "cases": {}}
    report["machine"] = machine_info()
    report["date"] = now()
    return report


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def machine_info() -> dict:
    """Host, CPU, library versions and thread settings (same first keys as metrics.py)."""
    info = {
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "cpu_model": _cpu_model(),
        "label": f"CPU, {os.cpu_count()} cores, shared machine",
        "cpu_affinity": cpu_affinity(),
        "versions": {
            name: _version(name)
            for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers")
        },
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "thread_env": {
            k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ
        },
    }
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch_threads"] = torch.get_num_threads()
        info["torch_interop_threads"] = torch.get_num_interop_threads()
    if "jax" in sys.modules:
        info["jax_backend"] = sys.modules["jax"].default_backend()
    return info


def cpu_affinity() -> list[int] | None:
    """The CPUs this process may run on (e.g. restricted with `taskset -c 0`)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages (other processes on a shared machine show here)."""
    return [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------------------------------ timing


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, result) of one blocking call."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = fn()
    return time.perf_counter() - wall0, time.process_time() - cpu0, result


def summarize(
    walls: Sequence[float],
    cpus: Sequence[float] = (),
    systems: Sequence[float] = (),
    faults: Sequence[float] = (),
) -> dict:
    """Median, min, max and all wall times; medians of process CPU (user + system) and system
    (kernel: page faults of fresh buffers, thread wake-ups) seconds, and of minor page faults
    (pages touched for the first time: XLA's CPU runtime maps each call's temporary buffer
    afresh), when given."""
    out = {
        "seconds_median": statistics.median(walls),
        "seconds_min": min(walls),
        "seconds_max": max(walls),
        "seconds_all": [round(t, 4) for t in walls],
    }
    if cpus:
        out["cpu_seconds_median"] = statistics.median(cpus)
    if systems:
        out["system_cpu_seconds_median"] = statistics.median(systems)
    if faults:
        out["minor_page_faults_median"] = statistics.median(faults)
    return out


def interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, log: bool = True
) -> dict[str, dict]:
    """Time every callable `repeats` times, interleaved, after `warmup` untimed rounds.

    Returns {name: summarize(...)} plus "rounds": per round, {name: wall seconds}, which
    `pairwise_ratio` uses.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    walls: dict[str, list[float]] = {n: [] for n in names}
    cpus: dict[str, list[float]] = {n: [] for n in names}
    systems: dict[str, list[float]] = {n: [] for n in names}
    faults: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no fixed position
        for name in order:
            system0 = os.times().system
            faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            wall, cpu, _ = timed(fns[name])
            walls[name].append(wall)
            cpus[name].append(cpu)
            systems[name].append(os.times().system - system0)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0)
        if log:
            text = "  ".join(f"{n} {walls[n][-1]:.3f}s" for n in names)
            print(f"    round {r + 1}/{repeats}: {text}  (load {loadavg()[0]})", flush=True)
    out = {n: summarize(walls[n], cpus[n], systems[n], faults[n]) for n in names}
    out["rounds"] = [{n: walls[n][r] for n in names} for r in range(repeats)]
    return out


def pairwise_ratio(timings: dict, a: str, b: str) -> dict:
    """Median over rounds of time(a) / time(b) in the same round, and the ratio of medians."""
    ratios = [r[a] / r[b] for r in timings["rounds"]]
    return {
        "median_of_pairwise": statistics.median(ratios),
        "ratio_of_medians": timings[a]["seconds_median"] / timings[b]["seconds_median"],
        "pairwise": [round(x, 3) for x in ratios],
    }


# ------------------------------------------------------------------------------------ memory


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux /proc/self/clear_refs, 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def ru_maxrss_kib() -> int:
    """Peak resident memory of the whole process so far (KiB, as metrics.py records it)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss_mib() -> float:
    """Peak resident memory since the last `reset_peak_rss` (VmHWM), else since the start."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------ output


def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> None:
    """Print `rows` (dicts) as an aligned table; columns are (header, key) pairs."""
    cells = [[h for h, _ in columns]]
    for row in rows:
        cells.append([_fmt(row.get(key)) for _, key in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for i, line in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
