"""The reproduction report: report.json, report.md and figures/, one section per table.

Every metric is shown as ours | paper | difference (ours − paper), in percent, mean over
classes, with the protocol that produced it: the settings shared by a section's rows on one
line, the ones that differ per row in the row itself.
"""

from __future__ import annotations

import json
from pathlib import Path

from clipsam_jax.config import OptimConfig
from clipsam_jax.outputs import write_atomic
from clipsam_jax.reproduce import figures
from clipsam_jax.reproduce.plan import METRICS, SECTION_TITLES, SECTIONS, Cell, few_shot_numbers

PAPER_EPOCHS = OptimConfig().epochs  # Sec. 4.1
DEMO_NOTE = ("DEMO: tiny random models on generated data. These numbers exercise the pipeline; "
             "they are NOT ClipSAM results.")  # fmt: skip
FEW_SHOT_SOURCE = few_shot_numbers()[0]
PROTOCOL_NAMES = {
    "pro_mode": "PRO", "fusion_norm": "Norm", "threshold": "thr", "sam": "SAM",
    "image_size": "S", "clip_dtype": "CLIP dtype", "head_dtype": "head dtype", "seed": "seed",
    "epochs": "epochs", "init": "init", "stage_average": "stage average",
    "metrics_mode": "metrics", "shots": "k",
}  # fmt: skip


def _difference(ours: float | None, paper: float | None) -> float | None:
    return None if ours is None or paper is None else ours - paper


def _row(cell: Cell, record: dict | None) -> dict:
    paper = dict(zip(METRICS, cell.paper, strict=True))
    status = "not run" if record is None else record["status"]
    metrics = (record or {}).get("metrics") or {}
    ours = {m: None if metrics.get(m) is None else 100 * metrics[m] for m in METRICS}
    return {
        "cell": cell.id,
        "label": cell.label,
        "value": None if cell.sweep is None else cell.sweep[1],
        "dataset": cell.dataset,
        "trained_on": None if cell.train is None else cell.train.dataset,
        "stage": cell.stage,
        "status": status,
        "error": (record or {}).get("error"),
        "ours": ours,
        "paper": paper,
        "difference": {m: _difference(ours[m], paper[m]) for m in METRICS},
        "protocol": (record or {}).get("protocol"),
        "evaluation": (record or {}).get("evaluation"),
        "commands": (record or {}).get("commands"),
        "seconds": (record or {}).get("seconds"),
    }


def build(cells: list[Cell], records: dict[str, dict | None], settings: dict,
          demo: bool = False) -> dict:  # fmt: skip
    """report.json's content from the cells and their records (None: not run)."""
    rows = [_row(cell, records.get(cell.id)) for cell in cells]
    # Epochs as trained, and as asked for where nothing has finished yet.
    epochs = {r["protocol"]["epochs"] for r in rows if r["protocol"] and r["protocol"]["epochs"]}
    epochs |= {settings["epochs"]} if settings.get("epochs") else set()
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "not run")}
    sections = {}
    for section in SECTIONS:
        members = [r for r in rows if r["cell"].split("/")[0] == section]
        if members:
            shared, varying = _protocol_split(members)
            sections[section] = {"title": SECTION_TITLES[section], "protocol": shared,
                                 "varies": varying, "rows": members}  # fmt: skip
    return {
        "demo": demo,
        "quick": any(e != PAPER_EPOCHS for e in epochs),
        "epochs": sorted(epochs),
        "paper_epochs": PAPER_EPOCHS,
        "metrics": list(METRICS),
        "counts": counts,
        "settings": settings,
        "sections": sections,
    }


def _protocol_split(rows: list[dict]) -> tuple[dict, list[str]]:
    """(settings equal in every finished row, names of those that differ between rows). None
    is "does not apply" (the zero-shot row has no epochs) and differs from nothing."""
    values: dict[str, set] = {}
    for row in rows:
        for key, value in (row["protocol"] or {}).items():
            if key in PROTOCOL_NAMES and value is not None:
                values.setdefault(key, set()).add(json.dumps(value))
    varying = sorted(k for k, seen in values.items() if len(seen) > 1)
    shared = {k: json.loads(next(iter(seen))) for k, seen in values.items() if len(seen) == 1}
    return shared, varying


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def _protocol_text(protocol: dict, names: list[str] | None = None) -> str:
    keys = names if names is not None else list(protocol)
    return ", ".join(f"{PROTOCOL_NAMES[k]} {protocol[k]}" for k in keys
                     if k in PROTOCOL_NAMES and protocol.get(k) is not None)  # fmt: skip


def markdown(report: dict) -> str:
    """report.md: a banner for demo and quick runs, then a table and a figure per section."""
    lines = ["# ClipSAM reproduction", ""]
    if report["demo"]:
        lines += [f"**{DEMO_NOTE}**", ""]
    if report["quick"]:
        lines += [f"**QUICK RUN: trained {', '.join(map(str, report['epochs']))} epochs instead "
                  f"of the paper's {report['paper_epochs']} (Sec. 4.1).**", ""]  # fmt: skip
    settings = ", ".join(f"{k} {v}" for k, v in report["settings"].items()
                         if v is not None and k in ("data_root", "clip", "image_size", "sam"))  # fmt: skip
    if settings:
        lines += [f"Settings: {settings}.", ""]
    counts = report["counts"]
    lines += [f"Cells: {counts['ok']} finished, {counts['failed']} failed, {counts['not run']} "
              "not run. Each metric reads **ours / paper (ours − paper)**: pixel-level, percent, "
              "mean over classes; the stage column says which map is scored (final = after "
              "MMR, rough = the CLIP stage's map).", ""]  # fmt: skip
    header = "| row | tested | trained on | stage | " + " | ".join(
        figures.METRIC_NAMES[m] for m in report["metrics"]) + " | protocol / status |"  # fmt: skip
    for section, content in report["sections"].items():
        lines += [f"## {content['title']}", ""]
        if content["protocol"]:
            lines += [f"Protocol: {_protocol_text(content['protocol'])}.", ""]
        lines += [header, "|" + "---|" * (5 + len(report["metrics"]))]
        for row in content["rows"]:
            values = [f"{_number(row['ours'][m])} / {_number(row['paper'][m])} "
                      f"({_number(row['difference'][m], signed=True)})" for m in report["metrics"]]  # fmt: skip
            if row["status"] == "ok":
                note = _protocol_text(row["protocol"], content["varies"])
            else:
                note = row["status"] + (f": {row['error']}" if row["error"] else "")
            lines.append(f"| {row['label']} | {row['dataset']} | {row['trained_on'] or '—'} | "
                         f"{row['stage']} | " + " | ".join(values) + f" | {note} |")  # fmt: skip
        if section == "open":
            lines += ["", "The paper column is the main row (Table 1, MVTec-AD): a choice whose "
                      "difference is smaller moves our numbers towards the paper's."]  # fmt: skip
        if section == "fewshot":
            lines += ["", f"The paper column is {FEW_SHOT_SOURCE}; ours are ClipSAM (Table 1's "
                      "heads, with MMR) given k normal images per class (`--shots k`)."]  # fmt: skip
        if section == "refiners":
            lines += ["", "The paper column is Table 1's ClipSAM row (SAM ViT-H); the heads are "
                      "Table 1's, only the refiner differs."]  # fmt: skip
        lines += ["", f"![{content['title']}](figures/{section}.png)", ""]
    lines += ["## Commands", "",
              "Each cell's record in `cells/` holds the `train.main` / `eval.main` commands that "
              "rebuild it by hand, its evaluation folder and its full protocol.", ""]  # fmt: skip
    return "\n".join(lines)


def draw(report: dict) -> dict[str, bytes]:
    """{section: PNG bytes}: line plots for Table 3's sweeps, bars for the other sections."""
    note = DEMO_NOTE if report["demo"] else ""
    if report["quick"] and not report["demo"]:
        note = f"QUICK RUN: {', '.join(map(str, report['epochs']))} epochs"
    metrics = tuple(report["metrics"])
    pictures = {}
    for section, content in report["sections"].items():
        title = content["title"]
        if section == "table3":
            groups: dict[str, list[dict]] = {}
            for row in content["rows"]:
                groups.setdefault(row["cell"].split("/")[1], []).append(row)
            pictures[section] = figures.sweeps(title, groups, metrics, note)
        else:
            rows = [{**row, "label": _bar_label(row, section)} for row in content["rows"]]
            pictures[section] = figures.bars(title, rows, metrics, note)
    return pictures


def _bar_label(row: dict, section: str) -> str:
    return row["label"] if section in ("table2", "open") else f"{row['label']}\n{row['dataset']}"


def write(output: Path, report: dict) -> None:
    """report.json, report.md and figures/<section>.png under `output`, each written whole."""
    (output / "figures").mkdir(parents=True, exist_ok=True)
    for section, png in draw(report).items():
        write_atomic(output / "figures" / f"{section}.png", png)
    write_atomic(output / "report.json", json.dumps(report, indent=2))
    write_atomic(output / "report.md", markdown(report))
