#!/usr/bin/env bash
# CPU scaling benchmark (issue 22): peak RSS and wall time of `safeptq realign`
# W8A8 and `safeptq aaq` W4A16 (short schedules) on random-initialised
# Llama-shaped models of ~135M, ~360M and ~1.1B parameters, to compare with the
# memory plan each command prints before loading ("memory plan: peak host ...",
# stored as `memory_plan` in the run record).
#
# Run from the repository root:
#   OUT=/tmp/scale_cpu bash benchmarks/scale_cpu.sh [SIZES]
# SIZES: any of 135m 360m 1b1 (default: "135m 360m 1b1").
# CMDS="realign aaq" (default) picks the commands, e.g. CMDS=aaq for aaq only;
# AAQ_FLAGS adds flags to the aaq command (e.g. AAQ_FLAGS="--checkpointing on").
# Needs the tokenizer in ~/.cache/safeptq/models/smollm2-135m-instruct and the
# datasets in /work/shared/data (override with DATA_DIR). Outputs per size:
#   $OUT/models/SIZE{,-base}/          random bf16 models (the -base one feeds aaq --base)
#   $OUT/SIZE/{realign,aaq}/           exports and run records (realign.json, aaq.json)
#   $OUT/SIZE/{realign,aaq}.time       stderr (the log) + /usr/bin/time -v output
#   $OUT/SIZE/{realign,aaq}.log        stdout of the command
# SAFEPTQ_HOME is set to $OUT/home so caches do not mix with the user's.
set -euo pipefail

OUT=${OUT:-/tmp/scale_cpu}
SIZES=${*:-135m 360m 1b1}
CMDS=${CMDS:-realign aaq}
AAQ_FLAGS=${AAQ_FLAGS:-}  # e.g. "--checkpointing on"
PY=${PY:-.venv/bin/python}
DATA_DIR=${DATA_DIR:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}
TOK=${TOK:-$HOME/.cache/safeptq/models/smollm2-135m-instruct}
export SAFEPTQ_HOME=$OUT/home
mkdir -p "$OUT/models" "$SAFEPTQ_HOME"

TIME=()
if [[ -x /usr/bin/time ]]; then TIME=(/usr/bin/time -v); fi

make_model() {  # SIZE DIR SEED
  local size=$1 dir=$2 seed=$3
  [[ -f $dir/config.json ]] && return 0
  "$PY" - "$size" "$dir" "$seed" "$TOK" <<'PYEOF'
import sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
size, out, seed, tok_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
shapes = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                 num_attention_heads=15, num_key_value_heads=5, tie_word_embeddings=True),
    "1b1": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False),
}[size]
tok = AutoTokenizer.from_pretrained(tok_dir)
pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
cfg = LlamaConfig(vocab_size=49152, max_position_embeddings=2048, rms_norm_eps=1e-5,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=pad, torch_dtype="bfloat16", **shapes)
torch.manual_seed(seed)
model = LlamaForCausalLM(cfg).to(torch.bfloat16)
n = sum(p.numel() for p in model.parameters())
model.save_pretrained(out)
tok.save_pretrained(out)
print(f"{size}: {n} parameters -> {out}")
PYEOF
}

run_timed() {  # NAME DIR -- command...
  local name=$1 dir=$2; shift 2
  echo "== $name: $*"
  local rc=0
  "${TIME[@]}" "$@" >"$dir/$name.log" 2>"$dir/$name.time" || rc=$?
  grep -E "memory plan" "$dir/$name.log" "$dir/$name.time" || true
  grep -E "Maximum resident|Elapsed" "$dir/$name.time" || true
  if [[ $rc -ne 0 ]]; then
    echo "!! $name failed (rc=$rc):"; tail -n 3 "$dir/$name.time" "$dir/$name.log"
  fi
  return 0
}

for size in $SIZES; do
  M=$OUT/models/$size B=$OUT/models/$size-base D=$OUT/$size
  make_model "$size" "$M" 0
  make_model "$size" "$B" 1
  mkdir -p "$D"
  if [[ " $CMDS " == *" realign "* ]]; then
  rm -rf "$D/realign" "$D/realign.work"
  run_timed realign "$D" "$PY" -m safeptq realign --model "$M" --probe-model "$M" \
    --scheme w8a8 --dtype bfloat16 --epochs 1 --nsamples 32 --sep-limit 16 \
    --data-dir "$DATA_DIR" --no-progress --out "$D/realign"
  fi
  if [[ " $CMDS " == *" aaq "* ]]; then
  rm -rf "$D/aaq" "$D/aaq.work"
  run_timed aaq "$D" "$PY" -m safeptq aaq --model "$M" --base "$B" --scheme w4a16 \
    --dtype bfloat16 --steps 2 --nsamples 8 --seqlen 64 --calib-replies 0 --weights rtn \
    --calib alpaca:calib --rotation off --smoothing on --data-dir "$DATA_DIR" \
    --no-progress --out "$D/aaq" $AAQ_FLAGS
  fi
done
