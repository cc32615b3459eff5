#!/usr/bin/env bash
# Fresh machine -> working orthrus: install everything into the current python3, then run the main
# job: parallel decoding of a few prompts on the default model (smollm2-135m) with the default
# drafts (on a CPU: hybrid-self, n-gram where the output repeats, else the model's own fp16 copy),
# JSON Lines on stdout, then what the product does on them: plain AR decoding vs parallel decoding
# with the shipped adapter's drafts (verified as a tree: README, "Tree verification"), hybrid drafts (n-gram, else the adapter's), self-drafting,
# hybrid-self and n-gram drafts alone, tokens/s each, tokens per forward, and whether every output
# is identical to AR's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh

# The shipped trained adapter when there is one, at the block size it was trained for (K = 8: the
# verify pass's MKL pack serves 8 rows; the README's latest table ran it so); else a fresh untrained
# one ('init', at K = 4), which is just as exact (greedy output identical to the model's own) but
# accepts few drafts.
ADAPTER=(--adapter init --block-size 4)
if [ -f orthrus/adapters/smollm2-135m/adapter.safetensors ]; then
    ADAPTER=(--adapter orthrus/adapters/smollm2-135m)
fi
PROMPTS=("What is the capital of France? Answer in one sentence."
         "Write a Python function that returns the square of a number.")
python3 -m orthrus.cli generate --model smollm2-135m --max-new-tokens 64 --json "${PROMPTS[@]}"

SET="$(mktemp --suffix .jsonl)"
trap 'rm -f "$SET"' EXIT
for p in "${PROMPTS[@]}"; do python3 -c 'import json, sys; print(json.dumps({"prompt": sys.argv[1]}))' "$p"; done > "$SET"
python3 -m orthrus.cli bench --model smollm2-135m "${ADAPTER[@]}" --prompts "$SET" --limit 0 \
    --modes ar,parallel,hybrid,self,hybrid-self,ngram --ngram-block-size 8 --max-new-tokens 64 --warmup 1 >&2
