#!/usr/bin/env bash
# Issue 22's GPU checks as one unattended script (about 9.5 minutes on one H100/H200 with the default
# PARTS): the GPU-marked tests, Q-realign W8A8 (default schedule) end to end on a 32-layer 7B shape, and
# (PARTS=aaq8b) AAQ W4A4 on an 8B shape with checkpointing. Run with `run(timeout_s=600)`. Needs, in the repository root (git-ignored, prepared on the CPU machine):
#   .gpu/whl/   wheels the GPU image lacks (pydantic, pydantic-core, annotated-types, typing-inspection,
#               compressed-tensors, loguru)
#   .gpu/data/  advbench/harmful_behaviors.csv and alpaca/alpaca_data_1k.json (from ../shared/data)
#   .gpu/tok/   the default model's tokenizer files (tokenizer.json, tokenizer_config.json, chat_template.jinja)
# Results go to $OUT (JSON per part, logs).
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> "$OUT/gpu.txt" 2>&1
python3 -c "import vllm; print('vllm', vllm.__version__)" >> "$OUT/gpu.txt" 2>&1 || echo "vllm: not installed" >> "$OUT/gpu.txt"
PARTS=${PARTS:-tests realign7b}  # also: aaq8b (measured 2026-11-28: 3.58 s/step, 31.7 GiB on an H200)
if [[ " $PARTS " == *" tests "* ]]; then
    timeout ${T_TESTS:-90} python3 -m pytest -q -m gpu tests/unit -p no:cacheprovider > "$OUT/pytest_gpu.log" 2>&1
    echo "pytest rc $?" >> "$OUT/pytest_gpu.log"
    tail -3 "$OUT/pytest_gpu.log"
fi
COMMON="--out-dir $OUT --data-dir .gpu/data --tokenizer .gpu/tok"
if [[ " $PARTS " == *" aaq8b "* ]]; then
    timeout ${T_AAQ:-150} python3 benchmarks/scale_gpu.py --parts aaq8b $COMMON > "$OUT/aaq8b.log" 2>&1
    echo "aaq8b rc $?"
fi
if [[ " $PARTS " == *" realign7b "* ]]; then
    # measured: ~60 s before calibration, 8.8 s per block (32 blocks), then export + reload + separability
    timeout ${T_REALIGN:-470} python3 benchmarks/scale_gpu.py --parts realign7b $COMMON > "$OUT/realign7b.out" 2>&1
    echo "realign7b rc $?"
fi
cat "$OUT"/*.json 2>/dev/null | head -c 6000
