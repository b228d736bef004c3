"""Running a plan: each distinct training and evaluation once, one record per cell.

Layout under the output folder: `runs/<dataset>-<key>/` (training workdirs), one shared
`feature_cache/` (CLIP features per model, image size and image, reused by every training),
`evals/<dataset>-<key>/` (evaluation outputs) and `cells/<cell id>.json` (status, metrics,
protocol and the equivalent commands). Keys hash the configs, so cells whose configs are equal
share a folder, and a record made under other settings is not reused. Rerunning skips the
finished cells; training and evaluation resume where they stopped. A failing cell is recorded
as failed and the others still run.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from clipsam_jax import cli
from clipsam_jax import config as config_lib
from clipsam_jax.config import DEFAULT_RUNTIME, EvalConfig, RuntimeConfig, TrainConfig
from clipsam_jax.outputs import write_atomic
from clipsam_jax.reproduce.plan import METRICS, Cell

logger = logging.getLogger(__name__)


def config_key(config) -> str:
    """12 hex digits identifying a config's content."""
    text = json.dumps(config_lib.identity(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The distinct trainings and evaluations of some cells, with their folders filled in:
    `trainings` {key: TrainConfig}, `evaluations` {key: EvalConfig}, `needs` {evaluation key:
    training key or None}, `cells` {cell id: evaluation key}."""

    trainings: dict[str, TrainConfig]
    evaluations: dict[str, EvalConfig]
    needs: dict[str, str | None]
    cells: dict[str, str]


def schedule(cells: list[Cell], output: Path) -> Schedule:
    """Share trainings between cells that differ only at evaluation, and evaluations between
    cells that differ only in the stage they report; every training reads one feature cache."""
    trainings, evaluations, needs, by_cell = {}, {}, {}, {}
    for cell in cells:
        train_key = None
        if cell.train is not None:
            train_key = config_key(cell.train)
            trainings.setdefault(train_key, dataclasses.replace(
                cell.train, workdir=str(output / "runs" / f"{cell.train.dataset}-{train_key}"),
                feature_cache_dir=str(output / "feature_cache")))  # fmt: skip
        # The evaluation's identity includes its training's (by key, not by folder).
        eval_key = config_key(dataclasses.replace(cell.eval, checkpoint=train_key))
        evaluations.setdefault(eval_key, dataclasses.replace(
            cell.eval, output=str(output / "evals" / f"{cell.dataset}-{eval_key}"),
            checkpoint=None if train_key is None else trainings[train_key].workdir))  # fmt: skip
        needs[eval_key] = train_key
        by_cell[cell.id] = eval_key
    return Schedule(trainings, evaluations, needs, by_cell)


def record_path(output: Path, cell_id: str) -> Path:
    return output / "cells" / (cell_id.replace("/", "__") + ".json")


def load_record(output: Path, cell_id: str) -> dict | None:
    path = record_path(output, cell_id)
    return json.loads(path.read_text()) if path.is_file() else None


def finished(cells: list[Cell], plan: Schedule, output: Path) -> set[str]:
    """Ids of the cells recorded as ok under their current configs."""
    done = set()
    for cell in cells:
        record = load_record(output, cell.id)
        if record and record["status"] == "ok" and record["key"] == plan.cells[cell.id]:
            done.add(cell.id)
    return done


def commands(train: TrainConfig | None, evaluation: EvalConfig) -> list[str]:
    """The train.main / eval.main command lines that rebuild a cell by hand."""
    lines = []
    if train is not None:
        lines.append("python -m train.main " + " ".join(cli.config_argv(train, ("dataset",))))
    lines.append("python -m eval.main " + " ".join(cli.config_argv(evaluation, ("dataset",))))
    return lines


def _protocol(report: dict, train: TrainConfig | None) -> dict:
    """What produced a cell's numbers, from the evaluation's metrics.json and the training."""
    from clipsam_jax.clip.loading import resolve_dtype

    config = report["config"]
    head = report["head"] if isinstance(report["head"], dict) else {}
    return {
        "pro_mode": report["pro_mode"],
        "fusion_norm": config["refine"]["fusion_norm"],
        "threshold": config["refine"]["threshold"],
        "sam": config["refine"]["sam"],
        "image_size": config["clip"]["image_size"],
        "clip_dtype": resolve_dtype(config["clip"]["dtype"]).dtype.name,
        "head_dtype": config["clip"]["head_dtype"],
        "seed": config["seed"],
        "shots": config.get("few_shot", {}).get("shots") or None,
        "epochs": None if train is None else train.optim.epochs,
        "init": head.get("init"),
        "stage_average": head.get("stage_average"),
        "checkpoint_step": report["checkpoint_step"],
        "metrics_mode": report["metrics_mode"],
    }


def _attempt(what: str, work: Callable, *args, **kwargs) -> tuple[object, str | None, float]:
    """(work(*args, **kwargs), None, seconds), or (None, the error, seconds) with its traceback
    logged: one failing job must not stop the others."""
    started = time.perf_counter()
    try:
        result = work(*args, **kwargs)
    except Exception as error:  # recorded and reported; the plan goes on
        logger.exception("%s failed", what)
        message = f"{what} failed: {type(error).__name__}: {error}"
        return None, message, time.perf_counter() - started
    return result, None, time.perf_counter() - started


def run_cells(
    cells: list[Cell],
    output: Path,
    *,
    runtime: RuntimeConfig = DEFAULT_RUNTIME,
    progress: bool = True,
    refiners: Callable[[EvalConfig], object] | None = None,
) -> dict[str, dict]:
    """Train and evaluate what the unfinished cells need; write and return every cell's record.

    `refiners(config)` gives the refiner an evaluation uses (built once per SAM setting by the
    caller; called for every pending evaluation first, so that a SAM that cannot load fails
    before any work), or None to let `evaluate` build it.
    """
    from clipsam_jax.eval_lib import evaluate
    from clipsam_jax.train_lib import train

    plan = schedule(cells, output)
    done = finished(cells, plan, output)
    todo = [c for c in cells if c.id not in done]
    pending = list(dict.fromkeys(plan.cells[c.id] for c in todo))  # evaluation keys, in order
    for eval_key in pending if refiners else ():
        refiners(plan.evaluations[eval_key])
    trained: dict[str, tuple[str | None, float]] = {}  # training key -> (error, seconds)
    for number, eval_key in enumerate(pending, 1):
        evaluation = plan.evaluations[eval_key]
        train_key = plan.needs[eval_key]
        ids = [c.id for c in todo if plan.cells[c.id] == eval_key]
        logger.info("[%d/%d] %s: %s", number, len(pending), ", ".join(ids), evaluation.output)
        error, seconds = None, {"training": None, "evaluation": None}
        if train_key is not None:
            if train_key not in trained:
                config = plan.trainings[train_key]
                _, *trained[train_key] = _attempt(f"training {config.workdir}", train, config,
                                                  runtime=runtime, progress=progress)  # fmt: skip
            error, seconds["training"] = trained[train_key]
        report = None
        if error is None:
            refiner = refiners(evaluation) if refiners else None
            report, error, seconds["evaluation"] = _attempt(
                f"evaluation {evaluation.output}", evaluate, evaluation, runtime=runtime,
                progress=progress, refiner=refiner)  # fmt: skip
        for cell in cells:
            if cell.id in ids:
                _write_record(output, cell, plan, report, error, seconds)
    return {cell.id: load_record(output, cell.id) for cell in cells}


def _write_record(output: Path, cell: Cell, plan: Schedule, report: dict | None,
                  error: str | None, seconds: dict) -> None:  # fmt: skip
    eval_key = plan.cells[cell.id]
    train_key = plan.needs[eval_key]
    train = None if train_key is None else plan.trainings[train_key]
    evaluation = plan.evaluations[eval_key]
    record = {
        "cell": cell.id,
        "key": eval_key,
        "status": "failed" if error else "ok",
        "error": error,
        "stage": cell.stage,
        "dataset": cell.dataset,
        "trained_on": None if train is None else train.dataset,
        "training": None if train is None else train.workdir,
        "evaluation": evaluation.output,
        "commands": commands(train, evaluation),
        # Wall time this run spent on the cell's jobs (a training shared by several cells
        # counts in each of them; one finished by an earlier run takes seconds to confirm).
        "seconds": seconds,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if report is not None:
        mean = report[cell.stage]["mean"]
        record["metrics"] = {name: mean.get(name) for name in METRICS}
        record["protocol"] = _protocol(report, train)
    path = record_path(output, cell.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record, indent=2))
