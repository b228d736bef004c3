"""The report's figures: ours against the paper, bars per table row and lines per Table 3 sweep.

Drawn with matplotlib's object API on an Agg canvas (no pyplot state, no display needed) and
written as PNG bytes; missing numbers (failed or unrun cells) are left out of the drawing.
"""

from __future__ import annotations

import io

import numpy as np

METRIC_NAMES = {"pixel_auroc": "AUROC", "pixel_f1_max": "F1-max", "pixel_ap": "AP", "pro": "PRO"}
SWEEP_NAMES = {"hidden_dim": "c_h", "pool_sizes": "s1, s2", "threshold": "thr"}  # Table 3's
OURS, PAPER = "#1f6fb4", "#b4b4b4"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _panels(title: str, note: str, count: int, width: float, height: float):
    """A titled figure of `count` panels side by side: (figure, axes)."""
    figure = _figure(width * count, height)
    figure.suptitle(title + (f"\n{note}" if note else ""), fontsize=10)
    return figure, figure.subplots(1, count, squeeze=False)[0]


def _finish(figure, axes, legend_columns: int, legend_size: int) -> bytes:
    """Percent axes from 0 to 100, one legend below the panels; the figure as PNG bytes."""
    for ax in axes:
        ax.set_ylim(0, 100)
        ax.tick_params(axis="y", labelsize=7)
    axes[0].set_ylabel("percent", fontsize=8)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center",
                  ncol=legend_columns, fontsize=legend_size)  # fmt: skip
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _values(rows: list[dict], side: str, metric: str) -> np.ndarray:
    return np.array([np.nan if r[side][metric] is None else r[side][metric] for r in rows])


def bars(title: str, rows: list[dict], metrics: tuple[str, ...], note: str = "") -> bytes:
    """One panel per metric; per row (`{"label", "ours": {metric: %|None}, "paper": {...}}`) a
    bar of ours beside the paper's."""
    figure, axes = _panels(title, note, len(metrics), 3.2, 4.0)
    x = np.arange(len(rows))
    for ax, metric in zip(axes, metrics, strict=True):
        ours, paper = _values(rows, "ours", metric), _values(rows, "paper", metric)
        ax.bar(x - 0.2, ours, 0.4, color=OURS, label="ours")
        ax.bar(x + 0.2, paper, 0.4, color=PAPER, label="paper")
        for position, value in zip(x - 0.2, ours, strict=True):
            if np.isnan(value):  # failed or not run: say so where the bar would be
                ax.text(position, 1, "n/a", rotation=90, ha="center", va="bottom", fontsize=7)
        ax.set_title(METRIC_NAMES[metric], fontsize=9)
        ax.set_xticks(x, [r["label"] for r in rows], rotation=35, ha="right", fontsize=7)
    return _finish(figure, axes, legend_columns=2, legend_size=8)


def sweeps(title: str, groups: dict[str, list[dict]], metrics: tuple[str, ...],
           note: str = "") -> bytes:  # fmt: skip
    """One panel per swept parameter (`groups` {parameter: rows with "value"}); per metric a
    solid line of ours and a dashed line of the paper's over the parameter's values."""
    figure, axes = _panels(title, note, len(groups), 4.2, 4.4)
    colors = ("#1f6fb4", "#d9822b", "#2e9e44", "#b42f2f")
    for ax, (parameter, rows) in zip(axes, groups.items(), strict=True):
        x = np.arange(len(rows))
        for metric, color in zip(metrics, colors, strict=False):
            name = METRIC_NAMES[metric]
            ax.plot(x, _values(rows, "ours", metric), "o-", color=color, label=f"{name} ours")
            ax.plot(x, _values(rows, "paper", metric), "s--", color=color, alpha=0.6,
                    label=f"{name} paper")  # fmt: skip
        ax.set_xticks(x, [r["value"] for r in rows], fontsize=8)
        ax.set_xlabel(SWEEP_NAMES.get(parameter, parameter), fontsize=8)
    return _finish(figure, axes, legend_columns=4, legend_size=7)
