"""MMR refinement (Sec. 3.3, docs/method.md §4): prompts from the rough map, masks, Eq. 9 fusion.

One component per module: `prompts` (boxes and points from the rough map) and `fusion` (Eq. 9,
MMR over a batch) are numpy-only; `registry` names the refiners (`--sam`) and builds them;
`sam_build` (models, checkpoints) and `sam` (the batched refiner) are segment-anything's family,
with `sam_attention` and `sam_decoder`. Only those last four import torch.
"""
