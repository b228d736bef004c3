"""A multi-process run in which one process dies, as a crashed host would: run by
tests/test_multiprocess.py as `python -m clipsam_jax.launch ... -- crashing_process KIND AT
ARGS...` (this folder on PYTHONPATH).

KIND "eval": eval.main with ARGS; process 1 SIGKILLs itself at its first batch of class AT,
once process 0 has recorded a class (so that the rerun has something to resume).
KIND "train": train.main with ARGS; process 1 SIGKILLs itself after step AT, once a checkpoint
is on disk.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

WAIT_SECONDS = 120.0


def _die_when(ready) -> None:
    end = time.monotonic() + WAIT_SECONDS
    while not ready() and time.monotonic() < end:
        time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    kind, at, *argv = sys.argv[1:]
    from clipsam_jax import cli
    from clipsam_jax.parallel.mesh import initialize_distributed

    initialize_distributed()
    import jax

    victim = jax.process_index() == 1
    if kind == "eval":
        from clipsam_jax.eval_lib import evaluate
        from eval.main import config_from_args, parse

        args = parse(argv)
        classes = Path(args.output) / "classes"

        class Crash:
            def on_batch(self, name, step):
                if victim and name == at:
                    _die_when(lambda: any(classes.glob("*.json")))

        evaluate(config_from_args(args), runtime=cli.runtime_from_args(args), progress=False,
                 callbacks=[Crash()])  # fmt: skip
    else:
        from clipsam_jax.train_lib import train
        from train.main import config_from_args, parse

        args = parse(argv)
        checkpoints = Path(args.workdir) / "checkpoints"

        def crash(step, metrics):
            if victim and step == int(at):
                _die_when(lambda: any(p.name.isdigit() for p in checkpoints.glob("*")))

        train(config_from_args(args), runtime=cli.runtime_from_args(args), progress=False,
              on_step=crash)  # fmt: skip


if __name__ == "__main__":
    main()
