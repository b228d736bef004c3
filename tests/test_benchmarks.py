"""Smoke runs of the benchmark scripts (`--quick`: tiny models), so that they keep working as
the library changes. Slow (minutes in all): run with `-m slow`.

Each report is checked for its structure and for figures that are consistent with each other
(ratios and rates recomputed from the recorded times, medians from the recorded rounds, every
variant timed and compared), never for how fast anything ran.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
WITH_WORKDIR = {"run_all", "pipeline", "text_features", "memory_scale"}
AGREEMENT = 1e-4  # the scripts' own bound for "the same function" in float32
METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pro", "image_auroc", "image_ap",
           "image_f1_max")  # fmt: skip


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


# ----------------------------------------------------------------------------- generic checks


def _leaves(node, path="report"):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, f"{path}[{i}]")
    else:
        yield path, node


def _dicts(node, path="report"):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _dicts(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _dicts(value, f"{path}[{i}]")


def close(a, b, rel=1e-9, abs_=0.0) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def check_summary(summary: dict, where: str, repeats: int | None = None) -> None:
    """A `common.summarize` dict: its median, min and max are those of its rounds (which are
    stored rounded to 4 decimals)."""
    walls = summary["seconds_all"]
    assert walls and all(w >= 0 for w in walls), where
    if repeats is not None:
        assert len(walls) == repeats, where
    low, median, high = summary["seconds_min"], summary["seconds_median"], summary["seconds_max"]
    assert 0 < low <= median <= high, where
    assert close(low, min(walls), abs_=5e-5 + 1e-12), where
    assert close(high, max(walls), abs_=5e-5 + 1e-12), where
    assert close(median, statistics.median(walls), abs_=5e-5 + 1e-12), where
    for key in ("cpu_seconds_median", "system_cpu_seconds_median", "minor_page_faults_median"):
        assert summary.get(key, 0) >= 0, (where, key)


def check_pairwise(ratio: dict, where: str) -> None:
    """A `common.pairwise_ratio` dict: its median is that of its rounds (stored rounded to 3
    decimals), every ratio positive."""
    pairwise = ratio["pairwise"]
    assert pairwise and all(r >= 0 for r in pairwise), where
    assert ratio["median_of_pairwise"] > 0 and ratio["ratio_of_medians"] > 0, where
    assert close(ratio["median_of_pairwise"], statistics.median(pairwise), abs_=5e-4 + 1e-12), where


def check_ratio(ratio: dict, runs: dict, a: str, b: str, where: str) -> None:
    """`ratio` is time(a) / time(b) of these runs, round by round."""
    check_pairwise(ratio, where)
    expected = runs[a]["seconds_median"] / runs[b]["seconds_median"]
    assert close(ratio["ratio_of_medians"], expected), where
    assert len(ratio["pairwise"]) == len(runs[a]["seconds_all"]) == len(runs[b]["seconds_all"])
    if a == b:
        assert ratio["median_of_pairwise"] == 1.0 and set(ratio["pairwise"]) == {1.0}, where


def check_common(name: str, report: dict) -> None:
    assert isinstance(report.get("benchmark"), str) and report["benchmark"], name
    date = datetime.datetime.fromisoformat(report["date"])
    assert date.tzinfo is not None, f"{name}: date without a time zone"
    assert "quick" in json.dumps(report).lower(), f"{name}: a quick report must say so"
    machine = report["machine"] if name != "run_all" else report["sections"]["environment"]
    assert machine["cpu_count"] >= 1 and machine["versions"]["jax"], name
    for path, value in _leaves(report):
        if isinstance(value, float):
            assert math.isfinite(value), f"{path} is {value}"
    for path, node in _dicts(report):
        if "seconds_all" in node:
            check_summary(node, path)
        if "median_of_pairwise" in node:
            check_pairwise(node, path)


# ------------------------------------------------------------------------ per-script checks


def check_clip_features(report: dict) -> None:
    settings = report["settings"]
    variants = settings["variants"]
    assert "torch" in variants and any(v.startswith("jax") for v in variants)
    jax_variants = [v for v in variants if v != "torch"]
    assert report["cases"]
    for key, case in report["cases"].items():
        batch, size = case["batch"], case["image_size"]
        assert key.startswith(f"S{size}_B{batch}") and size % case["grid"] == 0
        runs = case["runs"]
        assert set(runs) == set(variants), key
        for name, run in runs.items():
            check_summary(run, f"{key}.{name}", settings["repeats"])
            assert close(run["seconds_per_image"], run["seconds_median"] / batch)
            assert close(run["images_per_second"], batch / run["seconds_median"])
        assert set(case["ratio_jax_over_torch"]) == set(jax_variants)
        for name, ratio in case["ratio_jax_over_torch"].items():
            check_ratio(ratio, runs, name, "torch", f"{key}.ratio.{name}")
        assert set(case["compile_seconds"]) == set(jax_variants)
        assert all(s > 0 for s in case["compile_seconds"].values())
        assert {f"{v}_vs_torch" for v in jax_variants} <= set(case["agreement"])
        for pair, agreement in case["agreement"].items():
            assert len(agreement["patch_tokens_max_rel"]) == 4, pair  # the four feature layers
            worst = max(*agreement["patch_tokens_max_rel"], agreement["image_embeds_max_rel"])
            assert agreement["within_1e-4"] is (worst < 1e-4)
            assert 0 <= worst < AGREEMENT, (key, pair)
        assert case["peak_rss_mib"] > 0
        for part, times in case.get("parts", {}).items():
            if isinstance(times, dict):
                assert times and all(t > 0 for t in times.values()), (key, part)


def check_text_features(report: dict) -> None:
    runs, settings = report["runs"], report["settings"]
    assert set(runs) == {"jax_longest", "jax_77", "torch_77"}
    for name, run in runs.items():
        check_summary(run, name, settings["repeats"])
    check_ratio(report["ratio_jax_longest_over_torch_77"], runs, "jax_longest", "torch_77", "a")
    check_ratio(report["ratio_jax_77_over_torch_77"], runs, "jax_77", "torch_77", "b")
    assert 0 < settings["longest_sentence_tokens"] <= settings["context"] == 77
    assert settings["sentences"] > 0
    assert set(report["agreement"]) == {"jax_longest_vs_torch_77_max_rel",
                                        "jax_77_vs_torch_77_max_rel"}  # fmt: skip
    assert all(0 <= v < AGREEMENT for v in report["agreement"].values())


def _check_sam_modes(values: dict, batch: int, where: str) -> None:
    """sam_attention's result (also run_all's sam_encoder section)."""
    runs = values["runs"]
    assert "stock" in runs and len(runs) >= 2, where
    for key in ("ratio_over_stock", "images_per_second", "max_rel_difference_to_stock"):
        assert set(values[key]) == set(runs), (where, key)
    for name, run in runs.items():
        check_ratio(values["ratio_over_stock"][name], runs, name, "stock", f"{where}.{name}")
        assert close(values["images_per_second"][name], batch / run["seconds_median"])
        assert 0 <= values["max_rel_difference_to_stock"][name] < 1e-3, (where, name)
    assert values["max_rel_difference_to_stock"]["stock"] == 0.0
    assert values["fastest"] == min(runs, key=lambda n: runs[n]["seconds_median"])


def check_sam_attention(report: dict) -> None:
    settings = report["settings"]
    _check_sam_modes(report, settings["batch"], "sam_attention")
    for name, run in report["runs"].items():
        check_summary(run, name, settings["repeats"])


def check_refiners(report: dict) -> None:
    settings = report["settings"]
    names = settings["variants"]
    assert list(report["refiners"]) == names == list(report["runs"])
    for name, values in report["refiners"].items():
        run = report["runs"][name]
        check_summary(run, name, settings["repeats"])
        assert close(values["images_per_second"], settings["images"] / run["seconds_median"])
        assert 0 < values["encoder_seconds_per_image"] <= values["refine_seconds_median"]
        check_ratio(values[f"ratio_to_{names[0]}"], report["runs"], name, names[0], name)
    assert report["refiners"][names[0]][f"ratio_to_{names[0]}"]["median_of_pairwise"] == 1


def check_train_step(report: dict) -> None:
    settings = report["settings"]
    assert report["cases"]
    for key, case in report["cases"].items():
        assert key.startswith(f"S{case['image_size']}_B{case['batch']}")
        steps = case["steps"]
        runs = steps["runs"]
        assert "torch" in runs and len(runs) >= 2, key
        jax_names = [n for n in runs if n != "torch"]
        assert jax_names == [f"jax_{impl}" for impl in settings["impls"]]
        for name, run in runs.items():
            check_summary(run, f"{key}.{name}", settings["repeats"])
            assert close(run["steps_per_second"], 1.0 / run["seconds_median"])
        assert set(steps["ratio_jax_over_torch"]) == set(jax_names)
        for name in jax_names:
            check_ratio(steps["ratio_jax_over_torch"][name], runs, name, "torch", name)
        assert steps["fastest_jax"] == min(jax_names, key=lambda n: runs[n]["seconds_median"])
        assert steps["ratio_vs_fastest_jax"][steps["fastest_jax"]] == 1.0
        assert set(steps["compile_seconds"]) == set(jax_names)
        assert all(s > 0 for s in steps["compile_seconds"].values())
        losses = steps["first_step_loss"]
        assert set(losses) == set(runs) and all(v > 0 for v in losses.values())
        for name, diff in steps["first_step_loss_rel_diff_vs_torch"].items():
            expected = abs(losses[name] - losses["torch"]) / abs(losses["torch"])
            assert close(diff, expected) and diff < AGREEMENT, name
        for name, memory in steps["memory_first_step_mib"].items():
            assert memory["peak_rss_mib"] > 0, name


def check_attention_core(report: dict) -> None:
    settings = report["settings"]
    assert report["cases"]
    for key, case in report["cases"].items():
        size = int(key.removeprefix("S"))
        assert case["tokens"] == (size // 14) ** 2 + 1, key  # CLIP patch 14 + class token
        runs = case["runs"]
        assert "torch_sdpa" in runs and set(case["ms"]) == set(runs)
        for name, run in runs.items():
            check_summary(run, f"{key}.{name}", settings["repeats"])
            assert close(case["ms"][name], 1e3 * run["seconds_median"])
        jitted = [n for n in runs if n != "torch_sdpa"]
        assert set(case["ratio_over_torch"]) == set(jitted)
        for name in jitted:
            check_ratio(case["ratio_over_torch"][name], runs, name, "torch_sdpa", name)
        check_ratio(case["library_over_plain_softmax"], runs, "library_blocked",
                    "plain_softmax_blocked", key)  # fmt: skip
        assert set(case["max_rel_difference_to_torch"]) == set(jitted)
        assert all(0 <= v < AGREEMENT for v in case["max_rel_difference_to_torch"].values())


def check_xla_page_faults(report: dict) -> None:
    assert report["cases"]
    for key, case in report["cases"].items():
        assert key.endswith("MiB")
        assert case["xla_temp_bytes"] > 0
        assert case["pages_in_xla_temp"] == case["xla_temp_bytes"] / 4096
        assert case["jax_faults_per_call"] >= 0 and case["torch_faults_per_call"] >= 0


def check_head_forward(report: dict) -> None:
    assert report["cases"]
    for key, case in report["cases"].items():
        runs = case["runs"]
        assert "torch" in runs and {"matmul", "xla"} <= set(runs), key
        assert set(case["seconds"]) == set(runs)
        forms = [n for n in runs if n != "torch"]
        for name, run in runs.items():
            assert case["seconds"][name] == run["seconds_median"]
        assert set(case["ratio_over_torch"]) == set(forms)
        for name in forms:
            check_ratio(case["ratio_over_torch"][name], runs, name, "torch", f"{key}.{name}")
        check_ratio(case["xla_over_matmul"], runs, "xla", "matmul", key)
        if "ynn_single_dots_over_xla" in case:
            single = next(n for n in forms if n.startswith("xla_ynn"))
            check_ratio(case["ynn_single_dots_over_xla"], runs, single, "xla", key)
        assert set(case["max_rel_difference_to_torch"]) == set(forms)
        assert all(0 <= v < AGREEMENT for v in case["max_rel_difference_to_torch"].values())


def check_memory_scale(report: dict) -> None:
    args, dataset, theory = report["args"], report["dataset"], report["theory"]
    sizes = dataset["class_sizes"]
    assert sum(sizes.values()) == dataset["test_images"] == args["images"]
    assert len(sizes) == dataset["classes"] == args["classes"]
    assert max(sizes.values()) == dataset["largest_class_images"] == args["largest"]
    assert min(sizes.values()) == dataset["smallest_class_images"]
    # Exact mode holds a float16 map and a bool mask per image at S×S.
    per_image = theory["per_image_map_bytes"]
    assert per_image == args["clip_size"] ** 2 * 3
    assert close(theory["largest_class_maps_mib"], per_image * max(sizes.values()) / 2**20)
    assert close(theory["whole_set_maps_mib_if_held"], per_image * sum(sizes.values()) / 2**20)
    runs = report["runs"]
    assert list(runs) == args["runs"].split(",")
    for name, run in runs.items():
        per_class = run["per_class"]
        assert run["classes"] == len(per_class) and run["images"] == sum(
            c["images"] for c in per_class
        ), name
        assert {c["class"] for c in per_class} <= set(sizes)
        assert all(c["images"] == sizes[c["class"]] for c in per_class), name
        assert run["largest_class_images"] == max(c["images"] for c in per_class)
        assert run["seconds"] > 0 and close(
            run["images_per_second"], run["images"] / run["seconds"]
        )
        assert close(run["peak_growth_mib"], run["peak_rss_mib"] - run["baseline_rss_mib"])
        assert run["peak_rss_mib"] > 0 and run["baseline_rss_mib"] > 0
        for c in per_class:
            assert c["seconds"] > 0 and close(
                c["growth_mib"], c["peak_rss_mib"] - c["rss_start_mib"]
            )
        assert close(run["theory_maps_mib"], per_image * run["largest_class_images"] / 2**20)
        assert set(run["rough_mean"]) == set(METRICS)
        assert all(0.0 <= v <= 1.0 for v in run["rough_mean"].values()), name
    assert runs["all"]["images"] == args["images"] and runs["all"]["classes"] == args["classes"]
    derived = report["derived"]
    ratios = derived["all_over_largest"]
    assert close(ratios["images_ratio"], runs["all"]["images"] / runs["largest"]["images"])
    assert close(ratios["peak_growth_ratio"],
                 runs["all"]["peak_growth_mib"] / runs["largest"]["peak_growth_mib"])  # fmt: skip
    assert close(ratios["peak_rss_ratio"],
                 runs["all"]["peak_rss_mib"] / runs["largest"]["peak_rss_mib"])  # fmt: skip
    if "all_streaming" in runs:
        diff = derived["streaming_minus_exact_mean_metrics"]
        for key in METRICS:
            expected = runs["all_streaming"]["rough_mean"][key] - runs["all"]["rough_mean"][key]
            assert close(diff[key], expected, abs_=1e-12), key


RUN_ALL_SECTIONS = ("environment", "matmul_peak", "setup", "clip_encoder", "clip_profile",
                    "rough_model", "sam_encoder", "end_to_end", "clip_variants",
                    "end_to_end_compiled", "stage_costs", "torch_reference", "bf16_effect",
                    "sam_compile", "refiners", "train_epoch", "memory")  # fmt: skip


def check_run_all(report: dict) -> None:
    assert report["errors"] == {}, "sections failed:\n" + "\n".join(report["errors"].values())
    sections, skipped = report["sections"], report["skipped"]
    # Every section ran or is listed as skipped (over the time budget on a slow machine).
    assert set(sections) | set(skipped) == set(RUN_ALL_SECTIONS)
    assert not set(sections) & set(skipped)
    assert {"environment", "setup", "memory"} <= set(sections)
    assert all(s["section_seconds"] >= 0 for s in sections.values())
    assert sum(s["section_seconds"] for s in sections.values()) <= report["elapsed_seconds"] + 1
    args = sections["environment"]["args"]
    assert args["quick"] is True
    batch = args["batch"]
    if "clip_encoder" in sections:
        values = sections["clip_encoder"]
        entries = {k: v for k, v in values.items() if k.startswith("batch")}
        assert entries
        for key, entry in entries.items():
            entry_batch = int(key.removeprefix("batch").split("_")[0])
            assert close(entry["images_per_second"], entry_batch / entry["seconds_median"])
            assert 0 < entry["seconds_min"] <= entry["seconds_median"], key
        assert close(
            values["images_per_second"], max(e["images_per_second"] for e in entries.values())
        )
        at_batch = {k.split("_")[1]: e["images_per_second"] for k, e in entries.items()
                    if k.startswith(f"batch{batch}_")}  # fmt: skip
        assert values["fastest_attention"] == max(at_batch, key=at_batch.get)
    if "rough_model" in sections:
        values = sections["rough_model"]
        assert close(values["images_per_second"], batch / values["seconds_median"])
        assert values["uint8_input_images_per_second"] > 0 and values["compile_seconds"] > 0
    if "sam_encoder" in sections:
        values = sections["sam_encoder"]
        _check_sam_modes(values, values["batch"], "run_all.sam_encoder")
    if "end_to_end" in sections:
        values = sections["end_to_end"]
        assert values["images"] == sections["setup"]["images"]
        assert close(values["images_per_second"], values["images"] / values["seconds"])
        assert close(sum(values["main_thread_seconds"].values()), values["seconds"], rel=1e-6)
        assert values["sam_boxes_decoded"] >= values["sam_images_encoded"] >= 0
    if "refiners" in sections:  # the tiny HQ-SAM and SAM 2.1 with --quick
        for name, values in sections["refiners"].items():
            if name == "section_seconds":
                continue
            assert values["images"] == sections["setup"]["images"] and values["sam_variant"] == name
            assert close(values["images_per_second"], values["images"] / values["seconds"])
            assert values["sam_boxes_decoded"] >= values["sam_images_encoded"] >= 0
            if values["sam_images_encoded"]:
                assert values["sam_encoder_flops_per_image"] > 0
    if "clip_variants" in sections:
        values = sections["clip_variants"]
        variants = {k: v for k, v in values.items() if isinstance(v, dict) and "batch" in v}
        assert "baseline" in variants
        base = variants["baseline"]["images_per_second"]
        for name, variant in variants.items():
            assert close(variant["images_per_second"], variant["batch"] / variant["seconds_median"])
            assert close(variant["ratio_to_baseline"], variant["images_per_second"] / base), name
        assert variants["baseline"]["ratio_to_baseline"] == 1.0
    if "stage_costs" in sections:
        values = sections["stage_costs"]
        assert all(values[k] > 0 for k in ("prompts_seconds_per_image",
                                           "fusion_seconds_per_image_4_boxes",
                                           "metrics_seconds_per_200_image_class"))  # fmt: skip
    if "torch_reference" in sections:
        values = sections["torch_reference"]
        torch_rate = values["clip_head_fp32"]["images_per_second"]
        assert close(torch_rate, batch / values["clip_head_fp32"]["seconds_median"])
        if "rough_model" in sections:
            speedup = sections["rough_model"]["images_per_second"] / torch_rate
            assert close(values["jax_over_torch_fp32_clip_head_speedup"], speedup)
        estimate = values.get("end_to_end_estimate")
        if estimate is not None:
            assert close(estimate["images_per_second"], estimate["images"] / estimate["seconds"])
    if "bf16_effect" in sections:
        values = sections["bf16_effect"]
        assert 0 <= values["mean_abs_diff"] <= values["max_abs_diff"] < 0.5
    if "train_epoch" in sections:
        values = sections["train_epoch"]
        assert values["steps"] > 0 and values["seconds"] > 0 and values["last_loss"] > 0
    assert sections["memory"]["host_peak_rss_gib"] > 0


def check_few_shot(report: dict) -> None:
    speed = report["speed"]
    seconds = speed["seconds_median"]
    assert set(seconds) == {"clip_encoder", "few_shot_map", "torch_search"}
    assert close(
        speed["few_shot_fraction_of_clip"], seconds["few_shot_map"] / seconds["clip_encoder"]
    )
    assert speed["max_abs_difference_to_torch"] < 1e-3  # the same map, float32 on CPU
    assert speed["bank_rows_per_layer"] == speed["shots"] * (speed["image_size"] // 14) ** 2
    auroc = report["quality"]["pixel_auroc"]
    assert list(auroc) == ["k0", "k1", "k2", "k4"] and all(0 <= v <= 1 for v in auroc.values())


CHECKS = {
    "clip_features": check_clip_features,
    "text_features": check_text_features,
    "sam_attention": check_sam_attention,
    "refiners": check_refiners,
    "few_shot": check_few_shot,
    "train_step": check_train_step,
    "run_all": check_run_all,
    "memory_scale": check_memory_scale,
    "attention_core": check_attention_core,
    "xla_page_faults": check_xla_page_faults,
    "head_forward": check_head_forward,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHECKS))
def test_quick_run_writes_a_consistent_report(name, tmp_path):
    import jax

    out = tmp_path / f"{name}.json"
    argv = ["--quick", "--out", str(out)]
    if name in WITH_WORKDIR:
        argv += ["--workdir", str(tmp_path / "work")]
    cache_dir = jax.config.jax_compilation_cache_dir  # run_all points it into its workdir
    try:
        _load(name).main(argv)
    finally:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
    report = json.loads(out.read_text())
    check_common(name, report)
    CHECKS[name](report)
