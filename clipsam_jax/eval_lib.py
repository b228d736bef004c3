"""Evaluation of the full pipeline (SPEC §4, §5, §7): `evaluate(config)`.

Per class: images → CLIP + head rough maps O → MMR with SAM (prompts, masks, Eq. 9 fusion) →
metrics of the rough and the final maps over all the class's pixels → per-class table with the
unweighted mean, `metrics.json`, optional maps and panels. Each finished class is recorded under
`OUTPUT/classes/`, so an interrupted evaluation resumes with the classes still missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from clipsam_jax import config as config_lib
from clipsam_jax.config import EvalConfig, RefineConfig
from clipsam_jax.data.pipeline import BatchLoader
from clipsam_jax.data.registry import load_dataset
from clipsam_jax.data.types import Sample
from clipsam_jax.errors import ConfigError
from clipsam_jax.inference import RoughMapModel, load_rough_map_model, rough_maps_ahead
from clipsam_jax.metrics import compute_metrics
from clipsam_jax.metrics.report import format_table, mean_over_classes
from clipsam_jax.refine.fusion import mmr_seeded
from clipsam_jax.visualize import panel

logger = logging.getLogger(__name__)

# Cross-dataset protocol (SPEC §3): the head evaluated on X was trained on OTHER[X].
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


def build_refiner(config: RefineConfig):
    """The SAM refiner of `config.sam`, or None for `--sam none` (rough maps only)."""
    if config.sam == "none":
        return None
    from clipsam_jax.refine.sam import SamRefiner  # torch is imported only when SAM is used

    return SamRefiner.from_config(
        config,
        autocast=config.sam_dtype,
        max_images_per_call=config.sam_images_per_call,
        attention=config.sam_attention,
    )


def _json_safe(values: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()}


def _class_key(config: EvalConfig, model: RoughMapModel) -> str:
    """Identity of a class result: everything that changes the maps, not where they go."""
    values = config_lib.to_dict(dataclasses.replace(config, output=None, classes=None))
    del values["overlap_classes"]  # scheduling only
    values["clip_fingerprint"] = model.clip.fingerprint
    values["head"] = None if model.head_config is None else dataclasses.asdict(model.head_config)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_panel(folder: Path, name: str, index: int, batch: dict, i: int, rough: np.ndarray,
                final: np.ndarray | None, mask: np.ndarray, result) -> None:  # fmt: skip
    """The evaluation panel of image `i` of `batch` (SPEC §7) as a PNG."""
    picture = panel(
        batch["rgb"][i], rough.astype(np.float32),
        None if final is None else final.astype(np.float32), mask,
        boxes=None if result is None else result.prompts.boxes,
        points=None if result is None else result.prompts.points,
        masks=None if result is None else result.masks,
        scores=None if result is None else result.scores,
        title=f"{name} / {Path(batch['paths'][i]).name}",
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(folder / f"{index:04d}_{Path(batch['paths'][i]).stem}.png")


def _panel_indices(samples: list[Sample], count: int) -> set[int]:
    anomalous = [i for i, s in enumerate(samples) if s.label]
    normal = [i for i, s in enumerate(samples) if not s.label]
    return set((anomalous + normal)[:count])


def _class_loader(samples: list[Sample], size: int, config: EvalConfig) -> BatchLoader:
    # uint8 images: normalized on the device (a quarter of the bytes to copy there).
    return BatchLoader(samples, size, config.batch_size, keep_rgb=True, normalized=False)


def _class_entry(samples: list[Sample]) -> dict:
    return {"n_images": len(samples), "n_anomalous": int(sum(s.label for s in samples))}


class ClassMaps(NamedTuple):
    """One class's maps as evaluated: `rough`, `final` (None without SAM) float16 (N, S, S),
    `masks` bool (N, S, S)."""

    rough: np.ndarray
    final: np.ndarray | None
    masks: np.ndarray


def evaluate_class(
    name: str,
    samples: list[Sample],
    model: RoughMapModel,
    refiner,
    config: EvalConfig,
    output: Path,
    progress: bool = True,
) -> dict:
    """Rough (and final) maps of one class, their metrics, and the requested files."""
    if config.metrics == "streaming":
        return _evaluate_class_streaming(name, samples, model, refiner, config, output, progress)
    maps = class_maps(name, samples, model, refiner, config, output, progress)
    return class_result(name, samples, maps, config, output)


def class_maps(
    name: str,
    samples: list[Sample],
    model: RoughMapModel,
    refiner,
    config: EvalConfig,
    output: Path,
    progress: bool = True,
) -> ClassMaps:
    """The rough (and final) maps of one class and its masks, writing its panels."""
    size = model.clip.image_size
    count = len(samples)
    rough = np.zeros((count, size, size), np.float16)
    final = np.zeros((count, size, size), np.float16) if refiner is not None else None
    masks = np.zeros((count, size, size), bool)
    panels = _panel_indices(samples, config.visualize_per_class)
    loader = _class_loader(samples, size, config)
    bar = tqdm(total=count, desc=name, unit="img", disable=not progress)

    def finish(batch: dict, maps: np.ndarray) -> None:
        """MMR, storage and panels of one batch whose rough maps are ready."""
        results = mmr_seeded(maps, batch["rgb"], refiner, config.refine, config.seed,
                             batch["indices"])  # fmt: skip
        for i, index in enumerate(batch["indices"]):
            # Maps are kept in float16, as saved with --save-maps, so saved maps reproduce
            # metrics.json exactly (the rounding moves AUROC by < 1e-4).
            rough[index], masks[index] = maps[i], batch["masks"][i]
            if results[i] is not None:
                final[index] = results[i].final
            if index in panels:
                _save_panel(output / "panels" / name, name, int(index), batch, i, rough[index],
                            None if final is None else final[index], masks[index], results[i])  # fmt: skip
        bar.update(len(batch["indices"]))

    for batch, maps in rough_maps_ahead(loader, model):
        finish(batch, maps)
    bar.close()
    return ClassMaps(rough, final, masks)


def class_result(
    name: str, samples: list[Sample], maps: ClassMaps, config: EvalConfig, output: Path
) -> dict:
    """Exact metrics of one class's maps (and maps/<class>.npz with --save-maps)."""
    entry = _class_entry(samples)
    stages = {"rough": maps.rough}
    if maps.final is not None:
        stages["final"] = maps.final
    # The two stages' metrics in parallel: their sorts and reductions release the GIL, and
    # they are host time during which the accelerator idles (0.13 s per stage for a 20-image
    # class at 518², 1.2 s for 200 images). Their temporaries (about 325 MiB per 200 maps of
    # 518²) are then held twice at once; the maps themselves are not copied.
    with ThreadPoolExecutor(len(stages), thread_name_prefix="metrics") as pool:
        futures = {stage: pool.submit(compute_metrics, values, maps.masks, config.pro_mode)
                   for stage, values in stages.items()}  # fmt: skip
    result = {stage: {**_json_safe(future.result()), **entry} for stage, future in futures.items()}
    if config.save_maps:
        arrays = {
            "rough": maps.rough,
            "masks": maps.masks,
            "paths": np.array([str(s.image_path) for s in samples]),
        }
        if maps.final is not None:
            arrays["final"] = maps.final
        (output / "maps").mkdir(parents=True, exist_ok=True)
        np.savez_compressed(output / "maps" / f"{name}.npz", **arrays)
    return result


def _evaluate_class_streaming(
    name: str, samples: list[Sample], model: RoughMapModel, refiner, config: EvalConfig,
    output: Path, progress: bool,
) -> dict:  # fmt: skip
    """`evaluate_class` in constant memory: binned APPROXIMATE pixel metrics (exact image
    metrics), no saved maps; for classes too large to hold their maps (issue 6)."""
    if config.save_maps:
        raise ConfigError("--save-maps needs --metrics exact (streaming keeps no maps)")
    if config.pro_mode != "mvtec":
        raise ConfigError("--metrics streaming computes PRO in the mvtec definition only")
    from clipsam_jax.metrics.streaming import StreamingPixelMetrics

    size = model.clip.image_size
    stages = {"rough": StreamingPixelMetrics()}
    if refiner is not None:
        stages["final"] = StreamingPixelMetrics()
    panels = _panel_indices(samples, config.visualize_per_class)
    bar = tqdm(total=len(samples), desc=name, unit="img", disable=not progress)
    loader = _class_loader(samples, size, config)
    for batch, maps in rough_maps_ahead(loader, model):
        results = mmr_seeded(maps, batch["rgb"], refiner, config.refine, config.seed,
                             batch["indices"])  # fmt: skip
        rough = maps.astype(np.float16)
        stages["rough"].update(rough, batch["masks"])
        final = None
        if refiner is not None:
            final = np.stack([r.final for r in results]).astype(np.float16)
            stages["final"].update(final, batch["masks"])
        for i, index in enumerate(batch["indices"]):
            if index in panels:
                _save_panel(output / "panels" / name, name, int(index), batch, i, rough[i],
                            None if final is None else final[i], batch["masks"][i], results[i])  # fmt: skip
        bar.update(len(batch["indices"]))
    bar.close()
    entry = {**_class_entry(samples), "exact": False}
    return {stage: {**_json_safe(acc.compute()), **entry} for stage, acc in stages.items()}


def _summaries(per_class: dict[str, dict], stage: str) -> dict:
    classes = {name: r[stage] for name, r in per_class.items()}
    numeric = {n: {k: (math.nan if v is None else v) for k, v in m.items()
                   if k not in ("n_images", "n_anomalous", "exact")} for n, m in classes.items()}  # fmt: skip
    return {"classes": classes, "mean": _json_safe(mean_over_classes(numeric))}


def evaluate(
    config: EvalConfig,
    *,
    progress: bool = True,
    model: RoughMapModel | None = None,
    refiner=None,
    clip_overrides: dict | None = None,
) -> dict:
    """Run the evaluation described by `config`; returns the content of metrics.json.

    With a trained head the CLIP settings come from its checkpoint; `clip_overrides` (e.g.
    {"image_size": 336}) replaces some of them. `model` / `refiner` inject prebuilt stages.
    """
    config = resolve_paths(config)
    dataset = load_dataset(config.dataset, config.data_root, classes=config.classes)
    model = model or load_rough_map_model(
        config.clip, config.checkpoint, config.no_umci, config.batch_size, clip_overrides
    )
    if model.clip_config is not None:
        config = dataclasses.replace(config, clip=model.clip_config)  # what actually ran
    if refiner is None:
        refiner = build_refiner(config.refine)
    output = Path(config.output)
    (output / "classes").mkdir(parents=True, exist_ok=True)
    key = _class_key(config, model)
    per_class = {}
    todo = []
    for name in sorted(dataset):
        record = output / "classes" / f"{name}.json"
        if record.is_file():
            saved = json.loads(record.read_text())
            maps_ok = not config.save_maps or (output / "maps" / f"{name}.npz").is_file()
            if saved.get("key") == key and maps_ok:
                logger.info("%s: reusing the result in %s", name, record)
                per_class[name] = saved["result"]
                continue
        todo.append(name)

    def keep(name: str, result: dict) -> None:
        per_class[name] = result
        record = output / "classes" / f"{name}.json"
        record.write_text(json.dumps({"key": key, "result": result}, indent=2))

    if overlap_classes(config):
        _evaluate_overlapped(todo, dataset, model, refiner, config, output, progress, keep)
    else:
        for name in todo:
            keep(
                name, evaluate_class(name, dataset[name], model, refiner, config, output, progress)
            )
    per_class = {name: per_class[name] for name in sorted(per_class)}

    report = {
        "dataset": config.dataset,
        "pro_mode": config.pro_mode,
        "metrics_mode": "exact" if config.metrics == "exact" else "streaming (binned, approximate)",
        "config": config_lib.to_dict(config),
        "head": "zero-shot" if model.head_config is None else dataclasses.asdict(model.head_config),
        "checkpoint_step": model.checkpoint_step,
        "rough": _summaries(per_class, "rough"),
    }
    if refiner is not None:
        report["final"] = _summaries(per_class, "final")
    (output / "metrics.json").write_text(json.dumps(report, indent=2))
    rough_rows = {n: r["rough"] for n, r in per_class.items()}
    final_rows = {n: r["final"] for n, r in per_class.items()} if refiner is not None else None
    markdown, csv = format_table(_nan(rough_rows), _nan(final_rows), columns=TABLE_COLUMNS)
    (output / "table.md").write_text(markdown)
    (output / "table.csv").write_text(csv)
    return report


def overlap_classes(config: EvalConfig) -> bool:
    """Whether `evaluate` computes a class's metrics while the next class's maps are made:
    config.overlap_classes, "auto" = on accelerators (exact metrics only)."""
    if config.metrics != "exact" or config.overlap_classes == "off":
        return False
    if config.overlap_classes == "on":
        return True
    import jax

    return jax.default_backend() != "cpu"


def _evaluate_overlapped(todo, dataset, model, refiner, config, output, progress, keep) -> None:
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
                maps = class_maps(name, samples, model, refiner, config, output, progress)
                settle()
                pending = (name, scorer.submit(class_result, name, samples, maps, config, output))
                del maps
            settle()
        except BaseException:
            if pending is not None and pending[1].exception() is None:
                settle()  # a failure in the next class keeps the one already scored
            raise


def _nan(rows: dict | None) -> dict | None:
    if rows is None:
        return None
    return {n: {k: (math.nan if v is None else v) for k, v in m.items()} for n, m in rows.items()}
