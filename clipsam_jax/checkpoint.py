"""Orbax checkpoints of the trainable head: params, optimizer state, step and the run's config.

Only the head and its optimizer state are saved (the frozen CLIP params never are). Layout:
`<workdir>/checkpoints/<step>/{params,opt_state,meta}`; orbax writes each step to a temporary
folder and renames it when complete, so a run killed mid-save leaves the previous step intact.
Saves are asynchronous: training goes on while a checkpoint is written (`close` waits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from clipsam_jax.errors import CheckpointError


class HeadCheckpointer:
    """Save / restore head training state in `<workdir>/checkpoints`, keeping `max_to_keep`."""

    def __init__(self, workdir: str | Path, max_to_keep: int = 3):
        self.directory = Path(workdir).resolve() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=True)  # fmt: skip
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params: Any, opt_state: Any, meta: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def restore(
        self, step: int, params_target: Any, opt_state_target: Any
    ) -> tuple[Any, Any, dict]:
        """(params, opt_state, meta) of `step`, shaped like the given targets."""
        abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)  # noqa: E731
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract(params_target)),
                opt_state=ocp.args.StandardRestore(abstract(opt_state_target)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored["params"], restored["opt_state"], restored["meta"]

    def close(self) -> None:
        """Wait for pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def head_directory(path: str | Path, hint: str = "") -> Path:
    """The `checkpoints` folder of a training workdir (or the folder itself), or a
    `CheckpointError` saying how to train one; `hint` ends the message."""
    path = Path(path).expanduser()
    root = path.parent if path.name == "checkpoints" else path
    directory = root / "checkpoints"
    if not directory.is_dir():
        raise CheckpointError(
            f"{root}: no trained head here (expected {directory}). Train one with "
            f"`python -m train.main --train DATASET --workdir {root}`.{hint}"
        )
    return directory


def load_head(path: str | Path, step: int | None = None, hint: str = "") -> tuple[dict, dict]:
    """(params, meta) of a trained head for evaluation: `path` is a training workdir (or its
    `checkpoints` folder); the latest step unless `step` is given. No optimizer state is read.
    `hint` ends the message for a missing head (the caller's other way out).
    """
    directory = head_directory(path, hint)
    options = ocp.CheckpointManagerOptions(create=False)
    handlers = {"params": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
                "opt_state": ocp.StandardCheckpointHandler()}  # fmt: skip
    manager = ocp.CheckpointManager(directory.resolve(), options=options, item_handlers=handlers)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{directory}: holds no completed checkpoint")
        # Onto this process's first device, whatever devices saved it (a head trained over
        # several processes or GPUs is evaluated anywhere).
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        saved = manager.item_metadata(step)["params"]
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              saved.tree)  # fmt: skip
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(
            f"{directory}: cannot read checkpoint step {step} ({error})"
        ) from error
    finally:
        manager.close()
    return restored["params"], restored["meta"]
