"""How long a plan takes, from the project's own measured throughputs (throughput.json).

throughput.json copies figures from benchmarks/results/ (each names its file and key; a test
checks them against those files). They were measured with ViT-L/14-336 at S = 518 and SAM
ViT-H, so the estimate is for those models: smaller ones run faster, other machines differ.
Per training: the CLIP features of its dataset once per image size (shared by every training),
epochs × images at the training step's rate, plus loading and compiling. Per evaluation: its
images at the end-to-end rate (the rough-map rate without SAM), plus loading and compiling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from clipsam_jax.errors import ClipSamError
from clipsam_jax.reproduce.runner import Schedule

# Images each protocol split holds, where the dataset is not on disk to count: MVTec-AD's and
# VisA's test splits, MTD's 925 + 392 images and KSDD2's test split (894 + 110) as the paper's
# Appendix C describes them.
PUBLISHED_SIZES = {"mvtec": 1725, "visa": 2162, "mtd": 1317, "ksdd2": 1004}


@dataclass(frozen=True)
class Throughput:
    """Measured rates (images/s) and fixed costs (s) of one kind of machine."""

    label: str
    clip_features: float
    train_step: float
    rough_maps: float
    end_to_end: float
    setup_seconds: float  # loading CLIP and compiling, per training or evaluation


def figures() -> dict:
    """throughput.json's content."""
    return json.loads(resources.files(__package__).joinpath("throughput.json").read_text())


def throughput(machine: str) -> Throughput:
    """The figures of `machine` ("gpu" or "cpu"). Without a measured end-to-end rate it is
    the rough maps and SAM's encoder one after the other."""
    entry = figures()["machines"][machine]
    value = {name: f["value"] * f.get("multiply", 1) for name, f in entry["figures"].items()}
    end_to_end = value.get("end_to_end") or 1 / (1 / value["rough_maps"] + 1 / value["sam_encoder"])
    return Throughput(entry["label"], value["clip_features"], value["train_step"],
                      value["rough_maps"], end_to_end,
                      value["load_seconds"] + value["compile_seconds"])  # fmt: skip


def this_machine() -> str:
    """ "gpu" on an accelerator (GPU figures also stand in for TPUs), else "cpu"."""
    import jax

    return "cpu" if jax.default_backend() == "cpu" else "gpu"


def dataset_sizes(datasets: set[str], data_root: str | Path) -> dict[str, tuple[int, bool]]:
    """{dataset: (images in its protocol split, counted on disk)}: counted under
    `data_root/<dataset>` where it loads, else the published size."""
    from clipsam_jax.data.registry import load_dataset

    sizes = {}
    for name in sorted(datasets):
        try:
            classes = load_dataset(name, Path(data_root) / name)
            sizes[name] = (sum(len(s) for s in classes.values()), True)
        except ClipSamError:
            sizes[name] = (PUBLISHED_SIZES[name], False)
    return sizes


def estimate(plan: Schedule, sizes: dict[str, tuple[int, bool]], rates: Throughput) -> dict:
    """{"trainings": [(key, seconds)], "evaluations": [(key, seconds)], "features": seconds,
    "total": seconds} for the jobs of `plan`."""
    trainings = []
    for key, config in plan.trainings.items():
        steps = sizes[config.dataset][0] * config.optim.epochs / rates.train_step
        trainings.append((key, steps + rates.setup_seconds))
    feature_sets = {(c.dataset, c.clip.image_size) for c in plan.trainings.values()}
    features = sum(sizes[d][0] / rates.clip_features for d, _ in feature_sets)
    evaluations = []
    for key, config in plan.evaluations.items():
        rate = rates.rough_maps if config.refine.sam == "none" else rates.end_to_end
        evaluations.append((key, sizes[config.dataset][0] / rate + rates.setup_seconds))
    total = features + sum(s for _, s in trainings) + sum(s for _, s in evaluations)
    return {"trainings": trainings, "evaluations": evaluations, "features": features,
            "total": total}  # fmt: skip


def duration(seconds: float) -> str:
    """ "2 h 05 min", "7 min", "45 s"."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"
