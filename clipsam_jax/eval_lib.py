"""Evaluation of the full pipeline (docs/method.md §4, §5, §7): `evaluate(config)`.

Per class: images → CLIP + head rough maps O → MMR with SAM (prompts, masks, Eq. 9 fusion) →
metrics of the rough and the final maps over all the class's pixels → per-class table with the
unweighted mean, `metrics.json`, optional maps and panels. Each finished class is recorded under
`OUTPUT/classes/`, so an interrupted evaluation resumes with the classes still missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from tqdm.auto import tqdm

from clipsam_jax import config as config_lib
from clipsam_jax import options
from clipsam_jax.config import DEFAULT_RUNTIME, EvalConfig, RuntimeConfig
from clipsam_jax.data.pipeline import BatchLoader
from clipsam_jax.data.registry import load_dataset, reference_candidates, reference_split
from clipsam_jax.data.types import Dataset, Sample
from clipsam_jax.engine import Callback, RefinedBatch, notify, refined_batches
from clipsam_jax.errors import ConfigError
from clipsam_jax.few_shot import choose_references, reference_images
from clipsam_jax.inference import RoughMapModel, check_inputs, load_rough_map_model
from clipsam_jax.metrics import compute_metrics
from clipsam_jax.metrics.report import format_table, mean_over_classes
from clipsam_jax.outputs import hold, png_bytes, write_atomic
from clipsam_jax.parallel.processes import gather_rows, is_primary, process_share
from clipsam_jax.refine.registry import Refiner, build_refiner
from clipsam_jax.visualize import panel

logger = logging.getLogger(__name__)

# Cross-dataset protocol (docs/method.md §3): the head evaluated on X was trained on OTHER[X].
TRAINED_ON = {"mvtec": "visa", "visa": "mvtec", "mtd": "mvtec", "ksdd2": "mvtec", "meta": "mvtec"}
TABLE_COLUMNS = ("pixel_auroc", "pixel_f1_max", "pixel_ap", "pro")


def resolve_paths(config: EvalConfig) -> EvalConfig:
    """Defaults: data/<dataset>, runs/<training dataset>, results/<dataset>."""
    return dataclasses.replace(
        config,
        data_root=config.data_root or f"data/{config.dataset}",
        checkpoint=None
        if config.no_umci
        else (config.checkpoint or f"runs/{TRAINED_ON[config.dataset]}"),
        output=config.output or f"results/{config.dataset}",
    )


def _json_safe(values: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()}


# Bumped when a metric's definition changes, so that class records of an older definition are
# recomputed rather than mixed in (2: image score = the final map's pre-Norm peak, image label =
# the dataset's annotation).
METRICS_DEFINITION = 2


def _class_key(config: EvalConfig, model: RoughMapModel) -> str:
    """Identity of a class result: everything that changes the maps or their metrics, not
    where they go."""
    values = config_lib.identity(dataclasses.replace(config, output=None, classes=None))
    values["metrics_definition"] = METRICS_DEFINITION
    values["clip_fingerprint"] = model.clip.fingerprint
    values["head"] = None if model.head_config is None else dataclasses.asdict(model.head_config)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_panel(folder: Path, name: str, index: int, batch: dict, i: int, rough: np.ndarray,
                final: np.ndarray | None, mask: np.ndarray, result) -> None:  # fmt: skip
    """The evaluation panel of image `i` of `batch` (docs/method.md §7) as a PNG."""
    r = result
    picture = panel(batch["rgb"][i], rough.astype(np.float32),
                    None if final is None else final.astype(np.float32), mask,
                    boxes=r and r.prompts.boxes, points=r and r.prompts.points,
                    masks=r and r.masks, scores=r and r.scores,
                    title=f"{name} / {Path(batch['paths'][i]).name}")  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / f"{index:04d}_{Path(batch['paths'][i]).stem}.png", png_bytes(picture))


def _panel_indices(samples: list[Sample], count: int) -> set[int]:
    anomalous = [i for i, s in enumerate(samples) if s.label]
    normal = [i for i, s in enumerate(samples) if not s.label]
    return set((anomalous + normal)[:count])


def _class_entry(samples: list[Sample]) -> dict:
    return {"n_images": len(samples), "n_anomalous": int(sum(s.label for s in samples))}


class ClassMaps(NamedTuple):
    """One class's maps as evaluated (or one batch of them): `rough`, `final` (None without
    SAM) float16 (N, S, S), `masks` bool (N, S, S) for the pixel metrics; for the image metrics
    (docs/method.md §5.2) `labels` bool (N,), the dataset's annotation (`Sample.label`, not
    the resized mask, where a small defect can vanish), and the image scores `rough_scores`
    float16 (N,) (each rough map's maximum) and `final_scores` float32 (N,) (each fused map's
    peak before Norm; None without SAM)."""

    rough: np.ndarray
    final: np.ndarray | None
    masks: np.ndarray
    labels: np.ndarray
    rough_scores: np.ndarray
    final_scores: np.ndarray | None

    def stages(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{"rough": (maps, image scores)[, "final": (maps, image scores)]}."""
        stages = {"rough": (self.rough, self.rough_scores)}
        if self.final is not None:
            stages["final"] = (self.final, self.final_scores)
        return stages


@dataclasses.dataclass(frozen=True)
class ClassRun:
    """What the classes of one evaluation share: the stages, the config, the output folder,
    whether to show progress, and the callbacks (`engine.Callback`)."""

    model: RoughMapModel
    refiner: Refiner | None
    config: EvalConfig
    output: Path
    progress: bool = True
    callbacks: Sequence[Callback] = ()
    references: Mapping[str, Sequence[Sample]] = dataclasses.field(default_factory=dict)


def evaluate_class(name: str, samples: list[Sample], run: ClassRun) -> dict:
    """Rough (and final) maps of one class, their metrics, and the requested files."""
    if run.config.metrics == "streaming":
        return _evaluate_class_streaming(name, samples, run)
    return class_result(name, samples, class_maps(name, samples, run), run.config, run.output)


def _class_batches(
    name: str, samples: list[Sample], run: ClassRun
) -> Iterator[tuple[RefinedBatch, ClassMaps]]:
    """The class's batches through `engine.refined_batches`, each with its maps, masks, labels
    and image scores as evaluated (`ClassMaps` of the batch), after its panels are written and
    the callbacks told. Maps are kept in float16, as saved with --save-maps, so saved maps
    reproduce metrics.json exactly (the rounding moves AUROC by < 1e-4)."""
    config = run.config
    share = process_share(len(samples))  # every image in a one-process run
    # Process 0 draws the panels, from its own share of the images.
    chosen = _panel_indices([samples[i] for i in share], config.visualize_per_class)
    panels = {int(share[i]) for i in chosen} if is_primary() else set()
    size = run.model.clip.image_size
    if name in run.references:  # few-shot: the class's memory bank, before its first batch
        images = reference_images(run.references[name], size)
        run.model.set_references(name, images, config.few_shot.weight)
    # uint8 images: normalized on the device (a quarter of the bytes to copy there).
    loader = BatchLoader([samples[i] for i in share], size, config.batch_size, keep_rgb=True,
                         normalized=False)  # fmt: skip
    # Indices in the class, not in the share: MMR's seeds and the maps' rows follow them.
    batches = ({**batch, "indices": share[batch["indices"]]} for batch in loader)
    steps = refined_batches(batches, run.model, run.refiner, config.refine, config.seed)
    with (
        tqdm(total=len(share), desc=name, unit="img", disable=not run.progress) as bar,
        contextlib.ExitStack() as cleanup,
    ):
        cleanup.callback(run.model.set_references, name, None)  # one class's bank at a time
        for step in steps:
            rough, final = step.rough.astype(np.float16), step.finals()
            final = None if final is None else final.astype(np.float16)
            for i, index in enumerate(step.batch["indices"]):
                if index in panels:
                    _save_panel(run.output / "panels" / name, name, int(index), step.batch, i,
                                rough[i], None if final is None else final[i],
                                step.batch["masks"][i], step.results[i])  # fmt: skip
            notify(run.callbacks, "on_batch", name, step)
            # The rough score is the max of the float16 map as scored (rounding is monotonic,
            # so rounding the float32 maximum gives it without another pass over the maps).
            yield step, ClassMaps(rough, final, step.batch["masks"],
                                  np.asarray(step.batch["labels"]).astype(bool),
                                  step.rough_scores().astype(np.float16),
                                  step.final_scores())  # fmt: skip
            bar.update(len(step.batch["indices"]))


def class_maps(name: str, samples: list[Sample], run: ClassRun) -> ClassMaps:
    """The rough (and final) maps of one class, its masks, labels and image scores, writing its
    panels. Over several processes each makes its share's, and all get the whole class."""
    size, share = run.model.clip.image_size, process_share(len(samples))
    count = len(share)
    sam = run.refiner is not None
    rough = np.zeros((count, size, size), np.float16)
    final = np.zeros((count, size, size), np.float16) if sam else None
    masks = np.zeros((count, size, size), bool)
    labels = np.zeros(count, bool)
    rough_scores = np.zeros(count, np.float16)
    final_scores = np.zeros(count, np.float32) if sam else None
    for step, batch in _class_batches(name, samples, run):
        rows = np.searchsorted(share, step.batch["indices"])  # class indices → share rows
        rough[rows], masks[rows], labels[rows] = batch.rough, batch.masks, batch.labels
        rough_scores[rows] = batch.rough_scores
        if final is not None:
            final[rows], final_scores[rows] = batch.final, batch.final_scores
    maps = ClassMaps(rough, final, masks, labels, rough_scores, final_scores)
    return ClassMaps(**gather_rows(maps._asdict(), len(samples)))


def class_result(
    name: str, samples: list[Sample], maps: ClassMaps, config: EvalConfig, output: Path
) -> dict:
    """Exact metrics of one class's maps (and maps/<class>.npz with --save-maps)."""
    entry = _class_entry(samples)
    # The two stages' metrics in parallel: their sorts and reductions release the GIL, and
    # they are host time during which the accelerator idles (0.13 s per stage for a 20-image
    # class at 518², 1.2 s for 200 images). Their temporaries (about 325 MiB per 200 maps of
    # 518²) are then held twice at once; the maps themselves are not copied.
    stages = maps.stages()
    with ThreadPoolExecutor(len(stages), thread_name_prefix="metrics") as pool:
        futures = {stage: pool.submit(compute_metrics, values, maps.masks, config.pro_mode,
                                      image_scores=scores, labels=maps.labels)
                   for stage, (values, scores) in stages.items()}  # fmt: skip
    result = {stage: {**_json_safe(future.result()), **entry} for stage, future in futures.items()}
    if config.save_maps:
        # With the image scores and labels, compute_metrics(npz[stage], npz["masks"],
        # image_scores=npz[stage + "_scores"], labels=npz["labels"]) is metrics.json's entry.
        arrays = {
            "rough": maps.rough,
            "rough_scores": maps.rough_scores,
            "masks": maps.masks,
            "labels": maps.labels,
            "paths": np.array([str(s.image_path) for s in samples]),
        }
        if maps.final is not None:
            arrays["final"], arrays["final_scores"] = maps.final, maps.final_scores
        (output / "maps").mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        write_atomic(output / "maps" / f"{name}.npz", buffer.getvalue())
    return result


def _evaluate_class_streaming(name: str, samples: list[Sample], run: ClassRun) -> dict:
    """`evaluate_class` in constant memory: binned APPROXIMATE pixel metrics (exact image
    metrics, from the same image scores and labels as the exact path), no saved maps; for
    classes too large to hold their maps."""
    config = run.config
    if config.save_maps:
        raise ConfigError("--save-maps needs --metrics exact (streaming keeps no maps)")
    if config.pro_mode != "mvtec":
        raise ConfigError("--metrics streaming computes PRO in the mvtec definition only")
    from clipsam_jax.metrics.streaming import StreamingPixelMetrics

    stages = {"rough": StreamingPixelMetrics()}
    if run.refiner is not None:
        stages["final"] = StreamingPixelMetrics()
    for _, batch in _class_batches(name, samples, run):
        for stage, (values, scores) in batch.stages().items():
            stages[stage].update(values, batch.masks, image_scores=scores, labels=batch.labels)
    entry = {**_class_entry(samples), "exact": False}
    return {stage: {**_json_safe(acc.compute()), **entry} for stage, acc in stages.items()}


def _nan(metrics: dict) -> dict:
    """None (NaN in metrics.json) back to NaN, for the means and the tables."""
    return {k: (math.nan if v is None else v) for k, v in metrics.items()}


def _summaries(per_class: dict[str, dict], stage: str) -> dict:
    classes = {name: r[stage] for name, r in per_class.items()}
    counts = ("n_images", "n_anomalous", "exact")
    numeric = {n: {k: v for k, v in _nan(m).items() if k not in counts} for n, m in classes.items()}
    return {"classes": classes, "mean": _json_safe(mean_over_classes(numeric))}


def evaluate(
    config: EvalConfig,
    *,
    runtime: RuntimeConfig = DEFAULT_RUNTIME,
    progress: bool = True,
    model: RoughMapModel | None = None,
    refiner=None,
    callbacks: Sequence[Callback] = (),
) -> dict:
    """Run the evaluation described by `config`; returns the content of metrics.json.

    With a trained head the CLIP settings come from its checkpoint except those named in
    `config.clip_given` (e.g. ("image_size",)). `model` / `refiner` inject prebuilt stages.
    `callbacks` observe the run (`engine.Callback`: class start and end, every batch).
    `runtime` says how fast and where (not what) it computes; metrics.json records it.
    """
    options.check(config)  # the flags' rules, for configs built in code too
    options.check(runtime)
    if jax.process_count() > 1 and config.metrics == "streaming":
        raise ConfigError("--metrics streaming runs in one process; use --metrics exact across "
                          "processes")  # fmt: skip
    config = resolve_paths(config)
    if model is None:
        check_inputs(config.clip, config.checkpoint, config.no_umci, config.clip_given,
                     config.refine.sam_checkpoint, config.refine.sam != "none")  # fmt: skip
    if config.few_shot.shots:
        reference_split(config.dataset)  # a dataset without references fails before loading
    dataset = load_dataset(config.dataset, config.data_root, classes=config.classes)
    references = choose_class_references(config, dataset)
    if refiner is None:  # before CLIP: a missing SAM checkpoint fails at once
        refiner = build_refiner(config.refine, runtime)
    model = model or load_rough_map_model(config.clip, config.checkpoint, config.no_umci,
                                          config.batch_size, config.clip_given, runtime)  # fmt: skip
    if model.clip_config is not None:
        config = dataclasses.replace(config, clip=model.clip_config)  # what actually ran
    output = Path(config.output)
    if not is_primary():  # another process of a multi-process run: maps only, no files
        return _evaluate_share(config, dataset, model, refiner, references, callbacks)
    with hold(output, "evaluation"):  # one live evaluation per output folder
        (output / "classes").mkdir(parents=True, exist_ok=True)
        key = _class_key(config, model)
        per_class = _recorded_classes(config, output, dataset, key)
        for name in per_class:
            logger.info("%s: reusing the result in classes/%s.json", name, name)
        todo = [name for name in sorted(dataset) if name not in per_class]

        def keep(name: str, result: dict) -> None:
            notify(callbacks, "on_class_end", name, result)
            per_class[name] = result
            record = output / "classes" / f"{name}.json"
            write_atomic(record, json.dumps({"key": key, "result": result}, indent=2))

        run = ClassRun(model, refiner, config, output, progress, tuple(callbacks), references)
        if overlap_classes(config, runtime):
            _evaluate_overlapped(todo, dataset, run, keep)
        else:
            for name in todo:
                notify(callbacks, "on_class_start", name, dataset[name])
                keep(name, evaluate_class(name, dataset[name], run))
        per_class = {name: per_class[name] for name in sorted(per_class)}

        report = {
            "dataset": config.dataset,
            "pro_mode": config.pro_mode,
            "metrics_mode": "exact"
            if config.metrics == "exact"
            else "streaming (binned, approximate)",
            "config": config_lib.to_dict(config),
            "runtime": config_lib.to_dict(runtime),
            "head": "zero-shot"
            if model.head_config is None
            else dataclasses.asdict(model.head_config),
            "checkpoint_step": model.checkpoint_step,
            "rough": _summaries(per_class, "rough"),
        }
        if refiner is not None:
            report["final"] = _summaries(per_class, "final")
        if references:
            root = Path(config.data_root)
            report["few_shot"] = {
                "shots": config.few_shot.shots, "weight": config.few_shot.weight,
                "references": {name: [_relative(s.image_path, root) for s in chosen]
                               for name, chosen in sorted(references.items())},
            }  # fmt: skip
        write_atomic(output / "metrics.json", json.dumps(report, indent=2))
        rows = {stage: {n: _nan(r[stage]) for n, r in per_class.items()} for stage in report
                if stage in ("rough", "final")}  # fmt: skip
        markdown, csv = format_table(rows["rough"], rows.get("final"), columns=TABLE_COLUMNS)
        write_atomic(output / "table.md", markdown)
        write_atomic(output / "table.csv", csv)
        return report


def _recorded_classes(config: EvalConfig, output: Path, dataset: Dataset, key: str) -> dict:
    """{class: result} of the classes of `dataset` already recorded in `output` under `key`
    (with their maps file where asked): those a rerun reuses."""
    recorded = {}
    for name in sorted(dataset):
        record = output / "classes" / f"{name}.json"
        if not record.is_file():
            continue
        saved = json.loads(record.read_text())
        maps_ok = not config.save_maps or (output / "maps" / f"{name}.npz").is_file()
        if saved.get("key") == key and maps_ok:
            recorded[name] = saved["result"]
    return recorded


def _evaluate_share(config: EvalConfig, dataset: Dataset, model: RoughMapModel, refiner,
                    references: dict, callbacks: Sequence[Callback]) -> dict:  # fmt: skip
    """A process other than 0: its share of every class process 0 will compute (the same
    classes: the records process 0 reads), handed over in `class_maps`' gather."""
    key = _class_key(config, model)
    output = Path(config.output)
    run = ClassRun(model, refiner, config, output, False, tuple(callbacks), references)
    recorded = _recorded_classes(config, output, dataset, key)
    todo = [name for name in sorted(dataset) if name not in recorded]
    for name in todo:
        class_maps(name, dataset[name], run)
    return {"process": jax.process_index(), "classes": todo}


def choose_class_references(config: EvalConfig, dataset: Dataset) -> dict[str, list[Sample]]:
    """The few-shot references of each class ({} for zero-shot): `config.few_shot.shots` of
    the dataset's normal training images, drawn by `config.seed`, never a tested image."""
    shots = config.few_shot.shots
    if not shots:
        return {}
    candidates = reference_candidates(config.dataset, config.data_root, classes=sorted(dataset))
    tested = [s.image_path for samples in dataset.values() for s in samples]
    return {name: choose_references(candidates.get(name, []), shots, config.seed, name, tested)
            for name in sorted(dataset)}  # fmt: skip


def _relative(path: Path, root: Path) -> str:
    """`path` relative to the dataset folder where it lies inside it, else as given."""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def overlap_classes(config: EvalConfig, runtime: RuntimeConfig) -> bool:
    """Whether `evaluate` computes a class's metrics while the next class's maps are made:
    runtime.overlap_classes, "auto" = on accelerators (exact metrics only)."""
    if config.metrics != "exact" or runtime.overlap_classes == "off":
        return False
    if runtime.overlap_classes == "on":
        return True
    import jax

    return jax.default_backend() != "cpu"


def _evaluate_overlapped(todo: list[str], dataset, run: ClassRun, keep) -> None:
    """`evaluate_class` of each class in `todo`, a class's metrics (host threads) running while
    the next class's maps are computed (accelerator), so neither waits for the other; at most
    two classes' maps are held. `keep(name, result)` records each class in order; a failure
    records the classes finished before it, then raises."""
    with ThreadPoolExecutor(1, thread_name_prefix="class-metrics") as scorer:
        pending = None  # (name, future) of the class being scored

        def settle() -> None:
            nonlocal pending
            if pending is not None:
                name, future = pending
                pending = None
                keep(name, future.result())

        try:
            for name in todo:
                samples = dataset[name]
                notify(run.callbacks, "on_class_start", name, samples)
                maps = class_maps(name, samples, run)
                settle()
                job = scorer.submit(class_result, name, samples, maps, run.config, run.output)
                pending = (name, job)
                del maps
            settle()
        except BaseException:
            if pending is not None and pending[1].exception() is None:
                settle()  # a failure in the next class keeps the one already scored
            raise
