"""Smoke runs of the benchmark scripts (`--quick`: tiny models), so that they keep working as
the library changes. Slow (minutes in all): run with `-m slow`."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
WITH_WORKDIR = {"run_all", "pipeline", "text_features", "memory_scale"}


def _load(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their sibling `common`
    try:
        spec = importlib.util.spec_from_file_location(
            f"benchmark_{name}", BENCHMARKS / f"{name}.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "clip_features",
        "text_features",
        "sam_attention",
        "train_step",
        "run_all",
        "memory_scale",
        "attention_core",
        "xla_page_faults",
        "head_forward",
    ],
)
def test_quick_run_writes_its_report(name, tmp_path):
    out = tmp_path / f"{name}.json"
    argv = ["--quick", "--out", str(out)]
    if name in WITH_WORKDIR:
        argv += ["--workdir", str(tmp_path / "work")]
    _load(name).main(argv)
    report = json.loads(out.read_text())
    assert report.get("date"), f"{name}: report without a date"
    assert "quick" in json.dumps(report).lower(), f"{name}: a quick report must say so"
