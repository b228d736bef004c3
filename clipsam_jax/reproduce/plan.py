"""The paper's experiments as a plan of cells (docs/method.md §8).

A cell is one row of a published table: the head's training (a `TrainConfig`, or None for the
zero-shot map), the evaluation (an `EvalConfig`), the stage whose metrics the row reports
(final = after MMR, rough = the head's map) and the published numbers (`paper.json`). The
"open" cells rerun the main row under each choice the paper leaves open, the "fewshot" cells
it with k reference images (beside APRIL-GAN's few-shot numbers, `aprilgan_few_shot.json`). Cells whose configs
are equal share one training or one evaluation (see `runner.schedule`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from clipsam_jax.config import (
    DEFAULT_CLIP,
    ClipConfig,
    EvalConfig,
    FewShotConfig,
    HeadConfig,
    OptimConfig,
    RefineConfig,
    TrainConfig,
)
from clipsam_jax.errors import ConfigError
from clipsam_jax.options import option
from clipsam_jax.refine.registry import refiner_names

METRICS = ("pixel_auroc", "pixel_f1_max", "pixel_ap", "pro")
SECTIONS = ("table1", "table2", "table3", "table4", "open", "fewshot", "refiners")
SECTION_TITLES = {
    "table1": "Table 1: MVTec-AD and VisA, each trained on the other",
    "table2": "Table 2: components, on MVTec-AD",
    "table3": "Table 3: hyperparameters, on MVTec-AD",
    "table4": "Table 4: MTD and KSDD2, trained on MVTec-AD",
    "open": "Open choices: the main MVTec-AD row under each choice the paper leaves open",
    "fewshot": "Few-shot (not in the paper): Table 1's ClipSAM rows given k normal images per "
    "class",
    "refiners": "Refiners: Table 1's ClipSAM rows with each refiner",
}
MAIN_CELL = "table1/clipsam/mvtec"


@dataclass(frozen=True)
class ReproduceConfig:
    """What `python -m eval.reproduce` runs; unset fields keep the method's defaults."""

    data_root: str = option("data", "folder holding mvtec/, visa/, mtd/ and ksdd2/, each in its "
                            "dataset's own layout")  # fmt: skip
    clip: str = option(DEFAULT_CLIP, "CLIP hub id or local directory")
    image_size: int | None = option(None, "input size S (default: the method's, 518)", minimum=1)
    sam: str | None = option(None, "MMR's refiner (default: the method's, SAM ViT-H)",
                             choices=refiner_names)  # fmt: skip
    sam_checkpoint: str | None = option(None, "SAM weights file, e.g. sam_vit_h_4b8939.pth")
    output: str = option("reproduction", "folder of the runs, the evaluations and the report")
    only: tuple[str, ...] | None = option(
        None, "comma-separated tables (table1..table4, open), table groups (table3/threshold) "
        "or cell ids (table1/clipsam/visa); default: every cell")  # fmt: skip
    epochs: int | None = option(
        None, "training epochs of a QUICK run (default: the paper's 6, Sec. 4.1); the report "
        "marks any other value", minimum=1)  # fmt: skip
    seed: int = option(0, "seed of every training and of MMR's point sampling")
    panels: int | None = option(None, "evaluation panels per class (default: eval.main's)",
                                minimum=0)  # fmt: skip
    shots: tuple[int, ...] = option(
        (1, 2, 4), "k of the few-shot rows: Table 1's ClipSAM rows given k normal images per "
        "class (eval.main --shots k), beside APRIL-GAN's few-shot numbers", minimum=1)  # fmt: skip
    refiners: tuple[str, ...] | None = option(
        None, "more refiners for Table 1's ClipSAM rows, side by side with --sam's: each NAME or "
        "NAME=CHECKPOINT, e.g. hq_vit_h=weights/sam_hq_vit_h.pth")  # fmt: skip


@dataclass(frozen=True)
class Cell:
    """One row: `train` None = zero-shot map; `paper` the published numbers (percent, in
    `METRICS` order), for "open" cells those of the main row; `label` the row's name in its
    table; `sweep` (parameter, value) for Table 3's line plots."""

    id: str
    label: str
    dataset: str
    train: TrainConfig | None
    eval: EvalConfig
    stage: Literal["final", "rough"]
    paper: tuple[float | None, ...]  # None: not on record
    sweep: tuple[str, str] | None = None

    @property
    def section(self) -> str:
        return self.id.split("/")[0]


def paper_numbers() -> dict[str, tuple[float, ...]]:
    """{cell id: the published row (percent, `METRICS` order)} from paper.json."""
    data = json.loads(resources.files(__package__).joinpath("paper.json").read_text())
    if tuple(data["metrics"]) != METRICS:
        raise ValueError(f"paper.json lists the metrics {data['metrics']}, expected {METRICS}")
    return {key: tuple(values) for key, values in data["rows"].items()}


def few_shot_numbers() -> tuple[str, dict[str, tuple[float | None, ...]]]:
    """(source, {cell id: APRIL-GAN's few-shot row, percent, `METRICS` order, None where not on
    record}) from aprilgan_few_shot.json."""
    data = json.loads(resources.files(__package__).joinpath("aprilgan_few_shot.json").read_text())
    if tuple(data["metrics"]) != METRICS:
        raise ValueError(f"aprilgan_few_shot.json lists {data['metrics']}, expected {METRICS}")
    return data["source"], {key: tuple(values) for key, values in data["rows"].items()}


def _training(settings: ReproduceConfig, dataset: str, **head) -> TrainConfig:
    clip = ClipConfig(model=settings.clip, **_given(image_size=settings.image_size))
    optim = OptimConfig(**_given(epochs=settings.epochs))
    return TrainConfig(dataset=dataset, data_root=str(Path(settings.data_root) / dataset),
                       seed=settings.seed, clip=clip, head=HeadConfig(**head), optim=optim)  # fmt: skip


def _evaluation(settings: ReproduceConfig, dataset: str, *, no_umci: bool = False,
                pro_mode: str = "mvtec", **refine) -> EvalConfig:  # fmt: skip
    refine = {**_given(sam=settings.sam, sam_checkpoint=settings.sam_checkpoint), **refine}
    # A trained head brings its own CLIP settings; the zero-shot map takes them from here.
    clip = ClipConfig(model=settings.clip, **_given(image_size=settings.image_size))
    given = tuple(f.name for f in dataclasses.fields(ClipConfig)
                  if getattr(clip, f.name) != getattr(ClipConfig(), f.name)) if no_umci else ()  # fmt: skip
    return EvalConfig(dataset=dataset, data_root=str(Path(settings.data_root) / dataset),
                      no_umci=no_umci, pro_mode=pro_mode, seed=settings.seed,
                      refine=RefineConfig(**refine), clip=clip if no_umci else ClipConfig(),
                      clip_given=given, **_given(visualize_per_class=settings.panels))  # fmt: skip


def _given(**values) -> dict:
    return {k: v for k, v in values.items() if v is not None}


def build_plan(settings: ReproduceConfig) -> list[Cell]:
    """Every cell, in report order (`select` keeps those `settings.only` names)."""
    paper = paper_numbers()
    main = paper[MAIN_CELL]
    cells: list[Cell] = []

    def add(id, label, dataset, train, evaluation, stage="final", sweep=None, numbers=None):
        cells.append(Cell(id, label, dataset, train, evaluation, stage,
                          numbers or paper[id], sweep))  # fmt: skip

    def on_visa(**head) -> TrainConfig:  # MVTec-AD's rows are trained on VisA
        return _training(settings, "visa", **head)

    aprilgan_eval = dict(sam="none")
    for tested, trained_on in (("mvtec", "visa"), ("visa", "mvtec")):
        add(f"table1/clipsam/{tested}", "ClipSAM", tested, _training(settings, trained_on),
            _evaluation(settings, tested))  # fmt: skip
    for tested, trained_on in (("mvtec", "visa"), ("visa", "mvtec")):
        add(f"table1/aprilgan/{tested}", "APRIL-GAN", tested,
            _training(settings, trained_on, kind="aprilgan"),
            _evaluation(settings, tested, **aprilgan_eval), stage="rough")  # fmt: skip

    on_mvtec = _evaluation(settings, "mvtec")
    add("table2/only_strip", "only strip path", "mvtec", on_visa(paths="strip"),
        on_mvtec)  # fmt: skip
    add("table2/only_scale", "only scale path", "mvtec", on_visa(paths="scale"),
        on_mvtec)  # fmt: skip
    add("table2/no_umci", "w/o UMCI", "mvtec", None, _evaluation(settings, "mvtec", no_umci=True))
    add("table2/no_mmr", "w/o MMR", "mvtec", on_visa(), on_mvtec, stage="rough")
    add("table2/clipsam", "ClipSAM", "mvtec", on_visa(), on_mvtec)

    for value in (194, 256, 384):
        add(f"table3/hidden_dim/{value}", f"c_h = {value}", "mvtec",
            on_visa(hidden_dim=value), on_mvtec,
            sweep=("hidden_dim", str(value)))  # fmt: skip
    for pools in ((2, 4), (3, 9), (6, 10)):
        text = ",".join(map(str, pools))
        add(f"table3/pool_sizes/{text}", f"s1 & s2 = {pools[0]} & {pools[1]}", "mvtec",
            on_visa(pool_sizes=pools), on_mvtec,
            sweep=("pool_sizes", text))  # fmt: skip
    for threshold in ("0.45", "0.47", "0.50"):
        add(f"table3/threshold/{threshold}", f"thr = {threshold}", "mvtec",
            on_visa(), _evaluation(settings, "mvtec", threshold=float(threshold)),
            sweep=("threshold", threshold))  # fmt: skip

    for tested in ("mtd", "ksdd2"):
        add(f"table4/clipsam/{tested}", "ClipSAM", tested, _training(settings, "mvtec"),
            _evaluation(settings, tested))  # fmt: skip
    for tested in ("mtd", "ksdd2"):
        add(f"table4/aprilgan/{tested}", "APRIL-GAN", tested,
            _training(settings, "mvtec", kind="aprilgan"),
            _evaluation(settings, tested, **aprilgan_eval), stage="rough")  # fmt: skip

    main_train = on_visa()
    choices = (
        ("fusion_norm", ("max", "minmax", "none"), "Norm = {}",
         lambda v: (main_train, _evaluation(settings, "mvtec", fusion_norm=v))),
        ("pro", ("mvtec", "cflow"), "PRO: {}",
         lambda v: (main_train, _evaluation(settings, "mvtec", pro_mode=v))),
        ("stage_average", ("probabilities", "logits"), "stage average of {}",
         lambda v: (on_visa(stage_average=v), on_mvtec)),
        ("init", ("pytorch", "flax"), "{} initialization",
         lambda v: (on_visa(init=v), on_mvtec)),
    )  # fmt: skip
    for name, values, label, configs in choices:
        for value in values:
            train, evaluation = configs(value)
            add(f"open/{name}/{value}", label.format(value), "mvtec", train, evaluation,
                sweep=(name, value), numbers=main)  # fmt: skip

    _, few_shot = few_shot_numbers()
    for shots in settings.shots:  # Table 1's heads and evaluations, k references per class
        for tested, trained_on in (("mvtec", "visa"), ("visa", "mvtec")):
            cell = f"fewshot/{shots}-shot/{tested}"
            evaluation = dataclasses.replace(_evaluation(settings, tested),
                                             few_shot=FewShotConfig(shots=shots))  # fmt: skip
            add(
                cell,
                f"k = {shots}",
                tested,
                _training(settings, trained_on),
                evaluation,
                sweep=("shots", str(shots)),
                numbers=few_shot.get(cell, (None,) * len(METRICS)),
            )

    if settings.refiners:  # the main refiner first, then each other one; the same heads
        refiners = dict([(settings.sam or RefineConfig().sam, settings.sam_checkpoint)])
        for name, checkpoint in map(_refiner_and_file, settings.refiners):
            refiners.setdefault(name, checkpoint)  # --sam's own is listed once
        for name, checkpoint in refiners.items():
            for tested, trained_on in (("mvtec", "visa"), ("visa", "mvtec")):
                evaluation = _evaluation(settings, tested, sam=name, sam_checkpoint=checkpoint)
                add(f"refiners/{name}/{tested}", name, tested, _training(settings, trained_on),
                    evaluation, sweep=("refiner", name),
                    numbers=paper[f"table1/clipsam/{tested}"])  # fmt: skip
    return cells


def _refiner_and_file(text: str) -> tuple[str, str | None]:
    """ "hq_vit_h=weights/sam_hq_vit_h.pth" → (name, file); "hq_vit_b" → (name, None)."""
    name, _, checkpoint = text.partition("=")
    if name not in refiner_names():
        raise ConfigError(
            f"--refiners {name}: unknown refiner; known: {', '.join(refiner_names())}"
        )
    return name, checkpoint or None


def select(cells: list[Cell], only: tuple[str, ...] | None) -> list[Cell]:
    """The cells named by `only` (sections, groups such as table3/threshold, or cell ids);
    an unknown name raises `ConfigError` listing what exists."""
    if not only:
        return cells
    known = {c.id for c in cells} | {"/".join(c.id.split("/")[:n]) for c in cells for n in (1, 2)}
    unknown = [name for name in only if name.strip("/") not in known]
    if unknown:
        groups = sorted({"/".join(c.id.split("/")[:2]) for c in cells})
        raise ConfigError(f"--only {','.join(unknown)}: no such table or cell; tables: "
                          f"{', '.join(SECTIONS)}; groups: {', '.join(groups)}")  # fmt: skip
    names = [name.strip("/") for name in only]
    return [c for c in cells if any(c.id == n or c.id.startswith(n + "/") for n in names)]
