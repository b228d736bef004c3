"""Per-class aggregation and result tables (Markdown and CSV), in the paper's layout.

Tables show one row per class plus a `mean` row, values in percent with one decimal; with
final (refined) results the rough block and the final block sit side by side.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from clipsam_jax.metrics.common import METRIC_KEYS

DEFAULT_COLUMNS = ("pixel_auroc", "pixel_f1_max", "pixel_ap", "pro")
COLUMN_TITLES = {"pixel_auroc": "AUROC", "pixel_f1_max": "F1-max", "pixel_ap": "AP", "pro": "PRO",
                 "image_auroc": "I-AUROC", "image_f1_max": "I-F1-max", "image_ap": "I-AP"}  # fmt: skip
PerClass = Mapping[str, Mapping[str, float]]


def mean_over_classes(per_class: PerClass, keys: Iterable[str] | None = None) -> dict[str, float]:
    """Unweighted mean over classes of each metric, IGNORING nan values.

    A class whose metric is nan (undefined, e.g. a class without anomalies) is left out of that
    metric's mean only; a metric that is nan (or missing) in every class has mean nan.

    Args:
      per_class: {class: {metric: value}}; other entries (e.g. "n_images") are ignored unless
        named in `keys`.
      keys: metrics to average; default: the metric keys (METRIC_KEYS) present in any class.

    Returns:
      {metric: mean} as Python floats.
    """
    if keys is None:
        present = {k for values in per_class.values() for k in values}
        keys = [k for k in METRIC_KEYS if k in present]
    means = {}
    for key in keys:
        vals = [float(v[key]) for v in per_class.values() if key in v and not _isnan(v[key])]
        means[key] = math.fsum(vals) / len(vals) if vals else float("nan")
    return means


def format_table(
    per_class_rough: PerClass,
    per_class_final: PerClass | None = None,
    columns: Sequence[str] = DEFAULT_COLUMNS,
) -> tuple[str, str]:
    """Markdown and CSV tables: a row per class and a `mean` row (nan-skipping, see above).

    Args:
      per_class_rough: {class: {metric: fraction in [0, 1]}} of the rough maps.
      per_class_final: the same for the final (refined) maps, or None for rough only.
      columns: metric keys, in order (default: pixel AUROC, F1-max, AP, PRO as in the paper).

    Returns:
      (markdown, csv). Values are percentages with one decimal; undefined ones read "nan".
      Classes are listed in the order of `per_class_rough` (then any only in the final one).
    """
    blocks = [("rough", per_class_rough)]
    if per_class_final is not None:
        blocks.append(("final", per_class_final))
    classes = list(per_class_rough)
    classes += [c for c in per_class_final or {} if c not in per_class_rough]
    means = {name: mean_over_classes(table, columns) for name, table in blocks}

    headers = [f"{COLUMN_TITLES.get(c, c)} ({name})" for name, _ in blocks for c in columns]
    csv_headers = [f"{c}_{name}" for name, _ in blocks for c in columns]
    rows = [
        [cls] + [_pct(table.get(cls, {}).get(c)) for _, table in blocks for c in columns]
        for cls in classes
    ]
    rows.append(["mean"] + [_pct(means[name][c]) for name, _ in blocks for c in columns])

    markdown = _markdown(["class", *headers], rows)
    csv = "\n".join(",".join(_csv_cell(x) for x in r) for r in [["class", *csv_headers], *rows])
    return markdown, csv + "\n"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table with the class column left-aligned and numbers right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|:--" + "|--:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _pct(value) -> str:
    """A fraction as a percentage with one decimal; missing or nan → 'nan'."""
    if value is None or _isnan(value):
        return "nan"
    return f"{100.0 * float(value):.1f}"


def _csv_cell(text: str) -> str:
    """Quote a CSV cell when it holds a comma, quote or newline (class names are free text)."""
    if any(ch in text for ch in ',"\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def _isnan(value) -> bool:
    """True for nan of any float type (numpy scalars included)."""
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False
