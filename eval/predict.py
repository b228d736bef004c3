"""`python -m eval.predict IMAGE_OR_DIR --class-name bottle --checkpoint runs/visa --output out`

Anomaly maps of any images with a trained head (or `--no-umci`) and SAM refinement. Per image:
`<name>_map.png` (16-bit, value = pixel / 65535, at the original resolution; `--map-format npy`
for float32), `<name>_mask.png`, `<name>_overlay.png`, `<name>_result.json`; plus
predictions.csv / predictions.json. Details: `clipsam_jax/predict_lib.py`. Every flag but
IMAGE_OR_DIR and --no-progress is a field of `predict_lib.PredictConfig` or of its nested configs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from clipsam_jax import cli
from eval.main import RUNTIME_FLAGS


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    from clipsam_jax.predict_lib import PredictConfig

    parser = argparse.ArgumentParser(prog="python -m eval.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("inputs", metavar="IMAGE_OR_DIR", help="an image file or a folder")
    cli.add_config(parser, PredictConfig, required=("output",), given_only=("clip",))
    cli.add_runtime(parser, only=[f for f in RUNTIME_FLAGS if f != "overlap_classes"])
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace):
    """The prediction's `PredictConfig` from parsed flags."""
    from clipsam_jax.predict_lib import PredictConfig

    return cli.config_from_args(PredictConfig, args)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(argv)
    from clipsam_jax.parallel.processes import refuse_processes

    refuse_processes("eval.predict")  # several processes would each do all of it
    from clipsam_jax.predict_lib import predict

    report = predict(
        config_from_args(args), runtime=cli.runtime_from_args(args), progress=not args.no_progress
    )
    skipped = (
        f", {len(report['skipped'])} skipped (see predictions.csv)" if report["skipped"] else ""
    )
    print(f"{report['images']} images → {report['output']}{skipped}")
    return report


def run() -> None:
    sys.exit(cli.run(main))


if __name__ == "__main__":
    run()
