"""`python -m eval.reproduce`: the plan of cells, the shared jobs, the estimate, the report, and
the whole plan end to end on generated data (`--demo`)."""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import eval.main
import eval.reproduce
import train.main
from clipsam_jax.config import EvalConfig
from clipsam_jax.errors import ConfigError
from clipsam_jax.reproduce import estimate, report
from clipsam_jax.reproduce.plan import METRICS, ReproduceConfig, build_plan, paper_numbers, select
from clipsam_jax.reproduce.runner import load_record, run_cells, schedule

ROOT = Path(__file__).resolve().parent.parent

# The paper's digits, typed from its Tables 1-4 (AUROC, F1-max, AP, PRO; percent).
PUBLISHED = {
    "table1/clipsam/mvtec": (92.3, 47.8, 45.9, 88.3),
    "table1/clipsam/visa": (95.6, 33.1, 26.0, 87.5),
    "table1/aprilgan/mvtec": (87.6, 43.3, 40.8, 44.0),
    "table1/aprilgan/visa": (94.2, 32.3, 25.7, 86.8),
    "table2/only_strip": (90.8, 44.3, 34.9, 79.6),
    "table2/only_scale": (90.9, 44.4, 42.7, 81.9),
    "table2/no_umci": (60.4, 19.7, 25.0, 34.7),
    "table2/no_mmr": (91.8, 46.7, 44.7, 84.8),
    "table2/clipsam": (92.3, 47.8, 45.9, 88.3),
    "table3/hidden_dim/194": (91.8, 45.6, 43.8, 83.1),
    "table3/hidden_dim/256": (91.7, 46.4, 44.6, 83.6),
    "table3/hidden_dim/384": (92.3, 47.8, 45.9, 88.3),
    "table3/pool_sizes/2,4": (91.9, 45.7, 45.3, 85.1),
    "table3/pool_sizes/3,9": (92.3, 47.8, 45.9, 88.3),
    "table3/pool_sizes/6,10": (91.8, 46.8, 44.7, 84.9),
    "table3/threshold/0.45": (91.5, 43.3, 44.9, 82.5),
    "table3/threshold/0.47": (92.3, 47.8, 45.9, 88.3),
    "table3/threshold/0.50": (91.7, 44.6, 43.4, 83.2),
    "table4/clipsam/mtd": (88.0, 55.2, 51.9, 71.3),
    "table4/clipsam/ksdd2": (90.7, 67.2, 67.9, 88.8),
    "table4/aprilgan/mtd": (51.1, 16.6, 9.8, 17.2),
    "table4/aprilgan/ksdd2": (52.1, 10.7, 9.3, 13.3),
}
# The demo adds the tiny HQ-SAM and SAM 2.1 beside the tiny SAM for Table 1's rows (the [hq]
# and [sam2] extras).
DEMO_REFINERS = tuple(f"refiners/{name}/{data}" for name in ("tiny-random", "tiny-random-hq",
                      "tiny-random-sam2") for data in ("mvtec", "visa"))  # fmt: skip
# Table 1's ClipSAM rows given k normal images per class (APRIL-GAN's few-shot ks).
FEW_SHOT = tuple(f"fewshot/{k}-shot/{data}" for k in (1, 2, 4) for data in ("mvtec", "visa"))
OPEN_CHOICES = ("open/fusion_norm/max", "open/fusion_norm/minmax", "open/fusion_norm/none",
                "open/pro/mvtec", "open/pro/cflow", "open/stage_average/probabilities",
                "open/stage_average/logits", "open/init/pytorch", "open/init/flax")  # fmt: skip


# APRIL-GAN's few-shot means: pixel AUROC, pixel F1-max, pixel AP, PRO (percent).
APRIL_GAN_FEW_SHOT = {
    "fewshot/1-shot/mvtec": (95.1, 54.2, None, 90.6),
    "fewshot/1-shot/visa": (96.0, 38.5, None, 90.0),
    "fewshot/2-shot/mvtec": (95.5, 55.9, None, 91.3),
    "fewshot/2-shot/visa": (96.2, 39.3, None, 90.1),
    "fewshot/4-shot/mvtec": (95.9, 56.9, None, 91.8),
    "fewshot/4-shot/visa": (96.2, 40.0, None, 90.2),
}


def test_the_published_numbers_are_the_papers_digits():
    assert paper_numbers() == PUBLISHED
    cells = {c.id: c for c in build_plan(ReproduceConfig())}
    assert list(cells) == [*PUBLISHED, *OPEN_CHOICES, *FEW_SHOT]
    for cell_id, cell in cells.items():
        if cell_id in FEW_SHOT:  # APRIL-GAN's few-shot rows; pixel AP not on record
            assert cell.paper == APRIL_GAN_FEW_SHOT[cell_id], cell_id
            assert cell.eval.few_shot.shots == int(cell_id.split("/")[1][0]), cell_id
            continue
        expected = PUBLISHED.get(cell_id, PUBLISHED["table1/clipsam/mvtec"])  # open: main row
        assert cell.paper == expected, cell_id


def test_cells_share_trainings_and_evaluations():
    cells = build_plan(ReproduceConfig(data_root="d", epochs=3))
    plan = schedule(cells, Path("out"))
    # 10 heads trained on VisA (main, APRIL-GAN, 2 paths, 2 widths, 2 pools, 2 open choices)
    # and 2 on MVTec-AD (main, APRIL-GAN); w/o UMCI trains nothing. The few-shot rows evaluate
    # Table 1's heads again, with 1, 2 and 4 references: 6 evaluations, no training.
    assert len(plan.trainings) == 12 and len(plan.evaluations) == 22 + 6
    for k in (1, 2, 4):
        few = f"fewshot/{k}-shot/mvtec"
        assert plan.needs[plan.cells[few]] == plan.needs[plan.cells["table1/clipsam/mvtec"]]
    main = plan.cells["table1/clipsam/mvtec"]
    sharing = sorted(c for c, key in plan.cells.items() if key == main)
    assert sharing == sorted(["table1/clipsam/mvtec", "table2/no_mmr", "table2/clipsam",
                              "table3/hidden_dim/384", "table3/pool_sizes/3,9",
                              "table3/threshold/0.47", "open/fusion_norm/max", "open/pro/mvtec",
                              "open/stage_average/probabilities", "open/init/pytorch"])  # fmt: skip
    by_id = {c.id: c for c in cells}
    assert by_id["table2/no_mmr"].stage == "rough" and by_id["table2/clipsam"].stage == "final"
    # The threshold sweep and the Norm and PRO choices evaluate the main head again.
    for cell_id in ("table3/threshold/0.45", "open/fusion_norm/none", "open/pro/cflow"):
        assert plan.cells[cell_id] != main and plan.needs[plan.cells[cell_id]] == plan.needs[main]
    assert plan.needs[plan.cells["table2/no_umci"]] is None
    assert len({t.feature_cache_dir for t in plan.trainings.values()}) == 1  # one cache
    assert {t.optim.epochs for t in plan.trainings.values()} == {3}
    assert {e.data_root for e in plan.evaluations.values()} == {
        str(Path("d") / name) for name in ("mvtec", "visa", "mtd", "ksdd2")
    }
    assert by_id["table1/aprilgan/visa"].train.head.kind == "aprilgan"
    assert by_id["table1/aprilgan/visa"].eval.refine.sam == "none"
    assert by_id["table3/pool_sizes/6,10"].train.head.pool_sizes == (6, 10)
    assert by_id["table2/only_scale"].train.head.paths == "scale"
    assert by_id["open/init/flax"].train.head.init == "flax"


def test_other_refiners_rerun_table1s_rows_with_its_heads():
    settings = ReproduceConfig(sam_checkpoint="sam.pth",
                               refiners=("hq_vit_b=hq.pth", "vit_b", "vit_h"))  # fmt: skip
    cells = select(build_plan(settings), ("table1/clipsam", "refiners"))
    plan = schedule(cells, Path("out"))
    by_id = {c.id: c for c in cells}
    assert [c.id for c in cells][2:] == [f"refiners/{name}/{tested}" for name in
                                         ("vit_h", "hq_vit_b", "vit_b")
                                         for tested in ("mvtec", "visa")]  # fmt: skip
    assert plan.cells["refiners/vit_h/visa"] == plan.cells["table1/clipsam/visa"]  # shared
    assert len(plan.trainings) == 2 and len(plan.evaluations) == 6
    hq = by_id["refiners/hq_vit_b/mvtec"].eval.refine
    assert (hq.sam, hq.sam_checkpoint) == ("hq_vit_b", "hq.pth")
    assert by_id["refiners/vit_b/mvtec"].eval.refine.sam_checkpoint is None
    assert by_id["refiners/hq_vit_b/visa"].paper == PUBLISHED["table1/clipsam/visa"]
    with pytest.raises(ConfigError, match="--refiners sam3: unknown refiner; known: vit_h"):
        build_plan(ReproduceConfig(refiners=("sam3",)))


def test_only_selects_tables_groups_and_cells():
    cells = build_plan(ReproduceConfig())
    chosen = [c.id for c in select(cells, ("table1", "table3/threshold", "open/init/flax"))]
    assert chosen == [*list(PUBLISHED)[:4], *list(PUBLISHED)[15:18], "open/init/flax"]
    with pytest.raises(ConfigError, match="--only table5: no such table or cell; tables: table1"):
        select(cells, ("table5",))


def test_each_cells_commands_rebuild_its_configs():
    """The commands in a cell's record parse back to the configs the plan runs."""
    settings = ReproduceConfig(data_root="d", clip="weights/clip", image_size=336, epochs=2,
                               sam_checkpoint="sam.pth", panels=1, seed=3)  # fmt: skip
    plan = schedule(build_plan(settings), Path("out"))
    for eval_key, evaluation in plan.evaluations.items():
        training = plan.trainings.get(plan.needs[eval_key])
        lines = [shlex.split(line) for line in _commands(training, evaluation)]
        if training is not None:
            assert lines[0][:3] == ["python", "-m", "train.main"]
            assert train.main.config_from_args(train.main.parse(lines[0][3:])) == training
        parsed = eval.main.config_from_args(eval.main.parse(lines[-1][3:]))
        assert parsed == evaluation, evaluation.output


def _commands(training, evaluation):
    from clipsam_jax.reproduce.runner import commands

    return commands(training, evaluation)


def test_estimate_by_hand():
    cells = select(build_plan(ReproduceConfig()), ("table1/clipsam/mvtec", "table1/aprilgan/visa"))
    plan = schedule(cells, Path("out"))
    rates = estimate.Throughput("test", clip_features=10, train_step=20, rough_maps=40,
                                end_to_end=5, setup_seconds=3)  # fmt: skip
    times = estimate.estimate(plan, {"mvtec": (100, True), "visa": (200, True)}, rates)
    # UMCI on VisA: 200 images x 6 epochs / 20 + 3; APRIL-GAN on MVTec-AD: 100 x 6 / 20 + 3.
    assert [s for _, s in times["trainings"]] == [63, 33]
    assert times["features"] == 200 / 10 + 100 / 10  # one pass per dataset and image size
    # MVTec-AD through SAM: 100 / 5 + 3; VisA, rough maps only: 200 / 40 + 3.
    assert [s for _, s in times["evaluations"]] == [23, 8]
    assert times["total"] == 63 + 33 + 30 + 23 + 8
    assert estimate.duration(45) == "45 s" and estimate.duration(7260) == "2 h 01 min"


def test_throughputs_are_the_benchmarks_figures():
    for machine in estimate.figures()["machines"].values():
        for name, figure in machine["figures"].items():
            node = json.loads((ROOT / figure["file"]).read_text())
            for key in figure["key"].split("/"):
                node = node[key]
            assert node == figure["value"], name
    cpu = estimate.throughput("cpu")
    rough, sam = (estimate.figures()["machines"]["cpu"]["figures"][k]["value"]
                  for k in ("rough_maps", "sam_encoder"))  # fmt: skip
    assert math.isclose(1 / cpu.end_to_end, 1 / rough + 1 / sam)  # stages one after the other


def test_plan_flag_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    output = tmp_path / "out"
    data = eval.reproduce.main(["--plan", "--data-root", str(tmp_path / "none"), "--output",
                                str(output), "--only", "table1,table4"])  # fmt: skip
    text = capsys.readouterr().out
    assert "8 cells: 4 trainings, 8 evaluations (0 cells already finished)" in text
    assert "mtd 1317 (published size)" in text and "Estimate for" in text
    assert "table4/aprilgan/ksdd2" in text and data["trainings"] == 4
    assert data["estimate_seconds"] > 0
    assert not output.exists()


def _record(metrics=None, status="ok", epochs=6, error=None):
    protocol = {"pro_mode": "mvtec", "fusion_norm": "max", "threshold": 0.47, "sam": "vit_h",
                "image_size": 518, "clip_dtype": "bfloat16", "head_dtype": "float32",
                "seed": 0, "epochs": epochs, "init": "pytorch", "stage_average": "probabilities",
                "checkpoint_step": 1, "metrics_mode": "exact"}  # fmt: skip
    return {"status": status, "error": error, "metrics": metrics,
            "protocol": protocol if metrics else None, "evaluation": "e", "commands": []}  # fmt: skip


def test_report_rows_hand_computed():
    cells = select(build_plan(ReproduceConfig()), ("table1",))
    halves = dict.fromkeys(METRICS, 0.5)
    records = {
        "table1/clipsam/mvtec": _record(dict(zip(METRICS, (0.9, 0.5, 0.4, 0.8), strict=True))),
        "table1/clipsam/visa": _record(status="failed", error="training failed: boom"),
        "table1/aprilgan/mvtec": _record(halves, epochs=2),
    }
    content = report.build(cells, records, settings={})
    rows = {r["cell"]: r for r in content["sections"]["table1"]["rows"]}
    main = rows["table1/clipsam/mvtec"]
    assert main["ours"]["pixel_auroc"] == pytest.approx(90.0)
    assert main["difference"]["pixel_auroc"] == pytest.approx(90.0 - 92.3)
    assert main["difference"]["pro"] == pytest.approx(80.0 - 88.3)
    assert rows["table1/aprilgan/visa"]["status"] == "not run"
    assert content["counts"] == {"ok": 2, "failed": 1, "not run": 1}
    assert content["quick"] and content["epochs"] == [2, 6]
    assert content["sections"]["table1"]["varies"] == ["epochs"]
    text = report.markdown(content)
    assert "| ClipSAM | mvtec | visa | final | 90.0 / 92.3 (-2.3) |" in text
    assert "failed: training failed: boom" in text and "QUICK RUN: trained 2, 6 epochs" in text
    assert "— / 95.6 (—)" in text and "DEMO" not in text


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The whole plan once, as `python -m eval.reproduce --demo` runs it."""
    output = tmp_path_factory.mktemp("reproduce") / "demo"
    content = eval.reproduce.main(["--demo", "--output", str(output), "--no-progress"])
    return output, content


def test_demo_runs_every_cell_and_reports_it(demo):
    output, content = demo
    assert content["demo"] and content["counts"] == {"ok": 43, "failed": 0, "not run": 0}
    rows = [r for section in content["sections"].values() for r in section["rows"]]
    assert [r["cell"] for r in rows] == [*PUBLISHED, *OPEN_CHOICES, *FEW_SHOT, *DEMO_REFINERS]
    for row in rows:
        main_row = "table1/clipsam/" + ("visa" if row["cell"].endswith("/visa") else "mvtec")
        expected = PUBLISHED.get(row["cell"], PUBLISHED[main_row])
        if row["cell"] in FEW_SHOT:  # APRIL-GAN's rows: pixel AP, not on record, has no difference
            expected = APRIL_GAN_FEW_SHOT[row["cell"]]
            assert row["protocol"]["shots"] == int(row["cell"].split("/")[1][0])
            assert row["difference"]["pixel_ap"] is None
            assert row["difference"]["pro"] == pytest.approx(row["ours"]["pro"] - expected[3])
        assert tuple(row["paper"][m] for m in METRICS) == expected, row["cell"]
        assert all(0 <= row["ours"][m] <= 100 for m in METRICS), row
        trained = row["cell"] != "table2/no_umci"
        assert row["protocol"]["epochs"] == (2 if trained else None), row["cell"]
        refiner = (
            row["cell"].split("/")[1] if row["cell"].startswith("refiners/") else "tiny-random"
        )
        assert row["protocol"]["sam"] == ("none" if "aprilgan" in row["cell"] else refiner)
    # SAM refined something: at thr 0.45 the final maps are not the rough ones (w/o MMR).
    ours = {r["cell"]: r["ours"] for r in rows}
    assert ours["table3/threshold/0.45"] != ours["table2/no_mmr"]
    assert json.loads((output / "report.json").read_text()) == json.loads(json.dumps(content))
    text = (output / "report.md").read_text()
    assert report.DEMO_NOTE in text and "QUICK RUN" in text
    for section in ("table1", "table2", "table3", "table4", "open", "fewshot", "refiners"):
        assert f"figures/{section}.png" in text
        picture = np.asarray(Image.open(output / "figures" / f"{section}.png").convert("L"))
        assert picture.shape[0] > 200 and picture.std() > 10, section  # drawn, not blank
    # Shared work: one folder per distinct training and evaluation, one feature cache.
    assert len(list((output / "runs").iterdir())) == 12
    # + 6 few-shot evaluations, + tiny HQ-SAM's and SAM 2.1's two each
    assert len(list((output / "evals").iterdir())) == 22 + 6 + 4
    assert len(list((output / "feature_cache").iterdir())) == 1  # one CLIP at one size


def test_a_cell_equals_a_separate_eval_main_run(demo, tmp_path):
    output, _ = demo
    record = load_record(output, "table3/threshold/0.45")
    argv = shlex.split(record["commands"][-1])[3:]
    argv[argv.index("--output") + 1] = str(tmp_path / "again")
    again = eval.main.main([*argv, "--cache-dir", str(output / "cache"), "--no-progress"])
    for metric in METRICS:
        assert again["final"]["mean"][metric] == pytest.approx(record["metrics"][metric], abs=1e-9)
    assert record["protocol"]["threshold"] == 0.45 and record["protocol"]["epochs"] == 2


def test_rerun_skips_finished_cells_and_a_failed_cell_is_recorded(demo, capsys):
    output, content = demo
    before = {p: p.stat().st_mtime_ns for p in (output / "cells").iterdir()}
    again = eval.reproduce.main(["--demo", "--output", str(output), "--no-progress"])
    assert again["sections"] == content["sections"]
    assert {p: p.stat().st_mtime_ns for p in (output / "cells").iterdir()} == before
    # A cell whose evaluation cannot run is recorded as failed; the others still finish.
    cells = select(build_plan(_demo_settings(output)), ("table3/threshold",))
    first = load_record(output, cells[0].id)["metrics"]
    broken = dataclasses.replace(cells[0], eval=dataclasses.replace(
        cells[0].eval, data_root=str(output / "missing")))  # fmt: skip
    records = run_cells([broken, *cells[1:]], output, progress=False)
    assert records[broken.id]["status"] == "failed" and "missing" in records[broken.id]["error"]
    assert [records[c.id]["status"] for c in cells[1:]] == ["ok", "ok"]
    # Fixed, the failed cell runs again and matches its first result.
    records = run_cells(cells, output, progress=False)
    assert records[broken.id]["status"] == "ok"
    assert records[broken.id]["metrics"] == first


def _demo_settings(output: Path) -> ReproduceConfig:
    from clipsam_jax.config import RuntimeConfig
    from clipsam_jax.reproduce.demo import prepare

    settings, _ = prepare(ReproduceConfig(output=str(output)), RuntimeConfig())
    return settings


def test_demo_evaluations_are_what_eval_main_defaults_give(demo):
    """Nothing but the plan's switches differs from eval.main's defaults (SAM, epochs and size
    are the demo's)."""
    output, _ = demo
    record = load_record(output, "table1/clipsam/visa")
    evaluation = json.loads((Path(record["evaluation"]) / "metrics.json").read_text())["config"]
    assert evaluation["refine"]["threshold"] == EvalConfig().refine.threshold
    assert evaluation["refine"]["fusion_norm"] == EvalConfig().refine.fusion_norm
    assert evaluation["pro_mode"] == EvalConfig().pro_mode
