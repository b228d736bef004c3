#!/usr/bin/env bash
# One prepared GPU session (~6 min on an H100/H200): the GPU-only tests, then run_all.py at full
# size (random ViT-L/14-336 at S=518, random SAM ViT-H), its JSON and log written to $OUT.
#
#   bash benchmarks/gpu_run.sh                # OUT defaults to benchmarks/results/gpu_<date>
#   SKIP=train_epoch,sam_compile BUDGET=240 bash benchmarks/gpu_run.sh
#   ARGS=--quick OUT=/tmp/gpu_quick bash benchmarks/gpu_run.sh   # checks the script, any machine
#
# The H200 runs 7 and 8 of 2026-11-28 (results/run_all_h200_run{7,8}.json; 309 and 363 s):
#   TESTS=cudnn SKIP=end_to_end_compiled,sam_compile BUDGET=300 TIMEOUT=470 bash benchmarks/gpu_run.sh
#   TESTS=cudnn SKIP=clip_profile,clip_variants,stage_costs,torch_reference,bf16_effect,sam_compile,train_epoch \
#       BUDGET=250 TIMEOUT=400 bash benchmarks/gpu_run.sh
#
# On a machine whose image lacks this project's pins (transformers 4.57 with Flax, and
# segment-anything), put their wheels in .whl/ first: they are installed to /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_$(date +%Y%m%d_%H%M)}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1  # JAX and torch share the GPU
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/gpu.txt"
# The tests that skip on CPU: cuDNN attention for CLIP, SAM on CUDA (three attentions x dtypes).
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_clip.py tests/test_sam.py \
    -k "${TESTS:-cudnn or cuda}" 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
# Sections run in order of importance; the JSON is rewritten after each, so a timeout keeps them.
timeout "${TIMEOUT:-440}" python3 benchmarks/run_all.py --workdir /tmp/clipsam_bench \
    --out "$OUT/run_all_gpu.json" --skip "${SKIP:-train_epoch}" --budget "${BUDGET:-330}" \
    ${ARGS:-} 2>&1 \
    | grep -v "^    round" | tee "$OUT/run_all_log.txt" | tail -40
