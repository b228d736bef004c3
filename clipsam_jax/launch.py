"""`python -m clipsam_jax.launch --processes N -- MODULE ARGS...`: N local processes of one
multi-process JAX run, e.g. one per GPU of a machine, or N CPU processes for the tests.

Each process gets the variables `parallel.mesh.initialize_distributed` reads
(`JAX_COORDINATOR_ADDRESS` on 127.0.0.1, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`) and runs
`python -m MODULE ARGS...`. `--gpus-per-process K` gives process i the GPUs i·K … i·K+K−1
(`CUDA_VISIBLE_DEVICES`, so SAM's "auto" device is its own); `--cpu-devices K` makes each
process a CPU run with K virtual devices. The launcher watches them: when one fails or is
killed, it stops the others (rather than leave them waiting for it in a collective) and exits
with that process's status; `--timeout` bounds the whole run. On a cluster the scheduler sets
the same three variables on every host instead (README, "Scaling out").
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

GRACE_SECONDS = 10.0  # between SIGTERM and SIGKILL when stopping the other processes


def parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        argv.append("--")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m clipsam_jax.launch",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--processes", type=int, required=True, help="processes to start (>= 1)")
    parser.add_argument("--cpu-devices", type=int, default=None,
                        help="K virtual CPU devices per process (a CPU run: tests, laptops)")  # fmt: skip
    parser.add_argument("--gpus-per-process", type=int, default=None,
                        help="K GPUs per process, by CUDA_VISIBLE_DEVICES")  # fmt: skip
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds before every process is stopped (default: none)")  # fmt: skip
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if args.processes < 1:
        parser.error(f"--processes must be >= 1, got {args.processes}")
    for flag in ("cpu_devices", "gpus_per_process"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if not command:
        parser.error("give the command after --, e.g. -- eval.main --test visa")
    return args, command


def process_environment(args: argparse.Namespace, port: int, index: int) -> dict[str, str]:
    """The environment of process `index`."""
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES=str(args.processes), JAX_PROCESS_ID=str(index))  # fmt: skip
    if args.cpu_devices:
        flag = f"--xla_force_host_platform_device_count={args.cpu_devices}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
        env["JAX_PLATFORMS"] = "cpu"
    if args.gpus_per_process:
        first = index * args.gpus_per_process
        env["CUDA_VISIBLE_DEVICES"] = ",".join(
            map(str, range(first, first + args.gpus_per_process))
        )
    return env


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM the running ones, then SIGKILL those still alive after GRACE_SECONDS."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    end = time.monotonic() + GRACE_SECONDS
    for process in processes:
        try:
            process.wait(timeout=max(end - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _describe(status: int) -> str:
    return f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"


def main(argv: Sequence[str] | None = None) -> int:
    args, command = parse(argv)
    module, *rest = command
    port = args.port or _free_port()
    command = [sys.executable, "-m", module, *rest]
    processes = [
        subprocess.Popen(command, env=process_environment(args, port, i))
        for i in range(args.processes)
    ]
    pids = ", ".join(str(p.pid) for p in processes)
    print(f"launch: {args.processes} processes of `{' '.join(command[2:])}` (pids {pids}), "
          f"coordinator 127.0.0.1:{port}", file=sys.stderr, flush=True)  # fmt: skip
    # Stopped itself (a scheduler's SIGTERM, a test's timeout), it stops its processes first.
    signal.signal(signal.SIGTERM, _interrupt)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    try:
        while True:
            statuses = [p.poll() for p in processes]
            failed = [(i, s) for i, s in enumerate(statuses) if s not in (None, 0)]
            if failed:
                index, status = failed[0]
                print(f"launch: process {index} {_describe(status)}; stopping the other "
                      "processes", file=sys.stderr, flush=True)  # fmt: skip
                _stop(processes)
                return status if status > 0 else 1
            if all(s == 0 for s in statuses):
                return 0
            if deadline is not None and time.monotonic() > deadline:
                print(f"launch: --timeout {args.timeout:g} s reached; stopping every process",
                      file=sys.stderr, flush=True)  # fmt: skip
                _stop(processes)
                return 124
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("launch: interrupted; stopping every process", file=sys.stderr, flush=True)
        _stop(processes)
        return 130


if __name__ == "__main__":
    sys.exit(main())
