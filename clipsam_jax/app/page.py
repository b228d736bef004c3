"""The web page of `python -m eval.app` (Gradio, the `[app]` extra): one tab inspects an image
stage by stage, the other runs a folder or zip of images as `eval.predict` does.

The page only lays out inputs and outputs; `analyzer.Analyzer` does the work. Element ids
(`elem_id`) name what the browser test drives.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import gradio as gr

from clipsam_jax.app.analyzer import Analyzer, AppInputError, Inspection
from clipsam_jax.refine.registry import REFINERS

logger = logging.getLogger(__name__)

IMAGE_TYPES = [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"]

INTRO = """# ClipSAM: where is the defect?
Upload a photo of a part and type what the part is. CLIP marks the regions that look anomalous
(**rough map**), those regions become box and point **prompts** for SAM, and SAM's **masks**
sharpen the map (**final map**, **overlay**). Higher values (red) mean more anomalous; the
**score** is the image's anomaly score (0 to about 1). A few photos of **good** parts
(optional) let the app compare each patch with normal ones as well."""


def _summary(result: Inspection, threshold: float) -> str:
    flagged = "above" if result.score > threshold else "below"
    seconds = " · ".join(f"{stage} {value:.3f}" for stage, value in result.seconds.items())
    lines = [
        f"### Image score: {result.score:.3f}",
        f"{flagged} the threshold {threshold:.2f} · rough-map score {result.rough_score:.3f} · "
        f"{result.boxes} SAM box{'es' if result.boxes != 1 else ''}",
        "",
        f"Seconds: {seconds}",
    ]
    if result.references:
        lines += ["", f"Good-part references: {', '.join(result.references)}"]
    return "\n".join(lines)


def build_page(
    analyzer: Analyzer, examples: Sequence[tuple[str, str]] = (), note: str = ""
) -> gr.Blocks:
    """The app's page; `examples` [(image path, class name)]; `note` a banner (the demo's)."""
    refine = analyzer.config.refine
    sam = REFINERS[refine.sam]

    def inspect(image, class_name, threshold, points, zero_shot, references, map_format):
        try:
            result = analyzer.inspect(image, class_name, threshold, points,
                                      zero_shot=bool(zero_shot), references=references or (),
                                      map_format=map_format)  # fmt: skip
        except AppInputError as error:
            raise gr.Error(str(error), title="Cannot inspect this input") from error
        except Exception as error:  # keep serving; the traceback goes to the server's log
            logger.exception("inspect failed")
            raise gr.Error(f"Unexpected error: {error}", title="Inspection failed") from error
        return (result.panel, _summary(result, threshold), str(result.files["map"]),
                str(result.files["mask"]))  # fmt: skip

    def inspect_batch(uploads, folder, class_name, threshold, points, zero_shot, references):
        try:
            files = [*(uploads or ()), *(folder or ())]
            result = analyzer.inspect_batch(files, class_name, threshold, points,
                                            zero_shot=bool(zero_shot),
                                            references=references or ())  # fmt: skip
        except AppInputError as error:
            raise gr.Error(str(error), title="Cannot run these inputs") from error
        except Exception as error:
            logger.exception("batch failed")
            raise gr.Error(f"Unexpected error: {error}", title="Batch failed") from error
        text = f"{result.images} image(s) processed"
        if result.skipped:
            text += f"; {len(result.skipped)} skipped (unreadable): " + ", ".join(
                s["path"].rsplit("/", 1)[-1] for s in result.skipped
            )
        return str(result.archive), str(result.table), text

    with gr.Blocks(title="ClipSAM anomaly segmentation") as page:
        gr.Markdown(INTRO)
        if note:
            gr.Markdown(f"**{note}**", elem_id="note")
        gr.Markdown(f"Models: {'trained head' if analyzer.has_head else 'zero-shot map (no head)'}"
                    f" · refiner `{refine.sam}` ({sam.weights})")  # fmt: skip
        with gr.Tab("Inspect an image"):
            with gr.Row():
                with gr.Column(scale=1):
                    image = gr.File(label="Photo of the part", file_types=IMAGE_TYPES,
                                    elem_id="image-input")  # fmt: skip
                    class_name = gr.Textbox(label="What is the part?", placeholder="e.g. screw",
                                            elem_id="class-name")  # fmt: skip
                    threshold = gr.Slider(0.0, 1.0, value=refine.threshold, step=0.01,
                                          label="Threshold for SAM's prompts",
                                          elem_id="threshold")  # fmt: skip
                    points = gr.Slider(0, 20, value=refine.points, step=1,
                                       label="Points per box", elem_id="points")  # fmt: skip
                    zero_shot = gr.Checkbox(label="Zero-shot map (ignore the trained head)",
                                            value=False, visible=analyzer.has_head,
                                            elem_id="zero-shot")  # fmt: skip
                    references = gr.File(label="Good parts (optional)", file_count="multiple",
                                         file_types=IMAGE_TYPES, elem_id="references")  # fmt: skip
                    map_format = gr.Radio(["png", "npy"], value="png", elem_id="map-format",
                                          label="Map file: 16-bit PNG or float32 .npy")  # fmt: skip
                    run = gr.Button("Find the defect", variant="primary", elem_id="run")
                with gr.Column(scale=3):
                    stages = gr.Image(label="Stages", show_label=False, format="png",
                                      interactive=False, elem_id="stages")  # fmt: skip
                    summary = gr.Markdown(elem_id="summary")
                    with gr.Row():
                        map_file = gr.File(label="Map", elem_id="map-file")
                        mask_file = gr.File(label="Mask", elem_id="mask-file")
            if examples:
                gr.Examples([[path, name] for path, name in examples], [image, class_name],
                            label="Examples")  # fmt: skip
            run.click(inspect, [image, class_name, threshold, points, zero_shot, references,
                                map_format], [stages, summary, map_file, mask_file])  # fmt: skip
        with gr.Tab("A folder of images"):
            gr.Markdown("Upload several images, a .zip or a folder of them: you get a zip of each "
                        "image's "
                        "map, mask, overlay and result, plus the table of scores "
                        "(`predictions.csv`), as `python -m eval.predict` writes them.")  # fmt: skip
            with gr.Row():
                with gr.Column(scale=1):
                    uploads = gr.File(label="Images or .zip", file_count="multiple",
                                      file_types=[*IMAGE_TYPES, ".zip"],
                                      elem_id="batch-files")  # fmt: skip
                    folder = gr.File(label="…or a folder", file_count="directory",
                                     elem_id="batch-folder")  # fmt: skip
                    batch_class = gr.Textbox(label="What are the parts?",
                                             placeholder="e.g. screw", elem_id="batch-class")  # fmt: skip
                    batch_run = gr.Button("Run them all", variant="primary", elem_id="batch-run")
                with gr.Column(scale=2):
                    batch_summary = gr.Markdown(elem_id="batch-summary")
                    archive = gr.File(label="Predictions (.zip)", elem_id="batch-zip")
                    table = gr.File(label="Scores (predictions.csv)", elem_id="batch-csv")
            batch_run.click(inspect_batch, [uploads, folder, batch_class, threshold, points,
                                            zero_shot, references],
                            [archive, table, batch_summary])  # fmt: skip
    return page
