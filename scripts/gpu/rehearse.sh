#!/usr/bin/env bash
# Rehearse the GPU job on this CPU with tiny sizes (~4 minutes on 2 cores): the same device.sh and
# pipeline.sh, the real default model, every stage; outputs in /tmp/og_rehearsal (work/, out/).
# Needs scripts/gpu/prepare.sh to have run. Stage exit codes: /tmp/og_rehearsal/work/status.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=/tmp/og_rehearsal
rm -rf "$R" && mkdir -p "$R/out"
export ROOT=$R OUT=$R/out WAIT=1800 OMP_NUM_THREADS=1 DEVICE=cpu CHECKS=${CHECKS:-1} FULL=${FULL:-1} DEADLINE_MIN=30 \
  DISTILL_MIN=0.3 DISTILL_BATCH=8 DISTILL_TOKENS=32 TRAIN_MIN=0.4 BENCH_TOKENS=16 BENCH_LIMIT=2 \
  HF_LIMIT=1 SIDE_LIMIT=1 TRAIN_ARGS="--block-size 4 --seq-len 256 --batch-size 1 --anchors-per-seq 8 --epochs 3 --eval-rows 8"
bash scripts/gpu/device.sh start
if grep -q "rc=[^0]" "$R/work/status"; then echo "a stage failed:"; grep "rc=[^0]" "$R/work/status"; exit 1; fi
ls -l "$OUT"
