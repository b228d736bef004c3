"""`reproduce(settings)`: check the inputs, then run or describe the plan, then the report."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from clipsam_jax import config as config_lib
from clipsam_jax import options
from clipsam_jax.config import DEFAULT_RUNTIME, HeadConfig, RuntimeConfig
from clipsam_jax.errors import ConfigError, DatasetError
from clipsam_jax.outputs import hold
from clipsam_jax.reproduce import estimate as estimate_lib
from clipsam_jax.reproduce import report as report_lib
from clipsam_jax.reproduce.plan import Cell, ReproduceConfig, build_plan, select
from clipsam_jax.reproduce.runner import Schedule, finished, run_cells, schedule

logger = logging.getLogger(__name__)


def datasets_of(cells: list[Cell]) -> set[str]:
    """The datasets the cells test or train on."""
    return {c.dataset for c in cells} | {c.train.dataset for c in cells if c.train is not None}


def check_inputs(settings: ReproduceConfig, cells: list[Cell]) -> None:
    """Every dataset, the CLIP directory and the SAM file the cells need, before any work."""
    from clipsam_jax.clip.loading import looks_local, resolve_local
    from clipsam_jax.data.registry import load_dataset

    for name in sorted(datasets_of(cells)):
        try:
            load_dataset(name, Path(settings.data_root) / name)
        except DatasetError as error:
            raise DatasetError(
                f"{error} (--data-root {settings.data_root} must hold a {name}/ folder for "
                f"the selected cells; --only selects cells whose datasets you have, e.g. "
                f"--only table1,table2,table3 without MTD and KSDD2)"
            ) from error
    if looks_local(settings.clip):
        resolve_local(Path(settings.clip).expanduser())
    if settings.sam_checkpoint and not Path(settings.sam_checkpoint).expanduser().exists():
        raise ConfigError(f"--sam-checkpoint {settings.sam_checkpoint}: no such file")


def _head_text(head: HeadConfig) -> str:
    """ "umci (hidden_dim=194)": the head's kind and the fields away from their defaults."""
    default = HeadConfig()
    changed = [f"{f.name}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
               for f in dataclasses.fields(HeadConfig)
               if f.name != "kind" and (v := getattr(head, f.name)) != getattr(default, f.name)]  # fmt: skip
    return head.kind + (f" ({', '.join(changed)})" if changed else "")


def describe(cells: list[Cell], plan: Schedule, done: set[str], settings: ReproduceConfig,
             machine: str | None = None) -> tuple[str, dict]:  # fmt: skip
    """The plan as text (every cell, what it trains and evaluates, the time estimate) and as
    data."""
    machine = machine or estimate_lib.this_machine()
    rates = estimate_lib.throughput(machine)
    sizes = estimate_lib.dataset_sizes(datasets_of(cells), settings.data_root)
    times = estimate_lib.estimate(plan, sizes, rates)
    names = {key: f"T{i}" for i, key in enumerate(plan.trainings, 1)}
    names |= {key: f"E{i}" for i, key in enumerate(plan.evaluations, 1)}
    duration = estimate_lib.duration
    counted = ", ".join(f"{d} {n}{'' if on_disk else ' (published size)'}"
                        for d, (n, on_disk) in sizes.items())  # fmt: skip
    lines = [
        f"{len(cells)} cells: {len(plan.trainings)} trainings, {len(plan.evaluations)} "
        f"evaluations ({len(done)} cells already finished). Images: {counted}.",
        f"Estimate for {rates.label}: {duration(times['total'])} for all of it (CLIP features "
        f"{duration(times['features'])}, trainings {duration(sum(s for _, s in times['trainings']))}"
        f", evaluations {duration(sum(s for _, s in times['evaluations']))}), from the "
        "project's benchmarks with ViT-L/14-336 at S = 518 and SAM ViT-H; smaller models run "
        "faster, and finished cells are skipped.",
        "",
        "trainings:",
    ]  # fmt: skip
    for key, seconds in times["trainings"]:
        config = plan.trainings[key]
        lines.append(f"  {names[key]}  on {config.dataset}, {_head_text(config.head)}, "
                     f"{config.optim.epochs} epochs  ~{duration(seconds)}  {config.workdir}")  # fmt: skip
    lines += ["evaluations:"]
    for key, seconds in times["evaluations"]:
        config, needs = plan.evaluations[key], plan.needs[key]
        head = "zero-shot map" if needs is None else f"head {names[needs]}"
        refine = config.refine
        lines.append(f"  {names[key]}  {config.dataset}, {head}, SAM {refine.sam}, thr "
                     f"{refine.threshold}, Norm {refine.fusion_norm}, PRO {config.pro_mode}  "
                     f"~{duration(seconds)}  {config.output}")  # fmt: skip
    lines += ["cells:"]
    for cell in cells:
        eval_key = plan.cells[cell.id]
        trained = plan.needs[eval_key]
        lines.append(f"  {cell.id:28s} {cell.label:26s} {names[eval_key]}"
                     f"{'' if trained is None else ' ← ' + names[trained]}  {cell.stage}"
                     f"{'  (done)' if cell.id in done else ''}")  # fmt: skip
    data = {"cells": [c.id for c in cells], "trainings": len(plan.trainings),
            "evaluations": len(plan.evaluations), "done": sorted(done), "machine": machine,
            "estimate_seconds": times["total"], "sizes": sizes}  # fmt: skip
    return "\n".join(lines), data


def reproduce(settings: ReproduceConfig, *, runtime: RuntimeConfig = DEFAULT_RUNTIME,
              plan_only: bool = False, demo: bool = False, progress: bool = True) -> dict:  # fmt: skip
    """Run the cells `settings.only` selects (all by default) and write the report under
    `settings.output`; returns report.json's content. `plan_only`: print the plan and its
    estimate instead and return them as data."""
    options.check(settings)
    options.check(runtime)
    cells = select(build_plan(settings), settings.only)
    output = Path(settings.output)
    if plan_only:  # before the data is there, too: sizes not on disk are the published ones
        plan = schedule(cells, output)
        text, data = describe(cells, plan, finished(cells, plan, output), settings)
        print(text)
        return data
    check_inputs(settings, cells)
    with hold(output, "reproduction"):
        runtime = _use_compilation_cache(runtime, output)
        records = run_cells(cells, output, runtime=runtime, progress=progress,
                            refiners=_refiner_cache(runtime))  # fmt: skip
        report = report_lib.build(cells, records, config_lib.to_dict(settings), demo=demo)
        report_lib.write(output, report)
    return report


def _use_compilation_cache(runtime: RuntimeConfig, output: Path) -> RuntimeConfig:
    """JAX's persistent compilation cache: the plan's trainings and evaluations repeat programs
    (the same head on two datasets, one head under several thresholds), which then compile
    once, in this run and the next. The folder is runtime.compilation_cache, else the one the
    process already uses (JAX_COMPILATION_CACHE_DIR), else OUTPUT/compilation_cache; JAX keeps
    it per process. Returns the runtime with the folder in use."""
    import jax

    folder = runtime.compilation_cache or jax.config.jax_compilation_cache_dir
    folder = folder or str(output / "compilation_cache")
    Path(folder).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    return dataclasses.replace(runtime, compilation_cache=folder)


def _refiner_cache(runtime: RuntimeConfig):
    """refiners(eval_config): one refiner per SAM setting, built on first use and shared by
    every evaluation (SAM ViT-H takes seconds to load, and minutes to compile)."""
    from clipsam_jax.refine.registry import build_refiner

    built = {}

    def refiners(evaluation):
        refine = evaluation.refine
        key = (refine.sam, refine.sam_checkpoint, refine.download_sam, refine.sam_dtype)
        if key not in built:
            built[key] = build_refiner(refine, runtime)
        return built[key]

    return refiners
