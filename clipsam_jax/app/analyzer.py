"""What the web app does with a request, without the web page: checks the inputs, runs
`predict_lib.predict` (the library function `eval.predict` runs) on them with the app's loaded
models, and gathers the stages, scores, timings and files for the page.

Every file goes under the app's work folder (`work`), which `eval.app` makes as a temporary
folder and deletes on exit.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import shutil
import threading
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipsam_jax.config import DEFAULT_RUNTIME, ClipConfig, RefineConfig, RuntimeConfig
from clipsam_jax.data.image_io import IMAGE_SUFFIXES, image_size
from clipsam_jax.engine import RefinedBatch
from clipsam_jax.errors import ClipSamError, ImageReadError
from clipsam_jax.inference import RoughMapModel, check_inputs, load_rough_map_model
from clipsam_jax.options import option
from clipsam_jax.predict_lib import PredictConfig, predict
from clipsam_jax.refine.registry import build_refiner
from clipsam_jax.visualize import panel

logger = logging.getLogger(__name__)

REQUESTS_KEPT = 32  # request folders kept for their downloads; older ones are deleted


class AppInputError(ClipSamError):
    """A request the app refuses, with the message the page shows."""


@dataclass(frozen=True)
class AppConfig:
    """What `python -m eval.app` serves; the method's settings are `eval.predict`'s."""

    checkpoint: str | None = option(
        None, "the head's training workdir (default: none, the zero-shot map)")  # fmt: skip
    host: str = option("127.0.0.1", "address to listen on: 127.0.0.1 serves this machine only; "
                       "0.0.0.0 serves every network it is on (see the README)")  # fmt: skip
    port: int = option(7860, "port to listen on (0: a free one)", minimum=0, maximum=65535)
    max_upload_mb: int = option(50, "largest file accepted, in MB", minimum=1)
    max_image_pixels: int = option(
        4096 * 4096, "largest image accepted, width × height (larger: use eval.predict)",
        minimum=1)  # fmt: skip
    batch_size: int = option(8, "images per batch in the folder tab", minimum=1)
    seed: int = option(0, "seed of MMR's point sampling")
    clip: ClipConfig = field(default_factory=ClipConfig)
    clip_given: tuple[str, ...] = ()  # as EvalConfig.clip_given
    refine: RefineConfig = field(default_factory=RefineConfig)


@dataclass
class Inspection:
    """One image through the app: the stages panel (uint8 RGB), its scores, boxes, the seconds
    each stage took, its files (map, mask, overlay) and the reference images used."""

    panel: np.ndarray
    score: float
    rough_score: float
    boxes: int
    seconds: dict[str, float]
    files: dict[str, Path]
    references: list[str]


@dataclass
class BatchResult:
    """A folder or zip through the app: the zip of the predictions, the CSV, the summary."""

    archive: Path
    table: Path
    images: int
    skipped: list[dict]


class _Stages:
    """Callback of `predict`: keeps the batches and image entries it reports."""

    def __init__(self) -> None:
        self.steps: list[RefinedBatch] = []
        self.entries: dict[int, dict] = {}

    def on_batch(self, class_name, step: RefinedBatch) -> None:
        self.steps.append(step)

    def on_image(self, index: int, entry: dict) -> None:
        self.entries[index] = entry


class Analyzer:
    """The app's models, loaded once, and its requests, one at a time (the models hold one
    class's references at a time)."""

    def __init__(
        self,
        config: AppConfig,
        work: Path,
        runtime: RuntimeConfig = DEFAULT_RUNTIME,
        *,
        model: RoughMapModel | None = None,
        refiner=None,
    ) -> None:
        self.config, self.work, self.runtime = config, Path(work), runtime
        if model is None:
            check_inputs(config.clip, config.checkpoint, config.checkpoint is None,
                         config.clip_given, config.refine.sam_checkpoint,
                         config.refine.sam != "none")  # fmt: skip
        self.refiner = refiner if refiner is not None else build_refiner(config.refine, runtime)
        self.model = model or load_rough_map_model(
            config.clip, config.checkpoint, config.checkpoint is None, config.batch_size,
            config.clip_given, runtime,
        )  # fmt: skip
        self._zero_shot: RoughMapModel | None = None if self.has_head else self.model
        self._lock = threading.Lock()
        self._requests = itertools.count()

    @property
    def has_head(self) -> bool:
        return self.model.head_config is not None

    def inspect(
        self, image: str | Path | None, class_name: str, threshold: float, points: int, *,
        zero_shot: bool = False, references: Sequence[str | Path] = (), map_format: str = "png",
    ) -> Inspection:  # fmt: skip
        """One image → its stages, scores, timings and files. AppInputError for an input the
        app refuses (no image, an unreadable or too large one, no class name)."""
        image = self._check_image(image)
        config = self._predict_config(class_name, threshold, points, zero_shot, map_format)
        folder = self._request_folder()
        if references:
            config = dataclasses.replace(config, reference_dir=str(self._gather(references,
                                                                               folder / "good")))  # fmt: skip
        config = dataclasses.replace(config, inputs=str(image), output=str(folder / "out"))
        stages = _Stages()
        with self._lock:
            sam_before = self._sam_seconds()
            began = time.perf_counter()
            report = self._run(config, zero_shot, stages)
            total = time.perf_counter() - began
            sam = self._sam_seconds() - sam_before
        if not stages.entries:
            raise AppInputError(f"{Path(image).name}: the image could not be read")
        step, entry = stages.steps[0], stages.entries[0]
        result = step.results[0]
        rgb = step.batch["rgb"][0]
        picture = panel(
            rgb, step.rough[0], None if result is None else result.final, None,
            boxes=None if result is None else result.prompts.boxes,
            points=None if result is None else result.prompts.points,
            masks=None if result is None else result.masks,
            scores=None if result is None else result.scores,
            title=Path(image).name, final_map=True, with_colorbar=True, columns=3,
        )  # fmt: skip
        seconds = {
            "rough map (reading, CLIP, head)": step.wait_s,
            "MMR (prompts, SAM, fusion)": step.mmr_s,
            "of which SAM": sam,
            "files": max(total - step.wait_s - step.mmr_s, 0.0),
            "total": total,
        }
        output = Path(config.output)
        files = {kind: output / name for kind, name in entry["files"].items()}
        chosen = (report["model"].get("few_shot") or {}).get("references", [])
        return Inspection(picture, entry["score"], entry["rough_score"], entry["sam_boxes"],
                          seconds, files, [Path(p).name for p in chosen])  # fmt: skip

    def inspect_batch(
        self, uploads: Sequence[str | Path], class_name: str, threshold: float, points: int, *,
        zero_shot: bool = False, references: Sequence[str | Path] = (), map_format: str = "png",
    ) -> BatchResult:  # fmt: skip
        """Images, or zips of images, → one zip of `eval.predict`'s outputs for them and its
        CSV."""
        if not uploads:
            raise AppInputError("Upload images of parts, or a .zip of them.")
        config = self._predict_config(class_name, threshold, points, zero_shot, map_format)
        folder = self._request_folder()
        inputs = folder / "images"
        inputs.mkdir()
        for i, upload in enumerate(map(Path, uploads)):  # numbered: uploads may share names
            if upload.suffix.lower() == ".zip":
                _extract_images(upload, inputs / f"{i:03d}_{upload.stem}")
            elif upload.suffix.lower() in IMAGE_SUFFIXES:  # a folder's other files are left out
                shutil.copy(upload, inputs / f"{i:03d}_{upload.name}")
        if references:
            config = dataclasses.replace(config, reference_dir=str(self._gather(references,
                                                                               folder / "good")))  # fmt: skip
        output = folder / "predictions"
        config = dataclasses.replace(config, inputs=str(inputs), output=str(output),
                                     recursive=True)  # fmt: skip
        with self._lock:
            report = self._run(config, zero_shot, None)
        archive = shutil.make_archive(str(folder / "predictions"), "zip", output)
        return BatchResult(Path(archive), output / "predictions.csv", report["images"],
                           report["skipped"])  # fmt: skip

    # ------------------------------------------------------------------------------ internals

    def _predict_config(self, class_name: str, threshold: float, points: int,
                        zero_shot: bool, map_format: str) -> PredictConfig:  # fmt: skip
        class_name = (class_name or "").strip()
        if not class_name:
            raise AppInputError("Type the part's name (e.g. screw, bottle, pcb): it goes into "
                                "CLIP's text prompts.")  # fmt: skip
        refine = dataclasses.replace(self.config.refine, threshold=float(threshold),
                                     points=int(points))  # fmt: skip
        try:
            config = PredictConfig(
                inputs="", output="", class_name=class_name,
                checkpoint=None if zero_shot else self.config.checkpoint,
                no_umci=zero_shot or not self.has_head, map_format=map_format,
                batch_size=self.config.batch_size, seed=self.config.seed,
                clip=self.config.clip, clip_given=self.config.clip_given, refine=refine,
            )  # fmt: skip
        except (TypeError, ValueError) as error:
            raise AppInputError(str(error)) from error
        return config

    def _check_image(self, image: str | Path | None) -> Path:
        if not image:
            raise AppInputError("Upload an image of the part, or pick one of the examples.")
        path = Path(image)
        try:
            height, width = image_size(path)
        except ImageReadError as error:
            raise AppInputError(f"{path.name} is not an image the app can read (PNG, JPEG, "
                                f"BMP, TIFF or WebP): {error}") from error  # fmt: skip
        limit = self.config.max_image_pixels
        if height * width > limit:
            raise AppInputError(
                f"{path.name} is {width}×{height} = {height * width / 1e6:.1f} megapixels; the "
                f"app takes up to {limit / 1e6:.1f}. Resize it, or run python -m eval.predict."
            )
        return path

    def _run(self, config: PredictConfig, zero_shot: bool, stages: _Stages | None) -> dict:
        try:
            return predict(config, runtime=self.runtime, progress=False,
                           model=self._model(zero_shot), refiner=self.refiner,
                           callbacks=() if stages is None else (stages,))  # fmt: skip
        except ClipSamError as error:
            raise AppInputError(str(error)) from error

    def _model(self, zero_shot: bool) -> RoughMapModel:
        """The head's model, or the zero-shot map's (loaded at its first use)."""
        if not zero_shot:
            return self.model
        if self._zero_shot is None:
            clip = self.model.clip_config or self.config.clip
            self._zero_shot = load_rough_map_model(clip, None, True, self.config.batch_size,
                                                   (), self.runtime)  # fmt: skip
        return self._zero_shot

    def _sam_seconds(self) -> float:
        refiner = self.refiner
        if refiner is None or not hasattr(refiner, "encoder_seconds"):
            return 0.0
        return refiner.encoder_seconds + refiner.decoder_seconds

    def _request_folder(self) -> Path:
        """A new folder for one request's files; the oldest beyond REQUESTS_KEPT go."""
        number = next(self._requests)
        folder = self.work / "requests" / f"{number:06d}"
        folder.mkdir(parents=True)
        stale = self.work / "requests" / f"{number - REQUESTS_KEPT:06d}"
        shutil.rmtree(stale, ignore_errors=True)
        return folder

    @staticmethod
    def _gather(files: Sequence[str | Path], folder: Path) -> Path:
        """Copy uploaded reference images into one folder (predict's --reference-dir)."""
        folder.mkdir()
        for i, path in enumerate(files):
            path = Path(path)
            shutil.copy(path, folder / f"{i:03d}_{path.name}")
        return folder


def _extract_images(archive: Path, folder: Path) -> None:
    """The images of a zip into `folder`: image suffixes only, names reduced to their last
    part (no member lands outside `folder`, whatever its path says)."""
    folder.mkdir(parents=True)
    try:
        with zipfile.ZipFile(archive) as opened:
            for member in opened.infolist():
                name = Path(member.filename).name
                if member.is_dir() or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                if name.startswith("."):
                    continue
                target = folder / f"{len(list(folder.iterdir())):05d}_{name}"
                with opened.open(member) as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink)
    except zipfile.BadZipFile as error:
        raise AppInputError(f"{archive.name} is not a readable zip: {error}") from error
