"""Training the head (Sec. 3.4, 4.1): `train(config)` runs or resumes a run in its workdir.

Cross-dataset protocol (docs/method.md §3): the head trains on the *test* split of the training dataset
(it has masks). CLIP features are computed once per image and cached on disk in float16; each
epoch visits the images in an order derived from (seed, epoch), so a resumed run replays
exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from clipsam_jax import config as config_lib
from clipsam_jax import options
from clipsam_jax.checkpoint import HeadCheckpointer
from clipsam_jax.clip.cache import BatchEncoder, FeatureCache
from clipsam_jax.clip.loading import ClipModel, load_clip, looks_local, resolve_local
from clipsam_jax.clip.prompts import TextFeatures
from clipsam_jax.config import DEFAULT_RUNTIME, RuntimeConfig, TrainConfig
from clipsam_jax.data.pipeline import BatchLoader
from clipsam_jax.data.registry import load_dataset
from clipsam_jax.data.types import Sample
from clipsam_jax.errors import ConfigError, DatasetError, NonFiniteLossError
from clipsam_jax.models.heads import check_head_fits
from clipsam_jax.models.init import init_params
from clipsam_jax.outputs import hold, write_atomic
from clipsam_jax.parallel.mesh import (
    data_mesh,
    global_batch,
    local_rows,
    pad_to,
    replicate,
    to_host,
)
from clipsam_jax.parallel.processes import is_primary
from clipsam_jax.train_step import TrainState, create_state, train_step_for

logger = logging.getLogger(__name__)

# Settings that may change between the runs of one workdir (they do not change the result of
# a step): everything else must match the saved config.json.
RESUMABLE_KEYS = (
    "data_root", "workdir", "max_steps", "checkpoint_every_steps", "max_to_keep",
    "feature_cache", "feature_cache_dir", "optim.epochs",
)  # fmt: skip


@dataclasses.dataclass
class TrainSummary:
    workdir: str
    step: int
    epochs_completed: int
    last_loss: float | None
    images_per_second: float | None
    resumed_from: int | None


def resolve_paths(config: TrainConfig) -> TrainConfig:
    """Fill the defaults `data/<dataset>`, `runs/<dataset>` and `<workdir>/../feature_cache`."""
    data_root = config.data_root or f"data/{config.dataset}"
    workdir = config.workdir or f"runs/{config.dataset}"
    cache = config.feature_cache_dir or str(Path(workdir).parent / "feature_cache")
    return dataclasses.replace(
        config, data_root=data_root, workdir=workdir, feature_cache_dir=cache
    )


def _comparable(values: dict) -> dict:
    values = json.loads(json.dumps(values))
    for key in RESUMABLE_KEYS:
        *parents, leaf = key.split(".")
        node = values
        for parent in parents:
            node = node.get(parent, {})
        node.pop(leaf, None)
    return values


def check_workdir(config: TrainConfig) -> None:
    """Refuse a workdir that cannot hold this run: a file, or a run of another config (one with
    checkpoints). Writes nothing: `train` writes config.json once the inputs have checked out,
    so a run that fails before that never blocks a corrected rerun."""
    workdir = Path(config.workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} is a file; give a folder for the run")
    folder = workdir / "checkpoints"
    trained = folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())
    saved_path = workdir / "config.json"
    if saved_path.is_file() and trained:
        saved = json.loads(saved_path.read_text())
        with contextlib.suppress(ValueError, TypeError):  # older layouts (from_dict migrates)
            saved = config_lib.to_dict(config_lib.from_dict(TrainConfig, saved))
        differences = config_lib.diff(_comparable(saved), _comparable(config_lib.to_dict(config)))
        if differences:
            raise ConfigError(
                f"{workdir} holds a run with another config; resuming it with these settings "
                "would mix two runs. Differences (saved != requested):\n  "
                + "\n  ".join(differences)
                + f"\nUse another --workdir, or delete {workdir} to start over."
            )
    elif trained:
        raise ConfigError(f"{workdir} has checkpoints but no config.json; use another --workdir")


def training_samples(config: TrainConfig) -> list[Sample]:
    """The training images: every class of the dataset's protocol split, class by class."""
    dataset = load_dataset(config.dataset, config.data_root)
    samples = [s for name in sorted(dataset) for s in dataset[name]]
    if not samples:
        raise DatasetError(f"{config.data_root}: the {config.dataset} dataset has no images")
    for name, items in sorted(dataset.items()):
        if not any(s.label for s in items):
            logger.warning("class %r has no anomalous images: it only adds negatives", name)
    if not any(s.label for s in samples):
        raise DatasetError(
            f"{config.data_root}: no anomalous image with a mask in {config.dataset}; the head "
            "learns from defect masks (train on a dataset's test split)"
        )
    return samples


class _LogFile:
    """Append-only JSON-lines training log; a resume drops the entries after its step (and a
    last line cut short by a killed run)."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if _logged_step(line) is not None
                    and _logged_step(line) <= resume_step]  # fmt: skip
            write_atomic(path, "".join(line + "\n" for line in kept))

    def write(self, entry: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(entry) + "\n")


def _logged_step(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


def _batches(
    config: TrainConfig, clip: ClipModel, samples: list[Sample], cache: FeatureCache | None,
    encode: BatchEncoder | None, epoch: int, skip: int, rows: tuple[int, int],
) -> Iterator[dict]:  # fmt: skip
    """One epoch's training batches, this process's rows [start, stop) of each (every row in
    one process): {"tokens", "masks", "class_names"} from the feature cache or (no cache /
    mosaic) by running CLIP on freshly decoded images; {} for a step where this process has no
    row (a ragged last batch), so that every process takes every step."""
    loader = BatchLoader(
        samples, clip.image_size, config.optim.batch_size, shuffle=True, seed=config.seed,
        epoch=epoch, skip_batches=skip, mosaic_prob=0.5 if config.mosaic else 0.0, rows=rows,
    )  # fmt: skip
    positions = [p[slice(*rows)] for p in loader.batch_positions()[skip:]]
    if cache is not None:
        order = loader.order()
        reads = cache.batches(samples, [order[p] for p in positions if len(p)])
    else:
        reads = (
            {"tokens": encode(batch["images"]), "masks": batch["masks"],
             "class_names": batch["class_names"]}
            for batch in loader
        )  # fmt: skip
    for p in positions:
        yield next(reads) if len(p) else {}


def _step_inputs(batch: dict, text: TextFeatures, layout: _BatchLayout) -> dict:
    """The train step's global batch from this process's rows (`_batches`), padded with rows of
    weight 0 up to the mesh's batch (a multiple of the device count)."""
    count, valid = layout.rows[1] - layout.rows[0], len(batch.get("class_names", ()))

    def place(local, shape: tuple[int, ...], dtype) -> jax.Array:
        rows = np.zeros((count, *shape), dtype)
        if valid:
            rows[:valid] = local
        return global_batch(rows, layout.mesh, layout.global_rows)

    grid, size = layout.grid, layout.image_size
    tokens = batch.get("tokens", [None] * layout.num_stages)
    names = batch.get("class_names", [])
    return {
        "tokens": tuple(place(t, (grid, grid, layout.feature_dim), layout.token_dtype)
                        for t in tokens),
        "masks": place(batch.get("masks"), (size, size), bool),
        "text": place(text.batch(names) if valid else None, layout.text_shape, np.float32),
        "weights": place(np.ones(valid, np.float32), (), np.float32),
    }  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _BatchLayout:
    """How a training batch lies on the devices: `mesh` (every device of every process), the
    padded `global_rows` and this process's `rows` [start, stop) of them; the arrays' shapes."""

    mesh: Mesh
    global_rows: int
    rows: tuple[int, int]
    grid: int
    image_size: int
    feature_dim: int
    num_stages: int
    token_dtype: np.dtype
    text_shape: tuple[int, ...]


def train(
    config: TrainConfig,
    *,
    runtime: RuntimeConfig = DEFAULT_RUNTIME,
    progress: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
    clip: ClipModel | None = None,
) -> TrainSummary:
    """Train (or resume) the head described by `config` in `config.workdir`, computing as
    `runtime` says (attention and convolution forms, cache folder: the same function).

    on_step(step, metrics) is called after every step (tests use it to simulate a crash).
    Checkpoints are written every `checkpoint_every_steps` steps, at each epoch end and when
    the run stops (`max_steps`, Ctrl-C). A non-finite loss raises `NonFiniteLossError` naming
    the step; the checkpoints already written stay intact.
    """
    options.check(config)  # the flags' rules, for configs built in code too
    options.check(runtime)
    config = resolve_paths(config)
    if clip is None and looks_local(config.clip.model):  # before the data: a mistyped --clip
        resolve_local(Path(config.clip.model).expanduser())
    check_workdir(config)
    workdir = Path(config.workdir)
    samples = training_samples(config)
    clip = clip or load_clip(
        config.clip.model, config.clip.image_size, config.clip.feature_layers,
        runtime.cache_dir, config.clip.dtype, runtime.clip_attention,
    )  # fmt: skip
    check_head_fits(config.head, clip.grid, clip.image_size)
    text = TextFeatures(clip, config.clip.templates, config.clip.object_name, runtime.cache_dir,
                        normalization=config.clip.prompt_normalization)  # fmt: skip
    if not is_primary():  # another process of a multi-process run: process 0 holds the workdir
        return _run(config, runtime, clip, text, samples, False, on_step)
    with hold(workdir, "training"):  # one live run per workdir
        check_workdir(config)  # again, under the lock: another run may have started meanwhile
        # The inputs checked out: the workdir now holds this run's config, which later runs
        # in it must match.
        write_atomic(workdir / "config.json", json.dumps(config_lib.to_dict(config), indent=2))
        return _run(config, runtime, clip, text, samples, progress, on_step)


def _run(config: TrainConfig, runtime: RuntimeConfig, clip: ClipModel, text: TextFeatures,
         samples: list[Sample], progress: bool, on_step) -> TrainSummary:  # fmt: skip
    """The training loop of `train`, in a checked and locked workdir."""
    workdir = Path(config.workdir)
    cache = None
    if config.feature_cache and not config.mosaic:
        cache = FeatureCache(config.feature_cache_dir, clip)
        built = cache.build(samples, config.optim.batch_size, progress=progress)
        logger.info("feature cache %s: %d images computed, %d reused", cache.directory, built,
                    len(samples) - built)  # fmt: skip

    encode = None if cache is not None else BatchEncoder(clip, config.optim.batch_size)
    num_stages = len(clip.feature_layers)
    head, optimizer, train_step = train_step_for(
        config.head, clip.text_dim, num_stages, config.loss, config.optim, runtime.conv_impl
    )
    grid = clip.grid
    params = init_params(
        head, config.seed, [(1, grid, grid, clip.feature_dim)] * num_stages,
        (1, 2, clip.text_dim), config.head.init,
    )  # fmt: skip
    # Data parallelism over every device of every process: the state is replicated, each batch
    # split over the devices (padded to a multiple of their count with rows of weight 0).
    mesh = data_mesh()
    global_rows = pad_to(config.optim.batch_size, mesh)
    layout = _BatchLayout(
        mesh, global_rows, local_rows(mesh, global_rows), grid, clip.image_size,
        clip.feature_dim, num_stages,
        np.dtype(np.float16 if cache is not None else clip.module.dtype), (2, clip.text_dim),
    )  # fmt: skip
    state = replicate(create_state(params, optimizer), mesh)
    checkpointer = HeadCheckpointer(workdir, config.max_to_keep)
    resumed_from = checkpointer.latest_step()
    if resumed_from is not None:
        params, opt_state, _ = checkpointer.restore(resumed_from, state.params, state.opt_state)
        step_array = replicate(np.int32(resumed_from), mesh)
        state = TrainState(step=step_array, params=params, opt_state=opt_state)
        logger.info("resuming %s from step %d", workdir, resumed_from)
    steps_per_epoch = -(-len(samples) // config.optim.batch_size)
    total_steps = steps_per_epoch * config.optim.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    primary = is_primary()  # process 0 writes the log and summary (orbax coordinates the rest)
    log = _LogFile(workdir / "train_log.jsonl", resumed_from or 0) if primary else None
    meta = {"config": config_lib.to_dict(config), "clip_fingerprint": clip.fingerprint,
            "feature_dim": clip.feature_dim, "text_dim": clip.text_dim,
            "num_stages": num_stages, "grid": grid}  # fmt: skip

    def save() -> None:
        done = int(to_host(state.step))  # the state's own step: consistent with its params
        if checkpointer.latest_step() != done:
            checkpointer.save(done, state.params, state.opt_state,
                              {**meta, "step": done, "epoch": done / steps_per_epoch})  # fmt: skip

    step = int(to_host(state.step))
    summary_path = workdir / "summary.json"
    if resumed_from is not None and step >= total_steps and summary_path.is_file():
        logger.info("%s is already trained to step %d; nothing to do", workdir, step)
        checkpointer.close()
        return TrainSummary(**json.loads(summary_path.read_text()))  # the finished run's
    last_loss, rates = None, []
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not progress)
    try:
        while step < total_steps:
            epoch, skip = divmod(step, steps_per_epoch)
            batches = _batches(config, clip, samples, cache, encode, epoch, skip, layout.rows)
            for batch in batches:
                started = time.perf_counter()
                images = min(config.optim.batch_size,
                             len(samples) - (step % steps_per_epoch) * config.optim.batch_size)  # fmt: skip
                state, metrics = train_step(state, _step_inputs(batch, text, layout))
                metrics = {k: float(to_host(v)) for k, v in metrics.items()}
                step += 1
                if not np.isfinite(metrics["loss"]):
                    raise NonFiniteLossError(
                        f"loss is {metrics['loss']} at step {step} (epoch {epoch + 1}); stopped. "
                        f"Checkpoints up to step {checkpointer.latest_step()} are intact. Lower "
                        "--lr or check the data (masks, images) of this epoch."
                    )
                rate = images / (time.perf_counter() - started)
                if step > (resumed_from or 0) + 1:  # the first step includes compilation
                    rates.append(rate)
                last_loss = metrics["loss"]
                if log is not None:
                    log.write({"step": step, "epoch": epoch + 1, **metrics,
                               "images_per_second": rate})  # fmt: skip
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{last_loss:.4f}", img_s=f"{rate:.1f}")
                if on_step is not None:
                    on_step(step, metrics)
                if step % config.checkpoint_every_steps == 0 or step % steps_per_epoch == 0:
                    save()
                if step >= total_steps:
                    break
        save()
    except KeyboardInterrupt:
        save()
        logger.warning("interrupted at step %d; checkpoint saved, rerun to resume", step)
        raise
    finally:
        bar.close()
        checkpointer.close()
    summary = TrainSummary(
        workdir=str(workdir), step=step, epochs_completed=step // steps_per_epoch,
        last_loss=last_loss, images_per_second=float(np.median(rates)) if rates else None,
        resumed_from=resumed_from,
    )  # fmt: skip
    if primary:
        write_atomic(summary_path, json.dumps(dataclasses.asdict(summary), indent=2))
    return summary
