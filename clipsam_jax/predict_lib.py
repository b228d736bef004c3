"""Anomaly maps for arbitrary images (no dataset, no ground truth): `predict(config)`.

Images (one file, or a folder scanned for IMAGE_SUFFIXES) → CLIP + head rough maps O (S×S) in
batches → MMR with SAM (docs/method.md §4; each image its own prompts, SAM batched over a batch's
images) → per image, in the output folder:

- `<name>_map.png`: the anomaly map (the final map when SAM runs, else the rough map) at the
  ORIGINAL image resolution, bilinearly resized from S×S (OpenCV INTER_LINEAR, half-pixel
  centres), stored as a 16-bit grayscale PNG with pixel = round(clip(value, 0, 1) · 65535), so
  value = pixel / 65535 to within 1/131070. `--map-format npy` writes `<name>_map.npy`, float32
  (H, W), the unquantized values (also those outside [0, 1], e.g. with `--fusion-norm none`).
- `<name>_mask.png`: 0/255 (H, W), pixels whose resized map value is strictly above the mask
  threshold (default: the refine threshold, 0.47, as Eq. 7 binarizes).
- `<name>_overlay.png`: the map's JET heatmap blended over the image.
- `<name>_result.json`: scores, box count, file names and the model settings.

`score` is the image score of docs/method.md §5.2, the one `eval.main` scores images by
(`engine.RefinedBatch.final_scores` / `rough_scores`): with SAM, the peak of the fused S×S map
BEFORE Norm (after the default Norm every refined map peaks at 1.0); without SAM, the maximum of
the S×S rough map. `rough_score` is the rough map's score (its S×S maximum, also in
`rough_grid_score`). The JSON also holds `grid_score`, the maximum of the written S×S map (after
Norm), and `map_max`, the maximum of the saved map at the original resolution (bilinear
upsampling never exceeds the grid's maximum).

`<name>` is the input file's stem; with `recursive`, sub-folders are joined in with "__"
(`a/b/x.png` → `a__b__x`), and names that still collide (case-insensitively: `x.png` and
`x.jpg`) get the suffix and then a counter appended. The run summary is `predictions.csv` (one
row per image, unreadable ones included with their error) and `predictions.json`; both describe
the latest run and are replaced. No other file in the output folder is touched or deleted, and
every file is written to a temporary name first and then renamed, so an interrupted run leaves
complete files only (the summary is written for the images done so far).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from tqdm.auto import tqdm

from clipsam_jax import config as config_lib
from clipsam_jax import options
from clipsam_jax.clip.prompts import object_name
from clipsam_jax.config import (
    DEFAULT_RUNTIME,
    ClipConfig,
    FewShotConfig,
    RefineConfig,
    RuntimeConfig,
)
from clipsam_jax.data.image_io import IMAGE_SUFFIXES
from clipsam_jax.data.pipeline import BatchLoader
from clipsam_jax.data.types import Sample
from clipsam_jax.engine import Callback, notify, refined_batches
from clipsam_jax.errors import ConfigError, DatasetError, ImageReadError
from clipsam_jax.few_shot import choose_references, reference_images
from clipsam_jax.inference import RoughMapModel, check_inputs, load_rough_map_model
from clipsam_jax.options import option
from clipsam_jax.outputs import png_bytes, write_atomic
from clipsam_jax.refine.fusion import MMRResult
from clipsam_jax.refine.registry import build_refiner
from clipsam_jax.visualize import overlay

logger = logging.getLogger(__name__)

PNG_SCALE = 65535  # 16-bit map PNG: pixel = round(clip(value, 0, 1) * PNG_SCALE)
SUMMARY_FILES = ("predictions.csv", "predictions.json")
CSV_COLUMNS = ("path", "score", "rough_score", "sam_boxes", "name", "error")


@dataclass(frozen=True)
class PredictConfig:
    """What `python -m eval.predict` runs; see the module docstring for the outputs."""

    inputs: str = option(help="an image file or a folder", cli=False)  # the positional argument
    output: str = option(help="folder for the results")
    class_name: str | None = option(
        None, "object name for the prompts (default: 'object', Appendix A)")  # fmt: skip
    checkpoint: str | None = option(None, "training workdir of the head (unused with --no-umci)")
    no_umci: bool = option(False, "zero-shot map, no trained head")
    recursive: bool = option(False, "also scan sub-folders")
    map_format: Literal["png", "npy"] = option(
        "png", "png: 16-bit, value = pixel / 65535; npy: float32")  # fmt: skip
    mask_threshold: float | None = option(
        None, "binary mask threshold (default: --threshold)", minimum=0.0, maximum=1.0)  # fmt: skip
    batch_size: int = option(8, "images per batch", minimum=1)
    seed: int = option(0, "seed of MMR's point sampling")
    clip: ClipConfig = field(default_factory=ClipConfig)
    clip_given: tuple[str, ...] = ()  # as EvalConfig.clip_given
    reference_dir: str | None = option(
        None, "folder of normal images of the part: few-shot mode, all of them as references "
        "(or --shots of them, drawn by --seed)")  # fmt: skip
    refine: RefineConfig = field(default_factory=RefineConfig)
    few_shot: FewShotConfig = field(default_factory=FewShotConfig)


# --------------------------------------------------------------------------- inputs and names


def _is_hidden(relative: Path) -> bool:
    # Dot-files include macOS `._x.png` resource forks, which carry an image suffix but no image.
    return any(part.startswith(".") for part in relative.parts)


def find_images(
    inputs: str | Path, recursive: bool = False, exclude: Path | None = None
) -> tuple[list[Path], Path]:
    """(The images to process, sorted by relative path; the folder they are relative to).
    `inputs`: an image file (taken whatever its suffix) or a folder scanned for IMAGE_SUFFIXES
    (any case; hidden files and folders skipped, `exclude`, e.g. the output folder, too)."""
    path = Path(inputs).expanduser()
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder; give an image file or a folder of "
                           "images")  # fmt: skip
    if path.is_file():
        return [path], path.parent
    candidates = path.rglob("*") if recursive else path.iterdir()
    exclude = exclude.resolve() if exclude is not None else None
    found = []
    for item in candidates:
        relative = item.relative_to(path)
        if item.suffix.lower() not in IMAGE_SUFFIXES or _is_hidden(relative) or not item.is_file():
            continue
        if exclude is not None and item.resolve().is_relative_to(exclude):
            continue  # our own maps and overlays from an earlier run are not inputs
        found.append(item)
    if not found:
        hint = "" if recursive else " (add --recursive to scan sub-folders)"
        raise DatasetError(
            f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder{hint}"
        )
    return sorted(found, key=lambda p: p.relative_to(path).as_posix()), path


def output_names(paths: list[Path], root: Path) -> list[str]:
    """Collision-free output names: the stem, sub-folders joined with "__", then the suffix and
    a counter where two names still clash (compared case-insensitively, for such filesystems)."""
    names, taken = [], set()
    for path in paths:
        relative = path.relative_to(root) if path.is_relative_to(root) else Path(path.name)
        base = "__".join([*relative.parent.parts, relative.stem]) or "image"
        name, count = base, 1
        if name.lower() in taken:
            name = f"{base}_{path.suffix.lstrip('.').lower()}"
        while name.lower() in taken:
            count += 1
            name = f"{base}_{path.suffix.lstrip('.').lower()}_{count}"
        taken.add(name.lower())
        names.append(name)
    return names


# --------------------------------------------------------------------------- writing


def map_to_png16(values: np.ndarray) -> np.ndarray:
    """float (H, W) → uint16 (H, W), round(clip(v, 0, 1) · 65535); decode with pixel / 65535."""
    return np.rint(np.clip(np.nan_to_num(values), 0.0, 1.0) * PNG_SCALE).astype(np.uint16)


def resize_map(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """float (S, S) → float32 (height, width), bilinear (OpenCV INTER_LINEAR)."""
    values = np.asarray(values, np.float32)
    if values.shape == (height, width):
        return values.copy()
    return cv2.resize(values, (width, height), interpolation=cv2.INTER_LINEAR)


def write_image_outputs(
    output: Path,
    name: str,
    rgb: np.ndarray,
    values: np.ndarray,
    map_format: str,
    mask_threshold: float,
) -> dict[str, str]:
    """Write map, mask and overlay of one image; returns their file names.

    rgb uint8 (H, W, 3); values float32 (H, W), the map at the image's resolution.
    """
    files = {"map": f"{name}_map.{map_format}", "mask": f"{name}_mask.png",
             "overlay": f"{name}_overlay.png"}  # fmt: skip
    if map_format == "npy":
        buffer = io.BytesIO()
        np.save(buffer, values.astype(np.float32))
        write_atomic(output / files["map"], buffer.getvalue())
    else:
        write_atomic(output / files["map"], png_bytes(map_to_png16(values)))
    mask = (values > mask_threshold).astype(np.uint8) * 255
    write_atomic(output / files["mask"], png_bytes(mask))
    write_atomic(output / files["overlay"], png_bytes(overlay(rgb, values)))
    return files


def _write_summary(output: Path, rows: dict[int, dict], report: dict) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for _, row in sorted(rows.items()):
        writer.writerow({k: row.get(k, "") for k in CSV_COLUMNS})
    write_atomic(output / SUMMARY_FILES[0], buffer.getvalue().encode())
    write_atomic(output / SUMMARY_FILES[1], json.dumps(report, indent=2).encode())


# --------------------------------------------------------------------------- prediction


def _model_settings(
    model: RoughMapModel, config: PredictConfig, references: list[Sample] | None
) -> dict:
    return {
        "clip_fingerprint": model.clip.fingerprint,
        "clip": None if model.clip_config is None else config_lib.to_dict(model.clip_config),
        "checkpoint": None if config.no_umci else config.checkpoint,
        "checkpoint_step": model.checkpoint_step,
        "head": "zero-shot" if model.head_config is None else dataclasses.asdict(model.head_config),
        "sam": config.refine.sam,
        "refine": config_lib.to_dict(config.refine),
        "seed": config.seed,
        "few_shot": None if references is None else {
            "weight": config.few_shot.weight, "references": [str(s.image_path) for s in references],
        },
    }  # fmt: skip


def choose_predict_references(config: PredictConfig, inputs: list[Path]) -> list[Sample] | None:
    """The few-shot references of a prediction (None: zero-shot): the images of
    `config.reference_dir`, or `config.few_shot.shots` of them drawn by `config.seed`; an image
    also predicted is never one."""
    shots = config.few_shot.shots
    if config.reference_dir is None:
        if shots:
            raise ConfigError(f"--shots {shots} needs --reference-dir DIR, a folder of normal "
                              "images of the part")  # fmt: skip
        return None
    paths, _ = find_images(config.reference_dir)
    name = config.class_name or "object"
    candidates = [Sample(p, None, name, "good", 0) for p in paths]
    return choose_references(candidates, shots or len(candidates), config.seed, name, inputs)


def _check_output(output: Path, inputs: Path) -> None:
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file; give a folder")
    if inputs.is_dir() and output.resolve() == inputs.resolve():
        raise ConfigError(
            f"--output {output} is the input folder; give another folder so the maps and "
            "overlays are not mixed with (and later read as) input images"
        )


def _predict_image(
    index: int, rgb: np.ndarray, rough: np.ndarray, result: MMRResult | None,
    scores: tuple[float, float], config: PredictConfig, job: dict,
) -> dict:  # fmt: skip
    """The files of one image; returns its result entry.

    rgb uint8 (H, W, 3) original image; rough float32 (S, S) rough map; result its MMR (None
    without SAM); scores (image score, rough image score) as `engine.RefinedBatch` defines them;
    `job` holds the run-wide values (output folder, names, threshold, settings).
    """
    final, boxes = rough, 0
    if result is not None:
        final, boxes = result.final, result.prompts.num_boxes
    height, width = rgb.shape[:2]
    values = resize_map(final, height, width)
    if config.map_format == "png" and (values.min() < 0.0 or values.max() > 1.0):
        logger.warning("%s: map values outside [0, 1] are clipped in the 16-bit PNG; use "
                       "--map-format npy to keep them", job["paths"][index])  # fmt: skip
    name = job["names"][index]
    files = write_image_outputs(job["output"], name, rgb, values, config.map_format,
                                job["threshold"])  # fmt: skip
    entry = {
        "image": str(job["paths"][index]), "image_size": [height, width],
        "class_name": config.class_name or None, "prompt_object": job["prompt_object"],
        "score": float(scores[0]), "rough_score": float(scores[1]),
        "grid_score": float(np.max(final)), "rough_grid_score": float(np.max(rough)),
        "map_max": float(values.max()),
        "sam_boxes": int(boxes), "files": files, "map_format": config.map_format,
        "map_scale": job["map_scale"], "mask_threshold": job["threshold"],
        "model": job["model"],
    }  # fmt: skip
    write_atomic(job["output"] / f"{name}_result.json", json.dumps(entry, indent=2).encode())
    return entry


def predict(
    config: PredictConfig,
    *,
    runtime: RuntimeConfig = DEFAULT_RUNTIME,
    progress: bool = True,
    model: RoughMapModel | None = None,
    refiner=None,
    callbacks: Sequence[Callback] = (),
) -> dict:
    """Predict anomaly maps for `config.inputs`; returns the content of predictions.json.

    `callbacks` observe the run: `on_batch(class_name, step)` with each `engine.RefinedBatch`
    (rough maps, prompts, SAM masks, timings), `on_image(index, entry)` with each image's entry
    once its files are written (the web app builds its page from these).

    With a trained head the CLIP settings come from its checkpoint except those named in
    `config.clip_given`; with `no_umci`, `config.clip` is used. `model` / `refiner` inject
    prebuilt stages; `runtime`: how fast and where they compute. Unreadable images are skipped
    with a warning and listed under "skipped"; when none can be read, `ImageReadError` lists
    them all.
    """
    options.check(config)  # the flags' rules, for configs built in code too
    options.check(runtime)
    output = Path(config.output).expanduser()
    inputs = Path(config.inputs).expanduser()
    _check_output(output, inputs)  # cheap checks first, before any model is loaded
    paths, root = find_images(inputs, config.recursive, exclude=output)
    references = choose_predict_references(config, paths)
    if config.no_umci and config.checkpoint:
        logger.warning("--no-umci: the head in %s is not used", config.checkpoint)
    if model is None:  # the paths first; SAM before CLIP: a missing SAM file fails at once
        check_inputs(config.clip, config.checkpoint, config.no_umci, config.clip_given,
                     config.refine.sam_checkpoint, config.refine.sam != "none")  # fmt: skip
        refiner = refiner or build_refiner(config.refine, runtime)
        model = load_rough_map_model(config.clip, config.checkpoint, config.no_umci,
                                     config.batch_size, config.clip_given, runtime)  # fmt: skip
    refiner = refiner or build_refiner(config.refine, runtime)
    if output.is_dir() and any(output.iterdir()):
        logger.info("%s already holds files: only those of the images processed now (and the "
                    "summary %s) are replaced, nothing is deleted", output,
                    " / ".join(SUMMARY_FILES))  # fmt: skip
    output.mkdir(parents=True, exist_ok=True)
    threshold = config.refine.threshold if config.mask_threshold is None else config.mask_threshold
    job = {
        "output": output, "paths": paths, "names": output_names(paths, root),
        "threshold": threshold, "model": _model_settings(model, config, references),
        "prompt_object": object_name(config.class_name or None, model.text.object_mode),
        "map_scale": "value = pixel / 65535" if config.map_format == "png" else "float32 values",
    }  # fmt: skip
    report = {
        "inputs": str(inputs), "output": str(output), "class_name": config.class_name or None,
        "prompt_object": job["prompt_object"], "map_format": config.map_format,
        "map_scale": job["map_scale"], "mask_threshold": threshold, "model": job["model"],
        "images": 0, "skipped": [], "complete": False,
    }  # fmt: skip
    rows: dict[int, dict] = {}  # by position in `paths`, so the CSV follows the input order
    bar = tqdm(total=len(paths), unit="img", desc="predict", disable=not progress)

    def skip(index: int, error: ImageReadError) -> None:
        logger.warning("skipping %s: %s", paths[index], error)
        report["skipped"].append({"path": str(paths[index]), "error": str(error)})
        rows[index] = {"path": str(paths[index]), "error": str(error)}
        bar.update(1)

    # The images as samples without masks, read in threads ahead of the model (uint8: the model
    # normalizes them on the device); unreadable ones are skipped.
    samples = [Sample(p, None, config.class_name or None, "", 0) for p in paths]
    if references is not None:  # few-shot: the part's memory bank
        images = reference_images(references, model.clip.image_size)
        model.set_references(config.class_name or None, images, config.few_shot.weight)
    batches = BatchLoader(samples, model.clip.image_size, config.batch_size, keep_rgb=True,
                          normalized=False, on_error=skip)  # fmt: skip
    try:
        for step in refined_batches(batches, model, refiner, config.refine, config.seed):
            notify(callbacks, "on_batch", config.class_name or None, step)
            # MMR seeded by the image's position in the sorted list of paths.
            rough_scores = step.rough_scores()
            final_scores = step.final_scores()
            scores = rough_scores if final_scores is None else final_scores
            for i, (index, rgb, rough, result) in enumerate(zip(
                step.batch["indices"], step.batch["rgb"], step.rough, step.results, strict=True
            )):  # fmt: skip
                entry = _predict_image(index, rgb, rough, result, (scores[i], rough_scores[i]),
                                       config, job)  # fmt: skip
                notify(callbacks, "on_image", int(index), entry)
                rows[index] = {"path": entry["image"], "score": entry["score"],
                               "rough_score": entry["rough_score"],
                               "sam_boxes": entry["sam_boxes"], "name": job["names"][index]}  # fmt: skip
                report["images"] += 1
                bar.update(1)
        report["complete"] = True
    finally:
        bar.close()
        if references is not None:
            model.set_references(config.class_name or None, None)
        if rows:  # also after an interruption: the summary of what is on disk
            _write_summary(output, rows, report)
    if report["skipped"]:
        listed = "\n  ".join(s["path"] for s in report["skipped"])
        if not report["images"]:
            raise ImageReadError(
                f"none of the {len(paths)} images could be read:\n  {listed}\n"
                f"(details in {output / SUMMARY_FILES[0]}); fix or remove these files"
            )
        logger.warning("%d of %d images skipped (unreadable), listed in %s:\n  %s",
                       len(report["skipped"]), len(paths), output / SUMMARY_FILES[0],
                       listed)  # fmt: skip
    return report
