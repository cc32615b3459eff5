#!/usr/bin/env bash
# The whole GPU job, unattended, in a fixed time budget that fits a 12-minute device window (the
# machine's start-up included; defaults for one H100/H200): distil ShareGPT answers from the default
# model, train the default adapter (lora:64, the shipped kind; `full` beside it only with FULL=1),
# save it in bf16, and run the benchmarks until DEADLINE_MIN, then pack. Aborts at once if the
# model there is not the one the job was prepared with (an adapter trained on another model would
# not load here). Run by scripts/gpu/device.sh on the GPU machine; every size is an environment
# variable so that the same script can be rehearsed on a CPU in a minute (tests/test_scripts.py).
#
# usage: pipeline.sh WORKDIR     (WORKDIR holds data/ and receives everything else)
# progress: WORKDIR/status (one line per stage), WORKDIR/<stage>.log; WORKDIR/DONE at the end.
set -uo pipefail
W=$(realpath "$1")
DEVICE=${DEVICE:-cuda}
DEADLINE_MIN=${DEADLINE_MIN:-9}        # no stage starts after this (minutes since the start); then pack
DISTILL_MIN=${DISTILL_MIN:-1.5}        # distillation budget (minutes); CPU-distilled rows seed it
DISTILL_BATCH=${DISTILL_BATCH:-256}
DISTILL_TOKENS=${DISTILL_TOKENS:-256}  # max new tokens per answer (as the CPU-distilled rows)
TRAIN_MIN=${TRAIN_MIN:-3}              # training budget (minutes)
TRAIN_ARGS=${TRAIN_ARGS:---block-size 8 --seq-len 2048 --batch-size 8 --anchors-per-seq 256 --epochs 3}
FULL=${FULL:-0}                        # 1: also train a `full` adapter beside lora:64 (same budget)
BENCH_TOKENS=${BENCH_TOKENS:-256}
BENCH_LIMIT=${BENCH_LIMIT:-24}         # prompts per set (0: all 164 HumanEval, all 80 MT-Bench)
HF_LIMIT=${HF_LIMIT:-6}                # prompts for the run with transformers' modes (slow)
SIDE_LIMIT=${SIDE_LIMIT:-16}           # prompts for the bf16, full-adapter and compiled runs
CHECKS=${CHECKS:-0}                    # 1: the CUDA tests and an untrained-adapter run first
O=(python3 -m orthrus.cli)
mkdir -p "$W/res"
export PYTHONUNBUFFERED=1
secs() { awk "BEGIN { print int($1 * 60 + $2) }"; }  # minutes + margin -> whole seconds
log() { echo "[$(date +%T)] $*" | tee -a "$W/status"; }
T0=$SECONDS
late() { [ $((SECONDS - T0)) -ge "$(secs "$DEADLINE_MIN" 0)" ]; }
pack() {
  log "packing"
  (cd "$W" && tar czf results.tar.gz status commands.txt ./*.log res lora64/log.jsonl lora64/train_config.json \
    full/log.jsonl full/train_config.json ship/adapter_config.json 2>/dev/null)
  touch "$W/DONE"
  log "pipeline finished"
}
stage() {  # name timeout_seconds command...: runs one stage, logs its exit code, never aborts
  local name=$1 limit=$2
  shift 2
  if late; then log "skip $name: past DEADLINE_MIN=$DEADLINE_MIN"; return 0; fi
  local left=$(( $(secs "$DEADLINE_MIN" 60) - (SECONDS - T0) ))  # a stage ends at most 1 min past it
  [ "$limit" -gt "$left" ] && limit=$left
  log "start $name"
  printf '%s:' "$name" >>"$W/commands.txt" && printf ' %q' "$@" >>"$W/commands.txt" && echo >>"$W/commands.txt"
  timeout "$limit" "$@" >"$W/$name.log" 2>&1
  log "end $name rc=$?"
}
bench() {  # name extra-args...: one orthrus bench run into res/name.{json,png}
  local name=$1
  shift
  stage "bench_$name" 600 "${O[@]}" bench --device "$DEVICE" --max-new-tokens "$BENCH_TOKENS" \
    --out "$W/res/$name" "$@"
}

log "pipeline on $DEVICE in $W"
stage env 120 bash -c 'nvidia-smi || true; python3 -c "import torch, transformers; \
print(torch.__version__, transformers.__version__, torch.cuda.is_available())"'
# the first load converts the GGUF into the cache (~20 s); a greedy AR answer proves the model works
stage first_load 300 "${O[@]}" generate --device "$DEVICE" --mode ar --max-new-tokens 16 --json \
  "Say hello in three words."
there=$(python3 -c "from orthrus.models.loading import load_base; print(load_base('smollm2-135m').fingerprint)")
here=$(cat "$W/data/fingerprint.txt" 2>/dev/null || echo unknown)
if [ "$there" = "$here" ]; then log "model fingerprint $there: same as where the job was prepared"
else
  log "ABORT: model fingerprint $there here, $here where the job was prepared: an adapter trained here would not load there"
  pack
  exit 1
fi
if [ "$CHECKS" = 1 ]; then
  stage cuda_tests 300 python3 -m pytest -q -p no:cacheprovider -ra tests/test_graphs.py tests/test_masks.py \
    -k "not compiled"
  bench init_k8 --adapter init --block-size 8 --prompts humaneval --limit 4 --modes ar,parallel
  bench init_k8_eager --adapter init --block-size 8 --prompts humaneval --limit 2 --modes ar,parallel \
    --no-cuda-graphs
fi

[ -f "$W/data/sharegpt_prompts.jsonl" ] || gunzip -k "$W/data/sharegpt_prompts.jsonl.gz"
# rows distilled earlier (on a CPU) seed the file: distill skips their prompts and adds new ones
if [ -f "$W/data/seed_distill.jsonl.gz" ] && [ ! -f "$W/distill.jsonl" ]; then
  gunzip -c "$W/data/seed_distill.jsonl.gz" >"$W/distill.jsonl"
  log "seeded with $(wc -l <"$W/distill.jsonl") rows distilled earlier"
fi
stage distill "$(secs "$DISTILL_MIN" 240)" "${O[@]}" distill --source "$W/data/sharegpt_prompts.jsonl" \
  --out "$W/distill.jsonl" --device "$DEVICE" --batch-size "$DISTILL_BATCH" \
  --max-new-tokens "$DISTILL_TOKENS" --max-prompt-tokens 512 --max-minutes "$DISTILL_MIN" --no-progress
log "distilled $(cat "$W/distill.jsonl" 2>/dev/null | wc -l) rows"

train() {  # kind out lr (runs in a child bash: arrays such as O are not exported)
  echo "train $1: python3 -m orthrus.cli train --data $W/distill.jsonl --out $W/$2 --adapter-kind $1 --device $DEVICE \
--lr $3 --max-minutes $TRAIN_MIN --eval-every 100 --save-every 100 --log-every 10 --no-progress $TRAIN_ARGS" >>"$W/commands.txt"
  # shellcheck disable=SC2086  # TRAIN_ARGS is a list of options
  python3 -m orthrus.cli train --data "$W/distill.jsonl" --out "$W/$2" --adapter-kind "$1" --device "$DEVICE" \
    --lr "$3" --max-minutes "$TRAIN_MIN" --eval-every 100 --save-every 100 --log-every 10 --no-progress \
    $TRAIN_ARGS
}
export -f train
export W DEVICE TRAIN_MIN TRAIN_ARGS
if [ "$FULL" = 1 ]; then
  stage train "$(secs "$TRAIN_MIN" 300)" bash -c 'train lora:64 lora64 1e-3 > "$W/train_lora64.log" 2>&1 &
    train full full 5e-4 > "$W/train_full.log" 2>&1 & wait'
else
  stage train "$(secs "$TRAIN_MIN" 300)" bash -c 'train lora:64 lora64 1e-3 > "$W/train_lora64.log" 2>&1'
fi

# the shipped form: bf16 weights (the engine casts them to the model's dtype when loading)
stage export 300 python3 - "$W/lora64" "$W/ship" <<'PY'
import sys
import torch
from orthrus.adapter import DiffusionAdapter
from orthrus.models.loading import load_base
base = load_base("smollm2-135m")
ad = DiffusionAdapter.load(sys.argv[1], base.model, base.fingerprint)
ad.save(sys.argv[2], dtype=torch.bfloat16)
print(sum(p.numel() for p in ad.parameters()), "parameters saved in bf16 to", sys.argv[2])
PY

A=(--adapter "$W/ship")
bench humaneval "${A[@]}" --prompts humaneval --limit "$BENCH_LIMIT" --modes ar,parallel --block-size auto
bench mtbench "${A[@]}" --prompts mtbench --limit "$BENCH_LIMIT" --modes ar,parallel --block-size auto
bench humaneval_hf "${A[@]}" --prompts humaneval --limit "$HF_LIMIT" --modes ar,parallel,hf,hf-pld \
  --block-size auto
bench humaneval_bf16 "${A[@]}" --prompts humaneval --limit "$SIDE_LIMIT" --modes ar,parallel \
  --block-size auto --dtype bfloat16
[ "$FULL" = 1 ] && bench humaneval_full --adapter "$W/full" --prompts humaneval --limit "$SIDE_LIMIT" \
  --modes ar,parallel --block-size auto

# last, as it may not fit the budget: torch.compile'd cycles (compiling costs ~a minute per shape)
bench humaneval_compiled "${A[@]}" --prompts humaneval --limit "$SIDE_LIMIT" --modes ar,parallel --block-size 8 \
  --compile

pack
